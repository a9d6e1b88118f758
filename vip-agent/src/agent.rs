//! The agent: the one owner of the data plane's maps, the host changes and the
//! announcer. It runs on one thread (see [`crate::runtime`]), reacts to link events,
//! timers and messages, asks the placement core (`vip-placement`) who answers what, and
//! applies the difference ([`crate::apply`]). Nothing else writes its state, so there is
//! no lock; status readers get a [`crate::status::Snapshot`] of shared, immutable parts.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::programs::{links::PinnedLink, XdpMode};
use vip_common::{
    client_bucket, names, vserver_flags, AdapterInfo, FlowInfo, FlowKey, Straggler, VipKey, ADAPTER_DOWN,
    ADAPTER_MAC_MOVED, ADAPTER_UP, ADAPTER_VSERVER, FAMILY_IPV4, MAX_ADAPTERS, VIP_SPREAD,
};
use vip_packet::{mac_str, Mac};
use vip_placement::{self as placement, bit, Assignment, ClassKey, Classes, Mode, Slot};

use crate::{
    announce::{self, Announcer, Job},
    apply::Policies,
    config::{Config, HostAdapter, HostView, Subnet, XdpModeCfg},
    conflict::{self, ProbeTarget},
    dataplane::Dataplane,
    host::Host,
    netlink::{Link, LinkEvent, LinkEvents, Rtnl},
    status::{unix_now, FailoverStatus, Histogram, Refusal},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not on the host (yet, or any more).
    Missing,
    Up,
    Down,
    /// Carrier lost less than `hold_down_ms` ago: still counted as up.
    HoldDown,
    /// Carrier back less than `up_delay_ms` ago: still counted as down.
    UpDelay,
}

impl Health {
    pub fn answers(self) -> bool {
        matches!(self, Health::Up | Health::HoldDown)
    }
    pub fn name(self) -> &'static str {
        match self {
            Health::Missing => "missing",
            Health::Up => "up",
            Health::Down => "down",
            Health::HoldDown => "hold-down",
            Health::UpDelay => "up-delay",
        }
    }
}

pub(crate) struct AdapterRt {
    pub name: String,
    pub slot: u8,
    pub ifindex: Option<u32>,
    pub mac: Option<Mac>,
    pub health: Health,
    /// Bumped on every transition so a stale hold-down or up-delay timer does nothing.
    pub gen: u64,
    pub since: f64,
    pub link: Option<PinnedLink>,
    pub move_mac: bool,
    /// Where its MAC was added to a unicast filter (its heir's ifindex) while it is down.
    pub mac_at: Option<u32>,
    pub last_bytes: Option<(Instant, u64)>,
}

/// One VIP as configured (ranges expanded), fixed for the agent's life.
#[derive(Debug, Clone)]
pub struct VipSpec {
    pub addr: IpAddr,
    pub vlan: u16,
    pub key: VipKey,
    /// `VipInfo::flags`: spread mode, virtual server.
    pub flags: u32,
    /// Its `[[vip]]` table.
    pub table: u32,
}

/// A virtual server's interface (seed 004).
pub(crate) struct VserverRt {
    pub name: String,
    pub interface: String,
    pub ifindex: Option<u32>,
    /// The interface's own MAC (the virtual server's gateway).
    pub mac: Option<Mac>,
    pub link: Option<PinnedLink>,
    pub vips: Vec<usize>,
}

/// A hold-down or up-delay timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub adapter: usize,
    pub gen: u64,
}

/// The client table as last read (by the housekeeping thread), by adapter: who must be
/// told when an adapter fails, without reading the table on the failover path.
#[derive(Debug, Default)]
pub struct ClientIndex {
    pub by_ifindex: HashMap<u32, Vec<(FlowKey, FlowInfo)>>,
    pub total: usize,
    /// The most recently seen, newest first (for status).
    pub recent: Vec<(FlowKey, FlowInfo)>,
}

impl ClientIndex {
    pub fn build(mut flows: Vec<(FlowKey, FlowInfo)>, shown: usize) -> ClientIndex {
        let total = flows.len();
        flows.sort_by_key(|(_, f)| Reverse(f.seen_ns));
        let recent = flows.iter().take(shown).copied().collect();
        let mut by_ifindex: HashMap<u32, Vec<(FlowKey, FlowInfo)>> = HashMap::new();
        for (k, f) in flows {
            by_ifindex.entry(f.ifindex).or_default().push((k, f));
        }
        ClientIndex { by_ifindex, total, recent }
    }
}

pub struct Agent {
    pub(crate) cfg: Config,
    pub(crate) links: LinkEvents,
    pub(crate) dp: Dataplane,
    pub(crate) rtnl: Rtnl,
    pub(crate) host: Host,
    pub(crate) ann: Announcer,
    pub(crate) lo: u32,
    pub(crate) adapters: Vec<AdapterRt>,
    /// The adapters as placement sees them (health, load, subnets), kept in step.
    pub(crate) padapters: Vec<placement::Adapter>,
    pub(crate) nodes: Vec<placement::Node>,
    pub(crate) vips: Arc<Vec<VipSpec>>,
    pub(crate) pvips: Arc<Vec<placement::Vip>>,
    pub(crate) by_key: HashMap<VipKey, u32>,
    /// Not refused by the conflict probe.
    pub(crate) active: Arc<Vec<bool>>,
    pub(crate) classes: Arc<Classes>,
    /// A stable id per class key, so a class keeps its data-plane policies when the VIPs
    /// are classified again.
    pub(crate) class_ids: HashMap<ClassKey, u32>,
    pub(crate) class_sid: Vec<u32>,
    pub(crate) assignment: Arc<Assignment>,
    pub(crate) policies: Policies,
    /// The policy each VIP's map entry points at (u32::MAX: not in the map).
    pub(crate) vip_policy: Vec<u32>,
    /// Refusals in force (to say each once), and the last ones said.
    pub(crate) refusals_now: HashSet<placement::Refusal>,
    pub(crate) refusals: VecDeque<Refusal>,
    /// Refusals ever made (the list above keeps only the last few).
    pub(crate) refusals_total: u64,
    pub(crate) vservers: Vec<VserverRt>,
    pub(crate) failovers: VecDeque<FailoverStatus>,
    /// Failover records waiting for their first announcement: tag -> event instant.
    pub(crate) tags: HashMap<u64, Instant>,
    pub(crate) next_tag: u64,
    pub(crate) hist_maps: Histogram,
    pub(crate) hist_announce: Histogram,
    pub(crate) started: f64,
    pub(crate) adopted: bool,
    pub stopping: bool,
    /// Last correction sent per straggling client (rate limit).
    pub(crate) corrected: HashMap<FlowKey, Instant>,
    pub(crate) clients: Arc<ClientIndex>,
    pub(crate) clients_moved: u64,
    pub(crate) corrections_sent: u64,
    pub(crate) timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// Link events read during a long operation (their urgent part done), to finish.
    pub(crate) deferred: VecDeque<(Instant, LinkEvent)>,
    /// Bumped whenever an input of placement or the assignment changes.
    pub(crate) version: u64,
    /// Decisions prepared for single adapter changes ([`Agent::prepare`]).
    pub(crate) prepared: Option<Prepared>,
    /// When [`Agent::urgent`] last marked an adapter down (the failover record's
    /// "data plane stopped answering" time).
    pub(crate) stopped_at: Option<(usize, Instant)>,
    /// Times the host watcher re-read addresses and routes (its own count).
    pub host_reads: Arc<std::sync::atomic::AtomicU64>,
    /// The VIPs as the host watcher classifies them.
    pub(crate) vipset: crate::runtime::VipSet,
    /// The cluster, when configured.
    pub(crate) cluster: Option<crate::cluster::ClusterRt>,
    /// Live reloads this process made (each one a new agent adopting the data plane).
    pub(crate) reloads: u64,
}

/// What a live reload carries from one agent to the next, which adopts the data plane:
/// the history `status` shows and the counters the metrics promise never go back.
pub struct History {
    failovers: VecDeque<FailoverStatus>,
    refusals: VecDeque<Refusal>,
    refusals_total: u64,
    hist_maps: Histogram,
    hist_announce: Histogram,
    started: f64,
    clients_moved: u64,
    corrections_sent: u64,
    announced: [u64; 3],
    /// Failover records match the announcer's reports by tag: tags go on from here.
    next_tag: u64,
    reloads: u64,
}

