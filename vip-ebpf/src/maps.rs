//! The maps the agent fills (VIPS, ADAPTERS) and the counters it reads.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use vip_common::{answer_index, AdapterInfo, VipInfo, VipKey, ANSWERS_LEN, MAX_ADAPTERS, MAX_IFINDEX, MAX_VIPS};

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Memory-mapped (BPF_F_MMAPABLE): the agent marks an adapter down with one store to
/// shared memory, no syscall, the moment it learns of a failure.
#[map(name = "ADAPTERS")]
pub static ADAPTERS: Array<AdapterInfo> =
    Array::with_max_entries(MAX_IFINDEX, aya_ebpf::bindings::BPF_F_MMAPABLE as u32);

#[map(name = "DECISIONS")]
pub static DECISIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(vip_common::decision::COUNT, 0);

#[map(name = "ANSWERS")]
pub static ANSWERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ANSWERS_LEN, 0);

#[inline(always)]
pub fn count(decision: u32) {
    if let Some(c) = DECISIONS.get_ptr_mut(decision) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_answer(vip: &VipInfo, adapter: &AdapterInfo) {
    if let Some(c) = ANSWERS.get_ptr_mut(answer_index(vip.id, adapter.slot)) {
        unsafe { *c += 1 };
    }
}

/// The VIP a frame asks for and the adapter it arrived on, if the adapter may answer for
/// it right now. `dst` is the frame's Ethernet destination. The VIP is looked up first so
/// that the common miss (a request for some other host) costs one lookup.
#[inline(always)]
pub fn lookup(
    ifindex: u32,
    dst: &[u8; 6],
    key: &VipKey,
) -> Result<(AdapterInfo, VipInfo), u32> {
    use vip_common::decision::*;
    let vip = match unsafe { VIPS.get(key) } {
        Some(v) => *v,
        None => return Err(PASSED_NOT_VIP),
    };
    let adapter = match ADAPTERS.get(ifindex) {
        Some(a) if a.state != vip_common::ADAPTER_UNKNOWN => *a,
        _ => return Err(PASSED_ADAPTER_UNKNOWN),
    };
    // Multicast and broadcast are for everyone; a unicast frame must be for this adapter.
    if dst[0] & 1 == 0 && !crate::parse::eq6(dst, &adapter.mac) {
        return Err(PASSED_NOT_FOR_US);
    }
    if adapter.state != vip_common::ADAPTER_UP {
        return Err(PASSED_ADAPTER_DOWN);
    }
    if (adapter.slot as u32) >= MAX_ADAPTERS || vip.allowed & (1u64 << adapter.slot) == 0 {
        return Err(PASSED_ADAPTER_NOT_ALLOWED);
    }
    Ok((adapter, vip))
}
