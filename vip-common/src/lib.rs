//! Types shared by the XDP data plane (`vip-ebpf`) and its userspace owner (`vip-agent`).
//!
//! Every map key and value is `#[repr(C)]`, `Pod` (bytemuck refuses implicit padding, so
//! padding is spelled out as `_pad` fields) and size-checked at compile time: the kernel
//! side and userspace must agree on every byte. No `bool`, enum or `Option` appears in a
//! map type; states are `u8` with named constants.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Adapter slots are bit positions in [`VipInfo::allowed`], so at most 64 adapters.
pub const MAX_ADAPTERS: u32 = 64;
/// Capacity of the VIP map; also bounds `VipInfo::id`.
pub const MAX_VIPS: u32 = 131_072;
/// Placements the data plane holds (`POLICIES`): VIPs placed alike share one, so a
/// failure rewrites one entry per group of VIPs, not one per VIP.
pub const MAX_POLICIES: u32 = 16_384;
/// The `ADAPTERS` array is indexed by ifindex (an array lookup is inlined by the verifier,
/// a hash lookup is not): adapters with a larger ifindex cannot be served.
pub const MAX_IFINDEX: u32 = 65536;
/// Capacity of the client table (`FLOWS`, LRU).
pub const MAX_FLOWS: u32 = 65536;

/// Names of the maps and programs in the object, used by userspace to find them.
pub mod names {
    pub const PROGRAM: &str = "vip_xdp";
    /// An XDP program that passes everything: the benchmark's baseline, and the program
    /// attached to veth peers so that XDP_TX frames are delivered (see docs/design.md).
    pub const PASS_PROGRAM: &str = "vip_pass";
    /// An XDP program that drops everything: the veth benchmark's client.
    pub const SINK_PROGRAM: &str = "vip_sink";
    /// An XDP program that sends every frame back unchanged, doing nothing else: the veth
    /// benchmark's no-work variant (what XDP_TX itself costs there).
    pub const BOUNCE_PROGRAM: &str = "vip_bounce";
    pub const VIPS: &str = "VIPS";
    pub const ADAPTERS: &str = "ADAPTERS";
    pub const DECISIONS: &str = "DECISIONS";
    pub const ANSWERS: &str = "ANSWERS";
    /// TC egress program: sends a VIP's reply out of the adapter its client uses.
    pub const EGRESS_PROGRAM: &str = "vip_egress";
    /// TC ingress program: marks frames the XDP program took for this adapter as ours.
    pub const INGRESS_PROGRAM: &str = "vip_ingress";
    /// A TC program that passes everything: the egress benchmark's baseline.
    pub const TC_PASS_PROGRAM: &str = "vip_tc_pass";
    pub const BUCKETS: &str = "BUCKETS";
    pub const FLOWS: &str = "FLOWS";
    pub const MACS: &str = "MACS";
    pub const TRAFFIC: &str = "TRAFFIC";
    pub const EGRESS: &str = "EGRESS";
    pub const EVENTS: &str = "EVENTS";
    pub const VSERVERS: &str = "VSERVERS";
    pub const VS_MACS: &str = "VS_MACS";
    pub const POLICIES: &str = "POLICIES";
    pub const FENCE: &str = "FENCE";
    /// One u32: the [`super::LAYOUT_VERSION`] of the maps pinned beside it.
    pub const LAYOUT: &str = "LAYOUT";
    /// The agent's switches for the data plane ([`super::SETTING_LEARN_TRAFFIC`], ...).
    pub const SETTINGS: &str = "SETTINGS";
    /// One bit per hash of every VIP key ([`super::filter_bit`]): a frame whose
    /// destination's bit is clear is not for a VIP, told without a hash lookup.
    pub const VIP_FILTER: &str = "VIP_FILTER";
    /// The VIPs again, in buckets indexed by the key's hash ([`super::VipBucket`]): an
    /// answer finds its VIP with one array read instead of a hash lookup.
    pub const VIP_TABLE: &str = "VIP_TABLE";
    /// Per CPU, the clients whose table entry it wrote last ([`super::Recent`]).
    pub const RECENT: &str = "RECENT";
    /// Every map the agent pins (and removes on a full stop).
    pub const PINNED_MAPS: [&str; 19] = [
        VIPS, POLICIES, ADAPTERS, DECISIONS, ANSWERS, BUCKETS, FLOWS, MACS, TRAFFIC, EGRESS, EVENTS, VSERVERS, VS_MACS, FENCE, LAYOUT, SETTINGS,
        VIP_FILTER, VIP_TABLE, RECENT,
    ];
}

