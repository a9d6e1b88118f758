//! The seeds' cluster policies on real etcd and real XDP, in namespaces (issue 12): where a
//! group or a virtual server goes when ports or nodes fail, seen from a client's wire.
//! Every test also checks that no two nodes ever answered one VIP at once.

use std::{net::Ipv4Addr, time::Duration};

use vip_tests::{
    cluster::{node_of, owner_of, vip_of, ClusterLab, Timing},
    probe::{overlaps, ArpWatch},
    root_or_skip,
};

const ARP_EVERY: Duration = Duration::from_millis(2);

fn start(n: usize, extra: impl Fn(usize) -> String) -> ClusterLab {
    let mut lab = ClusterLab::new(n, 1);
    for k in 0..n {
        lab.write_config(k, &Timing::default(), &extra(k));
    }
    for k in 0..n {
        lab.start(k);
    }
    lab.wait_cluster(0, "every node registered", Duration::from_secs(15), |s| s.nodes.iter().filter(|x| x.incarnation > 0).count() == n);
    lab
}

fn apply(lab: &ClusterLab, text: &str) {
    let out = lab.apply(0, text);
    assert!(out.status.success(), "cluster apply: {}", String::from_utf8_lossy(&out.stderr));
}

fn stop_all(lab: &mut ClusterLab) {
    for n in &mut lab.nodes {
        if let Some(a) = n.agent.take() {
            a.stop();
        }
    }
}

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// `vip-agent check --netns` of examples/DIR/nK.toml on each node of the lab: the
/// example's adapters are the lab's.
fn check_examples(lab: &ClusterLab, dir: &str) {
    for n in &lab.nodes {
        let cfg = examples().join(format!("{dir}/{}.toml", n.name));
        let out = std::process::Command::new(vip_tests::agentproc::agent_bin())
            .args(["check", "--netns", &n.ns.name, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(out.status.success(), "check {}: {}{}", cfg.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}

/// Pulls node `k`'s client cables (eth0, eth1), leaving its cluster link up.
fn pull_ports(lab: &ClusterLab, k: usize) {
    for p in &lab.nodes[k].ports[..2] {
        lab.sw.ip(&["link", "set", p, "down"]);
    }
}

/// Waits until node `k` (by its status) sees `addr` held by `owner`, then until the client
/// sees `owner` answer it on the wire.
fn expect_at(lab: &ClusterLab, witness: usize, addr: Ipv4Addr, owner: usize, what: &str) {
    let name = format!("n{owner}");
    lab.wait_cluster(witness, what, Duration::from_secs(10), |s| {
        s.groups.iter().any(|g| g.address == addr.to_string() && g.owner.as_deref() == Some(name.as_str()))
    });
    let c = &lab.clients[0];
    let w = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, addr, ARP_EVERY).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline && !w.seen().iter().any(|a| node_of(a.mac) == Some(owner)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(w.seen().iter().any(|a| node_of(a.mac) == Some(owner)), "{what}: n{owner} does not answer {addr} on the wire");
    assert!(w.seen().iter().all(|a| node_of(a.mac) == Some(owner)), "{what}: another node still answers {addr}: {:?}", w.seen());
}

/// Seed 000: four nodes in two pairs (n0+n2, n1+n3) split into two groups (A: n0, n1; B:
/// n2, n3), losing ports one by one. n0's group goes to n1 (its group, not its partner);
/// when n1 loses its ports too, both groups go to n3 (n1's partner: its group has no other
/// node with a port). Two ARP watches run throughout and see no overlap.
#[test]
fn pairs_and_groups_lose_ports_one_by_one() {
    if !root_or_skip("pairs_and_groups_lose_ports_one_by_one") {
        return;
    }
    let (groups, partners) = (["A", "A", "B", "B"], ["n2", "n3", "n0", "n1"]);
    let mut lab = start(4, |k| format!("group = \"{}\"\npartner = \"{}\"\n", groups[k], partners[k]));
    // The example of this cluster (examples/cluster-pairs) is what runs: each node's
    // config passes `check` on the node, and its definitions are the ones applied.
    check_examples(&lab, "cluster-pairs");
    let defs = std::fs::read_to_string(examples().join("cluster-pairs/defs.toml")).unwrap();
    assert_eq!(defs.matches("[[vip]]").count(), 4);
    apply(&lab, &defs);
    lab.wait_settled(Duration::from_secs(15));
    let c = &lab.clients[0];
    let w0 = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, vip_of(0), ARP_EVERY).unwrap();
    let w1 = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, vip_of(1), ARP_EVERY).unwrap();
    let s = lab.cluster_status(2).unwrap();
    assert!(vip_agent::status::cluster_human(&s).contains("n0 (group A, partner n2)"), "{}", vip_agent::status::cluster_human(&s));

    pull_ports(&lab, 0);
    expect_at(&lab, 2, vip_of(0), 1, "n0 without ports: its group to n1 (same group, not the partner)");
    pull_ports(&lab, 1);
    expect_at(&lab, 2, vip_of(0), 3, "n1 without ports: n0's group to n3 (n1's partner)");
    expect_at(&lab, 2, vip_of(1), 3, "n1 without ports: its own group to n3 (its partner)");
    for (w, k) in [(&w0, 0), (&w1, 1)] {
        let o = overlaps(&w.seen(), ARP_EVERY, owner_of);
        assert!(o.is_empty(), "group {k}: two nodes answered at once: {o:?}");
    }
    drop((w0, w1));
    stop_all(&mut lab);
}

/// Seed 003: a standby node holds nothing while all is well; when a node is killed it
/// takes that node over whole (both its groups), and the node comes back "recovered",
/// holding nothing, until `cluster rebalance` sends its groups home.
#[test]
fn a_standby_node_takes_over_a_killed_node_whole() {
    if !root_or_skip("a_standby_node_takes_over_a_killed_node_whole") {
        return;
    }
    let mut lab = start(3, |k| if k == 2 { "role = \"standby\"\n".into() } else { String::new() });
    let a = Ipv4Addr::new(192, 0, 2, 120);
    let defs = format!(
        "[[vip]]\naddress = \"{a}/24\"\nnode = \"n0\"\nadapters = [\"eth0\", \"eth1\"]\n\n\
         [[vip]]\naddress = \"192.0.2.121/24\"\nnode = \"n0\"\nadapters = [\"eth0\", \"eth1\"]\n\n\
         [[vip]]\naddress = \"{}/24\"\nnode = \"n1\"\nadapters = [\"eth0\", \"eth1\"]\n",
        vip_of(1)
    );
    apply(&lab, &defs);
    lab.wait_settled(Duration::from_secs(15));
    let s = lab.cluster_status(2).unwrap();
    assert!(s.holding.is_empty(), "the standby holds something while all is well");
    assert_eq!(s.nodes.iter().find(|n| n.name == "n2").map(|n| n.health.as_str()), Some("standby"));
    let c = &lab.clients[0];
    let w = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, a, ARP_EVERY).unwrap();

    lab.unplug(0);
    lab.nodes[0].agent.take().unwrap().kill();
    expect_at(&lab, 1, a, 2, "n0 killed: the standby takes it");
    expect_at(&lab, 1, Ipv4Addr::new(192, 0, 2, 121), 2, "n0 killed: the standby takes all of it");
    assert_eq!(lab.owner(1, vip_of(1)).as_deref(), Some("n1"), "n1's group moved");
    let o = overlaps(&w.seen(), ARP_EVERY, owner_of);
    assert!(o.is_empty(), "two nodes answered at once: {o:?}");
    drop(w);
    // A new capture for the move back (a return is not a flip-flop here: it was asked for).
    let w = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, a, ARP_EVERY).unwrap();

    // n0 comes back: recovered, holding nothing.
    for p in lab.nodes[0].ports.clone() {
        lab.sw.ip(&["link", "set", &p, "up"]);
    }
    lab.start(0);
    lab.wait_cluster(1, "n0 recovered", Duration::from_secs(10), |s| s.nodes.iter().any(|n| n.name == "n0" && n.health == "recovered"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.owner(1, a).as_deref(), Some("n2"), "a recovered node took something back unasked");
    // The operator asks: n0's groups go home, the standby is a standby again.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[1].ns.name])
        .arg(vip_tests::agentproc::agent_bin())
        .args(["cluster", "rebalance", "--config"])
        .arg(&lab.nodes[1].files.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "cluster rebalance: {}", String::from_utf8_lossy(&out.stderr));
    expect_at(&lab, 1, a, 0, "rebalance: home to n0");
    lab.wait_cluster(1, "the standby empty again", Duration::from_secs(10), |s| {
        s.nodes.iter().any(|n| n.name == "n2" && n.health == "standby" && n.holding.is_empty())
    });
    let o = overlaps(&w.seen(), ARP_EVERY, owner_of);
    assert!(o.is_empty(), "two nodes answered at once: {o:?}");
    drop(w);
    stop_all(&mut lab);
}

/// Seed 004: three virtual servers on n0 with priorities, one with `migrate = false`. n0
/// is killed: the two that migrate move whole (all their VIPs) to the least loaded nodes,
/// the highest priority first; the pinned one stays down (nobody answers it) and comes
/// back with n0.
#[test]
fn virtual_servers_move_by_priority_and_a_pinned_one_stays_down() {
    if !root_or_skip("virtual_servers_move_by_priority_and_a_pinned_one_stays_down") {
        return;
    }
    let mut lab = start(3, |_| String::new());
    let ip = |x: u8| Ipv4Addr::new(192, 0, 2, x);
    let defs = "[[server]]\nname = \"db\"\nnode = \"n0\"\npriority = 100\n\n\
                [[server]]\nname = \"web\"\nnode = \"n0\"\npriority = 50\n\n\
                [[server]]\nname = \"scratch\"\nnode = \"n0\"\npriority = 10\nmigrate = false\n\n\
                [[vip]]\naddress = \"192.0.2.120/24\"\nserver = \"db\"\nadapters = [\"eth0\", \"eth1\"]\n\n\
                [[vip]]\naddress = \"192.0.2.121/24\"\nserver = \"db\"\nadapters = [\"eth0\", \"eth1\"]\n\n\
                [[vip]]\naddress = \"192.0.2.122/24\"\nserver = \"web\"\nadapters = [\"eth0\", \"eth1\"]\n\n\
                [[vip]]\naddress = \"192.0.2.123/24\"\nserver = \"scratch\"\nadapters = [\"eth0\", \"eth1\"]\n";
    apply(&lab, defs);
    lab.wait_settled(Duration::from_secs(15));
    for x in 120..=123 {
        assert_eq!(lab.owner(1, ip(x)).as_deref(), Some("n0"), "192.0.2.{x} not at home");
    }
    let c = &lab.clients[0];
    let w = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, ip(120), ARP_EVERY).unwrap();
    lab.unplug(0);
    lab.nodes[0].agent.take().unwrap().kill();
    // db (100) first: n1 (both empty, by name); web (50): the less loaded n2.
    expect_at(&lab, 1, ip(120), 1, "db to n1");
    expect_at(&lab, 1, ip(121), 1, "db whole: its second VIP to n1 too");
    expect_at(&lab, 1, ip(122), 2, "web to the less loaded n2");
    let s = lab.cluster_status(1).unwrap();
    let sv: Vec<(&str, Option<&str>)> = s.servers.iter().map(|v| (v.name.as_str(), v.owner.as_deref())).collect();
    assert_eq!(sv, [("db", Some("n1")), ("web", Some("n2")), ("scratch", None)], "{}", vip_agent::status::cluster_human(&s));
    // Nobody answers the pinned server's VIP.
    let ws = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, ip(123), ARP_EVERY).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(ws.seen().is_empty(), "the pinned server's VIP is answered: {:?}", ws.seen());
    // n0 back: the pinned server comes back with it.
    for p in lab.nodes[0].ports.clone() {
        lab.sw.ip(&["link", "set", &p, "up"]);
    }
    lab.start(0);
    expect_at(&lab, 1, ip(123), 0, "scratch back with n0");
    assert_eq!(lab.owner(1, ip(120)).as_deref(), Some("n1"), "db went back unasked");
    let o = overlaps(&w.seen(), ARP_EVERY, owner_of);
    assert!(o.is_empty(), "two nodes answered at once: {o:?}");
    drop((w, ws));
    stop_all(&mut lab);
}

