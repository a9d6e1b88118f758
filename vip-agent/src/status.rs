//! What `vip-agent status` shows and the metrics endpoint exports, as plain data.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vip_placement::{slots, Assignment, Classes, Run, BUCKETS, NO_SLOT};

use crate::{
    agent::{flow_client, flow_vip, monotonic_ns, Agent, ClientIndex, VipSpec},
    dataplane::Counters,
};

/// Fixed log-spaced buckets in nanoseconds (1 µs .. 10 s), Prometheus-style cumulative.
pub const BUCKETS_NS: &[u64] = &[
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000,
    10_000_000, 50_000_000, 100_000_000, 1_000_000_000, 10_000_000_000,
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// Count per bucket in `BUCKETS_NS` (not cumulative), then the overflow bucket.
    pub counts: Vec<u64>,
    pub sum_ns: u64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, ns: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS_NS.len() + 1];
        }
        let i = BUCKETS_NS.iter().position(|b| ns <= *b).unwrap_or(BUCKETS_NS.len());
        self.counts[i] += 1;
        self.sum_ns += ns;
        self.count += 1;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterStatus {
    pub name: String,
    pub ifindex: Option<u32>,
    pub mac: Option<String>,
    pub slot: u8,
    /// up, down, hold-down, up-delay, missing
    pub state: String,
    /// Unix time (seconds) of the last state change.
    pub since: f64,
    /// VIPs it answers right now.
    pub vips: usize,
    /// None: no limit.
    pub max_vips: Option<u32>,
    /// ARP replies and NAs it sent (for any VIP), counted by the data plane.
    #[serde(default)]
    pub answers: u64,
    /// Share of spread-mode clients.
    #[serde(default)]
    pub weight: u32,
    /// VIP traffic through it (bytes/s in and out), as last sampled: its load.
    #[serde(default)]
    pub load_bytes_per_s: f64,
    /// While down: the adapter taking its stragglers (and its MAC, with `mac_moved`).
    #[serde(default)]
    pub heir: Option<String>,
    #[serde(default)]
    pub mac_moved: bool,
    /// VIP frames in and out, counted by the data plane.
    #[serde(default)]
    pub rx_packets: u64,
    #[serde(default)]
    pub tx_packets: u64,
}

/// A virtual server (seed 004): where its VIPs are delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VserverStatus {
    pub name: String,
    pub interface: String,
    /// The virtual server's own MAC, once learned from its frames.
    pub mac: Option<String>,
    pub vips: Vec<String>,
}

/// One entry of the client table: a client talking to a VIP through an adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientStatus {
    pub vip: String,
    pub vlan: u16,
    pub client: String,
    pub mac: String,
    /// The adapter whose MAC it uses (its replies leave there).
    pub adapter: String,
    pub idle_s: f64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipStatus {
    pub address: String,
    pub vlan: u16,
    pub id: u32,
    /// active or refused
    pub state: String,
    pub failover: bool,
    /// Adapters answering for it right now (healthy and allowed).
    pub answering: Vec<String>,
    /// Adapters it was moved to because all of its own are down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taken_over_by: Vec<String>,
    /// ARP replies / NAs sent for it by the data plane (all adapters).
    pub answers: u64,
    /// all, primary or spread
    #[serde(default)]
    pub mode: String,
    /// Its placement group (an index into `groups`, which has its spread buckets).
    #[serde(default)]
    pub group: Option<u32>,
}

