//! The packet table, katran style: each row a description, an input frame, the adapter it
//! arrives on, and the expected action, decision and output bytes. The table tests, the
//! fuzz test's seeds and `cargo xtask bench dataplane` all use it.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::TestRun;
use aya::programs::TestRunOptions;
use vip_agent::dataplane::Dataplane;
use vip_common::{decision as d, AdapterInfo, VipInfo, VipKey, ADAPTER_DOWN, ADAPTER_UP};
use vip_packet::{
    expected_answer, ipv6_frame, parse_question, solicited_node, Arp, Mac, Nd, ALL_NODES, BROADCAST, ND_OPT_SOURCE_LL,
};

use crate::netns::{veth, NetNs};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// Which test adapter a frame arrives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Known, up, allowed for every VIP.
    Up,
    /// Known, allowed, marked down.
    Down,
    /// Known and up, but no VIP allows it.
    NotAllowed,
    /// Not in the adapter map.
    Unknown,
}

pub const ARRIVALS: [Arrival; 4] = [Arrival::Up, Arrival::Down, Arrival::NotAllowed, Arrival::Unknown];

pub const UP_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x00];
pub const DOWN_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
pub const NOT_ALLOWED_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x02];
pub const UNKNOWN_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x03];
pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0x02, 0x00];
pub const OTHER_MAC: Mac = [0x02, 0, 0, 0, 0x09, 0x09];

pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Hosted on VLAN 100 only.
pub const VIP4_VLAN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
pub const NOT_VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const VIP6_VLAN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);
pub const NOT_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);
pub const VLAN: u16 = 100;

/// The hosted VIPs: (key, allowed on Up and Down adapters).
pub fn hosted() -> Vec<VipKey> {
    vec![
        VipKey::v4(VIP4.octets(), 0),
        VipKey::v4(VIP4_VLAN.octets(), VLAN),
        VipKey::v6(VIP6.octets(), 0),
        VipKey::v6(VIP6_VLAN.octets(), VLAN),
    ]
}

