//! The agent's state machine: adapters and VIPs as the config wants them, the data plane's
//! maps, and what happens when a link goes down or comes back.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{links::PinnedLink, XdpMode};
use vip_common::{
    client_bucket, decision, egress, names, vserver_flags, AdapterInfo, FlowKey, Straggler, VipInfo, VipKey, ADAPTER_DOWN,
    ADAPTER_MAC_MOVED, ADAPTER_UP, ADAPTER_VSERVER, FAMILY_IPV4, MAX_ADAPTERS, NO_SLOT, SPREAD_BUCKETS, VIP_SPREAD,
};
use vip_packet::{mac_str, Mac};

use crate::{
    announce::{self, Announcer},
    config::{Config, HostAdapter, HostView, Subnet, VipMode, XdpModeCfg},
    conflict::{self, ProbeTarget},
    dataplane::Dataplane,
    host::Host,
    netlink::{Link, LinkEvent, Rtnl},
    status::{unix_now, AdapterStatus, ClientStatus, FailoverStatus, Histogram, Refusal, Status, VipStatus},
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
    fn answers(self) -> bool {
        matches!(self, Health::Up | Health::HoldDown)
    }
    fn name(self) -> &'static str {
        match self {
            Health::Missing => "missing",
            Health::Up => "up",
            Health::Down => "down",
            Health::HoldDown => "hold-down",
            Health::UpDelay => "up-delay",
        }
    }
}

