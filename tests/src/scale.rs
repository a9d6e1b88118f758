//! Many VIPs on one agent: the lab's node with 3 adapters on a bridge, half the VIPs IPv4
//! in 10.1.0.0/16 and half IPv6 in 2001:db8:1::/64, in the default configuration (spread,
//! MAC move), and a client probing a sample of VIPs spread over both ranges. Used by
//! `cargo xtask bench scale` and the namespace test with 20,000 VIPs.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    agentproc::{AgentFiles, AgentProc},
    probe::{realtime_ns, EchoServer, Probe, Prober},
    topo::{neigh_mac, poke, Lab, Port},
};

pub const ECHO_PORT: u16 = 7009;
pub const V4_FIRST: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
pub const V6_FIRST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// The `n` VIPs' first addresses and counts: (v4 count, v6 count).
pub fn split(n: usize) -> (usize, usize) {
    (n / 2, n - n / 2)
}

/// `k` VIPs spread evenly over each range.
pub fn sample(n: usize, k: usize) -> Vec<IpAddr> {
    let (n4, n6) = split(n);
    let mut out = vec![];
    for i in 0..k.min(n4) {
        out.push(IpAddr::V4((u32::from(V4_FIRST) + (i * n4 / k.min(n4)) as u32).into()));
    }
    for i in 0..k.min(n6) {
        out.push(IpAddr::V6((u128::from(V6_FIRST) + (i * n6 / k.min(n6)) as u128).into()));
    }
    out
}

/// The lab and its agent's files for `n` VIPs (the agent not started yet).
pub struct ScaleLab {
    pub lab: Lab,
    pub peers: vip_agent::dataplane::Dataplane,
    pub files: AgentFiles,
    pub n: usize,
}

impl ScaleLab {
    pub fn new(n: usize, object: &[u8], probe: bool) -> ScaleLab {
        let lab = Lab::bridged(3, 1);
        let mut peers = vip_agent::dataplane::Dataplane::load(object).expect("load");
        lab.attach_peers(&mut peers);
        for (i, a) in lab.adapters.iter().enumerate() {
            lab.node.ip(&["addr", "add", &format!("10.1.255.{}/16", i + 1), "dev", &a.name]);
            lab.node.ip(&["addr", "add", &format!("2001:db8:1::ff{i:02}/64"), "dev", &a.name, "nodad"]);
        }
        let c = &lab.clients[0];
        c.ns.ip(&["addr", "add", "10.1.254.1/16", "dev", &c.iface]);
        c.ns.ip(&["addr", "add", "2001:db8:1::fe01/64", "dev", &c.iface, "nodad"]);
        let files = AgentFiles::new(&format!("scale{n}"));
        let (n4, n6) = split(n);
        let probe = if probe { "[probe]\ncount = 1\nwait_ms = 100\n" } else { "[probe]\nenabled = false\n" };
        files.write(
            "",
            &format!(
                "[announce]\ncount = 1\n{probe}{}\
                 [[vip]]\naddress = \"{V4_FIRST}/16\"\ncount = {n4}\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\n\
                 [[vip]]\naddress = \"{V6_FIRST}/64\"\ncount = {n6}\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\n",
                lab.adapter_tables()
            ),
        );
        ScaleLab { lab, peers, files, n }
    }

