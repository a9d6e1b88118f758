//! The agent's TOML configuration: parsing with positions, and validation against the
//! host, so that every error names the file, the line and the key.
//!
//! INTERFACE CONTRACT (the daemon codes against these types and functions; keep them):
//! - `Config::load(path) -> Result<Config, ConfigErrors>`: reads and parses, runs the
//!   static checks (no host access).
//! - `Config::validate_host(&self, &dyn HostView) -> Result<(), ConfigErrors>`: the checks
//!   that need the host (adapters exist, subnets reachable).
//! - `ConfigErrors` displays one error per line as `FILE:LINE: KEY: message`.
//!
//! The file is read into toml's spanned document tree and walked by hand rather than
//! deserialized with serde: serde stops at the first error, and the walk reports them all.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use toml::{
    de::{DeTable, DeValue},
    Spanned,
};
use vip_common::{MAX_ADAPTERS, MAX_IFINDEX, MAX_VIPS, MAX_VSERVERS};

/// `[agent] xdp_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpModeCfg {
    /// Native (driver) mode where the driver supports it, else skb mode.
    Auto,
    Native,
    Skb,
}

/// `[agent] ebpf_log`: which of the data plane's own log records (aya-log) reach the
/// agent's log. The level is fixed when the program is loaded: `off` (the default)
/// leaves no logging code on any path (the verifier removes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EbpfLog {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub xdp_mode: XdpModeCfg,
    pub ebpf_log: EbpfLog,
    pub hold_down_ms: u64,
    pub up_delay_ms: u64,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub pin_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AnnounceConfig {
    pub count: u32,
    pub interval_ms: u64,
    pub max_per_second: u32,
}

/// `[probe]`: conflict detection before a VIP is first brought up (RFC 5227 / DAD).
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub enabled: bool,
    /// Probes sent per address.
    pub count: u32,
    /// How long to listen for a defender after the last probe.
    pub wait_ms: u64,
    /// Probes per second per adapter, sent in short bursts (start-up and reloads probe
    /// every new VIP at once; the pace keeps the adapter's queue from overflowing).
    pub max_per_second: u32,
}

/// `[steering]`: egress steering and the client table.
#[derive(Debug, Clone)]
pub struct SteeringConfig {
    /// Attach the TC egress program: replies leave through the adapter each client uses.
    pub egress: bool,
    /// A client not heard from for this long leaves the table.
    pub client_timeout_s: u64,
    /// At most one straggler correction per client this often.
    pub correction_interval_ms: u64,
    /// How often per-adapter traffic is sampled for load-based placement.
    pub load_interval_ms: u64,
    /// Learn a client's adapter and MAC from any VIP frame (off: only from requests
    /// answered, its known MAC, or a MAC the kernel's neighbour table agrees with, so a
    /// forged source address cannot redirect anyone's replies).
    pub learn_from_traffic: bool,
}

#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub name: String,
    /// At most this many VIPs answered here, its own and taken over (seed 002's
    /// per-interface limit); None: no limit.
    pub max_vips: Option<u32>,
    /// Share of spread-mode clients (relative to the other adapters of a VIP).
    pub weight: u32,
    /// When it fails, a surviving adapter takes its MAC too (seed 002), so its clients
    /// are served at once with nothing to announce; on by default.
    pub move_mac: bool,
    /// 802.1Q VLANs this adapter carries (tagged). Untagged VIPs need no entry.
    pub vlans: Vec<u16>,
    /// Line of this `[[adapter]]` table, for errors found later (at run time).
    pub line: usize,
    /// Line of its `name` key (the table's line if the key is missing).
    pub name_line: usize,
}

pub use vip_placement::Subnet;

/// `[[vip]] mode`: which of a VIP's healthy adapters answer for it (default `spread`).
pub use vip_placement::Mode as VipMode;

#[derive(Debug, Clone)]
pub struct VipConfig {
    /// The address itself (the first of `count`) and the prefix of its subnet.
    pub address: Subnet,
    /// Consecutive addresses from `address`: one table for a range of VIPs alike.
    pub count: u32,
    /// Its home adapters, in order (indexes into `Config::adapters`).
    pub adapters: Vec<usize>,
    pub vlan: Option<u16>,
    pub failover: bool,
    /// Which of its healthy adapters answer.
    pub mode: VipMode,
    /// Spread mode: clients move back to a returning adapter.
    pub rebalance: bool,
    pub line: usize,
    /// Line of its `address` key (the table's line if the key is missing).
    pub address_line: usize,
}

/// `[[virtual_server]]`: VIPs delivered to the interface that leads to a virtual server
/// (seed 004), exclusively.
#[derive(Debug, Clone)]
pub struct VirtualServerConfig {
    pub name: String,
    /// The host-side interface leading to it (e.g. a veth into its namespace).
    pub interface: String,
    /// Indexes into `Config::all_vips`.
    pub vips: Vec<usize>,
    pub line: usize,
    pub interface_line: usize,
}

/// `[cluster]`: this node's part in a cluster (issue 11). Cluster-wide definitions (the
/// cluster's VIPs) live in etcd, written by `vip-agent cluster apply`.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The cluster's name: its keys live under `/vip/<name>/` in etcd.
    pub name: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    pub role: vip_cluster::records::Role,
    /// etcd client URLs (`http://host:2379`, or `https://` with `ca`).
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Peer heartbeats: how often, and on which UDP port.
    pub heartbeat_ms: u64,
    pub port: u16,
    /// A peer silent this long is suspected.
    pub suspect_ms: u64,
    /// How long a majority's acks (or one etcd read) keep this node answering.
    pub fence_ms: u64,
    /// The node's etcd lease: the backstop when nothing else can tell.
    pub lease_ttl_s: u64,
    /// Every etcd request gives up after this long.
    pub request_timeout_ms: u64,
    /// Its failover group and pair partner (seed 000): a VIP that leaves this node goes to
    /// another node of its group other than its partner first.
    pub group: Option<String>,
    pub partner: Option<String>,
    /// `[[cluster.server]]`: hooks per virtual server (by name).
    pub hooks: Vec<HookConfig>,
    pub line: usize,
}

/// A virtual server's hooks on this node (seeds 003, 004): executables, never commands
/// from etcd. See `vip_cluster::hooks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    pub server: String,
    pub acquire: Option<PathBuf>,
    pub release: Option<PathBuf>,
    pub check: Option<PathBuf>,
    pub timeout_ms: u64,
    pub check_interval_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub cluster: Option<ClusterConfig>,
    pub agent: AgentConfig,
    pub announce: AnnounceConfig,
    pub probe: ProbeConfig,
    pub steering: SteeringConfig,
    pub adapters: Vec<AdapterConfig>,
    /// The `[[vip]]` tables.
    pub vips: Vec<VipConfig>,
    /// Every VIP, the ranges expanded, in order: (its `[[vip]]` table, its address). A
    /// VIP's index here is its id in the data plane.
    pub all_vips: Vec<(u32, IpAddr)>,
    pub virtual_servers: Vec<VirtualServerConfig>,
}

/// What validation needs to know about one adapter on the host.
#[derive(Debug, Clone, Default)]
pub struct HostAdapter {
    pub ifindex: u32,
    /// Addresses on the adapter (and on VLAN devices on top of it), with their prefixes.
    pub addrs: Vec<Subnet>,
    /// Routes out of the adapter (destination and prefix).
    pub routes: Vec<Subnet>,
}

/// The host as validation sees it (netlink in the agent, a table in unit tests).
pub trait HostView {
    fn adapter(&self, name: &str) -> Option<HostAdapter>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    /// Dotted key, e.g. `vip[2].address` or `agent.xdp_mode`.
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            xdp_mode: XdpModeCfg::Auto,
            ebpf_log: EbpfLog::Off,
            hold_down_ms: 0,
            up_delay_ms: 0,
            control_socket: "/run/vip-agent.sock".into(),
            metrics_listen: None,
            pin_path: "/sys/fs/bpf/vip".into(),
        }
    }
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        Self { count: 3, interval_ms: 100, max_per_second: 2000 }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self { enabled: true, count: 2, wait_ms: 200, max_per_second: 200_000 }
    }
}

