//! The maps the agent fills (VIPS, ADAPTERS) and the counters it reads.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use vip_common::{
    AdapterInfo, FlowInfo, FlowKey, MacKey, Policy, Recent, Traffic, VipBucket, VipInfo, VipKey, VipSlot, ADAPTER_DOWN,
    ADAPTER_MAC_MOVED, ANSWERS_LEN, BUCKETS_LEN, EVENTS_BYTES, MAX_ADAPTERS, MAX_IFINDEX, MAX_POLICIES, MAX_VIPS,
    RECENT_SLOTS, TABLE_BUCKETS, TABLE_OVERFLOW, TAG_KEY, TAG_SEQ_SHIFT,
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

/// The key's filter bit, if set: `Some` when `key` may be in VIPS, `None` when it is
/// certainly not.
#[inline(always)]
pub fn maybe_vip(key: &VipKey) -> Option<u32> {
    let b = vip_common::filter_bit(key);
    match VIP_FILTER.get(b >> 6) {
        Some(w) if *w & (1u64 << (b & 63)) == 0 => None,
        _ => Some(b),
    }
}

/// The VIPs in buckets by hash (`vip_common::VipBucket`), kept by the agent beside VIPS:
/// a VIP is found with one inlined array read and a compare. Memory-mapped: the agent
/// writes slots with plain stores under each slot's sequence count.
#[map(name = "VIP_TABLE")]
pub static VIP_TABLE: Array<VipBucket> = Array::with_max_entries(TABLE_BUCKETS, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

/// What a slot says of a key.
enum Slot {
    Is(VipInfo),
    /// Another key, or none.
    Not,
    /// Being written: ask VIPS.
    Unsure,
}

/// Reads slot `s` for `key`: the tag, the entry, the tag again, each a volatile load, so
/// they happen in this order (and x86 keeps loads in order); a tag that changed or is
/// odd means the agent was writing it.
#[inline(always)]
fn slot(s: *const VipSlot, key: &VipKey, want: u32) -> Slot {
    use core::ptr::read_volatile as rd;
    // SAFETY: `s` points into a bucket the array lookup returned.
    unsafe {
        let t = rd(&raw const (*s).tag);
        if t & TAG_KEY != want {
            return Slot::Not;
        }
        let a = [rd(&raw const (*s).addr[0]), rd(&raw const (*s).addr[1]), rd(&raw const (*s).addr[2]), rd(&raw const (*s).addr[3])];
        let (policy, id, flags) = (rd(&raw const (*s).policy), rd(&raw const (*s).id), rd(&raw const (*s).flags));
        let t2 = rd(&raw const (*s).tag);
        if t2 != t || (t >> TAG_SEQ_SHIFT) & 1 != 0 {
            return Slot::Unsure;
        }
        if (a[0] ^ key.addr[0]) | (a[1] ^ key.addr[1]) | (a[2] ^ key.addr[2]) | (a[3] ^ key.addr[3]) != 0 {
            return Slot::Not;
        }
        Slot::Is(VipInfo { policy, id, flags, _pad: 0 })
    }
}

/// The VIP `key` names (`bit`: its filter bit), or None. Its bucket's two slots first;
/// VIPS only when the bucket has overflowed or a slot was being written.
#[inline(always)]
pub fn vip(key: &VipKey, bit: u32) -> Option<VipInfo> {
    let Some(b) = VIP_TABLE.get_ptr(vip_common::table_bucket(bit)) else { return vip_slow(key) };
    let want = VipSlot::tag_of(key);
    // SAFETY: the array lookup returned a whole bucket.
    let (s0, s1) = unsafe { (&raw const (*b).slots[0], &raw const (*b).slots[1]) };
    let mut unsure = false;
    match slot(s0, key, want) {
        Slot::Is(v) => return Some(v),
        Slot::Unsure => unsure = true,
        Slot::Not => {}
    }
    match slot(s1, key, want) {
        Slot::Is(v) => return Some(v),
        Slot::Unsure => unsure = true,
        Slot::Not => {}
    }
    let overflow = unsafe { core::ptr::read_volatile(&raw const (*s0).tag) } & TABLE_OVERFLOW != 0;
    if unsure || overflow {
        return vip_slow(key);
    }
    None
}

/// VIPS itself: for the few VIPs whose bucket is full, and slots being written.
#[inline(never)]
fn vip_slow(key: &VipKey) -> Option<VipInfo> {
    unsafe { VIPS.get(key) }.copied()
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

/// Per CPU, the client table entries it wrote last (`crate::steer::seen`): one slot per
/// hash of the client table's key, with the frames counted since. Pinned with the table,
/// so the counts survive a hand-over.
#[map(name = "RECENT")]
pub static RECENT: PerCpuArray<Recent> = PerCpuArray::with_max_entries(RECENT_SLOTS, 0);

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

/// The agent's count of its own client table changes (`vip_common::FENCE_FLOWS_GEN`).
#[inline(always)]
pub fn flows_gen() -> u16 {
    FENCE.get(vip_common::FENCE_FLOWS_GEN).map_or(0, |g| *g as u16)
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

/// The adapter's entry in place (the agent may change it meanwhile: each field is read
/// once where it is used).
#[inline(always)]
pub fn adapter_ref(ifindex: u32) -> Option<&'static AdapterInfo> {
    ADAPTERS.get(ifindex)
}

/// The failed adapter whose MAC `dst` (as `parse::ld_mac` reads it) moved to its heir
/// `ifindex`, or 0: a unicast request to it is answered here, from that MAC.
#[inline(never)]
pub fn moved_here(ifindex: u32, dst: u64) -> u32 {
    let mac = crate::parse::mac_bytes(dst);
    match inherited(ifindex, &mac) {
        Some((owner_ix, owner)) if mac_moved(&owner) => owner_ix,
        _ => 0,
    }
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