/// The layout of the pinned maps (their keys, values and sizes). An agent refuses pins of
/// another layout rather than misread them. Raise it with any change to a pinned map's
/// key or value type, or its size.
pub const LAYOUT_VERSION: u32 = 4;

/// Entries of `SETTINGS` (u32 each).
pub const SETTINGS_LEN: u32 = 4;
/// 1: a client's adapter and MAC are learned from any VIP frame (`[steering]
/// learn_from_traffic`). 0 (the default): only from answered requests, frames from a MAC
/// already known for the client, or a MAC the kernel's neighbour table agrees with: a
/// frame with a forged source address cannot redirect a client's replies.
pub const SETTING_LEARN_TRAFFIC: u32 = 0;
/// The aya-log level the attached programs were loaded with (0: none), written by the
/// agent that attached them: the next one replaces them when its level differs.
pub const SETTING_LOG_LEVEL: u32 = 1;

/// Address families as stored in [`VipKey::family`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Key of the `VIPS` hash map: one entry per (family, address, VLAN).
///
/// The address is held as four native-order words of its network-order bytes: the XDP
/// side then builds a key with word stores instead of an out-of-line byte-wise memset.
/// IPv4 addresses use the first word, the rest zero. `vlan` is 0 for a VIP served on
/// untagged frames, otherwise the 802.1Q VLAN id (1..=4094).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipKey {
    pub addr: [u32; 4],
    pub vlan: u16,
    pub family: u8,
    pub _pad: u8,
}

/// `VIP_FILTER`'s size in u64 words: 4,194,304 bits (512 KiB), so 100,000 VIPs set about
/// one bit in 42 and 42 of 43 frames to other addresses leave after one array read.
pub const FILTER_WORDS: u32 = 1 << 16;
const FILTER_BITS_LOG2: u32 = 22;

/// The bit of `VIP_FILTER` a VIP key sets (Fibonacci hashing of the key's words: the
/// product's top bits depend on every bit of the address).
#[inline(always)]
pub fn filter_bit(k: &VipKey) -> u32 {
    let x = k.addr[0] ^ k.addr[1].rotate_left(7) ^ k.addr[2].rotate_left(14) ^ k.addr[3].rotate_left(21) ^ ((k.vlan as u32) << 8) ^ k.family as u32;
    x.wrapping_mul(0x9E37_79B1) >> (32 - FILTER_BITS_LOG2)
}

const _: () = assert!(1u64 << FILTER_BITS_LOG2 == FILTER_WORDS as u64 * 64);

/// `VIP_TABLE`'s size in buckets of two slots (one cache line each): 131,072 buckets,
/// 262,144 slots, 8 MiB, for at most `MAX_VIPS` VIPs (half full).
pub const TABLE_BUCKETS: u32 = 1 << TABLE_BUCKETS_LOG2;
const TABLE_BUCKETS_LOG2: u32 = 17;

/// The `VIP_TABLE` bucket of a key: the top bits of the same product as its filter bit,
/// so a frame computes one hash for both.
#[inline(always)]
pub fn table_bucket(filter_bit: u32) -> u32 {
    filter_bit >> (FILTER_BITS_LOG2 - TABLE_BUCKETS_LOG2)
}

