//! The real agent in namespaces: a switch bridge, a node with 3 adapters, clients. Cables
//! are pulled by setting the switch-side port down, as an operator's switch would see it.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use vip_packet::{mac_str, parse_mac, Mac};
use vip_tests::{
    agentproc::{agent_bin, wait_timeout, AgentFiles, AgentProc},
    netns::NetNs,
    probe::{arp_answers, outage, realtime_ns, ArpLoop, EchoServer, Prober, WireWatch},
    root_or_skip,
    topo::{neigh_mac, poke, wait_neigh, Client, Lab, VIP4, VIP6},
};

const SECOND: Duration = Duration::from_secs(1);

/// Seed 001 as written: both VIPs answered on all three adapters (`mode = "all"`), MACs
/// that stay put (`move_mac = false`), so a failure is announced by every survivor.
/// Probing off (the lab has nobody else), quick announcement rounds.
fn lab_body(lab: &Lab) -> String {
    format!(
        "[announce]\ncount = 2\ninterval_ms = 50\n[probe]\nenabled = false\n{}\
         [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n\
         [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n",
        lab.adapter_tables_with("move_mac = false\n")
    )
}

/// The defaults an operator gets: both VIPs spread over the three adapters (one adapter
/// per client), MAC move on.
fn default_body(lab: &Lab) -> String {
    format!(
        "[announce]\ncount = 2\ninterval_ms = 50\n[probe]\nenabled = false\n{}\
         [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\n\
         [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\n",
        lab.adapter_tables()
    )
}

/// The adapters a client uses for the two VIPs (pulling both exercises both families).
fn used_adapters(lab: &Lab, c: &Client) -> (usize, usize, Vec<usize>) {
    let j4 = resolve(lab, c, VIP4.into());
    let j6 = resolve(lab, c, VIP6.into());
    let mut pulled = vec![j4];
    if j6 != j4 {
        pulled.push(j6);
    }
    (j4, j6, pulled)
}

/// The lab and the pass program on the switch ports: a veth delivers the responder's
/// XDP_TX frames only to a peer with an XDP program (a real switch port needs nothing).
fn lab(clients: usize) -> (Lab, vip_agent::dataplane::Dataplane) {
    let lab = Lab::bridged(3, clients);
    let mut dp = vip_tests::load_dataplane();
    lab.attach_peers(&mut dp);
    (lab, dp)
}


fn adapter_of(lab: &Lab, mac: Mac) -> usize {
    lab.adapters.iter().position(|a| a.mac == mac).unwrap_or_else(|| panic!("{} is no adapter's MAC", mac_str(&mac)))
}

fn resolve(lab: &Lab, c: &Client, ip: IpAddr) -> usize {
    poke(c, ip);
    let m = wait_neigh(c, ip, "resolving", 2 * SECOND, |m| lab.adapters.iter().any(|a| a.mac == m));
    adapter_of(lab, m)
}

fn adapter_state(s: &vip_agent::status::Status, name: &str) -> String {
    s.adapters.iter().find(|a| a.name == name).map(|a| a.state.clone()).unwrap_or_default()
}

fn vip_status<'a>(s: &'a vip_agent::status::Status, addr: &str) -> &'a vip_agent::status::VipStatus {
    s.vips.iter().find(|v| v.address == addr).unwrap_or_else(|| panic!("{addr} not in status"))
}

