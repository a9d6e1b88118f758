//! IPv6 neighbor discovery: a valid Neighbor Solicitation for a VIP becomes a Neighbor
//! Advertisement from the adapter's MAC (RFC 4861 §7.2.4), sent back (XDP_TX).

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext};
use vip_common::{decision, VipKey};

use crate::{
    csum, maps, steer,
    parse::{bad_sender_mac, be16, ld32, ld_mac, mac_bytes, ptr_at, st32, st_mac, EthHdr, Ipv6Hdr},
};

/// ICMPv6 Neighbor Solicitation without options, 24 bytes.
#[repr(C)]
pub struct NsHdr {
    pub typ: u8,
    pub code: u8,
    pub csum: [u8; 2],
    pub reserved: [u8; 4],
    pub target: [u8; 16],
}

/// ICMPv6 Neighbor Advertisement with one target link-layer address option, 32 bytes.
#[repr(C)]
pub struct NaMsg {
    pub typ: u8,
    pub code: u8,
    pub csum: [u8; 2],
    pub flags: [u8; 4],
    pub target: [u8; 16],
    pub opt_type: u8,
    pub opt_len: u8,
    pub mac: [u8; 6],
}

const IPV6_HLEN: usize = 40;
/// `validate`'s answer for IPv6 that is not a Neighbor Solicitation (not a decision).
pub const NOT_NS: u32 = u32::MAX;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
const NA_FLAG_SOLICITED: u8 = 0x40;
const NA_FLAG_OVERRIDE: u8 = 0x20;
const NS_LEN: usize = 24;
const NA_LEN: usize = 32;
const _: () = assert!(core::mem::size_of::<NaMsg>() == NA_LEN);
/// Options are walked in 8-byte units; NS carrying more than this many units are passed to
/// the kernel rather than answered (a bounded loop keeps the verifier's work small).
const MAX_OPT_UNITS: usize = 16;
/// ff02::1 as native-order words.
const ALL_NODES_WORDS: [u32; 4] = [u32::from_ne_bytes([0xff, 2, 0, 0]), 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// 33:33:00:00:00:01 as `parse::ld_mac` reads it.
const ALL_NODES_MAC_WORD: u64 = u64::from_ne_bytes([0x33, 0x33, 0, 0, 0, 1, 0, 0]);
/// ff02::1:ffXX:XXXX, the low 24 bits taken from the target.
/// ff02::1:ff00:0 as native-order words (the last one's low 24 bits come from the target).
const GROUP_W0: u32 = u32::from_ne_bytes([0xff, 2, 0, 0]);
const GROUP_W2: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const GROUP_W3: u32 = u32::from_ne_bytes([0xff, 0, 0, 0]);
/// The bytes of the last word that come from the target.
const GROUP_W3_TARGET: u32 = u32::from_ne_bytes([0, 0xff, 0xff, 0xff]);

/// The pseudo-header's sum, its addresses read from the frame's IPv6 header.
#[inline(always)]
fn pseudo_header_sum(ip: *const Ipv6Hdr, len: usize) -> u64 {
    // SAFETY: the caller checked the header against the frame's end.
    let (src, dst) = unsafe { (&raw const (*ip).src_addr, &raw const (*ip).dst_addr) };
    let mut sum = csum::add_frame_words(0, src);
    sum = csum::add_frame_words(sum, dst);
    sum = csum::add16(sum, [(len >> 8) as u8, len as u8]);
    csum::add16(sum, [0, IPPROTO_ICMPV6])
}

/// IPv6 other than a Neighbor Solicitation: traffic, learned when it is for a VIP.
/// Called by the entry point, not from [`answer`]: the stack of each chain of calls
/// counts against the 512-byte limit.
#[inline(never)]
pub fn traffic(ctx: &XdpContext, off: usize, vlan: u16) -> Result<u32, u32> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off)?;
    let ip = unsafe { &*ip };
    let vip = VipKey::v6(ip.dst_addr, vlan);
    let Some(bit) = maps::maybe_vip(&vip) else { return Err(decision::PASSED_IPV6_NOT_NS) };
    let client = VipKey::v6(ip.src_addr, 0).addr;
    match steer::traffic(ctx, maps::adapter_ref(ctx.ingress_ifindex() as u32), &vip, bit, client) {
        Err(decision::PASSED_NOT_NEIGHBOR) => Err(decision::PASSED_IPV6_NOT_NS),
        r => r,
    }
}

// Its own BPF function: the stack of each path stays within the 512-byte limit.
/// A Neighbor Solicitation answered by this adapter becomes a Neighbor Advertisement.
/// Three BPF functions, called one after another, so that the stack of each (validation
/// with its unrolled loops, the spread decision, the rewrite) counts alone against the
/// 512-byte limit. The question is filled in place by `validate` in the form the maps
/// use: converting addresses here would spill every byte.
#[inline(never)]
pub fn answer(ctx: &XdpContext, off: usize, vlan: u16) -> Result<u32, u32> {
    // Built by `validate` at its end, not zeroed first here: zeroing the arrays in place
    // compiles to calls to an out-of-line memset.
    let mut q = validate(ctx, off, vlan)?;
    // Solicitations for other hosts leave before their checksum is summed.
    let Some(bit) = maps::maybe_vip(&q.key) else { return Err(decision::PASSED_NOT_VIP) };
    q.bit = bit;
    checksum(ctx, off)?;
    let a = steer::answerer(ctx, maps::adapter_ref(ctx.ingress_ifindex() as u32), &q)?;
    reply(ctx, off, &q, &a)
}

