//! The baseline vip is measured against: two nodes failing a VIP over with keepalived's
//! VRRPv3, behind a Linux bridge, with clients on the same bridge.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use vip_packet::{mac_str, Mac};

use crate::{
    netns::{veth, NetNs},
    probe::EchoServer,
    topo::{client_mac, Client, VIP4, VIP6},
};

/// The smallest `advert_int` keepalived 2.2.7 takes for VRRPv3: its parser reads the value
/// as centiseconds in [0.01, 255] (`keepalived -t` says "number '0.005' outside range
/// [0.010000, 255.000000]") and, worse, silently keeps the 1 s default for anything out of
/// range. At 0.01 the adverts on the wire are really 10 ms apart (`vip-ka-try` checks).
pub const KEEPALIVED_MIN_ADVERT_INT: f64 = 0.01;

pub const VRID: u8 = 51;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn node_mac(i: usize) -> Mac {
    [0x02, 0, 0, 0, 0x05, i as u8]
}

/// A keepalived node: its namespace with one adapter `eth0` plugged into switch port `k<i>`.
pub struct KaNode {
    pub ns: NetNs,
    pub mac: Mac,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Its switch port.
    pub port: String,
    log: PathBuf,
}

/// Node 0 is MASTER at priority 200, node 1 BACKUP at 100; both hold VIP 192.0.2.10/24
/// (and 2001:db8::10/64 as an excluded address) on `eth0` while master.
pub struct VrrpLab {
    pub advert_int: f64,
    pub nodes: Vec<KaNode>,
    pub clients: Vec<Client>,
    pub switch: NetNs,
    keepalived: Vec<Child>,
    dir: PathBuf,
}

