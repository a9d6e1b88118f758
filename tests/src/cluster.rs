//! The cluster lab: real etcd (three members, each in a namespace of its own), nodes with
//! two adapters on a client bridge and one on a cluster bridge, each running the real
//! agent, and clients on the client bridge.
//!
//! ```text
//!   clients c0.. ── br0 (192.0.2.0/24) ── eth0, eth1 of every node
//!   etcd e0..e2  ── br1 (10.99.0.0/24) ── cl0 of every node
//! ```
//!
//! Node `k` (up to 40): eth0/eth1 are 192.0.2.(10+2k)/(11+2k), cl0 is 10.99.0.(1+k);
//! clients are 192.0.2.(150+i); the groups of [`ClusterLab::defs_text`] start at
//! 192.0.2.(180+k); etcd member `m` is 10.99.0.(201+m). Node `k`'s adapter `j` has MAC
//! 02:00:00:(0x10+k):00:0j, so a MAC says which node answered.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use vip_agent::dataplane::Dataplane;
use vip_packet::{mac_str, Mac};

use crate::{
    agentproc::{AgentFiles, AgentProc, TempDir},
    netns::{veth, NetNs},
    topo::Client,
};

pub const CLUSTER: &str = "lab";
/// Heartbeat port of the lab's nodes.
pub const HB_PORT: u16 = 7946;

pub fn node_mac(k: usize, j: usize) -> Mac {
    [0x02, 0, 0, 0x10 + k as u8, 0, j as u8]
}

/// The node a MAC belongs to.
pub fn node_of(mac: Mac) -> Option<usize> {
    (mac[0..3] == [0x02, 0, 0] && mac[3] >= 0x10 && mac[4] == 0).then(|| (mac[3] - 0x10) as usize)
}

pub fn node_ip(k: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + 2 * k as u8 + j as u8)
}

pub fn etcd_ip(m: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 201 + m as u8)
}

/// The group of VIPs homed on node `k` in [`ClusterLab::defs`].
pub fn vip_of(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 180 + k as u8)
}

pub struct EtcdMember {
    pub ns: NetNs,
    pub name: String,
    child: Option<Child>,
    dir: TempDir,
    args: Vec<String>,
}

impl EtcdMember {
    fn start(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name, "etcd"]).args(&self.args);
        let log = std::fs::File::create(self.dir.0.join("etcd.log")).expect("etcd log");
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().expect("spawning etcd (is etcd-server installed?)"));
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on its data directory.
    pub fn restart(&mut self) {
        self.kill();
        let args: Vec<String> = self.args.iter().map(|a| if a == "new" { "existing".into() } else { a.clone() }).collect();
        self.args = args;
        self.start();
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct ClusterNode {
    pub k: usize,
    pub name: String,
    pub ns: NetNs,
    pub files: AgentFiles,
    pub agent: Option<AgentProc>,
    /// Switch ports of eth0, eth1, cl0.
    pub ports: Vec<String>,
}

pub struct ClusterLab {
    pub sw: NetNs,
    pub etcd: Vec<EtcdMember>,
    pub nodes: Vec<ClusterNode>,
    pub clients: Vec<Client>,
    /// Keeps the pass programs on the switch ports (XDP_TX on a veth needs one there).
    _dp: Dataplane,
    _neigh: Option<NeighLimit>,
    pub defs: PathBuf,
    _dir: TempDir,
}

/// The kernel's ARP table is one for all namespaces (`gc_thresh3`, 1024 by default), and
/// each node resolves every peer address on each adapter of its subnet: about 75 entries a
/// node at 16 nodes, so a big lab would overflow it and its last nodes could reach nobody.
/// Raised for big labs and put back on drop.
struct NeighLimit(Vec<(String, String)>);

impl NeighLimit {
    fn raise(nodes: usize) -> Option<NeighLimit> {
        if nodes <= 8 {
            return None;
        }
        let mut old = vec![];
        for (key, want) in [("gc_thresh3", 16384u32), ("gc_thresh2", 8192), ("gc_thresh1", 1024)] {
            for family in ["ipv4", "ipv6"] {
                let path = format!("/proc/sys/net/{family}/neigh/default/{key}");
                let Ok(v) = std::fs::read_to_string(&path) else { continue };
                if v.trim().parse::<u32>().is_ok_and(|v| v < want) && std::fs::write(&path, want.to_string()).is_ok() {
                    old.push((path, v.trim().to_string()));
                }
            }
        }
        Some(NeighLimit(old))
    }
}

impl Drop for NeighLimit {
    fn drop(&mut self) {
        // thresh1 <= thresh2 <= thresh3 must hold at each step: put back in reverse.
        for (path, v) in self.0.iter().rev() {
            let _ = std::fs::write(path, v);
        }
    }
}

/// Timing the lab's nodes run with (the defaults).
pub struct Timing {
    pub heartbeat_ms: u64,
    pub suspect_ms: u64,
    pub fence_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { heartbeat_ms: 10, suspect_ms: 100, fence_ms: 80 }
    }
}

