//! Steering with the real agent in namespaces: spread mode over 3 adapters with 18
//! clients, egress steering seen on the switch's ports, load-based placement of a failed
//! adapter's clients, rebalance, MAC move and straggler corrections.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use vip_packet::{mac_str, parse_arp, parse_eth, parse_nd, Mac};
use vip_tests::{
    agentproc::{AgentFiles, AgentProc},
    probe::EchoServer,
    rawsock::RawSocket,
    root_or_skip,
    topo::{neigh_mac, wait_neigh, Client, Lab, VIP4, VIP6},
};

const ECHO_PORT: u16 = 7;

fn lab(adapters: usize, clients: usize) -> (Lab, vip_agent::dataplane::Dataplane) {
    let lab = Lab::bridged(adapters, clients);
    let mut dp = vip_tests::load_dataplane();
    lab.attach_peers(&mut dp);
    (lab, dp)
}

/// One datagram to the VIP's echo port and its reply, a few tries.
fn echo(c: &Client, ip: IpAddr) -> bool {
    c.ns.run(|| {
        let any: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let s = UdpSocket::bind(any).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buf = [0u8; 64];
        (0..5).any(|_| s.send_to(b"ping", (ip, ECHO_PORT)).is_ok() && s.recv_from(&mut buf).is_ok())
    })
}

/// Which adapter (index) each client resolved `ip` to.
fn placement(lab: &Lab, ip: IpAddr) -> Vec<usize> {
    lab.clients
        .iter()
        .map(|c| {
            let m = wait_neigh(c, ip, "resolved", Duration::from_secs(3), |_| true);
            lab.adapters.iter().position(|a| a.mac == m).unwrap_or_else(|| panic!("{} resolved to {}", c.ip4, mac_str(&m)))
        })
        .collect()
}

fn shares(p: &[usize], n: usize) -> Vec<usize> {
    (0..n).map(|a| p.iter().filter(|&&x| x == a).count()).collect()
}

/// Every ARP frame or NA about `vip` arriving at a client's interface during `window`.
fn neighbor_frames_about(c: &Client, vip: IpAddr, window: Duration) -> std::thread::JoinHandle<Vec<(Mac, Mac)>> {
    let sock = c.ns.run(|| RawSocket::open(&c.iface)).expect("raw socket");
    std::thread::spawn(move || {
        sock.collect(window, |f| {
            let eth = parse_eth(f)?;
            if let Some(a) = parse_arp(f) {
                return (IpAddr::V4(a.spa) == vip).then_some((eth.dst, a.sha));
            }
            let n = parse_nd(f)?;
            (n.icmp_type == vip_packet::ND_NEIGHBOR_ADVERT && IpAddr::V6(n.target) == vip).then_some((eth.dst, eth.src))
        })
    })
}

/// Frames from the VIP's echo port leaving the node through each switch port during
/// `window`: (switch port index, client address, source MAC).
fn replies_on_ports(lab: &Lab, window: Duration) -> Vec<std::thread::JoinHandle<Vec<(usize, IpAddr, Mac)>>> {
    let sw = lab.switch.as_ref().unwrap();
    lab.adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let sock = sw.run(|| RawSocket::open(&a.peer)).expect("raw socket");
            std::thread::spawn(move || {
                sock.collect(window, |f| {
                    let eth = parse_eth(f)?;
                    let l3 = &f[14..];
                    match u16::from_be_bytes([f[12], f[13]]) {
                        0x0800 if l3.len() >= 28 && l3[9] == 17 && l3[20..22] == ECHO_PORT.to_be_bytes() => {
                            Some((i, IpAddr::from([l3[16], l3[17], l3[18], l3[19]]), eth.src))
                        }
                        _ => None,
                    }
                })
            })
        })
        .collect()
}