impl VrrpLab {
    /// Builds the lab, starts keepalived on both nodes and waits for node 0 to be master.
    pub fn new(advert_int: f64, clients: usize) -> VrrpLab {
        assert!(advert_int >= KEEPALIVED_MIN_ADVERT_INT, "keepalived would silently use 1 s instead of {advert_int}");
        let dir = std::env::temp_dir().join(format!("vip-ka-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let switch = NetNs::new("kasw");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let nodes: Vec<KaNode> = (0..2)
            .map(|i| {
                let ns = NetNs::new(&format!("ka{i}"));
                let port = format!("k{i}");
                veth(&ns, "eth0", &mac_str(&node_mac(i)), &switch, &port, &format!("02:00:00:00:06:{i:02x}"));
                switch.ip(&["link", "set", &port, "master", "br0"]);
                let (ip4, ip6) = (Ipv4Addr::new(192, 0, 2, 1 + i as u8), Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1 + i as u16));
                ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
                ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
                KaNode { ns, mac: node_mac(i), ip4, ip6, port, log: dir.join(format!("ka{i}.log")) }
            })
            .collect();
        let clients = (0..clients)
            .map(|i| {
                let ns = NetNs::new(&format!("c{i}"));
                let (mac, port) = (client_mac(i), format!("c{i}"));
                veth(&ns, "eth0", &mac_str(&mac), &switch, &port, &format!("02:00:00:00:03:{i:02x}"));
                switch.ip(&["link", "set", &port, "master", "br0"]);
                let (ip4, ip6) = (Ipv4Addr::new(192, 0, 2, 100 + i as u8), Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100 + i as u16));
                ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
                ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
                Client { ns, iface: "eth0".into(), mac, ip4, ip6 }
            })
            .collect();
        let mut lab = VrrpLab { advert_int, nodes, clients, switch, keepalived: vec![], dir };
        for i in 0..2 {
            let child = lab.spawn_keepalived(i);
            lab.keepalived.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(10) + Duration::from_secs_f64(5.0 * advert_int);
        while !lab.has_vip(0) {
            let exited = lab.keepalived.iter_mut().any(|k| !matches!(k.try_wait(), Ok(None)));
            if exited || Instant::now() >= deadline {
                let why = if exited { "exited" } else { "did not make ka0 master" };
                panic!("keepalived {why}:\n{}\n{}", lab.log(0), lab.log(1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        lab
    }

    fn spawn_keepalived(&self, i: usize) -> Child {
        let n = &self.nodes[i];
        let conf = self.dir.join(format!("ka{i}.conf"));
        fs::write(&conf, config(i, self.advert_int)).expect("writing keepalived.conf");
        let pid = |what: &str| self.dir.join(format!("ka{i}-{what}.pid")).to_string_lossy().into_owned();
        let log = fs::File::create(&n.log).expect("keepalived log");
        let conf = conf.to_string_lossy();
        // --dont-fork keeps the parent our child, so drop can signal it; private pid files
        // keep the two instances (and any system keepalived) from seeing each other as
        // "already running"; logs go to the console (our file) and not to syslog.
        #[rustfmt::skip]
        let args = [
            "netns", "exec", &n.ns.name, "keepalived", "--dont-fork", "--log-console", "--no-syslog",
            "--log-detail", "--vrrp", "--use-file", &conf, "--pid", &pid("main"), "--vrrp_pid", &pid("vrrp"),
            "--checkers_pid", &pid("checkers"), "--bfd_pid", &pid("bfd"),
        ];
        Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting keepalived: {e}"))
    }

    /// What keepalived on node `i` has logged so far.
    pub fn log(&self, i: usize) -> String {
        format!("--- ka{i} ---\n{}", fs::read_to_string(&self.nodes[i].log).unwrap_or_default())
    }

    /// Node `i` holds the VIP on its `eth0`.
    pub fn has_vip(&self, i: usize) -> bool {
        self.nodes[i].ns.ip(&["-4", "addr", "show", "dev", "eth0"]).contains(&format!(" {VIP4}/"))
    }

    /// Waits until node `i` holds the VIP, i.e. keepalived made it master.
    pub fn wait_master(&self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.has_vip(i) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// "Pulls node `i`'s cable": its switch port goes down, so its `eth0` loses carrier.
    pub fn pull(&self, i: usize) {
        self.switch.ip(&["link", "set", &self.nodes[i].port, "down"]);
    }

    /// Plugs node `i`'s cable back in.
    pub fn restore(&self, i: usize) {
        self.switch.ip(&["link", "set", &self.nodes[i].port, "up"]);
    }

    /// A UDP echo server on `port` in each node.
    pub fn echo_servers(&self, port: u16) -> std::io::Result<Vec<EchoServer>> {
        self.nodes.iter().map(|n| EchoServer::start(&n.ns, port)).collect()
    }

    pub fn client(&self, i: usize) -> &Client {
        &self.clients[i]
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for VrrpLab {
    fn drop(&mut self) {
        for k in &self.keepalived {
            unsafe { libc::kill(k.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for k in &mut self.keepalived {
            while matches!(k.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(k.try_wait(), Ok(None)) {
                let _ = k.kill();
                let _ = k.wait();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        // The namespaces go when the fields drop.
    }
}

/// keepalived.conf for node `i`.
///
/// Announcements are keepalived's defaults, written out: on becoming master, a burst of 5
/// gratuitous ARPs (and unsolicited NAs) back to back, and a second burst 5 s later
/// (`garp_master_delay 5`), no periodic refresh. The first burst is what moves the clients
/// and is what the benchmark times; the delayed one is kept because it is what a stock
/// keepalived does (it only repairs caches that missed the first burst). The messages of a
/// burst are not spaced (`vrrp_garp_interval`/`vrrp_gna_interval` default to none;
/// keepalived rejects an explicit 0).
fn config(i: usize, advert_int: f64) -> String {
    let (state, prio) = if i == 0 { ("MASTER", 200) } else { ("BACKUP", 100) };
    format!(
        r"global_defs {{
    router_id ka{i}
    vrrp_version 3
    vrrp_garp_master_delay 5
    vrrp_garp_master_repeat 5
    vrrp_garp_master_refresh 0
}}

vrrp_instance VIP {{
    state {state}
    interface eth0
    virtual_router_id {VRID}
    priority {prio}
    advert_int {advert_int:.2}
    virtual_ipaddress {{
        {VIP4}/24 dev eth0
    }}
    virtual_ipaddress_excluded {{
        {VIP6}/64 dev eth0
    }}
}}
"
    )
}