impl Default for SteeringConfig {
    fn default() -> Self {
        Self { egress: true, client_timeout_s: 300, correction_interval_ms: 500, load_interval_ms: 1000, learn_from_traffic: false }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

const ROOT_KEYS: &[&str] = &["agent", "announce", "probe", "steering", "adapter", "vip", "virtual_server", "cluster"];
const CLUSTER_KEYS: &[&str] = &[
    "name",
    "node",
    "role",
    "endpoints",
    "ca",
    "cert",
    "key",
    "heartbeat_ms",
    "port",
    "suspect_ms",
    "fence_ms",
    "lease_ttl_s",
    "request_timeout_ms",
    "group",
    "partner",
    "server",
];
/// `[[cluster.server]]`: a virtual server's hooks on this node.
const HOOK_KEYS: &[&str] = &["name", "acquire", "release", "check", "timeout_ms", "check_interval_ms"];
const DEFS_ROOT_KEYS: &[&str] = &["vip", "server"];
const DEF_VIP_KEYS: &[&str] = &["address", "count", "node", "adapters", "vlan", "failover", "mode", "rebalance", "server", "weight"];
const DEF_SERVER_KEYS: &[&str] = &["name", "node", "priority", "migrate", "rebalance", "weight"];
const VSERVER_KEYS: &[&str] = &["name", "interface", "vips"];
const STEERING_KEYS: &[&str] = &["egress", "client_timeout_s", "correction_interval_ms", "load_interval_ms", "learn_from_traffic"];
const AGENT_KEYS: &[&str] =
    &["xdp_mode", "ebpf_log", "hold_down_ms", "up_delay_ms", "control_socket", "metrics_listen", "pin_path"];
const ANNOUNCE_KEYS: &[&str] = &["count", "interval_ms", "max_per_second"];
const PROBE_KEYS: &[&str] = &["enabled", "count", "wait_ms", "max_per_second"];
const ADAPTER_KEYS: &[&str] = &["name", "max_vips", "vlans", "weight", "move_mac"];
const VIP_KEYS: &[&str] = &["address", "count", "adapters", "vlan", "failover", "mode", "rebalance"];

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                file: path.into(),
                line: 0,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }])),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut cx = Cx::new(path, text);
        let (doc, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            // The recovered tree is only good enough to name the key near each error.
            for e in &syntax {
                let span = e.span().unwrap_or(0..0);
                let mut message = e.message().replace('\n', " ");
                let key = locate(doc.get_ref(), span.start, "");
                // Without a key to name, quote the offending text.
                let text_at = text.get(span.clone()).filter(|s| (1..=40).contains(&s.len()) && !s.contains('\n'));
                if let (None, Some(s)) = (&key, text_at) {
                    message = format!("{message}: `{s}`");
                }
                cx.err(cx.line(span.start), key.unwrap_or_default(), message);
            }
            return Err(ConfigErrors(cx.errors));
        }

        let root = Tbl { t: Some(doc.get_ref()), key: String::new(), line: 1 };
        cx.check_keys(&root, ROOT_KEYS);

        let d = AgentConfig::default();
        let t = cx.section(&root, "agent", AGENT_KEYS);
        let agent = AgentConfig {
            xdp_mode: cx.opt(&t, "xdp_mode", xdp_mode).unwrap_or(d.xdp_mode),
            ebpf_log: cx.opt(&t, "ebpf_log", ebpf_log).unwrap_or(d.ebpf_log),
            hold_down_ms: cx.opt(&t, "hold_down_ms", int(0, i64::MAX)).unwrap_or(d.hold_down_ms),
            up_delay_ms: cx.opt(&t, "up_delay_ms", int(0, i64::MAX)).unwrap_or(d.up_delay_ms),
            control_socket: cx.opt(&t, "control_socket", socket_path).unwrap_or(d.control_socket),
            metrics_listen: cx.opt(&t, "metrics_listen", socket_addr),
            pin_path: cx.opt(&t, "pin_path", path_value).unwrap_or(d.pin_path),
        };

        let d = AnnounceConfig::default();
        let t = cx.section(&root, "announce", ANNOUNCE_KEYS);
        let announce = AnnounceConfig {
            count: cx.opt(&t, "count", int(1, 100)).unwrap_or(d.count),
            interval_ms: cx.opt(&t, "interval_ms", int(1, i64::MAX)).unwrap_or(d.interval_ms),
            max_per_second: cx.opt(&t, "max_per_second", int(1, u32::MAX.into())).unwrap_or(d.max_per_second),
        };

        let d = ProbeConfig::default();
        let t = cx.section(&root, "probe", PROBE_KEYS);
        let probe = ProbeConfig {
            enabled: cx.opt(&t, "enabled", boolean).unwrap_or(d.enabled),
            count: cx.opt(&t, "count", int(1, 10)).unwrap_or(d.count),
            wait_ms: cx.opt(&t, "wait_ms", int(1, 10_000)).unwrap_or(d.wait_ms),
            max_per_second: cx.opt(&t, "max_per_second", int(1, u32::MAX.into())).unwrap_or(d.max_per_second),
        };

        let d = SteeringConfig::default();
        let t = cx.section(&root, "steering", STEERING_KEYS);
        let steering = SteeringConfig {
            egress: cx.opt(&t, "egress", boolean).unwrap_or(d.egress),
            client_timeout_s: cx.opt(&t, "client_timeout_s", int(1, 86_400)).unwrap_or(d.client_timeout_s),
            correction_interval_ms: cx.opt(&t, "correction_interval_ms", int(1, 60_000)).unwrap_or(d.correction_interval_ms),
            load_interval_ms: cx.opt(&t, "load_interval_ms", int(10, 60_000)).unwrap_or(d.load_interval_ms),
            learn_from_traffic: cx.opt(&t, "learn_from_traffic", boolean).unwrap_or(d.learn_from_traffic),
        };

        let cluster = cx.cluster(&root);
        let (adapters, adapter_tables) = cx.adapters(&root);
        // A cluster node may hold only the cluster's VIPs.
        let (vips, all_vips) = if cluster.is_some() && root.get("vip").is_none() { (vec![], vec![]) } else { cx.vips(&root, &adapters) };
        for (i, (a, t)) in adapters.iter().zip(&adapter_tables).enumerate() {
            let Some(max) = a.max_vips else { continue };
            let used: u64 = vips.iter().filter(|v| v.adapters.contains(&i)).map(|v| v.count as u64).sum();
            if used > max as u64 {
                let line = t.get("max_vips").map_or(a.name_line, |v| cx.line_of(v));
                let msg = format!("{used} VIPs use {}, more than its max_vips of {max}", a.name);
                cx.err(line, t.key("max_vips"), msg);
            }
        }

        let virtual_servers = cx.virtual_servers(&root, &adapters, &vips, &all_vips);

        cx.into_errors()?;
        Ok(Config { path: path.into(), cluster, agent, announce, probe, steering, adapters, vips, all_vips, virtual_servers })
    }

    pub fn validate_host(&self, host: &dyn HostView) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut err = |line, key, message| {
            errors.push(ConfigError { file: self.path.clone(), line, key, message });
        };
        let found: Vec<Option<HostAdapter>> = self
            .adapters
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let h = host.adapter(&a.name);
                let key = format!("adapter[{i}].name");
                match &h {
                    None => err(a.name_line, key, format!("adapter {} does not exist on this host", a.name)),
                    Some(h) if h.ifindex >= MAX_IFINDEX => {
                        let msg = format!(
                            "adapter {} has ifindex {}; the data plane serves ifindexes below {MAX_IFINDEX}",
                            a.name, h.ifindex
                        );
                        err(a.name_line, key, msg);
                    }
                    Some(_) => {}
                }
                h
            })
            .collect();

        for (i, vs) in self.virtual_servers.iter().enumerate() {
            let key = format!("virtual_server[{i}].interface");
            match host.adapter(&vs.interface) {
                None => err(vs.interface_line, key, format!("interface {} does not exist on this host", vs.interface)),
                Some(h) if h.ifindex >= MAX_IFINDEX => {
                    err(vs.interface_line, key, format!("interface {} has ifindex {}, beyond the data plane", vs.interface, h.ifindex))
                }
                Some(_) => {}
            }
        }
        // A default route reaches everything but puts no adapter in the VIP's subnet.
        let subnets_of = |h: &HostAdapter| -> Vec<Subnet> {
            h.addrs.iter().chain(h.routes.iter().filter(|r| r.prefix > 0)).cloned().collect()
        };
        let mut last_of = vec![None; self.vips.len()];
        for &(t, a) in &self.all_vips {
            last_of[t as usize] = Some(a);
        }
        for (i, vip) in self.vips.iter().enumerate() {
            // A range: its first and last addresses (in between is contiguous).
            for ip in [Some(vip.address.addr), last_of[i].filter(|_| vip.count > 1)].into_iter().flatten() {
                let outside = vip.adapters.iter().filter(|&&a| {
                    found[a].as_ref().is_some_and(|h| !subnets_of(h).iter().any(|s| s.contains(&ip)))
                });
                let outside = names(&self.adapters, outside);
                if !outside.is_empty() {
                    let msg = format!(
                        "no address or route on {outside} contains {ip}; a VIP must be in a subnet of each of its adapters"
                    );
                    err(vip.address_line, format!("vip[{i}].address"), msg);
                    break;
                }
            }
        }
        // Groups of VIPs placed alike each take a data-plane policy (and splits of a
        // takeover limited by max_vips take more): half the table is for configured groups.
        let padapters: Vec<vip_placement::Adapter> = self
            .adapters
            .iter()
            .zip(&found)
            .map(|(a, h)| vip_placement::Adapter {
                name: a.name.clone(),
                node: 0,
                up: true,
                weight: a.weight,
                load: 0.0,
                max_vips: a.max_vips,
                vlans: a.vlans.clone(),
                subnets: h.as_ref().map(subnets_of).unwrap_or_default(),
            })
            .collect();
        let homes: Vec<std::sync::Arc<[u8]>> = self.vips.iter().map(|v| v.adapters.iter().map(|&a| a as u8).collect()).collect();
        let pvips: Vec<vip_placement::Vip> = self
            .all_vips
            .iter()
            .map(|&(t, addr)| {
                let v = &self.vips[t as usize];
                vip_placement::Vip {
                    addr,
                    vlan: v.vlan.unwrap_or(0),
                    homes: homes[t as usize].clone(),
                    mode: v.mode,
                    failover: v.failover,
                    rebalance: v.rebalance,
                    stay: false,
                    takers: None,
                }
            })
            .collect();
        let classes = vip_placement::classify(&pvips, 0..pvips.len() as u32, &padapters);
        let limit = (vip_common::MAX_POLICIES / 2) as usize;
        if let Some(c) = classes.list.get(limit) {
            let t = self.all_vips[c.members[0] as usize].0 as usize;
            let msg = format!(
                "{} groups of VIPs placed alike (same adapters, mode, VLAN, failover and takeover subnets); the data plane holds {limit}",
                classes.len()
            );
            err(self.vips[t].line, format!("vip[{t}]"), msg);
        }
        into_errors(errors)
    }
}

/// The names of the adapters at `idx`, comma-separated.
fn names<'a>(adapters: &[AdapterConfig], idx: impl Iterator<Item = &'a usize>) -> String {
    idx.map(|&a| adapters[a].name.as_str()).collect::<Vec<_>>().join(", ")
}

fn into_errors(mut errors: Vec<ConfigError>) -> Result<(), ConfigErrors> {
    if errors.is_empty() {
        return Ok(());
    }
    // Stable: errors on one line keep the order they were found in.
    errors.sort_by_key(|e| e.line);
    Err(ConfigErrors(errors))
}

type Val<'i> = Spanned<DeValue<'i>>;

/// Collects the errors found while reading one file.
struct Cx<'a> {
    file: &'a Path,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

/// A table being read, with its dotted key and line for errors about it or its keys.
/// `t` is None when the table is absent or not a table (then every key reads as absent).
struct Tbl<'t, 'i> {
    t: Option<&'t DeTable<'i>>,
    key: String,
    line: usize,
}

impl<'t, 'i> Tbl<'t, 'i> {
    fn get(&self, name: &str) -> Option<&'t Val<'i>> {
        self.t?.get(name)
    }

    fn key(&self, name: &str) -> String {
        if self.key.is_empty() {
            name.into()
        } else {
            format!("{}.{name}", self.key)
        }
    }
}

impl<'a> Cx<'a> {
    fn new(file: &'a Path, text: &str) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Self { file, line_starts, errors: Vec::new() }
    }