/// Writes an executable shell script.
fn script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What the service on `addr` says (the node it runs on), if it answers.
fn ask(lab: &ClusterLab, addr: Ipv4Addr, port: u16) -> Option<String> {
    use std::io::Read;
    lab.clients[0].ns.run(|| {
        let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), Duration::from_millis(300)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.trim().to_string())
    })
}

/// Seeds 003 and 004, hooks: the virtual server "svc" has an `acquire` hook that starts a
/// small TCP service bound to its VIP on the node taking it (and `release` stops it), so
/// after its node is killed a client reaches the service on the new node. "bad" fails
/// its `acquire` on n0 and "slow" hangs there past its timeout: both are marked failed on
/// n0, placed elsewhere, and answered there; `cluster status` says so.
#[test]
fn hooks_start_a_service_on_takeover_and_failed_or_hung_ones_move_the_server() {
    if !root_or_skip("hooks_start_a_service_on_takeover_and_failed_or_hung_ones_move_the_server") {
        return;
    }
    const PORT: u16 = 7300;
    let svc_bin = env!("CARGO_BIN_EXE_vip-svc");
    let dir = vip_tests::agentproc::TempDir::new("hooks");
    let ip = |x: u8| Ipv4Addr::new(192, 0, 2, x);
    let mut extra = vec![];
    for k in 0..3 {
        let d = dir.0.join(format!("n{k}"));
        std::fs::create_dir_all(&d).unwrap();
        let pid = d.join("svc.pid");
        // The service's output is detached: a hook's own output ends when it exits.
        script(&d.join("svc-acquire"), &format!("echo starting the service on n{k}\n{svc_bin} {}:{PORT} n{k} >/dev/null 2>&1 &\necho $! > {}", ip(120), pid.display()));
        script(&d.join("svc-release"), &format!("kill $(cat {}) 2>/dev/null; rm -f {}; echo stopped", pid.display(), pid.display()));
        // Its storage "breaks" when the test drops a file next to it.
        script(&d.join("svc-check"), &format!("test ! -e {}", d.join("broken").display()));
        script(&d.join("bad-acquire"), if k == 0 { "echo no storage here >&2; exit 3" } else { "exit 0" });
        script(&d.join("slow-acquire"), if k == 0 { "sleep 30" } else { "exit 0" });
        extra.push(format!(
            "[[cluster.server]]\nname = \"svc\"\nacquire = \"{0}/svc-acquire\"\nrelease = \"{0}/svc-release\"\ncheck = \"{0}/svc-check\"\ncheck_interval_ms = 200\ntimeout_ms = 5000\n\n\
             [[cluster.server]]\nname = \"bad\"\nacquire = \"{0}/bad-acquire\"\ntimeout_ms = 5000\n\n\
             [[cluster.server]]\nname = \"slow\"\nacquire = \"{0}/slow-acquire\"\ntimeout_ms = 500\n",
            d.display()
        ));
    }
    let mut lab = start(3, |k| extra[k].clone());
    check_examples(&lab, "cluster-servers");
    let out = lab.apply(0, &std::fs::read_to_string(examples().join("cluster-servers/defs.toml")).unwrap());
    assert!(out.status.success(), "the example definitions: {}", String::from_utf8_lossy(&out.stderr));
    lab.wait_settled(Duration::from_secs(15));
    let s = lab.cluster_status(0).unwrap();
    let sv: Vec<(&str, Option<&str>)> = s.servers.iter().map(|v| (v.name.as_str(), v.owner.as_deref())).collect();
    assert_eq!(sv, [("db", Some("n0")), ("web", Some("n1")), ("scratch", Some("n2"))], "the example's servers at home");
    let defs = "[[server]]\nname = \"svc\"\nnode = \"n0\"\npriority = 10\n\n\
                [[server]]\nname = \"bad\"\nnode = \"n0\"\n\n\
                [[server]]\nname = \"slow\"\nnode = \"n0\"\n\n\
                [[vip]]\naddress = \"192.0.2.120/24\"\nserver = \"svc\"\nadapters = [\"eth0\", \"eth1\"]\n\n\
                [[vip]]\naddress = \"192.0.2.121/24\"\nserver = \"bad\"\nadapters = [\"eth0\", \"eth1\"]\n\n\
                [[vip]]\naddress = \"192.0.2.122/24\"\nserver = \"slow\"\nadapters = [\"eth0\", \"eth1\"]\n";
    apply(&lab, defs);
    expect_at(&lab, 1, ip(120), 0, "svc at home on n0");
    assert_eq!(ask(&lab, ip(120), PORT).as_deref(), Some("n0"), "the service started by acquire on n0");
    // bad and slow failed on n0 and went elsewhere.
    let s = lab.wait_cluster(0, "bad and slow failed on n0", Duration::from_secs(15), |s| {
        s.failed_here.contains(&"bad".to_string()) && s.failed_here.contains(&"slow".to_string())
    });
    let human = vip_agent::status::cluster_human(&s);
    assert!(human.contains("exit 3"), "{human}");
    assert!(human.contains("killed at its timeout (500 ms)"), "{human}");
    for (x, what) in [(121, "bad"), (122, "slow")] {
        let s = lab.wait_cluster(1, "placed elsewhere", Duration::from_secs(15), |s| {
            s.groups.iter().any(|g| g.address == ip(x).to_string() && g.owner.as_deref().is_some_and(|o| o != "n0"))
        });
        let owner: usize = s.groups.iter().find(|g| g.address == ip(x).to_string()).unwrap().owner.as_ref().unwrap()[1..].parse().unwrap();
        expect_at(&lab, 1, ip(x), owner, &format!("{what} answered by n{owner} after its acquire failed on n0"));
    }

    // n0 dies: svc moves, its acquire starts the service on the new node.
    let c = &lab.clients[0];
    let w = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, ip(120), ARP_EVERY).unwrap();
    lab.unplug(0);
    lab.nodes[0].agent.take().unwrap().kill();
    let s = lab.wait_cluster(1, "svc moved", Duration::from_secs(10), |s| {
        s.servers.iter().any(|v| v.name == "svc" && v.owner.as_deref().is_some_and(|o| o != "n0"))
            && s.takeovers.iter().rev().find(|t| t.node == "n0").is_some_and(|t| t.reason == "silent" && t.answered_at > 0.0)
    });
    let owner = s.servers.iter().find(|v| v.name == "svc").unwrap().owner.clone().unwrap();
    let k: usize = owner[1..].parse().unwrap();
    expect_at(&lab, 1, ip(120), k, "svc on its new node");
    assert_eq!(ask(&lab, ip(120), PORT).as_deref(), Some(owner.as_str()), "the service did not answer from the new node");
    let t = s.takeovers.iter().rev().find(|t| t.node == "n0").unwrap();
    assert!(t.hooks_ms > 0.0, "the takeover does not say what its hooks took: {t:?}");
    eprintln!(
        "svc takeover: suspected +{:.0} ms, decided +{:.0} ms, answered +{:.0} ms from the last heartbeat, of which acquire hooks {:.1} ms",
        (t.suspected_at - t.silent_since) * 1e3,
        (t.decided_at - t.silent_since) * 1e3,
        (t.answered_at - t.silent_since) * 1e3,
        t.hooks_ms
    );
    let o = overlaps(&w.seen(), ARP_EVERY, owner_of);
    assert!(o.is_empty(), "two nodes answered at once: {o:?}");
    drop(w);

    // Seed 004's lost storage: svc's check fails on its node; it is released there (the
    // service stopped) and moves to the last node, where acquire starts it again.
    let other = 3 - k;
    let w = ArpWatch::start(&c.ns, &c.iface, c.mac, c.ip4, ip(120), ARP_EVERY).unwrap();
    std::fs::write(dir.0.join(format!("n{k}/broken")), "").unwrap();
    expect_at(&lab, other, ip(120), other, "svc moved off the node whose check failed");
    assert_eq!(ask(&lab, ip(120), PORT), Some(format!("n{other}")), "the service did not answer from its third node");
    let s = lab.wait_cluster(k, "svc failed on its node", Duration::from_secs(5), |s| s.failed_here.contains(&"svc".to_string()));
    assert!(vip_agent::status::cluster_human(&s).contains("check"), "{}", vip_agent::status::cluster_human(&s));
    let released = std::time::Instant::now() + Duration::from_secs(3);
    while dir.0.join(format!("n{k}/svc.pid")).exists() && std::time::Instant::now() < released {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.0.join(format!("n{k}/svc.pid")).exists(), "n{k}: release did not stop the service after its check failed");
    let o = overlaps(&w.seen(), ARP_EVERY, owner_of);
    assert!(o.is_empty(), "two nodes answered at once: {o:?}");
    drop(w);
    stop_all(&mut lab);
    // The release hooks ran on stop (the agents left): no service is left running.
    std::thread::sleep(Duration::from_millis(200));
    for k in 1..3 {
        assert!(!dir.0.join(format!("n{k}/svc.pid")).exists(), "n{k}: release did not stop the service");
    }
    // n0 was killed: nothing released its service; the test does.
    if let Ok(pid) = std::fs::read_to_string(dir.0.join("n0/svc.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: a signal to the service this test's hook started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
