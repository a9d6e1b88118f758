//! The Prometheus exposition (text format 0.0.4), encoded by `prometheus-client` from a
//! status (and the cluster's, in a cluster) at each scrape: the values live in the agent
//! and the data plane's maps, so each scrape describes them as constant metrics.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use std::sync::Arc;

use vip_cluster::node::ClusterStatus;

use crate::status::{Histogram, Status, BUCKETS_NS, PER_VIP_MAX};

/// The text a scrape gets; `cluster` adds the `vip_cluster_*` metrics.
pub fn encode(status: Arc<Status>, cluster: Option<ClusterStatus>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { status, cluster }));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug)]
struct Scrape {
    status: Arc<Status>,
    cluster: Option<ClusterStatus>,
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: `rows` of (labels, value); counters are named without `_total`
/// (the encoder adds it).
fn family<V: Into<f64>>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in rows {
        value(m.encode_family(&labels)?, ty, v.into())?;
    }
    Ok(())
}

/// Whole numbers (nearly every value) are written as integers, the rest as floats.
fn value(m: MetricEncoder, ty: MetricType, v: f64) -> Result<(), std::fmt::Error> {
    let whole = v.fract() == 0.0 && v.abs() < 9.0e15;
    match (ty, whole) {
        (MetricType::Counter, true) if v >= 0.0 => ConstCounter::new(v as u64).encode(m),
        (MetricType::Counter, _) => ConstCounter::new(v).encode(m),
        (_, true) => ConstGauge::new(v as i64).encode(m),
        (_, false) => ConstGauge::new(v).encode(m),
    }
}

/// One value without labels.
fn one(e: &mut DescriptorEncoder, name: &str, help: &str, ty: MetricType, v: impl Into<f64>) -> Result<(), std::fmt::Error> {
    value(e.encode_descriptor(name, help, None, ty)?, ty, v.into())
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let buckets: Vec<(f64, u64)> =
        BUCKETS_NS.iter().enumerate().map(|(i, b)| (*b as f64 / 1e9, h.counts.get(i).copied().unwrap_or(0))).collect();
    m.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count, &buckets, None)
}

fn l(k: &'static str, v: impl ToString) -> (&'static str, String) {
    (k, v.to_string())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let s = &self.status;
        let e = &mut e;
        // One series per adapter: its state in a label would start a new series at every
        // change (the state itself is in `vip-agent status`).
        family(
            e,
            "vip_adapter_up",
            "1 if the adapter answers (up or in hold-down), else 0",
            Gauge,
            s.adapters.iter().map(|a| (vec![l("adapter", &a.name)], u8::from(matches!(a.state.as_str(), "up" | "hold-down")))),
        )?;
        if s.vips.len() <= PER_VIP_MAX {
            family(
                e,
                "vip_vip_answering",
                "Adapters answering for the VIP right now",
                Gauge,
                s.vips.iter().map(|v| (vec![l("vip", &v.address), l("vlan", v.vlan), l("state", &v.state)], v.answering.len() as f64)),
            )?;
            family(
                e,
                "vip_answers",
                "ARP replies and NAs sent for the VIP by the data plane",
                Counter,
                s.vips.iter().map(|v| (vec![l("vip", &v.address), l("vlan", v.vlan)], v.answers as f64)),
            )?;
        }
        family(
            e,
            "vip_group_answering",
            "Adapters answering for a group of VIPs placed alike",
            Gauge,
            s.groups.iter().map(|g| (vec![l("first", &g.first), l("last", &g.last), l("vlan", g.vlan)], g.answering.len() as f64)),
        )?;
        family(
            e,
            "vip_vips",
            "VIPs configured, by state",
            Gauge,
            ["active", "refused"].map(|st| (vec![l("state", st)], s.vips.iter().filter(|v| v.state == st).count() as f64)),
        )?;
        family(
            e,
            "vip_adapter_answers",
            "ARP replies and NAs sent by the adapter",
            Counter,
            s.adapters.iter().map(|a| (vec![l("adapter", &a.name)], a.answers as f64)),
        )?;
        family(
            e,
            "vip_decisions",
            "Frames seen by the data plane, by decision",
            Counter,
            s.decisions.iter().map(|(d, n)| (vec![l("decision", d)], *n as f64)),
        )?;
        one(e, "vip_failovers", "Adapter state changes acted on", Counter, s.maps_written.count as f64)?;
        one(e, "vip_refusals", "VIP placements refused", Counter, s.refusals_total as f64)?;
        one(e, "vip_reloads", "Live reloads of the config applied", Counter, s.reloads as f64)?;
        one(e, "vip_send_errors", "Announcements and corrections the kernel refused to send", Counter, s.send_errors as f64)?;
        one(e, "vip_announcements_sent", "Gratuitous ARPs and unsolicited NAs sent", Counter, s.announcements_sent as f64)?;
        family(
            e,
            "vip_egress",
            "Frames leaving adapters, by egress steering decision",
            Counter,
            s.egress.iter().map(|(d, n)| (vec![l("decision", d)], *n as f64)),
        )?;
        family(
            e,
            "vip_adapter_load_bytes_per_second",
            "VIP traffic through the adapter",
            Gauge,
            s.adapters.iter().map(|a| (vec![l("adapter", &a.name)], a.load_bytes_per_s)),
        )?;
        one(e, "vip_clients", "Entries in the client table", Gauge, s.clients_total as f64)?;
        one(e, "vip_clients_moved", "Unicast updates sent to clients moved to another adapter", Counter, s.clients_moved as f64)?;
        one(e, "vip_corrections_sent", "Unicast corrections sent to stragglers", Counter, s.corrections_sent as f64)?;
        histogram(e, "vip_failover_maps_written_seconds", "Netlink event received to maps written", &s.maps_written)?;
        histogram(e, "vip_failover_first_announcement_seconds", "Netlink event received to first announcement sent", &s.first_announcement)?;
        if let Some(c) = &self.cluster {
            cluster(e, c)?;
        }
        Ok(())
    }
}

