//! The cluster runtime of one node: a thread of its own with a single-threaded tokio
//! runtime. It registers the node in etcd (one lease), campaigns, mirrors the cluster's
//! keys through one watch, exchanges heartbeats with the peers, keeps the data plane's
//! answering deadline, holds the groups the leader gives it, and leads when elected.
//!
//! The loop never waits on etcd: every request runs as a task of its own and reports
//! back, so heartbeats and the deadline keep their period whatever etcd does. With etcd
//! unreachable nothing moves (no decision can be written), and the peers' acks keep every
//! holder answering: an outage freezes, it does not black out.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, EventType, KeyValue, PutOptions, TxnOp, WatchOptions};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
};

use crate::{
    leader::{self, Holder, NodeState},
    peers::{rate_margin, Cut, Peers, Timing, View},
    records::{AssignRecord, Defs, MembersRecord, NodeRecord, PortRecord, Role, TakeoverRecord},
    store::{self, decode, encode, Endpoints, Keys, StoreError},
    wire::{name_hash, Heartbeat, Incarnation},
};

/// The node's cluster settings (the `[cluster]` table).
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: String,
    pub node: String,
    pub role: Role,
    pub endpoints: Endpoints,
    pub heartbeat: Duration,
    pub suspect: Duration,
    pub fence: Duration,
    pub lease_ttl_s: i64,
    pub port: u16,
    /// Failover group and pair partner (seed 000).
    pub group: Option<String>,
    pub partner: Option<String>,
    /// Hooks by virtual server name (this node's own configuration, never etcd's).
    pub hooks: BTreeMap<String, crate::hooks::Hooks>,
}

/// One of the node's adapters, as the cluster needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    pub name: String,
    pub up: bool,
    /// Its first IPv4 address (heartbeats are sent from it and to it).
    pub address: Option<Ipv4Addr>,
    pub subnets: Vec<String>,
    pub vlans: Vec<u16>,
    pub weight: u32,
}

/// What the runtime asks of the agent that owns the data plane.
pub trait Agent: Send + 'static {
    /// The answering deadline of cluster VIPs, boot clock ns (0: silent now). A store.
    fn deadline(&self, until_ns: u64);
    /// Hold exactly the groups of `defs` whose first address is in `held`; `done` is
    /// called once the data plane answers accordingly (and no longer answers the others).
    fn hold(&self, defs: Arc<Defs>, held: Vec<IpAddr>, done: Box<dyn FnOnce() + Send>);
}

/// Commands from the agent.
pub enum Cmd {
    Ports(Vec<Port>),
    /// Stop answering, tell the cluster, and leave; `done` once told.
    Leave(oneshot::Sender<()>),
    Status(oneshot::Sender<ClusterStatus>),
}

/// The handle the agent keeps.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Handle {
    pub fn send(&self, c: Cmd) -> bool {
        self.tx.send(c).is_ok()
    }
    /// Blocking helpers for the agent's (non-async) threads.
    pub fn status(&self, timeout: Duration) -> Option<ClusterStatus> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Status(tx)).then_some(())?;
        wait(rx, timeout)
    }
    pub fn leave(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Leave(tx)) && wait(rx, timeout).is_some()
    }
}

fn wait<T>(mut rx: oneshot::Receiver<T>, timeout: Duration) -> Option<T> {
    let until = std::time::Instant::now() + timeout;
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(oneshot::error::TryRecvError::Closed) => return None,
            Err(oneshot::error::TryRecvError::Empty) if std::time::Instant::now() >= until => return None,
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The cluster information base (seed 003), as this node sees it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub node: String,
    pub incarnation: i64,
    /// etcd revision and unix time of the last thing heard from etcd.
    pub revision: i64,
    pub at: f64,
    pub etcd_connected: bool,
    pub leader: Option<String>,
    pub i_lead: bool,
    pub members_version: u64,
    /// Until when this node may answer (ms from now; negative: silent), and on whose word.
    pub deadline_ms: f64,
    pub deadline_from: String,
    pub nodes: Vec<NodeStatus>,
    pub groups: Vec<GroupStatus>,
    /// Virtual servers (seed 004) and where each is.
    #[serde(default)]
    pub servers: Vec<ServerStatus>,
    pub takeovers: Vec<TakeoverRecord>,
    /// Groups this node answers now.
    pub holding: Vec<String>,
    /// This node's recent hook runs, and the virtual servers that failed here.
    #[serde(default)]
    pub hooks: Vec<crate::hooks::HookRun>,
    #[serde(default)]
    pub failed_here: Vec<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ServerStatus {
    pub name: String,
    pub priority: i32,
    pub migrate: bool,
    pub home: Option<String>,
    /// The node holding its groups (None: down, or between two owners).
    pub owner: Option<String>,
    /// Its groups, by first address.
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub health: String,
    pub role: String,
    pub address: String,
    pub incarnation: i64,
    /// ms since its last heartbeat reached this node (None: never).
    pub heard_ms: Option<f64>,
    pub holding: Vec<String>,
    pub ports: Vec<(String, bool)>,
    /// Its failover group and pair partner (seed 000).
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub partner: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub address: String,
    pub count: u32,
    pub owner: Option<String>,
    pub home: Option<String>,
    #[serde(default)]
    pub server: Option<String>,
}

/// CLOCK_BOOTTIME in ns: the data plane's `bpf_ktime_get_boot_ns`.
pub fn boot_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Starts the runtime on a thread of its own (real-time priority below the event loop's:
/// a busy CPU must not let the deadline lapse). Returns its handle.
pub fn start<A: Agent>(cfg: Config, agent: A) -> std::io::Result<Handle> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new().name("cluster".into()).spawn(move || {
        let param = libc::sched_param { sched_priority: 5 };
        // SAFETY: sets this thread's own scheduling policy.
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cluster: no runtime");
                agent.deadline(0);
                return;
            }
        };
        rt.block_on(run(cfg, agent, rx));
    })?;
    Ok(Handle { tx })
}

/// The cluster's keys as last seen.
#[derive(Debug, Default)]
struct Mirror {
    rev: i64,
    /// name -> (create revision, mod revision, record).
    nodes: BTreeMap<String, (i64, i64, NodeRecord)>,
    elections: BTreeMap<String, i64>,
    fences: BTreeMap<String, i64>,
    members: Option<(i64, MembersRecord)>,
    defs: Option<(i64, Arc<Defs>)>,
    assign: Option<(i64, AssignRecord)>,
    takeovers: Vec<TakeoverRecord>,
    /// Mod revision of the last `cluster rebalance` request (0: none).
    rebalance: i64,
}

impl Mirror {
    fn apply(&mut self, keys: &Keys, kv: &KeyValue, deleted: bool) {
        let Ok(key) = std::str::from_utf8(kv.key()) else { return };
        let warn = |e: StoreError| tracing::warn!(error = %e, "cluster: unreadable record ignored");
        if let Some(n) = keys.name_in(key, &keys.nodes()) {
            if deleted {
                self.nodes.remove(n);
            } else {
                match decode::<NodeRecord>(kv) {
                    Ok(r) => {
                        self.nodes.insert(n.into(), (kv.create_revision(), kv.mod_revision(), r));
                    }
                    Err(e) => warn(e),
                }
            }
        } else if let Some(n) = keys.name_in(key, &keys.elections()) {
            if deleted {
                self.elections.remove(n);
            } else {
                self.elections.insert(n.into(), kv.create_revision());
            }
        } else if let Some(n) = keys.name_in(key, &keys.fences()) {
            if deleted {
                self.fences.remove(n);
            } else {
                self.fences.insert(n.into(), kv.create_revision());
            }
        } else if key == keys.members() {
            self.members = if deleted { None } else { decode(kv).map_err(warn).ok().map(|m| (kv.mod_revision(), m)) };
        } else if key == keys.defs() {
            self.defs = if deleted { None } else { decode(kv).map_err(warn).ok().map(|d| (kv.mod_revision(), Arc::new(d))) };
        } else if key == keys.assign() {
            self.assign = if deleted { None } else { decode(kv).map_err(warn).ok().map(|a| (kv.mod_revision(), a)) };
        } else if key == keys.rebalance() {
            self.rebalance = if deleted { 0 } else { kv.mod_revision() };
        } else if key == keys.takeovers() {
            self.takeovers = if deleted { vec![] } else { decode(kv).map_err(warn).unwrap_or_default() };
        }
    }