/// One VIP in `VIP_TABLE`, eight 32-bit words the agent writes with single stores under
/// a sequence count (`tag`'s top byte: odd while it writes), so a reader that sees the
/// same even count before and after its reads has a whole entry, and one that does not
/// looks the key up in `VIPS` instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipSlot {
    /// [`VipKey::addr`].
    pub addr: [u32; 4],
    /// [`VipSlot::tag_of`] the key (family 0: an empty slot), the sequence count in bits
    /// 24..32 and, in a bucket's first slot, [`TABLE_OVERFLOW`].
    pub tag: u32,
    pub policy: u32,
    pub id: u32,
    pub flags: u32,
}

/// A bucket: two slots, 64 bytes, one cache line (the array's values start page-aligned).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipBucket {
    pub slots: [VipSlot; 2],
}

const _: () = assert!(core::mem::size_of::<VipSlot>() == 32);
const _: () = assert!(core::mem::size_of::<VipBucket>() == 64);

/// In the first slot's tag: some VIP of this bucket is in neither slot (more than two
/// hash here), so a key not found in the slots must be looked up in `VIPS`. Bit 15: a
/// VLAN ID uses 12 bits.
pub const TABLE_OVERFLOW: u32 = 1 << 15;
/// The tag's key part (VLAN ID and family).
pub const TAG_KEY: u32 = 0x00ff_0fff;
/// The tag's sequence count.
pub const TAG_SEQ_SHIFT: u32 = 24;

impl VipSlot {
    /// The tag's key part of `k`: its VLAN ID and family (never 0 for a real key).
    #[inline(always)]
    pub const fn tag_of(k: &VipKey) -> u32 {
        (k.vlan as u32 & 0x0fff) | (k.family as u32) << 16
    }
}

impl VipKey {
    #[inline(always)]
    pub const fn v4(a: [u8; 4], vlan: u16) -> Self {
        Self { addr: [u32::from_ne_bytes(a), 0, 0, 0], vlan, family: FAMILY_IPV4, _pad: 0 }
    }

    #[inline(always)]
    pub const fn v6(a: [u8; 16], vlan: u16) -> Self {
        let addr = [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ];
        Self { addr, vlan, family: FAMILY_IPV6, _pad: 0 }
    }

    /// The address bytes, in network order (IPv4: the first 4).
    #[inline(always)]
    pub fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        for (i, w) in self.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o
    }
}

/// Value of the `VIPS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipInfo {
    /// Its placement: the index into `POLICIES` (and of its spread table in `BUCKETS`),
    /// `< MAX_POLICIES`, shared by every VIP placed alike.
    pub policy: u32,
    /// Index of this VIP in the `ANSWERS` counters, `< MAX_VIPS`; unique per VIP.
    pub id: u32,
    /// `VIP_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// Value of the `POLICIES` array (memory-mapped): a placement shared by VIPs. One 8-byte
/// word, written by the agent with one atomic store.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Policy {
    /// Bit `n` set: the adapter in slot `n` may answer (while it is up).
    pub allowed: u64,
}

/// [`VipInfo::flags`]: `spread` mode, one adapter answers each client (see [`client_bucket`]).
pub const VIP_SPREAD: u32 = 1;
/// [`VipInfo::flags`]: a cluster VIP, answered only while this node's answering deadline
/// (`FENCE`) lies ahead.
pub const VIP_CLUSTER: u32 = 4;
/// Entries of the `FENCE` array (memory-mapped): entry [`FENCE_DEADLINE`] is the boot-clock
/// time (`bpf_ktime_get_boot_ns`, CLOCK_BOOTTIME) until which this node may answer its
/// cluster VIPs; 0: not at all. Entry [`FENCE_CLOCK`] is CLOCK_MONOTONIC as the agent
/// last wrote it (every [`CLOCK_TICK_MS`]): the client table's times, read with one load
/// instead of a clock helper call per frame (40 ns); 0: none (the program reads the
/// clock itself). Entry [`FENCE_FLOWS_GEN`] counts the agent's own changes to the client
/// table (entries it moved or removed): a CPU's `RECENT` knowledge of an entry holds only
/// while the count is the one it saw.
pub const FENCE_LEN: u32 = 3;
pub const FENCE_DEADLINE: u32 = 0;
pub const FENCE_CLOCK: u32 = 1;
pub const FENCE_FLOWS_GEN: u32 = 2;
pub const CLOCK_TICK_MS: u64 = 100;
/// [`VipInfo::flags`]: the VIP belongs to a virtual server; its index is
/// [`vserver_index`]. Its inbound traffic is redirected there (seed 004).
pub const VIP_VSERVER: u32 = 2;
/// Virtual servers the data plane can deliver to (`VSERVERS` device map entries).
pub const MAX_VSERVERS: u32 = 64;

