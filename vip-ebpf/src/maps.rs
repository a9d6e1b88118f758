//! The maps the agent fills (VIPS, ADAPTERS) and the counters it reads.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use vip_common::{answer_index, AdapterInfo, VipInfo, VipKey, ANSWERS_LEN, MAX_ADAPTERS, MAX_VIPS};

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

#[map(name = "ADAPTERS")]
pub static ADAPTERS: HashMap<u32, AdapterInfo> = HashMap::with_max_entries(MAX_ADAPTERS, 0);

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

/// The adapter this frame arrived on, and the VIP it asks for, if both are known and the
/// adapter may answer for it right now. `dst` is the frame's Ethernet destination.
#[inline(always)]
pub fn lookup(
    ifindex: u32,
    dst: &[u8; 6],
    key: &VipKey,
) -> Result<(AdapterInfo, VipInfo), u32> {
    use vip_common::decision::*;
    let adapter = match unsafe { ADAPTERS.get(ifindex) } {
        Some(a) => *a,
        None => return Err(PASSED_ADAPTER_UNKNOWN),
    };
    // Multicast and broadcast are for everyone; a unicast frame must be for this adapter.
    if dst[0] & 1 == 0 && *dst != adapter.mac {
        return Err(PASSED_NOT_FOR_US);
    }
    let vip = match unsafe { VIPS.get(key) } {
        Some(v) => *v,
        None => return Err(PASSED_NOT_VIP),
    };
    if adapter.state != vip_common::ADAPTER_UP {
        return Err(PASSED_ADAPTER_DOWN);
    }
    if (adapter.slot as u32) >= MAX_ADAPTERS || vip.allowed & (1u64 << adapter.slot) == 0 {
        return Err(PASSED_ADAPTER_NOT_ALLOWED);
    }
    Ok((adapter, vip))
}