    /// Candidates in the order they lead: (name, create revision).
    fn candidates(&self) -> Vec<(String, i64)> {
        let mut v: Vec<(String, i64)> = self.elections.iter().map(|(k, r)| (k.clone(), *r)).collect();
        v.sort_by_key(|x| x.1);
        v
    }
}

/// Results of the requests the loop started.
enum Done {
    Registered(Box<Result<Registration, StoreError>>),
    /// Tagged with the watch generation they belong to (older ones are ignored).
    Snapshot(u64, Result<(i64, Vec<KeyValue>), StoreError>),
    Watch(u64, Result<Vec<(KeyValue, bool)>, StoreError>),
    Record(Result<bool, StoreError>, Intent),
    Read { sent: u64, ok: Result<bool, StoreError> },
    Marker(Result<bool, StoreError>),
    Leader(Result<Option<i64>, StoreError>, Vec<TakeoverRecord>),
    Held(Vec<IpAddr>),
    /// `acquire` hooks ran (in priority order) before answering.
    Acquired(Vec<crate::hooks::HookRun>),
    /// A `release` or `check` hook ended.
    HookRan(crate::hooks::HookRun),
    /// The lease (0: none yet, retry registering) is alive or not.
    Lease(i64, bool),
}

struct Registration {
    client: Client,
    lease: i64,
    inc: i64,
    election: i64,
    replaces: Option<u64>,
}

/// Why the node's record was written.
#[derive(Debug, Clone)]
enum Intent {
    /// To hold these groups (answering starts after it committed).
    Acquire { held: Vec<IpAddr>, at: u64, wait_ns: u64 },
    /// Plain state (ports, released groups, fenced).
    State,
}

struct Node<A: Agent> {
    cfg: Config,
    timing: Timing,
    keys: Keys,
    agent: A,
    client: Option<Client>,
    done_tx: mpsc::UnboundedSender<Done>,
    lease: i64,
    /// Create revision of our node key (0: not registered).
    inc: i64,
    election: i64,
    registering: bool,
    watch_gen: u64,
    peers: Peers,
    mirror: Mirror,
    ports: Vec<Port>,
    /// Per up adapter: its address, a socket sending out of it, and the subnets it reaches
    /// (heartbeats go only where the adapter leads).
    socks: Vec<(Ipv4Addr, std::net::UdpSocket, Vec<vip_placement::Subnet>)>,
    /// Groups the data plane holds, and what our record says.
    held: Vec<IpAddr>,
    said: Vec<IpAddr>,
    record_busy: bool,
    hold_busy: bool,
    /// An acquisition that committed and waits out `wait_ms` before answering.
    pending: Option<(Vec<IpAddr>, u64)>,
    fenced: bool,
    leaving: bool,
    /// Deadlines proved by peers and by etcd reads.
    etcd_deadline: u64,
    reading: bool,
    last_read: u64,
    marker_busy: bool,
    peers_fine_since: Option<u64>,
    deadline: u64,
    leader_busy: bool,
    /// When the leader first saw each node not alive (unix time).
    suspected: HashMap<String, f64>,
    last_etcd: f64,
    replaces: Option<u64>,
    cluster_hash: u64,
    last_tick: u64,
    /// Takeovers this node completed (for its record).
    took: Vec<crate::records::Took>,
    /// When the leader first saw each group (for [`HOME_WAIT`]).
    unplaced: HashMap<IpAddr, f64>,
    /// Virtual servers with hooks that this node holds (their `acquire` succeeded), and
    /// the ones that failed here (a hook said so; boot ns), which it must not be given.
    acquired: BTreeSet<String>,
    failed: BTreeMap<String, u64>,
    hooks_busy: bool,
    /// `release` hooks still running (leaving waits for them).
    releasing: usize,
    checking: BTreeSet<String>,
    last_check: BTreeMap<String, u64>,
    /// The last acquire batch's own time (ms), for the takeover's record.
    hooks_ms: f64,
    hook_runs: std::collections::VecDeque<crate::hooks::HookRun>,
}

async fn run<A: Agent>(cfg: Config, agent: A, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    agent.deadline(0);
    let timing = Timing { suspect_ns: cfg.suspect.as_nanos() as u64, fence_ns: cfg.fence.as_nanos() as u64 };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let me = Incarnation { node: name_hash(&cfg.node), incarnation: 0 };
    let recv = match UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], cfg.port))).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(port = cfg.port, error = %e, "cluster: cannot bind the heartbeat port; this node holds no cluster VIP");
            return;
        }
    };
    let mut n = Node {
        keys: Keys::new(&cfg.cluster),
        cluster_hash: name_hash(&cfg.cluster),
        peers: Peers::new(me, timing),
        timing,
        cfg,
        agent,
        client: None,
        done_tx,
        lease: 0,
        inc: 0,
        election: 0,
        registering: false,
        watch_gen: 0,
        mirror: Mirror::default(),
        ports: vec![],
        socks: vec![],
        held: vec![],
        said: vec![],
        record_busy: false,
        hold_busy: false,
        pending: None,
        fenced: false,
        leaving: false,
        etcd_deadline: 0,
        reading: false,
        last_read: 0,
        marker_busy: false,
        peers_fine_since: None,
        deadline: 0,
        leader_busy: false,
        suspected: HashMap::new(),
        last_etcd: 0.0,
        replaces: None,
        last_tick: 0,
        took: vec![],
        unplaced: HashMap::new(),
        acquired: BTreeSet::new(),
        failed: BTreeMap::new(),
        hooks_busy: false,
        releasing: 0,
        checking: BTreeSet::new(),
        last_check: BTreeMap::new(),
        hooks_ms: 0.0,
        hook_runs: Default::default(),
    };
    let mut tick = tokio::time::interval(n.cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut buf = vec![0u8; 2048];
    let mut leave_done: Option<oneshot::Sender<()>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n.on_tick();
                if let Some(tx) = leave_done.take() {
                    if n.said.is_empty() && !n.record_busy && n.releasing == 0 {
                        n.revoke();
                        let _ = tx.send(());
                        return;
                    }
                    leave_done = Some(tx);
                }
            }
            r = recv.recv_from(&mut buf) => {
                if let Ok((len, _)) = r {
                    if let Ok(hb) = Heartbeat::decode(&buf[..len]) {
                        if hb.cluster == n.cluster_hash {
                            let now = boot_ns();
                            let was = n.peers.heard(&hb.from).is_some_and(|h| h.1);
                            n.peers.receive(&hb, now);
                            // A peer that just said it stopped answering: its groups may
                            // move now, not at the next tick.
                            if hb.flags & crate::wire::FLAG_LEAVING != 0 && !was {
                                n.lead(now);
                            }
                        }
                    }
                }
            }
            Some(d) = done_rx.recv() => n.on_done(d),
            c = rx.recv() => match c {
                Some(Cmd::Ports(p)) => n.on_ports(p),
                Some(Cmd::Leave(tx)) => {
                    n.leave();
                    leave_done = Some(tx);
                }
                Some(Cmd::Status(tx)) => {
                    let _ = tx.send(n.status());
                }
                None => return,
            },
        }
    }
}