/// The ICMPv6 checksum of a solicitation `validate` accepted (its payload length is
/// checked and within the frame).
#[inline(always)]
fn checksum(ctx: &XdpContext, off: usize) -> Result<(), u32> {
    // Volatile loads of the frame's bounds: otherwise LLVM passes them in as integers,
    // and the verifier refuses the arithmetic it then does on them.
    let (start, end) = unsafe {
        (core::ptr::read_volatile(&(*ctx.ctx).data) as usize, core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize)
    };
    let at = |o: usize, n: usize| if start + o + n > end { Err(decision::PASSED_TRUNCATED) } else { Ok(start + o) };
    let ip = at(off, IPV6_HLEN)? as *const Ipv6Hdr;
    let plen = be16(unsafe { (*ip).payload_len }) as usize;
    let icmp_off = off + IPV6_HLEN;
    let mut sum = pseudo_header_sum(ip, plen);
    for i in 0..(NS_LEN / 8 + MAX_OPT_UNITS) {
        if i * 8 >= plen {
            break;
        }
        let chunk = at(icmp_off + i * 8, 8)? as *const [u8; 8];
        sum = csum::add_frame_words(sum, chunk);
    }
    if csum::fold(sum) != 0xffff {
        return Err(decision::PASSED_NS_BAD_CHECKSUM);
    }
    Ok(())
}

/// RFC 4861 §7.1.1 validation; other IPv6 is traffic (see `steer`).
#[inline(always)]
fn validate(ctx: &XdpContext, off: usize, vlan: u16) -> Result<steer::Question, u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ip: *const Ipv6Hdr = ptr_at(ctx, off)?;
    let (eth, ip) = unsafe { (&*eth, &*ip) };
    if ip.vcf[0] >> 4 != 6 {
        return Err(decision::PASSED_IPV6_NOT_NS);
    }
    if ip.next_hdr != IPPROTO_ICMPV6 {
        return Err(NOT_NS);
    }
    let icmp_off = off + IPV6_HLEN;
    let typ: *const u8 = ptr_at(ctx, icmp_off)?;
    if unsafe { *typ } != ND_NEIGHBOR_SOLICIT {
        return Err(NOT_NS);
    }
    let ns: *const NsHdr = ptr_at(ctx, icmp_off)?;
    let ns = unsafe { &*ns };

    // RFC 4861 §7.1.1 validity checks.
    let plen = be16(ip.payload_len) as usize;
    if ip.hop_limit != 255
        || ns.code != 0
        || plen < NS_LEN
        || plen % 8 != 0
        || plen > NS_LEN + 8 * MAX_OPT_UNITS
        || ns.target[0] == 0xff
        || ip.src_addr[0] == 0xff
    {
        return Err(decision::PASSED_NS_INVALID);
    }
    if ctx.data() + icmp_off + plen > ctx.data_end() {
        return Err(decision::PASSED_TRUNCATED);
    }
    // The addresses as 32-bit words, one load each (as `VipKey` holds them).
    let ipp = ip as *const Ipv6Hdr as *const u8;
    let tp = ns.target.as_ptr();
    // SAFETY: the IPv6 header and the solicitation are within the frame.
    let (src, dst, target) = unsafe {
        (
            [ld32(ipp.add(8)), ld32(ipp.add(12)), ld32(ipp.add(16)), ld32(ipp.add(20))],
            [ld32(ipp.add(24)), ld32(ipp.add(28)), ld32(ipp.add(32)), ld32(ipp.add(36))],
            [ld32(tp), ld32(tp.add(4)), ld32(tp.add(8)), ld32(tp.add(12))],
        )
    };
    let dad = (src[0] | src[1] | src[2] | src[3]) == 0;
    // ff02::1:ffXX:XXXX, the low 24 bits the target's.
    let solicited_node = dst[0] == GROUP_W0 && dst[1] == 0 && dst[2] == GROUP_W2 && dst[3] == GROUP_W3 | (target[3] & GROUP_W3_TARGET);
    let to_target = ((dst[0] ^ target[0]) | (dst[1] ^ target[1]) | (dst[2] ^ target[2]) | (dst[3] ^ target[3])) == 0;
    // Sent to the target itself (unicast reachability check) or to its solicited-node
    // group; a DAD probe only ever to the group.
    if !(solicited_node || (!dad && to_target)) {
        return Err(decision::PASSED_NS_INVALID);
    }
    // SAFETY: the Ethernet header is within the frame.
    let (dst_mac, src_mac) = unsafe { (ld_mac(eth.dst_addr.as_ptr()), ld_mac(eth.src_addr.as_ptr())) };
    if bad_sender_mac(src_mac) {
        return Err(decision::PASSED_BAD_SENDER_MAC);
    }

    // The answer goes to the first source link-layer address option, as an ARP reply goes
    // to the sender hardware address; without one, to the frame's Ethernet source.
    let mut requester = src_mac;
    let mut have_sllao = false;
    let mut o = NS_LEN;
    for _ in 0..MAX_OPT_UNITS {
        if o >= plen {
            break;
        }
        let opt: *const [u8; 2] = ptr_at(ctx, icmp_off + o)?;
        let opt = unsafe { *opt };
        // A zero-length option would loop forever in a naive parser: RFC says discard.
        if opt[1] == 0 || (dad && opt[0] == ND_OPT_SOURCE_LL) {
            return Err(decision::PASSED_NS_INVALID);
        }
        if opt[0] == ND_OPT_SOURCE_LL && opt[1] == 1 && !have_sllao {
            let mac: *const [u8; 6] = ptr_at(ctx, icmp_off + o + 2)?;
            requester = unsafe { ld_mac(mac as *const u8) };
            have_sllao = true;
        }
        o += opt[1] as usize * 8;
    }
    if bad_sender_mac(requester) {
        return Err(decision::PASSED_BAD_SENDER_MAC);
    }
    if o != plen {
        return Err(decision::PASSED_NS_INVALID);
    }

    Ok(steer::Question {
        key: VipKey { addr: target, vlan, family: vip_common::FAMILY_IPV6, _pad: 0 },
        bit: 0,
        client: src,
        dst: dst_mac,
        requester,
        probe: dad,
    })
}