    /// Starts the agent (JSON logs) and waits for its "agent up" line; returns it and the
    /// time from spawn to that line.
    pub fn start(&self) -> (AgentProc, Duration) {
        let t0 = Instant::now();
        let agent = AgentProc::spawn(&self.lab.node, &self.files, &["--log-json"]);
        loop {
            if agent.log_text().contains("\"agent up\"") {
                return (agent, t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(120) {
                panic!("agent did not come up with {} VIPs; log:\n{}", self.n, agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The adapters the client uses for the sampled VIPs (resolving each).
    pub fn used_adapters(&self, vips: &[IpAddr]) -> Vec<usize> {
        let c = &self.lab.clients[0];
        let mut used = vec![];
        for &v in vips {
            poke(c, v);
        }
        for &v in vips {
            let deadline = Instant::now() + Duration::from_secs(5);
            let m = loop {
                if let Some(m) = neigh_mac(c, v).filter(|m| self.lab.adapters.iter().any(|a| a.mac == *m)) {
                    break m;
                }
                assert!(Instant::now() < deadline, "{v} not resolved");
                poke(c, v);
                std::thread::sleep(Duration::from_millis(20));
            };
            let j = self.lab.adapters.iter().position(|a| a.mac == m).unwrap();
            if !used.contains(&j) {
                used.push(j);
            }
        }
        used.sort();
        used
    }
}

/// Failover lines of the agent's JSON log: (kind, event unix ns, data plane ns, maps ns,
/// decision prepared ahead).
pub fn failovers(log: &str) -> Vec<(String, u64, u64, u64, bool)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "failover")
        .map(|v| {
            let f = &v["fields"];
            let n = |k: &str| f[k].as_u64().unwrap_or(0);
            (
                f["kind"].as_str().unwrap_or("").to_string(),
                n("event_unix_ns"),
                n("dataplane_ns"),
                n("maps_written_ns"),
                f["prepared"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// The "agent up" line's figures: (total ms, maps ms).
pub fn agent_up(log: &str) -> (u64, u64) {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "agent up")
        .map(|v| (v["fields"]["total_ms"].as_u64().unwrap_or(0), v["fields"]["maps_ms"].as_u64().unwrap_or(0)))
        .unwrap_or((0, 0))
}

/// (resident KiB, peak resident KiB) of a process.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"))
}

/// Resident KiB of a process that is its own memory (`RssAnon`): not its binary, and not
/// the BPF maps it memory-maps, whose pages are the maps' kernel memory.
pub fn anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Kernel memory of the BPF maps a process holds (each map once): the `memlock` the
/// kernel reports per map fd.
pub fn map_memory(pid: u32) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    for e in rd.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        if target != Path::new("anon_inode:bpf-map") {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap_or_default();
        let get = |k: &str| info.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).map(str::to_string);
        if let (Some(id), Some(mem)) = (get("map_id:"), get("memlock:")) {
            if seen.insert(id) {
                total += mem.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Time `vip-agent status --json` takes (the binary, as an operator runs it), and the size.
pub fn status_time(socket: &Path) -> (Duration, usize) {
    let t = Instant::now();
    let out = std::process::Command::new(crate::agentproc::agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .expect("vip-agent status");
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    (t.elapsed(), out.stdout.len())
}

/// Per sampled VIP, how long after `from` its first reply came (None: none before `to`),
/// and the longest silence between `from` and `to`.
pub fn recovery(recs: &[Probe], from: Instant, to: Instant) -> (Option<Duration>, Duration) {
    let mut rx: Vec<Instant> = recs.iter().filter_map(|p| p.received).filter(|t| *t < to).collect();
    rx.sort_unstable();
    let after = rx.partition_point(|t| *t < from);
    let first = rx.get(after).map(|t| *t - from);
    let start = after.checked_sub(1).map_or(from, |i| rx[i]);
    let end = rx.get(after..).unwrap_or(&[]);
    let gap = std::iter::once(start).chain(end.iter().copied()).collect::<Vec<_>>().windows(2).map(|w| w[1] - w[0]).max();
    (first, gap.unwrap_or(to - from))
}

/// What one size measured.
#[derive(Debug, Default, Clone)]
pub struct Sized {
    pub n: usize,
    pub startup: Duration,
    pub startup_internal_ms: u64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    /// Of `rss_kib`, the agent's own memory (`RssAnon`).
    pub anon_kib: u64,
    pub map_bytes: u64,
    /// The first pull, 1 s after "agent up": event received - pull, and pull - maps written.
    pub first_pull_seen: Duration,
    pub first_pull_handled: Duration,
    pub dataplane_ns: Vec<f64>,
    pub maps_ns: Vec<f64>,
    /// Per pull and sampled VIP: the longest silence in its replies (outage).
    pub outage_ns: Vec<f64>,
    /// Per plug and sampled VIP: the longest silence while the adapters come back.
    pub return_ns: Vec<f64>,
    pub status: Vec<Duration>,
    pub status_bytes: usize,
    pub pulls: usize,
    /// Failovers expected (a pulled adapter) and not in the agent's log.
    pub missed: usize,
    /// Failovers on a pull whose decision was prepared ahead, of all logged.
    pub prepared: (usize, usize),
    /// The agent's maps (name, type, entries, bytes).
    pub maps: Vec<(String, String, u64, u64)>,
}

/// Runs one size: start, memory, the first pull 1 s after ready, `pulls` more, status.
pub fn measure(n: usize, pulls: usize, object: &[u8]) -> Sized {
    let sl = ScaleLab::new(n, object, true);
    let _echo = EchoServer::start(&sl.lab.node, ECHO_PORT).expect("echo");
    let (agent, startup) = sl.start();
    let ready = Instant::now();
    let pid = agent.child.id();
    let (internal, _) = agent_up(&agent.log_text());
    let sw = sl.lab.switch.as_ref().expect("bridged");
    let vips = sample(n, 8);
    // Resolve before the pull (ARP, a few ms) but pull 1 s after ready.
    let used = sl.used_adapters(&vips);
    let mut ports: Vec<Port> = used.iter().map(|&j| Port::new(sw, &sl.lab.adapters[j].peer)).collect();
    let probers: Vec<Prober> = vips
        .iter()
        .map(|v| Prober::start(&sl.lab.clients[0].ns, SocketAddr::new(*v, ECHO_PORT), Duration::from_millis(1)).expect("prober"))
        .collect();
    std::thread::sleep(Duration::from_secs(1).saturating_sub(ready.elapsed()));
    let mut windows = vec![];
    let pull = |ports: &mut Vec<Port>, windows: &mut Vec<(Instant, Instant, u64)>| {
        let (t, real) = (Instant::now(), realtime_ns());
        for p in ports.iter_mut() {
            p.set(false);
        }
        std::thread::sleep(Duration::from_millis(250));
        let back = Instant::now();
        for p in ports.iter_mut() {
            p.set(true);
        }
        std::thread::sleep(Duration::from_millis(250));
        windows.push((t, back, real));
    };
    for _ in 0..=pulls {
        pull(&mut ports, &mut windows);
    }
    let recs: Vec<Vec<Probe>> = probers.into_iter().map(|p| p.stop()).collect();
    let (rss, peak) = rss_kib(pid);
    let anon = anon_kib(pid);
    let map_bytes = map_memory(pid);
    let maps = maps_of(pid);
    let mut status = vec![];
    let mut status_bytes = 0;
    for _ in 0..3 {
        let (d, b) = status_time(&sl.files.socket);
        status.push(d);
        status_bytes = b;
    }
    let log = agent.log_text();
    let downs: Vec<_> = failovers(&log).into_iter().filter(|f| f.0 == "down").collect();
    // Each pull's failovers: events received within its window.
    let mut missed = 0;
    for (_, _, real) in &windows {
        let n = downs.iter().filter(|f| f.1 >= *real && f.1 < real + 250_000_000).count();
        missed += used.len().saturating_sub(n);
    }
    if missed > 0 {
        eprintln!("{missed} of {} expected failovers not logged", windows.len() * used.len());
    }
    let first = downs.iter().find(|f| f.1 >= windows[0].2).cloned().expect("the first pull's failover");
    let first_pull_seen = Duration::from_nanos(first.1.saturating_sub(windows[0].2));
    let first_pull_handled = Duration::from_nanos((first.1 + first.3).saturating_sub(windows[0].2));
    let mut outage_ns = vec![];
    let mut return_ns = vec![];
    for (i, (from, to, _)) in windows.iter().enumerate() {
        for (v, r) in vips.iter().zip(&recs) {
            let (first, gap) = recovery(r, *from, *to);
            assert!(first.is_some(), "{v} never answered after pull {i} of {n} VIPs");
            if gap > Duration::from_millis(50) {
                eprintln!("pull {i}: {v} silent for {gap:?}");
            }
            outage_ns.push(gap.as_nanos() as f64);
            // From the plug to the next pull (or the end): the adapter's return.
            let next = windows.get(i + 1).map_or(*to + Duration::from_millis(250), |w| w.0);
            let (_, back) = recovery(r, *to, next);
            return_ns.push(back.as_nanos() as f64);
        }
    }
    let (peak_after_status, _) = (rss_kib(pid).1, ());
    assert!(agent.stop().success());
    Sized {
        n,
        startup,
        startup_internal_ms: internal,
        rss_kib: rss,
        peak_rss_kib: peak.max(peak_after_status),
        anon_kib: anon,
        map_bytes,
        first_pull_seen,
        first_pull_handled,
        dataplane_ns: downs.iter().map(|f| f.2 as f64).collect(),
        maps_ns: downs.iter().map(|f| f.3 as f64).collect(),
        prepared: (downs.iter().filter(|f| f.4).count(), downs.len()),
        outage_ns,
        return_ns,
        status,
        status_bytes,
        pulls: windows.len(),
        missed,
        maps,
    }
}

/// The agent's BPF maps: (name, type, max entries, kernel memory in bytes), each once.
pub fn maps_of(pid: u32) -> Vec<(String, String, u64, u64)> {
    use vip_common::*;
    let known: Vec<(&str, u32, u32, u32)> = vec![
        // (name, key size, value size, max entries)
        ("VIPS", 20, 16, MAX_VIPS),
        ("POLICIES", 4, 8, MAX_POLICIES),
        ("BUCKETS", 4, 8, BUCKETS_LEN),
        ("ANSWERS", 4, 8, ANSWERS_LEN),
        ("ADAPTERS", 4, 16, MAX_IFINDEX),
        ("FLOWS", 36, 48, MAX_FLOWS),
        ("MACS", 8, 4, MAX_ADAPTERS),
        ("TRAFFIC", 4, 40, MAX_ADAPTERS),
        ("EGRESS", 4, 8, egress::COUNT),
        ("DECISIONS", 4, 8, decision::COUNT),
        ("VSERVERS", 4, 8, MAX_VSERVERS),
        ("VS_MACS", 4, 8, MAX_VSERVERS),
        ("EVENTS", 0, 0, EVENTS_BYTES),
    ];
    let mut seen = std::collections::HashSet::new();
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for e in rd.flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(Path::new("anon_inode:bpf-map")) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap_or_default();
        let get = |k: &str| -> u64 {
            info.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        if !seen.insert(get("map_id:")) {
            continue;
        }
        let (ty, k, v, n) = (get("map_type:"), get("key_size:") as u32, get("value_size:") as u32, get("max_entries:") as u32);
        let name = match ty {
            14 => "VSERVERS",
            _ => known.iter().find(|x| x.0 != "VSERVERS" && (x.1, x.2, x.3) == (k, v, n)).map_or("?", |x| x.0),
        };
        let ty = match ty {
            1 => "hash",
            2 => "array",
            6 => "per-CPU array",
            9 => "LRU hash",
            14 => "device map",
            27 => "ring buffer",
            t => return_unknown(t),
        };
        out.push((name.to_string(), ty.to_string(), n as u64, get("memlock:")));
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.3));
    out
}

fn return_unknown(_t: u64) -> &'static str {
    "other"
}

fn mb(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// The Markdown report (and, with `write`, the plot `scale.svg` beside that file).
pub fn report(results: &[Sized], write: Option<&str>, maps: &[(String, String, u64, u64)]) -> String {
    use crate::bench::{dist, machine};
    let mut r = format!("## Many VIPs on one agent (`cargo xtask bench scale`)\n\nMachine: {}\n\n", machine());
    r += "The lab's node (3 adapters on a bridge), half the VIPs IPv4 (a range in 10.1.0.0/16) and half IPv6 \
          (2001:db8:1::/64), the default configuration (spread, MAC move; conflict probes on, one per VIP). A \
          client probes up to 16 VIPs spread over both ranges (UDP echo every 1 ms each; 3 with 3 VIPs). For each size: the agent is \
          started; 1 s after it says \"agent up\" the cable of each adapter the client uses is pulled (switch \
          port down, in-process netlink), plugged back 250 ms later, and again, ";
    r += &format!("{} pulls in all per size. Start-up is spawn to \"agent up\" seen in its log (its own count in brackets). \
                   RSS is the agent's resident memory after the pulls (peak over the run, status requests included); \
                   *own* is the part of it that is the agent's own memory (`RssAnon`): the rest is its binary and \
                   the BPF maps it memory-maps (about 14.4 MB: `VIP_TABLE`, `BUCKETS`, `ANSWERS`, `ADAPTERS`, \
                   `VIP_FILTER`, `POLICIES`), whose pages are the maps' kernel memory, counted again under BPF maps. \
                   Map memory is the kernel's `memlock` for the agent's BPF maps. Event times come from the agent's \
                   log (netlink event received to the adapter's entry written: *data plane*; to every map write of \
                   the decision: *maps*). The outage is the longest silence in each sampled VIP's replies from the \
                   pull to the plug (every VIP answered again after every pull). Status is `vip-agent status --json` \
                   run as a command.\n\n",
        results.first().map_or(0, |x| x.pulls));
    r += "| VIPs | start-up | RSS MB (peak) | own MB | BPF maps MB | first pull, 1 s after ready: seen / maps written | event -> data plane p50 / p99 | event -> maps written p50 / p99 | client outage p50 / p99 / max | on return p99 / max | status (size) |\n";
    r += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for x in results {
        let (dp, mw, out) = (dist(x.dataplane_ns.clone()), dist(x.maps_ns.clone()), dist(x.outage_ns.clone()));
        let st = dist(x.status.iter().map(|d| d.as_nanos() as f64).collect());
        let back = dist(x.return_ns.clone());
        r += &format!(
            "| {} | {:.2} s ({} ms) | {:.1} ({:.1}) | {:.1} | {:.1} | {:.2} ms / {:.2} ms | {:.1} / {:.1} µs | {:.1} / **{:.1}** µs | {:.1} / **{:.1}** / {:.1} ms | {:.1} / {:.1} ms | {:.0} ms ({:.1} MB) |\n",
            x.n,
            x.startup.as_secs_f64(),
            x.startup_internal_ms,
            x.rss_kib as f64 / 1024.0,
            x.peak_rss_kib as f64 / 1024.0,
            x.anon_kib as f64 / 1024.0,
            mb(x.map_bytes as f64),
            x.first_pull_seen.as_secs_f64() * 1e3,
            x.first_pull_handled.as_secs_f64() * 1e3,
            dp.median / 1e3,
            dp.p99 / 1e3,
            mw.median / 1e3,
            mw.p99 / 1e3,
            out.median / 1e6,
            out.p99 / 1e6,
            out.max / 1e6,
            back.p99 / 1e6,
            back.max / 1e6,
            st.median / 1e6,
            mb(x.status_bytes as f64),
        );
    }
    let big = results.iter().max_by_key(|x| x.n);
    let missed: usize = results.iter().map(|x| x.missed).sum();
    r += &format!("\nFailovers logged for the pulls: all but {missed}. ");
    let (p, all) = results.iter().fold((0, 0), |(p, a), x| (p + x.prepared.0, a + x.prepared.1));
    r += &format!(
        "Decisions prepared ahead (a pull takes the ports of every adapter the clients use down \
         within microseconds: the first change and the next were prepared): {p} of {all}.\n"
    );
    if let Some(x) = big {
        let mw = dist(x.maps_ns.clone());
        let out = dist(x.outage_ns.clone());
        let ok = |b: bool| if b { "met" } else { "**not met**" };
        r += &format!(
            "\nTargets at {} VIPs: event -> maps written p99 under 50 µs: {:.1} µs, {}; a pull 1 s after ready handled \
             within 50 ms: {:.2} ms, {}; sampled clients answered through a survivor within 100 ms (p99): {:.1} ms, {}; \
             start-up under 5 s: {:.2} s, {}; agent RSS under 64 MB: {:.1} MB (peak {:.1}), {}.\n",
            x.n,
            mw.p99 / 1e3,
            ok(mw.p99 < 50_000.0),
            x.first_pull_handled.as_secs_f64() * 1e3,
            ok(x.first_pull_handled < Duration::from_millis(50)),
            out.p99 / 1e6,
            ok(out.p99 < 100e6),
            x.startup.as_secs_f64(),
            ok(x.startup < Duration::from_secs(5)),
            x.rss_kib as f64 / 1024.0,
            x.peak_rss_kib as f64 / 1024.0,
            ok(x.rss_kib < 64 * 1024),
        );
    }
    if !maps.is_empty() {
        r += "\nThe agent's BPF maps (sized for 131,072 VIPs whatever the configuration; the same at every size):\n\n\
              | map | type | entries | kernel memory |\n|---|---|---|---|\n";
        for (name, ty, n, bytes) in maps {
            r += &format!("| {name} | {ty} | {n} | {:.2} MB |\n", mb(*bytes as f64));
        }
        r += &format!("| all | | | **{:.1} MB** |\n", mb(maps.iter().map(|m| m.3 as f64).sum()));
    }
    if let Some(path) = write {
        let svg = plot(results);
        let file = Path::new(path).with_file_name("scale.svg");
        std::fs::write(&file, svg).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
        r += "\n![Start-up, memory, event to maps written and client outage against the number of VIPs](scale.svg)\n";
    }
    r
}

/// Four panels against the number of VIPs (log scale): start-up, RSS, event -> maps
/// written (p50 and p99), client outage (p50 and p99), each with its target.
fn plot(results: &[Sized]) -> String {
    use crate::bench::dist;
    let (w, h) = (900.0, 560.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let xs: Vec<f64> = results.iter().map(|x| (x.n as f64).log10()).collect();
    let (xmin, xmax) = (xs.iter().cloned().fold(f64::MAX, f64::min) - 0.2, xs.iter().cloned().fold(f64::MIN, f64::max) + 0.2);
    type Series = Vec<(&'static str, &'static str, Vec<f64>)>;
    let panels: Vec<(&str, &str, f64, Series)> = vec![
        ("start-up", "s", 5.0, vec![("spawn to up", "#1f77b4", results.iter().map(|x| x.startup.as_secs_f64()).collect())]),
        (
            "agent RSS",
            "MB",
            64.0,
            vec![
                ("after pulls", "#1f77b4", results.iter().map(|x| x.rss_kib as f64 / 1024.0).collect()),
                ("peak", "#ff7f0e", results.iter().map(|x| x.peak_rss_kib as f64 / 1024.0).collect()),
            ],
        ),
        (
            "event to maps written",
            "µs",
            50.0,
            vec![
                ("p50", "#1f77b4", results.iter().map(|x| dist(x.maps_ns.clone()).median / 1e3).collect()),
                ("p99", "#ff7f0e", results.iter().map(|x| dist(x.maps_ns.clone()).p99 / 1e3).collect()),
            ],
        ),
        (
            "client outage (sampled VIPs)",
            "ms",
            100.0,
            vec![
                ("p50", "#1f77b4", results.iter().map(|x| dist(x.outage_ns.clone()).median / 1e6).collect()),
                ("p99", "#ff7f0e", results.iter().map(|x| dist(x.outage_ns.clone()).p99 / 1e6).collect()),
            ],
        ),
    ];
    for (k, (title, unit, target, series)) in panels.iter().enumerate() {
        let (px, py) = (60.0 + (k % 2) as f64 * 440.0, 30.0 + (k / 2) as f64 * 270.0);
        let (pw, ph) = (380.0, 200.0);
        let ymax = series.iter().flat_map(|s| s.2.iter()).cloned().fold(*target, f64::max) * 1.15;
        let x = |v: f64| px + (v - xmin) / (xmax - xmin) * pw;
        let y = |v: f64| py + ph - v / ymax * ph;
        s += &format!("<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{title} ({unit})</text>\n", px, py - 8.0);
        s += &format!("<rect x=\"{px}\" y=\"{py}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>\n");
        for t in 0..=4 {
            let v = ymax * t as f64 / 4.0;
            s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#555\">{:.1}</text>\n", px - 4.0, y(v) + 4.0, v);
        }
        for (i, n) in results.iter().map(|r| r.n).enumerate() {
            s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>\n", x(xs[i]), py + ph + 16.0, n);
        }
        s += &format!(
            "<line x1=\"{px}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#d62728\" stroke-dasharray=\"5,4\"/>\
             <text x=\"{}\" y=\"{}\" fill=\"#d62728\" text-anchor=\"end\">target {target}</text>\n",
            px + pw, y(*target), y(*target), px + pw - 4.0, y(*target) - 4.0
        );
        for (j, (label, color, vals)) in series.iter().enumerate() {
            let pts: Vec<String> = vals.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(xs[i]), y(*v))).collect();
            s += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\n", pts.join(" "));
            for (i, v) in vals.iter().enumerate() {
                s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n", x(xs[i]), y(*v));
            }
            s += &format!("<text x=\"{}\" y=\"{}\" fill=\"{color}\">{label}</text>\n", px + 8.0, py + 16.0 + 14.0 * j as f64);
        }
    }
    s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#333\">VIPs (log scale)</text>\n</svg>\n", w / 2.0, h - 6.0);
    s
}