pub fn arrival_mac(a: Arrival) -> Mac {
    match a {
        Arrival::Up => UP_MAC,
        Arrival::Down => DOWN_MAC,
        Arrival::NotAllowed => NOT_ALLOWED_MAC,
        Arrival::Unknown => UNKNOWN_MAC,
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub desc: &'static str,
    pub frame: Vec<u8>,
    pub on: Arrival,
    pub action: u32,
    pub decision: u32,
    /// Exact output for XDP_TX rows; for XDP_PASS the output must equal the input.
    pub output: Option<Vec<u8>>,
}

fn pass(desc: &'static str, frame: Vec<u8>, on: Arrival, decision: u32) -> Row {
    Row { desc, frame, on, action: XDP_PASS, decision, output: None }
}

/// An answered row: the expected bytes come from `vip_packet::expected_answer`, which builds
/// the answer independently of the XDP program.
fn tx(desc: &'static str, frame: Vec<u8>, decision: u32) -> Row {
    let q = parse_question(&frame).unwrap_or_else(|| panic!("{desc}: fixture is not a valid question"));
    let output = Some(expected_answer(&q, &frame, UP_MAC));
    Row { desc, frame, on: Arrival::Up, action: XDP_TX, decision, output }
}

fn arp_req(tpa: Ipv4Addr) -> Arp {
    Arp::request(CLIENT_MAC, CLIENT4, tpa)
}

fn ns(target: Ipv6Addr) -> Nd {
    Nd::solicit(CLIENT_MAC, CLIENT6, target)
}

/// An NS whose raw ICMPv6 bytes are patched after the checksum was computed, then fixed up
/// again so only the patched field is wrong.
fn ns_patched(target: Ipv6Addr, patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let n = ns(target);
    let mut icmp = n.icmp_bytes();
    patch(&mut icmp);
    icmp[2] = 0;
    icmp[3] = 0;
    let c = vip_packet::icmpv6_checksum(&n.src, &n.dst, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6_frame(n.eth_dst, n.eth_src, None, &n.src, &n.dst, 255, &icmp)
}

/// Hand-written golden frames: the reply to `arp_req(VIP4)` and the NA answering `ns(VIP6)`
/// from UP_MAC, byte for byte (the NA checksum computed separately, by hand-rolled Python).
pub const GOLDEN_ARP_REPLY: &str = "020000000200020000000100080600010800060400020200000001 00c000020a020000000200c0000264";
pub const GOLDEN_NA: &str = "02000000020002000000010086dd6000000000203aff20010db8000000000000000000000010fe8000000000000000000000000000018800b88f6000000020010db80000000000000000000000100201020000000100";

pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

pub fn table() -> Vec<Row> {
    use Arrival::*;
    let mut rows = vec![];
    let req = arp_req(VIP4);

    // --- ARP answered ---
    rows.push(tx("arp request for a VIP", req.to_bytes(), d::ANSWERED_ARP));
    let mut padded = req.to_bytes();
    padded.resize(60, 0xee);
    rows.push(tx("arp request padded to 60 bytes keeps its padding", padded, d::ANSWERED_ARP));
    rows.push(tx("arp probe (sender 0.0.0.0) is answered", Arp { spa: Ipv4Addr::UNSPECIFIED, ..req.clone() }.to_bytes(), d::ANSWERED_ARP_PROBE));
    rows.push(tx("unicast arp request to the adapter's MAC", Arp { eth_dst: UP_MAC, ..req.clone() }.to_bytes(), d::ANSWERED_ARP));
    rows.push(tx("tagged arp request for a VLAN VIP keeps its tag", arp_req(VIP4_VLAN).with_tci(VLAN).to_bytes(), d::ANSWERED_ARP));
    rows.push(tx("tagged arp request keeps priority and DEI bits", arp_req(VIP4_VLAN).with_tci(0xb000 | VLAN).to_bytes(), d::ANSWERED_ARP));
    rows.push(tx("request with eth source differing from sha", Arp { eth_src: OTHER_MAC, ..req.clone() }.to_bytes(), d::ANSWERED_ARP));

    // --- ARP passed ---
    rows.push(pass("arp reply", Arp { op: 2, ..req.clone() }.to_bytes(), Up, d::PASSED_ARP_NOT_REQUEST));
    rows.push(pass("rarp request (op 3)", Arp { op: 3, ..req.clone() }.to_bytes(), Up, d::PASSED_ARP_NOT_REQUEST));
    rows.push(pass("gratuitous arp request", Arp::announcement(CLIENT_MAC, VIP4).to_bytes(), Up, d::PASSED_ARP_GRATUITOUS));
    rows.push(pass("gratuitous arp reply", Arp { op: 2, ..Arp::announcement(CLIENT_MAC, VIP4) }.to_bytes(), Up, d::PASSED_ARP_NOT_REQUEST));
    rows.push(pass("arp request for an address not hosted", arp_req(NOT_VIP4).to_bytes(), Up, d::PASSED_NOT_VIP));
    rows.push(pass("arp request on a down adapter", req.to_bytes(), Down, d::PASSED_ADAPTER_DOWN));
    rows.push(pass("arp request on an adapter not allowed for the VIP", req.to_bytes(), NotAllowed, d::PASSED_ADAPTER_NOT_ALLOWED));
    rows.push(pass("arp request on an unknown adapter", req.to_bytes(), Unknown, d::PASSED_ADAPTER_UNKNOWN));
    rows.push(pass("unicast arp request to another host's MAC", Arp { eth_dst: OTHER_MAC, ..req.clone() }.to_bytes(), Up, d::PASSED_NOT_FOR_US));
    rows.push(pass("arp from broadcast eth source", Arp { eth_src: BROADCAST, ..req.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    rows.push(pass("arp from multicast eth source", Arp { eth_src: [0x01, 0, 0x5e, 0, 0, 1], ..req.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    rows.push(pass("arp from all-zero eth source", Arp { eth_src: [0; 6], ..req.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    rows.push(pass("arp with broadcast sha", Arp { sha: BROADCAST, ..req.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    rows.push(pass("arp with multicast sha", Arp { sha: [0x33, 0x33, 0, 0, 0, 1], ..req.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    rows.push(pass("arp with all-zero sha", Arp { sha: [0; 6], ..req.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    for (desc, off, val) in [
        ("arp with htype 6", 15usize, 6u8),
        ("arp with ptype IPv6", 16, 0x86),
        ("arp with hlen 8", 18, 8),
        ("arp with plen 16", 19, 16),
    ] {
        let mut f = req.to_bytes();
        f[off] = val;
        rows.push(pass(desc, f, Up, d::PASSED_ARP_NOT_ETHER_IPV4));
    }
    rows.push(pass("tagged request for an untagged VIP", arp_req(VIP4).with_tci(VLAN).to_bytes(), Up, d::PASSED_NOT_VIP));
    rows.push(pass("untagged request for a VLAN VIP", arp_req(VIP4_VLAN).to_bytes(), Up, d::PASSED_NOT_VIP));
    rows.push(pass("request on the wrong VLAN", arp_req(VIP4_VLAN).with_tci(200).to_bytes(), Up, d::PASSED_NOT_VIP));
    rows.push(pass("priority-tagged (VID 0) request", arp_req(VIP4).with_tci(0x6000).to_bytes(), Up, d::PASSED_VLAN_RESERVED));
    rows.push(pass("VID 4095 request", arp_req(VIP4).with_tci(0x0fff).to_bytes(), Up, d::PASSED_VLAN_RESERVED));
    let mut qinq = arp_req(VIP4_VLAN).with_tci(VLAN).to_bytes();
    qinq.splice(16..16, [0x81, 0x00, 0x00, 0x64]);
    rows.push(pass("double-tagged (QinQ) request", qinq, Up, d::PASSED_NOT_NEIGHBOR));
    let mut sd = arp_req(VIP4_VLAN).with_tci(VLAN).to_bytes();
    sd[12..14].copy_from_slice(&[0x88, 0xa8]);
    rows.push(pass("802.1ad service tag", sd, Up, d::PASSED_NOT_NEIGHBOR));
    rows.push(pass("IPv4 UDP to a VIP: the client is learned", ipv4_udp(), Up, d::PASSED_VIP_TRAFFIC));
    rows.push(pass("IPv4 UDP to a VIP on a down adapter", ipv4_to(DOWN_MAC, VIP4), Down, d::PASSED_ADAPTER_DOWN));
    rows.push(pass("IPv4 UDP to a VIP on an unknown adapter", ipv4_to(UNKNOWN_MAC, VIP4), Unknown, d::PASSED_ADAPTER_UNKNOWN));
    rows.push(pass("IPv4 UDP to a VIP for another host's MAC", ipv4_to(OTHER_MAC, VIP4), Up, d::PASSED_NOT_FOR_US));
    rows.push(pass("IPv4 UDP to a VIP, broadcast", ipv4_to(BROADCAST, VIP4), Up, d::PASSED_NOT_FOR_US));
    rows.push(pass("ordinary IPv4 UDP (not to a VIP)", ipv4_to(UP_MAC, NOT_VIP4), Up, d::PASSED_NOT_NEIGHBOR));
    rows.push(pass("IPv4 UDP to a VIP hosted on VLAN 100 only, untagged", ipv4_to(UP_MAC, VIP4_VLAN), Up, d::PASSED_NOT_NEIGHBOR));
    rows.push(pass("IPv4 header truncated", ipv4_udp()[..30].to_vec(), Up, d::PASSED_TRUNCATED));
    rows.push(pass("tagged IPv4 UDP", {
        let mut f = ipv4_udp();
        f.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
        f
    }, Up, d::PASSED_NOT_NEIGHBOR));

    // --- NDP answered ---
    let sol = ns(VIP6);
    rows.push(tx("neighbor solicitation for a VIP", sol.to_bytes(), d::ANSWERED_NS));
    rows.push(tx("unicast NS (reachability check) to the VIP", Nd { eth_dst: UP_MAC, dst: VIP6, ..sol.clone() }.to_bytes(), d::ANSWERED_NS));
    rows.push(tx("DAD solicitation (source ::) is answered to all-nodes", Nd::dad(CLIENT_MAC, VIP6).to_bytes(), d::ANSWERED_DAD));
    rows.push(tx("NS with a nonce option as well", Nd { options: vec![(14, vec![1, 2, 3, 4, 5, 6]), (ND_OPT_SOURCE_LL, CLIENT_MAC.to_vec())], ..sol.clone() }.to_bytes(), d::ANSWERED_NS));
    rows.push(tx("NS with 128 bytes of options", Nd { options: vec![(ND_OPT_SOURCE_LL, CLIENT_MAC.to_vec()), (200, vec![7; 118])], ..sol.clone() }.to_bytes(), d::ANSWERED_NS));
    rows.push(tx("NS answered to its source link-layer address, not the Ethernet source", Nd { eth_src: OTHER_MAC, ..sol.clone() }.to_bytes(), d::ANSWERED_NS));
    rows.push(tx("NS without options answered to the Ethernet source", Nd { options: vec![], ..sol.clone() }.to_bytes(), d::ANSWERED_NS));
    rows.push(tx("tagged NS for a VLAN VIP keeps its tag", ns(VIP6_VLAN).with_tci(VLAN).to_bytes(), d::ANSWERED_NS));
    let mut ns_padded = sol.to_bytes();
    ns_padded.extend_from_slice(&[0xee; 6]);
    rows.push(tx("NS with trailing bytes after the IPv6 payload", ns_padded, d::ANSWERED_NS));

    // --- NDP passed ---
    rows.push(pass("NS for an address not hosted", ns(NOT_VIP6).to_bytes(), Up, d::PASSED_NOT_VIP));
    rows.push(pass("NS on a down adapter", sol.to_bytes(), Down, d::PASSED_ADAPTER_DOWN));
    rows.push(pass("NS on an adapter not allowed", sol.to_bytes(), NotAllowed, d::PASSED_ADAPTER_NOT_ALLOWED));
    rows.push(pass("NS on an unknown adapter", sol.to_bytes(), Unknown, d::PASSED_ADAPTER_UNKNOWN));
    rows.push(pass("NS with hop limit 64", Nd { hop_limit: 64, ..sol.clone() }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS with code 1", Nd { code: 1, ..sol.clone() }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS for a multicast target", Nd { target: "ff02::1:ff00:10".parse().unwrap(), ..sol.clone() }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS from a multicast source", Nd { src: ALL_NODES, ..sol.clone() }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("DAD NS with a source link-layer option", Nd { options: vec![(ND_OPT_SOURCE_LL, CLIENT_MAC.to_vec())], ..Nd::dad(CLIENT_MAC, VIP6) }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("DAD NS to the unicast target", Nd { dst: VIP6, eth_dst: UP_MAC, ..Nd::dad(CLIENT_MAC, VIP6) }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS to all-nodes instead of the solicited-node group", Nd { dst: ALL_NODES, ..sol.clone() }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS to another address's solicited-node group", Nd { dst: solicited_node(&NOT_VIP6), ..sol.clone() }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS with an option of length 0", ns_patched(VIP6, |m| m[25] = 0), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS with more than 128 bytes of options", Nd { options: vec![(ND_OPT_SOURCE_LL, CLIENT_MAC.to_vec()), (200, vec![7; 126])], ..sol.clone() }.to_bytes(), Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS whose last option overruns the payload", ns_patched(VIP6, |m| m[25] = 2), Up, d::PASSED_NS_INVALID));
    let mut bad = sol.to_bytes();
    let n = bad.len();
    bad[n - 1] ^= 0x01;
    rows.push(pass("NS with a bad checksum", bad, Up, d::PASSED_NS_BAD_CHECKSUM));
    let mut long = sol.to_bytes();
    long[18..20].copy_from_slice(&40u16.to_be_bytes());
    rows.push(pass("NS whose payload length exceeds the frame", long, Up, d::PASSED_TRUNCATED));
    let mut odd = sol.to_bytes();
    odd.extend_from_slice(&[0, 0]);
    odd[18..20].copy_from_slice(&34u16.to_be_bytes());
    rows.push(pass("NS with a payload length not a multiple of 8", odd, Up, d::PASSED_NS_INVALID));
    rows.push(pass("NS from a multicast eth source", Nd { eth_src: [0x33, 0x33, 0, 0, 0, 1], ..sol.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    rows.push(pass("NS with a multicast source link-layer address", Nd { options: vec![(ND_OPT_SOURCE_LL, vec![0x33, 0x33, 0, 0, 0, 1])], ..sol.clone() }.to_bytes(), Up, d::PASSED_BAD_SENDER_MAC));
    rows.push(pass("NS unicast to another host's MAC", Nd { eth_dst: OTHER_MAC, dst: VIP6, ..sol.clone() }.to_bytes(), Up, d::PASSED_NOT_FOR_US));
    rows.push(pass("tagged NS for an untagged VIP", ns(VIP6).with_tci(VLAN).to_bytes(), Up, d::PASSED_NOT_VIP));
    rows.push(pass("untagged NS for a VLAN VIP", ns(VIP6_VLAN).to_bytes(), Up, d::PASSED_NOT_VIP));
    rows.push(pass("neighbor advertisement", Nd::unsolicited_advert(CLIENT_MAC, VIP6).to_bytes(), Up, d::PASSED_IPV6_NOT_NS));
    let echo = {
        let mut m = vec![128, 0, 0, 0, 0, 1, 0, 1];
        let c = vip_packet::icmpv6_checksum(&CLIENT6, &VIP6, &m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        ipv6_frame(UP_MAC, CLIENT_MAC, None, &CLIENT6, &VIP6, 64, &m)
    };
    rows.push(pass("ICMPv6 echo request to a VIP: the client is learned", echo, Up, d::PASSED_VIP_TRAFFIC));
    let mut hbh = sol.to_bytes();
    hbh[20] = 0; // next header: hop-by-hop options
    rows.push(pass("IPv6 with an extension header first", hbh, Up, d::PASSED_IPV6_NOT_NS));
    let mut v4in6 = sol.to_bytes();
    v4in6[14] = 0x40; // version 4 in an IPv6 ethertype
    rows.push(pass("IPv6 ethertype with version 4", v4in6, Up, d::PASSED_IPV6_NOT_NS));
    rows
}

/// A minimal IPv4/UDP frame to the VIP: ordinary traffic the program must leave alone.
pub fn ipv4_udp() -> Vec<u8> {
    ipv4_to(UP_MAC, VIP4)
}

/// A small UDP datagram from the client to `dst`, sent to Ethernet `mac`.
pub fn ipv4_to(mac: Mac, dst: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 28 + 4, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&CLIENT4.octets());
    ip.extend_from_slice(&dst.octets());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    f
}

/// Valid requests of every kind, for truncation and as fuzz seeds.
pub fn valid_requests() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("arp", arp_req(VIP4).to_bytes()),
        ("tagged arp", arp_req(VIP4_VLAN).with_tci(VLAN).to_bytes()),
        ("ns", ns(VIP6).to_bytes()),
        ("dad", Nd::dad(CLIENT_MAC, VIP6).to_bytes()),
        ("tagged ns", ns(VIP6_VLAN).with_tci(VLAN).to_bytes()),
    ]
}

/// A private namespace with four veth ends standing for the four kinds of arrival; the
/// data plane loaded and its maps filled. BPF_PROG_TEST_RUN resolves the ingress ifindex
/// in the caller's namespace, so runs happen inside [`TableEnv::within`].
pub struct TableEnv {
    pub ns: NetNs,
    pub dp: Dataplane,
    ifindex: [u32; 4],
}

/// Output of one test run.
pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
}

impl TableEnv {
    pub fn new() -> TableEnv {
        let ns = NetNs::new("tbl");
        veth(&ns, "t0", "02:00:00:00:01:00", &ns, "t1", "02:00:00:00:01:01");
        veth(&ns, "t2", "02:00:00:00:01:02", &ns, "t3", "02:00:00:00:01:03");
        let mut dp = crate::load_dataplane();
        // An XDP program on each device registers its receive queue, which the kernel
        // requires before a test run may name the device as ingress.
        ns.run(|| {
            for dev in ["t0", "t1", "t2", "t3"] {
                dp.attach_pass(dev, aya::programs::XdpMode::Driver).unwrap_or_else(|e| panic!("{e}"));
            }
        });
        let ifindex = [ns.ifindex("t0"), ns.ifindex("t1"), ns.ifindex("t2"), ns.ifindex("t3")];
        fill_table(&mut dp, &ifindex);
        TableEnv { ns, dp, ifindex }
    }

    /// Another data plane with the same maps' contents, loaded with the programs' log
    /// records at `level` (aya-log's: 4 debug), for the benchmark's logging variant. Call
    /// inside [`TableEnv::within`].
    pub fn logging_dataplane(&self, level: u8) -> Dataplane {
        let bytes = std::fs::read(crate::object_path()).expect("object");
        let mut dp = Dataplane::load_with_log(&bytes, level).unwrap_or_else(|e| panic!("loading with logs: {e:?}"));
        fill_table(&mut dp, &self.ifindex);
        dp
    }

    pub fn ifindex(&self, a: Arrival) -> u32 {
        self.ifindex[ARRIVALS.iter().position(|x| *x == a).unwrap()]
    }

    /// Runs `f` on a thread inside the table's namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce(&TableEnv) -> T + Send) -> T {
        self.ns.run(|| f(self))
    }

    /// One BPF_PROG_TEST_RUN of the responder. Call inside [`TableEnv::within`].
    pub fn run(&self, frame: &[u8], on: Arrival) -> Run {
        let prog = self.dp.responder().expect("responder");
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; the kernel wants data_end equal to the frame's length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.ifindex(on).to_ne_bytes());
        let mut out = vec![0u8; 4096];
        let r = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() })
            .unwrap_or_else(|e| panic!("test run of {} bytes: {e:?}", frame.len()));
        out.truncate(r.data_size_out as usize);
        Run { action: r.return_value, output: out }
    }
}

/// The table's adapters and VIPs.
fn fill_table(dp: &mut Dataplane, ifindex: &[u32; 4]) {
    let adapters = [(Arrival::Up, ADAPTER_UP), (Arrival::Down, ADAPTER_DOWN), (Arrival::NotAllowed, ADAPTER_UP)];
    for (i, (a, state)) in adapters.into_iter().enumerate() {
        dp.set_adapter(ifindex[i], AdapterInfo { mac: arrival_mac(a), slot: i as u8, state, heir: 0, flags: 0 }).expect("adapter");
    }
    // Every hosted VIP shares policy 0: slots 0 (Up) and 1 (Down) may answer; slot 2
    // (NotAllowed) may not.
    dp.set_policy(0, 0b011).expect("policy");
    for (id, key) in hosted().into_iter().enumerate() {
        dp.set_vip(key, VipInfo { policy: 0, id: id as u32, flags: 0, _pad: 0 }).expect("vip");
    }
}

impl Default for TableEnv {
    fn default() -> Self {
        Self::new()
    }
}