/// Rewrites the solicitation into the advertisement from `a`.
#[inline(always)]
fn reply(ctx: &XdpContext, off: usize, q: &steer::Question, a: &steer::Answerer) -> Result<u32, u32> {
    let (target, dad, requester) = (q.key.addr, q.probe, q.requester);
    let icmp_off = off + IPV6_HLEN;
    let (dst_mac, dst_ip, flags) = if dad {
        (ALL_NODES_MAC_WORD, ALL_NODES_WORDS, NA_FLAG_OVERRIDE)
    } else {
        (requester, q.client, NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE)
    };

    // Make the frame exactly as long as the advertisement: the solicitation may be
    // shorter (no options, as in DAD) or longer (several options, padding).
    let delta = (icmp_off + NA_LEN) as i64 - (ctx.data_end() - ctx.data()) as i64;
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return Err(decision::PASSED_NO_ROOM);
    }
    // Resizing invalidated every packet pointer: take them again.
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, off)?;
    let na: *mut NaMsg = ptr_at(ctx, icmp_off)?;
    let (eth, ip, na) = unsafe { (&mut *eth, &mut *ip, &mut *na) };

    unsafe {
        st_mac(eth.dst_addr.as_mut_ptr(), dst_mac);
        st_mac(eth.src_addr.as_mut_ptr(), a.mac);
    }
    ip.vcf = [0x60, 0, 0, 0];
    ip.payload_len = (NA_LEN as u16).to_be_bytes();
    ip.next_hdr = IPPROTO_ICMPV6;
    ip.hop_limit = 255;
    let ipp = ip as *mut Ipv6Hdr as *mut u8;
    // SAFETY: the advertisement's headers are within the frame (checked above).
    unsafe {
        for i in 0..4 {
            st32(ipp.add(8 + 4 * i), target[i]);
            st32(ipp.add(24 + 4 * i), dst_ip[i]);
            st32(na.target.as_mut_ptr().add(4 * i), target[i]);
        }
    }
    na.typ = ND_NEIGHBOR_ADVERT;
    na.code = 0;
    na.csum = [0, 0];
    na.flags = [flags, 0, 0, 0];
    na.opt_type = ND_OPT_TARGET_LL;
    na.opt_len = 1;
    unsafe { st_mac(na.mac.as_mut_ptr(), a.mac) };

    // From the values just written, not read back from the frame: the pseudo-header
    // (source = target, destination, length, next header) and the advertisement's eight
    // words, its checksum field zero, as native-order words of the frame's bytes.
    let m = mac_bytes(a.mac);
    let mut sum = 2 * (target[0] as u64 + target[1] as u64 + target[2] as u64 + target[3] as u64);
    sum += dst_ip[0] as u64 + dst_ip[1] as u64 + dst_ip[2] as u64 + dst_ip[3] as u64;
    sum += u32::from_ne_bytes([0, 0, 0, NA_LEN as u8]) as u64 + u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]) as u64;
    sum += u32::from_ne_bytes([ND_NEIGHBOR_ADVERT, 0, 0, 0]) as u64 + u32::from_ne_bytes([flags, 0, 0, 0]) as u64;
    sum += u32::from_ne_bytes([ND_OPT_TARGET_LL, 1, m[0], m[1]]) as u64 + u32::from_ne_bytes([m[2], m[3], m[4], m[5]]) as u64;
    na.csum = (!csum::fold(sum)).to_ne_bytes();

    maps::count_answer(a.vip_id, a.slot);
    Ok(if dad { decision::ANSWERED_DAD } else { decision::ANSWERED_NS })
}