impl ClusterLab {
    /// `nodes` nodes and `clients` clients, etcd up and healthy; agents not started.
    pub fn new(nodes: usize, clients: usize) -> ClusterLab {
        assert!(nodes <= 40 && clients <= 30, "the lab's address plan");
        let neigh = NeighLimit::raise(nodes);
        let sw = NetNs::new("csw");
        for br in ["br0", "br1"] {
            sw.ip(&["link", "add", br, "type", "bridge"]);
            sw.ip(&["link", "set", br, "up"]);
        }
        let dir = TempDir::new("cluster");
        let initial: Vec<String> = (0..3).map(|m| format!("e{m}=http://{}:2380", etcd_ip(m))).collect();
        let mut etcd = vec![];
        for m in 0..3 {
            let ns = NetNs::new(&format!("e{m}"));
            let port = format!("e{m}");
            veth(&ns, "eth0", &format!("02:00:00:00:05:{m:02x}"), &sw, &port, &format!("02:00:00:00:06:{m:02x}"));
            sw.ip(&["link", "set", &port, "master", "br1"]);
            ns.ip(&["addr", "add", &format!("{}/24", etcd_ip(m)), "dev", "eth0"]);
            let data = dir.0.join(format!("e{m}"));
            let ip = etcd_ip(m);
            let args = vec![
                "--name".into(),
                format!("e{m}"),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                format!("http://{ip}:2379"),
                "--advertise-client-urls".into(),
                format!("http://{ip}:2379"),
                "--listen-peer-urls".into(),
                format!("http://{ip}:2380"),
                "--initial-advertise-peer-urls".into(),
                format!("http://{ip}:2380"),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-token".into(),
                "vip-lab".into(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
                "--log-level".into(),
                "warn".into(),
            ];
            let mut e = EtcdMember { ns, name: format!("e{m}"), child: None, dir: TempDir::new(&format!("etcd{m}")), args };
            e.start();
            etcd.push(e);
        }
        let mut dp = crate::load_dataplane();
        let mut ns_nodes = vec![];
        for k in 0..nodes {
            let ns = NetNs::new(&format!("n{k}"));
            let mut ports = vec![];
            for (j, dev) in ["eth0", "eth1", "cl0"].iter().enumerate() {
                let port = format!("n{k}p{j}");
                let mac = mac_str(&node_mac(k, if j == 2 { 9 } else { j }));
                veth(&ns, dev, &mac, &sw, &port, &format!("02:00:00:00:07:{:02x}", k * 4 + j));
                sw.ip(&["link", "set", &port, "master", if j == 2 { "br1" } else { "br0" }]);
                let addr = if j == 2 { format!("10.99.0.{}/24", 1 + k) } else { format!("{}/24", node_ip(k, j)) };
                ns.ip(&["addr", "add", &addr, "dev", dev]);
                ports.push(port);
            }
            sw.run(|| {
                for p in &ports {
                    dp.attach_pass(p, XdpMode::Driver).unwrap_or_else(|e| panic!("{e}"));
                }
            });
            let files = AgentFiles::new(&format!("cn{k}"));
            ns_nodes.push(ClusterNode { k, name: format!("n{k}"), ns, files, agent: None, ports });
        }
        let clients = (0..clients)
            .map(|i| {
                let ns = NetNs::new(&format!("cc{i}"));
                let mac = crate::topo::client_mac(i);
                let port = format!("cc{i}");
                veth(&ns, "eth0", &mac_str(&mac), &sw, &port, &format!("02:00:00:00:08:{i:02x}"));
                sw.ip(&["link", "set", &port, "master", "br0"]);
                let ip4 = Ipv4Addr::new(192, 0, 2, 150 + i as u8);
                ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
                let ip6 = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100 + i as u16);
                sw.run(|| dp.attach_pass(&port, XdpMode::Driver).unwrap_or_else(|e| panic!("{e}")));
                Client { ns, iface: "eth0".into(), mac, ip4, ip6 }
            })
            .collect();
        let defs = dir.0.join("defs.toml");
        let lab = ClusterLab { sw, etcd, nodes: ns_nodes, clients, _dp: dp, _neigh: neigh, defs, _dir: dir };
        lab.wait_etcd(Duration::from_secs(20));
        lab
    }