/// A decision made ahead: the assignment, its diff from the one in force, its refusals,
/// and (when it needs no new policy and re-points no VIP, as a failure at home never
/// does) the map writes themselves.
pub(crate) struct Ready {
    next: Arc<Assignment>,
    diff: placement::Diff,
    refusals: Vec<placement::Refusal>,
    plan: Option<Vec<Write>>,
    /// Per adapter: the decision if it changes state next (empty when not prepared).
    then: Vec<Option<Ready>>,
}

/// When a failover's steps happened, and whether its decision was prepared ahead.
struct Timing {
    /// The netlink event received.
    at: Instant,
    /// The adapter's entry written.
    dp_at: Instant,
    maps_at: Instant,
    prepared: bool,
}

/// Prepared pairs of changes are skipped above this many placements' worth of classes
/// (adapters x (adapters - 1) x classes): 3 adapters with 2,730 classes, 8 with 292.
const PREPARED_PAIRS_BUDGET: usize = 16_384;

/// One map write of a prepared decision.
pub(crate) enum Write {
    Adapter { ifindex: u32, info: AdapterInfo },
    Policy { id: u32, allowed: u64, buckets: Option<Arc<[Slot; placement::BUCKETS]>> },
}

pub(crate) struct Prepared {
    version: u64,
    /// Per adapter: the decision if it changed state now.
    flips: Vec<Option<Ready>>,
}

const MAX_FAILOVERS_KEPT: usize = 256;
const MAX_REFUSALS_KEPT: usize = 256;

/// The client address of a table entry.
pub fn flow_client(k: &FlowKey) -> IpAddr {
    let o = VipKey { addr: k.client, vlan: 0, family: k.family, _pad: 0 }.octets();
    if k.family == FAMILY_IPV4 {
        IpAddr::from([o[0], o[1], o[2], o[3]])
    } else {
        IpAddr::from(o)
    }
}

/// The VIP address of a table entry.
pub fn flow_vip(k: &FlowKey) -> IpAddr {
    flow_client(&FlowKey { client: k.vip, ..*k })
}

pub fn vip_key(addr: &IpAddr, vlan: u16) -> VipKey {
    match addr {
        IpAddr::V4(a) => VipKey::v4(a.octets(), vlan),
        IpAddr::V6(a) => VipKey::v6(a.octets(), vlan),
    }
}

fn xdp_mode(m: XdpModeCfg) -> XdpMode {
    match m {
        XdpModeCfg::Auto => XdpMode::Default,
        XdpModeCfg::Native => XdpMode::Driver,
        XdpModeCfg::Skb => XdpMode::Skb,
    }
}

/// The host as netlink reports it, for `Config::validate_host` and takeover checks.
pub struct NetlinkHost {
    pub links: Vec<Link>,
    pub addrs: Vec<(u32, Subnet)>,
    pub routes: Vec<(u32, Subnet)>,
}

impl NetlinkHost {
    pub fn read(rtnl: &mut Rtnl) -> anyhow::Result<NetlinkHost> {
        Ok(NetlinkHost { links: rtnl.links()?, addrs: rtnl.addresses()?, routes: rtnl.routes()? })
    }

    fn subnets(&self, ifindex: u32) -> (Vec<Subnet>, Vec<Subnet>) {
        // VLAN devices on top of the adapter count as the adapter's.
        let on: HashSet<u32> =
            self.links.iter().filter(|l| l.ifindex == ifindex || l.lower == Some(ifindex)).map(|l| l.ifindex).collect();
        let pick = |v: &[(u32, Subnet)]| v.iter().filter(|(i, _)| on.contains(i)).map(|(_, s)| s.clone()).collect();
        (pick(&self.addrs), pick(&self.routes))
    }

    /// Where a VIP may be taken over onto this adapter: its addresses' and routes'
    /// subnets. A default route is no sign of being in a subnet (as in validation).
    pub fn takeover_subnets(&self, ifindex: u32) -> Vec<Subnet> {
        let (mut a, r) = self.subnets(ifindex);
        a.extend(r.into_iter().filter(|s| s.prefix > 0));
        a
    }

    /// [`NetlinkHost::takeover_subnets`] of each named adapter (empty when missing).
    pub fn subnets_of(&self, names: &[String]) -> Vec<Vec<Subnet>> {
        names
            .iter()
            .map(|n| self.links.iter().find(|l| &l.name == n).map(|l| self.takeover_subnets(l.ifindex)).unwrap_or_default())
            .collect()
    }
}

impl HostView for NetlinkHost {
    fn adapter(&self, name: &str) -> Option<HostAdapter> {
        let l = self.links.iter().find(|l| l.name == name)?;
        let (addrs, routes) = self.subnets(l.ifindex);
        Some(HostAdapter { ifindex: l.ifindex, addrs, routes })
    }
}

/// Mounts bpffs on /sys/fs/bpf when `pin_path` is under it and nothing is mounted there.
fn ensure_bpffs(pin_path: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let parent = pin_path.parent().unwrap_or(root);
    // Under `ip netns exec` the agent has a mount namespace of its own: a bpffs mounted
    // there (or one that is not the host's) goes with the agent, and the pins with it, so
    // the data plane would not outlive a SIGKILL as promised. Refuse rather than pretend.
    // The host's mount namespace: kthreadd's (kernel threads never leave the initial one),
    // or PID 1's where kthreadd is not visible.
    let host_pid = if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") { 2 } else { 1 };
    let own_ns = match (std::fs::metadata("/proc/self/ns/mnt"), std::fs::metadata(format!("/proc/{host_pid}/ns/mnt"))) {
        (Ok(a), Ok(b)) => std::os::unix::fs::MetadataExt::ino(&a) != std::os::unix::fs::MetadataExt::ino(&b),
        // Not readable: nothing to compare with.
        _ => false,
    };
    let private = || {
        anyhow::anyhow!(
            "pin_path {}: this agent runs in a mount namespace of its own (started under `ip netns exec`?) \
             and the bpffs there is not the host's: its pins would vanish with it. Run `vip-agent run --netns NAME` \
             from the host's mount namespace instead",
            pin_path.display()
        )
    };
    if is_bpffs(parent) {
        if own_ns {
            // The same bpffs as the host's at that path, or refuse.
            let host = Path::new(&format!("/proc/{host_pid}/root")).join(parent.strip_prefix("/").unwrap_or(parent));
            let dev = |p: &Path| std::fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::dev(&m));
            if dev(&host).is_some_and(|d| Some(d) != dev(parent)) || !is_bpffs(&host) {
                return Err(private());
            }
        }
        return Ok(());
    }
    if own_ns {
        return Err(private());
    }
    if parent.starts_with(root) && !is_bpffs(root) {
        let r = unsafe { libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        if r != 0 {
            anyhow::bail!("mounting bpffs on /sys/fs/bpf: {}", std::io::Error::last_os_error());
        }
        tracing::info!("mounted bpffs on /sys/fs/bpf");
        if is_bpffs(parent) {
            return Ok(());
        }
    }
    anyhow::bail!("pin_path {} is not on a BPF file system (bpffs)", pin_path.display())
}

/// The VIPs of the config, expanded, as the agent and placement see them.
pub fn vip_specs(cfg: &Config) -> (Vec<VipSpec>, Vec<placement::Vip>) {
    let vserver_of: HashMap<usize, u32> =
        cfg.virtual_servers.iter().enumerate().flat_map(|(s, v)| v.vips.iter().map(move |&i| (i, s as u32))).collect();
    let mut specs = Vec::with_capacity(cfg.all_vips.len());
    let mut pvips = Vec::with_capacity(cfg.all_vips.len());
    let homes: Vec<Arc<[Slot]>> = cfg.vips.iter().map(|v| v.adapters.iter().map(|&a| a as Slot).collect()).collect();
    for (i, &(t, addr)) in cfg.all_vips.iter().enumerate() {
        let v = &cfg.vips[t as usize];
        let vlan = v.vlan.unwrap_or(0);
        let mut flags = if v.mode == Mode::Spread { VIP_SPREAD } else { 0 };
        if let Some(&s) = vserver_of.get(&i) {
            flags |= vserver_flags(s);
        }
        specs.push(VipSpec { addr, vlan, key: vip_key(&addr, vlan), flags, table: t });
        pvips.push(placement::Vip {
            addr,
            vlan,
            homes: homes[t as usize].clone(),
            mode: v.mode,
            failover: v.failover,
            rebalance: v.rebalance,
            stay: false,
            takers: None,
        });
    }
    (specs, pvips)
}

