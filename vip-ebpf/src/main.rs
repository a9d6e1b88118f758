//! vip data plane. XDP: answers ARP requests and IPv6 Neighbor Solicitations for every
//! hosted virtual IP on every healthy adapter allowed to carry it, each adapter with its
//! own MAC (one adapter per client in spread mode); learns which adapter each client uses;
//! takes frames sent to a failed adapter's MAC on its heir. Everything else passes
//! untouched. Every frame bumps exactly one decision counter. TC egress: sends each
//! client's replies out of the adapter that client uses.
#![no_std]
#![no_main]
// BPF_ATOMIC add for the shared answer counters (`maps::count_answer`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod arp;
mod csum;
mod log;
mod maps;
mod ndp;
mod parse;
mod steer;
mod egress;
mod verdict;
mod vserver;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use vip_common::decision;

use crate::parse::{be16, ld32, ptr_at, EthHdr, Ipv4Hdr, VlanHdr, ETH_HLEN, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6};

/// Entry point: thin wrapper that turns the decision into an action and counts it.
#[xdp]
pub fn vip_xdp(ctx: XdpContext) -> u32 {
    match try_vip_xdp(&ctx) {
        Ok(d) => {
            maps::count(d);
            // Off unless the agent loads the program with logging (`[agent] ebpf_log`):
            // the level is a constant the verifier knows, and it removes the call. At the
            // entry point, so the log's stack adds to no deep call chain.
            if aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Error) {
                log::decision(&ctx, d);
            }
            if decision::is_redirect(d) {
                XDP_REDIRECT
            } else {
                XDP_TX
            }
        }
        Err(passed) => {
            maps::count(passed);
            if aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Error) {
                log::decision(&ctx, passed);
            }
            if decision::is_drop(passed) {
                XDP_DROP
            } else {
                XDP_PASS
            }
        }
    }
}

/// Baseline for benchmarks and the program attached to veth peers (XDP_TX on veth is only
/// delivered when the peer has an XDP program).
#[xdp]
pub fn vip_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The veth benchmark's client: drops everything it receives. Answers are counted by the
/// interface's receive counter (a veth counts every frame its XDP program sees), so the
/// client's own processing of the replies no longer limits what is measured.
#[xdp]
pub fn vip_sink(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// The veth benchmark's no-work variant: every frame back out unchanged, so the benchmark
/// shows how much of an answer's cost on that adapter is XDP_TX itself.
#[xdp]
pub fn vip_bounce(_ctx: XdpContext) -> u32 {
    XDP_TX
}

/// `Ok(decision)` means the frame was rewritten into an answer; `Err(decision)` means pass
/// (or drop, for a fenced cluster VIP).
#[inline(always)]
fn try_vip_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut ethertype = u16::from_be(unsafe { (*eth).ether_type });
    let mut off = ETH_HLEN;
    let mut vlan = 0u16;
    if ethertype == ETH_P_8021Q {
        let tag: *const VlanHdr = ptr_at(ctx, ETH_HLEN)?;
        let vid = be16(unsafe { (*tag).tci }) & 0x0fff;
        ethertype = u16::from_be(unsafe { (*tag).ether_type });
        if ethertype != ETH_P_ARP && ethertype != ETH_P_IPV6 && ethertype != ETH_P_IP {
            return Err(decision::PASSED_NOT_NEIGHBOR);
        }
        // VID 0 is a priority tag and 4095 is reserved: neither names a VLAN we serve.
        if vid == 0 || vid == 0x0fff {
            return Err(decision::PASSED_VLAN_RESERVED);
        }
        vlan = vid;
        off += core::mem::size_of::<VlanHdr>();
    }
    let mut ipv4_bit = None;
    if ethertype == ETH_P_IP {
        // The common case, ordinary traffic to the host: neither its destination's nor
        // its source's filter bit is set (a virtual server's frames come from its VIPs),
        // and it leaves here without the adapter's entry, a call or a hash lookup.
        let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
        let (dst, src) = unsafe { (ld32((*ip).dst_addr.as_ptr()), ld32((*ip).src_addr.as_ptr())) };
        let key = vip_common::VipKey { addr: [dst, 0, 0, 0], vlan, family: vip_common::FAMILY_IPV4, _pad: 0 };
        ipv4_bit = maps::maybe_vip(&key);
        if ipv4_bit.is_none() {
            let from = vip_common::VipKey { addr: [src, 0, 0, 0], vlan: 0, family: vip_common::FAMILY_IPV4, _pad: 0 };
            if vlan != 0 || maps::maybe_vip(&from).is_none() {
                return Err(decision::PASSED_NOT_NEIGHBOR);
            }
        }
    }
    let adapter = maps::adapter_ref(ctx.ingress_ifindex() as u32);
    if vlan == 0 {
        if let Some(a) = adapter {
            if a.state == vip_common::ADAPTER_VSERVER {
                return vserver::from_vserver(ctx, ethertype);
            }
        }
    }
    match ethertype {
        ETH_P_ARP => verdict::unpack(arp::answer(ctx, off, vlan, adapter)),
        ETH_P_IPV6 => match ndp::answer(ctx, off, vlan) {
            Err(ndp::NOT_NS) => ndp::traffic(ctx, off, vlan),
            r => r,
        },
        ETH_P_IP => {
            // Traffic to a VIP: its own BPF function (the NS path's chain of calls starts
            // here too, and the stack limit counts them together).
            let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
            let (vihl, src, dst) = unsafe { ((*ip).vihl, ld32((*ip).src_addr.as_ptr()), ld32((*ip).dst_addr.as_ptr())) };
            let Some(bit) = ipv4_bit else { return Err(decision::PASSED_NOT_NEIGHBOR) };
            if vihl >> 4 != 4 {
                return Err(decision::PASSED_NOT_NEIGHBOR);
            }
            verdict::unpack(steer::ipv4(ctx, dst as u64 | (src as u64) << 32, (vlan as u64) << 32 | bit as u64, adapter))
        }
        _ => Err(decision::PASSED_NOT_NEIGHBOR),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