    /// 1-based line of a byte offset.
    fn line(&self, at: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= at)
    }

    fn line_of<T>(&self, v: &Spanned<T>) -> usize {
        self.line(v.span().start)
    }

    /// Line of `name` in `t`, or of the table itself when the key is absent.
    fn key_line(&self, t: &Tbl, name: &str) -> usize {
        t.get(name).map_or(t.line, |v| self.line_of(v))
    }

    fn err(&mut self, line: usize, key: impl Into<String>, message: impl Into<String>) {
        let (key, message) = (key.into(), message.into());
        self.errors.push(ConfigError { file: self.file.into(), line, key, message });
    }

    fn into_errors(self) -> Result<(), ConfigErrors> {
        into_errors(self.errors)
    }

    fn check_keys(&mut self, t: &Tbl, known: &[&str]) {
        for k in t.t.into_iter().flat_map(|t| t.keys()) {
            if !known.contains(&k.get_ref().as_ref()) {
                let msg = format!("unknown key (expected one of {})", known.join(", "));
                self.err(self.line_of(k), t.key(k.get_ref()), msg);
            }
        }
    }

    /// An optional `[name]` table of `root`.
    fn section<'t, 'i>(&mut self, root: &Tbl<'t, 'i>, name: &str, known: &[&str]) -> Tbl<'t, 'i> {
        let mut t = Tbl { t: None, key: root.key(name), line: 1 };
        if let Some(v) = root.get(name) {
            t.line = self.line_of(v);
            match v.get_ref() {
                DeValue::Table(x) => t.t = Some(x),
                other => self.err(t.line, t.key.clone(), expected("a table", other)),
            }
        }
        self.check_keys(&t, known);
        t
    }

    /// The `[[name]]` tables of `root`, at least one required.
    fn tables<'t, 'i>(&mut self, root: &Tbl<'t, 'i>, name: &str, known: &[&str]) -> Vec<Tbl<'t, 'i>> {
        if root.get(name).is_none() {
            self.err(1, name, format!("at least one [[{name}]] is required"));
            return Vec::new();
        }
        self.optional_tables(root, name, known)
    }

    /// Like [`Cx::tables`], for arrays of tables that may be absent.
    fn optional_tables<'t, 'i>(&mut self, root: &Tbl<'t, 'i>, name: &str, known: &[&str]) -> Vec<Tbl<'t, 'i>> {
        let Some(v) = root.get(name) else { return Vec::new() };
        let full = root.key(name);
        let Some(items) = v.get_ref().as_array() else {
            let msg = format!("expected an array of tables ([[{full}]]), found a {}", v.get_ref().type_str());
            self.err(self.line_of(v), full, msg);
            return Vec::new();
        };
        if items.is_empty() {
            self.err(self.line_of(v), full.clone(), format!("at least one [[{full}]] is required"));
        }
        let mut out = Vec::new();
        for (j, e) in items.iter().enumerate() {
            let t = Tbl { t: None, key: format!("{full}[{j}]"), line: self.line_of(e) };
            match e.get_ref() {
                DeValue::Table(x) => {
                    let t = Tbl { t: Some(x), ..t };
                    self.check_keys(&t, known);
                    out.push(t);
                }
                other => self.err(t.line, t.key, expected("a table", other)),
            }
        }
        out
    }

    /// Reports `name` missing from `t`; true if it is present.
    fn require(&mut self, t: &Tbl, name: &str) -> bool {
        let present = t.get(name).is_some();
        // A table that is itself broken was reported already.
        if !present && t.t.is_some() {
            self.err(t.line, t.key(name), "is required");
        }
        present
    }

    fn opt<T>(&mut self, t: &Tbl, name: &str, conv: impl FnOnce(&DeValue) -> Result<T, String>) -> Option<T> {
        let v = t.get(name)?;
        conv(v.get_ref()).map_err(|m| self.err(self.line_of(v), t.key(name), m)).ok()
    }

    fn req<T>(&mut self, t: &Tbl, name: &str, conv: impl FnOnce(&DeValue) -> Result<T, String>) -> Option<T> {
        self.require(t, name);
        self.opt(t, name, conv)
    }

    /// The `[[adapter]]` tables, and the tables themselves for later checks on their keys.
    fn adapters<'t, 'i>(&mut self, root: &Tbl<'t, 'i>) -> (Vec<AdapterConfig>, Vec<Tbl<'t, 'i>>) {
        let tables = self.tables(root, "adapter", ADAPTER_KEYS);
        let mut adapters = Vec::<AdapterConfig>::new();
        for t in &tables {
            let name = self.req(t, "name", string);
            let name_line = self.key_line(t, "name");
            if let Some(Err(m)) = name.as_deref().map(check_ifname) {
                self.err(name_line, t.key("name"), m);
            }
            let name = name.unwrap_or_default();
            if let Some(first) = adapters.iter().find(|a| !name.is_empty() && a.name == name) {
                let msg = format!("adapter {name} is already defined at line {}", first.name_line);
                self.err(name_line, t.key("name"), msg);
            }
            let mut vlans = Vec::new();
            self.each(t, "vlans", |v| {
                let vlan = int(1, 4094)(v)?;
                if vlans.contains(&vlan) {
                    return Err(format!("VLAN {vlan} is listed twice"));
                }
                vlans.push(vlan);
                Ok(())
            });
            adapters.push(AdapterConfig {
                name,
                max_vips: self.opt(t, "max_vips", int(1, u32::MAX.into())),
                weight: self.opt(t, "weight", int(1, 100)).unwrap_or(1),
                move_mac: self.opt(t, "move_mac", boolean).unwrap_or(true),
                vlans,
                line: t.line,
                name_line,
            });
        }
        if let Some(t) = tables.get(MAX_ADAPTERS as usize) {
            let msg = format!("more than {MAX_ADAPTERS} adapters, the data plane's limit");
            self.err(t.line, t.key.clone(), msg);
        }
        (adapters, tables)
    }

    fn vips(&mut self, root: &Tbl, adapters: &[AdapterConfig]) -> (Vec<VipConfig>, Vec<(u32, IpAddr)>) {
        let tables = self.tables(root, "vip", VIP_KEYS);
        let mut vips = Vec::<VipConfig>::new();
        let mut all = Vec::<(u32, IpAddr)>::new();
        // (address, VLAN) is the data plane's key: a second VIP with both equal is refused.
        let mut seen = HashMap::<(IpAddr, Option<u16>), usize>::new();
        let mut total: u64 = 0;
        for t in &tables {
            let address = self.req(t, "address", |v| vip_address(&string(v)?));
            let address_line = self.key_line(t, "address");
            let vlan = self.opt(t, "vlan", int(1, 4094));
            let count: u32 = self.opt(t, "count", int(1, MAX_VIPS.into())).unwrap_or(1);
            // A range stays inside its subnet and never reaches its broadcast address.
            let addrs: Vec<IpAddr> = match &address {
                Some(a) => match range(a, count) {
                    Ok(v) => v,
                    Err(m) => {
                        self.err(self.key_line(t, "count"), t.key("count"), m);
                        vec![]
                    }
                },
                None => vec![],
            };
            total += count as u64;

            let mut homes = Vec::new();
            if self.require(t, "adapters")
                && t.get("adapters").and_then(|v| v.get_ref().as_array()).is_some_and(|a| a.is_empty())
            {
                self.err(self.key_line(t, "adapters"), t.key("adapters"), "must name at least one adapter");
            }
            self.each(t, "adapters", |v| {
                let name = string(v)?;
                // The first of duplicate names (themselves an error) stands for them all.
                match adapters.iter().position(|a| a.name == name) {
                    None => Err(format!("{name:?} is not the name of an [[adapter]]")),
                    Some(a) if homes.contains(&a) => Err(format!("{name} is listed twice")),
                    Some(a) => {
                        homes.push(a);
                        Ok(())
                    }
                }
            });

            if let Some(vlan) = vlan {
                let lacking = names(adapters, homes.iter().filter(|&&a| !adapters[a].vlans.contains(&vlan)));
                if !lacking.is_empty() {
                    let msg = format!("VLAN {vlan} is not in the vlans of {lacking}");
                    self.err(self.key_line(t, "vlan"), t.key("vlan"), msg);
                }
            }
            for &addr in &addrs {
                if let Some(&first) = seen.get(&(addr, vlan)) {
                    let on = vlan.map_or("untagged".into(), |v| format!("on VLAN {v}"));
                    let msg = format!("{addr} {on} is already defined at line {}", vips[first].address_line);
                    self.err(address_line, t.key("address"), msg);
                    break;
                }
                seen.insert((addr, vlan), vips.len());
            }
            all.extend(addrs.iter().map(|a| (vips.len() as u32, *a)));
            let mode = self.opt(t, "mode", vip_mode).unwrap_or_default();
            let rebalance = self.opt(t, "rebalance", boolean);
            if rebalance.is_some() && mode != VipMode::Spread {
                self.err(self.key_line(t, "rebalance"), t.key("rebalance"), "only applies to mode = \"spread\"");
            }
            vips.push(VipConfig {
                // The placeholder is never returned: a missing address is an error.
                address: address.unwrap_or(Subnet { addr: Ipv4Addr::UNSPECIFIED.into(), prefix: 0 }),
                count,
                adapters: homes,
                vlan,
                failover: self.opt(t, "failover", boolean).unwrap_or(true),
                mode,
                rebalance: rebalance.unwrap_or(false),
                line: t.line,
                address_line,
            });
        }
        if total > MAX_VIPS as u64 {
            let mut n = 0u64;
            let t = tables.iter().zip(&vips).find(|(_, v)| {
                n += v.count as u64;
                n > MAX_VIPS as u64
            });
            if let Some((t, _)) = t {
                self.err(t.line, t.key.clone(), format!("{total} VIPs in all, more than {MAX_VIPS}, the data plane's limit"));
            }
        }
        (vips, all)
    }

    fn virtual_servers(
        &mut self,
        root: &Tbl,
        adapters: &[AdapterConfig],
        vips: &[VipConfig],
        all: &[(u32, IpAddr)],
    ) -> Vec<VirtualServerConfig> {
        let untagged: HashMap<IpAddr, usize> =
            all.iter().enumerate().filter(|(_, (t, _))| vips[*t as usize].vlan.is_none()).map(|(i, (_, a))| (*a, i)).collect();
        let tables = self.optional_tables(root, "virtual_server", VSERVER_KEYS);
        let mut out = Vec::<VirtualServerConfig>::new();
        let mut taken = HashMap::<usize, String>::new();
        for t in &tables {
            let name = self.req(t, "name", string).unwrap_or_default();
            let interface = self.req(t, "interface", string);
            let interface_line = self.key_line(t, "interface");
            if let Some(Err(m)) = interface.as_deref().map(check_ifname) {
                self.err(interface_line, t.key("interface"), m);
            }
            let interface = interface.unwrap_or_default();
            if adapters.iter().any(|a| a.name == interface) {
                self.err(interface_line, t.key("interface"), format!("{interface} is an [[adapter]]; a virtual server needs its own interface"));
            }
            if out.iter().any(|v| !interface.is_empty() && v.interface == interface) {
                self.err(interface_line, t.key("interface"), format!("{interface} already leads to another virtual server"));
            }
            let mut mine = Vec::new();
            if self.require(t, "vips") && t.get("vips").and_then(|v| v.get_ref().as_array()).is_some_and(|a| a.is_empty()) {
                self.err(self.key_line(t, "vips"), t.key("vips"), "must name at least one VIP");
            }
            self.each(t, "vips", |v| {
                let s = string(v)?;
                let ip: IpAddr = s.parse().map_err(|_| format!("{s:?} is not an IP address (give the [[vip]] address without its prefix)"))?;
                let Some(&i) = untagged.get(&ip) else {
                    return Err(format!("{ip} is not the address of an untagged [[vip]]"));
                };
                if ip.is_ipv6() {
                    return Err(format!("{ip}: virtual servers take IPv4 VIPs in this version"));
                }
                if let Some(other) = taken.get(&i) {
                    return Err(format!("{ip} already belongs to virtual server {other}"));
                }
                taken.insert(i, name.clone());
                mine.push(i);
                Ok(())
            });
            out.push(VirtualServerConfig { name, interface, vips: mine, line: t.line, interface_line });
        }
        if let Some(t) = tables.get(MAX_VSERVERS as usize) {
            self.err(t.line, t.key.clone(), format!("more than {MAX_VSERVERS} virtual servers, the data plane's limit"));
        }
        out
    }

    /// The optional `[cluster]` table.
    fn cluster(&mut self, root: &Tbl) -> Option<ClusterConfig> {
        root.get("cluster")?;
        let t = self.section(root, "cluster", CLUSTER_KEYS);
        t.t?;
        let name = self.req(&t, "name", cluster_name);
        let node = self.req(&t, "node", cluster_name);
        let role = self.opt(&t, "role", |v| match string(v)?.as_str() {
            "active" => Ok(vip_cluster::records::Role::Active),
            "standby" => Ok(vip_cluster::records::Role::Standby),
            s => Err(format!("{s:?} is not one of active, standby")),
        });
        let mut endpoints = vec![];
        if self.require(&t, "endpoints") && t.get("endpoints").and_then(|v| v.get_ref().as_array()).is_some_and(|a| a.is_empty()) {
            self.err(self.key_line(&t, "endpoints"), t.key("endpoints"), "must name at least one etcd endpoint");
        }
        self.each(&t, "endpoints", |v| {
            let u = string(v)?;
            let rest = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://"));
            let ok = rest.is_some_and(|r| {
                let hostport = r.trim_end_matches('/');
                hostport.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
            });
            if !ok {
                return Err(format!("{u:?} is not an etcd client URL such as \"http://192.0.2.1:2379\""));
            }
            endpoints.push(u);
            Ok(())
        });
        let ca = self.opt(&t, "ca", path_value);
        let cert = self.opt(&t, "cert", path_value);
        let key = self.opt(&t, "key", path_value);
        if cert.is_some() != key.is_some() {
            let which = if cert.is_some() { "key" } else { "cert" };
            self.err(t.line, t.key(which), "cert and key go together (this node's client certificate and its key)");
        }
        if endpoints.iter().any(|e| e.starts_with("https://")) && ca.is_none() {
            self.err(self.key_line(&t, "endpoints"), t.key("ca"), "https endpoints need ca (the CA that signed etcd's certificates)");
        }
        let mut hooks: Vec<HookConfig> = vec![];
        for h in self.optional_tables(&t, "server", HOOK_KEYS) {
            let Some(server) = self.req(&h, "name", cluster_name) else { continue };
            if hooks.iter().any(|x| x.server == server) {
                self.err(self.key_line(&h, "name"), h.key("name"), format!("hooks for {server:?} are already given"));
                continue;
            }
            let base = self.file.parent().map(Path::to_path_buf).unwrap_or_default();
            let acquire = self.opt(&h, "acquire", |v| executable(v, &base));
            let release = self.opt(&h, "release", |v| executable(v, &base));
            let check = self.opt(&h, "check", |v| executable(v, &base));
            if acquire.is_none() && release.is_none() && check.is_none() && h.get("acquire").is_none() && h.get("release").is_none() && h.get("check").is_none() {
                self.err(h.line, h.key("acquire"), "a [[cluster.server]] needs at least one of acquire, release, check");
            }
            hooks.push(HookConfig {
                server,
                acquire,
                release,
                check,
                timeout_ms: self.opt(&h, "timeout_ms", int(10, 3_600_000)).unwrap_or(30_000),
                check_interval_ms: self.opt(&h, "check_interval_ms", int(100, 3_600_000)).unwrap_or(5000),
            });
        }
        let group = self.opt(&t, "group", cluster_name);
        let partner = self.opt(&t, "partner", cluster_name);
        if partner.is_some() && partner == node {
            self.err(self.key_line(&t, "partner"), t.key("partner"), "a node cannot be its own partner");
        }
        let heartbeat_ms = self.opt(&t, "heartbeat_ms", int(1, 1000)).unwrap_or(10);
        let suspect_ms = self.opt(&t, "suspect_ms", int(2, 60_000)).unwrap_or(100);
        let fence_ms = self.opt(&t, "fence_ms", int(1, 60_000)).unwrap_or(80);
        let timing = vip_cluster::peers::Timing { suspect_ns: suspect_ms * 1_000_000, fence_ns: fence_ms * 1_000_000 };
        if let Err(m) = timing.check() {
            self.err(self.key_line(&t, "suspect_ms"), t.key("suspect_ms"), m);
        }
        if suspect_ms < 3 * heartbeat_ms {
            let m = format!("must be at least 3 heartbeats ({} ms): a peer is suspected only after several are missed", 3 * heartbeat_ms);
            self.err(self.key_line(&t, "suspect_ms"), t.key("suspect_ms"), m);
        }
        if fence_ms < 2 * heartbeat_ms {
            let m = format!("must be at least 2 heartbeats ({} ms), or the deadline lapses between two acks", 2 * heartbeat_ms);
            self.err(self.key_line(&t, "fence_ms"), t.key("fence_ms"), m);
        }
        Some(ClusterConfig {
            name: name.unwrap_or_default(),
            node: node.unwrap_or_default(),
            role: role.unwrap_or_default(),
            endpoints,
            ca,
            cert,
            key,
            heartbeat_ms,
            port: self.opt(&t, "port", int(1, 65535)).unwrap_or(7946),
            suspect_ms,
            fence_ms,
            lease_ttl_s: self.opt(&t, "lease_ttl_s", int(1, 3600)).unwrap_or(2),
            request_timeout_ms: self.opt(&t, "request_timeout_ms", int(10, 60_000)).unwrap_or(1000),
            group,
            partner,
            hooks,
            line: t.line,
        })
    }

    /// The `[[server]]` tables of a cluster definitions file (virtual servers, seed 004).
    fn servers(&mut self, root: &Tbl) -> Vec<(vip_cluster::records::ServerDef, usize)> {
        let tables = self.optional_tables(root, "server", DEF_SERVER_KEYS);
        let mut out: Vec<(vip_cluster::records::ServerDef, usize)> = vec![];
        for t in &tables {
            let name = self.req(t, "name", cluster_name);
            if let Some(n) = &name {
                if let Some((_, line)) = out.iter().find(|(s, _)| s.name == *n) {
                    self.err(self.key_line(t, "name"), t.key("name"), format!("server {n:?} is already defined at line {line}"));
                    continue;
                }
            }
            let server = vip_cluster::records::ServerDef {
                name: name.unwrap_or_default(),
                node: self.opt(t, "node", cluster_name),
                priority: self.opt(t, "priority", int(-1000, 1000)).unwrap_or(0),
                migrate: self.opt(t, "migrate", boolean).unwrap_or(true),
                rebalance: self.opt(t, "rebalance", boolean).unwrap_or(false),
                weight: self.opt(t, "weight", int(1, 1_000_000)).unwrap_or(1),
            };
            out.push((server, t.line));
        }
        out
    }

    /// The `[[vip]]` tables of a cluster definitions file.
    fn defs(&mut self, root: &Tbl, servers: &[(vip_cluster::records::ServerDef, usize)]) -> Vec<vip_cluster::records::GroupDef> {
        use vip_cluster::records::{GroupDef, Mode};
        let tables = self.tables(root, "vip", DEF_VIP_KEYS);
        let mut out = Vec::<(GroupDef, usize)>::new();
        let mut seen = HashMap::<(IpAddr, u16), usize>::new();
        let mut total = 0u64;
        for t in &tables {
            let address = self.req(t, "address", |v| vip_address(&string(v)?));
            let address_line = self.key_line(t, "address");
            let vlan: Option<u16> = self.opt(t, "vlan", int(1, 4094));
            let count: u32 = self.opt(t, "count", int(1, MAX_VIPS.into())).unwrap_or(1);
            total += count as u64;
            let addrs = match &address {
                Some(a) => range(a, count).unwrap_or_else(|m| {
                    self.err(self.key_line(t, "count"), t.key("count"), m);
                    vec![]
                }),
                None => vec![],
            };
            for &addr in &addrs {
                if let Some(&line) = seen.get(&(addr, vlan.unwrap_or(0))) {
                    self.err(address_line, t.key("address"), format!("{addr} is already defined at line {line}"));
                    break;
                }
                seen.insert((addr, vlan.unwrap_or(0)), address_line);
            }
            let node = self.opt(t, "node", cluster_name);
            let mut adapters = vec![];
            self.each(t, "adapters", |v| {
                let n = string(v)?;
                check_ifname(&n)?;
                if adapters.contains(&n) {
                    return Err(format!("{n} is listed twice"));
                }
                adapters.push(n);
                Ok(())
            });
            let mode = self.opt(t, "mode", vip_mode).unwrap_or_default();
            let rebalance = self.opt(t, "rebalance", boolean).unwrap_or(false);
            let server = self.opt(t, "server", cluster_name);
            if let Some(sv) = &server {
                if !servers.iter().any(|(x, _)| x.name == *sv) {
                    self.err(self.key_line(t, "server"), t.key("server"), format!("no [[server]] is named {sv:?}"));
                }
                // Where and when it moves is its server's to say.
                for k in ["node", "failover", "rebalance", "weight"] {
                    if t.get(k).is_some() {
                        self.err(self.key_line(t, k), t.key(k), format!("set on its server ({sv:?}), not on a VIP that belongs to one"));
                    }
                }
            }
            let weight = self.opt(t, "weight", int(1, 1_000_000)).unwrap_or(1);
            if let Some(a) = address {
                out.push((
                    GroupDef {
                        address: a.addr,
                        prefix: a.prefix,
                        count,
                        vlan: vlan.unwrap_or(0),
                        mode: match mode {
                            VipMode::All => Mode::All,
                            VipMode::Primary => Mode::Primary,
                            VipMode::Spread => Mode::Spread,
                        },
                        node,
                        adapters,
                        failover: self.opt(t, "failover", boolean).unwrap_or(true),
                        rebalance,
                        server,
                        weight,
                    },
                    t.line,
                ));
            }
        }
        if total > MAX_VIPS as u64 {
            self.err(1, "vip", format!("{total} VIPs in all, more than {MAX_VIPS}, the data plane's limit"));
        }
        out.into_iter().map(|(g, _)| g).collect()
    }

    /// Feeds each element of array `name` to `f`, reporting the ones it refuses.
    fn each(&mut self, t: &Tbl, name: &str, mut f: impl FnMut(&DeValue) -> Result<(), String>) {
        let Some(v) = t.get(name) else { return };
        let Some(items) = v.get_ref().as_array() else {
            self.err(self.line_of(v), t.key(name), expected("an array", v.get_ref()));
            return;
        };
        for (j, e) in items.iter().enumerate() {
            if let Err(m) = f(e.get_ref()) {
                self.err(self.line_of(e), format!("{}[{j}]", t.key(name)), m);
            }
        }
    }
}

