//! Many VIPs on one agent, as an operator would run them: 20,000 VIPs (half IPv4, half
//! IPv6) in the default configuration. The agent must never be blind to its links: a
//! cable pulled within a second of "agent up" is acted on at once, and a sample of VIPs
//! spread over both ranges answers again through a survivor.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use vip_tests::{
    probe::{realtime_ns, EchoServer, Prober},
    root_or_skip,
    scale::{failovers, recovery, sample, status_time, ScaleLab, ECHO_PORT},
    topo::Port,
};

const VIPS: usize = 20_000;

#[test]
fn twenty_thousand_vips_pull_within_a_second_of_ready() {
    if !root_or_skip("twenty_thousand_vips_pull_within_a_second_of_ready") {
        return;
    }
    let object = std::fs::read(vip_tests::object_path()).expect("object");
    let sl = ScaleLab::new(VIPS, &object, true);
    let _echo = EchoServer::start(&sl.lab.node, ECHO_PORT).expect("echo");
    let (agent, startup) = sl.start();
    let ready = Instant::now();
    eprintln!("{VIPS} VIPs up in {startup:?}");
    let vips = sample(VIPS, 6);
    let used = sl.used_adapters(&vips);
    let sw = sl.lab.switch.as_ref().unwrap();
    let mut ports: Vec<Port> = used.iter().map(|&j| Port::new(sw, &sl.lab.adapters[j].peer)).collect();
    let probers: Vec<Prober> = vips
        .iter()
        .map(|v| Prober::start(&sl.lab.clients[0].ns, SocketAddr::new(*v, ECHO_PORT), Duration::from_millis(1)).unwrap())
        .collect();
    // Within a second of ready: the agent has just put 20,000 VIPs in place.
    let since = ready.elapsed();
    assert!(since < Duration::from_secs(1), "resolving the sample took {since:?}");
    std::thread::sleep(Duration::from_millis(200));
    let (pulled, pulled_real) = (Instant::now(), realtime_ns());
    for p in &mut ports {
        p.set(false);
    }
    std::thread::sleep(Duration::from_millis(400));
    let plugged = Instant::now();
    for p in &mut ports {
        p.set(true);
    }
    std::thread::sleep(Duration::from_millis(300));
    let recs: Vec<_> = probers.into_iter().map(|p| p.stop()).collect();
    // The agent saw and handled each pull at once (its own clock, from its log).
    let log = agent.log_text();
    let downs: Vec<_> = failovers(&log).into_iter().filter(|f| f.0 == "down").collect();
    assert_eq!(downs.len(), used.len(), "failovers logged: {downs:?}");
    for (_, event_ns, dataplane_ns, maps_ns, prepared) in &downs {
        // The ports go down microseconds apart: the first change and the next were
        // prepared in the idle time after start-up.
        assert!(prepared, "a failover was decided on the spot: {downs:?}");
        let seen = event_ns.saturating_sub(pulled_real);
        eprintln!("pull seen after {seen} ns; data plane {dataplane_ns} ns, maps {maps_ns} ns");
        assert!(seen < 50_000_000, "the pull was seen {seen} ns late (blind watcher)");
        assert!(*maps_ns < 50_000_000, "maps written {maps_ns} ns after the event");
    }
    // Every sampled VIP answered again, through a survivor, within the bound.
    for (v, r) in vips.iter().zip(&recs) {
        let (first, gap) = recovery(r, pulled, plugged);
        let first = first.unwrap_or_else(|| panic!("{v} never answered while its adapter was out"));
        eprintln!("{v}: first reply {first:?} after the pull, longest silence {gap:?}");
        assert!(gap < Duration::from_millis(100), "{v} silent for {gap:?}");
    }
    // The operator's view: status answers with every VIP, and quickly enough to use.
    let (took, bytes) = status_time(&sl.files.socket);
    eprintln!("status --json: {took:?}, {bytes} bytes");
    let st = agent.status();
    assert_eq!(st.vips.len(), VIPS);
    assert_eq!(st.vips.iter().filter(|v| v.state == "active").count(), VIPS);
    assert!(st.groups.len() <= 4, "{} groups for two ranges", st.groups.len());
    // Putting 20,000 VIPs on the host woke nobody: the agent's own routes are filtered out
    // before they reach its address and route watcher.
    assert_eq!(st.host_reads, 0, "the host was re-read after the agent's own changes");
    assert!(agent.stop().success());
}