impl<A: Agent> Node<A> {
    fn me(&self) -> Incarnation {
        Incarnation { node: name_hash(&self.cfg.node), incarnation: self.inc as u64 }
    }

    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = Done> + Send + 'static,
    {
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(f.await);
        });
    }

    fn record(&self) -> NodeRecord {
        NodeRecord {
            name: self.cfg.node.clone(),
            role: self.cfg.role,
            address: self.ports.iter().find_map(|p| p.address).map(|a| a.to_string()).unwrap_or_default(),
            heartbeat: self.ports.iter().filter_map(|p| p.address).map(|a| SocketAddr::from((a, self.cfg.port)).to_string()).collect(),
            ports: self
                .ports
                .iter()
                .map(|p| PortRecord { name: p.name.clone(), up: p.up, subnets: p.subnets.clone(), vlans: p.vlans.clone(), weight: p.weight })
                .collect(),
            fenced: self.fenced || self.leaving,
            since: unix_now(),
            holding: self.said.clone(),
            replaces: self.replaces,
            took: self.took.clone(),
            group: self.cfg.group.clone(),
            partner: self.cfg.partner.clone(),
            failed: self.failed.keys().cloned().collect(),
        }
    }

    /// Connects and registers (again): a new incarnation that holds nothing.
    fn register(&mut self) {
        if self.registering || self.ports.is_empty() {
            return;
        }
        self.registering = true;
        let (eps, keys, me, ttl) = (self.cfg.endpoints.clone(), self.keys.clone(), self.cfg.node.clone(), self.cfg.lease_ttl_s);
        let mut rec = self.record();
        rec.holding = vec![];
        let client = self.client.clone();
        self.spawn(async move {
            let r = async {
                let mut c = match client {
                    Some(c) => c,
                    None => store::connect(&eps).await?,
                };
                // A previous incarnation of ours (an agent that was restarted): the agent
                // started silent, so that one is fenced.
                let old = c.get(keys.node(&me), None).await?.kvs().first().map(|kv| kv.create_revision() as u64);
                rec.replaces = old;
                let lease = c.lease_grant(ttl, None).await?.id();
                let inc = store::recreate(&mut c, &keys.node(&me), encode(&rec), lease).await?;
                let election = store::recreate(&mut c, &keys.election(&me), me.clone().into_bytes(), lease).await?;
                Ok::<_, StoreError>(Registration { client: c, lease, inc, election, replaces: old })
            }
            .await;
            Done::Registered(Box::new(r))
        });
    }

    fn on_ports(&mut self, p: Vec<Port>) {
        if p == self.ports {
            return;
        }
        let first = self.ports.is_empty();
        self.ports = p;
        self.open_sockets();
        // No adapter left: stop answering at once and say so ("system down").
        let none_up = !self.ports.iter().any(|p| p.up);
        if none_up && !self.fenced {
            tracing::warn!("cluster: no adapter up: this node stops answering its cluster VIPs");
            self.fenced = true;
            self.set_deadline(0);
            self.hold(vec![]);
        } else if !none_up && self.fenced && !self.leaving {
            tracing::info!("cluster: an adapter is back: this node may hold cluster VIPs again");
            self.fenced = false;
        }
        if first {
            self.register();
        } else {
            self.write_state();
        }
    }

    fn open_sockets(&mut self) {
        let want: Vec<(String, Ipv4Addr, Vec<vip_placement::Subnet>)> = self
            .ports
            .iter()
            .filter(|p| p.up)
            .filter_map(|p| Some((p.name.clone(), p.address?, p.subnets.iter().filter_map(|s| s.parse().ok()).collect())))
            .collect();
        self.socks.retain(|(a, _, _)| want.iter().any(|(_, w, _)| w == a));
        for (name, addr, subnets) in want {
            if let Some(s) = self.socks.iter_mut().find(|(a, _, _)| *a == addr) {
                s.2 = subnets;
                continue;
            }
            match bound_socket(&name, addr) {
                Ok(s) => self.socks.push((addr, s, subnets)),
                Err(e) => tracing::warn!(adapter = %name, error = %e, "cluster: no heartbeat socket"),
            }
        }
    }

    fn leave(&mut self) {
        tracing::info!("cluster: leaving: stop answering, then tell the cluster");
        self.leaving = true;
        self.set_deadline(0);
        // The peers hear it at once (the leader acts on it), etcd right after.
        self.send_heartbeats(boot_ns());
        self.hold(vec![]);
        self.write_state();
    }

    fn revoke(&self) {
        let (Some(mut c), lease) = (self.client.clone(), self.lease) else { return };
        if lease == 0 {
            return;
        }
        // Best effort: the lease expires anyway.
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async move {
                    let _ = tokio::time::timeout(Duration::from_millis(500), c.lease_revoke(lease)).await;
                });
            }
        });
    }

    fn set_deadline(&mut self, d: u64) {
        if d != self.deadline {
            self.deadline = d;
            self.agent.deadline(d);
        }
    }
}

