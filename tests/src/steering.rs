//! `cargo xtask bench steering`: (1) aggregate throughput to one VIP from many clients,
//! spread over 3 adapters against the same traffic through one adapter, each adapter's
//! link shaped to the same rate; (2) the egress program's cost per frame beside an empty
//! TC program. Variants interleaved, round by round.

use std::{
    net::{IpAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use vip_common::{names, AdapterInfo, FlowInfo, FlowKey, VipKey, ADAPTER_UP};

use crate::{
    agentproc::{AgentFiles, AgentProc},
    bench::{dist, ns, Dist},
    fixtures::{ipv4_to, Arrival, TableEnv, CLIENT4, CLIENT_MAC, NOT_VIP4, UP_MAC, VIP4 as TABLE_VIP4},
    topo::{wait_neigh, Lab, VIP4},
};

/// Each adapter's link, as the switch port toward the node shapes it.
pub const LINK_MBIT: u32 = 100;
const SINK_PORT: u16 = 9000;

/// Bytes received by a UDP socket on the VIP in the node, counted by a thread.
struct Sink {
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(lab: &Lab) -> Sink {
        let sock = lab.node.run(|| UdpSocket::bind((VIP4, SINK_PORT))).expect("sink");
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (bytes, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (b, s) = (bytes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    b.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        Sink { bytes, stop, thread: Some(thread) }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every client sends 1200-byte datagrams to the VIP as fast as it can for `secs`;
/// returns the Mbit/s the node received.
fn blast(lab: &Lab, sink: &Sink, window: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = lab
        .clients
        .iter()
        .map(|c| {
            let sock = c.ns.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let payload = [0u8; 1200];
                while !stop.load(Ordering::Relaxed) {
                    let _ = sock.send_to(&payload, (VIP4, SINK_PORT));
                }
            })
        })
        .collect();
    // Let the queues fill before counting.
    std::thread::sleep(Duration::from_millis(200));
    let b0 = sink.bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let got = sink.bytes.load(Ordering::Relaxed) - b0;
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    got as f64 * 8.0 / secs / 1e6
}

/// The lab with each switch port toward the node shaped to LINK_MBIT, an agent on `vip`.
fn setup(lab: &Lab, tag: &str, vip: &str) -> AgentProc {
    let files = AgentFiles::new(tag);
    files.write("", &format!("[announce]\ncount = 1\n[probe]\nenabled = false\n{}{vip}", lab.adapter_tables()));
    AgentProc::start(&lab.node, &files, &[])
}

pub struct Throughput {
    pub spread: Vec<f64>,
    pub one: Vec<f64>,
    pub shares: Vec<usize>,
}

/// Rounds of: the spread agent, then the one-adapter agent, each blasted for `window`.
pub fn throughput(rounds: usize, clients: usize, window: Duration, object: &[u8]) -> Throughput {
    let lab = Lab::bridged(3, clients);
    let mut peers = vip_agent::dataplane::Dataplane::load(object).expect("load");
    lab.attach_peers(&mut peers);
    let sw = lab.switch.as_ref().unwrap();
    for a in &lab.adapters {
        sw.run(|| {
            let rate = format!("{LINK_MBIT}mbit");
            let ok = std::process::Command::new("tc")
                .args(["qdisc", "add", "dev", &a.peer, "root", "tbf", "rate", &rate, "burst", "64kb", "latency", "20ms"])
                .status()
                .expect("tc")
                .success();
            assert!(ok, "shaping {}", a.peer);
        });
    }
    let spread = format!("[[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"spread\"\n");
    let one = format!("[[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\"]\n");
    let mut out = Throughput { spread: vec![], one: vec![], shares: vec![0; 3] };
    for round in 0..rounds {
        for (variant, cfg) in [("spread", &spread), ("one", &one)] {
            for c in &lab.clients {
                c.ns.ip(&["neigh", "flush", "dev", &c.iface]);
            }
            let agent = setup(&lab, &format!("st{variant}{round}"), cfg);
            let sink = Sink::start(&lab);
            for c in &lab.clients {
                crate::topo::poke(c, IpAddr::V4(VIP4));
            }
            for c in &lab.clients {
                let m = wait_neigh(c, IpAddr::V4(VIP4), "resolved", Duration::from_secs(3), |_| true);
                if variant == "spread" && round == 0 {
                    if let Some(i) = lab.adapters.iter().position(|a| a.mac == m) {
                        out.shares[i] += 1;
                    }
                }
            }
            let mbit = blast(&lab, &sink, window);
            eprintln!("round {round} {variant}: {mbit:.0} Mbit/s");
            if variant == "spread" { &mut out.spread } else { &mut out.one }.push(mbit);
            drop(sink);
            agent.stop();
        }
    }
    out
}

/// ns per frame of `vip_egress` through BPF_PROG_TEST_RUN (repeat 1000, the frame is not
/// changed by a steer to the adapter it is on), beside an empty TC program, for: a VIP's
/// reply to a known client on its own adapter, one redirected to another adapter, and a
/// frame that is not from a VIP (what every other frame pays).
pub fn egress_cost(samples: usize) -> Vec<(&'static str, Dist, Dist)> {
    let mut env = TableEnv::new();
    // Replies from the VIP to the client: the IPv4 frame with its addresses swapped.
    let mut reply = ipv4_to(CLIENT_MAC, TABLE_VIP4);
    reply[6..12].copy_from_slice(&UP_MAC);
    let (src, dst) = (26, 30);
    let (a, b) = (reply[src..src + 4].to_vec(), reply[dst..dst + 4].to_vec());
    reply[src..src + 4].copy_from_slice(&b);
    reply[dst..dst + 4].copy_from_slice(&a);
    let mut other = reply.clone();
    other[src..src + 4].copy_from_slice(&NOT_VIP4.octets());
    let key = VipKey::v4(TABLE_VIP4.octets(), 0);
    let flow = FlowKey { vip: key.addr, client: [u32::from_ne_bytes(CLIENT4.octets()), 0, 0, 0], vlan: 0, family: 4, _pad: 0 };
    let info = |ifindex| FlowInfo { ifindex, slot: 0, _pad: 0, mac: CLIENT_MAC, _pad2: [0; 4], seen_ns: 0, packets: 0, bytes: 0, event_ns: 0 };
    // The test run's device is the namespace's loopback (ifindex 1): made an adapter so
    // that "the client's adapter" can be the one the frame leaves by.
    env.dp.set_adapter(1, AdapterInfo { mac: UP_MAC, slot: 3, state: ADAPTER_UP, heir: 0, flags: 0 }).unwrap();
    let other_adapter = env.ifindex(Arrival::Up);
    let cases: [(&'static str, Vec<u8>, u32); 3] =
        [("VIP reply, client on this adapter", reply.clone(), 1), ("VIP reply, client on another adapter (redirect)", reply, other_adapter), ("not from a VIP", other, 1)];
    let run = |env: &TableEnv, f: &[u8]| {
        env.within(|env| {
            let prog = |name| -> &SchedClassifier { env.dp.tc_program(name).expect("tc program") };
            let go = |p: &SchedClassifier| {
                ns(p.test_run(TestRunOptions { data_in: Some(f), repeat: 1000, ..Default::default() }).expect("test run").duration)
            };
            (go(prog(names::EGRESS_PROGRAM)), go(prog(names::TC_PASS_PROGRAM)))
        })
    };
    let mut res: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); cases.len()];
    for round in 0..samples + 20 {
        for (i, (_, f, ifindex)) in cases.iter().enumerate() {
            // The cases share the flow's key: it is written for each.
            env.dp.set_flow(flow, info(*ifindex)).expect("flow");
            let (e, p) = run(&env, f);
            if round >= 20 {
                res[i].0.push(e);
                res[i].1.push(p);
            }
        }
    }
    cases.iter().zip(res).map(|((n, _, _), (e, p))| (*n, dist(e), dist(p))).collect()
}