fn cluster(e: &mut DescriptorEncoder, s: &ClusterStatus) -> Result<(), std::fmt::Error> {
    use MetricType::Gauge;
    one(e, "vip_cluster_leader", "1 if this node leads the cluster", Gauge, u8::from(s.i_lead))?;
    one(e, "vip_cluster_etcd_connected", "1 if etcd answered in the last 3 s (0: decisions frozen)", Gauge, u8::from(s.etcd_connected))?;
    one(
        e,
        "vip_cluster_deadline_seconds",
        "How long this node may still answer its cluster VIPs without new proof (negative: silent)",
        Gauge,
        s.deadline_ms / 1e3,
    )?;
    one(e, "vip_cluster_groups_held", "Groups of cluster VIPs this node answers", Gauge, s.holding.len() as f64)?;
    family(
        e,
        "vip_cluster_node_health",
        "1 for each node's current health (seed 003)",
        Gauge,
        s.nodes.iter().map(|n| (vec![l("node", &n.name), l("health", &n.health)], 1.0)),
    )?;
    family(
        e,
        "vip_cluster_peer_heard_seconds",
        "Time since each peer's last heartbeat reached this node",
        Gauge,
        s.nodes.iter().filter(|n| n.name != s.node).filter_map(|n| Some((vec![l("node", &n.name)], n.heard_ms? / 1e3))),
    )?;
    one(e, "vip_cluster_takeovers", "Takeovers in the cluster's record (the last 64)", Gauge, s.takeovers.len() as f64)?;
    if let Some(t) = s.takeovers.last() {
        // From the last heartbeat the leader heard (or the suspicion, when not known).
        let from = if t.silent_since > 0.0 { t.silent_since } else { t.suspected_at };
        let phases = [("suspected", t.suspected_at), ("decided", t.decided_at), ("answered", t.answered_at)];
        family(
            e,
            "vip_cluster_last_takeover_seconds",
            "The last takeover's phases, from the failed node's last heartbeat heard by the leader",
            Gauge,
            phases.into_iter().filter(|(_, at)| *at > 0.0).map(|(p, at)| (vec![l("phase", p)], (at - from).max(0.0))),
        )?;
    }
    Ok(())
}
