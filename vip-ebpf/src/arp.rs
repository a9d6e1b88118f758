//! ARP: a request for a VIP becomes a reply from the adapter's own MAC, sent back (XDP_TX).

use aya_ebpf::programs::XdpContext;
use vip_common::{decision, VipKey};

use crate::{
    maps, steer,
    parse::{bad_sender, be16, eq4, ptr_at, set6, ArpHdr, EthHdr},
};

const ARPHRD_ETHER: u16 = 1;
const ETH_P_IP: u16 = 0x0800;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

/// Rewrites a request in place into the reply "target is at `mac`", sent to the
/// requester's hardware address as the kernel does (RFC 826).
#[inline(always)]
pub fn into_reply(eth: &mut EthHdr, arp: &mut ArpHdr, mac: &[u8; 6]) {
    let (requester, requester_ip, target_ip) = (arp.sha, arp.spa, arp.tpa);
    set6(&mut eth.dst_addr, &requester);
    set6(&mut eth.src_addr, mac);
    arp.oper = ARPOP_REPLY.to_be_bytes();
    set6(&mut arp.tha, &requester);
    arp.tpa = requester_ip;
    set6(&mut arp.sha, mac);
    arp.spa = target_ip;
}

// Its own BPF function: the stack of each path stays within the 512-byte limit.
#[inline(never)]
pub fn answer(ctx: &XdpContext, off: usize, vlan: u16) -> Result<u32, u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let arp: *mut ArpHdr = ptr_at(ctx, off)?;
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };

    if be16(arp.htype) != ARPHRD_ETHER || be16(arp.ptype) != ETH_P_IP || arp.hlen != 6 || arp.plen != 4
    {
        return Err(decision::PASSED_ARP_NOT_ETHER_IPV4);
    }
    if be16(arp.oper) != ARPOP_REQUEST {
        return Err(decision::PASSED_ARP_NOT_REQUEST);
    }
    if bad_sender(&eth.src_addr) || bad_sender(&arp.sha) {
        return Err(decision::PASSED_BAD_SENDER_MAC);
    }
    // A request whose sender and target IP are equal announces, it does not ask. A probe
    // (sender 0.0.0.0) asks whether the address is in use, and is answered.
    if eq4(&arp.spa, &arp.tpa) {
        return Err(decision::PASSED_ARP_GRATUITOUS);
    }
    // Most requests on a LAN are for other hosts: they leave here, before the question is
    // built and handed on.
    let key = VipKey::v4(arp.tpa, vlan);
    if !maps::maybe_vip(&key) {
        return Err(decision::PASSED_NOT_VIP);
    }
    let probe = eq4(&arp.spa, &[0; 4]);
    let a = steer::answerer(&steer::Question {
        key,
        client: [u32::from_ne_bytes(arp.spa), 0, 0, 0],
        ifindex: ctx.ingress_ifindex() as u32,
        dst: eth.dst_addr,
        requester: arp.sha,
        probe,
    })?;

    into_reply(eth, arp, &a.mac);

    maps::count_answer(a.vip_id, a.slot);
    Ok(if probe { decision::ANSWERED_ARP_PROBE } else { decision::ANSWERED_ARP })
}