/// The virtual server a VIP's flags name.
#[inline(always)]
pub const fn vserver_index(flags: u32) -> u32 {
    flags >> 16
}

/// Flags naming virtual server `index`.
#[inline(always)]
pub const fn vserver_flags(index: u32) -> u32 {
    VIP_VSERVER | (index << 16)
}

/// Buckets per spread VIP. 240 is divisible by 1..=6, 8, 10, 12, 15 and 16, so a
/// round-robin fill over that many adapters (or total weight) repeats exactly around the
/// table and any run of consecutive buckets is shared within one of even.
pub const SPREAD_BUCKETS: u32 = 240;
/// Buckets are bytes (the owner's slot) packed eight to a `BUCKETS` element; one table
/// per policy.
pub const BUCKET_WORDS: u32 = SPREAD_BUCKETS / 8;
pub const BUCKETS_LEN: u32 = MAX_POLICIES * BUCKET_WORDS;
/// A bucket no adapter owns: nobody answers its clients.
pub const NO_SLOT: u8 = 0xff;

/// The bucket of a client address (as stored in [`VipKey::addr`]): its 32-bit words added,
/// then the 6-bit digits of that added. Consecutive addresses land in consecutive buckets,
/// so a subnet's clients (handed out in order by DHCP or by hand) spread within one of
/// even; addresses that differ only in higher bits still land apart. The data plane and
/// the agent both call this function.
#[inline(always)]
pub fn client_bucket(addr: &[u32; 4]) -> u32 {
    let x = u32::from_be(addr[0])
        .wrapping_add(u32::from_be(addr[1]))
        .wrapping_add(u32::from_be(addr[2]))
        .wrapping_add(u32::from_be(addr[3]));
    let s = (x & 63) + ((x >> 6) & 63) + ((x >> 12) & 63) + ((x >> 18) & 63) + ((x >> 24) & 63) + (x >> 30);
    s % SPREAD_BUCKETS
}

/// Key of the `FLOWS` table (LRU hash): a client talking to a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub vip: [u32; 4],
    pub client: [u32; 4],
    pub vlan: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Value of the `FLOWS` table: which adapter the client uses for the VIP, learned from
/// its frames (and, in spread mode, from the requests answered), and what it sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowInfo {
    /// The adapter whose MAC the client sends to (the one that carries its replies).
    pub ifindex: u32,
    pub slot: u8,
    pub _pad: u8,
    /// The client's MAC: the destination of its replies.
    pub mac: [u8; 6],
    pub _pad2: [u8; 4],
    /// `bpf_ktime_get_ns` of the last frame or answered request.
    pub seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Last straggler event sent for this client (rate limit in the data plane).
    pub event_ns: u64,
}

/// An entry of the per-CPU `RECENT` array: the client table entry this CPU wrote last
/// for the clients that hash to it, when (`at`, [`recent_time`] units), and the packets
/// and bytes it has counted since without writing the entry (added to the entry when
/// it next writes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Recent {
    pub flow: FlowKey,
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// `FENCE[FENCE_FLOWS_GEN]` (its low 16 bits) when written.
    pub gen: u16,
    pub at: u32,
    pub packets: u32,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Recent>() == 64);

/// Slots of the per-CPU `RECENT` array.
pub const RECENT_SLOTS: u32 = 1 << RECENT_SLOTS_LOG2;
const RECENT_SLOTS_LOG2: u32 = 10;

