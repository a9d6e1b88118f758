//! TC egress on every adapter: a frame from a VIP to a client in the client table leaves
//! through the adapter that client uses, from that adapter's MAC (or, while that adapter
//! is down with its MAC moved, through its heir from the moved MAC). Linux routes every
//! reply out of one adapter; without this the spread over adapters is one-way only.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use vip_common::{egress as e, VipKey};

use crate::{
    maps::{self, FLOWS},
    parse::{set6, EthHdr, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
    steer::flow_key,
};

#[classifier]
pub fn vip_egress(ctx: TcContext) -> i32 {
    let (action, decision) = try_egress(&ctx);
    maps::count_egress(decision);
    action
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    if ctx.data() + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((ctx.data() + off) as *mut T)
}

/// (TC action, egress decision).
#[inline(always)]
fn try_egress(ctx: &TcContext) -> (i32, u32) {
    let pass = (TC_ACT_OK, e::NOT_VIP);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return pass };
    let (vip, client) = match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {
            let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) else { return pass };
            let ip = unsafe { &*ip };
            let src = [ip[12], ip[13], ip[14], ip[15]];
            let dst = [ip[16], ip[17], ip[18], ip[19]];
            (VipKey::v4(src, 0), [u32::from_ne_bytes(dst), 0, 0, 0])
        }
        ETH_P_IPV6 => {
            let Some(ip) = ptr_at::<crate::parse::Ipv6Hdr>(ctx, ETH_HLEN) else { return pass };
            let ip = unsafe { &*ip };
            (VipKey::v6(ip.src_addr, 0), VipKey::v6(ip.dst_addr, 0).addr)
        }
        _ => return pass,
    };
    let Some(bit) = maps::maybe_vip(&vip) else { return pass };
    match maps::vip(&vip, bit) {
        None => return pass,
        Some(v) if maps::fenced(v.flags) => return (TC_ACT_SHOT, e::DROPPED_FENCED),
        Some(_) => {}
    }
    let Some(flow) = (unsafe { FLOWS.get(&flow_key(&vip, client)) }) else {
        return (TC_ACT_OK, e::NO_FLOW);
    };
    let Some(p) = maps::reply_path(flow) else { return (TC_ACT_OK, e::ADAPTER_DOWN) };
    let (out, src_mac, slot) = (p.out, p.mac, p.slot);
    let decision = if p.moved { e::STEERED_MOVED_MAC } else { e::STEERED_SAME };
    let len = ctx.len() as u64;
    // Packet pointers are taken again: nothing above may have invalidated them, but the
    // verifier tracks them per access.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return pass };
    let eth = unsafe { &mut *eth };
    set6(&mut eth.src_addr, &src_mac);
    set6(&mut eth.dst_addr, &flow.mac);
    maps::count_traffic(slot, len, true);
    let here = unsafe { (*ctx.skb.skb).ifindex };
    if out == here {
        return (TC_ACT_OK, decision);
    }
    let r = unsafe { bpf_redirect(out, 0) } as i32;
    if r != TC_ACT_REDIRECT {
        return (TC_ACT_OK, e::ADAPTER_DOWN);
    }
    (TC_ACT_REDIRECT, if decision == e::STEERED_SAME { e::STEERED_REDIRECT } else { decision })
}

/// TC ingress on every adapter: a frame the XDP program took for this adapter (rewriting
/// its destination to this adapter's MAC: a moved MAC or a straggler) is marked for this
/// host. Drivers that build the socket buffer before running XDP (veth does) keep the
/// packet type from the original destination and the stack would drop it as another
/// host's.
#[classifier]
pub fn vip_ingress(ctx: TcContext) -> i32 {
    const PACKET_HOST: u32 = 0;
    const PACKET_OTHERHOST: u32 = 3;
    let skb = unsafe { &*ctx.skb.skb };
    if skb.pkt_type != PACKET_OTHERHOST {
        return TC_ACT_OK;
    }
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else { return TC_ACT_OK };
    if let Some(a) = maps::adapter(skb.ifindex) {
        if a.state != 0 && crate::parse::eq6(unsafe { &(*eth).dst_addr }, &a.mac) {
            let _ = ctx.change_type(PACKET_HOST);
        }
    }
    TC_ACT_OK
}

/// Baseline for the egress benchmark: passes everything.
#[classifier]
pub fn vip_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