/// The dotted key of the innermost entry whose key or value covers byte `at`.
fn locate(t: &DeTable, at: usize, prefix: &str) -> Option<String> {
    let covers = |s: std::ops::Range<usize>| s.start <= at && at <= s.end;
    for (k, v) in t.iter() {
        let key = if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
        let hit = covers(k.span()) || covers(v.span());
        // Tables of an array of tables span only their header: look inside them all.
        let inner = match v.get_ref() {
            DeValue::Table(t) => locate(t, at, &key),
            DeValue::Array(a) => a.iter().enumerate().find_map(|(j, e)| {
                let key = format!("{key}[{j}]");
                match e.get_ref() {
                    DeValue::Table(t) => locate(t, at, &key),
                    _ => covers(e.span()).then_some(key),
                }
            }),
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
        if hit {
            return Some(key);
        }
    }
    None
}

fn expected(what: &str, v: &DeValue) -> String {
    let ty = v.type_str();
    let a = if ty.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("expected {what}, found {a} {ty}")
}

/// An integer in `lo..=hi` converted to `T` (the range keeps the conversion exact).
fn int<T: TryFrom<i64>>(lo: i64, hi: i64) -> impl Fn(&DeValue) -> Result<T, String> {
    move |v| {
        let DeValue::Integer(i) = v else { return Err(expected("an integer", v)) };
        let n = i64::from_str_radix(i.as_str(), i.radix()).ok();
        n.filter(|n| (lo..=hi).contains(n)).and_then(|n| T::try_from(n).ok()).ok_or_else(|| {
            // Type-sized upper bounds say little: name them only for values above them.
            let range = match n {
                Some(n) if n < lo && hi >= u32::MAX.into() => format!("at least {lo}"),
                _ if hi == i64::MAX => format!("at least {lo}"),
                _ => format!("{lo} to {hi}"),
            };
            format!("must be {range}, not {i}")
        })
    }
}

fn string(v: &DeValue) -> Result<String, String> {
    v.as_str().map(str::to_owned).ok_or_else(|| expected("a string", v))
}

fn boolean(v: &DeValue) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| expected("true or false", v))
}