/// A client table key's `RECENT` slot.
#[inline(always)]
pub fn recent_index(k: &FlowKey) -> u32 {
    let x = k.client[0] ^ k.client[3].rotate_left(11) ^ k.vip[0].rotate_left(5) ^ k.vip[3].rotate_left(17) ^ k.vlan as u32;
    x.wrapping_mul(0x9E37_79B1) >> (32 - RECENT_SLOTS_LOG2)
}

/// `RECENT`'s clock: CLOCK_MONOTONIC in units of 2^20 ns (about a millisecond).
#[inline(always)]
pub const fn recent_time(ns: u64) -> u32 {
    (ns >> 20) as u32
}

/// Key of the `MACS` hash: an adapter's own MAC (padded), value its ifindex.
pub type MacKey = [u8; 8];
#[inline(always)]
pub const fn mac_key(m: &[u8; 6]) -> MacKey {
    [m[0], m[1], m[2], m[3], m[4], m[5], 0, 0]
}

/// Per-adapter-slot traffic for VIPs (`TRAFFIC`, per CPU): what "load" means when moved
/// clients are placed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Traffic {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// ARP replies and NAs this adapter sent (for any VIP).
    pub answers: u64,
}

/// Sent to the agent (`EVENTS` ring buffer) when a frame for a VIP reached a healthy
/// adapter addressed to a failed adapter's MAC: the client needs a correction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Straggler {
    pub flow: FlowKey,
    /// Where it arrived.
    pub ifindex: u32,
    pub client_mac: [u8; 6],
    /// The failed adapter's MAC it was sent to.
    pub to_mac: [u8; 6],
}
pub const EVENTS_BYTES: u32 = 64 * 1024;

/// Adapter states stored in [`AdapterInfo::state`]. A zeroed entry is an ifindex the agent
/// does not manage.
pub const ADAPTER_UNKNOWN: u8 = 0;
pub const ADAPTER_DOWN: u8 = 1;
pub const ADAPTER_UP: u8 = 2;
/// Not an adapter: the interface leading to virtual server `slot` (its `VSERVERS` index).
pub const ADAPTER_VSERVER: u8 = 3;

/// Value of the `ADAPTERS` array, indexed by ifindex. The first 8 bytes (what a failover
/// changes) are written by the agent as one aligned store.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AdapterInfo {
    /// The adapter's own MAC: the source of every answer it sends.
    pub mac: [u8; 6],
    /// Bit position of this adapter in [`VipInfo::allowed`], `< MAX_ADAPTERS`.
    pub slot: u8,
    /// [`ADAPTER_UP`], [`ADAPTER_DOWN`] or [`ADAPTER_UNKNOWN`].
    pub state: u8,
    /// While down: the ifindex of the healthy adapter that takes frames still sent to this
    /// adapter's MAC (stragglers, or all of them with [`ADAPTER_MAC_MOVED`]); 0 for none.
    pub heir: u32,
    /// `ADAPTER_*` flags.
    pub flags: u32,
}

/// [`AdapterInfo::flags`]: this (failed) adapter's MAC now lives on its heir (seed 002's
/// MAC move): frames to it are accepted there and replies leave there from it.
pub const ADAPTER_MAC_MOVED: u32 = 1;

/// `ANSWERS` is one shared counter per VIP id (added to atomically: answers are rare, and
/// a per-CPU array of 131,072 entries would cost that much memory per CPU); the answers
/// per adapter are in [`Traffic::answers`].
pub const ANSWERS_LEN: u32 = MAX_VIPS;

