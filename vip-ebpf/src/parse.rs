//! Header layouts and the one bounds-checked accessor every packet read goes through.
//! The Ethernet, 802.1Q, ARP, IPv4 and IPv6 headers are network-types' (byte arrays, so
//! no access depends on the frame's alignment; the EtherType fields are raw big-endian
//! u16s); the ICMPv6 neighbor discovery messages are ours (see `ndp`).

use aya_ebpf::programs::XdpContext;
use vip_common::decision;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub use network_types::{arp::ArpHdr, eth::EthHdr, ip::{Ipv4Hdr, Ipv6Hdr}, vlan::VlanHdr};

// The offsets the parsers assume, checked where the types come from.
const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HLEN);
const _: () = assert!(core::mem::size_of::<VlanHdr>() == 4);
const _: () = assert!(core::mem::size_of::<ArpHdr>() == 28);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == 20);
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == 40);

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


// Array comparisons written as xor/or reductions: `==` on byte arrays becomes a call to an
// out-of-line, byte-at-a-time bcmp loop in BPF code.

#[inline(always)]
pub fn eq6(a: &[u8; 6], b: &[u8; 6]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])) == 0
}

#[inline(always)]
pub fn eq4(a: &[u8; 4], b: &[u8; 4]) -> bool {
    u32::from_ne_bytes(*a) == u32::from_ne_bytes(*b)
}

/// Byte-wise copy into the frame. A plain array assignment may become an out-of-line
/// memmove loop when LLVM cannot rule out overlap (map value into packet).
#[inline(always)]
pub fn set6(dst: &mut [u8; 6], src: &[u8; 6]) {
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
    dst[3] = src[3];
    dst[4] = src[4];
    dst[5] = src[5];
}

// Loads and stores of the frame's fields a word at a time. Headers sit at 2-byte offsets;
// LLVM splits a load it is told may be unaligned into byte loads (and a MAC copy into 12
// byte moves), while the BPF JIT and verifier take unaligned packet access on the
// machines vip runs on (x86-64, arm64), as C programs rely on. The caller has checked
// every byte against the frame's end.

// A MAC as a 48-bit number (`ld_mac`) puts the first byte lowest: the forms below and
// their callers' constants are for a little-endian target (bpfel, the one vip builds).
const _: () = assert!(cfg!(target_endian = "little"));

#[inline(always)]
pub unsafe fn ld16(p: *const u8) -> u16 {
    unsafe { (p as *const u16).read() }
}

#[inline(always)]
pub unsafe fn ld32(p: *const u8) -> u32 {
    unsafe { (p as *const u32).read() }
}

#[inline(always)]
pub unsafe fn ld64(p: *const u8) -> u64 {
    unsafe { (p as *const u64).read() }
}

#[inline(always)]
pub unsafe fn st16(p: *mut u8, v: u16) {
    unsafe { (p as *mut u16).write(v) }
}

#[inline(always)]
pub unsafe fn st32(p: *mut u8, v: u32) {
    unsafe { (p as *mut u32).write(v) }
}

/// A MAC at `p` as a native-order 48-bit number (two loads).
#[inline(always)]
pub unsafe fn ld_mac(p: *const u8) -> u64 {
    unsafe { ld32(p) as u64 | (ld16(p.add(4)) as u64) << 32 }
}

/// Stores a MAC [`ld_mac`] read.
#[inline(always)]
pub unsafe fn st_mac(p: *mut u8, m: u64) {
    unsafe {
        st32(p, m as u32);
        st16(p.add(4), (m >> 32) as u16);
    }
}

/// [`bad_sender`] of a MAC read by [`ld_mac`]: the group bit is the first byte's lowest.
#[inline(always)]
pub fn bad_sender_mac(m: u64) -> bool {
    m & 1 == 1 || m == 0
}

/// A MAC as [`ld_mac`] reads it, from bytes.
#[inline(always)]
pub fn mac_word(m: &[u8; 6]) -> u64 {
    unsafe { ld_mac(m.as_ptr()) }
}

/// Bytes from a MAC [`ld_mac`] read.
#[inline(always)]
pub fn mac_bytes(m: u64) -> [u8; 6] {
    let b = m.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}