/// VIPs placed alike (a run of one placement class): how placement sees them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    pub first: String,
    pub last: String,
    pub count: u32,
    pub vlan: u16,
    pub mode: String,
    /// Its own adapters, in order.
    pub adapters: Vec<String>,
    pub answering: Vec<String>,
    /// Taken over by adapters that are not its own.
    pub away: bool,
    /// Nobody may answer it.
    pub stranded: bool,
    #[serde(default)]
    pub buckets: Vec<(String, u32)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverStatus {
    /// Unix time (seconds) of the netlink event.
    pub at: f64,
    pub adapter: String,
    /// down, up, removed
    pub kind: String,
    pub vips: usize,
    /// Netlink event received to maps written.
    pub maps_written_ns: u64,
    /// Netlink event received to the adapter's entry written (it stops answering).
    #[serde(default)]
    pub dataplane_ns: u64,
    /// The decision was prepared ahead (the event only applied it).
    #[serde(default)]
    pub prepared: bool,
    /// Netlink event received to the first announcement sent; none if nothing to announce.
    pub first_announcement_ns: Option<u64>,
    pub announced_from: Vec<String>,
    /// Matches the announcer's reports to this record (internal).
    #[serde(skip)]
    pub tag: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub at: f64,
    /// The (first) VIP refused.
    pub vip: String,
    /// VIPs refused alike with it (a range of one placement group).
    #[serde(default = "one")]
    pub count: u32,
    pub adapter: Option<String>,
    pub reason: String,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub config: String,
    pub pin_path: String,
    pub started: f64,
    /// True when the program and maps were adopted from a previous agent.
    pub adopted: bool,
    pub adapters: Vec<AdapterStatus>,
    pub vips: Vec<VipStatus>,
    /// The VIPs by placement group (what `status` shows when there are many).
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    pub failovers: Vec<FailoverStatus>,
    pub refusals: Vec<Refusal>,
    /// Refusals ever made (`refusals` keeps the last few).
    #[serde(default)]
    pub refusals_total: u64,
    /// Announcements and corrections the kernel refused to send.
    #[serde(default)]
    pub send_errors: u64,
    pub decisions: Vec<(String, u64)>,
    pub announcements_sent: u64,
    pub announcements_queued: u64,
    /// Corrections not queued: the announcer's queue was full.
    #[serde(default)]
    pub announcements_dropped: u64,
    pub maps_written: Histogram,
    pub first_announcement: Histogram,
    /// The client table (at most `CLIENTS_SHOWN`, most recently seen first).
    #[serde(default)]
    pub clients: Vec<ClientStatus>,
    #[serde(default)]
    pub clients_total: usize,
    /// Egress steering decisions.
    #[serde(default)]
    pub egress: Vec<(String, u64)>,
    /// Unicast ARP replies / NAs telling a client its new adapter (failover, rebalance).
    #[serde(default)]
    pub clients_moved: u64,
    /// Unicast corrections sent to stragglers.
    #[serde(default)]
    pub corrections_sent: u64,
    #[serde(default)]
    pub virtual_servers: Vec<VserverStatus>,
    /// Times the agent re-read the host's addresses and routes after a change (its own
    /// VIP routes never cause one).
    #[serde(default)]
    pub host_reads: u64,
    /// Live reloads applied since the process started.
    #[serde(default)]
    pub reloads: u64,
}