/// A UDP socket that sends out of one adapter, from its address.
fn bound_socket(ifname: &str, addr: Ipv4Addr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind(SocketAddr::from((addr, 0)))?;
    let name = std::ffi::CString::new(ifname).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a setsockopt on our own socket with a NUL-terminated name.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr() as *const libc::c_void,
            name.as_bytes_with_nul().len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

impl<A: Agent> Node<A> {
    fn on_done(&mut self, d: Done) {
        match d {
            Done::Registered(r) => {
                self.registering = false;
                match *r {
                    Ok(reg) => {
                        self.client = Some(reg.client);
                        self.lease = reg.lease;
                        self.inc = reg.inc;
                        self.election = reg.election;
                        self.replaces = reg.replaces;
                        self.last_etcd = unix_now();
                        self.peers = Peers::new(self.me(), self.timing);
                        tracing::info!(node = %self.cfg.node, incarnation = self.inc, lease = self.lease, "cluster: registered");
                        self.keep_alive();
                        self.snapshot();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: cannot register yet; retrying");
                        let tx = self.done_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let _ = tx.send(Done::Lease(0, false));
                        });
                    }
                }
            }
            Done::Snapshot(g, _) if g != self.watch_gen => {}
            Done::Snapshot(_, r) => match r {
                Ok((rev, kvs)) => {
                    let mut m = Mirror { rev, ..Default::default() };
                    for kv in &kvs {
                        m.apply(&self.keys, kv, false);
                    }
                    self.mirror = m;
                    self.last_etcd = unix_now();
                    self.watch(rev + 1);
                    self.on_mirror();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot read the cluster's keys; retrying");
                    self.retry_snapshot();
                }
            },
            Done::Watch(g, _) if g != self.watch_gen => {}
            Done::Watch(_, r) => match r {
                Ok(events) => {
                    for (kv, deleted) in &events {
                        self.mirror.rev = self.mirror.rev.max(kv.mod_revision());
                        self.mirror.apply(&self.keys, kv, *deleted);
                    }
                    self.last_etcd = unix_now();
                    self.on_mirror();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: watch ended; reading again");
                    self.retry_snapshot();
                }
            },
            Done::Record(r, intent) => {
                self.record_busy = false;
                match (r, intent) {
                    (Ok(true), Intent::Acquire { held, at, wait_ns }) => {
                        tracing::debug!(groups = held.len(), ms = (boot_ns() - at) as f64 / 1e6, "cluster: holding recorded");
                        self.said = held.clone();
                        self.last_etcd = unix_now();
                        self.pending = Some((held, at + wait_ns));
                        // Answer now if there is nothing to wait for.
                        self.reconcile();
                    }
                    (Ok(true), Intent::State) => self.last_etcd = unix_now(),
                    (Ok(false), _) => {
                        // Our key is gone (we were cut) or the assignment changed under us.
                        if self.mirror.nodes.get(&self.cfg.node).is_none_or(|n| n.0 != self.inc) {
                            self.out("our node key is gone");
                        }
                    }
                    (Err(e), _) => tracing::debug!(error = %e, "cluster: record not written"),
                }
            }
            Done::Read { sent, ok } => {
                self.reading = false;
                match ok {
                    Ok(true) => {
                        self.last_etcd = unix_now();
                        self.etcd_deadline = self.etcd_deadline.max(sent + self.cfg.fence.as_nanos() as u64);
                    }
                    Ok(false) => tracing::debug!("cluster: our keys are not as we left them"),
                    Err(e) => tracing::debug!(error = %e, "cluster: read failed"),
                }
            }
            Done::Marker(r) => {
                self.marker_busy = false;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "cluster: fence marker not written");
                }
            }
            Done::Leader(r, takeovers) => {
                self.leader_busy = false;
                match r {
                    Ok(Some(rev)) => {
                        for t in &takeovers {
                            tracing::info!(node = %t.node, reason = %t.reason, groups = t.groups, to = ?t.to, revision = rev, "cluster: takeover decided");
                        }
                    }
                    Ok(None) => tracing::debug!("cluster: leader write refused (state moved on)"),
                    Err(e) => tracing::warn!(error = %e, "cluster: leader write failed"),
                }
            }
            Done::Acquired(runs) => {
                self.hooks_busy = false;
                self.hooks_ms = runs.iter().map(|r| r.ms).sum();
                let mut failed = vec![];
                for r in runs {
                    if r.ok {
                        self.acquired.insert(r.server.clone());
                    } else {
                        failed.push(r.server.clone());
                    }
                    self.keep_run(r);
                }
                for f in failed {
                    // Its release undoes whatever the failed acquire left behind.
                    self.run_hook(crate::hooks::Hook::Release, &f);
                    self.server_failed(&f);
                }
                self.reconcile();
            }
            Done::HookRan(r) => {
                if r.hook == crate::hooks::Hook::Release {
                    self.releasing = self.releasing.saturating_sub(1);
                } else {
                    self.checking.remove(&r.server);
                }
                let failed_check = r.hook == crate::hooks::Hook::Check && !r.ok && self.acquired.contains(&r.server);
                let server = r.server.clone();
                self.keep_run(r);
                if failed_check {
                    self.server_failed(&server);
                }
            }
            Done::Held(h) => {
                self.hold_busy = false;
                // Groups that arrived from another node: answered from now on.
                let mut from: BTreeMap<String, usize> = BTreeMap::new();
                if let Some((_, a)) = &self.mirror.assign {
                    for g in a.groups.iter().filter(|g| h.contains(&g.address) && !self.held.contains(&g.address)) {
                        if let Some(f) = g.from.as_ref().filter(|f| **f != self.cfg.node) {
                            *from.entry(f.clone()).or_default() += 1;
                        }
                    }
                }
                let now = unix_now();
                let hooks_ms = std::mem::take(&mut self.hooks_ms);
                for (f, groups) in from {
                    tracing::info!(from = %f, groups, hooks_ms, "cluster: took over; answering");
                    self.took.push(crate::records::Took { from: f, groups, at: now, hooks_ms });
                }
                // Servers no longer answered here at all: their `release` now.
                if let Some(defs) = self.mirror.defs.as_ref().map(|d| d.1.clone()) {
                    let gone: Vec<String> = self
                        .acquired
                        .iter()
                        .filter(|s| !defs.groups.iter().any(|g| g.server.as_ref() == Some(*s) && h.contains(&g.address)))
                        .cloned()
                        .collect();
                    for s in gone {
                        self.acquired.remove(&s);
                        self.run_hook(crate::hooks::Hook::Release, &s);
                    }
                    // Servers with hooks but no acquire hook count as acquired once answered.
                    for s in &defs.servers {
                        if self.cfg.hooks.contains_key(&s.name) && defs.groups.iter().any(|g| g.server.as_ref() == Some(&s.name) && h.contains(&g.address)) {
                            self.acquired.insert(s.name.clone());
                        }
                    }
                }
                let skip = self.took.len().saturating_sub(TOOK_KEPT);
                self.took.drain(..skip);
                let took_new = self.held.len() < h.len();
                self.held = h;
                if took_new {
                    self.write_state();
                }
                // Released groups: now say so.
                if self.said.iter().any(|a| !self.held.contains(a)) && self.pending.as_ref().is_none_or(|p| p.0 != self.said) {
                    self.said.retain(|a| self.held.contains(a));
                    self.write_state();
                }
            }
            Done::Lease(lease, _) if lease != 0 && lease != self.lease => {}
            Done::Lease(_, true) => self.last_etcd = unix_now(),
            Done::Lease(_, alive) => {
                if !alive {
                    if self.inc != 0 {
                        self.out("our lease is gone");
                    }
                    self.register();
                }
            }
        }
    }

    /// We are no longer a member (cut, or our lease expired): silent at once, hold
    /// nothing, and register again as a new incarnation.
    fn out(&mut self, why: &str) {
        tracing::warn!(reason = why, "cluster: out of the cluster: silent, holding nothing; registering again");
        self.set_deadline(0);
        self.etcd_deadline = 0;
        self.inc = 0;
        self.said.clear();
        self.pending = None;
        self.hold(vec![]);
        self.register();
    }

    fn snapshot(&mut self) {
        let (Some(mut c), keys) = (self.client.clone(), self.keys.clone()) else { return };
        self.watch_gen += 1;
        let g = self.watch_gen;
        self.spawn(async move { Done::Snapshot(g, store::snapshot(&mut c, &keys).await) });
    }

    fn retry_snapshot(&mut self) {
        let tx = self.done_tx.clone();
        let (Some(mut c), keys) = (self.client.clone(), self.keys.clone()) else { return };
        self.watch_gen += 1;
        let g = self.watch_gen;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = tx.send(Done::Snapshot(g, store::snapshot(&mut c, &keys).await));
        });
    }

    fn watch(&mut self, from: i64) {
        let (Some(mut c), keys, tx, g) = (self.client.clone(), self.keys.clone(), self.done_tx.clone(), self.watch_gen) else { return };
        tokio::spawn(async move {
            let opts = WatchOptions::new().with_prefix().with_start_revision(from);
            let mut stream = match c.watch(keys.prefix(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Done::Watch(g, Err(e.into())));
                    return;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            let _ = tx.send(Done::Watch(g, Err(StoreError::Timeout(Duration::ZERO))));
                            return;
                        }
                        let ev: Vec<(KeyValue, bool)> = resp
                            .events()
                            .iter()
                            .filter_map(|e| Some((e.kv()?.clone(), e.event_type() == EventType::Delete)))
                            .collect();
                        if !ev.is_empty() && tx.send(Done::Watch(g, Ok(ev))).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Done::Watch(g, Err(StoreError::Timeout(Duration::ZERO))));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Done::Watch(g, Err(e.into())));
                        return;
                    }
                }
            }
        });
    }

    fn keep_alive(&mut self) {
        let (Some(mut c), lease, tx) = (self.client.clone(), self.lease, self.done_tx.clone()) else { return };
        let every = Duration::from_millis((self.cfg.lease_ttl_s as u64 * 1000 / 3).max(100));
        tokio::spawn(async move {
            loop {
                let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                loop {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(every, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() <= 0 => {
                            let _ = tx.send(Done::Lease(lease, false));
                            return;
                        }
                        Ok(Ok(Some(_))) => {
                            let _ = tx.send(Done::Lease(lease, true));
                        }
                        _ => break,
                    }
                    tokio::time::sleep(every).await;
                    if tx.is_closed() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// The member list changed, or the assignment, or anything else in etcd.
    fn on_mirror(&mut self) {
        if self.inc == 0 {
            return;
        }
        match self.mirror.nodes.get(&self.cfg.node) {
            Some((c, _, _)) if *c == self.inc => {}
            _ => {
                self.out("our node key was deleted (the leader cut us off, or our lease expired)");
                return;
            }
        }
        if let Some((ver, m)) = &self.mirror.members {
            let view = View {
                version: *ver as u64,
                members: m.members.iter().map(|(n, i)| Incarnation { node: name_hash(n), incarnation: *i }).collect(),
            };
            if view.version != self.peers.view().version {
                self.peers.set_view(view, boot_ns());
            }
        }
        self.reconcile();
        // Whatever changed may call for a decision now rather than at the next tick.
        self.lead(boot_ns());
    }

    /// The groups the assignment gives this incarnation (an assignment older than our
    /// registration gives us nothing: a returning node reads before it answers).
    fn desired(&self) -> (Vec<IpAddr>, u64, i64) {
        let Some((rev, a)) = &self.mirror.assign else { return (vec![], 0, 0) };
        if *rev <= self.inc || self.fenced || self.leaving {
            return (vec![], 0, *rev);
        }
        let mut wait_ms = 0;
        let mut v = vec![];
        let defs = self.mirror.defs.as_ref().map(|d| d.1.clone()).unwrap_or_default();
        let failed_here = |addr: IpAddr| {
            defs.groups.iter().find(|d| d.address == addr).and_then(|d| d.server.as_ref()).is_some_and(|s| self.failed.contains_key(s))
        };
        for g in &a.groups {
            if g.owner.as_deref() == Some(self.cfg.node.as_str()) && g.incarnation == self.inc as u64 && !failed_here(g.address) {
                if !self.held.contains(&g.address) {
                    wait_ms = wait_ms.max(g.wait_ms);
                }
                v.push(g.address);
            }
        }
        v.sort();
        (v, wait_ms, *rev)
    }

    /// Moves what this node holds towards what it was given: stop answering first and
    /// then say so; say so first and then answer.
    fn reconcile(&mut self) {
        if self.hold_busy || self.record_busy || self.inc == 0 {
            return;
        }
        let (want, wait_ms, rev) = self.desired();
        if let Some((p, at)) = self.pending.clone() {
            if p != want {
                // Changed while waiting: what was said stays said; start over.
                self.pending = None;
            } else if boot_ns() >= at {
                // A virtual server's `acquire` runs before its VIPs are answered here.
                let need = self.to_acquire(&p);
                if !need.is_empty() {
                    if !self.hooks_busy {
                        self.acquire(need);
                    }
                    return;
                }
                self.pending = None;
                self.hold(p);
                return;
            } else {
                return;
            }
        }
        let keep: Vec<IpAddr> = self.held.iter().filter(|a| want.contains(a)).copied().collect();
        if keep.len() < self.held.len() {
            self.hold(keep);
            return;
        }
        if self.said.iter().any(|a| !want.contains(a) && !self.held.contains(a)) {
            self.said.retain(|a| want.contains(a) || self.held.contains(a));
            self.write_state();
            return;
        }
        if want.iter().any(|a| !self.held.contains(a)) {
            if want.iter().all(|a| self.said.contains(a)) {
                self.pending = Some((want, boot_ns()));
                return self.reconcile();
            }
            // Say so first, only if the assignment is still the one read.
            let Some(mut c) = self.client.clone() else { return };
            let mut rec = self.record();
            rec.holding = want.clone();
            let (key, inc, lease, akey) = (self.keys.node(&self.cfg.node), self.inc, self.lease, self.keys.assign());
            let intent = Intent::Acquire { held: want, at: boot_ns(), wait_ns: wait_ms * 1_000_000 };
            self.record_busy = true;
            self.spawn(async move {
                let t = etcd_client::Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, inc), Compare::mod_revision(akey, CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(key.as_str(), encode(&rec), Some(PutOptions::new().with_lease(lease)))]);
                let r = c.txn(t).await.map(|r| r.succeeded()).map_err(StoreError::from);
                Done::Record(r, intent)
            });
        }
    }

    /// The virtual servers with an `acquire` hook that `groups` would start answering here,
    /// highest priority first.
    fn to_acquire(&self, groups: &[IpAddr]) -> Vec<String> {
        let Some((_, defs)) = &self.mirror.defs else { return vec![] };
        let mut v: Vec<&crate::records::ServerDef> = defs
            .servers
            .iter()
            .filter(|s| self.cfg.hooks.get(&s.name).is_some_and(|h| h.acquire.is_some()))
            .filter(|s| !self.acquired.contains(&s.name) && !self.failed.contains_key(&s.name))
            .filter(|s| defs.groups.iter().any(|g| g.server.as_ref() == Some(&s.name) && groups.contains(&g.address) && !self.held.contains(&g.address)))
            .collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.priority));
        v.into_iter().map(|s| s.name.clone()).collect()
    }

    /// A server's addresses, for its hooks (at most 4096).
    fn server_addresses(&self, server: &str) -> Vec<String> {
        let Some((_, defs)) = &self.mirror.defs else { return vec![] };
        defs.groups.iter().filter(|g| g.server.as_deref() == Some(server)).flat_map(|g| g.addresses()).take(4096).map(|a| a.to_string()).collect()
    }

    /// Runs the `acquire` hooks of `servers` one after another (priority order).
    fn acquire(&mut self, servers: Vec<String>) {
        self.hooks_busy = true;
        let jobs: Vec<(String, crate::hooks::Hooks, Vec<String>)> =
            servers.iter().filter_map(|s| Some((s.clone(), self.cfg.hooks.get(s)?.clone(), self.server_addresses(s)))).collect();
        let (cluster, node) = (self.cfg.cluster.clone(), self.cfg.node.clone());
        self.spawn(async move {
            let mut runs = vec![];
            for (server, hooks, addresses) in &jobs {
                let cx = crate::hooks::Context { cluster: &cluster, node: &node, server, addresses };
                runs.push(crate::hooks::run(crate::hooks::Hook::Acquire, hooks, &cx).await);
            }
            Done::Acquired(runs)
        });
    }

    /// Runs one `release` or `check` hook in the background.
    fn run_hook(&mut self, hook: crate::hooks::Hook, server: &str) {
        let Some(hooks) = self.cfg.hooks.get(server).cloned() else { return };
        if hook.path(&hooks).is_none() {
            return;
        }
        let addresses = self.server_addresses(server);
        if hook == crate::hooks::Hook::Release {
            self.releasing += 1;
        }
        let (cluster, node, server) = (self.cfg.cluster.clone(), self.cfg.node.clone(), server.to_string());
        self.spawn(async move {
            let cx = crate::hooks::Context { cluster: &cluster, node: &node, server: &server, addresses: &addresses };
            Done::HookRan(crate::hooks::run(hook, &hooks, &cx).await)
        });
    }

    fn keep_run(&mut self, r: crate::hooks::HookRun) {
        if r.ok {
            tracing::info!(server = %r.server, hook = r.hook.name(), ms = r.ms, "cluster: hook done");
        } else {
            tracing::warn!(server = %r.server, hook = r.hook.name(), outcome = %r.outcome, ms = r.ms, "cluster: hook failed");
        }
        self.hook_runs.push_back(r);
        while self.hook_runs.len() > HOOK_RUNS_KEPT {
            self.hook_runs.pop_front();
        }
    }

    /// A server failed here: it is given up (the leader places it elsewhere) for a while.
    fn server_failed(&mut self, server: &str) {
        tracing::warn!(server, "cluster: virtual server failed on this node; it goes elsewhere");
        self.failed.insert(server.to_string(), boot_ns());
        // What was said but never answered is unsaid now (answered groups go through the
        // usual release: stop answering, then say so).
        if let Some((_, defs)) = &self.mirror.defs {
            let mine: Vec<IpAddr> = defs.groups.iter().filter(|g| g.server.as_deref() == Some(server)).map(|g| g.address).collect();
            let held = &self.held;
            self.said.retain(|a| !mine.contains(a) || held.contains(a));
        }
        self.write_state();
        self.reconcile();
    }

    /// Hands the data plane a new set of groups.
    fn hold(&mut self, held: Vec<IpAddr>) {
        let defs = self.mirror.defs.as_ref().map(|d| d.1.clone()).unwrap_or_default();
        self.hold_busy = true;
        let tx = self.done_tx.clone();
        let h = held.clone();
        self.agent.hold(
            defs,
            held,
            Box::new(move || {
                let _ = tx.send(Done::Held(h));
            }),
        );
    }

    /// Writes our record as things are (ports, what we hold, fenced).
    fn write_state(&mut self) {
        if self.inc == 0 || self.record_busy {
            return;
        }
        let Some(mut c) = self.client.clone() else { return };
        let rec = self.record();
        let (key, inc, lease) = (self.keys.node(&self.cfg.node), self.inc, self.lease);
        self.record_busy = true;
        self.spawn(async move { Done::Record(store::update_own(&mut c, &key, inc, encode(&rec), lease).await, Intent::State) });
    }

    /// Periodic `check` hooks of the servers held here; failed marks that expired.
    fn hook_tick(&mut self, now: u64) {
        let due: Vec<String> = self
            .acquired
            .iter()
            .filter(|s| !self.checking.contains(*s) && !self.failed.contains_key(*s))
            .filter(|s| {
                self.cfg.hooks.get(*s).is_some_and(|h| {
                    h.check.is_some() && self.last_check.get(*s).is_none_or(|t| now.saturating_sub(*t) >= h.check_every.as_nanos() as u64)
                })
            })
            .cloned()
            .collect();
        for s in due {
            self.checking.insert(s.clone());
            self.last_check.insert(s.clone(), now);
            self.run_hook(crate::hooks::Hook::Check, &s);
        }
        let before = self.failed.len();
        self.failed.retain(|_, at| now.saturating_sub(*at) < FAILED_FOR.as_nanos() as u64);
        if self.failed.len() != before {
            self.write_state();
        }
    }

    fn on_tick(&mut self) {
        let now = boot_ns();
        self.hook_tick(now);
        let gap = now.saturating_sub(self.last_tick);
        if self.last_tick != 0 && gap > 3 * self.cfg.heartbeat.as_nanos() as u64 {
            tracing::warn!(gap_ms = gap / 1_000_000, "cluster: heartbeat loop stalled");
        }
        self.last_tick = now;
        if self.inc != 0 {
            for x in self.peers.tick(now) {
                let name = self.mirror.nodes.iter().find(|(n, (c, _, _))| name_hash(n) == x.node && *c as u64 == x.incarnation).map(|(n, _)| n.clone());
                let heard = self.peers.heard(&x).map(|h| (now.saturating_sub(h.0) / 1_000_000) as i64).unwrap_or(-1);
                tracing::warn!(peer = name.as_deref().unwrap_or("?"), incarnation = x.incarnation, heard_ms_ago = heard, "cluster: peer suspected (silent); no longer acked");
            }
            self.send_heartbeats(now);
        }
        self.keep_deadline(now);
        if self.record_needs_rewrite() {
            self.write_state();
        }
        self.reconcile();
        self.lead(now);
    }

    /// One heartbeat to every peer address an up adapter reaches.
    fn send_heartbeats(&mut self, now: u64) {
        if self.inc == 0 {
            return;
        }
        let hb = self.peers.heartbeat(self.cluster_hash, self.leaving || self.fenced, now).encode();
        let targets: Vec<SocketAddr> = self
            .mirror
            .nodes
            .iter()
            .filter(|(n, _)| **n != self.cfg.node)
            .flat_map(|(_, (_, _, r))| r.heartbeat.iter().filter_map(|a| a.parse().ok()))
            .collect();
        let mut sent = 0;
        for (_, s, subnets) in &self.socks {
            for t in targets.iter().filter(|t| subnets.iter().any(|n| n.contains(&t.ip()))) {
                // A plain non-blocking send: a heartbeat that does not fit now is
                // simply not sent (the next one follows in one period).
                match s.send_to(&hb, *t) {
                    Ok(_) => sent += 1,
                    Err(e) => tracing::trace!(to = %t, error = %e, "heartbeat not sent"),
                }
            }
        }
        if sent == 0 && !targets.is_empty() {
            tracing::debug!(targets = targets.len(), sockets = self.socks.len(), "cluster: no heartbeat went out");
        }
    }

    fn record_needs_rewrite(&self) -> bool {
        let Some((c, _, r)) = self.mirror.nodes.get(&self.cfg.node) else { return false };
        if *c != self.inc || self.record_busy {
            return false;
        }
        let now = self.record();
        r.fenced != now.fenced
            || r.ports != now.ports
            || r.heartbeat != now.heartbeat
            || r.took != now.took
            || (r.holding != now.holding && self.pending.is_none())
    }

    /// The answering deadline: what the peers prove, or etcd when they cannot.
    fn keep_deadline(&mut self, now: u64) {
        if self.leaving || self.fenced || self.inc == 0 {
            self.set_deadline(0);
            return;
        }
        let fence = self.cfg.fence.as_nanos() as u64;
        let peer = self.peers.deadline().unwrap_or(0);
        let marker = self.mirror.fences.contains_key(&self.cfg.node);
        // A member-list change leaves no majority on the new list until the peers have it
        // too (a heartbeat or two): for that long the deadline in force (the peers' last)
        // is the measure, so a change alone does not send this node to etcd (and make the
        // leader wait out its fence should it die in the next second).
        let settling = now.saturating_sub(self.peers.view_moved_at()) < 4 * self.cfg.heartbeat.as_nanos() as u64;
        let basis = if !marker && settling { peer.max(self.deadline) } else { peer };
        let short = basis < now + fence / 2;
        let holds = !self.held.is_empty() || !self.said.is_empty();
        if short {
            self.peers_fine_since = None;
        } else if self.peers_fine_since.is_none() {
            self.peers_fine_since = Some(now);
        }
        if short && holds {
            if !marker && !self.marker_busy {
                // Say we answer on etcd's word before we do (the leader then waits).
                if let Some(mut c) = self.client.clone() {
                    let (key, fkey, inc, lease) = (self.keys.node(&self.cfg.node), self.keys.fence(&self.cfg.node), self.inc, self.lease);
                    self.marker_busy = true;
                    self.spawn(async move {
                        let t = etcd_client::Txn::new()
                            .when([Compare::create_revision(key, CompareOp::Equal, inc)])
                            .and_then([TxnOp::put(fkey, vec![], Some(PutOptions::new().with_lease(lease)))]);
                        Done::Marker(c.txn(t).await.map(|r| r.succeeded()).map_err(StoreError::from))
                    });
                }
            } else if marker && !self.reading && now >= self.last_read + 2 * self.cfg.heartbeat.as_nanos() as u64 {
                if let Some(mut c) = self.client.clone() {
                    let (keys, me, inc) = (self.keys.clone(), self.cfg.node.clone(), self.inc);
                    self.reading = true;
                    self.last_read = now;
                    self.spawn(async move { Done::Read { sent: now, ok: store::still_mine(&mut c, &keys, &me, inc, true).await } });
                }
            }
        } else if marker && !self.marker_busy && now > self.etcd_deadline && self.peers_fine_since.is_some_and(|t| now - t > 1_000_000_000) {
            // The peers vouch again and the last etcd-based deadline has passed: the
            // leader need not wait for us any more.
            if let Some(mut c) = self.client.clone() {
                let fkey = self.keys.fence(&self.cfg.node);
                self.marker_busy = true;
                self.spawn(async move { Done::Marker(c.delete(fkey, None).await.map(|_| true).map_err(StoreError::from)) });
            }
        }
        let etcd = if marker { self.etcd_deadline } else { 0 };
        let d = peer.max(etcd);
        // The deadline only moves forward, except to silence.
        if d > self.deadline {
            self.set_deadline(d);
        }
    }
}


