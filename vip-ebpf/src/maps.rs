//! The maps the agent fills (VIPS, ADAPTERS) and the counters it reads.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use vip_common::{
    AdapterInfo, FlowInfo, FlowKey, MacKey, Policy, Traffic, VipInfo, VipKey, ADAPTER_DOWN, ADAPTER_MAC_MOVED,
    ANSWERS_LEN, BUCKETS_LEN, EVENTS_BYTES, MAX_ADAPTERS, MAX_IFINDEX, MAX_POLICIES, MAX_VIPS,
};

/// The answering deadline of cluster VIPs (`vip_common::FENCE_DEADLINE`), boot clock ns:
/// the agent extends it while the cluster proves this node still holds its VIPs.
/// Memory-mapped: one store from the agent; an agent that hangs or dies stops extending
/// it and the node goes silent by itself.
#[map(name = "FENCE")]
pub static FENCE: Array<u64> = Array::with_max_entries(vip_common::FENCE_LEN, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

/// The layout version of the maps pinned with it (`vip_common::LAYOUT_VERSION`), written
/// by the agent; no program reads it.
#[map(name = "LAYOUT")]
pub static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// The agent's switches (`vip_common::SETTING_*`).
#[map(name = "SETTINGS")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(vip_common::SETTINGS_LEN, 0);

/// `[steering] learn_from_traffic`: any VIP frame may enter or move a client.
#[inline(always)]
pub fn learn_any_traffic() -> bool {
    SETTINGS.get(vip_common::SETTING_LEARN_TRAFFIC).is_some_and(|v| *v != 0)
}

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// One bit per hash of every key in VIPS (`vip_common::filter_bit`), set by the agent
/// before the entry is written and cleared only after no entry needs it: a clear bit
/// proves a frame is not for a VIP with one array read instead of a hash lookup.
/// Memory-mapped: the agent writes words with plain stores.
#[map(name = "VIP_FILTER")]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(vip_common::FILTER_WORDS, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

/// False when `key` is certainly not in VIPS; true when it may be.
#[inline(always)]
pub fn maybe_vip(key: &VipKey) -> bool {
    let b = vip_common::filter_bit(key);
    match VIP_FILTER.get(b >> 6) {
        Some(w) => *w & (1u64 << (b & 63)) != 0,
        None => true,
    }
}

/// Placements shared by VIPs placed alike (`VipInfo::policy`). Memory-mapped: the agent
/// changes who may answer a whole group of VIPs with one store.
#[map(name = "POLICIES")]
pub static POLICIES: Array<Policy> = Array::with_max_entries(MAX_POLICIES, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

/// Memory-mapped (BPF_F_MMAPABLE): the agent marks an adapter down with one store to
/// shared memory, no syscall, the moment it learns of a failure.
#[map(name = "ADAPTERS")]
pub static ADAPTERS: Array<AdapterInfo> =
    Array::with_max_entries(MAX_IFINDEX, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

/// Spread mode: per policy, [`vip_common::SPREAD_BUCKETS`] owner slots packed 8 per element.
/// Memory-mapped, so the agent moves a failed adapter's buckets with plain stores.
#[map(name = "BUCKETS")]
pub static BUCKETS: Array<[u8; 8]> = Array::with_max_entries(BUCKETS_LEN, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

/// The client table: which adapter each client uses for each VIP. LRU: bounded, the
/// least recently used entry gives way; the agent also ages entries out.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowInfo> = LruHashMap::with_max_entries(vip_common::MAX_FLOWS, 0);

/// Per CPU, the clients it answered last ([`crate::steer::learn_answered`]): one slot per
/// hash of the client table's key. Not pinned: a new load starts with it empty.
#[map(name = "RECENT")]
pub static RECENT: PerCpuArray<Recent> = PerCpuArray::with_max_entries(RECENT_SLOTS, 0);
pub const RECENT_SLOTS: u32 = 1024;

#[repr(C)]
pub struct Recent {
    pub flow: FlowKey,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    pub at_ns: u64,
}

#[inline(always)]
pub fn recent_index(k: &FlowKey) -> u32 {
    let x = k.client[0] ^ k.client[3].rotate_left(11) ^ k.vip[0].rotate_left(5) ^ k.vip[3].rotate_left(17) ^ k.vlan as u32;
    x.wrapping_mul(0x9E37_79B1) >> (32 - 10)
}

const _: () = assert!(1 << 10 == RECENT_SLOTS);

/// Two client-table keys compared word by word (`==` would call an out-of-line bcmp).
#[inline(always)]
pub fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    let mut d = (a.vlan ^ b.vlan) as u32 | (a.family ^ b.family) as u32;
    let mut i = 0;
    while i < 4 {
        d |= (a.vip[i] ^ b.vip[i]) | (a.client[i] ^ b.client[i]);
        i += 1;
    }
    d == 0
}

/// Every managed adapter's own MAC, to recognise frames sent to a failed adapter.
#[map(name = "MACS")]
pub static MACS: HashMap<MacKey, u32> = HashMap::with_max_entries(MAX_ADAPTERS, 0);

#[map(name = "TRAFFIC")]
pub static TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_ADAPTERS, 0);

#[map(name = "EGRESS")]
pub static EGRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(vip_common::egress::COUNT, 0);

/// Virtual servers: index → the interface leading to each (seed 004).
#[map(name = "VSERVERS")]
pub static VSERVERS: DevMap = DevMap::with_max_entries(vip_common::MAX_VSERVERS, 0);

/// Each virtual server's own MAC (bytes 0..6; byte 6 is 1 once learned), learned from its
/// frames by the program on its interface.
#[map(name = "VS_MACS")]
pub static VS_MACS: Array<[u8; 8]> = Array::with_max_entries(vip_common::MAX_VSERVERS, 0);

/// Straggler events for the agent.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "DECISIONS")]
pub static DECISIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(vip_common::decision::COUNT, 0);

/// Answers per VIP id: shared, added to atomically (see `vip_common::ANSWERS_LEN`).
/// Memory-mapped: status reads 100,000 counters without a syscall each.
#[map(name = "ANSWERS")]
pub static ANSWERS: Array<u64> = Array::with_max_entries(ANSWERS_LEN, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

/// A cluster VIP whose deadline has passed (or that has none): not to be answered.
#[inline(always)]
pub fn fenced(flags: u32) -> bool {
    if flags & vip_common::VIP_CLUSTER == 0 {
        return false;
    }
    let until = FENCE.get(vip_common::FENCE_DEADLINE).copied().unwrap_or(0);
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    now >= until
}

/// CLOCK_MONOTONIC as the agent last wrote it (at most `CLOCK_TICK_MS` old): enough for
/// the client table's ages, and one load where a clock helper costs 40 ns a frame.
/// Without an agent's clock, the kernel's coarse one.
#[inline(always)]
pub fn now_ns() -> u64 {
    match FENCE.get(vip_common::FENCE_CLOCK) {
        Some(t) if *t != 0 => *t,
        _ => unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() },
    }
}

#[inline(always)]
pub fn count(decision: u32) {
    if let Some(c) = DECISIONS.get_ptr_mut(decision) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_answer(vip_id: u32, slot: u8) {
    if let Some(c) = ANSWERS.get_ptr_mut(vip_id) {
        // BPF_ATOMIC add: core's AtomicU64 has no fetch_add on this target.
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(c, 1) };
    }
    if let Some(t) = TRAFFIC.get_ptr_mut(slot as u32) {
        unsafe { (*t).answers += 1 };
    }
}

/// A request this adapter may answer.
pub struct Hit {
    /// The adapter it arrived on, with `mac` set to the MAC to answer from.
    pub adapter: AdapterInfo,
    pub vip: VipInfo,
    /// Its policy's allowed adapters.
    pub allowed: u64,
    /// The adapter whose MAC was asked (a failed one whose MAC moved here, or this one)
    /// and its slot: what the client table records.
    pub via: u32,
    pub via_slot: u8,
    /// Asked on a moved MAC: answered whatever the mode, the client keeps that MAC.
    pub moved: bool,
}

/// The VIP a frame asks for and the adapter it arrived on, if the adapter may answer for
/// it right now. `dst` is the frame's Ethernet destination. The VIP is looked up first so
/// that the common miss (a request for some other host) costs one lookup. A unicast
/// request to a failed adapter's MAC that moved here is answered from that MAC, so the
/// client's cache never changes.
#[inline(always)]
pub fn lookup(ifindex: u32, dst: &[u8; 6], key: &VipKey) -> Result<Hit, u32> {
    use vip_common::decision::*;
    // (Its callers, the ARP and NS paths, read the key's filter bit before they get here.)
    let vip = match unsafe { VIPS.get(key) } {
        Some(v) => *v,
        None => return Err(PASSED_NOT_VIP),
    };
    if fenced(vip.flags) {
        return Err(DROPPED_FENCED);
    }
    let mut adapter = match ADAPTERS.get(ifindex) {
        Some(a) if a.state != vip_common::ADAPTER_UNKNOWN => *a,
        _ => return Err(PASSED_ADAPTER_UNKNOWN),
    };
    let (mut via, mut via_slot, mut moved) = (ifindex, adapter.slot, false);
    // Multicast and broadcast are for everyone; a unicast frame must be for this adapter
    // (or for a failed adapter whose MAC moved here).
    if dst[0] & 1 == 0 && !crate::parse::eq6(dst, &adapter.mac) {
        match inherited(ifindex, dst) {
            Some((owner_ix, owner)) if mac_moved(&owner) => {
                crate::parse::set6(&mut adapter.mac, &owner.mac);
                (via, via_slot, moved) = (owner_ix, owner.slot, true);
            }
            _ => return Err(PASSED_NOT_FOR_US),
        }
    }
    if adapter.state != vip_common::ADAPTER_UP {
        return Err(PASSED_ADAPTER_DOWN);
    }
    let allowed = allowed(&vip);
    if (adapter.slot as u32) >= MAX_ADAPTERS || allowed & (1u64 << adapter.slot) == 0 {
        return Err(PASSED_ADAPTER_NOT_ALLOWED);
    }
    Ok(Hit { adapter, vip, allowed, via, via_slot, moved })
}

/// The adapters a VIP's policy allows (none for a policy out of range).
#[inline(always)]
pub fn allowed(vip: &VipInfo) -> u64 {
    POLICIES.get(vip.policy).map_or(0, |p| p.allowed)
}

#[inline(always)]
pub fn count_egress(decision: u32) {
    if let Some(c) = EGRESS.get_ptr_mut(decision) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_traffic(slot: u8, bytes: u64, tx: bool) {
    if let Some(t) = TRAFFIC.get_ptr_mut(slot as u32) {
        let t = unsafe { &mut *t };
        if tx {
            t.tx_packets += 1;
            t.tx_bytes += bytes;
        } else {
            t.rx_packets += 1;
            t.rx_bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn adapter(ifindex: u32) -> Option<AdapterInfo> {
    ADAPTERS.get(ifindex).copied()
}

/// The failed adapter that owns MAC `dst` and whose heir is `ifindex`, if any: frames
/// sent to it may be taken here.
#[inline(always)]
pub fn inherited(ifindex: u32, dst: &[u8; 6]) -> Option<(u32, AdapterInfo)> {
    let owner = *unsafe { MACS.get(&vip_common::mac_key(dst)) }?;
    let a = adapter(owner)?;
    if a.state == ADAPTER_DOWN && a.heir == ifindex && a.heir != 0 {
        Some((owner, a))
    } else {
        None
    }
}

#[inline(always)]
pub fn mac_moved(a: &AdapterInfo) -> bool {
    a.flags & ADAPTER_MAC_MOVED != 0
}

/// Where a VIP's frame to a client in the table leaves: the client's adapter while it is
/// up, else (its MAC moved) its heir; with the MAC to send from and the slot to count.
/// `moved` says which. None: the client's adapter is down with no MAC move. Through the
/// heir a frame leaves from the heir's own MAC: frames from the moved MAC on the heir's
/// port would keep teaching the switch that port, racing the adapter's own frames when it
/// returns (the agent keeps the switch's entry for the moved MAC fresh with learning
/// frames instead, and clients do not look at the source MAC of IP traffic).
pub struct ReplyPath {
    pub out: u32,
    pub mac: [u8; 6],
    pub slot: u8,
    pub moved: bool,
}

#[inline(always)]
pub fn reply_path(flow: &vip_common::FlowInfo) -> Option<ReplyPath> {
    let target = adapter(flow.ifindex)?;
    if target.state == vip_common::ADAPTER_UP {
        return Some(ReplyPath { out: flow.ifindex, mac: target.mac, slot: target.slot, moved: false });
    }
    if target.state == ADAPTER_DOWN && target.heir != 0 && mac_moved(&target) {
        let heir = adapter(target.heir)?;
        if heir.state == vip_common::ADAPTER_UP {
            return Some(ReplyPath { out: target.heir, mac: heir.mac, slot: heir.slot, moved: true });
        }
    }
    None
}
