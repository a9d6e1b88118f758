//! Lab topologies: a node namespace with several adapters, reached by client namespaces
//! either through a switch namespace (a Linux bridge) or over one point-to-point link each.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use vip_agent::dataplane::Dataplane;
use vip_common::{AdapterInfo, VipInfo, VipKey, ADAPTER_UP};
use vip_packet::{mac_str, parse_mac, Mac};

use crate::netns::{veth, NetNs};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

pub struct Adapter {
    /// Name in the node namespace.
    pub name: String,
    pub mac: Mac,
    pub ifindex: u32,
    /// The other end of its veth, in the switch namespace or a client's.
    pub peer: String,
    /// Adapter `i` is in slot `i`.
    pub slot: u8,
}

pub struct Client {
    pub ns: NetNs,
    /// Its one interface, `eth0`.
    pub iface: String,
    pub mac: Mac,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

pub struct Lab {
    pub node: NetNs,
    /// Present in the bridged topology.
    pub switch: Option<NetNs>,
    pub adapters: Vec<Adapter>,
    pub clients: Vec<Client>,
}

pub fn adapter_mac(i: usize) -> Mac {
    [0x02, 0, 0, 0, 0x01, i as u8]
}

pub fn client_mac(i: usize) -> Mac {
    [0x02, 0, 0, 0, 0x02, i as u8]
}

/// Adapter `i`'s own addresses in the bridged lab (the VIPs' subnets).
pub fn node_addrs(i: usize) -> (Ipv4Addr, Ipv6Addr) {
    (Ipv4Addr::new(192, 0, 2, 1 + i as u8), Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1 + i as u16))
}

fn client_addrs(i: usize) -> (Ipv4Addr, Ipv6Addr) {
    (Ipv4Addr::new(192, 0, 2, 100 + i as u8), Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100 + i as u16))
}

/// Client `i` in its own namespace, its `eth0` wired to `peer` (with `peer_mac`) in `peer_ns`.
fn add_client(i: usize, peer_ns: &NetNs, peer: &str, peer_mac: &str) -> Client {
    let ns = NetNs::new(&format!("c{i}"));
    let mac = client_mac(i);
    veth(&ns, "eth0", &vip_packet::mac_str(&mac), peer_ns, peer, peer_mac);
    let (ip4, ip6) = client_addrs(i);
    ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
    ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
    Client { ns, iface: "eth0".into(), mac, ip4, ip6 }
}

impl Lab {
    /// Switch namespace with bridge `br0`; node adapters `vip0..` plugged into ports
    /// `n0..`; each client's `eth0` plugged into port `c<i>`.
    pub fn bridged(adapters: usize, clients: usize) -> Lab {
        let node = NetNs::new("node");
        let switch = NetNs::new("sw");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let adapters = (0..adapters)
            .map(|i| {
                let (name, peer) = (format!("vip{i}"), format!("n{i}"));
                veth(&node, &name, &vip_packet::mac_str(&adapter_mac(i)), &switch, &peer, &format!("02:00:00:00:04:{i:02x}"));
                switch.ip(&["link", "set", &peer, "master", "br0"]);
                let (ip4, ip6) = node_addrs(i);
                node.ip(&["addr", "add", &format!("{ip4}/24"), "dev", &name]);
                node.ip(&["addr", "add", &format!("{ip6}/64"), "dev", &name, "nodad"]);
                Adapter { ifindex: node.ifindex(&name), name, mac: adapter_mac(i), peer, slot: i as u8 }
            })
            .collect();
        let clients = (0..clients)
            .map(|i| {
                let port = format!("c{i}");
                let c = add_client(i, &switch, &port, &format!("02:00:00:00:03:{i:02x}"));
                switch.ip(&["link", "set", &port, "master", "br0"]);
                c
            })
            .collect();
        Lab { node, switch: Some(switch), adapters, clients }
    }

    /// Client `i` wired straight to adapter `i`.
    pub fn point_to_point(n: usize) -> Lab {
        let node = NetNs::new("node");
        let mut adapters = vec![];
        let mut clients = vec![];
        for i in 0..n {
            let name = format!("vip{i}");
            let c = add_client(i, &node, &name, &vip_packet::mac_str(&adapter_mac(i)));
            adapters.push(Adapter { ifindex: node.ifindex(&name), name, mac: adapter_mac(i), peer: "eth0".into(), slot: i as u8 });
            clients.push(c);
        }
        Lab { node, switch: None, adapters, clients }
    }

    /// Pulls adapter `i`'s cable: its switch port goes down, so the adapter loses carrier.
    pub fn pull(&self, i: usize) {
        self.switch.as_ref().expect("bridged lab").ip(&["link", "set", &self.adapters[i].peer, "down"]);
    }

