//! ARP: a request for a VIP becomes a reply from the adapter's own MAC, sent back (XDP_TX).

use aya_ebpf::programs::XdpContext;
use vip_common::{decision, AdapterInfo, VipKey};

use crate::{
    maps, steer,
    parse::{bad_sender_mac, ld32, ld64, ld_mac, set6, st16, st32, st_mac, ArpHdr, EthHdr},
};

/// The first eight bytes of an Ethernet/IPv4 ARP request as one native-order load:
/// htype 1, ptype 0x0800, hlen 6, plen 4, oper 1.
const ETHER_IPV4: u64 = u64::from_ne_bytes([0, 1, 8, 0, 6, 4, 0, 0]);
const OPER_REQUEST: u64 = u64::from_ne_bytes([0, 0, 0, 0, 0, 0, 0, 1]);
/// The bytes of that load before `oper`.
const HEAD: u64 = u64::from_ne_bytes([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
const OPER_REPLY: u16 = u16::from_ne_bytes([0, 2]);
// Offsets in the ARP header (RFC 826, Ethernet/IPv4).
const SHA: usize = 8;
const SPA: usize = 14;
const THA: usize = 18;
const TPA: usize = 24;
const ARP_LEN: usize = 28;
const _: () = assert!(core::mem::size_of::<ArpHdr>() == ARP_LEN);

/// Rewrites a request in place into the reply "target is at `mac`", sent to the
/// requester's hardware address as the kernel does (RFC 826). (The virtual-server path's
/// form, over the parsed headers.)
#[inline(always)]
pub fn into_reply(eth: &mut EthHdr, arp: &mut ArpHdr, mac: &[u8; 6]) {
    let (requester, requester_ip, target_ip) = (arp.sha, arp.spa, arp.tpa);
    set6(&mut eth.dst_addr, &requester);
    set6(&mut eth.src_addr, mac);
    arp.oper = 2u16.to_be_bytes();
    set6(&mut arp.tha, &requester);
    arp.tpa = requester_ip;
    set6(&mut arp.sha, mac);
    arp.spa = target_ip;
}

/// An ARP frame (its header at `off`): the whole answer is one straight run of code, the
/// rare branches out of line. Its own BPF function: the entry point's stack stays small
/// for the NS path's calls.
/// `adapter`: the arrival adapter's `ADAPTERS` entry, as the entry point read it.
#[inline(never)]
pub fn answer(ctx: &XdpContext, off: usize, vlan: u16, adapter: Option<&AdapterInfo>) -> u64 {
    crate::verdict::pack(try_answer(ctx, off, vlan, adapter))
}

#[inline(always)]
fn try_answer(ctx: &XdpContext, off: usize, vlan: u16, adapter: Option<&AdapterInfo>) -> Result<u32, u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + ARP_LEN > end {
        return Err(decision::PASSED_TRUNCATED);
    }
    let eth = start as *mut u8;
    let arp = (start + off) as *mut u8;
    // SAFETY: the Ethernet header and the 28-byte ARP header are within the frame.
    let (head, src, sha, spa, tpa) = unsafe { (ld64(arp), ld_mac(eth.add(6)), ld_mac(arp.add(SHA)), ld32(arp.add(SPA)), ld32(arp.add(TPA))) };
    if head & HEAD != ETHER_IPV4 {
        return Err(decision::PASSED_ARP_NOT_ETHER_IPV4);
    }
    if head & !HEAD != OPER_REQUEST {
        return Err(decision::PASSED_ARP_NOT_REQUEST);
    }
    if bad_sender_mac(src) || bad_sender_mac(sha) {
        return Err(decision::PASSED_BAD_SENDER_MAC);
    }
    // A request whose sender and target IP are equal announces, it does not ask. A probe
    // (sender 0.0.0.0) asks whether the address is in use, and is answered.
    if spa == tpa {
        return Err(decision::PASSED_ARP_GRATUITOUS);
    }
    // Most requests on a LAN are for other hosts: they leave here.
    let key = VipKey { addr: [tpa, 0, 0, 0], vlan, family: vip_common::FAMILY_IPV4, _pad: 0 };
    let Some(bit) = maps::maybe_vip(&key) else { return Err(decision::PASSED_NOT_VIP) };
    let probe = spa == 0;
    let q = steer::Question { key, bit, client: [spa, 0, 0, 0], dst: unsafe { ld_mac(eth) }, requester: sha, probe };
    let a = steer::answerer(ctx, adapter, &q)?;

    // SAFETY: as above.
    unsafe {
        st_mac(eth, sha);
        st_mac(eth.add(6), a.mac);
        st16(arp.add(6), OPER_REPLY);
        st_mac(arp.add(THA), sha);
        st32(arp.add(TPA), spa);
        st_mac(arp.add(SHA), a.mac);
        st32(arp.add(SPA), tpa);
    }
    maps::count_answer(a.vip_id, a.slot);
    Ok(if probe { decision::ANSWERED_ARP_PROBE } else { decision::ANSWERED_ARP })
}