struct AdapterRt {
    name: String,
    slot: u8,
    max_vips: u32,
    vlans: Vec<u16>,
    ifindex: Option<u32>,
    mac: Option<Mac>,
    health: Health,
    /// Bumped on every transition so a stale hold-down or up-delay timer does nothing.
    gen: u64,
    since: f64,
    link: Option<PinnedLink>,
    /// Addresses and routes of the adapter: where a VIP may be taken over.
    subnets: Vec<Subnet>,
    weight: u32,
    move_mac: bool,
    /// While it is down: the adapter that takes its stragglers (and its MAC, with move_mac).
    heir: Option<usize>,
    /// VIP bytes per second through it, as last sampled (seed 004's load).
    load: f64,
    last_bytes: Option<(Instant, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VipState {
    Active,
    Refused,
}

struct VipRt {
    addr: IpAddr,
    vlan: u16,
    key: VipKey,
    id: u32,
    failover: bool,
    /// Its own adapters (config order) as a slot mask.
    home: u64,
    /// Its own adapters' slots in config order (for `primary`).
    order: Vec<u8>,
    mode: VipMode,
    /// The allowed mask in the map now.
    mask: u64,
    state: VipState,
    /// No adapter may answer for it (its own are down, no takeover possible): said once.
    stranded: bool,
    rebalance: bool,
    /// Spread mode: the owner slot of each bucket, as written to the map.
    buckets: Vec<u8>,
    /// The virtual server it belongs to (index into `vservers`): not on `lo`, delivered there.
    vserver: Option<u32>,
}

/// A virtual server's interface (seed 004).
struct VserverRt {
    name: String,
    interface: String,
    ifindex: Option<u32>,
    /// The interface's own MAC (the virtual server's gateway).
    mac: Option<Mac>,
    link: Option<PinnedLink>,
    vips: Vec<usize>,
}

/// A hold-down or up-delay timer to start.
#[derive(Debug)]
pub struct Timer {
    pub adapter: usize,
    pub gen: u64,
    pub after: Duration,
}

pub struct Agent {
    cfg: Config,
    dp: Dataplane,
    rtnl: Rtnl,
    host: Host,
    ann: Announcer,
    lo: u32,
    adapters: Vec<AdapterRt>,
    vips: Vec<VipRt>,
    vservers: Vec<VserverRt>,
    failovers: VecDeque<FailoverStatus>,
    refusals: Vec<Refusal>,
    hist_maps: Histogram,
    hist_announce: Histogram,
    started: f64,
    adopted: bool,
    pub stopping: bool,
    /// Last correction sent per straggling client (rate limit).
    corrected: HashMap<FlowKey, Instant>,
    clients_moved: u64,
    corrections_sent: u64,
}

const MAX_FAILOVERS_KEPT: usize = 256;
/// The announcer's queue key for MAC-move learning frames (not a VIP id).
const MAC_MOVE_ID: u32 = u32::MAX;
const MAX_REFUSALS_KEPT: usize = 256;


/// The client address of a table entry.
fn flow_client(k: &FlowKey) -> IpAddr {
    let o = VipKey { addr: k.client, vlan: 0, family: k.family, _pad: 0 }.octets();
    if k.family == FAMILY_IPV4 {
        IpAddr::from([o[0], o[1], o[2], o[3]])
    } else {
        IpAddr::from(o)
    }
}

/// Smooth weighted round robin over `(slot, weight)` members into SPREAD_BUCKETS buckets.
pub fn weighted_table(members: &[(u8, i64)]) -> Vec<u8> {
    let total: i64 = members.iter().map(|m| m.1).sum();
    let mut current = vec![0i64; members.len()];
    (0..SPREAD_BUCKETS)
        .map(|_| {
            if members.is_empty() {
                return NO_SLOT;
            }
            for (c, m) in current.iter_mut().zip(members) {
                *c += m.1;
            }
            let best = (0..members.len()).max_by_key(|&k| (current[k], std::cmp::Reverse(k))).expect("not empty");
            current[best] -= total;
            members[best].0
        })
        .collect()
}

fn vip_key(addr: &IpAddr, vlan: u16) -> VipKey {
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

/// The host as netlink reports it, for `Config::validate_host`.
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
}

impl NetlinkHost {
    /// Where a VIP may be taken over onto this adapter: its addresses' and routes'
    /// subnets. A default route is no sign of being in a subnet (as in validation).
    fn takeover_subnets(&self, ifindex: u32) -> Vec<Subnet> {
        let (mut a, r) = self.subnets(ifindex);
        a.extend(r.into_iter().filter(|s| s.prefix > 0));
        a
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
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let parent = pin_path.parent().unwrap_or(root);
    if is_bpffs(parent) {
        return Ok(());
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

impl Agent {
    /// Brings the agent up: validates against the host (nothing is touched if that
    /// fails), loads or adopts the data plane, prepares the adapters, probes and adds the
    /// VIPs, announces them. On any failure after the first change the host is restored.
    pub fn start(cfg: Config, object: &[u8], reload: bool) -> anyhow::Result<Agent> {
        let mut rtnl = Rtnl::open()?;
        let nh = NetlinkHost::read(&mut rtnl)?;
        if let Err(e) = cfg.validate_host(&nh) {
            return Err(crate::ConfigInvalid(e).into());
        }
        if cfg.adapters.len() > MAX_ADAPTERS as usize {
            anyhow::bail!("{} adapters configured; the data plane supports {MAX_ADAPTERS}", cfg.adapters.len());
        }
        let lo = nh.links.iter().find(|l| l.name == "lo").map(|l| l.ifindex).unwrap_or(1);
        ensure_bpffs(&cfg.agent.pin_path)?;
        let pin = cfg.agent.pin_path.clone();
        let fresh_pins = !pin.exists();
        std::fs::create_dir_all(&pin)?;
        let dp = match Dataplane::load_pinned(object, &pin) {
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
        let adopted = !dp.vip_keys()?.is_empty() || !dp.adapters()?.is_empty();
        let host = Host::open(state_file(&cfg));
        let a = &cfg.announce;
        let ann = Announcer::new(a.count, Duration::from_millis(a.interval_ms), a.max_per_second);
        let now = unix_now();
        let adapters = cfg
            .adapters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let link = nh.links.iter().find(|l| l.name == c.name);
                AdapterRt {
                    name: c.name.clone(),
                    slot: i as u8,
                    max_vips: c.max_vips,
                    vlans: c.vlans.clone(),
                    ifindex: None,
                    mac: link.and_then(|l| l.mac),
                    health: Health::Missing,
                    gen: 0,
                    since: now,
                    link: None,
                    subnets: link.map(|l| nh.takeover_subnets(l.ifindex)).unwrap_or_default(),
                    weight: c.weight,
                    move_mac: c.move_mac,
                    heir: None,
                    load: 0.0,
                    last_bytes: None,
                }
            })
            .collect();
        let vips = cfg
            .vips
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let vlan = v.vlan.unwrap_or(0);
                VipRt {
                    addr: v.address.addr,
                    vlan,
                    key: vip_key(&v.address.addr, vlan),
                    id: i as u32,
                    failover: v.failover,
                    home: v.adapters.iter().fold(0u64, |m, a| m | 1 << a),
                    order: v.adapters.iter().map(|a| *a as u8).collect(),
                    mode: v.mode,
                    mask: 0,
                    state: VipState::Refused,
                    stranded: false,
                    rebalance: v.rebalance,
                    buckets: vec![],
                    vserver: cfg.virtual_servers.iter().position(|s| s.vips.contains(&i)).map(|x| x as u32),
                }
            })
            .collect();
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
            dp,
            rtnl,
            host,
            ann,
            lo,
            adapters,
            vips,
            vservers,
            failovers: VecDeque::new(),
            refusals: vec![],
            hist_maps: Histogram::default(),
            hist_announce: Histogram::default(),
            started: now,
            adopted,
            stopping: false,
            corrected: HashMap::new(),
            clients_moved: 0,
            corrections_sent: 0,
        };
        if let Err(e) = agent.bring_up(&nh.links, reload) {
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
        let pin = self.cfg.agent.pin_path.clone();
        let mode = xdp_mode(self.cfg.agent.xdp_mode);
        self.host.prepare_host()?;
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
        let wanted: HashSet<VipKey> = self.vips.iter().map(|v| v.key).collect();
        let in_map: HashSet<VipKey> = self.dp.vip_keys()?.into_iter().collect();
        for k in in_map.difference(&wanted) {
            self.dp.remove_vip(*k)?;
        }
        // VIPs already in an adopted map are ours: probing them would find ourselves.
        let mut probe = vec![];
        for v in &mut self.vips {
            if in_map.contains(&v.key) || !self.cfg.probe.enabled {
                v.state = VipState::Active;
                continue;
            }
            let from: Vec<(u32, Mac)> = self
                .adapters
                .iter()
                .filter(|a| v.home & (1 << a.slot) != 0 && a.health.answers())
                .filter_map(|a| Some((a.ifindex?, a.mac?)))
                .collect();
            probe.push(ProbeTarget { vip: v.id, addr: v.addr, vlan: v.vlan, from });
        }
        if !probe.is_empty() {
            let listen: Vec<u32> = self.adapters.iter().filter(|a| a.health.answers()).filter_map(|a| a.ifindex).collect();
            let ours: HashSet<Mac> = self.adapters.iter().filter_map(|a| a.mac).collect();
            let p = &self.cfg.probe;
            let found = conflict::probe(&probe, &listen, &ours, p.count, Duration::from_millis(p.wait_ms))?;
            for v in &mut self.vips {
                if !probe.iter().any(|t| t.vip == v.id) {
                    continue;
                }
                match found.get(&v.id) {
                    Some(c) => {
                        let reason = format!("address in use: {} from {}", c.what, mac_str(&c.mac));
                        tracing::warn!(vip = %v.addr, vlan = v.vlan, %reason, "VIP refused");
                        self.refusals.push(Refusal { at: unix_now(), vip: v.addr.to_string(), adapter: None, reason });
                    }
                    None => v.state = VipState::Active,
                }
            }
        }
        self.recompute(true);
        self.place_spread(None);
        // A virtual server's VIPs are its own: the host does not hold them.
        let keep: Vec<IpAddr> =
            self.vips.iter().filter(|v| v.state == VipState::Active && v.vserver.is_none()).map(|v| v.addr).collect();
        for addr in self.host.stale_vips(&keep) {
            tracing::info!(%addr, "removing a VIP no longer configured from lo");
            self.host.remove_vip(&mut self.rtnl, addr)?;
        }
        for i in 0..self.vips.len() {
            if self.vips[i].state == VipState::Active && self.vips[i].vserver.is_none() {
                let addr = self.vips[i].addr;
                self.host.add_vip(&mut self.rtnl, self.lo, addr)?;
            }
        }
        self.discover_vservers();
        let now = Instant::now();
        for i in 0..self.vips.len() {
            // Spread clients each learn their adapter when they ask: a broadcast would
            // send them all to one.
            if self.vips[i].mode != VipMode::Spread {
                self.announce_vip(i, u64::MAX, now);
            }
        }
        self.ann.pump(Instant::now());
        tracing::info!(
            adapters = self.adapters.iter().filter(|a| a.health != Health::Missing).count(),
            vips = self.vips.iter().filter(|v| v.state == VipState::Active).count(),
            adopted = self.adopted,
            "agent up"
        );
        Ok(())
    }

    /// Attaches the responder to an adapter that is present (or adopts the pinned
    /// attachment a previous agent left), and puts it in the map.
    fn attach(&mut self, i: usize, link: &Link, mode: XdpMode, reload: bool, initial: Option<Health>) -> anyhow::Result<()> {
        let path = self.cfg.agent.pin_path.join(format!("link_{}", link.ifindex));
        self.host.prepare_adapter(&link.name)?;
        if !self.adapters[i].vlans.is_empty() {
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
        self.ann.add_adapter(link.ifindex)?;
        let a = &mut self.adapters[i];
        a.link = Some(pinned);
        a.ifindex = Some(link.ifindex);
        a.mac = link.mac;
        a.health = initial.unwrap_or(if link.running { Health::Up } else { Health::Down });
        a.gen += 1;
        a.since = unix_now();
        let state = a.health.name();
        self.write_adapter(i)?;
        tracing::info!(adapter = %link.name, ifindex = link.ifindex, state, "adapter attached");
        Ok(())
    }

    fn write_adapter(&mut self, i: usize) -> anyhow::Result<()> {
        let a = &self.adapters[i];
        let Some(ifindex) = a.ifindex else { return Ok(()) };
        let up = a.health.answers();
        let state = if up { ADAPTER_UP } else { ADAPTER_DOWN };
        let heir = if up { None } else { a.heir.and_then(|h| self.adapters[h].ifindex) };
        let flags = if heir.is_some() && a.move_mac { ADAPTER_MAC_MOVED } else { 0 };
        let info = AdapterInfo { mac: a.mac.unwrap_or_default(), slot: a.slot, state, heir: heir.unwrap_or(0), flags };
        self.dp.set_adapter(ifindex, info)?;
        Ok(())
    }

    /// The healthy adapter with the least load per weight (seed 004), other than `not`.
    fn least_loaded(&self, not: usize) -> Option<usize> {
        (0..self.adapters.len())
            .filter(|&j| j != not && self.adapters[j].health.answers() && self.adapters[j].ifindex.is_some())
            .min_by(|&x, &y| {
                let (a, b) = (&self.adapters[x], &self.adapters[y]);
                (a.load / a.weight as f64).total_cmp(&(b.load / b.weight as f64)).then(x.cmp(&y))
            })
    }

    /// A round-robin fill of the buckets over the adapters in `mask`, each as often as its
    /// weight (smooth weighted round robin: the adapters interleave, so any run of
    /// consecutive buckets is shared by weight within one).
    fn weighted_table(&self, mask: u64) -> Vec<u8> {
        let members: Vec<(u8, i64)> =
            self.adapters.iter().filter(|a| mask & (1 << a.slot) != 0).map(|a| (a.slot, a.weight as i64)).collect();
        weighted_table(&members)
    }

    /// Places spread VIPs' buckets after a change. When adapter `failed` went down, only
    /// its buckets move, each to the survivor with the least load per weight (its
    /// measured traffic plus what it is given here); everyone else's clients stay. When
    /// the set of answering adapters changes otherwise, the table is refilled by weight.
    fn place_spread(&mut self, failed: Option<u8>) {
        let up = self.up_mask();
        for vi in 0..self.vips.len() {
            let v = &self.vips[vi];
            if v.mode != VipMode::Spread || v.state != VipState::Active {
                continue;
            }
            let answering = v.mask & up;
            let owners = v.buckets.iter().filter(|&&s| s != NO_SLOT).fold(0u64, |m, s| m | 1 << s);
            let next = match failed {
                Some(f) if owners & (1 << f) != 0 && answering != 0 && owners & !(1 << f) & !answering == 0 => {
                    let mut t = v.buckets.clone();
                    let moved: Vec<usize> = (0..t.len()).filter(|&b| t[b] == f).collect();
                    let per_bucket = self.adapters[f as usize].load / moved.len().max(1) as f64;
                    let survivors: Vec<usize> =
                        self.adapters.iter().enumerate().filter(|(_, a)| answering & (1 << a.slot) != 0).map(|(j, _)| j).collect();
                    let mut given = vec![0.0f64; self.adapters.len()];
                    let mut count = vec![0u32; self.adapters.len()];
                    for &s in t.iter().filter(|&&s| s != NO_SLOT) {
                        count[s as usize] += 1;
                    }
                    for b in moved {
                        let cost = |j: usize| {
                            let a = &self.adapters[j];
                            ((a.load + given[j]) / a.weight as f64, count[j] as f64 / a.weight as f64)
                        };
                        let j = *survivors
                            .iter()
                            .min_by(|&&x, &&y| {
                                let (cx, cy) = (cost(x), cost(y));
                                cx.0.total_cmp(&cy.0).then(cx.1.total_cmp(&cy.1)).then(x.cmp(&y))
                            })
                            .expect("answering is not empty");
                        t[b] = self.adapters[j].slot;
                        given[j] += per_bucket;
                        count[j] += 1;
                    }
                    t
                }
                _ if owners == answering && !v.buckets.is_empty() => continue,
                _ => self.weighted_table(answering),
            };
            let v = &mut self.vips[vi];
            v.buckets = next;
            if let Err(e) = self.dp.set_buckets(v.id, &v.buckets) {
                tracing::error!(vip = %v.addr, error = %e, "bucket map write failed");
            }
        }
    }

    /// The adapter (index) that should answer `client` for spread VIP `vi` now.
    fn bucket_owner(&self, vi: usize, client: &[u32; 4]) -> Option<usize> {
        let slot = *self.vips[vi].buckets.get(client_bucket(client) as usize)?;
        self.adapters.iter().position(|a| a.slot == slot && a.health.answers())
    }

    /// Tells spread-mode clients whose adapter changed (their bucket moved: `from` failed,
    /// or a rebalance) about their new adapter with a unicast ARP reply / NA, and points
    /// their table entries there so their replies follow at once. Only clients the data
    /// plane has seen can be told; when none of a failed adapter's clients are known, one
    /// broadcast announcement from the adapter taking most of its buckets is the fallback.
    fn move_clients(&mut self, from: Option<usize>, only: &[usize], now: Instant) -> HashSet<usize> {
        let mut sent_from = HashSet::new();
        let spread = |v: &VipRt| v.mode == VipMode::Spread && v.state == VipState::Active;
        if !only.iter().any(|&v| spread(&self.vips[v])) {
            return sent_from;
        }
        let flows = self.dp.flows();
        for &vi in only {
            let v = &self.vips[vi];
            if v.mode != VipMode::Spread || v.state != VipState::Active {
                continue;
            }
            let (key, addr, vlan, id) = (v.key, v.addr, v.vlan, v.id);
            let mut told = 0;
            for (k, f) in flows.iter().filter(|(k, _)| k.vip == key.addr && k.vlan == key.vlan && k.family == key.family) {
                let current = self.adapters.iter().position(|a| a.ifindex == Some(f.ifindex));
                if let Some(fr) = from {
                    if current != Some(fr) || self.adapters[fr].move_mac {
                        continue;
                    }
                }
                let Some(j) = self.bucket_owner(vi, &k.client) else { continue };
                if current == Some(j) {
                    continue;
                }
                let (Some(ix), Some(mac)) = (self.adapters[j].ifindex, self.adapters[j].mac) else { continue };
                let mut nf = *f;
                nf.ifindex = ix;
                nf.slot = self.adapters[j].slot;
                if let Err(e) = self.dp.set_flow(*k, nf) {
                    tracing::warn!(error = %e, "client table write failed");
                }
                let client = flow_client(k);
                self.ann.queue(ix, id, announce::unicast_frame(mac, addr, vlan, f.mac, client), now);
                self.clients_moved += 1;
                sent_from.insert(j);
                told += 1;
            }
            tracing::info!(vip = %addr, clients = told, "spread clients moved");
            if let Some(fr) = from {
                if told == 0 && !self.adapters[fr].move_mac {
                    // Nobody known: the failed adapter's clients (if any) hear a broadcast.
                    if let Some(j) = self.heaviest_heir(vi) {
                        if let (Some(ix), Some(mac)) = (self.adapters[j].ifindex, self.adapters[j].mac) {
                            self.ann.queue(ix, id, announce::frame(mac, addr, vlan), now);
                            sent_from.insert(j);
                        }
                    }
                }
            }
        }
        sent_from
    }

    /// The adapter owning the most buckets of spread VIP `vi`.
    fn heaviest_heir(&self, vi: usize) -> Option<usize> {
        let b = &self.vips[vi].buckets;
        (0..self.adapters.len())
            .filter(|&j| self.adapters[j].health.answers())
            .max_by_key(|&j| (b.iter().filter(|&&s| s == self.adapters[j].slot).count(), std::cmp::Reverse(j)))
    }

    fn up_mask(&self) -> u64 {
        self.adapters.iter().filter(|a| a.health.answers()).fold(0, |m, a| m | 1 << a.slot)
    }

    /// Why adapter `a` may not take over VIP `v`, if it may not (seed 002's checks).
    fn takeover_refusal(&self, v: &VipRt, a: &AdapterRt, load: u32) -> Option<String> {
        if v.vlan != 0 && !a.vlans.contains(&v.vlan) {
            return Some(format!("does not carry vlan {}", v.vlan));
        }
        if !a.subnets.iter().any(|s| s.contains(&v.addr)) {
            return Some("has no address or route in the VIP's subnet".into());
        }
        if load >= a.max_vips {
            return Some(format!("is at max_vips ({})", a.max_vips));
        }
        None
    }

    /// Recomputes every active VIP's allowed mask: its own adapters while one of them is
    /// up; otherwise (with failover) the healthy adapters that pass the checks. Writes the
    /// VIPs whose mask changed (all of them with `all`). Returns the VIPs that changed.
    fn recompute(&mut self, all: bool) -> Vec<(usize, u64)> {
        let up = self.up_mask();
        let mut load: Vec<u32> = vec![0; self.adapters.len()];
        let mut next: Vec<u64> = vec![0; self.vips.len()];
        // Home placements first, so takeovers only use capacity that is really spare.
        for (i, v) in self.vips.iter().enumerate() {
            if v.state != VipState::Active {
                continue;
            }
            if v.home & up != 0 || !v.failover {
                next[i] = match v.mode {
                    VipMode::All | VipMode::Spread => v.home,
                    // The first of its adapters, in config order, that is up.
                    VipMode::Primary => v.order.iter().map(|s| 1u64 << s).find(|b| b & up != 0).unwrap_or(v.home),
                };
                for a in &self.adapters {
                    if v.home & (1 << a.slot) != 0 {
                        load[a.slot as usize] += 1;
                    }
                }
            }
        }
        let mut refusals = vec![];
        let mut stranded = vec![false; self.vips.len()];
        // Takeovers that exist already keep their places (capacity first, the same adapter
        // first): an unrelated change must not move or strand a VIP that is working.
        let held = |v: &VipRt| v.mask & !v.home;
        let mut order: Vec<usize> = (0..self.vips.len()).collect();
        order.sort_by_key(|&i| (held(&self.vips[i]) & up == 0, i));
        for i in order {
            let v = &self.vips[i];
            if v.state != VipState::Active || next[i] != 0 {
                continue;
            }
            let mut mask = v.home;
            let mut why = vec![];
            let mut candidates: Vec<&AdapterRt> =
                self.adapters.iter().filter(|a| up & (1 << a.slot) != 0 && v.home & (1 << a.slot) == 0).collect();
            candidates.sort_by_key(|a| held(v) & (1 << a.slot) == 0);
            for a in candidates {
                match self.takeover_refusal(v, a, load[a.slot as usize]) {
                    // A primary-mode VIP is answered by one adapter only, taken over too.
                    None if v.mode == VipMode::Primary && mask != v.home => {}
                    None => {
                        mask |= 1 << a.slot;
                        load[a.slot as usize] += 1;
                    }
                    Some(r) => why.push((a.name.clone(), r)),
                }
            }
            stranded[i] = mask == v.home;
            // Said when the placement changes (not again while it stays the same).
            if (mask == v.home && !v.stranded) || (mask != v.home && mask != v.mask) {
                if why.is_empty() && mask == v.home {
                    why.push((String::new(), "no other healthy adapter".into()));
                }
                refusals.extend(why.into_iter().map(|(a, r)| (i, v.addr, a, r)));
            }
            next[i] = mask;
        }
        for (v, s) in self.vips.iter_mut().zip(stranded) {
            v.stranded = s;
        }
        for (_, vip, adapter, reason) in refusals {
            tracing::warn!(%vip, %adapter, %reason, "takeover refused");
            let adapter = if adapter.is_empty() { None } else { Some(adapter) };
            self.refusals.push(Refusal { at: unix_now(), vip: vip.to_string(), adapter, reason });
        }
        if self.refusals.len() > MAX_REFUSALS_KEPT {
            let extra = self.refusals.len() - MAX_REFUSALS_KEPT;
            self.refusals.drain(..extra);
        }
        let mut changed = vec![];
        for (i, mask) in next.into_iter().enumerate() {
            let v = &mut self.vips[i];
            if v.state != VipState::Active || (!all && v.mask == mask) {
                continue;
            }
            let old = v.mask;
            v.mask = mask;
            let mut flags = if v.mode == VipMode::Spread { VIP_SPREAD } else { 0 };
            if let Some(x) = v.vserver {
                flags |= vserver_flags(x);
            }
            if let Err(e) = self.dp.set_vip(v.key, VipInfo { allowed: mask, id: v.id, flags }) {
                tracing::error!(vip = %v.addr, error = %e, "VIP map write failed");
            }
            changed.push((i, old));
        }
        changed
    }

    /// Queues announcements of VIP `i` from the adapters in `slots` that answer it now,
    /// dropping what is still queued wherever it no longer answers.
    fn announce_vip(&mut self, i: usize, slots: u64, now: Instant) -> Vec<usize> {
        let v = &self.vips[i];
        if v.state != VipState::Active {
            return vec![];
        }
        let mut from = vec![];
        for (j, a) in self.adapters.iter().enumerate() {
            let (Some(ifindex), Some(mac)) = (a.ifindex, a.mac) else { continue };
            let answering = v.mask & (1 << a.slot) != 0 && a.health.answers();
            if !answering {
                self.ann.cancel(ifindex, v.id);
                continue;
            }
            if slots & (1 << a.slot) == 0 {
                continue;
            }
            self.ann.queue(ifindex, v.id, announce::frame(mac, v.addr, v.vlan), now);
            from.push(j);
        }
        from
    }

    /// The adapter lost its link (or hold-down ran out, or it was removed): stop answering
    /// there, move what must move, announce from the survivors.
    fn fail(&mut self, i: usize, at: Instant, kind: &str) {
        // First of all: the adapter stops answering (one store, with its heir in it).
        self.adapters[i].heir = self.least_loaded(i);
        if let Err(e) = self.write_adapter(i) {
            tracing::error!(adapter = %self.adapters[i].name, error = %e, "adapter map write failed");
        }
        let bit = 1u64 << self.adapters[i].slot;
        let carried: Vec<usize> = (0..self.vips.len())
            .filter(|&v| self.vips[v].state == VipState::Active && self.vips[v].mask & bit != 0)
            .collect();
        let changed = self.recompute(false);
        self.place_spread(Some(self.adapters[i].slot));
        // Adapters that had handed their stragglers (or MAC) to this one get another heir.
        let orphans: Vec<usize> = (0..self.adapters.len()).filter(|&j| self.adapters[j].heir == Some(i)).collect();
        for &j in &orphans {
            self.adapters[j].heir = self.least_loaded(j);
            if let Err(e) = self.write_adapter(j) {
                tracing::error!(adapter = %self.adapters[j].name, error = %e, "adapter map write failed");
            }
        }
        let maps_at = Instant::now();
        if let Some(ix) = self.adapters[i].ifindex {
            self.ann.clear(ix);
        }
        let mut touched: Vec<usize> = carried.clone();
        touched.extend(changed.iter().map(|(v, _)| *v));
        touched.sort_unstable();
        touched.dedup();
        let mut from = HashSet::new();
        for &v in &touched {
            if self.vips[v].mode != VipMode::Spread {
                from.extend(self.announce_vip(v, u64::MAX, maps_at));
            }
        }
        for j in std::iter::once(i).chain(orphans) {
            from.extend(self.announce_moved_mac(j, maps_at));
        }
        // Broadcast announcements leave before the client table is read for the unicast
        // updates of spread clients.
        let (first, _) = self.ann.pump(Instant::now());
        from.extend(self.move_clients(Some(i), &touched, maps_at));
        let (later, _) = self.ann.pump(Instant::now());
        self.record(i, kind, at, maps_at, first.or(later), carried.len(), from);
    }

    /// A failed adapter with `move_mac` whose MAC now lives on its heir: the heir sends a
    /// frame from that MAC so the switch learns its new port.
    fn announce_moved_mac(&mut self, i: usize, now: Instant) -> Option<usize> {
        let a = &self.adapters[i];
        let (true, false, Some(h), Some(mac)) = (a.move_mac, a.health.answers(), a.heir, a.mac) else { return None };
        let ix = self.adapters[h].ifindex?;
        tracing::info!(adapter = %a.name, heir = %self.adapters[h].name, mac = %mac_str(&mac), "MAC moved");
        self.ann.queue(ix, MAC_MOVE_ID, announce::learning_frame(mac), now);
        Some(h)
    }

    /// The adapter is back (after up_delay): answer there again, bring home what was
    /// taken over, announce on it. Spread-mode clients move back only with `rebalance`.
    fn restore(&mut self, i: usize, at: Instant) {
        self.adapters[i].heir = None;
        if let Err(e) = self.write_adapter(i) {
            tracing::error!(adapter = %self.adapters[i].name, error = %e, "adapter map write failed");
        }
        let changed = self.recompute(false);
        self.place_spread(None);
        let maps_at = Instant::now();
        let bit = 1u64 << self.adapters[i].slot;
        let mut from = HashSet::new();
        let mut n = 0;
        for v in 0..self.vips.len() {
            if self.vips[v].state == VipState::Active && self.vips[v].mask & bit != 0 {
                n += 1;
                if self.vips[v].mode != VipMode::Spread {
                    from.extend(self.announce_vip(v, bit, maps_at));
                }
            }
        }
        // VIPs that came home stop being announced by the adapters that held them; any
        // that gained another adapter (capacity freed there) are announced there.
        for (v, old) in changed {
            if self.vips[v].mode != VipMode::Spread {
                let gained = self.vips[v].mask & !old & !bit;
                from.extend(self.announce_vip(v, gained, maps_at));
            }
        }
        if let (true, Some(ix), Some(mac)) = (self.adapters[i].move_mac, self.adapters[i].ifindex, self.adapters[i].mac) {
            // Its MAC comes home: the switch learns the port back from this frame.
            self.ann.queue(ix, MAC_MOVE_ID, announce::learning_frame(mac), maps_at);
            from.insert(i);
        }
        let rebalance: Vec<usize> = (0..self.vips.len()).filter(|&v| self.vips[v].rebalance).collect();
        from.extend(self.move_clients(None, &rebalance, maps_at));
        let (first, _) = self.ann.pump(Instant::now());
        self.record(i, "up", at, maps_at, first, n, from);
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
        let Some(vi) = self.vips.iter().position(|v| v.key.addr == k.vip && v.vlan == k.vlan && v.key.family == k.family)
        else {
            return;
        };
        let v = &self.vips[vi];
        let up = self.up_mask();
        let flow_adapter = self.dp.flow(k).and_then(|f| self.adapters.iter().position(|a| a.ifindex == Some(f.ifindex)));
        let target = match flow_adapter {
            Some(j) if self.adapters[j].health.answers() && v.mask & (1 << self.adapters[j].slot) != 0 => Some(j),
            _ if v.mode == VipMode::Spread => self.bucket_owner(vi, &k.client),
            _ => self.adapters.iter().position(|a| v.mask & up & (1 << a.slot) != 0),
        };
        let Some(j) = target else { return };
        let (Some(ix), Some(mac)) = (self.adapters[j].ifindex, self.adapters[j].mac) else { return };
        let frame = announce::unicast_frame(mac, v.addr, v.vlan, ev.client_mac, flow_client(k));
        self.ann.queue_once(ix, v.id, frame, now);
        self.corrected.insert(*k, now);
        self.corrections_sent += 1;
        tracing::info!(vip = %v.addr, client = %flow_client(k), to = %self.adapters[j].name, sent_to = %mac_str(&ev.to_mac), "straggler corrected");
    }

    /// New traffic totals per slot (from the data plane's counters): updates each adapter's
    /// load, and forgets old straggler rate-limit entries.
    pub fn update_load(&mut self, traffic: &[vip_common::Traffic], now: Instant) {
        for a in &mut self.adapters {
            let Some(t) = traffic.get(a.slot as usize) else { continue };
            let bytes = t.rx_bytes + t.tx_bytes;
            if let Some((then, before)) = a.last_bytes {
                let dt = now.duration_since(then).as_secs_f64();
                if dt > 0.0 {
                    let rate = bytes.saturating_sub(before) as f64 / dt;
                    // Smoothed over about two samples: a burst counts, a blip fades.
                    a.load = 0.5 * a.load + 0.5 * rate;
                }
            }
            a.last_bytes = Some((now, bytes));
        }
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
    /// reply. Called at start and on every load tick until known.
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
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.dp.take_events()
    }

    #[allow(clippy::too_many_arguments)]
    fn record(&mut self, i: usize, kind: &str, at: Instant, maps_at: Instant, first: Option<Instant>, vips: usize, from: HashSet<usize>) {
        let maps_ns = maps_at.saturating_duration_since(at).as_nanos() as u64;
        let first_ns = first.map(|f| f.saturating_duration_since(at).as_nanos() as u64);
        self.hist_maps.observe(maps_ns);
        if let Some(n) = first_ns {
            self.hist_announce.observe(n);
        }
        let mut from: Vec<String> = from.into_iter().map(|j| self.adapters[j].name.clone()).collect();
        from.sort();
        tracing::info!(
            adapter = %self.adapters[i].name,
            kind,
            vips,
            maps_written_ns = maps_ns,
            first_announcement_ns = ?first_ns,
            announced_from = ?from,
            "failover"
        );
        self.failovers.push_back(FailoverStatus {
            at: unix_now() - at.elapsed().as_secs_f64(),
            adapter: self.adapters[i].name.clone(),
            kind: kind.into(),
            vips,
            maps_written_ns: maps_ns,
            first_announcement_ns: first_ns,
            announced_from: from,
        });
        while self.failovers.len() > MAX_FAILOVERS_KEPT {
            self.failovers.pop_front();
        }
    }

    /// Logging waits until the maps are written: it is the slowest part of a failover.
    fn set_health(&mut self, i: usize, h: Health) {
        let a = &mut self.adapters[i];
        a.health = h;
        a.gen += 1;
        a.since = unix_now();
    }

    /// Handles one link event received at `at`. Returns timers to start.
    pub fn on_event(&mut self, ev: &LinkEvent, at: Instant) -> Vec<Timer> {
        if self.stopping {
            return vec![];
        }
        match ev {
            LinkEvent::Removed { ifindex, .. } => {
                if let Some(i) = self.adapters.iter().position(|a| a.ifindex == Some(*ifindex)) {
                    self.gone(i, at);
                }
                vec![]
            }
            LinkEvent::Changed(link) => self.on_link(link, at),
            // Read outside the lock by the caller, then applied with `update_subnets`.
            LinkEvent::Addresses => vec![],
        }
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
            if let Err(e) = self.write_adapter(i) {
                tracing::error!(error = %e, "adapter map write failed");
            }
            tracing::info!(adapter = %self.adapters[i].name, "adapter removed (was down)");
        }
        if let Err(e) = self.dp.remove_adapter(ifindex) {
            tracing::error!(error = %e, "adapter map write failed");
        }
        if let Some(l) = self.adapters[i].link.take() {
            let _ = l.unpin();
        }
        self.ann.remove_adapter(ifindex);
        self.adapters[i].ifindex = None;
    }

    fn on_link(&mut self, link: &Link, at: Instant) -> Vec<Timer> {
        let mut timers = vec![];
        if let Some(i) = self.adapters.iter().position(|a| a.ifindex == Some(link.ifindex)) {
            if link.name != self.adapters[i].name {
                tracing::warn!(adapter = %self.adapters[i].name, new_name = %link.name, "adapter renamed; no longer used");
                self.gone(i, at);
            } else {
                let hold = self.cfg.agent.hold_down_ms;
                let delay = self.cfg.agent.up_delay_ms;
                let a = &self.adapters[i];
                if link.mac.is_some() && link.mac != a.mac {
                    self.adapters[i].mac = link.mac;
                    let _ = self.write_adapter(i);
                }
                match (self.adapters[i].health, link.running) {
                    (Health::Up, false) if hold == 0 => {
                        self.set_health(i, Health::Down);
                        self.fail(i, at, "down");
                    }
                    (Health::Up, false) => {
                        tracing::info!(adapter = %link.name, hold_down_ms = hold, "link down: holding");
                        self.set_health(i, Health::HoldDown);
                        timers.push(Timer { adapter: i, gen: self.adapters[i].gen, after: Duration::from_millis(hold) });
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
                        timers.push(Timer { adapter: i, gen: self.adapters[i].gen, after: Duration::from_millis(delay) });
                    }
                    (Health::UpDelay, false) => {
                        tracing::info!(adapter = %link.name, "link down again within up_delay_ms");
                        self.set_health(i, Health::Down)
                    }
                    _ => {}
                }
            }
            return timers;
        }
        // A configured adapter appeared (created, re-created or renamed to its name).
        if let Some(i) = self.adapters.iter().position(|a| a.name == link.name && a.health == Health::Missing) {
            let mode = xdp_mode(self.cfg.agent.xdp_mode);
            let delay = self.cfg.agent.up_delay_ms;
            // A returning device waits out up_delay like a returning cable, written as
            // down until then.
            let initial = if link.running && delay > 0 { Health::UpDelay } else if link.running { Health::Up } else { Health::Down };
            match NetlinkHost::read(&mut self.rtnl) {
                Ok(nh) => self.adapters[i].subnets = nh.takeover_subnets(link.ifindex),
                Err(e) => tracing::warn!(adapter = %link.name, error = %e, "could not read its addresses"),
            }
            match self.attach(i, link, mode, false, Some(initial)) {
                Ok(()) => match initial {
                    Health::Up => self.restore(i, at),
                    Health::UpDelay => {
                        timers.push(Timer { adapter: i, gen: self.adapters[i].gen, after: Duration::from_millis(delay) })
                    }
                    _ => {}
                },
                Err(e) => tracing::error!(adapter = %link.name, error = %e, "could not attach to the returning adapter"),
            }
        }
        timers
    }

    /// Events were lost (the socket overflowed): re-read every link and act on the
    /// differences.
    pub fn resync(&mut self) -> Vec<Timer> {
        if self.stopping {
            return vec![];
        }
        let links = match self.rtnl.links() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "link dump failed");
                return vec![];
            }
        };
        let at = Instant::now();
        let mut timers = vec![];
        for i in 0..self.adapters.len() {
            if let Some(ix) = self.adapters[i].ifindex {
                if !links.iter().any(|l| l.ifindex == ix) {
                    self.gone(i, at);
                }
            }
        }
        for l in &links {
            timers.extend(self.on_link(l, at));
        }
        timers
    }

    /// Applies a fresh read of the host's addresses and routes to every present adapter:
    /// where VIPs may be taken over. Takes effect at the next placement.
    pub fn update_subnets(&mut self, nh: &NetlinkHost) {
        for a in &mut self.adapters {
            let Some(ix) = a.ifindex else { continue };
            let s = nh.takeover_subnets(ix);
            if s != a.subnets {
                tracing::info!(adapter = %a.name, subnets = ?s.iter().map(|s| format!("{}/{}", s.addr, s.prefix)).collect::<Vec<_>>(), "adapter addresses changed");
                a.subnets = s;
            }
        }
    }

    /// A hold-down or up-delay timer ran out.
    pub fn on_timer(&mut self, t: &Timer) {
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

    /// Sends what is due; returns when to run again.
    pub fn pump(&mut self) -> Option<Instant> {
        self.ann.pump(Instant::now()).1
    }

    /// Status without the data plane's counters (cheap: taken under the lock); see
    /// [`fill_counters`] for the rest.
    pub fn status(&self) -> Status {
        let up = self.up_mask();
        let decisions = vec![];
        let adapters = self
            .adapters
            .iter()
            .map(|a| AdapterStatus {
                name: a.name.clone(),
                ifindex: a.ifindex,
                mac: a.mac.map(|m| mac_str(&m)),
                slot: a.slot,
                state: a.health.name().into(),
                since: a.since,
                vips: self
                    .vips
                    .iter()
                    .filter(|v| v.state == VipState::Active && v.mask & up & (1 << a.slot) != 0)
                    .count(),
                max_vips: a.max_vips,
                weight: a.weight,
                load_bytes_per_s: a.load,
                heir: if a.health.answers() { None } else { a.heir.map(|h| self.adapters[h].name.clone()) },
                mac_moved: !a.health.answers() && a.heir.is_some() && a.move_mac,
                rx_packets: 0,
                tx_packets: 0,
            })
            .collect();
        let vips = self
            .vips
            .iter()
            .map(|v| {
                let names = |m: u64| -> Vec<String> {
                    self.adapters.iter().filter(|a| m & (1 << a.slot) != 0).map(|a| a.name.clone()).collect()
                };
                let answers = self
                    .adapters
                    .iter()
                    .filter(|a| (v.home | v.mask) & (1 << a.slot) != 0)
                    .map(|a| (a.name.clone(), 0))
                    .collect();
                VipStatus {
                    address: v.addr.to_string(),
                    vlan: v.vlan,
                    id: v.id,
                    state: match v.state {
                        VipState::Active => "active",
                        VipState::Refused => "refused",
                    }
                    .into(),
                    failover: v.failover,
                    answering: if v.state == VipState::Active { names(v.mask & up) } else { vec![] },
                    taken_over_by: names(v.mask & !v.home),
                    answers,
                    mode: match v.mode {
                        VipMode::All => "all",
                        VipMode::Primary => "primary",
                        VipMode::Spread => "spread",
                    }
                    .into(),
                    buckets: self
                        .adapters
                        .iter()
                        .map(|a| (a.name.clone(), v.buckets.iter().filter(|&&s| s == a.slot).count() as u32))
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                }
            })
            .collect();
        Status {
            config: self.cfg.path.display().to_string(),
            pin_path: self.cfg.agent.pin_path.display().to_string(),
            started: self.started,
            adopted: self.adopted,
            adapters,
            vips,
            failovers: self.failovers.iter().cloned().collect(),
            refusals: self.refusals.clone(),
            decisions,
            announcements_sent: self.ann.sent,
            announcements_queued: self.ann.queued(),
            maps_written: self.hist_maps.clone(),
            first_announcement: self.hist_announce.clone(),
            clients: vec![],
            clients_total: 0,
            egress: vec![],
            clients_moved: self.clients_moved,
            corrections_sent: self.corrections_sent,
            virtual_servers: self
                .vservers
                .iter()
                .enumerate()
                .map(|(i, v)| crate::status::VserverStatus {
                    name: v.name.clone(),
                    interface: v.interface.clone(),
                    mac: self.dp.vserver_mac(i as u32).map(|m| mac_str(&m)),
                    vips: v.vips.iter().map(|&x| self.vips[x].addr.to_string()).collect(),
                })
                .collect(),
        }
    }

    /// Takes back everything: detaches (unpins the links), removes the pinned maps, the
    /// VIP addresses and the sysctls. The host is left as the agent found it.
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

    /// A previous agent left everything in place and this one took it over.
    pub fn was_adopted(&self) -> bool {
        self.adopted || self.host.adopted()
    }

}

