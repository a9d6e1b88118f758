//! `vip-bench failover`: cable pulls with the agent against keepalived's VRRP, seen from a
//! client. The cable is pulled in-process over netlink (no `ip` fork in the timing).
//!
//! Per pull: (a) the agent's own netlink-event-to-maps-written time, (b) pull to the first
//! gratuitous ARP on the client's wire (kernel receive stamp), (c) the longest gap in
//! replies seen by a client probing a UDP echo service on the VIP every 500 µs.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    agentproc::{AgentFiles, AgentProc},
    bench::{dist, Dist},
    keepalived::{VrrpLab, KEEPALIVED_MIN_ADVERT_INT},
    probe::{realtime_ns, EchoServer, Probe, Prober, WireWatch},
    topo::{Lab, Port, VIP4, VIP6},
};

const PORT: u16 = 7007;
const PROBE_EVERY: Duration = Duration::from_micros(500);

#[derive(Default)]
pub struct Samples {
    pub maps: Vec<f64>,
    pub wire: Vec<f64>,
    pub outage: Vec<f64>,
    /// The same service over IPv6 (vip only).
    pub outage6: Vec<f64>,
    pub no_recovery: usize,
}

/// The longest silence in replies to probes sent in `[from, to)`, starting from the last
/// reply before `from`.
fn outage_in(recs: &[Probe], from: Instant, to: Instant) -> Option<Duration> {
    let mut rx: Vec<Instant> = recs.iter().filter(|p| p.sent < to).filter_map(|p| p.received).collect();
    rx.sort_unstable();
    let after = rx.partition_point(|t| *t < from);
    if after == rx.len() {
        return None;
    }
    let start = after.checked_sub(1).map_or(from, |i| rx[i]);
    std::iter::once(start).chain(rx[after..].iter().copied()).collect::<Vec<_>>().windows(2).map(|w| w[1] - w[0]).max()
}