    /// Plugs adapter `i`'s cable back in.
    pub fn plug(&self, i: usize) {
        self.switch.as_ref().expect("bridged lab").ip(&["link", "set", &self.adapters[i].peer, "up"]);
    }

    /// The agent config tables for this lab's adapters.
    pub fn adapter_tables(&self) -> String {
        self.adapter_tables_with("")
    }

    /// The same, with `extra` keys in each table.
    pub fn adapter_tables_with(&self, extra: &str) -> String {
        self.adapters.iter().map(|a| format!("[[adapter]]\nname = \"{}\"\n{extra}", a.name)).collect()
    }

    /// Attaches the responder to every adapter in `mode` and readies the peers and maps
    /// ([`Lab::attach_peers`], [`Lab::fill_maps`]).
    pub fn start_dataplane(&self, dp: &mut Dataplane, mode: XdpMode) {
        self.node.run(|| {
            for a in &self.adapters {
                dp.attach(&a.name, mode).unwrap_or_else(|e| panic!("{e}"));
            }
        });
        self.attach_peers(dp);
        self.fill_maps(dp);
    }

    /// Attaches the pass program to every adapter's peer: XDP_TX on a veth is only
    /// delivered to a peer that has an XDP program.
    pub fn attach_peers(&self, dp: &mut Dataplane) {
        match &self.switch {
            Some(sw) => sw.run(|| {
                for a in &self.adapters {
                    dp.attach_pass(&a.peer, XdpMode::Driver).unwrap_or_else(|e| panic!("{e}"));
                }
            }),
            None => {
                for c in &self.clients {
                    c.ns.run(|| dp.attach_pass(&c.iface, XdpMode::Driver).unwrap_or_else(|e| panic!("{e}")));
                }
            }
        }
    }

    /// Puts the adapters (up) and both VIPs (allowed on every adapter) in the maps.
    pub fn fill_maps(&self, dp: &mut Dataplane) {
        for a in &self.adapters {
            self.set_adapter_state(dp, a, ADAPTER_UP);
        }
        let all = self.adapters.iter().fold(0u64, |m, a| m | 1 << a.slot);
        dp.set_policy(0, all).expect("policy");
        dp.set_vip(VipKey::v4(VIP4.octets(), 0), VipInfo { policy: 0, id: 0, flags: 0, _pad: 0 }).expect("vip4");
        dp.set_vip(VipKey::v6(VIP6.octets(), 0), VipInfo { policy: 0, id: 1, flags: 0, _pad: 0 }).expect("vip6");
    }

    pub fn set_adapter_state(&self, dp: &mut Dataplane, a: &Adapter, state: u8) {
        dp.set_adapter(a.ifindex, AdapterInfo { mac: a.mac, slot: a.slot, state, heir: 0, flags: 0 }).expect("adapter");
    }
}

/// The client's neighbor entry for `ip`, if it has a link-layer address.
pub fn neigh_mac(c: &Client, ip: IpAddr) -> Option<Mac> {
    let out = c.ns.ip(&["neigh", "show", &ip.to_string(), "dev", &c.iface]);
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "lladdr" {
            return words.next().and_then(parse_mac);
        }
    }
    None
}

/// Makes the client's kernel resolve `ip` (a datagram to the discard port).
pub fn poke(c: &Client, ip: IpAddr) {
    c.ns.run(|| {
        let any: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let s = UdpSocket::bind(any).unwrap();
        let _ = s.send_to(b"x", (ip, 9));
    });
}

pub fn wait_neigh(c: &Client, ip: IpAddr, what: &str, timeout: Duration, ok: impl Fn(Mac) -> bool) -> Mac {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(m) = neigh_mac(c, ip) {
            if ok(m) {
                return m;
            }
        }
        if Instant::now() > deadline {
            panic!("{what}: client neighbor entry for {ip} is {:?}", neigh_mac(c, ip).map(|m| mac_str(&m)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sets a switch port down or up from inside the switch namespace over netlink (no `ip`
/// process in a measurement).
pub struct Port {
    rtnl: vip_agent::netlink::Rtnl,
    ifindex: u32,
}

impl Port {
    pub fn new(sw: &NetNs, name: &str) -> Port {
        let ifindex = sw.ifindex(name);
        Port { rtnl: sw.run(|| vip_agent::netlink::Rtnl::open().expect("netlink")), ifindex }
    }

    pub fn set(&mut self, up: bool) {
        self.rtnl.set_link_up(self.ifindex, up).expect("set link");
    }
}