/// Spread mode end to end: 18 clients share 3 adapters evenly; each client's replies
/// leave through its own adapter; a failure moves only the failed adapter's clients, to
/// the least-loaded survivor, each told by unicast and reaching the VIP again; nobody
/// else hears anything; without rebalance the moved clients stay when it returns, with
/// rebalance (the IPv6 VIP) they go back.
#[test]
fn spread_shares_clients_steers_replies_and_moves_only_the_failed_adapters() {
    if !root_or_skip("spread_shares_clients_steers_replies_and_moves_only_the_failed_adapters") {
        return;
    }
    const N: usize = 18;
    let (lab, _dp) = lab(3, N);
    let files = AgentFiles::new("spread");
    let body = format!(
        "[announce]\ncount = 2\ninterval_ms = 50\n[probe]\nenabled = false\n[steering]\nload_interval_ms = 200\n{}\
         [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"spread\"\n\
         [[vip]]\naddress = \"{VIP6}/64\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"spread\"\nrebalance = true\n",
        // Without MAC move: the failed adapter's clients are told one by one.
        lab.adapter_tables_with("move_mac = false\n")
    );
    files.write("", &body);
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let _echo = EchoServer::start(&lab.node, ECHO_PORT).expect("echo server");
    let (v4, v6) = (IpAddr::V4(VIP4), IpAddr::V6(VIP6));

    // Everyone reaches both VIPs; the switch ports show where each reply leaves.
    let ports = replies_on_ports(&lab, Duration::from_millis(2500));
    for c in &lab.clients {
        assert!(echo(c, v4), "{} cannot reach {v4}", c.ip4);
        assert!(echo(c, v6), "{} cannot reach {v6}", c.ip6);
    }
    let p4 = placement(&lab, v4);
    let p6 = placement(&lab, v6);
    let (s4, s6) = (shares(&p4, 3), shares(&p6, 3));
    eprintln!("IPv4 shares {s4:?}, IPv6 shares {s6:?}");
    for s in [&s4, &s6] {
        assert!(s.iter().all(|&n| n.abs_diff(N / 3) <= 1), "not within one of even: {s:?}");
    }
    let replies: Vec<_> = ports.into_iter().flat_map(|h| h.join().unwrap()).collect();
    for (i, c) in lab.clients.iter().enumerate() {
        let seen: Vec<_> = replies.iter().filter(|(_, ip, _)| *ip == IpAddr::V4(c.ip4)).collect();
        assert!(!seen.is_empty(), "no reply to {} seen on the switch", c.ip4);
        for (port, _, src) in seen {
            assert_eq!((*port, *src), (p4[i], lab.adapters[p4[i]].mac), "reply to {} left through the wrong adapter", c.ip4);
        }
    }
    let st = agent.status();
    let egress: HashMap<_, _> = st.egress.iter().cloned().collect();
    eprintln!("egress {egress:?}");
    assert!(egress["steered_redirect"] > 0 && egress["steered_same"] > 0, "{egress:?}");
    let table4: Vec<_> = st.clients.iter().filter(|c| c.vip == v4.to_string()).collect();
    assert_eq!(table4.len(), N, "client table: {:?}", st.clients);
    for (i, c) in lab.clients.iter().enumerate() {
        let e = table4.iter().find(|e| e.client == c.ip4.to_string()).expect("client in the table");
        assert_eq!(e.adapter, lab.adapters[p4[i]].name);
    }

    // Load on vip0: a client of vip0 streams to the VIP. When vip1 fails, its clients go
    // to the least-loaded survivor, vip2.
    let heavy = p4.iter().position(|&a| a == 0).expect("a client on vip0");
    let stop = Arc::new(AtomicBool::new(false));
    let blaster = {
        let (stop, sent) = (stop.clone(), Arc::new(AtomicU64::new(0)));
        let sock = lab.clients[heavy].ns.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
        std::thread::spawn(move || {
            let payload = [0u8; 1200];
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.send_to(&payload, (VIP4, 9));
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    agent.wait_for("vip0 carries the load", Duration::from_secs(5), |s| {
        s.adapters[0].load_bytes_per_s > 100.0 * (1.0 + s.adapters[2].load_bytes_per_s)
    });
    let others: Vec<usize> = (0..N).filter(|&i| p4[i] != 1).collect();
    let watches: Vec<_> = others.iter().map(|&i| (i, neighbor_frames_about(&lab.clients[i], v4, Duration::from_millis(1500)))).collect();
    lab.pull(1);
    agent.wait_for("vip1 down", Duration::from_secs(3), |s| s.adapters[1].state == "down");
    for (i, c) in lab.clients.iter().enumerate() {
        if p4[i] == 1 {
            let m = wait_neigh(c, v4, "moved client told", Duration::from_secs(2), |m| m != lab.adapters[1].mac);
            assert_eq!(m, lab.adapters[2].mac, "{} went to the loaded adapter", c.ip4);
            assert!(echo(c, v4), "moved client {} cannot reach the VIP", c.ip4);
        }
    }
    stop.store(true, Ordering::Relaxed);
    blaster.join().unwrap();
    for (i, h) in watches {
        let frames = h.join().unwrap();
        assert!(frames.is_empty(), "client {} of another adapter heard {frames:?}", lab.clients[i].ip4);
        assert_eq!(neigh_mac(&lab.clients[i], v4), Some(lab.adapters[p4[i]].mac));
    }
    let p6_moved: Vec<usize> = (0..N).filter(|&i| p6[i] == 1).collect();
    for &i in &p6_moved {
        wait_neigh(&lab.clients[i], v6, "moved IPv6 client told", Duration::from_secs(2), |m| m != lab.adapters[1].mac);
        assert!(echo(&lab.clients[i], v6));
    }
    let st = agent.status();
    assert!(st.clients_moved as usize >= s4[1] + s6[1], "moved {}", st.clients_moved);

    // vip1 returns: IPv4 (no rebalance) clients stay; IPv6 (rebalance) clients go back.
    lab.plug(1);
    agent.wait_for("vip1 up", Duration::from_secs(3), |s| s.adapters[1].state == "up");
    for &i in &p6_moved {
        wait_neigh(&lab.clients[i], v6, "rebalanced back", Duration::from_secs(2), |m| m == lab.adapters[1].mac);
        assert!(echo(&lab.clients[i], v6));
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, c) in lab.clients.iter().enumerate() {
        if p4[i] == 1 {
            assert_eq!(neigh_mac(c, v4), Some(lab.adapters[2].mac), "{} moved back without rebalance", c.ip4);
            assert!(echo(c, v4));
        }
    }
    // A new client's bucket may be vip1's again.
    let st = agent.status();
    let v4s = st.vips.iter().find(|v| v.address == v4.to_string()).unwrap();
    let group = &st.groups[v4s.group.expect("placed") as usize];
    assert_eq!(group.buckets.len(), 3, "{:?}", group.buckets);
    agent.stop();
}

/// MAC move: a client whose cache holds vip1's MAC (permanently: it sends no ARP at all)
/// keeps its TCP connection when vip1 fails; vip0 takes vip1's MAC, and the replies leave
/// from it. When vip1 returns, the MAC goes back. A client that never asks is known only
/// from its traffic, which takes `learn_from_traffic` (off by default: see
/// `a_forged_source_redirects_nobody`).
#[test]
fn move_mac_keeps_tcp_without_arp() {
    if !root_or_skip("move_mac_keeps_tcp_without_arp") {
        return;
    }
    let (lab, _dp) = lab(2, 1);
    let files = AgentFiles::new("movemac");
    let tables: String =
        lab.adapters.iter().map(|a| format!("[[adapter]]\nname = \"{}\"\nmove_mac = true\n", a.name)).collect();
    files.write(
        "",
        &format!(
            "[announce]\ncount = 2\ninterval_ms = 50\n[probe]\nenabled = false\n[steering]\nlearn_from_traffic = true\n{tables}\
             [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\"]\n"
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let c = &lab.clients[0];
    let old = lab.adapters[1].mac;
    c.ns.ip(&["neigh", "replace", &VIP4.to_string(), "lladdr", &mac_str(&old), "dev", &c.iface, "nud", "permanent"]);
    let listener = lab.node.run(|| TcpListener::bind((VIP4, 5000))).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        use std::io::{Read, Write};
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut conn = c.ns.run(|| TcpStream::connect((VIP4, 5000))).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The client's own ARP, watched where it would leave it: on its switch port.
    let sw_sock = lab.switch.as_ref().unwrap().run(|| RawSocket::open("c0")).unwrap();
    let cm = c.mac;
    let sw_watch = std::thread::spawn(move || {
        sw_sock.collect(Duration::from_millis(2500), |f| (f.len() > 14 && f[12..14] == [8, 6] && f[6..12] == cm).then_some(()))
    });
    let exchange = |conn: &mut TcpStream, i: u32| {
        use std::io::{Read, Write};
        let msg = i.to_be_bytes();
        conn.write_all(&msg).unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    let t0 = Instant::now();
    let mut i = 0;
    let mut pulled = false;
    let mut worst = Duration::ZERO;
    while t0.elapsed() < Duration::from_millis(2000) {
        if !pulled && t0.elapsed() > Duration::from_millis(500) {
            lab.pull(1);
            pulled = true;
        }
        let t = Instant::now();
        exchange(&mut conn, i);
        worst = worst.max(t.elapsed());
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("{i} TCP exchanges through the pull, slowest {worst:?}");
    let st = agent.status();
    assert_eq!(st.adapters[1].state, "down");
    assert_eq!((st.adapters[1].heir.as_deref(), st.adapters[1].mac_moved), (Some("vip0"), true), "{:?}", st.adapters[1]);
    let d: HashMap<_, _> = st.decisions.iter().cloned().collect();
    assert!(d["accepted_moved_mac"] > 0, "{d:?}");
    let e: HashMap<_, _> = st.egress.iter().cloned().collect();
    assert!(e["steered_moved_mac"] > 0, "{e:?}");
    assert_eq!(neigh_mac(c, IpAddr::V4(VIP4)), Some(old), "the client's cache never changed");

    // vip1 comes back: its MAC with it.
    lab.plug(1);
    agent.wait_for("vip1 up", Duration::from_secs(3), |s| s.adapters[1].state == "up" && !s.adapters[1].mac_moved);
    let moved_before = agent.status().decisions.iter().find(|(n, _)| n == "accepted_moved_mac").unwrap().1;
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..50 {
        exchange(&mut conn, i);
        i += 1;
    }
    let moved_after = agent.status().decisions.iter().find(|(n, _)| n == "accepted_moved_mac").unwrap().1;
    assert_eq!(moved_after, moved_before, "frames to vip1's MAC reach vip1 again");
    assert_eq!(sw_watch.join().unwrap().len(), 0, "the client sent ARP");
    drop(conn);
    agent.stop();
    let _ = server.join();
}

/// A client that missed every announcement (its cache is pinned to vip1's MAC, without
/// move_mac) keeps sending to vip1's MAC after vip1 fails. The switch floods those frames;
/// vip1's heir accepts them (the client is still served) and the agent sends the client
/// a unicast correction, at most once per correction_interval_ms.
#[test]
fn straggler_is_served_and_corrected() {
    if !root_or_skip("straggler_is_served_and_corrected") {
        return;
    }
    let (lab, _dp) = lab(3, 1);
    let files = AgentFiles::new("straggler");
    files.write(
        "",
        &format!(
            "[announce]\ncount = 1\ninterval_ms = 50\n[probe]\nenabled = false\n[steering]\ncorrection_interval_ms = 500\nlearn_from_traffic = true\n{}\
             [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\n",
            lab.adapter_tables_with("move_mac = false\n")
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let _echo = EchoServer::start(&lab.node, ECHO_PORT).expect("echo server");
    let c = &lab.clients[0];
    let stale = lab.adapters[1].mac;
    c.ns.ip(&["neigh", "replace", &VIP4.to_string(), "lladdr", &mac_str(&stale), "dev", &c.iface, "nud", "permanent"]);
    assert!(echo(c, IpAddr::V4(VIP4)));
    lab.pull(1);
    agent.wait_for("vip1 down", Duration::from_secs(3), |s| s.adapters[1].state == "down" && s.adapters[1].heir.is_some());
    let corrections = neighbor_frames_about(c, IpAddr::V4(VIP4), Duration::from_millis(1300));
    // ~1.2 s of traffic to the stale MAC, every reply still arriving.
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_millis(1200) {
        if !echo(c, IpAddr::V4(VIP4)) {
            let st = agent.status();
            panic!("straggler not served: {:?} {:?} {:?}", st.decisions, st.egress, st.adapters);
        }
        n += 1;
    }
    let frames = corrections.join().unwrap();
    eprintln!("{n} echoes as a straggler; corrections heard: {frames:?}");
    let unicast: Vec<_> = frames.iter().filter(|(dst, _)| *dst == c.mac).collect();
    assert!((1..=4).contains(&unicast.len()), "{} corrections in 1.2 s at one per 500 ms", unicast.len());
    assert!(unicast.iter().all(|(_, sha)| *sha != stale), "a correction named the failed MAC");
    let st = agent.status();
    assert!(st.corrections_sent as usize >= unicast.len(), "{}", st.corrections_sent);
    let d: HashMap<_, _> = st.decisions.iter().cloned().collect();
    assert!(d["accepted_straggler"] >= n, "{d:?}");
    agent.stop();
}

/// A virtual server in its own namespace, behind a veth from the node: its VIP's traffic
/// is redirected to it by the data plane (the node does not hold the address), its
/// replies leave through the client's adapter, and it sees none of the node's other VIP's
/// traffic.
#[test]
fn virtual_server_receives_its_vips_and_no_other() {
    use vip_tests::netns::{veth, NetNs};
    if !root_or_skip("virtual_server_receives_its_vips_and_no_other") {
        return;
    }
    let (lab, mut dp) = lab(2, 1);
    let vs_ip: std::net::Ipv4Addr = "192.0.2.50".parse().unwrap();
    let vs = NetNs::new("vs");
    veth(&lab.node, "vsweb", "02:00:00:00:05:00", &vs, "eth0", "02:00:00:00:05:01");
    vs.ip(&["addr", "add", &format!("{vs_ip}/24"), "dev", "eth0"]);
    // XDP frames reach a veth's far end only if it has an XDP program too.
    vs.run(|| dp.attach_pass("eth0", aya::programs::XdpMode::Driver).map_err(|e| e.to_string()))
        .expect("pass program in the virtual server");
    // A veth hands its frames over with the checksum left for the receiver to trust
    // (checksum offload); redirected by XDP they would arrive unfinished. Frames from a real
    // wire are complete; the client's and the virtual server's veths compute their own.
    let tx_off = |ns: &NetNs| {
        ns.run(|| std::process::Command::new("ethtool").args(["-K", "eth0", "tx", "off"]).output()).expect("ethtool");
    };
    tx_off(&vs);
    tx_off(&lab.clients[0].ns);
    let files = AgentFiles::new("vserver");
    files.write(
        "",
        &format!(
            "[announce]\ncount = 1\ninterval_ms = 50\n[probe]\nenabled = false\n{}\
             [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\"]\n\
             [[vip]]\naddress = \"{vs_ip}/24\"\nadapters = [\"vip0\", \"vip1\"]\n\
             [[virtual_server]]\nname = \"web\"\ninterface = \"vsweb\"\nvips = [\"{vs_ip}\"]\n",
            lab.adapter_tables()
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    agent.wait_for("the virtual server's MAC learned", Duration::from_secs(3), |s| {
        s.virtual_servers.first().is_some_and(|v| v.mac.as_deref() == Some("02:00:00:00:05:01"))
    });
    let in_vs = EchoServer::start(&vs, ECHO_PORT).expect("echo in the virtual server");
    let on_node = EchoServer::start(&lab.node, ECHO_PORT).expect("echo on the node");
    let vs_seen = {
        let sock = vs.run(|| RawSocket::open("eth0")).unwrap();
        std::thread::spawn(move || {
            sock.collect(Duration::from_millis(1500), |f| {
                (f.len() >= 34 && f[12..14] == [8, 0]).then(|| IpAddr::from([f[30], f[31], f[32], f[33]]))
            })
        })
    };
    let c = &lab.clients[0];
    for _ in 0..5 {
        if !echo(c, IpAddr::V4(vs_ip)) {
            let st = agent.status();
            let d: Vec<_> = st.decisions.iter().filter(|(_, n)| *n > 0).collect();
            panic!("the virtual server's VIP does not answer: {d:?}, it served {}", in_vs.served());
        }
        assert!(echo(c, IpAddr::V4(VIP4)), "the node's VIP does not answer");
    }
    let seen = vs_seen.join().unwrap();
    assert!(in_vs.served() >= 5, "the virtual server served {}", in_vs.served());
    assert!(on_node.served() >= 5, "the node served {}", on_node.served());
    assert!(seen.contains(&IpAddr::V4(vs_ip)), "no frame for its VIP reached the virtual server");
    assert!(!seen.contains(&IpAddr::V4(VIP4)), "the virtual server saw the node's VIP traffic");
    assert!(!lab.node.ip(&["addr", "show", "dev", "lo"]).contains(&vs_ip.to_string()), "the node holds the virtual server's VIP");
    let d: HashMap<_, _> = agent.status().decisions.iter().cloned().collect();
    assert!(d["redirected_to_vserver"] >= 5 && d["redirected_from_vserver"] >= 5 && d["answered_vserver_arp"] >= 1, "{d:?}");
    agent.stop();
}

/// The security review's spoof: a host on the client segment sends VIP traffic with a
/// victim's source address from its own MAC, to another adapter. By default nothing is
/// learned from it: the victim's entry (from its answered request) keeps its adapter and
/// MAC, so its replies still go to it, past the attacker.
#[test]
fn a_forged_source_redirects_nobody() {
    if !root_or_skip("a_forged_source_redirects_nobody") {
        return;
    }
    let (lab, _dp) = lab(3, 2);
    let files = AgentFiles::new("spoof");
    files.write(
        "",
        &format!(
            "[announce]\ncount = 1\ninterval_ms = 50\n[probe]\nenabled = false\n[steering]\nload_interval_ms = 100\n{}\
             [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n",
            lab.adapter_tables_with("move_mac = false\n")
        ),
    );
    let agent = AgentProc::start(&lab.node, &files, &[]);
    let (victim, attacker) = (&lab.clients[0], &lab.clients[1]);
    let entry = |agent: &AgentProc| {
        agent.status().clients.into_iter().find(|c| c.client == victim.ip4.to_string()).map(|c| (c.adapter, c.mac))
    };
    // The victim asks and is answered: entered with its MAC.
    victim.ns.run(|| UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"hi", (VIP4, 9)))).unwrap();
    let m = wait_neigh(victim, IpAddr::V4(VIP4), "resolving", Duration::from_secs(2), |m| lab.adapters.iter().any(|a| a.mac == m));
    let deadline = Instant::now() + Duration::from_secs(2);
    while entry(&agent).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = entry(&agent).expect("the answered victim is in the table");
    assert_eq!(before.1, mac_str(&victim.mac));
    // The attacker's forgeries, to every adapter's MAC, from its own MAC.
    let raw = attacker.ns.run(|| RawSocket::open(&attacker.iface)).unwrap();
    for a in &lab.adapters {
        let mut f = vec![];
        f.extend_from_slice(&a.mac);
        f.extend_from_slice(&attacker.mac);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&victim.ip4.octets());
        f.extend_from_slice(&VIP4.octets());
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x09, 0, 12, 0, 0, b'e', b'v', b'i', b'l']);
        // A valid header checksum: the bridge (br_netfilter) drops bad ones.
        let sum = f[14..34].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        raw.send_many(&f, 20).unwrap();
    }
    // The client table in status is rebuilt every load_interval_ms (100 ms here).
    std::thread::sleep(Duration::from_millis(600));
    let after = entry(&agent).expect("the victim's entry is gone");
    assert_eq!(after, before, "a forged source moved the victim's entry (its replies would go to {})", after.1);
    let _ = m;
    agent.stop();
}
