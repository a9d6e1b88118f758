//! The cluster on real etcd and real XDP, in namespaces (issue 11): three nodes with two
//! client adapters and one cluster adapter each, three etcd members, clients. Every fault
//! test watches the VIP on a client's wire (ARP requests every 2 ms, every answer
//! recorded) and fails if two nodes ever answer it at once.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use vip_tests::{
    cluster::{node_of, owner_of, vip_of, ClusterLab, Timing},
    probe::{overlaps, realtime_ns, ArpWatch, EchoServer, Prober},
    root_or_skip,
    topo::neigh_mac,
};

const ECHO: u16 = 7100;
const ARP_EVERY: Duration = Duration::from_millis(2);

/// A lab of `n` nodes running, the definitions applied (one group per node, homed there),
/// every group held by its home node.
fn running(n: usize, clients: usize) -> ClusterLab {
    let mut lab = ClusterLab::new(n, clients);
    let t = Timing::default();
    for k in 0..n {
        lab.write_config(k, &t, "");
    }
    for k in 0..n {
        lab.start(k);
    }
    lab.wait_cluster(0, "every node registered", Duration::from_secs(10), |s| s.nodes.iter().filter(|x| x.incarnation > 0).count() == n);
    let out = lab.apply(0, &lab.defs_text(1, "spread"));
    assert!(out.status.success(), "cluster apply: {}", String::from_utf8_lossy(&out.stderr));
    lab.wait_settled(Duration::from_secs(15));
    for k in 0..n {
        let owner = lab.owner(0, vip_of(k));
        assert_eq!(owner.as_deref(), Some(format!("n{k}").as_str()), "group {} not at home", vip_of(k));
    }
    lab
}

/// Node 1 dies (every cable pulled and its agent SIGKILLed): another node answers its VIP,
/// the client reaches it there, nobody answered twice, and the takeover is in the status
/// with its timings.
#[test]
fn a_killed_node_moves_its_vips_to_a_survivor() {
    if !root_or_skip("a_killed_node_moves_its_vips_to_a_survivor") {
        return;
    }
    let mut lab = running(3, 1);
    let vip = vip_of(1);
    let _echo: Vec<EchoServer> = lab.nodes.iter().map(|n| EchoServer::start(&n.ns, ECHO).unwrap()).collect();
    let c = &lab.clients[0];
    let watch = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, vip, ARP_EVERY).unwrap();
    let probe = Prober::start(&c.ns, SocketAddr::new(IpAddr::V4(vip), ECHO), Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(watch.seen().iter().any(|a| node_of(a.mac) == Some(1)), "node 1 never answered its VIP before the kill");
    let (t0, real0) = (Instant::now(), realtime_ns());
    // The agent dies first (it cannot say anything), then the node's cables go.
    lab.nodes[1].agent.take().unwrap().kill();
    lab.unplug(1);
    let after = lab.wait_cluster(0, "the group moved off n1", Duration::from_secs(5), |s| {
        s.groups.iter().any(|g| g.address == vip.to_string() && g.owner.as_deref().is_some_and(|o| o != "n1"))
    });
    std::thread::sleep(Duration::from_millis(500));
    let recs = probe.stop();
    let first = watch.first_from(real0, |m| matches!(node_of(m), Some(k) if k != 1)).expect("no survivor answered the VIP");
    let answered = Duration::from_nanos(first.at_ns - real0);
    let out = vip_tests::probe::outage(&recs, t0).expect("the client never heard back");
    eprintln!("kill -> first answer by n{} {answered:?}; client outage {out:?}", node_of(first.mac).unwrap());
    assert!(answered < Duration::from_secs(1), "the survivor answered {answered:?} after the kill");
    let bad = overlaps(&watch.seen(), ARP_EVERY, owner_of);
    assert!(bad.is_empty(), "two nodes answered {vip}: {bad:?}");
    let to = after.takeovers.iter().find(|t| t.node == "n1").expect("takeover recorded");
    assert_eq!(to.reason, "silent", "{to:?}");
    assert!(to.decided_at >= to.suspected_at && to.suspected_at > to.silent_since && to.silent_since > 0.0, "{to:?}");
    // The new owner's first answer shows in the record (from its own report).
    let to = lab
        .wait_cluster(0, "the first answer in the record", Duration::from_secs(3), |s| s.takeovers.iter().any(|t| t.node == "n1" && t.answered_at > 0.0))
        .takeovers
        .into_iter()
        .find(|t| t.node == "n1")
        .unwrap();
    assert!(to.answered_at >= to.decided_at - 0.01, "{to:?}");
    eprintln!(
        "record: suspected +{:.0} ms, decided +{:.0} ms, answered +{:.0} ms after the last heartbeat",
        (to.suspected_at - to.silent_since) * 1e3,
        (to.decided_at - to.silent_since) * 1e3,
        (to.answered_at - to.silent_since) * 1e3
    );
    // The client moved: its neighbour entry names the new owner.
    let owner = node_of(first.mac).unwrap();
    let mac = neigh_mac(c, IpAddr::V4(vip)).expect("client has an entry");
    assert_eq!(node_of(mac), Some(owner), "client still points at node {:?}", node_of(mac));
    for k in [0, 2] {
        lab.nodes[k].agent.take().unwrap().stop();
    }
}