    pub fn endpoints(&self) -> String {
        (0..self.etcd.len()).map(|m| format!("\"http://{}:2379\"", etcd_ip(m))).collect::<Vec<_>>().join(", ")
    }

    /// Waits until etcd answers a linearizable read (from node 0's namespace).
    pub fn wait_etcd(&self, timeout: Duration) {
        let urls: Vec<String> = (0..self.etcd.len()).map(|m| format!("http://{}:2379", etcd_ip(m))).collect();
        let deadline = Instant::now() + timeout;
        let probe_ns = &self.etcd[0].ns;
        loop {
            let ok = probe_ns.run(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async {
                    let eps = vip_cluster::store::Endpoints { urls: urls.clone(), timeout: Duration::from_millis(500), ..Default::default() };
                    let Ok(mut c) = vip_cluster::store::connect(&eps).await else { return false };
                    tokio::time::timeout(Duration::from_millis(800), c.get("/vip-lab-health", None)).await.is_ok_and(|r| r.is_ok())
                })
            });
            if ok {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    self.etcd.iter().map(|e| std::fs::read_to_string(e.dir.0.join("etcd.log")).unwrap_or_default()).collect();
                panic!("etcd did not become healthy; logs:\n{}", logs.join("\n---\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `k`'s config: its three adapters, the [cluster] table, no VIPs of its own.
    pub fn write_config(&self, k: usize, t: &Timing, extra_cluster: &str) {
        let n = &self.nodes[k];
        let body = format!(
            "[probe]\nenabled = false\n\n[cluster]\nname = \"{CLUSTER}\"\nnode = \"{}\"\nendpoints = [{}]\nheartbeat_ms = {}\nsuspect_ms = {}\nfence_ms = {}\nport = {HB_PORT}\n{extra_cluster}\n\n\
             [[adapter]]\nname = \"eth0\"\n\n[[adapter]]\nname = \"eth1\"\n\n[[adapter]]\nname = \"cl0\"\nmove_mac = false\n",
            n.name,
            self.endpoints(),
            t.heartbeat_ms,
            t.suspect_ms,
            t.fence_ms
        );
        n.files.write("", &body);
    }

    /// Starts node `k`'s agent (config written first with [`ClusterLab::write_config`]).
    pub fn start(&mut self, k: usize) {
        let n = &mut self.nodes[k];
        n.agent = Some(AgentProc::start(&n.ns, &n.files, &[]));
    }

    /// One group of VIPs per node (`count` each), homed on that node's eth0 and eth1.
    pub fn defs_text(&self, count: u32, mode: &str) -> String {
        (0..self.nodes.len())
            .map(|k| {
                format!(
                    "[[vip]]\naddress = \"{}/24\"\ncount = {count}\nnode = \"n{k}\"\nadapters = [\"eth0\", \"eth1\"]\nmode = \"{mode}\"\n\n",
                    vip_of(k)
                )
            })
            .collect()
    }

    /// `vip-agent cluster apply` from node `k`.
    pub fn apply(&self, k: usize, text: &str) -> std::process::Output {
        std::fs::write(&self.defs, text).expect("defs");
        let n = &self.nodes[k];
        Command::new("ip")
            .args(["netns", "exec", &n.ns.name])
            .arg(crate::agentproc::agent_bin())
            .args(["cluster", "apply"])
            .arg(&self.defs)
            .arg("--config")
            .arg(&n.files.config)
            .output()
            .expect("vip-agent cluster apply")
    }

    /// The cluster status from node `k`'s agent.
    pub fn cluster_status(&self, k: usize) -> Option<vip_cluster::node::ClusterStatus> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.nodes[k].files.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"cluster\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        serde_json::from_str(&out).ok()
    }

    /// Polls node `k`'s cluster status until `f` holds.
    pub fn wait_cluster(&self, k: usize, what: &str, timeout: Duration, f: impl Fn(&vip_cluster::node::ClusterStatus) -> bool) -> vip_cluster::node::ClusterStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.cluster_status(k) {
                if f(&s) {
                    return s;
                }
                if Instant::now() > deadline {
                    let log = self.nodes[k].agent.as_ref().map(|a| a.log_text()).unwrap_or_default();
                    panic!("timed out waiting for {what}; node {k} says:\n{}\nlog:\n{log}", vip_agent::status::cluster_human(&s));
                }
            } else if Instant::now() > deadline {
                panic!("timed out waiting for {what}: node {k} gives no cluster status");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Owner of the group starting at `addr`, as node `k` sees it.
    pub fn owner(&self, k: usize, addr: Ipv4Addr) -> Option<String> {
        let s = self.cluster_status(k)?;
        s.groups.iter().find(|g| g.address == addr.to_string()).and_then(|g| g.owner.clone())
    }

    /// Waits until every running node answers for the groups it holds, per status.
    pub fn wait_settled(&self, timeout: Duration) {
        let running: Vec<usize> = self.nodes.iter().filter(|n| n.agent.is_some()).map(|n| n.k).collect();
        for &k in &running {
            self.wait_cluster(k, "every group held and answered", timeout, |s| {
                !s.groups.is_empty()
                    && s.groups.iter().all(|g| g.owner.is_some())
                    && s.groups.iter().filter(|g| g.owner.as_deref() == Some(&self.nodes[k].name)).all(|g| s.holding.contains(&g.address))
                    && s.deadline_ms > 0.0
            });
        }
    }

    /// Cuts node `k` off the cluster network and drops heartbeats on its other adapters
    /// (nftables in its namespace): it no longer reaches etcd or its peers, but clients
    /// still reach it.
    pub fn isolate(&self, k: usize) {
        let n = &self.nodes[k];
        self.sw.ip(&["link", "set", &n.ports[2], "down"]);
        let rules = format!(
            "table inet isolate {{ chain in {{ type filter hook input priority 0; udp dport {HB_PORT} drop; }}; \
             chain out {{ type filter hook output priority 0; udp dport {HB_PORT} drop; }}; }}"
        );
        n.ns.exec("nft", &[&rules]);
    }

    /// Undoes [`ClusterLab::isolate`].
    pub fn heal(&self, k: usize) {
        let n = &self.nodes[k];
        let _ = std::process::Command::new("ip").args(["netns", "exec", &n.ns.name, "nft", "delete", "table", "inet", "isolate"]).status();
        self.sw.ip(&["link", "set", &n.ports[2], "up"]);
    }

    /// Pulls every cable of node `k` (its switch ports down).
    pub fn unplug(&self, k: usize) {
        use std::io::Write;
        // One `ip -batch`: the node drops off every wire within a millisecond, not three
        // process starts apart.
        let batch: String = self.nodes[k].ports.iter().map(|p| format!("link set {p} down\n")).collect();
        let mut c = Command::new("ip").args(["-n", &self.sw.name, "-batch", "-"]).stdin(Stdio::piped()).spawn().expect("ip -batch");
        c.stdin.take().expect("stdin").write_all(batch.as_bytes()).expect("ip -batch input");
        assert!(c.wait().expect("ip -batch").success(), "unplugging node {k}");
    }

    pub fn agent(&self, k: usize) -> &AgentProc {
        self.nodes[k].agent.as_ref().expect("agent running")
    }

    /// The etcd member that leads now (by asking each).
    pub fn etcd_leader(&self) -> Option<usize> {
        for (m, e) in self.etcd.iter().enumerate() {
            if !e.running() {
                continue;
            }
            let url = format!("http://{}:2379", etcd_ip(m));
            let leads = e.ns.run(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async {
                    let eps = vip_cluster::store::Endpoints { urls: vec![url.clone()], timeout: Duration::from_millis(500), ..Default::default() };
                    let Ok(mut c) = vip_cluster::store::connect(&eps).await else { return false };
                    match tokio::time::timeout(Duration::from_millis(800), c.status()).await {
                        Ok(Ok(s)) => s.leader() == s.header().map_or(0, |h| h.member_id()),
                        _ => false,
                    }
                })
            });
            if leads {
                return Some(m);
            }
        }
        None
    }
}

/// Which node answered, by MAC (for [`crate::probe::overlaps`]).
pub fn owner_of(mac: Mac) -> Option<usize> {
    node_of(mac)
}

/// The address of node `k`'s adapter `j` as an `IpAddr`.
pub fn node_addr(k: usize, j: usize) -> IpAddr {
    IpAddr::V4(node_ip(k, j))
}