fn xdp_mode(v: &DeValue) -> Result<XdpModeCfg, String> {
    match string(v)?.as_str() {
        "auto" => Ok(XdpModeCfg::Auto),
        "native" => Ok(XdpModeCfg::Native),
        "skb" => Ok(XdpModeCfg::Skb),
        s => Err(format!("{s:?} is not one of auto, native, skb")),
    }
}

fn ebpf_log(v: &DeValue) -> Result<EbpfLog, String> {
    match string(v)?.as_str() {
        "off" => Ok(EbpfLog::Off),
        "error" => Ok(EbpfLog::Error),
        "warn" => Ok(EbpfLog::Warn),
        "info" => Ok(EbpfLog::Info),
        "debug" => Ok(EbpfLog::Debug),
        "trace" => Ok(EbpfLog::Trace),
        s => Err(format!("{s:?} is not one of off, error, warn, info, debug, trace")),
    }
}

fn vip_mode(v: &DeValue) -> Result<VipMode, String> {
    match string(v)?.as_str() {
        "all" => Ok(VipMode::All),
        "primary" => Ok(VipMode::Primary),
        "spread" => Ok(VipMode::Spread),
        s => Err(format!("{s:?} is not one of all, primary, spread")),
    }
}

/// A hook: an executable regular file, absolute or relative to the config's directory
/// (checked now, so a typo is a config error rather than a failed takeover).
fn executable(v: &DeValue, base: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let p = path_value(v)?;
    let p = if p.is_absolute() { p } else { base.join(p) };
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(p),
        Ok(m) if m.is_file() => Err(format!("{} is not executable", p.display())),
        Ok(_) => Err(format!("{} is not a file", p.display())),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

fn path_value(v: &DeValue) -> Result<PathBuf, String> {
    let s = string(v)?;
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.into())
}

fn socket_path(v: &DeValue) -> Result<PathBuf, String> {
    let p = path_value(v)?;
    // sun_path is 108 bytes including the terminating NUL.
    let len = p.as_os_str().len();
    if len > 107 {
        return Err(format!("is {len} bytes long; a Unix socket path holds at most 107"));
    }
    Ok(p)
}

fn socket_addr(v: &DeValue) -> Result<SocketAddr, String> {
    let s = string(v)?;
    s.parse().map_err(|_| format!("{s:?} is not an IP address and port, e.g. \"127.0.0.1:9477\""))
}

/// The kernel's rules for an interface name (`dev_valid_name`).
fn check_ifname(name: &str) -> Result<(), String> {
    let valid = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or whitespace)"))
    }
}

/// `count` consecutive addresses from `net.addr`, all in `net` and none its broadcast
/// address.
fn range(net: &Subnet, count: u32) -> Result<Vec<IpAddr>, String> {
    let last_ok = |last: u128, width: u32| -> bool {
        let shift = width - net.prefix as u32;
        let first = match net.addr {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        };
        let host_mask = if shift >= 128 { u128::MAX } else { (1u128 << shift) - 1 };
        // Same network, and (IPv4 up to /30) not the broadcast address.
        (first & !host_mask) == (last & !host_mask) && !(width == 32 && shift >= 2 && last & host_mask == host_mask)
    };
    let out: Vec<IpAddr> = match net.addr {
        IpAddr::V4(a) => {
            let first = u32::from(a) as u64;
            let last = first + count as u64 - 1;
            if last > u32::MAX as u64 || !last_ok(last as u128, 32) {
                return Err(format!("{count} addresses from {} run past {net} (or onto its broadcast address)", net.addr));
            }
            (first..=last).map(|x| IpAddr::V4((x as u32).into())).collect()
        }
        IpAddr::V6(a) => {
            let first = u128::from(a);
            let last = first.checked_add(count as u128 - 1);
            match last {
                Some(l) if last_ok(l, 128) => (first..=l).map(|x| IpAddr::V6(x.into())).collect(),
                _ => return Err(format!("{count} addresses from {} run past {net}", net.addr)),
            }
        }
    };
    Ok(out)
}

/// A cluster or node name: it is part of etcd keys.
fn cluster_name(v: &DeValue) -> Result<String, String> {
    let s = string(v)?;
    let ok = (1..=63).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(format!("{s:?} is not a name of 1 to 63 letters, digits, '-', '_' or '.'"));
    }
    Ok(s)
}

/// Reads a cluster definitions file (`vip-agent cluster apply FILE`): its `[[vip]]` tables,
/// each held by one node at a time. Errors name the file, line and key, like the node's
/// own configuration.
pub fn parse_defs(path: &Path, text: &str) -> Result<vip_cluster::records::Defs, ConfigErrors> {
    let mut cx = Cx::new(path, text);
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in &syntax {
            let span = e.span().unwrap_or(0..0);
            let key = locate(doc.get_ref(), span.start, "");
            cx.err(cx.line(span.start), key.unwrap_or_default(), e.message().replace('\n', " "));
        }
        return Err(ConfigErrors(cx.errors));
    }
    let root = Tbl { t: Some(doc.get_ref()), key: String::new(), line: 1 };
    cx.check_keys(&root, DEFS_ROOT_KEYS);
    let servers = cx.servers(&root);
    let groups = cx.defs(&root, &servers);
    for (sv, line) in &servers {
        if !groups.iter().any(|g| g.server.as_deref() == Some(sv.name.as_str())) {
            cx.err(*line, "server", format!("server {:?} has no [[vip]] (a VIP joins it with server = {:?})", sv.name, sv.name));
        }
    }
    cx.into_errors()?;
    Ok(vip_cluster::records::Defs { source: path.display().to_string(), groups, servers: servers.into_iter().map(|(s, _)| s).collect() })
}

fn vip_address(s: &str) -> Result<Subnet, String> {
    let net: Subnet = s.parse()?;
    let why = match net.addr {
        _ if net.prefix == 0 => "has prefix 0; a VIP's subnet needs a prefix of at least 1",
        ip if ip.is_unspecified() => "is the unspecified address",
        ip if ip.is_loopback() => "is a loopback address",
        ip if ip.is_multicast() => "is a multicast address",
        IpAddr::V4(a) if a.is_broadcast() => "is the broadcast address",
        // /31 and /32 have no broadcast address (RFC 3021).
        IpAddr::V4(a) if net.prefix <= 30 && u32::from(a) | (u32::MAX << (32 - net.prefix)) == u32::MAX => {
            "is the broadcast address of its subnet"
        }
        IpAddr::V6(a) if a.is_unicast_link_local() => "is an IPv6 link-local address",
        _ => return Ok(net),
    };
    Err(format!("{s:?} {why}"))
}

/// What a live reload cannot change, if `next` changes any of it: the paths and
/// listeners the process holds, how programs are attached, and cluster membership.
pub fn restart_only_changes(now: &Config, next: &Config) -> Option<String> {
    let (a, b) = (&now.agent, &next.agent);
    let mut keys = vec![];
    if a.control_socket != b.control_socket {
        keys.push("[agent] control_socket");
    }
    if a.pin_path != b.pin_path {
        keys.push("[agent] pin_path");
    }
    if a.metrics_listen != b.metrics_listen {
        keys.push("[agent] metrics_listen");
    }
    if a.xdp_mode != b.xdp_mode {
        keys.push("[agent] xdp_mode");
    }
    if now.steering.egress != next.steering.egress {
        keys.push("[steering] egress");
    }
    if now.cluster.is_some() || next.cluster.is_some() {
        // The cluster runtime holds the node's lease and its groups: a member reloads by
        // restarting (its groups move while it is away).
        keys.push("[cluster] (a cluster member is not reloaded live)");
    }
    (!keys.is_empty()).then(|| format!("changed or present where a live reload cannot apply it: {}", keys.join(", ")))
}

/// A VIP as a reload compares it: its settings, the adapters by name.
fn vip_settings(c: &Config, i: usize) -> (IpAddr, u16, String) {
    let (t, addr) = c.all_vips[i];
    let v = &c.vips[t as usize];
    let adapters: Vec<&str> = v.adapters.iter().map(|&a| c.adapters[a].name.as_str()).collect();
    let vserver = c.virtual_servers.iter().find(|s| s.vips.contains(&i)).map(|s| s.name.as_str());
    let settings =
        format!("/{} {:?} {adapters:?} failover={} rebalance={} vserver={vserver:?}", v.address.prefix, v.mode, v.failover, v.rebalance);
    (addr, v.vlan.unwrap_or(0), settings)
}