pub fn vip(pulls: usize, object: &[u8]) -> Samples {
    let lab = Lab::bridged(3, 1);
    let mut peers = vip_agent::dataplane::Dataplane::load(object).expect("load");
    lab.attach_peers(&mut peers);
    let files = AgentFiles::new("bench");
    files.write(
        "",
        &format!(
            // Seed 001 as written (every survivor announces), like keepalived's GARPs: the
            // defaults (spread, MAC move: nothing to announce) are in `bench scale`.
            "[announce]\ncount = 1\n[probe]\nenabled = false\n{}[[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n\
             [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n",
            lab.adapter_tables_with("move_mac = false\n")
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let _echo = EchoServer::start(&lab.node, PORT).expect("echo");
    let c = &lab.clients[0];
    let watch = WireWatch::start(&c.ns, &c.iface, &[IpAddr::V4(VIP4)]).expect("watch");
    let prober = Prober::start(&c.ns, (VIP4, PORT).into(), PROBE_EVERY).expect("prober");
    let prober6 = Prober::start(&c.ns, (VIP6, PORT).into(), PROBE_EVERY).expect("prober");
    std::thread::sleep(Duration::from_millis(300));
    // Pull the adapter the client uses; the returning adapter announces itself, so the
    // client is back on it before the next pull.
    let mac = |out: &str| out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).and_then(vip_packet::parse_mac);
    let used = mac(&c.ns.ip(&["neigh", "show", &VIP4.to_string()])).expect("client resolved the VIP");
    let j = lab.adapters.iter().position(|a| a.mac == used).expect("an adapter's MAC");
    let mut port = Port::new(lab.switch.as_ref().unwrap(), &lab.adapters[j].peer);
    let mut s = Samples::default();
    let mut windows = vec![];
    for k in 0..pulls {
        // The histogram's count keeps counting; the list of recent failovers is capped.
        let seen = agent.status().maps_written.count;
        let t = realtime_ns();
        let at = Instant::now();
        port.set(false);
        // The wire first: a status query during the failover would contend for the
        // agent's lock and be measured as the agent's own latency.
        match watch.wait_first_after(t, Duration::from_secs(2)) {
            Some((ns, m)) if m != used => s.wire.push(ns as f64),
            other => panic!("pull {k}: no announcement from a survivor ({other:?})"),
        }
        std::thread::sleep(Duration::from_millis(20));
        let st = agent.wait_for("failover", Duration::from_secs(5), |st| st.maps_written.count > seen);
        let f = st.failovers.last().unwrap();
        s.maps.push(f.maps_written_ns as f64);
        std::thread::sleep(Duration::from_millis(100));
        windows.push((at, Instant::now()));
        port.set(true);
        agent.wait_for("back", Duration::from_secs(5), |st| st.maps_written.count > seen + 1);
        std::thread::sleep(Duration::from_millis(100));
    }
    let recs = prober.stop();
    let recs6 = prober6.stop();
    for (at, until) in windows {
        match outage_in(&recs, at, until) {
            Some(d) => s.outage.push(d.as_nanos() as f64),
            None => s.no_recovery += 1,
        }
        match outage_in(&recs6, at, until) {
            Some(d) => s.outage6.push(d.as_nanos() as f64),
            None => s.no_recovery += 1,
        }
    }
    drop(agent);
    s
}

pub fn keepalived(advert_int: f64, pulls: usize) -> Samples {
    let lab = VrrpLab::new(advert_int, 1);
    let _echo = lab.echo_servers(PORT).expect("echo");
    let c = lab.client(0);
    let watch = WireWatch::start(&c.ns, &c.iface, &[IpAddr::V4(VIP4)]).expect("watch");
    let prober = Prober::start(&c.ns, (VIP4, PORT).into(), PROBE_EVERY).expect("prober");
    let mut port = Port::new(&lab.switch, &lab.nodes[0].port);
    let wait = Duration::from_secs_f64((advert_int * 10.0).max(2.0));
    let mut s = Samples::default();
    let mut windows = vec![];
    std::thread::sleep(Duration::from_millis(300));
    for k in 0..pulls {
        let t = realtime_ns();
        let at = Instant::now();
        port.set(false);
        match watch.wait_first_after(t, wait) {
            Some((ns, m)) if m == lab.nodes[1].mac => s.wire.push(ns as f64),
            other => panic!("keepalived pull {k}: no announcement from the backup ({other:?})"),
        }
        // Let the client's probes resume before the next step.
        std::thread::sleep(Duration::from_millis(50));
        windows.push((at, Instant::now()));
        port.set(true);
        assert!(lab.wait_master(0, wait * 2), "ka0 did not take over again");
        // ka0 announces itself when it preempts; let it settle.
        std::thread::sleep(Duration::from_secs_f64((advert_int * 3.0).max(0.3)));
    }
    let recs = prober.stop();
    for (at, until) in windows {
        match outage_in(&recs, at, until) {
            Some(d) => s.outage.push(d.as_nanos() as f64),
            None => s.no_recovery += 1,
        }
    }
    s
}

fn fmt(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

fn row(name: &str, what: &str, d: Option<Dist>) -> String {
    match d {
        Some(d) => format!("| {name} | {what} | {} | {} | {} | {} | {} |", fmt(d.median), fmt(d.p99), fmt(d.min), fmt(d.max), d.n),
        None => format!("| {name} | {what} | n/a | | | | |"),
    }
}

/// Runs the three variants and returns the markdown section.
pub fn run(pulls: usize, ka_pulls: usize, ka_min_pulls: usize, object: &[u8]) -> String {
    eprintln!("vip: {pulls} pulls");
    let v = vip(pulls, object);
    eprintln!("keepalived advert_int {KEEPALIVED_MIN_ADVERT_INT}: {ka_min_pulls} pulls");
    let kmin = keepalived(KEEPALIVED_MIN_ADVERT_INT, ka_min_pulls);
    eprintln!("keepalived advert_int 1: {ka_pulls} pulls");
    let k1 = keepalived(1.0, ka_pulls);
    let opt = |x: &Vec<f64>| if x.is_empty() { None } else { Some(dist(x.clone())) };
    let vo = dist(v.outage.clone());
    let mut out = String::new();
    out += "## Failover: cable pull to recovery, vip against keepalived\n\n";
    out += &format!("`cargo xtask bench failover` on {}.\n\n", crate::bench::machine());
    out += "Same switch (a Linux bridge), same client, same UDP echo service on 192.0.2.10. A pull sets the \
             switch-side port down over netlink, so the node's adapter loses carrier. The client probes \
             every 500 µs. vip: one node with 3 adapters, the agent (release build), hold_down_ms = 0. \
             keepalived 2.2.7: VRRPv3 between two nodes with one adapter each, default GARP settings.\n\n";
    out += "| variant | measure | median | p99 | min | max | pulls |\n|---|---|---|---|---|---|---|\n";
    out += &row("vip", "(a) netlink event to maps written", opt(&v.maps));
    out += "\n";
    out += &row("vip", "(b) pull to first GARP on the client's wire", opt(&v.wire));
    out += "\n";
    out += &row("vip", "(c) outage seen by the client", Some(vo));
    out += "\n";
    out += &row("vip", "(c) the same over IPv6 (unsolicited NA)", opt(&v.outage6));
    out += "\n";
    for (name, k) in [(format!("keepalived advert_int {KEEPALIVED_MIN_ADVERT_INT}"), &kmin), ("keepalived advert_int 1".to_string(), &k1)] {
        out += &row(&name, "(b) pull to first GARP on the client's wire", opt(&k.wire));
        out += "\n";
        out += &row(&name, "(c) outage seen by the client", opt(&k.outage));
        out += "\n";
    }
    out += "\nRatios of median outage (c), keepalived / vip: ";
    for (name, k) in [(format!("advert_int {KEEPALIVED_MIN_ADVERT_INT}"), &kmin), ("advert_int 1".into(), &k1)] {
        if let Some(d) = opt(&k.outage) {
            out += &format!("{name}: **{:.0}x**; ", d.median / vo.median);
        }
    }
    out += &format!(
        "\n\nPulls without recovery inside the window: vip {}, keepalived {} / {}. (a) comes from the agent's \
         own status (monotonic clock, from the moment recv returns the netlink message), read after the \
         announcement reached the client so that the harness's status queries never contend with a \
         failover; the agent's link watcher runs at SCHED_FIFO priority. (b) is the kernel \
         receive time on the client minus the realtime clock read just before the netlink request. \
         (c) is the longest gap between consecutive echo replies around the pull; probes are 500 µs apart, \
         so it cannot be shorter than that.\n",
        v.no_recovery, kmin.no_recovery, k1.no_recovery
    );
    out
}