/// Clients listed in a status (the total is always given).
pub const CLIENTS_SHOWN: usize = 1000;
/// With more VIPs than this the metrics have a series per group, not per VIP (a series
/// per VIP would swamp a Prometheus server), and `status` lists groups.
pub const PER_VIP_MAX: usize = 1024;

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Status {
    /// The figures in Prometheus text format.
    /// Only what concerns one VIP and/or one adapter (`status --vip`, `--adapter`): the
    /// adapters, VIPs, groups, clients, failovers and refusals that name them.
    pub fn filtered(mut self, vip: Option<std::net::IpAddr>, adapter: Option<&str>) -> Status {
        if let Some(a) = adapter {
            self.adapters.retain(|x| x.name == a);
            self.vips.retain(|v| v.answering.iter().any(|x| x == a) || v.taken_over_by.iter().any(|x| x == a));
            self.groups.retain(|g| g.adapters.iter().any(|x| x == a) || g.answering.iter().any(|x| x == a));
            self.clients.retain(|c| c.adapter == a);
            self.failovers.retain(|f| f.adapter == a);
            self.refusals.retain(|r| r.adapter.as_deref() == Some(a));
        }
        if let Some(ip) = vip {
            let s = ip.to_string();
            // A group is a run of VIPs placed alike: its ends, or between them when both
            // are of the VIP's family (a run may mix families).
            let within = |g: &GroupStatus| match (g.first.parse::<std::net::IpAddr>(), g.last.parse::<std::net::IpAddr>()) {
                (Ok(f), Ok(l)) => f == ip || l == ip || (f.is_ipv4() == ip.is_ipv4() && l.is_ipv4() == ip.is_ipv4() && f <= ip && ip <= l),
                _ => false,
            };
            self.vips.retain(|v| v.address == s);
            self.groups.retain(within);
            let answering: Vec<String> = self.groups.iter().flat_map(|g| g.adapters.iter().cloned()).collect();
            self.adapters.retain(|a| answering.contains(&a.name));
            self.clients.retain(|c| c.vip == s);
            self.refusals.retain(|r| r.vip == s);
        }
        self
    }

    /// The human-readable form of `vip-agent status`.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "config {}  pins {}{}", self.config, self.pin_path, if self.adopted { "  (adopted)" } else { "" });
        if self.reloads > 0 {
            let _ = writeln!(o, "reloaded {} times", self.reloads);
        }
        let _ = writeln!(o, "\nADAPTER          STATE      SINCE  MAC                VIPS   WEIGHT  LOAD B/s  HEIR");
        let now = unix_now();
        for a in &self.adapters {
            let _ = writeln!(
                o,
                "{:<16} {:<10} {:>5}s {:<18} {:<6} {:>6}  {:>8.0}  {}",
                a.name,
                a.state,
                (now - a.since).max(0.0) as u64,
                a.mac.as_deref().unwrap_or("-"),
                format!("{}/{}", a.vips, a.max_vips.map_or("-".to_string(), |m| m.to_string())),
                a.weight,
                a.load_bytes_per_s,
                match &a.heir {
                    Some(h) if a.mac_moved => format!("{h} (MAC moved)"),
                    Some(h) => h.clone(),
                    None => "-".into(),
                }
            );
        }
        if self.vips.len() <= 50 {
            let _ = writeln!(o, "\nVIP                        STATE     MODE     ANSWERING ON             ANSWERS");
            for v in &self.vips {
                let addr = if v.vlan != 0 { format!("{} vlan {}", v.address, v.vlan) } else { v.address.clone() };
                let answering = if v.answering.is_empty() { "-".to_string() } else { v.answering.join(",") };
                let _ = writeln!(o, "{addr:<26} {:<9} {:<8} {answering:<24} {}", v.state, v.mode, v.answers);
                let buckets = v.group.and_then(|g| self.groups.get(g as usize)).map(|g| &g.buckets[..]).unwrap_or(&[]);
                if !buckets.is_empty() {
                    let b: Vec<String> = buckets.iter().map(|(a, n)| format!("{a}:{n}")).collect();
                    let _ = writeln!(o, "{:<26} spread buckets {}", "", b.join(" "));
                }
            }
        } else {
            let refused = self.vips.iter().filter(|v| v.state != "active").count();
            let _ = writeln!(o, "\n{} VIPs ({refused} refused) in {} groups placed alike (--json lists every VIP)", self.vips.len(), self.groups.len());
            let _ = writeln!(o, "FIRST .. LAST                                   COUNT  MODE     ANSWERING ON");
            for g in self.groups.iter().take(50) {
                let range = format!("{} .. {}{}", g.first, g.last, if g.vlan != 0 { format!(" vlan {}", g.vlan) } else { String::new() });
                let answering = if g.answering.is_empty() { "-".to_string() } else { g.answering.join(",") };
                let flag = if g.away { " (taken over)" } else if g.stranded { " (stranded)" } else { "" };
                let _ = writeln!(o, "{range:<47} {:>6}  {:<8} {answering}{flag}", g.count, g.mode);
            }
            if self.groups.len() > 50 {
                let _ = writeln!(o, "... {} more groups", self.groups.len() - 50);
            }
        }
        for v in &self.virtual_servers {
            let _ = writeln!(o, "\nVIRTUAL SERVER {} via {} (MAC {}): {}", v.name, v.interface, v.mac.as_deref().unwrap_or("not learned yet"), v.vips.join(", "));
        }
        let _ = writeln!(o, "\nCLIENTS ({} in the table; {} moved, {} straggler corrections)", self.clients_total, self.clients_moved, self.corrections_sent);
        for c in self.clients.iter().take(20) {
            let _ = writeln!(
                o,
                "{:<26} {:<26} {:<18} via {:<12} idle {:>5.1}s {:>8} pkts",
                c.client, c.vip, c.mac, c.adapter, c.idle_s, c.packets
            );
        }
        if !self.failovers.is_empty() {
            let _ = writeln!(o, "\nRECENT FAILOVERS (event -> maps written -> first announcement)");
            for f in self.failovers.iter().rev().take(10) {
                let ann = f.first_announcement_ns.map_or("-".into(), |n| format!("{:.1}µs", n as f64 / 1e3));
                let _ = writeln!(
                    o,
                    "{:<16} {:<8} {:>3} VIPs  maps {:.1}µs{}  announce {ann}  from {}",
                    f.adapter,
                    f.kind,
                    f.vips,
                    f.maps_written_ns as f64 / 1e3,
                    if f.prepared { " (prepared)" } else { "" },
                    if f.announced_from.is_empty() { "-".into() } else { f.announced_from.join(",") }
                );
            }
        }
        if !self.refusals.is_empty() {
            let _ = writeln!(o, "\nREFUSALS");
            for r in self.refusals.iter().rev().take(10) {
                let more = if r.count > 1 { format!(" (and {} more)", r.count - 1) } else { String::new() };
                let _ = writeln!(o, "{}{more} {}: {}", r.vip, r.adapter.as_deref().unwrap_or(""), r.reason);
            }
        }
        o
    }
}

