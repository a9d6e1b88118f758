//! `cargo xtask run -- lab --cluster`: three etcd members, three nodes (eth0 and eth1 on
//! the client bridge, cl0 on the cluster bridge) each running the agent, three clients.
//! The definitions of `--defs` are applied with `vip-agent cluster apply`; then, on a timer,
//! the node holding the first group dies (every cable pulled, agent SIGKILLed) and comes
//! back a period later. Each second shows who holds what and what each client resolved;
//! each takeover is printed with its timings from the kill.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use vip_tests::{
    cluster::{node_of, ClusterLab, Timing},
    probe::realtime_ns,
};

use crate::STOP;

pub struct Opts<'a> {
    pub defs: &'a Path,
    pub duration: u64,
    pub kill_every: u64,
}

pub fn run(o: Opts) -> Result<(), String> {
    let text = std::fs::read_to_string(o.defs).map_err(|e| format!("{}: {e}", o.defs.display()))?;
    println!("==> starting etcd (3 members) and 3 nodes");
    let mut lab = ClusterLab::new(3, 3);
    for k in 0..3 {
        lab.write_config(k, &Timing::default(), "");
    }
    for k in 0..3 {
        lab.start(k);
    }
    lab.wait_cluster(0, "every node registered", Duration::from_secs(30), |s| s.nodes.iter().filter(|n| n.incarnation > 0).count() == 3);
    println!("==> vip-agent cluster apply {}", o.defs.display());
    let out = lab.apply(0, &text);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        stop_all(&mut lab);
        return Err(format!("cluster apply refused the definitions:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    lab.wait_settled(Duration::from_secs(30));
    for n in &lab.nodes {
        println!("  node {}: agent log {}", n.name, n.files.log.display());
    }
    let mut status = lab.cluster_status(0).ok_or("node n0 gives no cluster status")?;
    print!("{}", vip_agent::status::cluster_human(&status));
    let vips: Vec<Ipv4Addr> = status.groups.iter().filter_map(|g| g.address.parse().ok()).collect();
    show_resolution(&lab, &vips);

    let start = Instant::now();
    let mut tick = 0u64;
    // The node that is down now and the wall-clock time it died (for the takeovers' timings).
    let mut down: Option<(usize, u64)> = None;
    let mut shown = status.takeovers.len();
    while !STOP.load(Ordering::Relaxed) && (o.duration == 0 || start.elapsed() < Duration::from_secs(o.duration)) {
        std::thread::sleep(Duration::from_secs(1));
        tick += 1;
        let witness = (0..3).find(|&k| lab.nodes[k].agent.is_some() && down.is_none_or(|(d, _)| d != k)).unwrap_or(0);
        let Some(s) = lab.cluster_status(witness) else {
            println!("[{tick:>4}s] node n{witness} gives no cluster status");
            continue;
        };
        status = s;
        let held: Vec<String> = status.groups.iter().map(|g| format!("{} -> {}", g.address, g.owner.as_deref().unwrap_or("-"))).collect();
        let health: Vec<String> = status.nodes.iter().map(|n| format!("{} {}", n.name, n.health)).collect();
        println!("[{tick:>4}s] leader {}  |  {}  |  {}", status.leader.as_deref().unwrap_or("-"), health.join(", "), held.join("  "));
        let fresh = &status.takeovers[shown.min(status.takeovers.len())..];
        let complete = fresh.iter().all(|t| t.answered_at > 0.0);
        if complete {
            for t in fresh {
                let from = down.map_or(t.suspected_at * 1e9, |(_, at)| at as f64);
                let ms = |unix: f64| format!("{:+.0} ms", (unix * 1e9 - from) / 1e6);
                println!(
                    "       takeover of {} ({}): {} groups, {} VIPs to {}; suspected {}, decided {}, first answer by the new owner {} (from the {}), leader {}",
                    t.node,
                    t.reason,
                    t.groups,
                    t.vips,
                    t.to.join(","),
                    ms(t.suspected_at),
                    ms(t.decided_at),
                    ms(t.answered_at),
                    if down.is_some() { "kill" } else { "suspicion" },
                    t.leader
                );
            }
            shown = status.takeovers.len();
            if !fresh.is_empty() {
                show_resolution(&lab, &vips);
            }
        }
        if o.kill_every == 0 || !tick.is_multiple_of(o.kill_every) {
            continue;
        }
        match down.take() {
            Some((k, _)) => {
                println!("==> {} comes back: cables plugged in, agent started (it holds nothing until the leader asks)", lab.nodes[k].name);
                for p in lab.nodes[k].ports.clone() {
                    lab.sw.ip(&["link", "set", &p, "up"]);
                }
                lab.start(k);
            }
            None => {
                let k = victim(&lab, &status);
                println!("==> killing {}: every cable pulled, agent SIGKILLed", lab.nodes[k].name);
                let at = realtime_ns();
                lab.unplug(k);
                lab.nodes[k].agent.take().expect("running").kill();
                down = Some((k, at));
            }
        }
    }
    println!("stopping the agents and removing the lab (namespaces, etcd, files)");
    stop_all(&mut lab);
    Ok(())
}

/// The running node holding the first group (the defs put a group that moves first), or
/// else the one holding the most.
fn victim(lab: &ClusterLab, s: &vip_cluster::node::ClusterStatus) -> usize {
    let running = |k: &usize| lab.nodes[*k].agent.is_some();
    let first = s.groups.first().and_then(|g| g.owner.as_deref()).and_then(|o| (0..3).filter(running).find(|&k| lab.nodes[k].name == o));
    first.unwrap_or_else(|| {
        (0..3).filter(running).max_by_key(|&k| s.groups.iter().filter(|g| g.owner.as_deref() == Some(lab.nodes[k].name.as_str())).count()).unwrap_or(0)
    })
}

fn stop_all(lab: &mut ClusterLab) {
    for n in &mut lab.nodes {
        if let Some(a) = n.agent.take() {
            let st = a.stop();
            if !st.success() {
                eprintln!("agent of {} exited with {st}", n.name);
            }
        }
    }
}

/// The node each client's kernel resolves each group's first VIP to now.
fn show_resolution(lab: &ClusterLab, vips: &[Ipv4Addr]) {
    for c in &lab.clients {
        let mut line = format!("  client {}:", c.ip4);
        for vip in vips {
            let v = vip.to_string();
            let entry = || c.ns.ip(&["neigh", "show", &v]);
            if !entry().contains("lladdr") {
                c.ns.run(|| UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"lab", (*vip, 9))).map(|_| ()).ok());
                std::thread::sleep(Duration::from_millis(30));
            }
            let out = entry();
            let node = out
                .split_whitespace()
                .skip_while(|w| *w != "lladdr")
                .nth(1)
                .and_then(vip_packet::parse_mac)
                .and_then(node_of)
                .map_or("unresolved".to_string(), |k| format!("n{k}"));
            line.push_str(&format!("  {vip} -> {node}"));
        }
        println!("{line}");
    }
}