/// Pulling the cable of the adapter a client uses moves the client's neighbor entry for
/// both VIPs to a surviving adapter; the timings show in status and metrics; the adapter
/// announces itself again when the cable is back.
#[test]
fn cable_pull_moves_clients_and_return_is_announced() {
    if !root_or_skip("cable_pull_moves_clients_and_return_is_announced") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("pull");
    files.write("metrics_listen = \"127.0.0.1:9477\"", &lab_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let watch = WireWatch::start(&c.ns, &c.iface, &[IpAddr::V4(VIP4), IpAddr::V6(VIP6)]).unwrap();
    // Pull the adapter each family's entry points at (one or two cables).
    let (j4, j6, pulled) = used_adapters(&lab, c);
    for &p in &pulled {
        lab.pull(p);
    }
    let dead: Vec<Mac> = pulled.iter().map(|&p| lab.adapters[p].mac).collect();
    for (ip, j) in [(IpAddr::V4(VIP4), j4), (IpAddr::V6(VIP6), j6)] {
        let m = wait_neigh(c, ip, "after the pull", 2 * SECOND, |m| m != lab.adapters[j].mac);
        assert!(lab.adapters.iter().any(|a| a.mac == m && !dead.contains(&a.mac)), "{ip} moved to {}", mac_str(&m));
    }
    let j = j4;
    let s = agent.wait_for("adapters down and announced", 2 * SECOND, |s| {
        pulled.iter().all(|&p| adapter_state(s, &lab.adapters[p].name) == "down")
            && s.failovers.iter().filter(|f| f.kind == "down").count() == pulled.len()
            && s.failovers.iter().all(|f| !f.announced_from.is_empty())
    });
    for addr in [VIP4.to_string(), VIP6.to_string()] {
        let v = vip_status(&s, &addr);
        assert_eq!(v.answering.len(), 3 - pulled.len(), "{addr}: {:?}", v.answering);
        assert!(pulled.iter().all(|&p| !v.answering.contains(&lab.adapters[p].name)));
    }
    let f = s.failovers.iter().find(|f| f.adapter == lab.adapters[j].name && f.kind == "down").expect("failover recorded");
    assert_eq!(f.vips, 2);
    assert!(f.first_announcement_ns.is_some() && f.maps_written_ns > 0 && f.dataplane_ns <= f.maps_written_ns, "{f:?}");
    // The same figures on the metrics endpoint (inside the node's namespace).
    let metrics = lab.node.run(|| {
        let mut t = TcpStream::connect("127.0.0.1:9477").expect("metrics");
        t.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        t.read_to_string(&mut out).unwrap();
        out
    });
    assert!(metrics.contains(&format!("vip_failover_maps_written_seconds_count {}", pulled.len())), "{metrics}");
    assert!(metrics.contains(&format!("vip_adapter_up{{adapter=\"{}\"}} 0", lab.adapters[j].name)), "{metrics}");
    assert!(metrics.lines().any(|l| l == "vip_send_errors_total 0"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("vip_refusals_total ")), "{metrics}");

    // Cables back: each adapter answers again and announces itself.
    let back = realtime_ns();
    for &p in &pulled {
        lab.plug(p);
    }
    // (The survivors' own later rounds may still be on the wire: look for the returning MACs.)
    let deadline = Instant::now() + 2 * SECOND;
    while !dead.iter().all(|d| watch.seen().iter().any(|a| a.at_ns >= back && a.mac == *d)) {
        assert!(Instant::now() < deadline, "a returning adapter did not announce: {:?}", watch.seen());
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = agent.wait_for("adapters up", 2 * SECOND, |s| pulled.iter().all(|&p| adapter_state(s, &lab.adapters[p].name) == "up"));
    assert_eq!(vip_status(&s, &VIP4.to_string()).answering.len(), 3);
    // Each entry ends on a returning adapter's MAC (the last announcement it heard).
    for ip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        wait_neigh(c, ip, "after the return", 2 * SECOND, |m| dead.contains(&m));
    }
    assert!(agent.stop().success());
}

fn tcp_echo(ns: &NetNs, port: u16) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let l = ns.run(|| TcpListener::bind(("::", port)).expect("tcp listen"));
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    l.set_nonblocking(true).unwrap();
    let h = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || {
                        let mut b = [0u8; 64];
                        while let Ok(n) = s.read(&mut b) {
                            if n == 0 || s.write_all(&b[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (stop, h)
}

/// Outage bound for the default configuration (spread, MAC move): the failed adapter's
/// MAC is served by its heir as soon as the switch learns it, a millisecond or two here.
const OUTAGE_BOUND: Duration = Duration::from_millis(100);

/// With the defaults, a UDP request loop (both families) and a TCP connection to a
/// service on the VIP keep working across the failure of the adapters the client uses
/// for each family, with an outage below [`OUTAGE_BOUND`].
#[test]
fn udp_and_tcp_survive_a_cable_pull() {
    if !root_or_skip("udp_and_tcp_survive_a_cable_pull") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("svc");
    files.write("", &default_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let _echo = EchoServer::start(&lab.node, 7007).unwrap();
    let (tcp_stop, tcp_thread) = tcp_echo(&lab.node, 7008);
    let (_, _, pulled) = used_adapters(&lab, c);
    let p4 = Prober::start(&c.ns, (VIP4, 7007).into(), Duration::from_millis(1)).unwrap();
    let p6 = Prober::start(&c.ns, (VIP6, 7007).into(), Duration::from_millis(1)).unwrap();
    let mut tcp = c.ns.run(|| TcpStream::connect((VIP4, 7008)).expect("tcp connect"));
    tcp.set_read_timeout(Some(5 * SECOND)).unwrap();
    let exchange = |tcp: &mut TcpStream, i: u32| {
        tcp.write_all(&i.to_be_bytes()).unwrap();
        let mut b = [0u8; 4];
        tcp.read_exact(&mut b).unwrap_or_else(|e| panic!("tcp exchange {i}: {e}"));
        assert_eq!(u32::from_be_bytes(b), i);
    };
    for i in 0..50 {
        exchange(&mut tcp, i);
        std::thread::sleep(Duration::from_millis(4));
    }
    let at = Instant::now();
    for &p in &pulled {
        lab.pull(p);
    }
    let mut slowest = Duration::ZERO;
    for i in 50..600 {
        let t = Instant::now();
        exchange(&mut tcp, i);
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(4));
    }
    for (name, p) in [("udp4", p4), ("udp6", p6)] {
        let recs = p.stop();
        let out = outage(&recs, at).unwrap_or_else(|| panic!("{name}: no reply after the pull"));
        eprintln!("{name}: outage {out:?} after pulling {pulled:?}");
        assert!(out <= OUTAGE_BOUND, "{name}: outage {out:?} over {OUTAGE_BOUND:?}");
        // Every probe sent after the bound is answered: the service is back for good.
        let late: Vec<_> = recs.iter().filter(|r| r.sent > at + OUTAGE_BOUND).collect();
        let lost = late.iter().filter(|r| r.received.is_none()).count();
        assert!(!late.is_empty() && lost == 0, "{name}: {lost} of {} probes unanswered after recovery (outage {out:?})", late.len());
    }
    eprintln!("tcp: slowest exchange {slowest:?}");
    // A segment lost in the outage waits for one retransmission (Linux's minimum RTO is
    // 200 ms): no more.
    assert!(slowest <= OUTAGE_BOUND + Duration::from_millis(300), "a TCP exchange took {slowest:?}");
    let s = agent.status();
    let f = s.failovers.iter().find(|f| f.kind == "down").expect("failover recorded");
    assert!(f.dataplane_ns <= f.maps_written_ns, "{f:?}");
    tcp_stop.store(true, Ordering::Relaxed);
    drop(tcp);
    tcp_thread.join().unwrap();
    assert!(agent.stop().success());
}

/// A flap shorter than hold_down_ms changes nothing: no failover, no announcement, the
/// client keeps its entry. A longer one fails over once hold-down runs out.
#[test]
fn flap_shorter_than_hold_down_changes_nothing() {
    if !root_or_skip("flap_shorter_than_hold_down_changes_nothing") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("flap");
    files.write("hold_down_ms = 600", &lab_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let watch = WireWatch::start(&c.ns, &c.iface, &[IpAddr::V4(VIP4), IpAddr::V6(VIP6)]).unwrap();
    let j = resolve(&lab, c, VIP4.into());
    let name = lab.adapters[j].name.clone();
    // Past the start-up announcement rounds.
    std::thread::sleep(Duration::from_millis(200));
    let t = realtime_ns();
    lab.pull(j);
    agent.wait_for("hold-down", SECOND, |s| adapter_state(s, &name) == "hold-down");
    std::thread::sleep(Duration::from_millis(100));
    lab.plug(j);
    agent.wait_for("up again", SECOND, |s| adapter_state(s, &name) == "up");
    std::thread::sleep(Duration::from_millis(900));
    let s = agent.status();
    assert!(s.failovers.is_empty(), "{:?}", s.failovers);
    assert_eq!(watch.first_after(t), None, "no announcement for a short flap");
    // (The client's own entry is not checked here: its kernel may have re-resolved on its
    // own while the cable was out, and any adapter may have answered that.)

    // Longer than hold-down: a failover, timed from when hold-down ran out.
    lab.pull(j);
    let s = agent.wait_for("down after hold-down", 2 * SECOND, |s| adapter_state(s, &name) == "down");
    assert_eq!(s.failovers.len(), 1);
    wait_neigh(c, VIP4.into(), "after hold-down", SECOND, |m| m != lab.adapters[j].mac);
    assert!(agent.stop().success());
}

/// All adapters down shows in status with nothing answering; the first one back takes
/// every VIP and announces them. With up_delay_ms it waits first.
#[test]
fn all_down_then_one_returns_after_up_delay() {
    if !root_or_skip("all_down_then_one_returns_after_up_delay") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("alldown");
    files.write("up_delay_ms = 300", &lab_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let watch = WireWatch::start(&c.ns, &c.iface, &[IpAddr::V4(VIP4), IpAddr::V6(VIP6)]).unwrap();
    for i in 0..3 {
        lab.pull(i);
    }
    let s = agent.wait_for("all down", 2 * SECOND, |s| s.adapters.iter().all(|a| a.state == "down"));
    for v in &s.vips {
        assert!(v.answering.is_empty(), "{} answering on {:?}", v.address, v.answering);
    }
    let back = realtime_ns();
    lab.plug(1);
    agent.wait_for("up-delay", SECOND, |s| adapter_state(s, "vip1") == "up-delay");
    assert_eq!(watch.first_after(back), None, "nothing announced during up_delay");
    let s = agent.wait_for("vip1 up", 2 * SECOND, |s| adapter_state(s, "vip1") == "up");
    assert_eq!(vip_status(&s, &VIP4.to_string()).answering, vec!["vip1".to_string()]);
    let (after, mac) = watch.wait_first_after(back, SECOND).expect("announced on return");
    assert_eq!(mac, lab.adapters[1].mac);
    assert!(after >= 300_000_000, "announced {after} ns after the cable came back, before up_delay");
    assert_eq!(resolve(&lab, c, VIP6.into()), 1);
    assert!(agent.stop().success());
}

/// Seed 002: a VIP whose own adapters are all down moves to another healthy adapter in
/// its subnet (and back); one with failover = false stays dark.
#[test]
fn takeover_and_pinned_vips() {
    if !root_or_skip("takeover_and_pinned_vips") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("takeover");
    files.write(
        // Generic XDP here; the other tests attach in native (auto) mode.
        "xdp_mode = \"skb\"",
        &format!(
            "[probe]\nenabled = false\n{}\
             [[vip]]\naddress = \"192.0.2.20/24\"\nadapters = [\"vip0\"]\n\
             [[vip]]\naddress = \"192.0.2.21/24\"\nadapters = [\"vip0\"]\nfailover = false\n\
             [[vip]]\naddress = \"2001:db8::21/64\"\nadapters = [\"vip0\"]\nfailover = false\n",
            lab.adapter_tables()
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    lab.pull(0);
    let s = agent.wait_for("takeover", 2 * SECOND, |s| adapter_state(s, "vip0") == "down");
    let moved = vip_status(&s, "192.0.2.20");
    assert_eq!(moved.answering, vec!["vip1".to_string(), "vip2".to_string()]);
    assert_eq!(moved.taken_over_by, moved.answering);
    assert!(vip_status(&s, "192.0.2.21").answering.is_empty());
    let c = &lab.clients[0];
    // Nobody answers for a pinned VIP whose adapter is down: not the data plane on the
    // other adapters, and not the node's kernel either (arp_ignore; no NS for `lo`).
    for ip in ["192.0.2.21", "2001:db8::21"] {
        let ip: IpAddr = ip.parse().unwrap();
        poke(c, ip);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(neigh_mac(c, ip), None, "{ip} was answered while its only adapter is down");
    }
    let m = {
        poke(c, "192.0.2.20".parse().unwrap());
        wait_neigh(c, "192.0.2.20".parse().unwrap(), "taken over", 2 * SECOND, |_| true)
    };
    assert_ne!(adapter_of(&lab, m), 0);
    lab.plug(0);
    let s = agent.wait_for("home again", 2 * SECOND, |s| adapter_state(s, "vip0") == "up");
    let home = vip_status(&s, "192.0.2.20");
    assert_eq!(home.answering, vec!["vip0".to_string()]);
    assert!(home.taken_over_by.is_empty());
    assert_eq!(vip_status(&s, "192.0.2.21").answering, vec!["vip0".to_string()]);
    assert!(agent.stop().success());
}

/// What the host looks like to an operator: addresses, XDP attachments, sysctls, pins.
fn host_snapshot(lab: &Lab, pin_root: &str) -> String {
    // Link-local addresses finish DAD on their own time: "tentative" is not ours.
    let mut s = lab.node.ip(&["-d", "addr"]).replace(" tentative", "");
    s += &lab.node.ip(&["-d", "link"]);
    s += &lab.node.ip(&["route", "show", "table", "all"]);
    s += &lab.node.ip(&["-6", "route", "show", "table", "all"]);
    s += &lab.node.exec("cat", &["/proc/sys/net/ipv6/ip_nonlocal_bind"]);
    s += &lab.node.exec("bridge", &["fdb", "show"]);
    for a in &lab.adapters {
        for k in ["ipv4/conf/{}/arp_ignore", "ipv4/conf/{}/arp_announce", "ipv4/conf/{}/ignore_routes_with_linkdown", "ipv6/conf/{}/ignore_routes_with_linkdown"] {
            s += &lab.node.exec("cat", &[&format!("/proc/sys/net/{}", k.replace("{}", &a.name))]);
        }
    }
    s += &std::fs::read_dir(pin_root).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned() + "\n").collect::<String>()).unwrap_or_default();
    s
}

/// Bad configs and a config that does not fit the host exit 2, name file, line and key,
/// and leave the host exactly as it was. The agent's own clean stop restores it too.
#[test]
fn bad_config_changes_nothing_and_stop_restores_the_host() {
    if !root_or_skip("bad_config_changes_nothing_and_stop_restores_the_host") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("bad");
    let before = host_snapshot(&lab, "/sys/fs/bpf");
    let adapters = lab.adapter_tables();
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown key", format!("{adapters}[[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\"]\ncolour = \"red\"\n"), "colour"),
        ("missing adapter", format!("{adapters}[[adapter]]\nname = \"eth9\"\n[[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"eth9\"]\n"), "does not exist"),
        ("wrong subnet", format!("{adapters}[[vip]]\naddress = \"198.51.100.10/24\"\nadapters = [\"vip0\"]\n"), "vip[0].address"),
        ("bad address", format!("{adapters}[[vip]]\naddress = \"192.0.2.300/24\"\nadapters = [\"vip0\"]\n"), "vip[0].address"),
        ("syntax", format!("{adapters}[[vip]\n"), "unclosed array table"),
    ];
    for (name, body, needle) in cases {
        files.write("", &body);
        for sub in ["check", "run"] {
            let mut cmd = std::process::Command::new(agent_bin());
            cmd.args([sub, "--config"]).arg(&files.config).args(["--netns", &lab.node.name]);
            if sub == "run" {
                cmd.env("VIP_EBPF_OBJECT", vip_tests::object_path());
            }
            let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
            let st = wait_timeout(&mut child, 10 * SECOND);
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            assert_eq!(st.code(), Some(2), "{name} ({sub}): {err}");
            let file = files.config.display().to_string();
            assert!(err.contains(&format!("{file}:")) && err.contains(needle), "{name} ({sub}): {err}");
            assert_eq!(host_snapshot(&lab, "/sys/fs/bpf"), before, "{name} ({sub}) changed the host");
        }
    }
    // A good config changes the host while running (VIP routes among it) and restores it
    // on SIGTERM, a moved MAC's filter entry included.
    files.write("", &default_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let during = host_snapshot(&lab, "/sys/fs/bpf");
    assert_ne!(during, before);
    assert!(lab.node.ip(&["route", "show", "table", "local"]).contains(&format!("local {VIP4} dev lo proto 86")), "{during}");
    lab.pull(0);
    agent.wait_for("vip0's MAC moved", 2 * SECOND, |s| s.adapters.iter().any(|a| a.name == "vip0" && a.mac_moved));
    assert!(lab.node.exec("bridge", &["fdb", "show"]).contains("02:00:00:00:01:00 dev vip"), "the heir's filter holds vip0's MAC");
    assert!(agent.stop().success());
    lab.plug(0);
    let deadline = Instant::now() + 2 * SECOND;
    while host_snapshot(&lab, "/sys/fs/bpf") != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host_snapshot(&lab, "/sys/fs/bpf"), before, "host not restored after SIGTERM");
}

fn xdp_prog_ids(lab: &Lab) -> Vec<String> {
    lab.adapters
        .iter()
        .map(|a| {
            let out = lab.node.ip(&["-d", "link", "show", &a.name]);
            out.split_whitespace().skip_while(|w| *w != "prog/xdp").nth(2).unwrap_or("none").to_string()
        })
        .collect()
}

/// `vip-agent reload` against a config file; its exit code and what it printed.
fn reload_cmd(files: &AgentFiles) -> (Option<i32>, String) {
    let out = std::process::Command::new(agent_bin()).args(["reload", "--config"]).arg(&files.config).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A live reload applies an edited config as a difference while the VIPs in both versions
/// go on being answered: `vip-agent reload` adds an adapter and a VIP, removes a VIP and
/// changes another; a file with an error and a change only a restart can make are
/// refused with nothing changed; SIGHUP with the first file takes the adapter and the VIP
/// back out. An ARP request every 2 ms for an unchanged VIP gets an answer throughout;
/// the agent still fails over afterwards, and a stop restores the host.
#[test]
fn reload_applies_a_changed_config_without_a_lost_answer() {
    if !root_or_skip("reload_applies_a_changed_config_without_a_lost_answer") {
        return;
    }
    let (lab, _peers) = lab(1);
    let before = host_snapshot(&lab, "/sys/fs/bpf");
    let (kept, removed, added) = (VIP4, std::net::Ipv4Addr::new(192, 0, 2, 31), std::net::Ipv4Addr::new(192, 0, 2, 32));
    let head = "[announce]\ncount = 2\ninterval_ms = 50\n[probe]\ncount = 1\nwait_ms = 100\n";
    let v1 = format!(
        "{head}[[adapter]]\nname = \"vip0\"\n[[adapter]]\nname = \"vip1\"\n\
         [[vip]]\naddress = \"{kept}/24\"\nadapters = [\"vip0\", \"vip1\"]\nmode = \"all\"\n\
         [[vip]]\naddress = \"{removed}/24\"\nadapters = [\"vip0\", \"vip1\"]\nmode = \"all\"\n\
         [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip0\", \"vip1\"]\nmode = \"all\"\n"
    );
    let v2 = format!(
        "{head}[[adapter]]\nname = \"vip0\"\n[[adapter]]\nname = \"vip1\"\n[[adapter]]\nname = \"vip2\"\n\
         [[vip]]\naddress = \"{kept}/24\"\nadapters = [\"vip0\", \"vip1\"]\nmode = \"all\"\n\
         [[vip]]\naddress = \"{added}/24\"\nadapters = [\"vip2\"]\nmode = \"all\"\n\
         [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n"
    );
    let files = AgentFiles::new("reload");
    files.write("", &v1);
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let macs = |i: usize| lab.adapters[i].mac;
    let mut both = vec![macs(0), macs(1)];
    both.sort();
    assert_eq!(arp_answers(c, removed), both);
    let arp = ArpLoop::start_for(c, kept);
    std::thread::sleep(Duration::from_millis(200));

    // 1. `vip-agent reload`: an adapter and a VIP added, a VIP removed, one changed.
    files.write("", &v2);
    let (code, out) = reload_cmd(&files);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("VIPs: 1 added, 1 removed, 1 changed, 1 unchanged; adapters added: vip2"), "{out}");
    let s = agent.status();
    assert_eq!(s.reloads, 1);
    assert_eq!(adapter_state(&s, "vip2"), "up");
    assert_eq!(vip_status(&s, &added.to_string()).state, "active");
    assert!(s.vips.iter().all(|v| v.address != removed.to_string()), "{:?}", s.vips);
    assert_eq!(vip_status(&s, &VIP6.to_string()).answering.len(), 3, "the changed VIP is answered on its new adapter too");
    assert_eq!(arp_answers(c, added), vec![macs(2)], "the new VIP is answered from its adapter");
    assert!(arp_answers(c, removed).is_empty(), "the removed VIP is still answered");
    let local = lab.node.ip(&["route", "show", "table", "local"]);
    assert!(local.contains(&format!("local {added} dev lo")) && !local.contains(&format!("local {removed} ")), "{local}");
    assert_ne!(xdp_prog_ids(&lab)[2], "none", "the new adapter has the program");

    // 2. Refused, nothing changed: an error in the file (exit 2, its line named), and a
    //    setting only a restart can apply (exit 1).
    std::fs::write(&files.config, std::fs::read_to_string(&files.config).unwrap() + "[[vip]]\naddres = \"192.0.2.40/24\"\n").unwrap();
    let (code, out) = reload_cmd(&files);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(&format!("{}:", files.config.display())) && out.contains("addres"), "{out}");
    // The same file by SIGHUP: the agent reads it, says why in its log, and goes on.
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + 5 * SECOND;
    while !(agent.log_text().contains("reload refused") && agent.log_text().contains("vip[3].addres: unknown key")) {
        assert!(Instant::now() < deadline, "no refusal logged for SIGHUP with a bad file:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    files.write("metrics_listen = \"127.0.0.1:19111\"", &v2);
    let (code, out) = reload_cmd(&files);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("metrics_listen") && out.contains("restart"), "{out}");
    let s = agent.status();
    assert_eq!((s.reloads, adapter_state(&s, "vip2")), (1, "up".to_string()));
    assert_eq!(arp_answers(c, added), vec![macs(2)]);

    // 3. SIGHUP with the first file: the adapter and the VIP go again.
    files.write("", &v1);
    agent.signal(libc::SIGHUP);
    let s = agent.wait_for("the second reload", 5 * SECOND, |s| s.reloads == 2);
    assert!(s.adapters.iter().all(|a| a.name != "vip2"), "{:?}", s.adapters);
    assert!(arp_answers(c, added).is_empty(), "a VIP taken out of the config is still answered");
    assert_eq!(arp_answers(c, removed).len(), 2, "the VIP put back is answered again");
    let deadline = Instant::now() + 2 * SECOND;
    while xdp_prog_ids(&lab)[2] != "none" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(xdp_prog_ids(&lab)[2], "none", "the removed adapter keeps its program");
    let (sent, unanswered) = arp.finish();
    assert!(sent > 200, "only {sent} requests sent");
    assert_eq!(unanswered, 0, "{unanswered} of {sent} ARP requests for an unchanged VIP unanswered across three reloads");
    let log = agent.log_text();
    for l in log.lines().filter(|l| l.contains("reload") || l.contains("ERROR")) {
        eprintln!("{l}");
    }
    eprintln!("{sent} ARP requests for the unchanged VIP, {unanswered} unanswered");
    assert!(log.contains("reload: the new agent runs"), "{log}");

    // Still a working agent, with its history: it fails over, and a stop restores the host.
    lab.pull(0);
    agent.wait_for("failover after reloads", 2 * SECOND, |s| adapter_state(s, "vip0") == "down" && !s.failovers.is_empty());
    lab.plug(0);
    agent.wait_for("vip0 up", 2 * SECOND, |s| adapter_state(s, "vip0") == "up");
    assert!(agent.stop().success());
    assert_eq!(host_snapshot(&lab, "/sys/fs/bpf"), before, "host not restored");
}

/// `[agent] ebpf_log = "debug"`: the data plane's own records (aya-log) reach the agent's
/// log, the answered ARP request named with its addresses and MACs. A reload to `off`
/// replaces the programs (their level is fixed when loaded) and the records stop.
#[test]
fn the_data_plane_logs_reach_the_agent_log_when_asked() {
    if !root_or_skip("the_data_plane_logs_reach_the_agent_log_when_asked") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("ebpflog");
    files.write("ebpf_log = \"debug\"", &lab_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let answered = |log: &str| log.lines().filter(|l| l.contains("vip_ebpf") && l.contains(&format!("ARP {VIP4} is at")) && l.contains(&format!("told {} ({})", c.ip4, mac_str(&c.mac)))).count();
    assert_eq!(arp_answers(c, VIP4).len(), 3);
    let deadline = Instant::now() + 3 * SECOND;
    while answered(&agent.log_text()) == 0 {
        assert!(Instant::now() < deadline, "no data plane record in the log:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = agent.log_text().lines().find(|l| answered(l) == 1).unwrap().to_string();
    assert!(lab.adapters.iter().any(|a| line.contains(&format!("is at {}", mac_str(&a.mac)))), "{line}");
    let ids = xdp_prog_ids(&lab);
    files.write("", &lab_body(&lab));
    let (code, out) = reload_cmd(&files);
    assert_eq!(code, Some(0), "{out}");
    let new_ids = xdp_prog_ids(&lab);
    assert!(new_ids.iter().zip(&ids).all(|(a, b)| a != b && a != "none"), "logging off replaces the programs: {ids:?} -> {new_ids:?}");
    std::thread::sleep(Duration::from_millis(300));
    let before = answered(&agent.log_text());
    assert_eq!(arp_answers(c, VIP4).len(), 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(answered(&agent.log_text()), before, "records still come with ebpf_log off");
    assert!(agent.stop().success());
}

/// SIGKILL leaves the pinned program and maps answering; a restarted agent adopts them
/// (and with --reload swaps in a new program), SIGUSR1 hands over cleanly, all without a
/// single request going unanswered; then a clean stop restores the host.
#[test]
fn sigkill_and_restart_keep_answering() {
    if !root_or_skip("sigkill_and_restart_keep_answering") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("kill");
    files.write("", &default_body(&lab));
    let before = host_snapshot(&lab, "/sys/fs/bpf");
    let agent = AgentProc::start(&lab.node, &files, &[]);
    assert!(!agent.status().adopted);
    let c = &lab.clients[0];
    let arp = ArpLoop::start(c);
    std::thread::sleep(Duration::from_millis(100));
    let ids = xdp_prog_ids(&lab);
    agent.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(xdp_prog_ids(&lab), ids, "the program stays attached after SIGKILL");
    let agent = AgentProc::start(&lab.node, &files, &[]);
    assert!(agent.status().adopted, "restart adopts the pinned maps");
    assert_eq!(xdp_prog_ids(&lab), ids, "adopting keeps the attached program");
    agent.kill();
    let agent = AgentProc::start(&lab.node, &files, &["--reload"]);
    let new_ids = xdp_prog_ids(&lab);
    assert!(new_ids.iter().zip(&ids).all(|(a, b)| a != b && a != "none"), "--reload replaces the program: {ids:?} -> {new_ids:?}");
    // The agent keeps the data plane's clock ticking for the client table.
    let fence = vip_agent::dataplane::Fence::open(&files.pin_path).expect("the pinned FENCE");
    let t0 = fence.clock();
    std::thread::sleep(Duration::from_millis(350));
    let t1 = fence.clock();
    assert!(t0 != 0 && t1 >= t0 + 200_000_000, "the data plane's clock does not tick: {t0} -> {t1}");
    // A clean hand-over (SIGUSR1) to the next agent: exit 0, nothing taken down.
    assert!(agent.hand_over().success());
    assert_eq!(fence.clock(), 0, "a clock nobody ticks is left to the data plane");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(xdp_prog_ids(&lab), new_ids, "the program stays attached after SIGUSR1");
    let agent = AgentProc::start(&lab.node, &files, &[]);
    assert!(agent.status().adopted);
    std::thread::sleep(Duration::from_millis(100));
    let (sent, unanswered) = arp.finish();
    assert!(sent > 100, "only {sent} requests sent");
    assert_eq!(unanswered, 0, "{unanswered} of {sent} ARP requests unanswered across SIGKILL and restarts");
    // Still a working agent: it fails over.
    lab.pull(0);
    agent.wait_for("failover after adoption", 2 * SECOND, |s| adapter_state(s, "vip0") == "down" && !s.failovers.is_empty());
    lab.plug(0);
    agent.wait_for("vip0 up", 2 * SECOND, |s| adapter_state(s, "vip0") == "up");
    assert!(agent.stop().success());
    assert_eq!(host_snapshot(&lab, "/sys/fs/bpf"), before, "host not restored");
}

/// A VIP another host already answers for is refused with the reason in status, and
/// neither answered nor added to the host; the other VIPs come up.
#[test]
fn conflicting_vip_is_refused() {
    if !root_or_skip("conflicting_vip_is_refused") {
        return;
    }
    let (lab, _peers) = lab(2);
    let squatter = &lab.clients[1];
    squatter.ns.ip(&["addr", "add", &format!("{VIP4}/24"), "dev", &squatter.iface]);
    squatter.ns.ip(&["addr", "add", &format!("{VIP6}/64"), "dev", &squatter.iface, "nodad"]);
    let files = AgentFiles::new("conflict");
    files.write(
        "",
        &format!(
            "[probe]\ncount = 2\nwait_ms = 200\n{}\
             [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\"]\n\
             [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip0\", \"vip1\"]\n\
             [[vip]]\naddress = \"192.0.2.30/24\"\nadapters = [\"vip0\", \"vip1\"]\n",
            lab.adapter_tables()
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let s = agent.status();
    for addr in [VIP4.to_string(), VIP6.to_string()] {
        let v = vip_status(&s, &addr);
        assert_eq!(v.state, "refused", "{addr}");
        assert!(v.answering.is_empty());
        let r = s.refusals.iter().find(|r| r.vip == addr).unwrap_or_else(|| panic!("no refusal for {addr}"));
        assert!(r.reason.contains(&mac_str(&squatter.mac)), "{}", r.reason);
    }
    assert_eq!(vip_status(&s, "192.0.2.30").state, "active");
    let local = lab.node.ip(&["route", "show", "table", "local"]) + &lab.node.ip(&["-6", "route", "show", "table", "local"]);
    assert!(
        !local.contains(&format!("{VIP4} ")) && !local.contains(&format!("{VIP6} ")) && local.contains("local 192.0.2.30 dev lo"),
        "{local}"
    );
    assert!(agent.log_text().contains("VIP refused"));
    assert!(agent.stop().success());
}

/// Adapters removed and re-added (same name, new ifindex) are let go and taken back.
#[test]
fn adapter_removed_and_recreated() {
    if !root_or_skip("adapter_removed_and_recreated") {
        return;
    }
    let (lab, mut peers) = lab(1);
    let files = AgentFiles::new("readd");
    files.write("", &lab_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    lab.node.ip(&["link", "del", "vip2"]);
    let s = agent.wait_for("vip2 missing", 2 * SECOND, |s| adapter_state(s, "vip2") == "missing");
    // Deleting a device first takes it down (RTM_NEWLINK), then removes it (RTM_DELLINK):
    // one failover, recorded as "down" or "removed" depending on which the agent saw first.
    assert_eq!(s.failovers.iter().filter(|f| f.adapter == "vip2").count(), 1, "{:?}", s.failovers);
    assert_eq!(vip_status(&s, &VIP4.to_string()).answering.len(), 2);
    let sw = lab.switch.as_ref().unwrap();
    vip_tests::netns::veth(&lab.node, "vip2", "02:00:00:00:01:12", sw, "n2", "02:00:00:00:04:02");
    sw.ip(&["link", "set", "n2", "master", "br0"]);
    sw.run(|| peers.attach_pass("n2", aya::programs::XdpMode::Driver).map(|_| ()).unwrap_or_else(|e| panic!("{e}")));
    lab.node.ip(&["addr", "add", "192.0.2.3/24", "dev", "vip2"]);
    let s = agent.wait_for("vip2 back", 3 * SECOND, |s| adapter_state(s, "vip2") == "up");
    let a = s.adapters.iter().find(|a| a.name == "vip2").unwrap();
    assert_eq!(a.mac.as_deref(), Some("02:00:00:00:01:12"));
    assert_eq!(vip_status(&s, &VIP4.to_string()).answering.len(), 3);
    let c = &lab.clients[0];
    // The new device answers: pull the other two so only it can.
    lab.pull(0);
    lab.pull(1);
    agent.wait_for("only vip2", 2 * SECOND, |s| vip_status(s, &VIP4.to_string()).answering == vec!["vip2".to_string()]);
    poke(c, VIP4.into());
    wait_neigh(c, VIP4.into(), "via the new vip2", 2 * SECOND, |m| m == parse_mac("02:00:00:00:01:12").unwrap());
    assert!(agent.stop().success());
}

/// Announcements are paced per adapter by max_per_second: 40 VIPs moving at once go out
/// from each survivor at the configured rate, and every VIP is announced `count` times.
#[test]
fn announcements_are_paced_per_adapter() {
    if !root_or_skip("announcements_are_paced_per_adapter") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("pace");
    let vips: Vec<IpAddr> = (40..80).map(|i| IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, i))).collect();
    let tables: String =
        vips.iter().map(|v| format!("[[vip]]\naddress = \"{v}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n")).collect();
    files.write(
        "",
        &format!(
            "[announce]\ncount = 2\ninterval_ms = 50\nmax_per_second = 100\n[probe]\nenabled = false\n{}{tables}",
            lab.adapter_tables_with("move_mac = false\n")
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let watch = WireWatch::start(&c.ns, &c.iface, &vips).unwrap();
    // Past the start-up rounds (themselves paced: 3 adapters x 40 VIPs x 2).
    agent.wait_for("start-up announcements sent", 5 * SECOND, |s| s.announcements_queued == 0);
    let t = realtime_ns();
    lab.pull(0);
    agent.wait_for("queue drained", 5 * SECOND, |s| adapter_state(s, "vip0") == "down" && s.announcements_queued == 0);
    // The wire decides: a status taken between the adapter going down and its VIPs'
    // announcements being queued shows an empty queue too (seen under CI load), so every
    // survivor's 80 frames are waited for (the pacing is checked from their times below).
    let deadline = Instant::now() + 5 * SECOND;
    let survivors = |seen: &[vip_tests::probe::Announcement]| {
        lab.adapters[1..].iter().all(|a| seen.iter().filter(|x| x.mac == a.mac).count() >= 80)
    };
    loop {
        let now: Vec<_> = watch.seen().into_iter().filter(|a| a.at_ns >= t).collect();
        if survivors(&now) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let seen: Vec<_> = watch.seen().into_iter().filter(|a| a.at_ns >= t).collect();
    for a in &lab.adapters[1..] {
        let mine: Vec<u64> = seen.iter().filter(|x| x.mac == a.mac).map(|x| x.at_ns - t).collect();
        assert_eq!(mine.len(), 80, "{}: {} announcements, want 40 VIPs x 2", a.name, mine.len());
        for v in &vips {
            assert_eq!(seen.iter().filter(|x| x.mac == a.mac && x.ip == *v).count(), 2, "{} announced {v}", a.name);
        }
        // A burst of max_per_second / 10, then 100 per second: 80 frames take about 0.7 s.
        let first_300ms = mine.iter().filter(|ns| **ns < 300_000_000).count();
        assert!(first_300ms <= 10 + 30 + 3, "{}: {first_300ms} announcements in the first 300 ms", a.name);
        let last = *mine.iter().max().unwrap();
        assert!(last >= 600_000_000, "{}: all 80 sent within {last} ns, faster than 100/s", a.name);
    }
    assert!(seen.iter().all(|x| x.mac != lab.adapters[0].mac), "the failed adapter announced");
    assert!(agent.stop().success());
}

/// Seed 002's checks before a VIP is answered somewhere new: subnet, VLAN, max_vips. Each
/// adapter that may not take a VIP over is a refusal with its reason in status.
#[test]
fn takeover_checks_refuse_with_reasons() {
    if !root_or_skip("takeover_checks_refuse_with_reasons") {
        return;
    }
    let (lab, _peers) = lab(1);
    lab.node.ip(&["addr", "add", "198.51.100.1/24", "dev", "vip0"]);
    let files = AgentFiles::new("checks");
    files.write(
        "",
        "[probe]\nenabled = false\n\
         [[adapter]]\nname = \"vip0\"\nvlans = [100]\n\
         [[adapter]]\nname = \"vip1\"\nmax_vips = 1\n\
         [[adapter]]\nname = \"vip2\"\n\
         [[vip]]\naddress = \"192.0.2.20/24\"\nadapters = [\"vip0\"]\n\
         [[vip]]\naddress = \"192.0.2.22/24\"\nadapters = [\"vip0\"]\n\
         [[vip]]\naddress = \"198.51.100.10/24\"\nadapters = [\"vip0\"]\n\
         [[vip]]\naddress = \"192.0.2.23/24\"\nadapters = [\"vip0\"]\nvlan = 100\n",
    );
    let rxvlan = |dev: &str| lab.node.exec("ethtool", &["-k", dev]).lines().find(|l| l.starts_with("rx-vlan-offload:")).unwrap_or("").to_string();
    assert_eq!(rxvlan("vip0"), "rx-vlan-offload: on");
    let agent = AgentProc::start(&lab.node, &files, &[]);
    // vip0 carries VLAN 100: a NIC stripping tags before XDP would hide them.
    assert_eq!(rxvlan("vip0"), "rx-vlan-offload: off");
    assert_eq!(rxvlan("vip1"), "rx-vlan-offload: on");
    lab.pull(0);
    let s = agent.wait_for("vip0 down", 2 * SECOND, |s| adapter_state(s, "vip0") == "down");
    let names = |v: &[String]| v.join(",");
    assert_eq!(names(&vip_status(&s, "192.0.2.20").answering), "vip1,vip2");
    assert_eq!(names(&vip_status(&s, "192.0.2.22").answering), "vip2", "vip1 is at max_vips");
    assert!(vip_status(&s, "198.51.100.10").answering.is_empty());
    assert!(vip_status(&s, "192.0.2.23").answering.is_empty());
    let refused = |vip: &str, adapter: &str, why: &str| {
        assert!(
            s.refusals.iter().any(|r| r.vip == vip && r.adapter.as_deref() == Some(adapter) && r.reason.contains(why)),
            "no refusal of {vip} on {adapter} ({why}): {:?}",
            s.refusals
        )
    };
    refused("192.0.2.22", "vip1", "max_vips");
    refused("198.51.100.10", "vip1", "subnet");
    refused("198.51.100.10", "vip2", "subnet");
    refused("192.0.2.23", "vip1", "vlan 100");
    refused("192.0.2.23", "vip2", "vlan 100");
    assert!(agent.log_text().contains("takeover refused"));
    let n = s.refusals.len();
    // Said once: a later, unrelated change does not repeat them.
    lab.pull(1);
    let s = agent.wait_for("vip1 down", 2 * SECOND, |s| adapter_state(s, "vip1") == "down");
    assert_eq!(names(&vip_status(&s, "192.0.2.20").answering), "vip2");
    assert_eq!(s.refusals.len(), n, "{:?}", &s.refusals[n..]);
    assert!(agent.stop().success());
    assert_eq!(rxvlan("vip0"), "rx-vlan-offload: on", "restored on stop");
}

/// An adapter renamed away is let go; renamed back, it is taken up again.
#[test]
fn adapter_renamed_away_and_back() {
    if !root_or_skip("adapter_renamed_away_and_back") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("rename");
    files.write("", &lab_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    lab.node.ip(&["link", "set", "vip2", "down"]);
    lab.node.ip(&["link", "set", "vip2", "name", "other"]);
    lab.node.ip(&["link", "set", "other", "up"]);
    let s = agent.wait_for("vip2 missing", 2 * SECOND, |s| adapter_state(s, "vip2") == "missing");
    assert_eq!(vip_status(&s, &VIP4.to_string()).answering.len(), 2);
    lab.node.ip(&["link", "set", "other", "down"]);
    lab.node.ip(&["link", "set", "other", "name", "vip2"]);
    lab.node.ip(&["link", "set", "vip2", "up"]);
    let s = agent.wait_for("vip2 back", 3 * SECOND, |s| adapter_state(s, "vip2") == "up");
    assert_eq!(vip_status(&s, &VIP4.to_string()).answering.len(), 3);
    assert!(agent.stop().success());
}

/// `mode = "primary"` (seed 002's primary and secondary interfaces): only the first healthy
/// adapter in the VIP's list answers; it fails over in order and comes back in order.
#[test]
fn primary_mode_fails_over_in_order_and_back() {
    if !root_or_skip("primary_mode_fails_over_in_order_and_back") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("primary");
    files.write(
        "",
        &format!(
            "[announce]\ncount = 2\ninterval_ms = 50\n[probe]\nenabled = false\n{}\
             [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip1\", \"vip0\", \"vip2\"]\nmode = \"primary\"\n\
             [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip1\", \"vip0\", \"vip2\"]\nmode = \"primary\"\n",
            lab.adapter_tables()
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let answering = |s: &vip_agent::status::Status| vip_status(s, &VIP4.to_string()).answering.join(",");
    assert_eq!(answering(&agent.status()), "vip1");
    // Only the primary answers a broadcast request: the client resolves to it.
    for ip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        assert_eq!(resolve(&lab, c, ip), 1, "{ip}");
    }
    let mac = |i: usize| lab.adapters[i].mac;
    for (pull, next) in [(1, 0), (0, 2)] {
        lab.pull(pull);
        let s = agent.wait_for("next in order", 2 * SECOND, |s| adapter_state(s, &lab.adapters[pull].name) == "down");
        assert_eq!(answering(&s), lab.adapters[next].name);
        assert_eq!(vip_status(&s, &VIP6.to_string()).answering, vec![lab.adapters[next].name.clone()]);
        for ip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
            wait_neigh(c, ip, "moved to the next in order", 2 * SECOND, |m| m == mac(next));
        }
    }
    // vip0 comes before vip2 in the list: back, it takes over from vip2.
    lab.plug(0);
    let s = agent.wait_for("vip0 back", 2 * SECOND, |s| adapter_state(s, "vip0") == "up");
    assert_eq!(answering(&s), "vip0");
    wait_neigh(c, VIP4.into(), "back to vip0", 2 * SECOND, |m| m == mac(0));
    lab.plug(1);
    let s = agent.wait_for("vip1 back", 2 * SECOND, |s| adapter_state(s, "vip1") == "up");
    assert_eq!(answering(&s), "vip1");
    for ip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        wait_neigh(c, ip, "back to the primary", 2 * SECOND, |m| m == mac(1));
    }
    assert!(agent.stop().success());
}

/// The operator's commands: `check` says ok and exits 0 on a good config, and `status`
/// (text and `--json`) reads a running agent through its control socket.
#[test]
fn check_and_status_commands() {
    if !root_or_skip("check_and_status_commands") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("cli");
    files.write("", &lab_body(&lab));
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(agent_bin()).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let config = files.config.to_str().unwrap();
    let (code, out, err) = cli(&["check", "--config", config, "--netns", &lab.node.name]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ok (3 adapters, 2 VIPs)"), "{out}");
    let (code, _, err) = cli(&["status", "--config", config]);
    assert_eq!(code, Some(1), "no agent yet: {err}");
    assert!(err.contains("is the agent running?"), "{err}");

    let agent = AgentProc::start(&lab.node, &files, &[]);
    lab.pull(2);
    agent.wait_for("vip2 down, announced", 2 * SECOND, |s| {
        adapter_state(s, "vip2") == "down" && s.failovers.iter().any(|f| f.announced_from.len() == 2)
    });
    let (code, out, err) = cli(&["status", "--config", config]);
    assert_eq!(code, Some(0), "{err}");
    for want in ["vip2             down", "192.0.2.10", "vip0,vip1", "RECENT FAILOVERS", "from vip0,vip1"] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    let (code, out, err) = cli(&["status", "--socket", files.socket.to_str().unwrap(), "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let s: vip_agent::status::Status = serde_json::from_str(&out).expect("status --json is a Status document");
    assert_eq!(adapter_state(&s, "vip2"), "down");
    assert_eq!(s.failovers.len(), 1);
    assert!(agent.stop().success());
}

/// Addresses added while the agent runs count for takeover checks: an adapter that gets
/// an address in a VIP's subnet becomes a place the VIP may move to.
#[test]
fn address_added_later_makes_an_adapter_eligible() {
    if !root_or_skip("address_added_later_makes_an_adapter_eligible") {
        return;
    }
    let (lab, _peers) = lab(1);
    lab.node.ip(&["addr", "add", "198.51.100.1/24", "dev", "vip0"]);
    let files = AgentFiles::new("addr");
    files.write(
        "",
        &format!("[probe]\nenabled = false\n{}[[vip]]\naddress = \"198.51.100.10/24\"\nadapters = [\"vip0\"]\n", lab.adapter_tables()),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    lab.node.ip(&["addr", "add", "198.51.100.2/24", "dev", "vip1"]);
    agent.wait_for("address seen", 2 * SECOND, |_| agent.log_text().contains("adapter addresses changed"));
    lab.pull(0);
    let s = agent.wait_for("vip0 down", 2 * SECOND, |s| adapter_state(s, "vip0") == "down");
    let v = vip_status(&s, "198.51.100.10");
    assert_eq!(v.answering, vec!["vip1".to_string()], "only vip1 is in 198.51.100.0/24");
    assert!(s.refusals.iter().any(|r| r.adapter.as_deref() == Some("vip2") && r.reason.contains("subnet")), "{:?}", s.refusals);
    assert!(agent.stop().success());
}

/// A VIP already taken over keeps its place when another VIP later needs the same
/// adapter's last free slot: a working VIP is never stranded by an unrelated failure.
#[test]
fn existing_takeovers_keep_their_place() {
    if !root_or_skip("existing_takeovers_keep_their_place") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("sticky");
    files.write(
        "",
        "[probe]\nenabled = false\n\
         [[adapter]]\nname = \"vip0\"\n[[adapter]]\nname = \"vip1\"\n[[adapter]]\nname = \"vip2\"\nmax_vips = 1\n\
         [[vip]]\naddress = \"192.0.2.31/24\"\nadapters = [\"vip1\"]\n\
         [[vip]]\naddress = \"192.0.2.30/24\"\nadapters = [\"vip0\"]\n",
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    lab.pull(0);
    let s = agent.wait_for("vip0 down", 2 * SECOND, |s| adapter_state(s, "vip0") == "down");
    assert_eq!(vip_status(&s, "192.0.2.30").answering.join(","), "vip1,vip2");
    lab.pull(1);
    let s = agent.wait_for("vip1 down", 2 * SECOND, |s| adapter_state(s, "vip1") == "down");
    assert_eq!(vip_status(&s, "192.0.2.30").answering, vec!["vip2".to_string()], "kept its place on vip2");
    assert!(vip_status(&s, "192.0.2.31").answering.is_empty());
    assert!(s.refusals.iter().any(|r| r.vip == "192.0.2.31" && r.reason.contains("max_vips")), "{:?}", s.refusals);
    assert!(agent.stop().success());
}

/// The host takes each VIP as its own through a local route (not an address on `lo`):
/// UDP replies leave from the VIP, both from a wildcard socket that answers with the
/// address it was asked at (IP_PKTINFO) and from a socket bound to the VIP itself (IPv6
/// too), and TCP connections have the VIP as their local address.
#[test]
fn vips_are_local_routes_and_replies_leave_from_them() {
    if !root_or_skip("vips_are_local_routes_and_replies_leave_from_them") {
        return;
    }
    let (lab, _peers) = lab(1);
    let files = AgentFiles::new("local");
    files.write("", &default_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let lo = lab.node.ip(&["addr", "show", "lo"]);
    assert!(!lo.contains(&VIP4.to_string()) && !lo.contains(&VIP6.to_string()), "VIPs are not addresses: {lo}");
    let local4 = lab.node.ip(&["route", "show", "table", "local"]);
    let local6 = lab.node.ip(&["-6", "route", "show", "table", "local"]);
    assert!(local4.contains(&format!("local {VIP4} dev lo proto 86")), "{local4}");
    assert!(local6.contains(&format!("local {VIP6} dev lo proto 86")), "{local6}");
    let c = &lab.clients[0];
    let ask = |target: std::net::SocketAddr| -> std::net::SocketAddr {
        c.ns.run(|| {
            let any: std::net::SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
            let s = std::net::UdpSocket::bind(any).unwrap();
            s.set_read_timeout(Some(SECOND)).unwrap();
            let mut buf = [0u8; 16];
            for _ in 0..5 {
                s.send_to(b"hello", target).unwrap();
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    return from;
                }
            }
            panic!("no UDP reply from {target}");
        })
    };
    // A wildcard server answering from the address it was asked at.
    let _echo = EchoServer::start(&lab.node, 7007).unwrap();
    // Servers bound to the VIPs themselves: binding works because the host owns them.
    let bound: Vec<std::net::UdpSocket> = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
        .iter()
        .map(|ip| lab.node.run(|| std::net::UdpSocket::bind((*ip, 7011))).unwrap_or_else(|e| panic!("binding {ip}: {e}")))
        .collect();
    let servers: Vec<_> = bound
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(5 * SECOND)).unwrap();
                let mut buf = [0u8; 16];
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    s.send_to(&buf[..n], from).unwrap();
                }
            })
        })
        .collect();
    for ip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        for port in [7007, 7011] {
            let from = ask((ip, port).into());
            assert_eq!(from, (ip, port).into(), "the UDP reply to {ip}:{port} came from {from}");
        }
    }
    for s in servers {
        s.join().unwrap();
    }
    // TCP: the accepted connection's own address is the VIP.
    let l = lab.node.run(|| TcpListener::bind(("::", 7012))).unwrap();
    for ip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let conn = c.ns.run(|| TcpStream::connect((ip, 7012))).unwrap_or_else(|e| panic!("tcp to {ip}: {e}"));
        let (accepted, _) = l.accept().unwrap();
        let local = accepted.local_addr().unwrap().ip();
        let local = match local {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        assert_eq!(local, ip, "accepted on {local}");
        assert_eq!(conn.peer_addr().unwrap().ip(), ip);
    }
    assert!(agent.stop().success());
    let local4 = lab.node.ip(&["route", "show", "table", "local"]);
    assert!(!local4.contains("proto 86"), "routes left after stop: {local4}");
}

/// Spread is the default and stays spread: six clients resolve the VIP to more than one
/// adapter; a restart (SIGKILL, then a new agent) and an adapter's failure and return
/// change nobody's entry (nothing is broadcast that would herd them onto one adapter),
/// and every client reaches the VIP throughout.
#[test]
fn restart_and_return_do_not_herd_clients() {
    if !root_or_skip("restart_and_return_do_not_herd_clients") {
        return;
    }
    let (lab, _peers) = lab(6);
    let files = AgentFiles::new("herd");
    files.write("", &default_body(&lab));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let _echo = EchoServer::start(&lab.node, 7007).unwrap();
    let placement = |what: &str| -> Vec<usize> {
        lab.clients
            .iter()
            .map(|c| {
                let m = wait_neigh(c, VIP4.into(), what, 2 * SECOND, |m| lab.adapters.iter().any(|a| a.mac == m));
                adapter_of(&lab, m)
            })
            .collect()
    };
    for c in &lab.clients {
        poke(c, VIP4.into());
    }
    let before = placement("first resolution");
    let used: std::collections::HashSet<usize> = before.iter().copied().collect();
    assert!(used.len() >= 2, "six clients all on one adapter: {before:?}");
    let reach = |what: &str| {
        for c in &lab.clients {
            let ok = c.ns.run(|| {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                let mut b = [0u8; 8];
                (0..5).any(|_| s.send_to(b"x", (VIP4, 7007)).is_ok() && s.recv_from(&mut b).is_ok())
            });
            assert!(ok, "{} cannot reach the VIP {what}", c.ip4);
        }
    };
    reach("at first");
    agent.kill();
    let agent = AgentProc::start(&lab.node, &files, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(placement("after the restart"), before, "a restart moved clients");
    reach("after the restart");
    let j = before[0];
    lab.pull(j);
    agent.wait_for("failover", 2 * SECOND, |s| adapter_state(s, &lab.adapters[j].name) == "down");
    reach("with an adapter down");
    lab.plug(j);
    agent.wait_for("back", 2 * SECOND, |s| adapter_state(s, &lab.adapters[j].name) == "up");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(placement("after the return"), before, "a failure and return moved clients (MAC move keeps them)");
    reach("after the return");
    assert!(agent.stop().success());
}

/// The agent is one file: started without `--bpf-object` or `VIP_EBPF_OBJECT`, it loads
/// the XDP object built into it and answers. A SIGHUP does not end it: the unchanged file
/// reloads as "nothing changed", and a broken one is refused; it keeps answering. `vip-agent status | head -1` ends quietly on the closed pipe.
#[test]
fn the_agent_is_one_file_and_a_sighup_does_not_end_it() {
    if !root_or_skip("the_agent_is_one_file_and_a_sighup_does_not_end_it") {
        return;
    }
    let (lab, _dp) = lab(1);
    let files = AgentFiles::new("onefile");
    files.write("", &default_body(&lab));
    let agent = AgentProc::start_self_contained(&lab.node, &files);
    let c = &lab.clients[0];
    resolve(&lab, c, VIP4.into());
    // SIGHUP with the good file, then with a broken one: still running, still answering.
    let pid = agent.child.id() as i32;
    // SAFETY: a signal to the agent this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    // A reload loads the data plane's programs again (the kernel verifies them: about half
    // a second here), so the log is watched rather than a fixed time slept.
    let logged = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.log_text().contains(what) {
            assert!(Instant::now() < deadline, "no {what:?} after SIGHUP; log:\n{}", agent.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    logged("reload: VIPs: 0 added, 0 removed, 0 changed, 2 unchanged");
    let good = std::fs::read_to_string(&files.config).unwrap();
    std::fs::write(&files.config, format!("{good}\n[[vip]]\naddress = \"not an address\"\n")).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    logged("reload refused: nothing changed:");
    assert!(agent.try_status().is_some(), "the agent ended on SIGHUP; log:\n{}", agent.log_text());
    lab.clients[0].ns.ip(&["neigh", "flush", "all"]);
    resolve(&lab, c, VIP4.into());
    // Output into a pipe nobody reads any more (`| head` once it has its line): the
    // command ends by SIGPIPE as Unix tools do, with no panic and no message.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(agent_bin())
        .args(["status", "--socket"])
        .arg(&files.socket)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // Filters: one adapter, one VIP.
    let query = |args: &[&str]| -> vip_agent::status::Status {
        let out = std::process::Command::new(agent_bin()).args(["status", "--json", "--socket"]).arg(&files.socket).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let all = query(&[]);
    assert_eq!(all.adapters.len(), 3);
    let one = query(&["--adapter", "vip1"]);
    assert_eq!(one.adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["vip1"]);
    let v = query(&["--vip", &VIP4.to_string()]);
    assert!(!v.groups.is_empty() && v.groups.iter().all(|g| g.first == VIP4.to_string() || g.last == VIP4.to_string()), "{:?}", v.groups);
    assert_eq!(v.adapters.len(), 3, "the adapters of its group");
    let none = query(&["--vip", "192.0.2.250"]);
    assert!(none.groups.is_empty() && none.adapters.is_empty(), "a VIP nobody has: {:?}", none.groups);
    std::fs::write(&files.config, good).unwrap();
    assert!(agent.stop().success());
}

/// Started under `ip netns exec` (a mount namespace of its own, with its own /sys), the
/// agent would pin on a bpffs that vanishes with it: it refuses, names `--netns`, and
/// changes nothing. With `--netns` from the host's mount namespace it runs (every other
/// test).
#[test]
fn under_ip_netns_exec_the_agent_refuses_pins_that_would_vanish() {
    if !root_or_skip("under_ip_netns_exec_the_agent_refuses_pins_that_would_vanish") {
        return;
    }
    let (lab, _dp) = lab(1);
    let files = AgentFiles::new("privbpf");
    files.write("", &default_body(&lab));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node.name])
        .arg(agent_bin())
        .args(["run", "--config"])
        .arg(&files.config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("mount namespace of its own") && err.contains("--netns"), "{err}");
    assert!(!files.pin_path.exists() || std::fs::read_dir(&files.pin_path).unwrap().next().is_none(), "it pinned something");
    // Nothing attached to the adapters.
    for a in &lab.adapters {
        assert!(!lab.node.ip(&["-d", "link", "show", &a.name]).contains("prog/xdp"), "{} has a program", a.name);
    }
}

fn arp_ignore(lab: &Lab, dev: &str) -> String {
    lab.node.exec("cat", &[&format!("/proc/sys/net/ipv4/conf/{dev}/arp_ignore")]).trim().to_string()
}

/// The record of host changes is never taken on trust: an unreadable one stops the agent
/// before any change; a lost one (after a SIGKILL) makes the next agent put the sysctls
/// back to the kernel's defaults rather than to its predecessor's values. `vip-agent
/// cleanup` undoes a killed agent's changes (sysctls, routes, pins and programs) without
/// running one, and refuses while one runs.
#[test]
fn host_changes_are_undone_even_when_the_record_is_lost_or_the_agent_is_gone() {
    if !root_or_skip("host_changes_are_undone_even_when_the_record_is_lost_or_the_agent_is_gone") {
        return;
    }
    let (lab, _dp) = lab(1);
    assert_eq!(arp_ignore(&lab, "vip0"), "0", "the lab starts from the kernel's default");
    let files = AgentFiles::new("record");
    files.write("", &default_body(&lab));
    let mut state = files.socket.as_os_str().to_owned();
    state.push(".state.json");
    let state = std::path::PathBuf::from(state);

    // An unreadable record: refused, nothing changed.
    std::fs::write(&state, "{ not json").unwrap();
    let mut p = AgentProc::spawn(&lab.node, &files, &[]);
    let st = wait_timeout(&mut p.child, 15 * SECOND);
    assert_eq!(st.code(), Some(1), "{}", p.log_text());
    assert!(p.log_text().contains("unreadable"), "{}", p.log_text());
    assert_eq!(arp_ignore(&lab, "vip0"), "0", "changed the host despite the unreadable record");
    std::mem::forget(p);
    std::fs::remove_file(&state).unwrap();

    // Killed, and its record lost: the next agent restores the defaults, not "1".
    let agent = AgentProc::start(&lab.node, &files, &[]);
    assert_eq!(arp_ignore(&lab, "vip0"), "1");
    agent.kill();
    std::fs::remove_file(&state).unwrap();
    let agent = AgentProc::start(&lab.node, &files, &[]);
    assert!(agent.log_text().contains("record of host changes is not"), "{}", agent.log_text());
    assert!(agent.stop().success());
    assert_eq!(arp_ignore(&lab, "vip0"), "0", "the lost record's sysctl was restored to the agent's own value");

    // Killed for good: cleanup undoes it all. Not while an agent runs.
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let cleanup = |lab: &Lab| {
        std::process::Command::new(agent_bin())
            .args(["cleanup", "--config"])
            .arg(&files.config)
            .args(["--netns", &lab.node.name])
            .output()
            .unwrap()
    };
    let out = cleanup(&lab);
    assert_eq!(out.status.code(), Some(1), "cleanup ran under a live agent");
    assert!(String::from_utf8_lossy(&out.stderr).contains("an agent is running"), "{}", String::from_utf8_lossy(&out.stderr));
    agent.kill();
    assert!(lab.node.ip(&["-d", "link", "show", "vip0"]).contains("prog/xdp"), "a killed agent's program stays attached");
    let out = cleanup(&lab);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(arp_ignore(&lab, "vip0"), "0");
    assert!(!files.pin_path.exists(), "pins left");
    for a in &lab.adapters {
        assert!(!lab.node.ip(&["-d", "link", "show", &a.name]).contains("prog/xdp"), "{} still has the program", a.name);
    }
    let local = lab.node.ip(&["route", "show", "table", "local"]);
    assert!(!local.contains(&VIP4.to_string()), "the VIP's route is still there:\n{local}");
    assert!(!state.exists(), "the record is still there");
}

/// Pinned maps carry their layout version: pins without it (or of another layout) are
/// refused with a message that says what to do, not misread; after `vip-agent cleanup`
/// the agent starts.
#[test]
fn pins_of_another_layout_are_refused() {
    if !root_or_skip("pins_of_another_layout_are_refused") {
        return;
    }
    let (lab, _dp) = lab(1);
    let files = AgentFiles::new("layout");
    files.write("", &default_body(&lab));
    AgentProc::start(&lab.node, &files, &[]).kill();
    assert!(files.pin_path.join(vip_common::names::LAYOUT).exists(), "no layout pin");
    // As if an agent from before layout versions had pinned these.
    std::fs::remove_file(files.pin_path.join(vip_common::names::LAYOUT)).unwrap();
    let mut p = AgentProc::spawn(&lab.node, &files, &[]);
    let st = wait_timeout(&mut p.child, 15 * SECOND);
    let log = p.log_text();
    std::mem::forget(p);
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(log.contains("layout 0") && log.contains("vip-agent cleanup"), "{log}");
    let out = std::process::Command::new(agent_bin())
        .args(["cleanup", "--config"])
        .arg(&files.config)
        .args(["--netns", &lab.node.name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let agent = AgentProc::start(&lab.node, &files, &[]);
    resolve(&lab, &lab.clients[0], VIP4.into());
    assert!(agent.stop().success());
}