/// What the event loop hands a status reader: small copies and shared, immutable parts.
/// Turning it into a [`Status`] (per VIP, with counters) happens on the reader's side.
pub struct Snapshot {
    pub config: String,
    pub pin_path: String,
    pub started: f64,
    pub adopted: bool,
    pub adapters: Vec<AdapterStatus>,
    pub vips: Arc<Vec<VipSpec>>,
    pub pvips: Arc<Vec<vip_placement::Vip>>,
    pub active: Arc<Vec<bool>>,
    pub classes: Arc<Classes>,
    pub assignment: Arc<Assignment>,
    pub failovers: Vec<FailoverStatus>,
    pub refusals: Vec<Refusal>,
    pub refusals_total: u64,
    pub maps_written: Histogram,
    pub first_announcement: Histogram,
    pub announcements_sent: u64,
    pub announcements_queued: u64,
    pub announcements_dropped: u64,
    pub send_errors: u64,
    pub clients: Arc<ClientIndex>,
    pub clients_moved: u64,
    pub corrections_sent: u64,
    /// (name, interface, VIP indexes).
    pub vservers: Vec<(String, String, Vec<usize>)>,
    pub host_reads: u64,
    pub reloads: u64,
}

impl Agent {
    pub fn snapshot(&self) -> Snapshot {
        let up = self.assignment.up;
        let mut answered = vec![0usize; self.adapters.len()];
        for r in self.assignment.classes.iter().flat_map(|p| &p.runs) {
            for s in slots(r.allowed & up) {
                if let Some(n) = answered.get_mut(s as usize) {
                    *n += r.len as usize;
                }
            }
        }
        let adapters = self
            .adapters
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let heir = if a.health.answers() { None } else { self.assignment.heirs.get(i).copied().flatten() };
                AdapterStatus {
                    name: a.name.clone(),
                    ifindex: a.ifindex,
                    mac: a.mac.map(|m| vip_packet::mac_str(&m)),
                    slot: a.slot,
                    state: a.health.name().into(),
                    since: a.since,
                    vips: answered[i],
                    max_vips: self.padapters[i].max_vips,
                    answers: 0,
                    weight: self.padapters[i].weight,
                    load_bytes_per_s: self.padapters[i].load,
                    heir: heir.map(|h| self.adapters[h as usize].name.clone()),
                    mac_moved: heir.is_some() && a.move_mac,
                    rx_packets: 0,
                    tx_packets: 0,
                }
            })
            .collect();
        Snapshot {
            config: self.cfg.path.display().to_string(),
            pin_path: self.cfg.agent.pin_path.display().to_string(),
            started: self.started,
            adopted: self.adopted,
            adapters,
            vips: self.vips.clone(),
            pvips: self.pvips.clone(),
            active: self.active.clone(),
            classes: self.classes.clone(),
            assignment: self.assignment.clone(),
            failovers: self.failovers.iter().cloned().collect(),
            refusals: self.refusals.iter().cloned().collect(),
            refusals_total: self.refusals_total,
            maps_written: self.hist_maps.clone(),
            first_announcement: self.hist_announce.clone(),
            announcements_sent: self.ann.sent(),
            announcements_queued: self.ann.queued(),
            announcements_dropped: self.ann.stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
            send_errors: self.ann.stats.send_errors.load(std::sync::atomic::Ordering::Relaxed),
            clients: self.clients.clone(),
            clients_moved: self.clients_moved,
            corrections_sent: self.corrections_sent,
            vservers: self.vservers.iter().map(|v| (v.name.clone(), v.interface.clone(), v.vips.clone())).collect(),
            host_reads: self.host_reads.load(std::sync::atomic::Ordering::Relaxed),
            reloads: self.reloads,
        }
    }
}

