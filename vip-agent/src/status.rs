//! What `vip-agent status` shows and the metrics endpoint exports, as plain data.

use serde::{Deserialize, Serialize};

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

    /// Prometheus text lines for a histogram in seconds.
    pub fn prometheus(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS_NS.iter().enumerate() {
            cum += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1e9);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {}", self.count);
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
    pub max_vips: u32,
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
    pub taken_over_by: Vec<String>,
    /// ARP replies / NAs sent by the data plane, per adapter name.
    pub answers: Vec<(String, u64)>,
    /// all, primary or spread
    #[serde(default)]
    pub mode: String,
    /// Spread mode: buckets (shares of the client hash) per adapter.
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
    /// Netlink event received to the first announcement sent; none if nothing to announce.
    pub first_announcement_ns: Option<u64>,
    pub announced_from: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub at: f64,
    pub vip: String,
    pub adapter: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub config: String,
    pub pin_path: String,
    pub started: f64,
    /// True when the program and maps were adopted from a previous agent.
    pub adopted: bool,
    pub adapters: Vec<AdapterStatus>,
    pub vips: Vec<VipStatus>,
    pub failovers: Vec<FailoverStatus>,
    pub refusals: Vec<Refusal>,
    pub decisions: Vec<(String, u64)>,
    pub announcements_sent: u64,
    pub announcements_queued: usize,
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
}

/// Clients listed in a status (the total is always given).
pub const CLIENTS_SHOWN: usize = 1000;

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Status {
    /// The figures in Prometheus text format.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "# HELP vip_adapter_up 1 if the adapter answers (up or in hold-down), else 0.\n# TYPE vip_adapter_up gauge");
        for a in &self.adapters {
            let up = matches!(a.state.as_str(), "up" | "hold-down") as u8;
            let _ = writeln!(o, "vip_adapter_up{{adapter=\"{}\",state=\"{}\"}} {up}", a.name, a.state);
        }
        let _ = writeln!(o, "# HELP vip_vip_answering Adapters answering for the VIP right now.\n# TYPE vip_vip_answering gauge");
        for v in &self.vips {
            let _ = writeln!(o, "vip_vip_answering{{vip=\"{}\",vlan=\"{}\",state=\"{}\"}} {}", v.address, v.vlan, v.state, v.answering.len());
        }
        let _ = writeln!(o, "# HELP vip_answers_total ARP replies and NAs sent by the data plane.\n# TYPE vip_answers_total counter");
        for v in &self.vips {
            for (a, n) in &v.answers {
                let _ = writeln!(o, "vip_answers_total{{vip=\"{}\",vlan=\"{}\",adapter=\"{a}\"}} {n}", v.address, v.vlan);
            }
        }
        let _ = writeln!(o, "# HELP vip_decisions_total Frames seen by the data plane, by decision.\n# TYPE vip_decisions_total counter");
        for (d, n) in &self.decisions {
            let _ = writeln!(o, "vip_decisions_total{{decision=\"{d}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP vip_failovers_total Adapter state changes acted on.\n# TYPE vip_failovers_total counter");
        let _ = writeln!(o, "vip_failovers_total {}", self.maps_written.count);
        let _ = writeln!(o, "# HELP vip_refusals_total VIP placements refused.\n# TYPE vip_refusals_total counter");
        let _ = writeln!(o, "vip_refusals_total {}", self.refusals.len());
        let _ = writeln!(o, "# HELP vip_announcements_sent_total Gratuitous ARPs and unsolicited NAs sent.\n# TYPE vip_announcements_sent_total counter");
        let _ = writeln!(o, "vip_announcements_sent_total {}", self.announcements_sent);
        let _ = writeln!(o, "# HELP vip_egress_total Frames leaving adapters, by egress steering decision.\n# TYPE vip_egress_total counter");
        for (d, n) in &self.egress {
            let _ = writeln!(o, "vip_egress_total{{decision=\"{d}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP vip_adapter_load_bytes_per_second VIP traffic through the adapter.\n# TYPE vip_adapter_load_bytes_per_second gauge");
        for a in &self.adapters {
            let _ = writeln!(o, "vip_adapter_load_bytes_per_second{{adapter=\"{}\"}} {}", a.name, a.load_bytes_per_s);
        }
        let _ = writeln!(o, "# HELP vip_clients Entries in the client table.\n# TYPE vip_clients gauge");
        let _ = writeln!(o, "vip_clients {}", self.clients_total);
        let _ = writeln!(o, "# HELP vip_clients_moved_total Unicast updates sent to clients moved to another adapter.\n# TYPE vip_clients_moved_total counter");
        let _ = writeln!(o, "vip_clients_moved_total {}", self.clients_moved);
        let _ = writeln!(o, "# HELP vip_corrections_sent_total Unicast corrections sent to stragglers.\n# TYPE vip_corrections_sent_total counter");
        let _ = writeln!(o, "vip_corrections_sent_total {}", self.corrections_sent);
        self.maps_written.prometheus("vip_failover_maps_written_seconds", "Netlink event received to maps written.", &mut o);
        self.first_announcement
            .prometheus("vip_failover_first_announcement_seconds", "Netlink event received to first announcement sent.", &mut o);
        o
    }

    /// The human-readable form of `vip-agent status`.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "config {}  pins {}{}", self.config, self.pin_path, if self.adopted { "  (adopted)" } else { "" });
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
                format!("{}/{}", a.vips, a.max_vips),
                a.weight,
                a.load_bytes_per_s,
                match &a.heir {
                    Some(h) if a.mac_moved => format!("{h} (MAC moved)"),
                    Some(h) => h.clone(),
                    None => "-".into(),
                }
            );
        }
        let _ = writeln!(o, "\nVIP                        STATE     ANSWERING ON             ANSWERS");
        for v in &self.vips {
            let addr = if v.vlan != 0 { format!("{} vlan {}", v.address, v.vlan) } else { v.address.clone() };
            let answering = if v.answering.is_empty() { "-".to_string() } else { v.answering.join(",") };
            let answers: Vec<String> = v.answers.iter().filter(|(_, n)| *n > 0).map(|(a, n)| format!("{a}:{n}")).collect();
            let _ = writeln!(o, "{addr:<26} {:<9} {answering:<24} {}", v.state, answers.join(" "));
            if !v.buckets.is_empty() {
                let b: Vec<String> = v.buckets.iter().map(|(a, n)| format!("{a}:{n}")).collect();
                let _ = writeln!(o, "{:<26} spread buckets {}", "", b.join(" "));
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
                    "{:<16} {:<8} {:>3} VIPs  maps {:.1}µs  announce {ann}  from {}",
                    f.adapter,
                    f.kind,
                    f.vips,
                    f.maps_written_ns as f64 / 1e3,
                    if f.announced_from.is_empty() { "-".into() } else { f.announced_from.join(",") }
                );
            }
        }
        if !self.refusals.is_empty() {
            let _ = writeln!(o, "\nREFUSALS");
            for r in self.refusals.iter().rev().take(10) {
                let _ = writeln!(o, "{} {}: {}", r.vip, r.adapter.as_deref().unwrap_or(""), r.reason);
            }
        }
        o
    }
}