/// Everything a fault test watches on node 1's VIP from client 0.
struct Watch {
    arp: ArpWatch,
    probe: Prober,
    _echo: Vec<EchoServer>,
}

fn watch(lab: &ClusterLab, k: usize) -> Watch {
    let vip = vip_of(k);
    let echo = lab.nodes.iter().map(|n| EchoServer::start(&n.ns, ECHO).unwrap()).collect();
    let c = &lab.clients[0];
    let arp = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, vip, ARP_EVERY).unwrap();
    let probe = Prober::start(&c.ns, SocketAddr::new(IpAddr::V4(vip), ECHO), Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(arp.seen().iter().any(|a| node_of(a.mac) == Some(k)), "node {k} never answered its VIP");
    Watch { arp, probe, _echo: echo }
}

/// When node `k` answered last before `t` and when another node answered first after it.
fn handover(w: &Watch, k: usize, t: u64) -> (Option<u64>, Option<u64>) {
    let seen = w.arp.seen();
    let last_old = seen.iter().filter(|a| node_of(a.mac) == Some(k)).map(|a| a.at_ns).max();
    let first_new = seen.iter().filter(|a| a.at_ns >= t && matches!(node_of(a.mac), Some(j) if j != k)).map(|a| a.at_ns).min();
    (last_old, first_new)
}

fn stop_all(lab: &mut ClusterLab) {
    for n in &mut lab.nodes {
        if let Some(a) = n.agent.take() {
            a.stop();
        }
    }
}