/// Takeover records kept in etcd.
const TAKEOVERS_KEPT: usize = 64;
/// How long a group never placed waits for its home node to register.
const HOME_WAIT: Duration = Duration::from_secs(5);
/// How far before a takeover's decision a new owner's "took" may be stamped and still be
/// its first answer (the two stamps come from two nodes' clocks, NTP-close).
const TOOK_SLACK_S: f64 = 0.05;
/// Hook runs kept for status.
const HOOK_RUNS_KEPT: usize = 32;
/// How long a virtual server that failed on this node is kept off it.
pub const FAILED_FOR: Duration = Duration::from_secs(60);
/// Takeovers a node keeps in its own record.
const TOOK_KEPT: usize = 8;

impl<A: Agent> Node<A> {
    fn incarnation_of(&self, name: &str) -> Option<u64> {
        self.mirror.nodes.get(name).map(|n| n.0 as u64)
    }

    /// Its last heartbeat said it stopped answering (it is leaving, or has no adapter).
    fn said_leaving(&self, name: &str, inc: u64) -> bool {
        self.peers.heard(&Incarnation { node: name_hash(name), incarnation: inc }).is_some_and(|h| h.1)
    }

    fn is_cut(&self, name: &str, inc: u64, now: u64) -> bool {
        matches!(self.peers.cut(&Incarnation { node: name_hash(name), incarnation: inc }, now), Cut::At(t) if t <= now)
    }