/// The adapters as placement sees them, from the config and their takeover subnets.
pub fn placement_adapters(cfg: &Config, subnets: Vec<Vec<Subnet>>) -> Vec<placement::Adapter> {
    cfg.adapters
        .iter()
        .zip(subnets)
        .map(|(a, subnets)| placement::Adapter {
            name: a.name.clone(),
            node: 0,
            up: false,
            weight: a.weight,
            load: 0.0,
            max_vips: a.max_vips,
            vlans: a.vlans.clone(),
            subnets,
        })
        .collect()
}

impl Agent {
    /// Brings the agent up: validates against the host (nothing is touched if that
    /// fails), loads or adopts the data plane, prepares the adapters, probes the VIPs,
    /// places them, writes the maps and the host routes, announces. On any failure after
    /// the first change the host is restored.
    pub fn start(
        cfg: Config,
        object: &[u8],
        reload: bool,
        links: LinkEvents,
        ann: Announcer,
        (specs, pvips): (Arc<Vec<VipSpec>>, Arc<Vec<placement::Vip>>),
    ) -> anyhow::Result<Agent> {
        let mut rtnl = Rtnl::open()?;
        let nh = NetlinkHost::read(&mut rtnl)?;
        if let Err(e) = cfg.validate_host(&nh) {
            return Err(crate::ConfigInvalid(e).into());
        }
        if cfg.adapters.len() > MAX_ADAPTERS as usize {
            anyhow::bail!("{} adapters configured; the data plane supports {MAX_ADAPTERS}", cfg.adapters.len());
        }
        let lo = nh.links.iter().find(|l| l.name == "lo").map(|l| l.ifindex).unwrap_or(1);
        // The record of host changes first: an unreadable one stops us before any change.
        let after_agent = names::PINNED_MAPS.iter().any(|n| cfg.agent.pin_path.join(n).exists());
        let host = Host::open(state_file(&cfg), after_agent)?;
        ensure_bpffs(&cfg.agent.pin_path)?;
        let pin = cfg.agent.pin_path.clone();
        let fresh_pins = !pin.exists();
        std::fs::create_dir_all(&pin)?;
        let log_level = cfg.agent.ebpf_log as u8;
        let dp = match Dataplane::load_pinned(object, &pin, log_level) {
            Ok(dp) => dp,
            Err(e) => {
                if fresh_pins {
                    for n in names::PINNED_MAPS {
                        let _ = std::fs::remove_file(pin.join(n));
                    }
                    let _ = std::fs::remove_dir(&pin);
                }
                return Err(e.into());
            }
        };
        let mut dp = dp;
        dp.set_learn_from_traffic(cfg.steering.learn_from_traffic)?;
        // The programs this load made replace the attached ones when the log level
        // changes, and whenever logging is on: only this load's log ring is read.
        let reload = reload || log_level != 0 || dp.attached_log_level() != log_level;
        let now = unix_now();
        let names: Vec<String> = cfg.adapters.iter().map(|a| a.name.clone()).collect();
        let padapters = placement_adapters(&cfg, nh.subnets_of(&names));
        let adapters = cfg
            .adapters
            .iter()
            .enumerate()
            .map(|(i, c)| AdapterRt {
                name: c.name.clone(),
                slot: i as u8,
                ifindex: None,
                mac: nh.links.iter().find(|l| l.name == c.name).and_then(|l| l.mac),
                health: Health::Missing,
                gen: 0,
                since: now,
                link: None,
                move_mac: c.move_mac,
                mac_at: None,
                last_bytes: None,
            })
            .collect();
        let by_key = specs.iter().enumerate().map(|(i, v)| (v.key, i as u32)).collect();
        let n = specs.len();
        let vservers = cfg
            .virtual_servers
            .iter()
            .map(|v| VserverRt {
                name: v.name.clone(),
                interface: v.interface.clone(),
                ifindex: None,
                mac: None,
                link: None,
                vips: v.vips.clone(),
            })
            .collect();
        let mut agent = Agent {
            cfg,
            links,
            dp,
            rtnl,
            host,
            ann,
            lo,
            adapters,
            padapters,
            nodes: vec![placement::Node { name: hostname(), up: true }],
            vips: specs,
            pvips,
            by_key,
            active: Arc::new(vec![false; n]),
            classes: Arc::new(Classes::default()),
            class_ids: HashMap::new(),
            class_sid: vec![],
            assignment: Arc::new(Assignment::default()),
            policies: Policies::default(),
            vip_policy: vec![u32::MAX; n],
            refusals_now: HashSet::new(),
            refusals: VecDeque::new(),
            refusals_total: 0,
            vservers,
            failovers: VecDeque::new(),
            tags: HashMap::new(),
            next_tag: 0,
            hist_maps: Histogram::default(),
            hist_announce: Histogram::default(),
            started: now,
            adopted: false,
            stopping: false,
            corrected: HashMap::new(),
            clients: Arc::new(ClientIndex::default()),
            clients_moved: 0,
            corrections_sent: 0,
            timers: BinaryHeap::new(),
            deferred: VecDeque::new(),
            version: 0,
            prepared: None,
            stopped_at: None,
            host_reads: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            vipset: Arc::default(),
            cluster: None,
            reloads: 0,
        };
        if let Err(e) = agent.bring_up(&nh.links, reload).and_then(|()| Ok(agent.dp.set_attached_log_level(log_level)?)) {
            // A restarted agent that fails leaves the previous agent's pins alone so
            // answering goes on; a first start takes back everything it did.
            if !agent.adopted {
                agent.shutdown();
            }
            return Err(e);
        }
        Ok(agent)
    }

    fn bring_up(&mut self, links: &[Link], reload: bool) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let pin = self.cfg.agent.pin_path.clone();
        let mode = xdp_mode(self.cfg.agent.xdp_mode);
        let in_map: HashMap<VipKey, vip_common::VipInfo> = self.dp.vip_entries()?.into_iter().collect();
        self.adopted = !in_map.is_empty() || !self.dp.adapters()?.is_empty();
        let ipv6 = self.vips.iter().any(|v| v.addr.is_ipv6());
        self.host.prepare_host(ipv6)?;
        let mut configured = HashSet::new();
        for i in 0..self.adapters.len() {
            let Some(link) = links.iter().find(|l| l.name == self.adapters[i].name).cloned() else {
                tracing::warn!(adapter = %self.adapters[i].name, "adapter not present; waiting for it");
                continue;
            };
            configured.insert(link.ifindex);
            self.attach(i, &link, mode, reload, None)?;
        }
        for i in 0..self.vservers.len() {
            let Some(link) = links.iter().find(|l| l.name == self.vservers[i].interface).cloned() else {
                anyhow::bail!("virtual server {}: interface {} not present", self.vservers[i].name, self.vservers[i].interface);
            };
            configured.insert(link.ifindex);
            self.attach_vserver(i, &link, mode, reload)?;
        }
        // Entries and pins a previous agent left for adapters no longer configured.
        for (ifindex, _) in self.dp.adapters()? {
            if !configured.contains(&ifindex) {
                self.dp.remove_adapter(ifindex)?;
            }
        }
        for e in std::fs::read_dir(&pin)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ix = ["link_", "egress_", "ingress_", "vs_"].iter().find_map(|p| name.strip_prefix(p));
            if let Some(ix) = ix.and_then(|n| n.parse::<u32>().ok()) {
                if !configured.contains(&ix) {
                    tracing::info!(ifindex = ix, "removing a stale link pin");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let stale: Vec<VipKey> = in_map.keys().filter(|k| !self.by_key.contains_key(k)).copied().collect();
        if !stale.is_empty() {
            tracing::info!(vips = stale.len(), "removing VIPs no longer configured from the data plane");
            self.dp.remove_vips(&stale)?;
        }
        // VIPs already in an adopted map are ours: probing them would find ourselves.
        let mut active = vec![true; self.vips.len()];
        if self.cfg.probe.enabled {
            self.probe(&in_map, &mut active)?;
        }
        self.active = Arc::new(active);
        // An adopted map's VIPs keep answering through their old policies until moved to
        // new ones: the new ones are allocated elsewhere.
        self.policies = Policies::avoiding(in_map.values().map(|v| v.policy));
        self.reclassify(None);
        let t_maps = t0.elapsed();
        // A virtual server's VIPs are its own: the host does not hold them.
        let keep: HashSet<IpAddr> = self
            .vips
            .iter()
            .zip(self.active.iter())
            .filter(|(v, a)| **a && v.flags & vip_common::VIP_VSERVER == 0)
            .map(|(v, _)| v.addr)
            .collect();
        let keep: Vec<IpAddr> = keep.into_iter().collect();
        self.host.set_vips(&mut self.rtnl, self.lo, &keep)?;
        self.publish_vips();
        self.discover_vservers();
        // Start-up's transient allocations (probe lists, map dumps, the classification)
        // go back to the system instead of staying in the process's resident set.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::info!(
            adapters = self.adapters.iter().filter(|a| a.health != Health::Missing).count(),
            vips = self.active.iter().filter(|a| **a).count(),
            classes = self.classes.len(),
            adopted = self.adopted,
            maps_ms = t_maps.as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "agent up"
        );
        Ok(())
    }