fn bucket_counts(r: &Run, names: &[String]) -> Vec<(String, u32)> {
    let Some(b) = &r.buckets else { return vec![] };
    let mut n = vec![0u32; names.len()];
    for &s in b.iter().take(BUCKETS).filter(|&&s| s != NO_SLOT) {
        if let Some(c) = n.get_mut(s as usize) {
            *c += 1;
        }
    }
    names.iter().zip(n).filter(|(_, c)| *c > 0).map(|(a, c)| (a.clone(), c)).collect()
}

type RunNames = (u32, Vec<String>, Vec<String>);

/// What the status of every VIP is made from: the groups, and per run what its VIPs
/// share (answering adapters, takers).
struct View<'a> {
    s: &'a Snapshot,
    counters: &'a Counters,
    groups: Vec<GroupStatus>,
    /// Per class, per run: (group index, answering, taken over by).
    runs: Vec<Vec<RunNames>>,
}

impl<'a> View<'a> {
    fn new(s: &'a Snapshot, counters: &'a Counters) -> View<'a> {
        let names: Vec<String> = s.adapters.iter().map(|a| a.name.clone()).collect();
        let names_of = |m: u64| -> Vec<String> { slots(m).filter_map(|x| names.get(x as usize).cloned()).collect() };
        let up = s.assignment.up;
        let mut groups = vec![];
        let mut runs = vec![];
        for (c, class) in s.classes.list.iter().enumerate() {
            let mut rs = vec![];
            for r in s.assignment.classes.get(c).map(|p| &p.runs[..]).unwrap_or(&[]) {
                let answering = names_of(r.allowed & up);
                let away = if r.away { names_of(r.allowed) } else { vec![] };
                if r.len > 0 {
                    groups.push(GroupStatus {
                        first: s.vips[class.members[r.start as usize] as usize].addr.to_string(),
                        last: s.vips[class.members[r.end() as usize - 1] as usize].addr.to_string(),
                        count: r.len,
                        vlan: class.key.vlan,
                        mode: class.key.mode.name().into(),
                        adapters: class.key.homes.iter().filter_map(|&h| names.get(h as usize).cloned()).collect(),
                        answering: answering.clone(),
                        away: r.away,
                        stranded: r.stranded,
                        buckets: bucket_counts(r, &names),
                    });
                }
                rs.push((groups.len() as u32 - 1, answering, away));
            }
            runs.push(rs);
        }
        View { s, counters, groups, runs }
    }

    fn vip(&self, i: usize) -> VipStatus {
        let s = self.s;
        let (v, p) = (&s.vips[i], &s.pvips[i]);
        let placed = s.classes.of_vip.get(i).filter(|(c, _)| *c != u32::MAX).and_then(|&(c, pos)| {
            let run = s.assignment.classes.get(c as usize)?.runs.iter().position(|r| r.start <= pos && pos < r.end())?;
            self.runs.get(c as usize)?.get(run)
        });
        let active = s.active.get(i).copied().unwrap_or(false);
        VipStatus {
            address: v.addr.to_string(),
            vlan: v.vlan,
            id: i as u32,
            state: match (active, v.flags & vip_common::VIP_CLUSTER != 0) {
                (true, _) => "active",
                // A cluster VIP another node holds (or nobody yet).
                (false, true) => "elsewhere",
                (false, false) => "refused",
            }
            .into(),
            failover: p.failover,
            answering: placed.map(|x| x.1.clone()).unwrap_or_default(),
            taken_over_by: placed.map(|x| x.2.clone()).unwrap_or_default(),
            answers: self.counters.answers(i as u32),
            mode: p.mode.name().into(),
            group: placed.map(|x| x.0),
        }
    }

    /// Everything but the VIPs (`vips` left empty).
    fn head(&self) -> Status {
        let s = self.s;
        let counters = self.counters;
        let mut adapters = s.adapters.clone();
        for a in &mut adapters {
            let t = counters.traffic(a.slot);
            (a.rx_packets, a.tx_packets, a.answers) = (t.rx_packets, t.tx_packets, t.answers);
        }
        let by_ifindex: std::collections::HashMap<u32, String> =
            adapters.iter().filter_map(|a| Some((a.ifindex?, a.name.clone()))).collect();
        let now = monotonic_ns();
        let clients = s
            .clients
            .recent
            .iter()
            .map(|(k, f)| ClientStatus {
                vip: flow_vip(k).to_string(),
                vlan: k.vlan,
                client: flow_client(k).to_string(),
                mac: vip_packet::mac_str(&f.mac),
                adapter: by_ifindex.get(&f.ifindex).cloned().unwrap_or_else(|| format!("ifindex {}", f.ifindex)),
                idle_s: now.saturating_sub(f.seen_ns) as f64 / 1e9,
                packets: f.packets,
                bytes: f.bytes,
            })
            .collect();
        Status {
            config: s.config.clone(),
            pin_path: s.pin_path.clone(),
            started: s.started,
            adopted: s.adopted,
            adapters,
            vips: vec![],
            groups: self.groups.clone(),
            failovers: s.failovers.clone(),
            refusals: s.refusals.clone(),
            refusals_total: s.refusals_total,
            send_errors: s.send_errors,
            decisions: vip_common::decision::NAMES.iter().zip(counters.decisions()).map(|(n, v)| (n.to_string(), v)).collect(),
            announcements_sent: s.announcements_sent,
            announcements_queued: s.announcements_queued,
            announcements_dropped: s.announcements_dropped,
            maps_written: s.maps_written.clone(),
            first_announcement: s.first_announcement.clone(),
            clients,
            clients_total: s.clients.total,
            egress: vip_common::egress::NAMES.iter().zip(counters.egress()).map(|(n, v)| (n.to_string(), v)).collect(),
            clients_moved: s.clients_moved,
            corrections_sent: s.corrections_sent,
            virtual_servers: s
                .vservers
                .iter()
                .enumerate()
                .map(|(i, (name, interface, vips))| VserverStatus {
                    name: name.clone(),
                    interface: interface.clone(),
                    mac: counters.vserver_mac(i as u32).map(|m| vip_packet::mac_str(&m)),
                    vips: vips.iter().map(|&x| s.vips[x].addr.to_string()).collect(),
                })
                .collect(),
            host_reads: s.host_reads,
            reloads: s.reloads,
        }
    }
}