/// What the program decided for a frame: the index into the per-CPU `DECISIONS` array.
/// Every frame increments exactly one of these, so they are the program's log.
pub mod decision {
    /// An ARP request for a VIP was answered with an ARP reply (XDP_TX).
    pub const ANSWERED_ARP: u32 = 0;
    /// An ARP probe (sender IP 0.0.0.0) for a VIP was answered (XDP_TX).
    pub const ANSWERED_ARP_PROBE: u32 = 1;
    /// A Neighbor Solicitation for a VIP was answered with a solicited NA (XDP_TX).
    pub const ANSWERED_NS: u32 = 2;
    /// A DAD Neighbor Solicitation (source ::) for a VIP was answered to all-nodes (XDP_TX).
    pub const ANSWERED_DAD: u32 = 3;
    /// Neither ARP nor an ICMPv6 Neighbor Solicitation: ordinary traffic.
    pub const PASSED_NOT_NEIGHBOR: u32 = 4;
    /// The frame ended before a header the decision needs.
    pub const PASSED_TRUNCATED: u32 = 5;
    /// ARP for something other than Ethernet/IPv4 (htype, ptype, hlen or plen).
    pub const PASSED_ARP_NOT_ETHER_IPV4: u32 = 6;
    /// ARP reply or other non-request opcode.
    pub const PASSED_ARP_NOT_REQUEST: u32 = 7;
    /// Gratuitous ARP (sender IP equals target IP): an announcement, not a question.
    pub const PASSED_ARP_GRATUITOUS: u32 = 8;
    /// Sender MAC (Ethernet source or ARP sha) is broadcast, multicast or all-zero.
    pub const PASSED_BAD_SENDER_MAC: u32 = 9;
    /// Unicast to some other host's MAC (flooded by a switch): not ours to answer.
    pub const PASSED_NOT_FOR_US: u32 = 10;
    /// The target address is not a hosted VIP on this VLAN.
    pub const PASSED_NOT_VIP: u32 = 11;
    /// The frame arrived on an adapter the agent does not know.
    pub const PASSED_ADAPTER_UNKNOWN: u32 = 12;
    /// The adapter is marked down.
    pub const PASSED_ADAPTER_DOWN: u32 = 13;
    /// The VIP may not be answered on this adapter.
    pub const PASSED_ADAPTER_NOT_ALLOWED: u32 = 14;
    /// IPv6 frame that is not a Neighbor Solicitation (other ICMPv6, TCP, extension headers).
    pub const PASSED_IPV6_NOT_NS: u32 = 15;
    /// Neighbor Solicitation that fails RFC 4861 §7.1.1 validation (hop limit, code,
    /// length, multicast target, zero-length option, DAD rules, addressing).
    pub const PASSED_NS_INVALID: u32 = 16;
    /// Neighbor Solicitation with a wrong ICMPv6 checksum.
    pub const PASSED_NS_BAD_CHECKSUM: u32 = 17;
    /// 802.1Q tag with VLAN id 0 (priority tag) or 4095 (reserved): never answered.
    pub const PASSED_VLAN_RESERVED: u32 = 18;
    /// The frame could not be resized for the answer (no tailroom): passed to the kernel.
    pub const PASSED_NO_ROOM: u32 = 19;
    /// Spread mode: another adapter answers this client.
    pub const PASSED_SPREAD_OTHER: u32 = 20;
    /// IPv4/IPv6 traffic to a VIP on this adapter's MAC: the client was learned.
    pub const PASSED_VIP_TRAFFIC: u32 = 21;
    /// Traffic to a failed adapter's MAC that moved here: accepted (seed 002).
    pub const ACCEPTED_MOVED_MAC: u32 = 22;
    /// Traffic for a VIP to a failed adapter's MAC (a flooded straggler): accepted, and
    /// the agent told to correct the client.
    pub const ACCEPTED_STRAGGLER: u32 = 23;
    /// IPv4 to a virtual server's VIP: redirected to its interface (XDP_REDIRECT).
    pub const REDIRECTED_TO_VSERVER: u32 = 24;
    /// From a virtual server to a known client: redirected out of the client's adapter.
    pub const REDIRECTED_FROM_VSERVER: u32 = 25;
    /// A virtual server's ARP request answered with its interface's MAC (the gateway).
    pub const ANSWERED_VSERVER_ARP: u32 = 26;
    /// For a virtual server, but it cannot be delivered (its MAC not learned yet, no
    /// client-table entry for a reply, or the redirect failed): passed to the kernel.
    pub const PASSED_VSERVER_UNDELIVERED: u32 = 27;
    /// A cluster VIP's frame while this node cannot prove it still holds the VIP (its
    /// answering deadline in `FENCE` has passed): dropped, so neither the program nor the
    /// kernel answers (XDP_DROP).
    pub const DROPPED_FENCED: u32 = 28;
    /// Number of decisions; the length of the `DECISIONS` array.
    pub const COUNT: u32 = 29;