    /// Conflict probes for every VIP not already in an adopted map (seed 002: "address
    /// not used by another cluster member"): those another host answers for are refused.
    fn probe(&mut self, in_map: &HashMap<VipKey, vip_common::VipInfo>, active: &mut [bool]) -> anyhow::Result<()> {
        let mut targets = vec![];
        for (i, v) in self.vips.iter().enumerate() {
            if in_map.contains_key(&v.key) {
                continue;
            }
            // One adapter per VIP probes (its first own adapter that is up); all listen.
            let from = self.pvips[i]
                .homes
                .iter()
                .map(|&h| &self.adapters[h as usize])
                .filter(|a| a.health.answers())
                .find_map(|a| Some((a.ifindex?, a.mac?)));
            targets.push(ProbeTarget { vip: i as u32, addr: v.addr, vlan: v.vlan, from });
        }
        if targets.is_empty() {
            return Ok(());
        }
        let listen: Vec<u32> = self.adapters.iter().filter(|a| a.health.answers()).filter_map(|a| a.ifindex).collect();
        let ours: HashSet<Mac> = self.adapters.iter().filter_map(|a| a.mac).collect();
        let p = &self.cfg.probe;
        let found = conflict::probe(&targets, &listen, &ours, p.count, Duration::from_millis(p.wait_ms), p.max_per_second)?;
        let mut found: Vec<(u32, conflict::Conflict)> = found.into_iter().collect();
        found.sort_by_key(|f| f.0);
        for (i, c) in found {
            active[i as usize] = false;
            let v = &self.vips[i as usize];
            let reason = format!("address in use: {} from {}", c.what, mac_str(&c.mac));
            tracing::warn!(vip = %v.addr, vlan = v.vlan, %reason, "VIP refused");
            self.push_refusal(Refusal { at: unix_now(), vip: v.addr.to_string(), count: 1, adapter: None, reason });
        }
        Ok(())
    }