/// The status a reader shows: the snapshot with the data plane's counters, read through
/// `counters` (never through the event loop). With `vips` false the per-VIP list is left
/// out (the metrics of a large agent do without it).
pub fn build(s: Snapshot, counters: &Counters, vips: bool) -> Status {
    let view = View::new(&s, counters);
    let mut st = view.head();
    if vips {
        st.vips = (0..s.vips.len()).map(|i| view.vip(i)).collect();
    }
    st
}

/// Writes the status as JSON to `w`, building each VIP's entry as it goes: 100,000 VIPs
/// never sit in memory as a document.
pub fn write_json(s: &Snapshot, counters: &Counters, w: impl std::io::Write) -> serde_json::Result<()> {
    use serde::ser::{SerializeMap, SerializeSeq};
    struct Vips<'a, 'b>(&'b View<'a>);
    impl serde::Serialize for Vips<'_, '_> {
        fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            let n = self.0.s.vips.len();
            let mut seq = ser.serialize_seq(Some(n))?;
            for i in 0..n {
                seq.serialize_element(&self.0.vip(i))?;
            }
            seq.end()
        }
    }
    let view = View::new(s, counters);
    let head = serde_json::to_value(view.head())?;
    let serde_json::Value::Object(fields) = head else { unreachable!("a status is an object") };
    let mut ser = serde_json::Serializer::new(std::io::BufWriter::with_capacity(1 << 16, w));
    let mut map = serde::Serializer::serialize_map(&mut ser, Some(fields.len()))?;
    for (k, v) in &fields {
        if k == "vips" {
            map.serialize_entry(k, &Vips(&view))?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    SerializeMap::end(map)
}

/// `vip-agent cluster status` as text: the cluster information base of seed 003.
pub fn cluster_human(s: &vip_cluster::node::ClusterStatus) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let when = if s.at > 0.0 { format!("{:.3}", s.at) } else { "-".into() };
    let _ = writeln!(
        o,
        "cluster {}  revision {}  at {when}  etcd {}  leader {}",
        s.cluster,
        s.revision,
        if s.etcd_connected { "connected" } else { "UNREACHABLE (decisions frozen)" },
        s.leader.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        o,
        "this node {} (incarnation {}): answers for {:.0} ms more on the word of {}",
        s.node,
        s.incarnation,
        s.deadline_ms.max(0.0),
        s.deadline_from
    );
    let _ = writeln!(o, "\nNODE             HEALTH     ROLE     ADDRESS          HEARD    PORTS                 HOLDS");
    for n in &s.nodes {
        let heard = n.heard_ms.map_or("-".into(), |h| format!("{h:.0}ms"));
        let ports: Vec<String> = n.ports.iter().map(|(p, up)| format!("{p}:{}", if *up { "up" } else { "down" })).collect();
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:<8} {:<16} {:<8} {:<21} {}",
            n.name,
            n.health,
            n.role,
            n.address,
            heard,
            ports.join(","),
            n.holding.join(",")
        );
    }
    if s.nodes.iter().any(|n| n.group.is_some() || n.partner.is_some()) {
        let pairs: Vec<String> = s
            .nodes
            .iter()
            .filter(|n| n.group.is_some() || n.partner.is_some())
            .map(|n| format!("{} (group {}, partner {})", n.name, n.group.as_deref().unwrap_or("-"), n.partner.as_deref().unwrap_or("-")))
            .collect();
        let _ = writeln!(o, "failover groups: {}", pairs.join(", "));
    }
    let _ = writeln!(o, "\nVIPS (first address, count)       ANSWERED BY      HOME             SERVER");
    for g in &s.groups {
        let _ = writeln!(
            o,
            "{:<24} {:>8}  {:<16} {:<16} {}",
            g.address,
            g.count,
            g.owner.as_deref().unwrap_or("-"),
            g.home.as_deref().unwrap_or("-"),
            g.server.as_deref().unwrap_or("-")
        );
    }
    if !s.servers.is_empty() {
        let _ = writeln!(o, "\nVIRTUAL SERVERS   PRIORITY  MIGRATE  HOME             ON               GROUPS");
        for v in &s.servers {
            let _ = writeln!(
                o,
                "{:<17} {:>8}  {:<7}  {:<16} {:<16} {}",
                v.name,
                v.priority,
                if v.migrate { "yes" } else { "no" },
                v.home.as_deref().unwrap_or("-"),
                v.owner.as_deref().unwrap_or("-"),
                v.groups.join(",")
            );
        }
    }
    if !s.takeovers.is_empty() {
        let _ = writeln!(o, "\nRECENT TAKEOVERS (from the node's last heartbeat: suspected, decided, answered by the new owner)");
        for t in s.takeovers.iter().rev().take(10) {
            let base = if t.silent_since > 0.0 { t.silent_since } else { t.suspected_at };
            let rel = |x: f64| if base > 0.0 && x > 0.0 { format!("+{:.0}ms", (x - base) * 1e3) } else { "-".into() };
            let _ = writeln!(
                o,
                "{:<16} {:<10} {} groups ({} VIPs) -> {}  suspected {}  decided {}  answered {}{}  by {}",
                t.node,
                t.reason,
                t.groups,
                t.vips,
                t.to.join(","),
                rel(t.suspected_at),
                rel(t.decided_at),
                rel(t.answered_at),
                if t.hooks_ms > 0.0 { format!(" (hooks {:.0}ms of it)", t.hooks_ms) } else { String::new() },
                t.leader
            );
        }
    }
    if !s.hooks.is_empty() || !s.failed_here.is_empty() {
        let _ = writeln!(o, "\nHOOKS ON THIS NODE (last runs)");
        if !s.failed_here.is_empty() {
            let _ = writeln!(o, "failed here (kept off this node for a while): {}", s.failed_here.join(", "));
        }
        for r in s.hooks.iter().rev().take(10) {
            let last = r.output.lines().last().unwrap_or("");
            let _ = writeln!(o, "{:<16} {:<8} {:<6} {:>7.0}ms  {}  {}", r.server, r.hook.name(), if r.ok { "ok" } else { "FAILED" }, r.ms, r.outcome, last);
        }
    }
    o
}