    /// Unix time of a boot-clock instant.
    fn unix_of(&self, t: u64, now: u64) -> f64 {
        unix_now() - now.saturating_sub(t) as f64 / 1e9
    }

    /// The leader's turn: if this node leads (the first candidate not cut off), decide and
    /// write the decision, guarded by its election key.
    fn lead(&mut self, now: u64) {
        if self.inc == 0 || self.leader_busy || self.leaving || self.election == 0 {
            return;
        }
        let Some(mut client) = self.client.clone() else { return };
        let Some((_, defs)) = self.mirror.defs.clone() else { return };
        let defs_rev = self.mirror.defs.as_ref().map_or(0, |d| d.0);
        // Candidates ahead of us must all be cut off (or gone) for us to lead.
        let mut ahead = vec![];
        for (name, rev) in self.mirror.candidates() {
            if name == self.cfg.node {
                if rev != self.election {
                    return;
                }
                break;
            }
            let gone = match self.mirror.nodes.get(&name) {
                None => true,
                Some((c, _, r)) => r.fenced || self.is_cut(&name, *c as u64, now),
            };
            if !gone {
                return;
            }
            ahead.push((name, rev));
        }
        let fence_wait_ms = rate_margin(self.cfg.fence.as_nanos() as u64).div_ceil(1_000_000);
        let members: HashSet<(String, u64)> =
            self.mirror.members.as_ref().map(|m| m.1.members.iter().cloned().collect()).unwrap_or_default();
        // Registered nodes: alive, or cut (to delete).
        let mut cut: Vec<(String, i64)> = vec![];
        let mut alive: HashMap<String, bool> = HashMap::new();
        let mut joining: HashMap<String, bool> = HashMap::new();
        for (name, (c, _, r)) in &self.mirror.nodes {
            let inc = *c as u64;
            let member = members.contains(&(name.clone(), inc));
            let heard = self.peers.heard(&Incarnation { node: name_hash(name), incarnation: inc }).is_some();
            let a = if *name == self.cfg.node {
                true
            } else if member && self.is_cut(name, inc, now) {
                cut.push((name.clone(), *c));
                false
            } else {
                member && heard && !r.fenced && !self.said_leaving(name, inc)
            };
            joining.insert(name.clone(), !a && !r.fenced && !self.said_leaving(name, inc) && !cut.iter().any(|(n, _)| n == name));
            if !a {
                self.suspected.entry(name.clone()).or_insert_with(unix_now);
            } else {
                self.suspected.remove(name);
            }
            alive.insert(name.clone(), a);
        }
        let cut_names: HashSet<&str> = cut.iter().map(|(n, _)| n.as_str()).collect();
        let states: Vec<(&str, NodeState)> = self
            .mirror
            .nodes
            .iter()
            // Cut nodes stay in (not alive): placement needs to know what a unit leaves
            // (a standby takes a failed node whole; its group and partner come next).
            .map(|(n, (c, _, r))| (n.as_str(), NodeState { incarnation: *c as u64, record: r, alive: alive[n], joining: joining[n] }))
            .collect();
        // A group waits at most HOME_WAIT for a home node that has never registered.
        let t = unix_now();
        for g in &defs.groups {
            self.unplaced.entry(g.address).or_insert(t);
        }
        self.unplaced.retain(|a, _| defs.groups.iter().any(|g| g.address == *a));
        let previous = self.mirror.assign.as_ref().map(|a| a.1.clone()).unwrap_or_default();
        let mirror = &self.mirror;
        let reasons: std::cell::RefCell<HashMap<String, &'static str>> = Default::default();
        let relied: std::cell::RefCell<HashSet<String>> = Default::default();
        let holder = |name: &str, inc: u64, addr: IpAddr| -> Holder {
            let (h, why) = match mirror.nodes.get(name) {
                Some((c, _, r)) if *c as u64 == inc => {
                    if cut_names.contains(name) {
                        (Holder::Gone { wait_ms: if mirror.fences.contains_key(name) { fence_wait_ms } else { 0 } }, "silent")
                    } else if r.fenced || self.said_leaving(name, inc) {
                        (Holder::Gone { wait_ms: 0 }, "down")
                    } else {
                        let holding = r.holding.contains(&addr);
                        if !holding {
                            // The move rests on this record: it must still be current.
                            relied.borrow_mut().insert(name.to_string());
                        }
                        (Holder::Live { holding }, "handover")
                    }
                }
                Some((_, _, r)) if r.replaces == Some(inc) => (Holder::Gone { wait_ms: 0 }, "restarted"),
                _ if self.is_cut(name, inc, now) => (Holder::Gone { wait_ms: fence_wait_ms }, "expired"),
                _ => (Holder::Unknown, ""),
            };
            reasons.borrow_mut().insert(name.to_string(), why);
            h
        };
        let unplaced = &self.unplaced;
        let waits = |a: IpAddr| unplaced.get(&a).is_some_and(|since| t - since < HOME_WAIT.as_secs_f64());
        let rebalance = self.mirror.rebalance > previous.rebalanced;
        let d = leader::decide(&leader::Input { defs: &defs, defs_rev, nodes: &states, previous: &previous, holder: &holder, waits: &waits, now: t, rebalance });
        // A rebalance is carried out over several decisions (a live holder lets go first):
        // done once a decision under it moves nothing more.
        let rebalanced = if rebalance && d.moved.is_empty() && d.released.is_empty() { self.mirror.rebalance } else { previous.rebalanced };
        let record = leader::record(&d, &self.cfg.node, self.election, defs_rev, unix_now(), rebalanced);
        let new_members = MembersRecord {
            members: self
                .mirror
                .nodes
                .iter()
                .filter(|(n, _)| !cut_names.contains(n.as_str()))
                .map(|(n, (c, _, _))| (n.clone(), *c as u64))
                .collect(),
        };
        let assign_changed = self.mirror.assign.as_ref().is_none_or(|(_, a)| a.groups != record.groups || a.nodes != record.nodes || a.term != record.term || a.defs != record.defs || a.rebalanced != record.rebalanced);
        let members_changed = self.mirror.members.as_ref().is_none_or(|(_, m)| *m != new_members);
        if !assign_changed && !members_changed && cut.is_empty() && ahead.is_empty() {
            return;
        }
        // Takeovers from nodes that are gone, for the record.
        let reasons = reasons.into_inner();
        let mut by_from: BTreeMap<String, (usize, usize, Vec<String>)> = BTreeMap::new();
        for (gi, from, to) in &d.moved {
            let Some(f) = from else { continue };
            let e = by_from.entry(f.clone()).or_default();
            e.0 += 1;
            e.1 += defs.groups[*gi].count as usize;
            if !e.2.contains(to) {
                e.2.push(to.clone());
            }
        }
        let takeovers: Vec<TakeoverRecord> = by_from
            .into_iter()
            .map(|(node, (groups, vips, to))| {
                let inc = self.incarnation_of(&node).unwrap_or(0);
                let heard = self.peers.heard(&Incarnation { node: name_hash(&node), incarnation: inc }).map(|h| h.0);
                let silent_since = heard.map_or(0.0, |t| self.unix_of(t, now));
                let suspected_at = match heard {
                    Some(t) if reasons.get(&node) == Some(&"silent") => self.unix_of(t + self.timing.suspect_ns, now),
                    _ => self.suspected.get(&node).copied().unwrap_or_else(unix_now),
                };
                TakeoverRecord {
                    node: node.clone(),
                    reason: reasons.get(&node).copied().unwrap_or("").to_string(),
                    silent_since,
                    suspected_at,
                    decided_at: unix_now(),
                    groups,
                    vips,
                    to,
                    leader: self.cfg.node.clone(),
                    answered_at: 0.0,
                    hooks_ms: 0.0,
                }
            })
            .collect();
        let mut compares = vec![Compare::mod_revision(self.keys.assign(), CompareOp::Equal, self.mirror.assign.as_ref().map_or(0, |a| a.0))];
        let mut ops = vec![];
        for (name, c) in &cut {
            compares.push(Compare::create_revision(self.keys.node(name), CompareOp::Equal, *c));
            compares.push(Compare::create_revision(self.keys.fence(name), CompareOp::Equal, self.mirror.fences.get(name).copied().unwrap_or(0)));
            ops.push(TxnOp::delete(self.keys.node(name), None));
            ops.push(TxnOp::delete(self.keys.election(name), None));
            ops.push(TxnOp::delete(self.keys.fence(name), None));
        }
        for (name, rev) in &ahead {
            compares.push(Compare::create_revision(self.keys.election(name), CompareOp::Equal, *rev));
            if !cut_names.contains(name.as_str()) {
                ops.push(TxnOp::delete(self.keys.election(name), None));
            }
        }
        // The records a move rested on (their holder said it does not hold the group)
        // must still be current.
        for name in relied.into_inner() {
            if let Some((_, m, _)) = self.mirror.nodes.get(&name) {
                compares.push(Compare::mod_revision(self.keys.node(&name), CompareOp::Equal, *m));
            }
        }
        if assign_changed {
            ops.push(TxnOp::put(self.keys.assign(), encode(&record), None));
        }
        if members_changed {
            ops.push(TxnOp::put(self.keys.members(), encode(&new_members), None));
        }
        if !takeovers.is_empty() {
            let mut all = self.mirror.takeovers.clone();
            all.extend(takeovers.iter().cloned());
            let skip = all.len().saturating_sub(TAKEOVERS_KEPT);
            ops.push(TxnOp::put(self.keys.takeovers(), encode(&all[skip..].to_vec()), None));
        }
        if ops.is_empty() {
            return;
        }
        let (ekey, term) = (self.keys.election(&self.cfg.node), self.election);
        self.leader_busy = true;
        tracing::debug!(cut = cut.len(), moved = d.moved.len(), released = d.released.len(), members_changed, "cluster: leader writes");
        self.spawn(async move { Done::Leader(store::leader_txn(&mut client, &ekey, term, compares, ops).await, takeovers) });
    }