    /// Decisions whose action is XDP_REDIRECT (the others answered are XDP_TX).
    #[inline(always)]
    pub const fn is_redirect(d: u32) -> bool {
        d == REDIRECTED_TO_VSERVER || d == REDIRECTED_FROM_VSERVER
    }

    /// Decisions whose action is XDP_DROP (the others not answered are XDP_PASS).
    #[inline(always)]
    pub const fn is_drop(d: u32) -> bool {
        d == DROPPED_FENCED
    }

    /// Names as used in metrics and `vip-agent status`, indexed by decision.
    pub const NAMES: [&str; COUNT as usize] = [
        "answered_arp",
        "answered_arp_probe",
        "answered_ns",
        "answered_dad",
        "passed_not_neighbor",
        "passed_truncated",
        "passed_arp_not_ether_ipv4",
        "passed_arp_not_request",
        "passed_arp_gratuitous",
        "passed_bad_sender_mac",
        "passed_not_for_us",
        "passed_not_vip",
        "passed_adapter_unknown",
        "passed_adapter_down",
        "passed_adapter_not_allowed",
        "passed_ipv6_not_ns",
        "passed_ns_invalid",
        "passed_ns_bad_checksum",
        "passed_vlan_reserved",
        "passed_no_room",
        "passed_spread_other",
        "passed_vip_traffic",
        "accepted_moved_mac",
        "accepted_straggler",
        "redirected_to_vserver",
        "redirected_from_vserver",
        "answered_vserver_arp",
        "passed_vserver_undelivered",
        "dropped_fenced",
    ];
}

/// What the TC egress program decided for a frame leaving an adapter (`EGRESS` counters).
pub mod egress {
    /// A VIP's frame to a known client left through the client's adapter (it was routed there).
    pub const STEERED_SAME: u32 = 0;
    /// ... was redirected from the routed adapter to the client's adapter.
    pub const STEERED_REDIRECT: u32 = 1;
    /// ... left through the heir of the client's failed adapter, from the moved MAC.
    pub const STEERED_MOVED_MAC: u32 = 2;
    /// From a VIP, but the client is not in the table: routed as the kernel chose.
    pub const NO_FLOW: u32 = 3;
    /// The client's adapter is down and has no heir: routed as the kernel chose.
    pub const ADAPTER_DOWN: u32 = 4;
    /// Not IPv4/IPv6 from a VIP (untagged): untouched.
    pub const NOT_VIP: u32 = 5;
    /// From a cluster VIP while this node may not answer for it (its deadline passed):
    /// dropped.
    pub const DROPPED_FENCED: u32 = 6;
    pub const COUNT: u32 = 7;
    pub const NAMES: [&str; COUNT as usize] =
        ["steered_same", "steered_redirect", "steered_moved_mac", "no_flow", "adapter_down", "not_vip", "dropped_fenced"];
}

// The kernel and userspace must agree on every size: a change here is a deliberate ABI break.
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);
const _: () = assert!(core::mem::size_of::<VipInfo>() == 16);
const _: () = assert!(core::mem::size_of::<Policy>() == 8);
const _: () = assert!(core::mem::size_of::<AdapterInfo>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 36);
const _: () = assert!(core::mem::size_of::<FlowInfo>() == 48);
const _: () = assert!(core::mem::size_of::<Traffic>() == 40);
const _: () = assert!(core::mem::size_of::<Straggler>() == 52);
const _: () = assert!(SPREAD_BUCKETS.is_multiple_of(8));
const _: () = assert!(MAX_ADAPTERS <= 64); // slots are bits of a u64
const _: () = assert!((MAX_POLICIES as u64) * (BUCKET_WORDS as u64) <= u32::MAX as u64);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are `#[repr(C)]`, `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::AdapterInfo {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowInfo {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::Recent {}
    unsafe impl aya::Pod for super::VipBucket {}
}