/// The cluster's Prometheus metrics, as this node sees it.
#[cfg(test)]
mod cluster_tests {
    use vip_cluster::node::{ClusterStatus, NodeStatus};

    #[test]
    fn cluster_metrics_name_every_node_and_the_deadline() {
        let s = ClusterStatus {
            node: "n0".into(),
            i_lead: true,
            etcd_connected: true,
            deadline_ms: 62.5,
            holding: vec!["192.0.2.50".into()],
            nodes: vec![
                NodeStatus { name: "n0".into(), health: "active".into(), heard_ms: Some(0.0), ..Default::default() },
                NodeStatus { name: "n1".into(), health: "failed".into(), heard_ms: Some(1500.0), ..Default::default() },
            ],
            takeovers: vec![vip_cluster::records::TakeoverRecord {
                node: "n1".into(),
                silent_since: 100.0,
                suspected_at: 100.1,
                decided_at: 100.11,
                answered_at: 100.12,
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = crate::metrics::encode(Default::default(), Some(s));
        for line in [
            "vip_cluster_leader 1",
            "vip_cluster_etcd_connected 1",
            "vip_cluster_deadline_seconds 0.0625",
            "vip_cluster_groups_held 1",
            "vip_cluster_node_health{node=\"n1\",health=\"failed\"} 1",
            "vip_cluster_peer_heard_seconds{node=\"n1\"} 1.5",
        ] {
            assert!(m.lines().any(|l| l == line), "no {line:?} in:\n{m}");
        }
        for (phase, want) in [("suspected", 0.1), ("decided", 0.11), ("answered", 0.12)] {
            let head = format!("vip_cluster_last_takeover_seconds{{phase=\"{phase}\"}} ");
            let v: f64 = m.lines().find_map(|l| l.strip_prefix(&head)).unwrap_or_else(|| panic!("no {head:?} in:\n{m}")).parse().unwrap();
            assert!((v - want).abs() < 1e-9, "{phase}: {v}");
        }
        assert!(!m.contains("vip_cluster_peer_heard_seconds{node=\"n0\"}"), "a node does not hear itself");
    }
}

#[cfg(test)]
mod dashboard_tests {
    /// Every metric the shipped Grafana dashboard queries is one the agent exports (its
    /// HELP/TYPE lines are written whatever the data).
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/vip-dashboard.json");
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut exprs = vec![];
        for p in dash["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().expect("targets") {
                exprs.push(t["expr"].as_str().expect("expr").to_string());
            }
        }
        for v in dash["templating"]["list"].as_array().unwrap() {
            if let Some(q) = v["query"].as_str() {
                exprs.push(q.to_string());
            }
        }
        // A cluster that has seen a takeover (its phases are exported only then).
        let cluster = vip_cluster::node::ClusterStatus {
            takeovers: vec![vip_cluster::records::TakeoverRecord { suspected_at: 1.0, decided_at: 1.1, answered_at: 1.2, ..Default::default() }],
            ..Default::default()
        };
        let exported = crate::metrics::encode(Default::default(), Some(cluster));
        let mut seen = 0;
        for e in &exprs {
            for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("vip_")) {
                let name = ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
                assert!(exported.contains(&format!("# TYPE {name} ")), "the dashboard queries {word}, which the agent does not export");
                seen += 1;
            }
        }
        assert!(seen >= 15, "only {seen} metric references found");
    }
}