    fn status(&self) -> ClusterStatus {
        let now = boot_ns();
        let leader = self
            .mirror
            .candidates()
            .into_iter()
            .find(|(n, _)| self.mirror.nodes.get(n).is_some_and(|(c, _, r)| !r.fenced && !self.is_cut(n, *c as u64, now)))
            .map(|x| x.0);
        let assign = self.mirror.assign.as_ref().map(|a| &a.1);
        let health: HashMap<&str, String> =
            assign.map(|a| a.nodes.iter().map(|h| (h.name.as_str(), format!("{:?}", h.health).to_lowercase())).collect()).unwrap_or_default();
        let mut nodes: Vec<NodeStatus> = self
            .mirror
            .nodes
            .iter()
            .map(|(n, (c, _, r))| NodeStatus {
                name: n.clone(),
                health: health.get(n.as_str()).cloned().unwrap_or_else(|| "joining".into()),
                role: format!("{:?}", r.role).to_lowercase(),
                address: r.address.clone(),
                incarnation: *c,
                heard_ms: if *n == self.cfg.node {
                    Some(0.0)
                } else {
                    self.peers.heard(&Incarnation { node: name_hash(n), incarnation: *c as u64 }).map(|h| now.saturating_sub(h.0) as f64 / 1e6)
                },
                holding: r.holding.iter().map(|a| a.to_string()).collect(),
                ports: r.ports.iter().map(|p| (p.name.clone(), p.up)).collect(),
                group: r.group.clone(),
                partner: r.partner.clone(),
            })
            .collect();
        for h in assign.map(|a| a.nodes.as_slice()).unwrap_or_default() {
            if !self.mirror.nodes.contains_key(&h.name) {
                nodes.push(NodeStatus { name: h.name.clone(), health: format!("{:?}", h.health).to_lowercase(), ..Default::default() });
            }
        }
        let defs = self.mirror.defs.as_ref().map(|d| d.1.clone()).unwrap_or_default();
        let owner_of = |g: &crate::records::GroupDef| assign.and_then(|a| a.groups.iter().find(|x| x.address == g.address)).and_then(|x| x.owner.clone());
        let groups = defs
            .groups
            .iter()
            .map(|g| GroupStatus {
                address: g.address.to_string(),
                count: g.count,
                owner: owner_of(g),
                home: g.server.as_ref().and_then(|s| defs.servers.iter().find(|x| x.name == *s)).map_or(g.node.clone(), |s| s.node.clone()),
                server: g.server.clone(),
            })
            .collect();
        let servers = defs
            .servers
            .iter()
            .map(|sv| {
                let mine: Vec<&crate::records::GroupDef> = defs.groups.iter().filter(|g| g.server.as_deref() == Some(sv.name.as_str())).collect();
                let owners: Vec<Option<String>> = mine.iter().map(|g| owner_of(g)).collect();
                ServerStatus {
                    name: sv.name.clone(),
                    priority: sv.priority,
                    migrate: sv.migrate,
                    home: sv.node.clone(),
                    // One owner for all its groups, or none yet.
                    owner: owners.first().cloned().flatten().filter(|o| owners.iter().all(|x| x.as_ref() == Some(o))),
                    groups: mine.iter().map(|g| g.address.to_string()).collect(),
                }
            })
            .collect();
        let (peer, etcd) = (self.peers.deadline().unwrap_or(0), if self.mirror.fences.contains_key(&self.cfg.node) { self.etcd_deadline } else { 0 });
        ClusterStatus {
            cluster: self.cfg.cluster.clone(),
            node: self.cfg.node.clone(),
            incarnation: self.inc,
            revision: self.mirror.rev,
            at: self.last_etcd,
            etcd_connected: unix_now() - self.last_etcd < 3.0,
            i_lead: leader.as_deref() == Some(self.cfg.node.as_str()),
            leader,
            members_version: self.peers.view().version,
            deadline_ms: (self.deadline as f64 - now as f64) / 1e6,
            deadline_from: if self.deadline == 0 {
                "silent".into()
            } else if etcd >= peer {
                "etcd".into()
            } else {
                "peers".into()
            },
            nodes,
            groups,
            servers,
            takeovers: self
                .mirror
                .takeovers
                .iter()
                .map(|t| {
                    // The first answer: the earliest report, by a node it went to, at or
                    // after the decision (clocks of different nodes: unix time, NTP).
                    let (answered, hooks_ms) = t
                        .to
                        .iter()
                        .filter_map(|n| self.mirror.nodes.get(n))
                        .flat_map(|(_, _, r)| r.took.iter().filter(|k| k.from == t.node && k.at >= t.decided_at - TOOK_SLACK_S))
                        .fold((f64::INFINITY, 0.0f64), |(a, h), k| (a.min(k.at), h.max(k.hooks_ms)));
                    TakeoverRecord { answered_at: if answered.is_finite() { answered } else { 0.0 }, hooks_ms, ..t.clone() }
                })
                .collect(),
            holding: self.held.iter().map(|a| a.to_string()).collect(),
            hooks: self.hook_runs.iter().cloned().collect(),
            failed_here: self.failed.keys().cloned().collect(),
        }
    }
}