/// Reads the data plane's counters and client table into a status taken by
/// [`Agent::status`].
pub fn fill_counters(s: &mut Status, c: &crate::dataplane::Counters) {
    s.decisions = decision::NAMES.iter().zip(c.decisions()).map(|(n, v)| (n.to_string(), v)).collect();
    s.egress = egress::NAMES.iter().zip(c.egress()).map(|(n, v)| (n.to_string(), v)).collect();
    for a in &mut s.adapters {
        let t = c.traffic(a.slot);
        (a.rx_packets, a.tx_packets) = (t.rx_packets, t.tx_packets);
    }
    let by_ifindex: HashMap<u32, String> = s.adapters.iter().filter_map(|a| Some((a.ifindex?, a.name.clone()))).collect();
    let now = monotonic_ns();
    let mut flows = c.flows();
    s.clients_total = flows.len();
    flows.sort_by_key(|(_, f)| std::cmp::Reverse(f.seen_ns));
    s.clients = flows
        .iter()
        .take(crate::status::CLIENTS_SHOWN)
        .map(|(k, f)| {
            let vip = VipKey { addr: k.vip, vlan: k.vlan, family: k.family, _pad: 0 };
            ClientStatus {
                vip: flow_client(&FlowKey { client: vip.addr, ..*k }).to_string(),
                vlan: k.vlan,
                client: flow_client(k).to_string(),
                mac: mac_str(&f.mac),
                adapter: by_ifindex.get(&f.ifindex).cloned().unwrap_or_else(|| format!("ifindex {}", f.ifindex)),
                idle_s: now.saturating_sub(f.seen_ns) as f64 / 1e9,
                packets: f.packets,
                bytes: f.bytes,
            }
        })
        .collect();
    let slots: std::collections::HashMap<String, u8> = s.adapters.iter().map(|a| (a.name.clone(), a.slot)).collect();
    for v in &mut s.vips {
        for (name, n) in &mut v.answers {
            *n = slots.get(name.as_str()).map_or(0, |slot| c.answers(v.id, *slot));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s = |a: &str, p| Subnet { addr: a.parse().unwrap(), prefix: p };
        let ip = |a: &str| -> IpAddr { a.parse().unwrap() };
        assert!(s("192.0.2.0", 24).contains(&ip("192.0.2.10")));
        assert!(!s("192.0.2.0", 24).contains(&ip("192.0.3.10")));
        assert!(s("0.0.0.0", 0).contains(&ip("198.51.100.1")));
        assert!(s("2001:db8::1", 64).contains(&ip("2001:db8::10")));
        assert!(!s("2001:db8::1", 64).contains(&ip("2001:db9::10")));
        assert!(!s("192.0.2.0", 24).contains(&ip("2001:db8::10")));
    }
}
