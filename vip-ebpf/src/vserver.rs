//! Virtual servers (seed 004): a VIP that belongs to a virtual server is delivered to the
//! interface leading to it (a veth into its namespace, say) through the `VSERVERS` device
//! map, its MACs rewritten, so the address is the virtual server's alone. On that
//! interface, the virtual server's ARP requests are answered with the interface's MAC (it
//! is the virtual server's gateway to its clients) and its frames to a client in the client
//! table leave through the adapter that client uses.

use aya_ebpf::{helpers::bpf_redirect, programs::XdpContext};
use vip_common::{decision, vserver_index, VipKey, VIP_VSERVER};

use crate::{
    maps::{self, FLOWS, VSERVERS, VS_MACS},
    parse::{be16, eq4, ptr_at, set6, ArpHdr, EthHdr, Ipv4Hdr, ETH_HLEN, ETH_P_ARP, ETH_P_IP},
    steer::flow_key,
};

const XDP_REDIRECT: i64 = 4;

/// The frame (IPv4 to one of virtual server `idx`'s VIPs, already accepted by an adapter)
/// goes to the virtual server.
#[inline(never)]
pub fn to_vserver(ctx: &XdpContext, idx: u32) -> Result<u32, u32> {
    let vs_mac = match VS_MACS.get(idx) {
        Some(m) if m[6] == 1 => [m[0], m[1], m[2], m[3], m[4], m[5]],
        _ => return Err(decision::PASSED_VSERVER_UNDELIVERED),
    };
    let Some(ifindex) = VSERVERS.get_ifindex(idx) else { return Err(decision::PASSED_VSERVER_UNDELIVERED) };
    let Some(iface) = maps::adapter(ifindex) else { return Err(decision::PASSED_VSERVER_UNDELIVERED) };
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let eth = unsafe { &mut *eth };
    set6(&mut eth.dst_addr, &vs_mac);
    set6(&mut eth.src_addr, &iface.mac);
    match VSERVERS.redirect(idx, 0) {
        Ok(_) => Ok(decision::REDIRECTED_TO_VSERVER),
        Err(_) => Err(decision::PASSED_VSERVER_UNDELIVERED),
    }
}

/// Whether `key` is one of virtual server `idx`'s VIPs.
#[inline(always)]
fn owns(idx: u32, key: &VipKey) -> bool {
    let Some(bit) = maps::maybe_vip(key) else { return false };
    match maps::vip(key, bit) {
        Some(v) => v.flags & VIP_VSERVER != 0 && vserver_index(v.flags) == idx,
        None => false,
    }
}

#[inline(always)]
fn learn_mac(idx: u32, mac: &[u8; 6]) {
    if let Some(m) = VS_MACS.get_ptr_mut(idx) {
        let m = unsafe { &mut *m };
        if m[6] != 1 || m[0..6] != mac[..] {
            *m = [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 1, 0];
        }
    }
}

/// A frame arriving from virtual server `slot` (the interface's `ADAPTERS` entry).
#[inline(never)]
pub fn from_vserver(ctx: &XdpContext, ethertype: u16) -> Result<u32, u32> {
    let Some(iface) = maps::adapter(ctx.ingress_ifindex() as u32) else { return Err(decision::PASSED_ADAPTER_UNKNOWN) };
    let idx = iface.slot as u32;
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let eth = unsafe { &mut *eth };
    match ethertype {
        ETH_P_ARP => {
            let arp: *mut ArpHdr = ptr_at(ctx, ETH_HLEN)?;
            let arp = unsafe { &mut *arp };
            if be16(arp.htype) != 1 || be16(arp.ptype) != ETH_P_IP || arp.hlen != 6 || arp.plen != 4 {
                return Err(decision::PASSED_ARP_NOT_ETHER_IPV4);
            }
            if !owns(idx, &VipKey::v4(arp.spa, 0)) {
                return Err(decision::PASSED_NOT_VIP);
            }
            learn_mac(idx, &eth.src_addr);
            if be16(arp.oper) != 1 {
                return Err(decision::PASSED_ARP_NOT_REQUEST);
            }
            if eq4(&arp.spa, &arp.tpa) || eq4(&arp.tpa, &[0; 4]) {
                return Err(decision::PASSED_ARP_GRATUITOUS);
            }
            // Whoever it asks for, this interface is the way there.
            crate::arp::into_reply(eth, arp, &iface.mac);
            Ok(decision::ANSWERED_VSERVER_ARP)
        }
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
            let ip = unsafe { &*ip };
            let key = VipKey::v4(ip.src_addr, 0);
            if !owns(idx, &key) {
                return Err(decision::PASSED_NOT_NEIGHBOR);
            }
            learn_mac(idx, &eth.src_addr);
            let fk = flow_key(&key, [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0]);
            let Some(flow) = (unsafe { FLOWS.get(&fk) }) else { return Err(decision::PASSED_VSERVER_UNDELIVERED) };
            let Some(p) = maps::reply_path(flow) else { return Err(decision::PASSED_VSERVER_UNDELIVERED) };
            let (out, mac, slot) = (p.out, p.mac, p.slot);
            let client_mac = flow.mac;
            let len = (ctx.data_end() - ctx.data()) as u64;
            set6(&mut eth.src_addr, &mac);
            set6(&mut eth.dst_addr, &client_mac);
            maps::count_traffic(slot, len, true);
            if unsafe { bpf_redirect(out, 0) } != XDP_REDIRECT {
                return Err(decision::PASSED_VSERVER_UNDELIVERED);
            }
            Ok(decision::REDIRECTED_FROM_VSERVER)
        }
        _ => Err(decision::PASSED_NOT_NEIGHBOR),
    }
}
