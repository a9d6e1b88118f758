//! Header layouts and the one bounds-checked accessor every packet read goes through.
//! Headers are byte arrays so no access depends on the frame's alignment.

use aya_ebpf::programs::XdpContext;
use vip_common::decision;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: [u8; 2],
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ethertype: [u8; 2],
}

/// Pointer to a `T` at `off`, or `PASSED_TRUNCATED` when the frame is too short.
/// Checked immediately before use, as the verifier requires.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(decision::PASSED_TRUNCATED);
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Broadcast, multicast (group bit) or all-zero: never a valid sender.
#[inline(always)]
pub fn bad_sender(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1 || (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]) == 0
}