/// A live reload at scale: 20,000 VIPs, and `vip-agent reload` with a file that adds
/// 1,000 more to the IPv4 range. UDP echoes every millisecond to a sample of the VIPs
/// that stay get every reply through the reload; the new ones are answered after it.
#[test]
fn twenty_thousand_vips_reload_a_thousand_more_without_a_lost_reply() {
    if !root_or_skip("twenty_thousand_vips_reload_a_thousand_more_without_a_lost_reply") {
        return;
    }
    let object = std::fs::read(vip_tests::object_path()).expect("object");
    let sl = ScaleLab::new(VIPS, &object, true);
    let _echo = EchoServer::start(&sl.lab.node, ECHO_PORT).expect("echo");
    let (agent, _) = sl.start();
    let vips = sample(VIPS, 4);
    sl.used_adapters(&vips);
    let probers: Vec<Prober> = vips
        .iter()
        .map(|v| Prober::start(&sl.lab.clients[0].ns, SocketAddr::new(*v, ECHO_PORT), Duration::from_millis(1)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (n4, _) = vip_tests::scale::split(VIPS);
    let text = std::fs::read_to_string(&sl.files.config).unwrap();
    std::fs::write(&sl.files.config, text.replacen(&format!("count = {n4}\n"), &format!("count = {}\n", n4 + 1000), 1)).unwrap();
    let t0 = Instant::now();
    let out = std::process::Command::new(vip_tests::agentproc::agent_bin())
        .args(["reload", "--config"])
        .arg(&sl.files.config)
        .output()
        .unwrap();
    let took = t0.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}\n{}", agent.log_text().lines().filter(|l| !l.contains("\"INFO\"")).collect::<Vec<_>>().join("\n"));
    assert!(said.contains("VIPs: 1000 added, 0 removed, 0 changed, 20000 unchanged"), "{said}");
    eprintln!("reload of {VIPS} + 1000 VIPs: {took:?} ({})", said.trim());
    std::thread::sleep(Duration::from_millis(300));
    let recs: Vec<_> = probers.into_iter().map(|p| p.stop()).collect();
    for (v, r) in vips.iter().zip(&recs) {
        let lost = r.iter().filter(|p| p.received.is_none()).count();
        let (_, gap) = recovery(r, t0, t0 + took);
        eprintln!("{v}: {} echoes, {lost} lost, longest silence during the reload {gap:?}", r.len());
        assert!(r.len() > 500, "{v}: only {} echoes sent", r.len());
        assert_eq!(lost, 0, "{v}: {lost} of {} echoes lost across the reload", r.len());
    }
    // The 1,000 conflict probes went out paced: no adapter's queue overflowed. Unpaced,
    // on a loaded host, the probes filled the veth's ring and echo replies were dropped
    // with them (`ip -s link` on the node showed TX drops).
    for a in &sl.lab.adapters {
        assert_eq!(sl.lab.node.tx_dropped(&a.name), 0, "{}: frames dropped on transmit", a.name);
    }
    let st = agent.status();
    assert_eq!((st.reloads, st.vips.len()), (1, VIPS + 1000));
    assert_eq!(st.vips.iter().filter(|v| v.state == "active").count(), VIPS + 1000);
    // One of the new VIPs answers.
    let new = std::net::IpAddr::V4((u32::from(vip_tests::scale::V4_FIRST) + n4 as u32 + 999).into());
    let p = Prober::start(&sl.lab.clients[0].ns, SocketAddr::new(new, ECHO_PORT), Duration::from_millis(5)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = p.stop();
    assert!(r.iter().any(|p| p.received.is_some()), "{new} added by the reload does not answer");
    assert!(agent.stop().success());
}