    /// Attaches the responder to an adapter that is present (or adopts the pinned
    /// attachment a previous agent left), and puts it in the map.
    fn attach(&mut self, i: usize, link: &Link, mode: XdpMode, reload: bool, initial: Option<Health>) -> anyhow::Result<()> {
        let path = self.cfg.agent.pin_path.join(format!("link_{}", link.ifindex));
        self.host.prepare_adapter(&link.name)?;
        if !self.padapters[i].vlans.is_empty() {
            if let Err(e) = self.host.disable_rxvlan(&link.name) {
                tracing::warn!(adapter = %link.name, error = %e, "could not turn RX VLAN offload off; tagged requests may not be answered");
            }
        }
        let pinned = if path.exists() {
            match PinnedLink::from_pin(&path) {
                Ok(p) if reload => {
                    self.dp.replace_in_link(p)?;
                    tracing::info!(adapter = %link.name, "program replaced in the pinned link");
                    Some(PinnedLink::from_pin(&path)?)
                }
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(adapter = %link.name, error = %e, "stale link pin");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        } else {
            None
        };
        let pinned = match pinned {
            Some(p) => p,
            None => self.dp.attach_pinned(link.ifindex, mode, &path)?,
        };
        let path = self.cfg.agent.pin_path.join(format!("ingress_{}", link.ifindex));
        self.dp.attach_tc_pinned(names::INGRESS_PROGRAM, &link.name, &path, reload)?;
        if self.cfg.steering.egress {
            let path = self.cfg.agent.pin_path.join(format!("egress_{}", link.ifindex));
            self.dp.attach_tc_pinned(names::EGRESS_PROGRAM, &link.name, &path, reload)?;
        }
        if let Some(mac) = link.mac {
            if let Some(old) = self.adapters[i].mac.filter(|m| *m != mac) {
                self.dp.remove_mac(old)?;
            }
            self.dp.set_mac(mac, link.ifindex)?;
        }
        self.ann.send(Job::AddAdapter { ifindex: link.ifindex });
        let a = &mut self.adapters[i];
        a.link = Some(pinned);
        a.ifindex = Some(link.ifindex);
        a.mac = link.mac;
        a.health = initial.unwrap_or(if link.running { Health::Up } else { Health::Down });
        a.gen += 1;
        a.since = unix_now();
        let state = a.health.name();
        self.padapters[i].up = a.health.answers();
        self.version += 1;
        self.write_adapter(i, None)?;
        tracing::info!(adapter = %link.name, ifindex = link.ifindex, state, "adapter attached");
        Ok(())
    }

    /// Writes adapter `i`'s entry: its state, and while it is down its heir (with the
    /// MAC-moved flag when its MAC moves there).
    pub(crate) fn write_adapter(&mut self, i: usize, heir: Option<Slot>) -> anyhow::Result<()> {
        let a = &self.adapters[i];
        let Some(ifindex) = a.ifindex else { return Ok(()) };
        let up = a.health.answers();
        let state = if up { ADAPTER_UP } else { ADAPTER_DOWN };
        let heir = if up { None } else { heir.and_then(|h| self.adapters[h as usize].ifindex) };
        let flags = if heir.is_some() && a.move_mac { ADAPTER_MAC_MOVED } else { 0 };
        let info = AdapterInfo { mac: a.mac.unwrap_or_default(), slot: a.slot, state, heir: heir.unwrap_or(0), flags };
        self.dp.set_adapter(ifindex, info)?;
        Ok(())
    }

    pub(crate) fn up_mask(&self) -> u64 {
        placement::up_mask(&self.nodes, &self.padapters)
    }

    /// Classifies the VIPs again (at start, or with `next` from the host watcher when the
    /// adapters' addresses changed), carries the assignment over and places.
    pub(crate) fn reclassify(&mut self, next: Option<(Vec<Vec<Subnet>>, Arc<Classes>)>) {
        let classes = match next {
            Some((subnets, classes)) => {
                for (a, s) in self.padapters.iter_mut().zip(subnets) {
                    a.subnets = s;
                }
                classes
            }
            None => {
                let active = self.active.iter().enumerate().filter(|(_, a)| **a).map(|(i, _)| i as u32);
                Arc::new(placement::classify(&self.pvips, active, &self.padapters))
            }
        };
        let carried = self.assignment.carry(&self.classes, &classes);
        self.class_sid = classes
            .list
            .iter()
            .map(|c| {
                let n = self.class_ids.len() as u32;
                *self.class_ids.entry(c.key.clone()).or_insert(n)
            })
            .collect();
        self.classes = classes;
        self.assignment = Arc::new(carried);
        let d = placement::place(&placement::Input {
            nodes: &self.nodes,
            adapters: &self.padapters,
            classes: &self.classes,
            previous: &self.assignment,
        });
        let df = placement::diff(&self.assignment, &d.assignment);
        let next = Arc::new(d.assignment);
        self.apply_maps(&df, &next);
        self.reconcile(&next);
        self.assignment = next;
        self.version += 1;
        self.report_refusals(&d.refusals);
        self.announce(&df, None, Instant::now());
    }

    /// Places again after a change of health or load, and applies the difference.
    /// Returns the diff and when the maps were written.
    pub(crate) fn decide(&mut self) -> (placement::Diff, Instant) {
        let d = placement::place(&placement::Input {
            nodes: &self.nodes,
            adapters: &self.padapters,
            classes: &self.classes,
            previous: &self.assignment,
        });
        let df = placement::diff(&self.assignment, &d.assignment);
        let next = Arc::new(d.assignment);
        self.apply_maps(&df, &next);
        let at = Instant::now();
        self.assignment = next;
        self.version += 1;
        self.report_refusals(&d.refusals);
        (df, at)
    }

    /// Prepares, in an idle moment, the decision that would follow each adapter changing
    /// state (up to down, or down to up), so that a carrier event only has to apply a
    /// ready diff: the placement core's work never sits between a failure and the maps.
    /// On small nodes it also prepares every second change after the first (a switch
    /// taking two ports down at once sends two events microseconds apart). Looks at link
    /// events between adapters; anything that happens meanwhile makes what was prepared
    /// stale, and the next idle moment prepares again.
    pub fn prepare(&mut self) {
        if self.stopping || self.prepared.as_ref().is_some_and(|p| p.version == self.version) {
            return;
        }
        let version = self.version;
        let n = self.adapters.len();
        // Pairs cost A x (A - 1) placements: only while that stays a small amount of work.
        let depth = usize::from(n * n.saturating_sub(1) * self.classes.list.len().max(1) <= PREPARED_PAIRS_BUDGET);
        let current = self.assignment.clone();
        let mut flips = Vec::with_capacity(n);
        for i in 0..n {
            flips.push(self.flippable(i).then(|| self.ready_after(i, &current, depth)));
            self.preempt();
            if !self.deferred.is_empty() {
                return;
            }
        }
        self.prepared = Some(Prepared { version, flips });
    }

    fn flippable(&self, i: usize) -> bool {
        self.adapters[i].health != Health::Missing && self.adapters[i].ifindex.is_some()
    }

    /// The decision after adapter `i` changes state from `previous` (and, `depth` more
    /// levels down, after each other adapter changes next).
    fn ready_after(&mut self, i: usize, previous: &Assignment, depth: usize) -> Ready {
        self.padapters[i].up = !self.padapters[i].up;
        let d = placement::place(&placement::Input {
            nodes: &self.nodes,
            adapters: &self.padapters,
            classes: &self.classes,
            previous,
        });
        let diff = placement::diff(previous, &d.assignment);
        let plan = self.plan(&diff);
        // A decision that re-lays runs changes the policies a next plan would name.
        let then = match (&plan, depth) {
            (Some(_), 1..) => (0..self.adapters.len())
                .map(|j| (j != i && self.flippable(j)).then(|| self.ready_after(j, &d.assignment, depth - 1)))
                .collect(),
            _ => vec![],
        };
        self.padapters[i].up = !self.padapters[i].up;
        Ready { next: Arc::new(d.assignment), diff, refusals: d.refusals, plan, then }
    }

    /// The writes a diff makes, if it needs no new policy and re-points no VIP. Adapter
    /// entries are as `padapters` says now (the flipped adapter included).
    fn plan(&self, diff: &placement::Diff) -> Option<Vec<Write>> {
        let mut plan = vec![];
        for &(a, _, h) in &diff.heirs {
            let ad = &self.adapters[a as usize];
            let Some(ifindex) = ad.ifindex else { continue };
            let up = self.padapters[a as usize].up;
            let heir = if up { None } else { h.and_then(|h| self.adapters[h as usize].ifindex) };
            let flags = if heir.is_some() && ad.move_mac { ADAPTER_MAC_MOVED } else { 0 };
            let state = if up { ADAPTER_UP } else { ADAPTER_DOWN };
            let info = AdapterInfo { mac: ad.mac.unwrap_or_default(), slot: ad.slot, state, heir: heir.unwrap_or(0), flags };
            plan.push(Write::Adapter { ifindex, info });
        }
        for seg in &diff.segments {
            if seg.relayout() {
                return None;
            }
            let id = self.policies.get(self.class_sid[seg.class as usize], seg.after.start)?;
            plan.push(Write::Policy { id, allowed: seg.after.allowed, buckets: seg.after.buckets.clone() });
        }
        Some(plan)
    }

    /// The decision prepared for adapter `i` changing state, if it is still current.
    fn take_ready(&mut self, i: usize) -> Option<Ready> {
        let p = self.prepared.as_mut().filter(|p| p.version == self.version)?;
        p.flips.get_mut(i)?.take()
    }

    /// Applies a prepared decision (as [`Agent::decide`] would have made it): its planned
    /// writes, a few stores to shared memory, or the applier for the rare decision that
    /// re-lays runs.
    fn apply_ready(&mut self, r: Ready) -> (placement::Diff, Instant) {
        let Ready { next, diff, refusals, plan, then } = r;
        // Debug builds (the ones the namespace tests run) check that what was prepared
        // is what would be decided now.
        #[cfg(debug_assertions)]
        {
            let now = placement::place(&placement::Input {
                nodes: &self.nodes,
                adapters: &self.padapters,
                classes: &self.classes,
                previous: &self.assignment,
            });
            assert!(now.assignment == *next, "a prepared decision differs from the decision made now");
        }
        match &plan {
            Some(plan) => {
                for w in plan {
                    let done = match w {
                        Write::Adapter { ifindex, info } => self.dp.set_adapter(*ifindex, *info),
                        Write::Policy { id, allowed, buckets } => match buckets {
                            Some(b) => self.dp.set_buckets(*id, &b[..]).and_then(|()| self.dp.set_policy(*id, *allowed)),
                            None => self.dp.set_policy(*id, *allowed),
                        },
                    };
                    if let Err(e) = done {
                        tracing::error!(error = %e, "map write failed");
                    }
                }
            }
            None => self.apply_maps(&diff, &next),
        }
        let at = Instant::now();
        self.assignment = next;
        self.version += 1;
        // The next change, if prepared, is ready too.
        if plan.is_some() && !then.is_empty() {
            self.prepared = Some(Prepared { version: self.version, flips: then });
        }
        self.report_refusals(&refusals);
        (diff, at)
    }

    /// Says the refusals that are new since the last decision (once per change).
    fn report_refusals(&mut self, now: &[placement::Refusal]) {
        let current: HashSet<placement::Refusal> = now.iter().cloned().collect();
        for r in now {
            if self.refusals_now.contains(r) {
                continue;
            }
            let Some(c) = self.classes.list.get(r.class as usize) else { continue };
            let Some(&first) = c.members.get(r.start as usize) else { continue };
            let vip = self.vips[first as usize].addr;
            let adapter = r.adapter.map(|s| self.adapters[s as usize].name.clone());
            let reason = r.reason.to_string();
            tracing::warn!(%vip, vips = r.len, adapter = adapter.as_deref().unwrap_or(""), %reason, "takeover refused");
            self.push_refusal(Refusal { at: unix_now(), vip: vip.to_string(), count: r.len, adapter, reason });
        }
        self.refusals_now = current;
    }

    fn push_refusal(&mut self, r: Refusal) {
        self.refusals_total += 1;
        self.refusals.push_back(r);
        while self.refusals.len() > MAX_REFUSALS_KEPT {
            self.refusals.pop_front();
        }
    }

    pub(crate) fn new_tag(&mut self, at: Instant) -> u64 {
        self.next_tag += 1;
        self.tags.insert(self.next_tag, at);
        if self.tags.len() > MAX_FAILOVERS_KEPT {
            let oldest = *self.tags.keys().min().expect("not empty");
            self.tags.remove(&oldest);
        }
        self.next_tag
    }

    /// The announcer sent the first frame of a tagged job from `ifindex`.
    pub fn on_sent(&mut self, tag: u64, ifindex: u32, at: Instant) {
        let Some(&event) = self.tags.get(&tag) else { return };
        let Some(name) = self.adapters.iter().find(|a| a.ifindex == Some(ifindex)).map(|a| a.name.clone()) else { return };
        let ns = at.saturating_duration_since(event).as_nanos() as u64;
        if let Some(f) = self.failovers.iter_mut().rev().find(|f| f.tag == Some(tag)) {
            if f.first_announcement_ns.is_none() {
                f.first_announcement_ns = Some(ns);
                self.hist_announce.observe(ns);
            }
            if !f.announced_from.contains(&name) {
                f.announced_from.push(name);
                f.announced_from.sort();
            }
        }
    }

    /// VIPs answered on adapter `i` under the current assignment.
    fn answered_on(&self, i: usize) -> usize {
        let b = bit(i as Slot) & self.assignment.up;
        self.assignment.classes.iter().flat_map(|p| &p.runs).filter(|r| r.allowed & b != 0).map(|r| r.len as usize).sum()
    }

    /// The adapter lost its link (or hold-down ran out, or it was removed): stop answering
    /// there first (one store), then place, apply, move its MAC, announce.
    fn fail(&mut self, i: usize, at: Instant, kind: &str) {
        let ready = if self.padapters[i].up { self.take_ready(i) } else { None };
        self.padapters[i].up = false;
        // First of all: the adapter stops answering, its heir in the same store.
        let heir = match &ready {
            Some(r) => r.next.heirs.get(i).copied().flatten(),
            None => placement::heir(i, &self.padapters, self.up_mask(), &self.assignment),
        };
        let dp_at = match self.stopped_at.take() {
            // Already written by `urgent`, with the same heir.
            Some((j, t)) if j == i && t >= at => t,
            _ => {
                if let Err(e) = self.write_adapter(i, heir) {
                    tracing::error!(adapter = %self.adapters[i].name, error = %e, "adapter map write failed");
                }
                Instant::now()
            }
        };
        let carried = self.answered_on(i);
        let prepared = ready.is_some();
        let (df, maps_at) = match ready {
            Some(r) => self.apply_ready(r),
            None => self.decide(),
        };
        if let Some(ix) = self.adapters[i].ifindex {
            self.ann.send(Job::Clear { ifindex: ix });
        }
        let tag = self.new_tag(at);
        self.after_decision(&df, tag, maps_at);
        self.record(i, kind, Timing { at, dp_at, maps_at, prepared }, tag, carried);
    }

    /// The adapter is back (after up_delay): answer there again, bring home what was
    /// taken over, take its MAC back, announce on it.
    fn restore(&mut self, i: usize, at: Instant) {
        let ready = if self.padapters[i].up { None } else { self.take_ready(i) };
        self.padapters[i].up = true;
        if let Err(e) = self.write_adapter(i, None) {
            tracing::error!(adapter = %self.adapters[i].name, error = %e, "adapter map write failed");
        }
        let dp_at = Instant::now();
        let prepared = ready.is_some();
        let (df, maps_at) = match ready {
            Some(r) => self.apply_ready(r),
            None => self.decide(),
        };
        let tag = self.new_tag(at);
        self.after_decision(&df, tag, maps_at);
        self.refresh_neighbours(i);
        let n = self.answered_on(i);
        self.record(i, "up", Timing { at, dp_at, maps_at, prepared }, tag, n);
    }

    /// What follows a decision once the maps are written: MACs that move, announcements,
    /// clients to move.
    fn after_decision(&mut self, df: &placement::Diff, tag: u64, now: Instant) {
        self.move_macs(df, tag, now);
        self.announce(df, Some(tag), now);
    }

    /// A returning adapter: the node's own first neighbour requests through it may have
    /// been lost (the switch port not forwarding yet, or still sending the adapter's MAC
    /// to its heir), and the kernel would wait a second before asking again while replies
    /// queue. A helper thread forgets the unresolved entries shortly after, twice.
    fn refresh_neighbours(&self, i: usize) {
        let Some(ifindex) = self.adapters[i].ifindex else { return };
        let name = self.adapters[i].name.clone();
        let spawned = std::thread::Builder::new().name("neigh-refresh".into()).spawn(move || {
            // Not the event loop's real-time priority.
            let param = libc::sched_param { sched_priority: 0 };
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_OTHER, &param) };
            let Ok(mut rtnl) = Rtnl::open() else { return };
            for wait in [10, 90] {
                std::thread::sleep(Duration::from_millis(wait));
                match rtnl.flush_unresolved(ifindex) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(adapter = %name, entries = n, "unresolved neighbour entries cleared after the adapter's return"),
                    Err(e) => tracing::debug!(adapter = %name, error = %e, "neighbour refresh"),
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no neighbour refresh thread");
        }
    }

    /// A straggler event from the data plane: a client sent a VIP's traffic to a failed
    /// adapter's MAC. It is told the adapter it should use (at most once per
    /// `correction_interval_ms`).
    pub fn on_straggler(&mut self, ev: &Straggler) {
        let now = Instant::now();
        let gap = Duration::from_millis(self.cfg.steering.correction_interval_ms);
        if self.corrected.get(&ev.flow).is_some_and(|t| now.duration_since(*t) < gap) {
            return;
        }
        let k = &ev.flow;
        let key = VipKey { addr: k.vip, vlan: k.vlan, family: k.family, _pad: 0 };
        let Some(&vi) = self.by_key.get(&key) else { return };
        let Some(run) = self.assignment.run_of(&self.classes, vi) else { return };
        let answering = run.allowed & self.assignment.up;
        let flow_adapter = self.dp.flow(k).and_then(|f| self.adapters.iter().position(|a| a.ifindex == Some(f.ifindex)));
        let target = match flow_adapter {
            Some(j) if answering & bit(j as Slot) != 0 => Some(j),
            _ => match &run.buckets {
                Some(b) => Some(b[client_bucket(&k.client) as usize] as usize).filter(|&j| answering & bit(j as Slot) != 0),
                None => placement::slots(answering).next().map(|s| s as usize),
            },
        };
        let Some(j) = target else { return };
        let (Some(ix), Some(mac)) = (self.adapters[j].ifindex, self.adapters[j].mac) else { return };
        let v = &self.vips[vi as usize];
        let frame = announce::unicast_frame(mac, v.addr, v.vlan, ev.client_mac, flow_client(k));
        self.ann.send(Job::Frame { ifindex: ix, frame, key: flow_hash(k), tag: None });
        self.corrected.insert(*k, now);
        self.corrections_sent += 1;
        tracing::info!(vip = %v.addr, client = %flow_client(k), to = %self.adapters[j].name, sent_to = %mac_str(&ev.to_mac), "straggler corrected");
    }

    /// New traffic totals per slot and a fresh client index (from the housekeeping
    /// thread): updates each adapter's load, forgets old straggler rate-limit entries,
    /// asks for virtual servers' MACs not learned yet.
    pub fn on_housekeeping(&mut self, traffic: &[vip_common::Traffic], clients: Arc<ClientIndex>, now: Instant) {
        for (i, a) in self.adapters.iter_mut().enumerate() {
            let Some(t) = traffic.get(a.slot as usize) else { continue };
            let bytes = t.rx_bytes + t.tx_bytes;
            if let Some((then, before)) = a.last_bytes {
                let dt = now.duration_since(then).as_secs_f64();
                if dt > 0.0 {
                    let rate = bytes.saturating_sub(before) as f64 / dt;
                    // Smoothed over about two samples: a burst counts, a blip fades.
                    self.padapters[i].load = 0.5 * self.padapters[i].load + 0.5 * rate;
                }
            }
            a.last_bytes = Some((now, bytes));
        }
        self.clients = clients;
        // Loads are placement inputs: what was prepared is stale.
        self.version += 1;
        let gap = Duration::from_millis(self.cfg.steering.correction_interval_ms);
        self.corrected.retain(|_, t| now.duration_since(*t) < gap);
        self.discover_vservers();
    }

    /// Attaches the data plane to a virtual server's interface (pinned like an adapter's)
    /// and points the VSERVERS device map at it.
    fn attach_vserver(&mut self, i: usize, link: &Link, mode: XdpMode, reload: bool) -> anyhow::Result<()> {
        let path = self.cfg.agent.pin_path.join(format!("vs_{}", link.ifindex));
        let pinned = match PinnedLink::from_pin(&path) {
            Ok(p) if reload => {
                self.dp.replace_in_link(p)?;
                PinnedLink::from_pin(&path)?
            }
            Ok(p) => p,
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                self.dp.attach_pinned(link.ifindex, mode, &path)?
            }
        };
        let mac = link.mac.unwrap_or_default();
        self.dp.set_adapter(link.ifindex, AdapterInfo { mac, slot: i as u8, state: ADAPTER_VSERVER, heir: 0, flags: 0 })?;
        self.dp.set_vserver(i as u32, link.ifindex)?;
        let v = &mut self.vservers[i];
        (v.ifindex, v.mac, v.link) = (Some(link.ifindex), link.mac, Some(pinned));
        tracing::info!(vserver = %v.name, interface = %link.name, ifindex = link.ifindex, "virtual server attached");
        Ok(())
    }