/// An agent that hangs (SIGSTOP) with every link up: its node stops answering by its
/// deadline, before any other node takes the VIP (no overlap on the wire); when it runs
/// again it finds itself cut off, stays silent and takes nothing back.
#[test]
fn a_stopped_agent_goes_silent_before_its_vip_moves() {
    if !root_or_skip("a_stopped_agent_goes_silent_before_its_vip_moves") {
        return;
    }
    let mut lab = running(3, 1);
    let w = watch(&lab, 1);
    let real0 = realtime_ns();
    lab.agent(1).signal(libc::SIGSTOP);
    lab.wait_cluster(0, "the group moved off n1", Duration::from_secs(5), |s| {
        s.groups.iter().any(|g| g.address == vip_of(1).to_string() && g.owner.as_deref().is_some_and(|o| o != "n1"))
    });
    std::thread::sleep(Duration::from_millis(400));
    let (last_old, first_new) = handover(&w, 1, real0);
    let (last_old, first_new) = (last_old.expect("n1 answered"), first_new.expect("nobody took over"));
    eprintln!(
        "SIGSTOP -> n1 silent after {:?}, another node answers after {:?}",
        Duration::from_nanos(last_old.saturating_sub(real0)),
        Duration::from_nanos(first_new - real0)
    );
    assert!(last_old < first_new, "n1 answered after the takeover");
    // It fell silent within its fence (80 ms) and a margin for the 2 ms ARP period.
    assert!(last_old.saturating_sub(real0) < 150_000_000, "n1 answered {:?} after it stopped", Duration::from_nanos(last_old - real0));
    let bad = overlaps(&w.arp.seen(), ARP_EVERY, owner_of);
    assert!(bad.is_empty(), "two nodes answered: {bad:?}");
    // It runs again: cut off, it registers anew and holds nothing.
    lab.agent(1).signal(libc::SIGCONT);
    let s = lab.wait_cluster(1, "n1 back as a new incarnation", Duration::from_secs(10), |s| s.incarnation > 0 && s.holding.is_empty() && s.nodes.iter().any(|n| n.name == "n1" && n.health == "recovered"));
    assert!(s.holding.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let seen = w.arp.seen();
    let late: Vec<_> = seen.iter().filter(|a| a.at_ns > first_new && node_of(a.mac) == Some(1)).collect();
    assert!(late.is_empty(), "n1 answered again after SIGCONT: {late:?}");
    drop(w);
    stop_all(&mut lab);
}

/// A node cut off from etcd and from its peers, but still reachable by clients: it goes
/// silent before the others take its VIP over.
#[test]
fn a_node_cut_off_is_silent_before_takeover() {
    if !root_or_skip("a_node_cut_off_is_silent_before_takeover") {
        return;
    }
    let mut lab = running(3, 1);
    let w = watch(&lab, 1);
    let real0 = realtime_ns();
    lab.isolate(1);
    lab.wait_cluster(0, "the group moved off n1", Duration::from_secs(5), |s| {
        s.groups.iter().any(|g| g.address == vip_of(1).to_string() && g.owner.as_deref().is_some_and(|o| o != "n1"))
    });
    std::thread::sleep(Duration::from_millis(400));
    let (last_old, first_new) = handover(&w, 1, real0);
    let (last_old, first_new) = (last_old.expect("n1 answered"), first_new.expect("nobody took over"));
    eprintln!(
        "isolated -> n1 silent after {:?}, another node answers after {:?}",
        Duration::from_nanos(last_old.saturating_sub(real0)),
        Duration::from_nanos(first_new - real0)
    );
    assert!(last_old < first_new, "n1 answered after the takeover");
    let bad = overlaps(&w.arp.seen(), ARP_EVERY, owner_of);
    assert!(bad.is_empty(), "two nodes answered: {bad:?}");
    // n1 itself knows it may not answer.
    let s = lab.cluster_status(1).expect("n1 status");
    assert!(s.deadline_ms <= 0.0, "n1 still thinks it may answer for {} ms", s.deadline_ms);
    lab.heal(1);
    lab.wait_cluster(1, "n1 back, holding nothing", Duration::from_secs(10), |s| s.etcd_connected && s.deadline_ms > 0.0 && s.holding.is_empty());
    let late: Vec<_> = w.arp.seen().into_iter().filter(|a| a.at_ns > first_new && node_of(a.mac) == Some(1)).collect();
    assert!(late.is_empty(), "n1 answered again after the network healed: {late:?}");
    drop(w);
    stop_all(&mut lab);
}

/// SIGTERM: the node stops answering and says so; another node answers within 50 ms. When
/// it comes back it stays silent and takes nothing back (no rebalance asked).
#[test]
fn sigterm_hands_over_fast_and_a_returning_node_takes_nothing_back() {
    if !root_or_skip("sigterm_hands_over_fast_and_a_returning_node_takes_nothing_back") {
        return;
    }
    let mut lab = running(3, 1);
    let w = watch(&lab, 1);
    let real0 = realtime_ns();
    let a = lab.nodes[1].agent.take().unwrap();
    assert!(a.stop().success());
    let (last_old, first_new) = handover(&w, 1, real0);
    let first_new = first_new.expect("nobody took over");
    let took = Duration::from_nanos(first_new - real0);
    eprintln!("SIGTERM -> another node answers after {took:?}");
    assert!(last_old.is_none_or(|t| t < first_new), "n1 answered after the handover");
    assert!(took < Duration::from_millis(50), "handover took {took:?}");
    let s = lab.cluster_status(0).unwrap();
    let to = s.takeovers.iter().find(|t| t.node == "n1").expect("takeover recorded");
    assert_eq!(to.reason, "down");
    let new_owner = lab.owner(0, vip_of(1)).expect("owned");
    // n1 returns: it reads, answers nothing, takes nothing back.
    lab.start(1);
    lab.wait_cluster(1, "n1 registered and reading", Duration::from_secs(10), |s| s.incarnation > 0 && s.deadline_ms > 0.0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.owner(0, vip_of(1)), Some(new_owner.clone()), "the group moved back");
    let s = lab.cluster_status(1).unwrap();
    assert!(s.holding.is_empty(), "n1 holds {:?}", s.holding);
    let late: Vec<_> = w.arp.seen().into_iter().filter(|a| a.at_ns > first_new && node_of(a.mac) == Some(1)).collect();
    assert!(late.is_empty(), "n1 answered after it returned: {late:?}");
    assert!(overlaps(&w.arp.seen(), ARP_EVERY, owner_of).is_empty());
    drop(w);
    stop_all(&mut lab);
}

/// etcd's leader killed, then etcd's quorum lost: nothing moves and no answer is lost;
/// etcd back, the cluster carries on.
#[test]
fn etcd_outage_freezes_and_loses_no_answer() {
    if !root_or_skip("etcd_outage_freezes_and_loses_no_answer") {
        return;
    }
    let mut lab = running(3, 1);
    let w = watch(&lab, 1);
    let t0 = Instant::now();
    let owners = |lab: &ClusterLab| (0..3).map(|k| lab.owner(0, vip_of(k))).collect::<Vec<_>>();
    let before = owners(&lab);
    let leader = lab.etcd_leader().expect("an etcd leader");
    lab.etcd[leader].kill();
    std::thread::sleep(Duration::from_secs(2));
    let other = (0..3).find(|&m| m != leader).unwrap();
    lab.etcd[other].kill();
    std::thread::sleep(Duration::from_secs(3));
    // Still answering, on every node's own word (its peers').
    for k in 0..3 {
        let s = lab.cluster_status(k).unwrap();
        assert!(s.deadline_ms > 0.0, "n{k} stopped answering during the etcd outage: {}", vip_agent::status::cluster_human(&s));
    }
    for m in [leader, other] {
        lab.etcd[m].restart();
    }
    lab.wait_etcd(Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(owners(&lab), before, "a group moved during the etcd outage");
    let end = Instant::now() - Duration::from_millis(100);
    let recs = w.probe.stop();
    let during = |r: &&vip_tests::probe::Probe| r.sent > t0 && r.sent < end;
    let lost = recs.iter().filter(during).filter(|r| r.received.is_none()).count();
    let sent = recs.iter().filter(during).count();
    eprintln!("{sent} probes through the etcd outage, {lost} lost");
    assert_eq!(lost, 0, "answers lost during the etcd outage");
    assert!(overlaps(&w.arp.seen(), ARP_EVERY, owner_of).is_empty());
    lab.wait_cluster(0, "etcd reachable again", Duration::from_secs(10), |s| s.etcd_connected);
    stop_all(&mut lab);
}

/// A node that loses every adapter its group may use (its cluster link still up) hands
/// the group over: it stops answering, says so, and the leader gives the group to another
/// node; nobody answers twice. Its own port failures among its adapters stay local.
#[test]
fn a_node_without_ports_for_a_group_hands_it_over() {
    if !root_or_skip("a_node_without_ports_for_a_group_hands_it_over") {
        return;
    }
    let mut lab = running(3, 1);
    let w = watch(&lab, 1);
    // One adapter down: the group stays on n1 (the node's own failover).
    lab.sw.ip(&["link", "set", &lab.nodes[1].ports[0], "down"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.owner(0, vip_of(1)).as_deref(), Some("n1"), "one port down moved the group off its node");
    let real0 = realtime_ns();
    lab.sw.ip(&["link", "set", &lab.nodes[1].ports[1], "down"]);
    lab.wait_cluster(0, "the group moved off n1", Duration::from_secs(5), |s| {
        s.groups.iter().any(|g| g.address == vip_of(1).to_string() && g.owner.as_deref().is_some_and(|o| o != "n1"))
    });
    std::thread::sleep(Duration::from_millis(300));
    let (_, first_new) = handover(&w, 1, real0);
    let took = Duration::from_nanos(first_new.expect("nobody took over") - real0);
    eprintln!("last port of the group down -> another node answers after {took:?}");
    assert!(took < Duration::from_millis(500), "handover took {took:?}");
    assert!(overlaps(&w.arp.seen(), ARP_EVERY, owner_of).is_empty());
    // n1 is still a live member (its cluster link is up) and holds nothing.
    let s = lab.cluster_status(1).unwrap();
    assert!(s.holding.is_empty() && s.deadline_ms > 0.0, "{}", vip_agent::status::cluster_human(&s));
    drop(w);
    stop_all(&mut lab);
}

/// New definitions reach every node without a restart: an added group is answered by its
/// node, a removed one stops being answered.
#[test]
fn definitions_change_without_restarts() {
    if !root_or_skip("definitions_change_without_restarts") {
        return;
    }
    let mut lab = running(2, 1);
    let extra = std::net::Ipv4Addr::new(192, 0, 2, 120);
    let text = format!("{}[[vip]]\naddress = \"{extra}/24\"\ncount = 4\nnode = \"n1\"\nadapters = [\"eth0\", \"eth1\"]\nmode = \"all\"\n", lab.defs_text(1, "spread"));
    let out = lab.apply(0, &text);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.wait_cluster(1, "the new group held by n1", Duration::from_secs(5), |s| s.holding.contains(&extra.to_string()));
    let c = &lab.clients[0];
    let arp = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, std::net::Ipv4Addr::new(192, 0, 2, 123), ARP_EVERY).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(arp.seen().iter().any(|a| node_of(a.mac) == Some(1)), "the last address of the new group is not answered by n1");
    // Removed again: no longer answered.
    let out = lab.apply(0, &lab.defs_text(1, "spread"));
    assert!(out.status.success());
    lab.wait_cluster(1, "the group gone", Duration::from_secs(5), |s| !s.holding.contains(&extra.to_string()) && s.groups.len() == 2);
    std::thread::sleep(Duration::from_millis(100));
    let t = realtime_ns();
    std::thread::sleep(Duration::from_millis(200));
    let late: Vec<_> = arp.seen().into_iter().filter(|a| a.at_ns > t).collect();
    assert!(late.is_empty(), "a removed VIP is still answered: {late:?}");
    // A bad file is refused with its line and key, and changes nothing.
    let out = lab.apply(0, "[[vip]]\naddress = \"192.0.2.130/24\"\nmode = \"sometimes\"\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":3: vip[0].mode:"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lab.cluster_status(0).unwrap().groups.len(), 2);
    drop(arp);
    stop_all(&mut lab);
}

/// `cargo xtask run -- lab --cluster`, as an operator runs it: the example definitions
/// are applied, a node is killed on the timer and another takes its groups over (printed
/// with its timings), the node comes back; Ctrl-C stops it and leaves no namespace, etcd
/// or agent behind.
#[test]
fn the_cluster_lab_runs_kills_a_node_and_cleans_up() {
    use std::io::{BufRead, BufReader};
    if !root_or_skip("the_cluster_lab_runs_kills_a_node_and_cleans_up") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vip-lab"))
        .args(["--cluster", "--kill-every", "6"])
        .current_dir(&root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("vip-lab");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen_takeover = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains("takeover of") => seen_takeover = true,
            Ok(l) if l.contains("comes back") && seen_takeover => break,
            _ => {}
        }
    }
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    assert!(status.success(), "vip-lab exited with {status}:\n{out}");
    for want in ["vip-agent cluster apply", "leader n", "killing n", "takeover of", "first answer by the new owner", "comes back", "removing the lab"] {
        assert!(out.contains(want), "the lab never printed {want:?}:\n{out}");
    }
    // Every group of the example is held by someone at the end.
    let last = out.lines().rev().find(|l| l.contains("] leader")).unwrap();
    assert!(!last.contains("-> -"), "a group without an owner: {last}");
    let left = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&format!("vipt{pid}-")), "namespaces left behind:\n{left}");
    let procs = std::process::Command::new("pgrep").args(["-f", &format!("vipt{pid}-")]).output().unwrap();
    assert!(procs.stdout.is_empty(), "processes left behind: {}", String::from_utf8_lossy(&procs.stdout));
}
