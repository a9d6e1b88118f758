//! The data plane on real veths in network namespaces: a switch namespace with a Linux
//! bridge, a node namespace with 3 adapters, client namespaces sending real frames.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use vip_common::{ADAPTER_DOWN, ADAPTER_UP};
use vip_packet::{mac_str, parse_answer, Answer, Arp, Mac, Nd};
use vip_tests::{
    load_dataplane,
    rawsock::RawSocket,
    root_or_skip,
    topo::{Client, Lab, VIP4, VIP6},
};

const WINDOW: Duration = Duration::from_millis(300);

/// Sends one broadcast ARP request for VIP4 from the client; returns the MAC of every
/// reply for it (checking each reply's Ethernet source is its sender hardware address).
fn arp_answers(c: &Client) -> Vec<Mac> {
    c.ns.run(|| {
        let s = RawSocket::open(&c.iface).expect("raw socket");
        s.send(&Arp::request(c.mac, c.ip4, VIP4).to_bytes()).expect("send");
        s.collect(WINDOW, |f| match parse_answer(f) {
            Some(Answer::Arp(a)) if a.spa == VIP4 && a.tha == c.mac && a.tpa == c.ip4 => {
                assert_eq!(a.eth_src, a.sha, "reply's Ethernet source differs from its sha");
                assert_eq!(a.eth_dst, c.mac, "reply not sent to the requester");
                Some(a.sha)
            }
            _ => None,
        })
    })
}

/// Sends one Neighbor Solicitation for VIP6; returns the target link-layer address of
/// every solicited advertisement for it.
fn ns_answers(c: &Client) -> Vec<Mac> {
    c.ns.run(|| {
        let s = RawSocket::open(&c.iface).expect("raw socket");
        s.send(&Nd::solicit(c.mac, c.ip6, VIP6).to_bytes()).expect("send");
        s.collect(WINDOW, |f| match parse_answer(f) {
            Some(Answer::Na(n)) if n.target == VIP6 && n.dst == c.ip6 => {
                assert_eq!(n.flags & 0x60, 0x60, "solicited and override flags");
                let tlla = n.options.iter().find(|(t, _)| *t == 2).expect("target link-layer option");
                let mac: Mac = tlla.1[..6].try_into().unwrap();
                assert_eq!(n.eth_src, mac, "NA's Ethernet source differs from its TLLA");
                Some(mac)
            }
            _ => None,
        })
    })
}

fn set(v: Vec<Mac>) -> BTreeSet<String> {
    v.iter().map(mac_str).collect()
}

fn macs(lab: &Lab, which: &[usize]) -> BTreeSet<String> {
    which.iter().map(|&i| mac_str(&lab.adapters[i].mac)).collect()
}

fn bridged_broadcast(mode: XdpMode) {
    let lab = Lab::bridged(3, 1);
    let mut dp = load_dataplane();
    lab.start_dataplane(&mut dp, mode);
    let c = &lab.clients[0];
    let arp = arp_answers(c);
    assert_eq!(arp.len(), 3, "one ARP reply per adapter, got {arp:?}");
    assert_eq!(set(arp), macs(&lab, &[0, 1, 2]));
    let na = ns_answers(c);
    assert_eq!(na.len(), 3, "one NA per adapter, got {na:?}");
    assert_eq!(set(na), macs(&lab, &[0, 1, 2]));
}

#[test]
fn bridged_broadcast_gets_one_answer_per_adapter_native() {
    if root_or_skip("bridged_broadcast_gets_one_answer_per_adapter_native") {
        bridged_broadcast(XdpMode::Driver);
    }
}

#[test]
fn bridged_broadcast_gets_one_answer_per_adapter_skb() {
    if root_or_skip("bridged_broadcast_gets_one_answer_per_adapter_skb") {
        bridged_broadcast(XdpMode::Skb);
    }
}

#[test]
fn point_to_point_clients_each_get_their_adapter() {
    if !root_or_skip("point_to_point_clients_each_get_their_adapter") {
        return;
    }
    let lab = Lab::point_to_point(3);
    let mut dp = load_dataplane();
    lab.start_dataplane(&mut dp, XdpMode::Driver);
    for (i, c) in lab.clients.iter().enumerate() {
        assert_eq!(set(arp_answers(c)), macs(&lab, &[i]), "ARP, client {i}");
        assert_eq!(set(ns_answers(c)), macs(&lab, &[i]), "NS, client {i}");
    }
}

#[test]
fn adapter_marked_down_stops_answering_and_others_go_on() {
    if !root_or_skip("adapter_marked_down_stops_answering_and_others_go_on") {
        return;
    }
    let lab = Lab::bridged(3, 1);
    let mut dp = load_dataplane();
    lab.start_dataplane(&mut dp, XdpMode::Driver);
    let c = &lab.clients[0];
    lab.set_adapter_state(&mut dp, &lab.adapters[1], ADAPTER_DOWN);
    assert_eq!(set(arp_answers(c)), macs(&lab, &[0, 2]), "ARP with adapter 1 down");
    assert_eq!(set(ns_answers(c)), macs(&lab, &[0, 2]), "NS with adapter 1 down");
    lab.set_adapter_state(&mut dp, &lab.adapters[0], ADAPTER_DOWN);
    lab.set_adapter_state(&mut dp, &lab.adapters[2], ADAPTER_DOWN);
    assert!(arp_answers(c).is_empty(), "all adapters down: no ARP answer");
    assert!(ns_answers(c).is_empty(), "all adapters down: no NA");
    lab.set_adapter_state(&mut dp, &lab.adapters[1], ADAPTER_UP);
    assert_eq!(set(arp_answers(c)), macs(&lab, &[1]), "ARP with only adapter 1 up again");
    assert_eq!(set(ns_answers(c)), macs(&lab, &[1]), "NS with only adapter 1 up again");
}

/// The client's own kernel (not a raw socket) resolves the VIPs through the data plane's
/// answers: the reply is one Linux accepts into its neighbor table.
#[test]
fn client_kernel_resolves_vip_to_an_adapter_mac() {
    if !root_or_skip("client_kernel_resolves_vip_to_an_adapter_mac") {
        return;
    }
    let lab = Lab::bridged(3, 1);
    let mut dp = load_dataplane();
    lab.start_dataplane(&mut dp, XdpMode::Driver);
    let c = &lab.clients[0];
    let adapters = macs(&lab, &[0, 1, 2]);
    for vip in [VIP4.to_string(), VIP6.to_string()] {
        let target = format!("[{vip}]:9");
        let target = if vip.contains(':') { target } else { format!("{vip}:9") };
        c.ns.run(|| {
            let bind = if vip.contains(':') { "[::]:0" } else { "0.0.0.0:0" };
            let s = std::net::UdpSocket::bind(bind).expect("udp");
            s.send_to(b"resolve", target.as_str()).expect("send");
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let out = c.ns.ip(&["neigh", "show", &vip, "dev", &c.iface]);
            let lladdr = out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(str::to_string);
            if let Some(mac) = lladdr.filter(|_| out.contains("REACHABLE")) {
                assert!(adapters.contains(&mac), "{vip} resolved to {mac}, not an adapter");
                break;
            }
            assert!(Instant::now() < deadline, "{vip} never became REACHABLE: {out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