    /// Asks each virtual server whose MAC the data plane has not learned yet for it (an
    /// ARP probe for its first VIP from its interface); the data plane learns it from the
    /// reply. Called at start and on every housekeeping tick until known.
    pub fn discover_vservers(&mut self) {
        for (i, v) in self.vservers.iter().enumerate() {
            let (Some(ix), Some(mac)) = (v.ifindex, v.mac) else { continue };
            if self.dp.vserver_mac(i as u32).is_some() {
                continue;
            }
            let Some(IpAddr::V4(ip)) = v.vips.first().map(|&x| self.vips[x].addr) else { continue };
            let probe = vip_packet::Arp::request(mac, std::net::Ipv4Addr::UNSPECIFIED, ip).to_bytes();
            match crate::packet::PacketSocket::open(ix, false).and_then(|s| s.send(&probe)) {
                Ok(()) => tracing::debug!(vserver = %v.name, "asked for its MAC"),
                Err(e) => tracing::warn!(vserver = %v.name, error = %e, "could not ask for its MAC"),
            }
        }
    }

    /// Takes the straggler event ring (once).
    /// The reader of the data plane's own log records (`[agent] ebpf_log`).
    pub fn take_logs(&mut self) -> Option<crate::dataplane::EbpfLog> {
        self.dp.take_logs()
    }

    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.dp.take_events()
    }

    fn record(&mut self, i: usize, kind: &str, t: Timing, tag: u64, vips: usize) {
        let Timing { at, dp_at, maps_at, prepared } = t;
        let maps_ns = maps_at.saturating_duration_since(at).as_nanos() as u64;
        let dp_ns = dp_at.saturating_duration_since(at).as_nanos() as u64;
        self.hist_maps.observe(maps_ns);
        let event_unix_ns = ((unix_now() - at.elapsed().as_secs_f64()) * 1e9) as u64;
        tracing::info!(
            adapter = %self.adapters[i].name,
            kind,
            vips,
            event_unix_ns,
            dataplane_ns = dp_ns,
            maps_written_ns = maps_ns,
            prepared,
            "failover"
        );
        self.failovers.push_back(FailoverStatus {
            at: unix_now() - at.elapsed().as_secs_f64(),
            adapter: self.adapters[i].name.clone(),
            kind: kind.into(),
            vips,
            dataplane_ns: dp_ns,
            maps_written_ns: maps_ns,
            prepared,
            first_announcement_ns: None,
            announced_from: vec![],
            tag: Some(tag),
        });
        while self.failovers.len() > MAX_FAILOVERS_KEPT {
            self.failovers.pop_front();
        }
    }

    fn set_health(&mut self, i: usize, h: Health) {
        let a = &mut self.adapters[i];
        a.health = h;
        a.gen += 1;
        a.since = unix_now();
    }

    fn start_timer(&mut self, i: usize, after_ms: u64) {
        let t = Timer { adapter: i, gen: self.adapters[i].gen };
        self.timers.push(Reverse((Instant::now() + Duration::from_millis(after_ms), t)));
    }

    /// When the next hold-down or up-delay timer runs out.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Runs the timers that are due.
    pub fn run_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, timer))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            self.on_timer(&timer);
            self.sync_cluster();
        }
    }

    /// A hold-down or up-delay timer ran out.
    fn on_timer(&mut self, t: &Timer) {
        if self.stopping || self.adapters[t.adapter].gen != t.gen {
            return;
        }
        let at = Instant::now();
        match self.adapters[t.adapter].health {
            Health::HoldDown => {
                self.set_health(t.adapter, Health::Down);
                self.fail(t.adapter, at, "down");
            }
            Health::UpDelay => {
                self.set_health(t.adapter, Health::Up);
                self.restore(t.adapter, at);
            }
            _ => {}
        }
    }

    /// The urgent part of a link event, safe at any moment (even in the middle of a long
    /// operation) and done first for every event: an adapter that lost its carrier stops
    /// answering at once (one store, its heir with it), before any bookkeeping.
    pub(crate) fn urgent(&mut self, ev: &LinkEvent) {
        let LinkEvent::Changed(link) = ev else { return };
        if self.cfg.agent.hold_down_ms > 0 || link.running {
            return;
        }
        let Some(i) = self.adapters.iter().position(|a| a.ifindex == Some(link.ifindex)) else { return };
        if self.adapters[i].health != Health::Up || link.name != self.adapters[i].name {
            return;
        }
        let heir = match self.prepared.as_ref().filter(|p| p.version == self.version).and_then(|p| p.flips.get(i)?.as_ref()) {
            Some(r) => r.next.heirs.get(i).copied().flatten(),
            None => {
                self.padapters[i].up = false;
                let h = placement::heir(i, &self.padapters, self.up_mask(), &self.assignment);
                self.padapters[i].up = true;
                h
            }
        };
        let a = &self.adapters[i];
        let (Some(ifindex), mac) = (a.ifindex, a.mac.unwrap_or_default()) else { return };
        let heir_ix = heir.and_then(|h| self.adapters[h as usize].ifindex);
        let flags = if heir_ix.is_some() && a.move_mac { ADAPTER_MAC_MOVED } else { 0 };
        let info = AdapterInfo { mac, slot: a.slot, state: ADAPTER_DOWN, heir: heir_ix.unwrap_or(0), flags };
        let _ = self.dp.set_adapter(ifindex, info);
        self.stopped_at = Some((i, Instant::now()));
    }

    /// Link events read while a long operation runs: their urgent part is done now, the
    /// rest when the operation ends.
    pub(crate) fn preempt(&mut self) {
        while let Ok(Some((at, evs))) = self.links.try_recv() {
            for ev in evs {
                self.urgent(&ev);
                self.deferred.push_back((at, ev));
            }
        }
    }

    /// Handles one link event received at `at`.
    pub fn on_event(&mut self, ev: &LinkEvent, at: Instant) {
        if self.stopping {
            return;
        }
        match ev {
            LinkEvent::Removed { ifindex, .. } => {
                if let Some(i) = self.adapters.iter().position(|a| a.ifindex == Some(*ifindex)) {
                    self.gone(i, at);
                }
            }
            LinkEvent::Changed(link) => self.on_link(link, at),
            // Followed by the host watcher, on a socket of its own.
            LinkEvent::Addresses => {}
        }
        // After the maps: the cluster learns which ports this node has left.
        self.sync_cluster();
    }

    /// The adapter's device went away or was renamed: forget it (its attachment went
    /// with the device) and fail over.
    fn gone(&mut self, i: usize, at: Instant) {
        let Some(ifindex) = self.adapters[i].ifindex else { return };
        let was_answering = self.adapters[i].health.answers();
        self.set_health(i, Health::Missing);
        if was_answering {
            self.fail(i, at, "removed");
        } else {
            // Already failed over: nothing moves, nothing to announce.
            tracing::info!(adapter = %self.adapters[i].name, "adapter removed (was down)");
        }
        if let Err(e) = self.dp.remove_adapter(ifindex) {
            tracing::error!(error = %e, "adapter map write failed");
        }
        if let Some(l) = self.adapters[i].link.take() {
            let _ = l.unpin();
        }
        self.ann.send(Job::RemoveAdapter { ifindex });
        self.adapters[i].ifindex = None;
    }

    fn on_link(&mut self, link: &Link, at: Instant) {
        if let Some(i) = self.adapters.iter().position(|a| a.ifindex == Some(link.ifindex)) {
            if link.name != self.adapters[i].name {
                tracing::warn!(adapter = %self.adapters[i].name, new_name = %link.name, "adapter renamed; no longer used");
                self.gone(i, at);
                return;
            }
            let hold = self.cfg.agent.hold_down_ms;
            let delay = self.cfg.agent.up_delay_ms;
            if link.mac.is_some() && link.mac != self.adapters[i].mac {
                self.adapters[i].mac = link.mac;
                let heir = self.assignment.heirs.get(i).copied().flatten();
                let _ = self.write_adapter(i, heir);
            }
            match (self.adapters[i].health, link.running) {
                (Health::Up, false) if hold == 0 => {
                    self.set_health(i, Health::Down);
                    self.fail(i, at, "down");
                }
                (Health::Up, false) => {
                    tracing::info!(adapter = %link.name, hold_down_ms = hold, "link down: holding");
                    self.set_health(i, Health::HoldDown);
                    self.start_timer(i, hold);
                }
                (Health::HoldDown, true) => {
                    tracing::info!(adapter = %link.name, "link back within hold_down_ms: no failover");
                    self.set_health(i, Health::Up);
                }
                (Health::Down, true) if delay == 0 => {
                    self.set_health(i, Health::Up);
                    self.restore(i, at);
                }
                (Health::Down, true) => {
                    tracing::info!(adapter = %link.name, up_delay_ms = delay, "link up: waiting");
                    self.set_health(i, Health::UpDelay);
                    self.start_timer(i, delay);
                }
                (Health::UpDelay, false) => {
                    tracing::info!(adapter = %link.name, "link down again within up_delay_ms");
                    self.set_health(i, Health::Down)
                }
                _ => {}
            }
            return;
        }
        // A configured adapter appeared (created, re-created or renamed to its name).
        if let Some(i) = self.adapters.iter().position(|a| a.name == link.name && a.health == Health::Missing) {
            let mode = xdp_mode(self.cfg.agent.xdp_mode);
            let delay = self.cfg.agent.up_delay_ms;
            // A returning device waits out up_delay like a returning cable, written as
            // down until then.
            let initial = if link.running && delay > 0 { Health::UpDelay } else if link.running { Health::Up } else { Health::Down };
            match self.attach(i, link, mode, false, Some(initial)) {
                Ok(()) => match initial {
                    Health::Up => self.restore(i, at),
                    Health::UpDelay => self.start_timer(i, delay),
                    _ => {}
                },
                Err(e) => tracing::error!(adapter = %link.name, error = %e, "could not attach to the returning adapter"),
            }
        }
    }

    /// Events were lost (the socket overflowed): re-read every link and act on the
    /// differences.
    pub fn resync(&mut self) {
        if self.stopping {
            return;
        }
        let links = match self.rtnl.links() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "link dump failed");
                return;
            }
        };
        let at = Instant::now();
        for i in 0..self.adapters.len() {
            if let Some(ix) = self.adapters[i].ifindex {
                if !links.iter().any(|l| l.ifindex == ix) {
                    self.gone(i, at);
                }
            }
        }
        for l in &links {
            self.on_link(l, at);
        }
    }

    /// Takes back everything: detaches (unpins the links), removes the pinned maps, the
    /// VIP routes and the sysctls. The host is left as the agent found it.
    pub fn shutdown(&mut self) {
        self.stopping = true;
        for v in &mut self.vservers {
            if let Some(l) = v.link.take() {
                let _ = l.unpin();
            }
        }
        for a in &mut self.adapters {
            if let Some(l) = a.link.take() {
                if let Err(e) = l.unpin() {
                    tracing::warn!(adapter = %a.name, error = %e, "could not unpin link");
                }
            }
        }
        // Only our own pins: pin_path may be shared with other tools.
        let pin = self.cfg.agent.pin_path.clone();
        for n in names::PINNED_MAPS {
            let _ = std::fs::remove_file(pin.join(n));
        }
        if let Ok(rd) = std::fs::read_dir(&pin) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if ["link_", "egress_", "ingress_", "vs_"].iter().any(|p| n.starts_with(p)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&pin);
        self.host.restore(&mut self.rtnl);
        tracing::info!("agent stopped; host restored");
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// What the host watcher classifies with: the adapters, and the VIPs (shared: they
    /// change with the cluster's definitions and with what this node holds).
    pub fn placement_inputs(&self) -> (Vec<placement::Adapter>, crate::runtime::VipSet) {
        (self.padapters.clone(), self.vipset.clone())
    }

    /// Hands the host watcher the VIP set in force, with a new generation.
    pub(crate) fn publish_vips(&mut self) {
        let mut g = match self.vipset.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = (g.0 + 1, self.pvips.clone(), self.active.clone());
    }

    /// The host watcher classified the VIPs anew (the adapters' subnets changed).
    pub fn on_reclassified(&mut self, subnets: Vec<Vec<Subnet>>, classes: Arc<Classes>, generation: u64) {
        if self.stopping {
            return;
        }
        let current = self.vipset.lock().map_or_else(|p| p.into_inner().0, |g| g.0);
        if generation == current {
            self.reclassify(Some((subnets, classes)));
        } else {
            // Classified for a VIP set that has changed since: classify here.
            for (a, s) in self.padapters.iter_mut().zip(subnets) {
                a.subnets = s;
            }
            self.reclassify(None);
        }
        self.sync_cluster();
    }

    /// A previous agent left everything in place and this one took it over.
    /// Ends this agent for a live reload, leaving the data plane as it is (as a hand-over
    /// does) and keeping its history for the next one.
    pub fn into_history(mut self) -> History {
        use std::sync::atomic::Ordering::Relaxed;
        self.stopping = true;
        let st = &self.ann.stats;
        History {
            failovers: std::mem::take(&mut self.failovers),
            refusals: std::mem::take(&mut self.refusals),
            refusals_total: self.refusals_total,
            hist_maps: std::mem::take(&mut self.hist_maps),
            hist_announce: std::mem::take(&mut self.hist_announce),
            started: self.started,
            clients_moved: self.clients_moved,
            corrections_sent: self.corrections_sent,
            announced: [st.sent.load(Relaxed), st.send_errors.load(Relaxed), st.dropped.load(Relaxed)],
            next_tag: self.next_tag,
            reloads: self.reloads,
        }
    }

    /// Takes over the history of the agent this one replaced in a live reload.
    pub fn resume(&mut self, h: History) {
        use std::sync::atomic::Ordering::Relaxed;
        // This agent's own records (start-up refusals) come after the previous ones.
        let mine = std::mem::replace(&mut self.refusals, h.refusals);
        self.refusals_total += h.refusals_total;
        for r in mine {
            self.refusals.push_back(r);
        }
        while self.refusals.len() > MAX_REFUSALS_KEPT {
            self.refusals.pop_front();
        }
        self.failovers = h.failovers;
        self.hist_maps = h.hist_maps;
        self.hist_announce = h.hist_announce;
        self.started = h.started;
        self.clients_moved += h.clients_moved;
        self.corrections_sent += h.corrections_sent;
        let st = &self.ann.stats;
        st.sent.fetch_add(h.announced[0], Relaxed);
        st.send_errors.fetch_add(h.announced[1], Relaxed);
        st.dropped.fetch_add(h.announced[2], Relaxed);
        self.next_tag = self.next_tag.max(h.next_tag);
        self.reloads = h.reloads + 1;
    }

    pub fn was_adopted(&self) -> bool {
        self.adopted || self.host.adopted()
    }
}

/// A key for deduplicating corrections to one client.
pub fn flow_hash(k: &FlowKey) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut h);
    h.finish()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "node".into())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where the record of host changes lives: next to the control socket.
pub fn state_file(cfg: &Config) -> PathBuf {
    let mut p = cfg.agent.control_socket.clone().into_os_string();
    p.push(".state.json");
    PathBuf::from(p)
}