/// What a reload from `now` to `next` changes, in one line for the log and `vip-agent
/// reload`.
pub fn reload_summary(now: &Config, next: &Config) -> String {
    let vips = |c: &Config| -> HashMap<(IpAddr, u16), String> {
        (0..c.all_vips.len()).map(|i| vip_settings(c, i)).map(|(a, v, s)| ((a, v), s)).collect()
    };
    let (old, new) = (vips(now), vips(next));
    let added = new.keys().filter(|k| !old.contains_key(k)).count();
    let removed = old.keys().filter(|k| !new.contains_key(k)).count();
    let changed = new.iter().filter(|(k, s)| old.get(k).is_some_and(|o| o != *s)).count();
    let kept = new.len() - added - changed;
    let adapter = |c: &Config| -> HashMap<String, String> {
        c.adapters.iter().map(|a| (a.name.clone(), format!("{:?} {} {} {:?}", a.max_vips, a.weight, a.move_mac, a.vlans))).collect()
    };
    let (ao, an) = (adapter(now), adapter(next));
    let names = |m: &HashMap<String, String>, f: &dyn Fn(&String, &String) -> bool| {
        let mut v: Vec<&str> = m.iter().filter(|(k, s)| f(k, s)).map(|(k, _)| k.as_str()).collect();
        v.sort();
        v.join(" ")
    };
    let a_added = names(&an, &|k, _| !ao.contains_key(k));
    let a_removed = names(&ao, &|k, _| !an.contains_key(k));
    let a_changed = names(&an, &|k, s| ao.get(k).is_some_and(|o| o != s));
    let mut out = format!("VIPs: {added} added, {removed} removed, {changed} changed, {kept} unchanged");
    for (what, list) in [("adapters added", a_added), ("adapters removed", a_removed), ("adapters changed", a_changed)] {
        if !list.is_empty() {
            out.push_str(&format!("; {what}: {list}"));
        }
    }
    let vs = |c: &Config| -> Vec<String> { c.virtual_servers.iter().map(|v| format!("{} {}", v.name, v.interface)).collect() };
    if vs(now) != vs(next) {
        out.push_str("; virtual servers changed");
    }
    let mut tables = vec![];
    if format!("{:?}", now.announce) != format!("{:?}", next.announce) {
        tables.push("[announce]");
    }
    if format!("{:?}", now.probe) != format!("{:?}", next.probe) {
        tables.push("[probe]");
    }
    if format!("{:?}", now.steering) != format!("{:?}", next.steering) {
        tables.push("[steering]");
    }
    if (now.agent.hold_down_ms, now.agent.up_delay_ms, now.agent.ebpf_log) != (next.agent.hold_down_ms, next.agent.up_delay_ms, next.agent.ebpf_log) {
        tables.push("[agent]");
    }
    if !tables.is_empty() {
        out.push_str(&format!("; settings changed: {}", tables.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(Path::new("t.toml"), text)
    }

    const FULL: &str = r#"[agent]
xdp_mode = "native"
ebpf_log = "debug"
hold_down_ms = 2000
up_delay_ms = 500
control_socket = "/run/x.sock"
metrics_listen = "[::1]:9000"
pin_path = "/sys/fs/bpf/x"

[announce]
count = 5
interval_ms = 50
max_per_second = 100

[probe]
enabled = false
count = 3
wait_ms = 1000
max_per_second = 5000

[[adapter]]
name = "eth0"
max_vips = 8
vlans = [100, 200]

[[adapter]]
name = "eth1"
vlans = [100]

[[vip]]
address = "192.0.2.10/24"
adapters = ["eth0", "eth1"]

[[vip]]
address = "2001:db8::10/64"
adapters = ["eth1"]
vlan = 100
failover = false
"#;

    #[test]
    fn full_config_parses_with_all_values() {
        let c = parse(FULL).unwrap();
        let a = &c.agent;
        assert_eq!((a.xdp_mode, a.ebpf_log), (XdpModeCfg::Native, EbpfLog::Debug));
        assert_eq!((a.hold_down_ms, a.up_delay_ms), (2000, 500));
        assert_eq!(a.control_socket, Path::new("/run/x.sock"));
        assert_eq!(a.metrics_listen, Some("[::1]:9000".parse().unwrap()));
        assert_eq!(a.pin_path, Path::new("/sys/fs/bpf/x"));
        assert_eq!((c.announce.count, c.announce.interval_ms, c.announce.max_per_second), (5, 50, 100));
        assert_eq!((c.probe.enabled, c.probe.count, c.probe.wait_ms, c.probe.max_per_second), (false, 3, 1000, 5000));

        let ad: Vec<_> =
            c.adapters.iter().map(|a| (a.name.as_str(), a.max_vips, a.vlans.clone(), a.line, a.name_line)).collect();
        assert_eq!(ad, [("eth0", Some(8), vec![100, 200], 21, 22), ("eth1", None, vec![100], 26, 27)]);

        let v = &c.vips;
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].address, "192.0.2.10/24".parse().unwrap());
        assert_eq!((v[0].adapters.clone(), v[0].vlan, v[0].failover), (vec![0, 1], None, true));
        assert_eq!((v[0].line, v[0].address_line), (30, 31));
        assert_eq!(v[1].address, Subnet { addr: "2001:db8::10".parse().unwrap(), prefix: 64 });
        assert_eq!((v[1].adapters.clone(), v[1].vlan, v[1].failover), (vec![1], Some(100), false));
    }

    #[test]
    fn defaults_apply() {
        let c = parse("[[adapter]]\nname = \"eth0\"\n[[vip]]\naddress = \"192.0.2.1/24\"\nadapters = [\"eth0\"]\n")
            .unwrap();
        let a = &c.agent;
        assert_eq!(a.xdp_mode, XdpModeCfg::Auto);
        assert_eq!((a.hold_down_ms, a.up_delay_ms, a.metrics_listen), (0, 0, None));
        assert_eq!(a.control_socket, Path::new("/run/vip-agent.sock"));
        assert_eq!(a.pin_path, Path::new("/sys/fs/bpf/vip"));
        assert_eq!((c.announce.count, c.announce.interval_ms, c.announce.max_per_second), (3, 100, 2000));
        assert_eq!((c.probe.enabled, c.probe.count, c.probe.wait_ms, c.probe.max_per_second), (true, 2, 200, 200_000));
        assert_eq!((c.adapters[0].max_vips, c.adapters[0].vlans.len(), c.adapters[0].move_mac), (None, 0, true));
        assert_eq!((c.vips[0].mode, c.vips[0].count, c.all_vips.len()), (VipMode::Spread, 1, 1));
        assert_eq!((c.vips[0].vlan, c.vips[0].failover), (None, true));
    }

    #[test]
    fn inline_tables_are_accepted() {
        let c =
            parse("adapter = [{ name = \"eth0\" }]\nvip = [{ address = \"192.0.2.1/24\", adapters = [\"eth0\"] }]\n")
                .unwrap();
        assert_eq!((c.adapters[0].line, c.vips[0].line), (1, 2));
    }

    // Five lines; the cases' own lines start at 6. TOML 'literal strings' keep quotes unescaped.
    const BASE: &str = "[[adapter]]\nname = 'eth0'\n[[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n";

    /// (what, file text, expected (line, key, part of the message) in order).
    type Case = (&'static str, String, &'static [(usize, &'static str, &'static str)]);

    fn cases() -> Vec<Case> {
        let base = |extra: &str| format!("{BASE}{extra}");
        let after = |head: &str| format!("{head}{BASE}");
        let vip = |address: &str| base(&format!("[[vip]]\naddress = '{address}'\nadapters = ['eth0']\n"));
        vec![
            (
                "syntax: duplicate key",
                "[agent]\nhold_down_ms = 1\nhold_down_ms = 2\n".into(),
                &[(3, "", "duplicate key")],
            ),
            ("syntax: bare address", "[[vip]]\naddress = 192.0.2.1/24\n".into(), &[(2, "vip[0].address", "")]),
            ("unknown root key", base("[agnet]\n"), &[(6, "agnet", "unknown key")]),
            ("unknown agent key", after("[agent]\nhold_down = 5\n"), &[(2, "agent.hold_down", "unknown key")]),
            ("unknown vip key", base("vlam = 3\n"), &[(6, "vip[0].vlam", "unknown key")]),
            ("nested unknown", base("[vip.x]\n"), &[(6, "vip[0].x", "unknown key")]),
            (
                "wrong type",
                after("[agent]\nhold_down_ms = '2s'\n"),
                &[(2, "agent.hold_down_ms", "expected an integer, found a string")],
            ),
            ("section wrong type", after("agent = 3\n"), &[(1, "agent", "expected a table")]),
            (
                "vip not an array",
                "[[adapter]]\nname = 'eth0'\n[vip]\naddress = '192.0.2.1/24'\n".into(),
                &[(3, "vip", "expected an array of tables")],
            ),
            ("no adapter, no vip", "[agent]\n".into(), &[(1, "adapter", "at least one"), (1, "vip", "at least one")]),
            ("xdp_mode", after("[agent]\nxdp_mode = 'fast'\n"), &[(2, "agent.xdp_mode", "\"fast\" is not one of")]),
            ("ebpf_log", after("[agent]\nebpf_log = 'loud'\n"), &[(2, "agent.ebpf_log", "\"loud\" is not one of off")]),
            (
                "negative hold",
                after("[agent]\nhold_down_ms = -1\n"),
                &[(2, "agent.hold_down_ms", "at least 0, not -1")],
            ),
            (
                "metrics",
                after("[agent]\nmetrics_listen = 'localhost:1'\n"),
                &[(2, "agent.metrics_listen", "not an IP address and port")],
            ),
            ("empty pin path", after("[agent]\npin_path = ''\n"), &[(2, "agent.pin_path", "must not be empty")]),
            (
                "long socket",
                after(&format!("[agent]\ncontrol_socket = '/{}'\n", "s".repeat(107))),
                &[(2, "agent.control_socket", "at most 107")],
            ),
            (
                "announce ranges",
                after("[announce]\ncount = 0\ninterval_ms = 0\nmax_per_second = 0\n"),
                &[
                    (2, "announce.count", "1 to 100, not 0"),
                    (3, "announce.interval_ms", "at least 1"),
                    (4, "announce.max_per_second", "at least 1, not 0"),
                ],
            ),
            ("announce count high", after("[announce]\ncount = 101\n"), &[(2, "announce.count", "not 101")]),
            (
                "announce rate above u32",
                after("[announce]\nmax_per_second = 5_000_000_000\n"),
                &[(2, "announce.max_per_second", "1 to 4294967295, not 5000000000")],
            ),
            (
                "probe ranges",
                after("[probe]\nenabled = 1\ncount = 11\nwait_ms = 10001\nmax_per_second = 0\n"),
                &[
                    (2, "probe.enabled", "expected true or false"),
                    (3, "probe.count", "1 to 10"),
                    (4, "probe.wait_ms", "1 to 10000"),
                    (5, "probe.max_per_second", "not 0"),
                ],
            ),
            (
                "bad interface names",
                "[[adapter]]\nname = 'eth0:1'\n[[adapter]]\nname = 'a-very-long-name'\n\
                 [[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0:1']\n"
                    .into(),
                &[(2, "adapter[0].name", "not a valid interface name"), (4, "adapter[1].name", "not a valid")],
            ),
            (
                "missing name",
                "[[adapter]]\nmax_vips = 2\n[[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n".into(),
                &[(1, "adapter[0].name", "is required"), (5, "vip[0].adapters[0]", "not the name of an [[adapter]]")],
            ),
            (
                "duplicate adapter",
                base("[[adapter]]\nname = 'eth0'\n"),
                &[(7, "adapter[1].name", "adapter eth0 is already defined at line 2")],
            ),
            (
                // An invalid max_vips falls back to the default: no second error about its use.
                "max_vips zero",
                "[[adapter]]\nname = 'eth0'\nmax_vips = 0\n[[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n"
                    .into(),
                &[(3, "adapter[0].max_vips", "at least 1, not 0")],
            ),
            (
                "vlans",
                "[[adapter]]\nname = 'eth0'\nvlans = [\n  100,\n  0,\n  100,\n  4095,\n]\n\
                 [[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n"
                    .into(),
                &[
                    (5, "adapter[0].vlans[1]", "1 to 4094, not 0"),
                    (6, "adapter[0].vlans[2]", "VLAN 100 is listed twice"),
                    (7, "adapter[0].vlans[3]", "not 4095"),
                ],
            ),
            (
                "vlans not an array",
                "[[adapter]]\nname = 'eth0'\nvlans = 100\n[[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n"
                    .into(),
                &[(3, "adapter[0].vlans", "expected an array")],
            ),
            (
                "bad address",
                vip("192.0.2.300/24"),
                &[(7, "vip[1].address", "\"192.0.2.300/24\" is not an IP address with a prefix")],
            ),
            ("no prefix", vip("192.0.2.3"), &[(7, "vip[1].address", "no prefix length")]),
            ("v4 prefix", vip("192.0.2.3/33"), &[(7, "vip[1].address", "0 to 32")]),
            ("v6 prefix", vip("2001:db8::1/129"), &[(7, "vip[1].address", "0 to 128")]),
            ("prefix 0", vip("192.0.2.3/0"), &[(7, "vip[1].address", "prefix 0")]),
            ("unspecified", vip("::/64"), &[(7, "vip[1].address", "unspecified")]),
            ("multicast", vip("224.0.0.5/24"), &[(7, "vip[1].address", "multicast")]),
            ("loopback", vip("::1/128"), &[(7, "vip[1].address", "loopback")]),
            ("broadcast", vip("255.255.255.255/32"), &[(7, "vip[1].address", "is the broadcast address")]),
            ("subnet broadcast", vip("192.0.2.255/24"), &[(7, "vip[1].address", "broadcast address of its subnet")]),
            ("link-local", vip("fe80::1/64"), &[(7, "vip[1].address", "link-local")]),
            (
                "missing address and adapters",
                base("[[vip]]\nvlan = 5\n"),
                &[(6, "vip[1].address", "is required"), (6, "vip[1].adapters", "is required")],
            ),
            (
                "empty adapters",
                base("[[vip]]\naddress = '192.0.2.3/24'\nadapters = []\n"),
                &[(8, "vip[1].adapters", "at least one adapter")],
            ),
            (
                "unknown and twice-listed adapter",
                base("[[vip]]\naddress = '192.0.2.3/24'\nadapters = [\n  'eth0',\n  'eth9',\n  'eth0',\n]\n"),
                &[
                    (10, "vip[1].adapters[1]", "\"eth9\" is not the name of an [[adapter]]"),
                    (11, "vip[1].adapters[2]", "eth0 is listed twice"),
                ],
            ),
            (
                "duplicate vip, other prefix",
                vip("192.0.2.1/25"),
                &[(7, "vip[1].address", "192.0.2.1 untagged is already defined at line 4")],
            ),
            (
                "same address on a VLAN is another VIP, twice on it a duplicate",
                "[[adapter]]\nname = 'eth0'\nvlans = [7]\n\
                 [[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n\
                 [[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\nvlan = 7\n\
                 [[vip]]\nvlan = 7\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n"
                    .into(),
                &[(13, "vip[2].address", "192.0.2.1 on VLAN 7 is already defined at line 8")],
            ),
            (
                "vlan not carried",
                "[[adapter]]\nname = 'eth0'\nvlans = [7]\n[[adapter]]\nname = 'eth1'\n[[adapter]]\nname = 'eth2'\n\
                 [[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0', 'eth1', 'eth2']\nvlan = 7\n"
                    .into(),
                &[(11, "vip[0].vlan", "VLAN 7 is not in the vlans of eth1, eth2")],
            ),
            (
                "more VIPs than max_vips",
                "[[adapter]]\nname = 'eth0'\nmax_vips = 1\n\
                 [[vip]]\naddress = '192.0.2.1/24'\nadapters = ['eth0']\n\
                 [[vip]]\naddress = '192.0.2.2/24'\nadapters = ['eth0']\n"
                    .into(),
                &[(3, "adapter[0].max_vips", "2 VIPs use eth0, more than its max_vips of 1")],
            ),
            (
                "a range runs past its subnet",
                "[[adapter]]\nname = 'eth0'\n[[vip]]\naddress = '192.0.2.250/24'\ncount = 10\nadapters = ['eth0']\n".into(),
                &[(5, "vip[0].count", "10 addresses from 192.0.2.250 run past 192.0.2.250/24")],
            ),
            (
                "a range reaching the broadcast address",
                "[[adapter]]\nname = 'eth0'\n[[vip]]\naddress = '192.0.2.250/24'\ncount = 6\nadapters = ['eth0']\n".into(),
                &[(5, "vip[0].count", "broadcast")],
            ),
            ("count zero", base("[[vip]]\naddress = '192.0.2.100/24'\ncount = 0\nadapters = ['eth0']\n"), &[(8, "vip[1].count", "must be 1 to 131072, not 0")]),
            (
                "a range overlapping another VIP",
                base("[[vip]]\naddress = '192.0.2.0/24'\ncount = 3\nadapters = ['eth0']\n"),
                &[(7, "vip[1].address", "192.0.2.1 untagged is already defined at line 4")],
            ),
            (
                "a range over max_vips",
                "[[adapter]]\nname = 'eth0'\nmax_vips = 10\n[[vip]]\naddress = '10.0.0.1/16'\ncount = 11\nadapters = ['eth0']\n".into(),
                &[(3, "adapter[0].max_vips", "11 VIPs use eth0, more than its max_vips of 10")],
            ),
            (
                "more VIPs than the data plane holds",
                "[[adapter]]\nname = 'eth0'\n[[vip]]\naddress = '10.0.0.1/8'\ncount = 70000\nadapters = ['eth0']\n\
                 [[vip]]\naddress = '10.2.0.1/8'\ncount = 70000\nadapters = ['eth0']\n"
                    .into(),
                &[(7, "vip[1]", "140000 VIPs in all, more than 131072")],
            ),
        ]
    }

    #[test]
    fn each_error_names_its_line_and_key() {
        for (what, text, want) in cases() {
            let errs = parse(&text).expect_err(what).0;
            let got: Vec<_> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
            let want_lk: Vec<_> = want.iter().map(|&(l, k, _)| (l, k)).collect();
            assert_eq!(got, want_lk, "{what}: {errs:#?}");
            for (e, (_, _, part)) in errs.iter().zip(want) {
                assert!(e.message.contains(part), "{what}: {:?} lacks {part:?}", e.message);
                assert_eq!(e.file, Path::new("t.toml"));
            }
        }
    }

    #[test]
    fn too_many_adapters_is_the_data_plane_limit() {
        let mut text: String = (0..=MAX_ADAPTERS).map(|i| format!("[[adapter]]\nname = \"e{i}\"\n")).collect();
        text += "[[vip]]\naddress = \"192.0.2.1/24\"\nadapters = [\"e0\"]\n";
        let errs = parse(&text).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].key.as_str()), (2 * MAX_ADAPTERS as usize + 1, "adapter[64]"));
    }

    #[test]
    fn all_errors_are_reported_in_line_order() {
        let text = r#"[agent]
xdp_mode = "turbo"
[[adapter]]
name = "eth0"
max_vips = 1
[[vip]]
address = "192.0.2.300/24"
adapters = ["eth0", "eth5"]
[[vip]]
address = "192.0.2.10/24"
adapters = ["eth0"]
vlan = 100
colour = "red"
[[vip]]
address = "192.0.2.11/24"
adapters = ["eth0"]
"#;
        let errs = parse(text).unwrap_err();
        let got: Vec<_> = errs.0.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (2, "agent.xdp_mode"),
                (5, "adapter[0].max_vips"),
                (7, "vip[0].address"),
                (8, "vip[0].adapters[1]"),
                (12, "vip[1].vlan"),
                (13, "vip[1].colour"),
            ]
        );
        let shown = errs.to_string();
        assert_eq!(shown.lines().count(), 6);
        assert_eq!(
            shown.lines().nth(2),
            Some("t.toml:7: vip[0].address: \"192.0.2.300/24\" is not an IP address with a prefix")
        );
    }

    #[test]
    fn unreadable_file_is_line_0() {
        let errs = Config::load(Path::new("/nonexistent/vip.toml")).unwrap_err().0;
        assert_eq!((errs.len(), errs[0].line, errs[0].key.as_str()), (1, 0, ""));
        assert!(errs[0].to_string().starts_with("/nonexistent/vip.toml:0: cannot read the file: "));
    }

    #[test]
    fn subnet_contains() {
        let s = |t: &str| t.parse::<Subnet>().unwrap();
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        assert!(s("192.0.2.1/24").contains(&ip("192.0.2.200")));
        assert!(!s("192.0.2.1/24").contains(&ip("192.0.3.1")));
        assert!(s("192.0.2.1/32").contains(&ip("192.0.2.1")));
        assert!(s("0.0.0.0/0").contains(&ip("203.0.113.9")));
        assert!(!s("0.0.0.0/0").contains(&ip("2001:db8::1")));
        assert!(s("2001:db8::1/64").contains(&ip("2001:db8::ffff")));
        assert!(!s("2001:db8::1/64").contains(&ip("2001:db8:0:1::1")));
        assert!(s("::/0").contains(&ip("2001:db8::1")));
        assert_eq!(s("2001:db8::1/64").to_string(), "2001:db8::1/64");
        assert!(s("2001:db8::1/64").is_v6());
        assert!("192.0.2.1/+4".parse::<Subnet>().is_err());
    }

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
    }

    #[test]
    fn examples_are_valid() {
        for name in ["lab.toml", "two-adapters.toml"] {
            let c = Config::load(&examples().join(name)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.vips.is_empty());
        }
    }

    /// The four-node pairs-and-groups cluster (seed 000) and the virtual servers (seed
    /// 004): every node config and both definitions files are accepted, as written.
    #[test]
    fn cluster_examples_are_valid() {
        let pairs: Vec<(String, Option<String>, Option<String>)> = (0..4)
            .map(|k| {
                let c = Config::load(&examples().join(format!("cluster-pairs/n{k}.toml"))).unwrap_or_else(|e| panic!("{e}"));
                let cl = c.cluster.expect("a [cluster] table");
                (cl.node, cl.group, cl.partner)
            })
            .collect();
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            pairs,
            [
                ("n0".into(), s("A"), s("n2")),
                ("n1".into(), s("A"), s("n3")),
                ("n2".into(), s("B"), s("n0")),
                ("n3".into(), s("B"), s("n1")),
            ]
        );
        for k in 0..3 {
            let c = Config::load(&examples().join(format!("cluster-servers/n{k}.toml"))).unwrap_or_else(|e| panic!("{e}"));
            let h = &c.cluster.expect("a [cluster] table").hooks;
            assert_eq!(h.len(), 1);
            assert_eq!(h[0].server, "db");
            assert!(h[0].acquire.as_ref().is_some_and(|p| p.ends_with("cluster-servers/hooks/db-acquire") && p.is_file()), "{h:?}");
            assert_eq!((h[0].timeout_ms, h[0].check_interval_ms), (10_000, 2000));
        }
        for f in ["cluster-pairs/defs.toml", "cluster-servers/defs.toml"] {
            let path = examples().join(f);
            parse_defs(&path, &std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{e}"));
        }
        let path = examples().join("cluster-servers/defs.toml");
        let d = parse_defs(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        let sv: Vec<_> = d.servers.iter().map(|s| (s.name.as_str(), s.node.as_deref(), s.priority, s.migrate, s.weight)).collect();
        assert_eq!(sv, [("db", Some("n0"), 100, true, 3), ("web", Some("n1"), 50, true, 1), ("scratch", Some("n2"), 10, false, 1)]);
        let g: Vec<_> = d.groups.iter().map(|g| (g.address.to_string(), g.server.as_deref())).collect();
        assert_eq!(g, [("192.0.2.70".into(), Some("db")), ("192.0.2.71".into(), Some("web")), ("192.0.2.75".into(), Some("scratch"))]);
    }

    #[test]
    fn a_node_cannot_be_its_own_partner() {
        let e = parse("[cluster]\nname = 'c'\nnode = 'n1'\npartner = 'n1'\nendpoints = ['http://10.0.0.1:2379']\n[[adapter]]\nname = 'eth0'\n").unwrap_err();
        assert_eq!(e.0.iter().map(|e| (e.line, e.key.as_str())).collect::<Vec<_>>(), [(4, "cluster.partner")]);
    }

    /// Each file in examples/bad lists the errors it must produce as `# expect: LINE [KEY]`.
    #[test]
    fn bad_examples_report_what_they_expect() {
        let dir = examples().join("bad");
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty());
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let want: Vec<(usize, String)> = text
                .lines()
                .filter_map(|l| l.strip_prefix("# expect: "))
                .map(|l| {
                    let (line, key) = l.split_once(' ').unwrap_or((l, ""));
                    (line.parse().unwrap(), key.to_owned())
                })
                .collect();
            let errs = Config::parse(&path, &text).expect_err(&path.display().to_string());
            let got: Vec<_> = errs.0.iter().map(|e| (e.line, e.key.clone())).collect();
            assert_eq!(got, want, "{}:\n{errs}", path.display());
        }
    }

    /// The same for cluster definitions files (examples/bad-defs), and the good example.
    #[test]
    fn bad_definitions_report_what_they_expect() {
        let good = examples().join("cluster-defs.toml");
        let d = parse_defs(&good, &std::fs::read_to_string(&good).unwrap()).unwrap_or_else(|e| panic!("{e}"));
        let g: Vec<_> = d.groups.iter().map(|g| (g.address.to_string(), g.count, g.node.clone(), g.failover, g.rebalance)).collect();
        assert_eq!(
            g,
            [
                ("192.0.2.50".into(), 1, Some("n0".into()), true, false),
                ("192.0.2.51".into(), 1, Some("n1".into()), true, true),
                ("192.0.2.60".into(), 10, Some("n2".into()), false, false),
            ]
        );
        let dir = examples().join("bad-defs");
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let want: Vec<(usize, String)> = text
                .lines()
                .filter_map(|l| l.strip_prefix("# expect: "))
                .map(|l| {
                    let (line, key) = l.split_once(' ').unwrap_or((l, ""));
                    (line.parse().unwrap(), key.to_owned())
                })
                .collect();
            let errs = parse_defs(&path, &text).expect_err(&path.display().to_string());
            let got: Vec<_> = errs.0.iter().map(|e| (e.line, e.key.clone())).collect();
            assert_eq!(got, want, "{}:\n{errs}", path.display());
        }
    }

    #[test]
    fn cluster_table_parses_with_defaults() {
        let c = parse("[cluster]\nname = 'lab'\nnode = 'n1'\nendpoints = ['http://10.0.0.1:2379']\n[[adapter]]\nname = 'eth0'\n").unwrap();
        let cl = c.cluster.expect("cluster");
        assert_eq!((cl.name.as_str(), cl.node.as_str()), ("lab", "n1"));
        assert_eq!((cl.heartbeat_ms, cl.suspect_ms, cl.fence_ms, cl.lease_ttl_s, cl.port), (10, 100, 80, 2, 7946));
        assert!(c.vips.is_empty(), "a cluster node needs no VIPs of its own");
    }

    struct FakeHost(HashMap<&'static str, HostAdapter>);

    impl HostView for FakeHost {
        fn adapter(&self, name: &str) -> Option<HostAdapter> {
            self.0.get(name).cloned()
        }
    }

    fn host(adapters: &[(&'static str, u32, &[&str], &[&str])]) -> FakeHost {
        let nets = |l: &[&str]| l.iter().map(|s| s.parse().unwrap()).collect();
        FakeHost(
            adapters
                .iter()
                .map(|&(n, ifindex, addrs, routes)| {
                    (n, HostAdapter { ifindex, addrs: nets(addrs), routes: nets(routes) })
                })
                .collect(),
        )
    }

    const HOSTED: &str = r#"[[adapter]]
name = "eth0"
[[adapter]]
name = "eth1"
[[adapter]]
name = "eth7"
[[vip]]
address = "192.0.2.10/24"
adapters = ["eth0", "eth1"]
[[vip]]
address = "2001:db8::10/64"
adapters = ["eth0", "eth1"]
[[vip]]
address = "198.51.100.10/24"
adapters = ["eth0", "eth7"]
"#;

    #[test]
    fn validate_host_cases() {
        let c = parse(HOSTED).unwrap();
        let v4 = ["192.0.2.1/24", "2001:db8::1/64"];
        let eth0: (&str, u32, &[&str], &[&str]) = ("eth0", 2, &v4, &["198.51.100.0/24"]);
        // eth1 reaches 192.0.2.0/24 only through a route, and 2001:db8::/64 through an address.
        let eth1: (&str, u32, &[&str], &[&str]) = ("eth1", 3, &["2001:db8::2/64"], &["0.0.0.0/0", "192.0.2.0/24"]);
        let eth7: (&str, u32, &[&str], &[&str]) = ("eth7", 9, &["198.51.100.1/24"], &[]);
        c.validate_host(&host(&[eth0, eth1, eth7])).unwrap();

        type HostCase<'a> = (&'a str, FakeHost, &'a [(usize, &'a str, &'a str)]);
        let cases: Vec<HostCase> = vec![
            (
                "missing adapter",
                host(&[eth0, eth1]),
                &[(6, "adapter[2].name", "adapter eth7 does not exist on this host")],
            ),
            (
                "subnet missing on one adapter, and a default route is not a subnet",
                host(&[eth0, ("eth1", 3, &["2001:db8::2/64"], &["0.0.0.0/0"]), eth7]),
                &[(8, "vip[0].address", "no address or route on eth1 contains 192.0.2.10")],
            ),
            (
                "IPv6 missing on both, and an IPv4 route does not count",
                host(&[
                    ("eth0", 2, &["192.0.2.1/24"], &["198.51.100.0/24"]),
                    ("eth1", 3, &[], &["192.0.2.0/24", "2001:db8:1::/64"]),
                    eth7,
                ]),
                &[(11, "vip[1].address", "no address or route on eth0, eth1 contains 2001:db8::10")],
            ),
            (
                "ifindex beyond the data plane",
                host(&[eth0, eth1, ("eth7", 70_000, &["198.51.100.1/24"], &[])]),
                &[(6, "adapter[2].name", "ifindex 70000")],
            ),
        ];
        for (what, h, want) in cases {
            let errs = c.validate_host(&h).expect_err(what).0;
            let got: Vec<_> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
            let want_lk: Vec<_> = want.iter().map(|&(l, k, _)| (l, k)).collect();
            assert_eq!(got, want_lk, "{what}: {errs:#?}");
            for (e, (_, _, part)) in errs.iter().zip(want) {
                assert!(e.message.contains(part), "{what}: {:?} lacks {part:?}", e.message);
            }
        }
        // A range is checked at both ends: 300 addresses from 192.0.2.1 leave eth0's /24.
        let range = Config::parse(
            Path::new("t.toml"),
            "[[adapter]]\nname = 'eth0'\n[[vip]]\naddress = '192.0.2.1/16'\ncount = 300\nadapters = ['eth0']\n",
        )
        .unwrap();
        let errs = range.validate_host(&host(&[eth0])).expect_err("range").0;
        assert_eq!((errs[0].line, errs[0].key.as_str()), (4, "vip[0].address"), "{errs:?}");
        assert!(errs[0].message.contains("contains 192.0.3.44"), "{}", errs[0].message);
        // More groups placed alike than the data plane holds policies for.
        // (VLAN, mode, failover) differ from one VIP to the next: every VIP is a group.
        let many: String = (0..=vip_common::MAX_POLICIES / 2)
            .map(|i| {
                format!(
                    "[[vip]]\naddress = '10.0.{}.{}/8'\nadapters = ['eth0']\nvlan = {}\nmode = '{}'\nfailover = {}\n",
                    i / 250,
                    i % 250 + 1,
                    i % 4000 + 1,
                    ["all", "primary"][(i as usize / 4000) % 2],
                    i / 8000 == 0
                )
            })
            .collect();
        let vlans = (1..=4000).map(|v| v.to_string()).collect::<Vec<_>>().join(",");
        let groups = Config::parse(Path::new("t.toml"), &format!("[[adapter]]\nname = 'eth0'\nvlans = [{vlans}]\n{many}")).unwrap();
        let errs = groups.validate_host(&host(&[("eth0", 2, &["10.0.0.1/8"], &[])])).expect_err("groups").0;
        assert_eq!(errs.len(), 1, "{:?}", &errs[..errs.len().min(3)]);
        assert!(errs[0].message.contains("8193 groups of VIPs placed alike"), "{}", errs[0]);
    }
}

#[cfg(test)]
mod mode_tests {
    use super::*;

    #[test]
    fn vip_modes() {
        let base = "[[adapter]]\nname = \"eth0\"\n[[vip]]\naddress = \"192.0.2.10/24\"\nadapters = [\"eth0\"]\n";
        let c = Config::parse(Path::new("m.toml"), base).unwrap();
        assert_eq!(c.vips[0].mode, VipMode::Spread);
        let c = Config::parse(Path::new("m.toml"), &format!("{base}mode = \"all\"\n")).unwrap();
        assert_eq!(c.vips[0].mode, VipMode::All);
        let c = Config::parse(Path::new("m.toml"), &format!("{base}mode = \"primary\"\n")).unwrap();
        assert_eq!(c.vips[0].mode, VipMode::Primary);
        let c = Config::parse(Path::new("m.toml"), &format!("{base}mode = \"spread\"\nrebalance = true\n")).unwrap();
        assert_eq!((c.vips[0].mode, c.vips[0].rebalance), (VipMode::Spread, true));
        assert_eq!((c.adapters[0].weight, c.adapters[0].move_mac), (1, true));
        let bad = [
            ("mode = \"any\"\n", 6, "vip[0].mode", "is not one of all, primary, spread"),
            ("mode = \"all\"\nrebalance = true\n", 7, "vip[0].rebalance", "only applies to mode = \"spread\""),
        ];
        for (extra, line, key, want) in bad {
            let e = Config::parse(Path::new("m.toml"), &format!("{base}{extra}")).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!((e.0[0].line, e.0[0].key.as_str()), (line, key), "{e}");
            assert!(e.0[0].message.contains(want), "{e}");
        }
        let vs = "[[virtual_server]]\nname = \"web\"\ninterface = \"eth0\"\nvips = [\"192.0.2.10\", \"192.0.2.99\", \"x\"]\n\
                  [[virtual_server]]\nname = \"db\"\ninterface = \"vs1\"\nvips = [\"192.0.2.10\"]\nport = 1\n";
        let e = Config::parse(Path::new("m.toml"), &format!("{base}{vs}")).unwrap_err();
        let got: Vec<_> = e.0.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (8, "virtual_server[0].interface"),
                (9, "virtual_server[0].vips[1]"),
                (9, "virtual_server[0].vips[2]"),
                (13, "virtual_server[1].vips[0]"),
                (14, "virtual_server[1].port"),
            ],
            "{e}"
        );
        assert!(e.0[0].message.contains("is an [[adapter]]"), "{e}");
        assert!(e.0[3].message.contains("already belongs to virtual server web"), "{e}");
        let ok = format!("{base}[[virtual_server]]\nname = \"web\"\ninterface = \"vs0\"\nvips = [\"192.0.2.10\"]\n");
        let c = Config::parse(Path::new("m.toml"), &ok).unwrap();
        assert_eq!((c.virtual_servers[0].interface.as_str(), c.virtual_servers[0].vips.clone()), ("vs0", vec![0]));
        let adapter = "[[adapter]]\nname = \"eth0\"\nweight = 0\nmove_mac = 1\n[steering]\nclient_timeout_s = 0\nbogus = 1\n";
        let vip = "[[vip]]\naddress = \"192.0.2.10/24\"\nadapters = [\"eth0\"]\n";
        let e = Config::parse(Path::new("m.toml"), &format!("{adapter}{vip}")).unwrap_err();
        let got: Vec<_> = e.0.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            got,
            [(3, "adapter[0].weight"), (4, "adapter[0].move_mac"), (6, "steering.client_timeout_s"), (7, "steering.bogus")],
            "{e}"
        );
    }
}
