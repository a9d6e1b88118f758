//! The data plane's own log records (aya-log), read by the agent into its log when
//! `[agent] ebpf_log` asks for them. Written from the frame as it leaves (an answer is
//! already rewritten), at the entry point: no deep call chain carries the log's stack.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::{debug, trace};
use vip_common::decision;

use crate::parse::{ptr_at, EthHdr, ETH_HLEN, ETH_P_8021Q};

/// The ARP body of a reply: who is at which MAC, to whom.
#[repr(C)]
struct ArpReply {
    _fixed: [u8; 8],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// An IPv6 header and the Neighbor Advertisement with its target link-layer option.
#[repr(C)]
struct NaReply {
    _vtf: [u8; 8],
    src: [u8; 16],
    dst: [u8; 16],
    _icmp: [u8; 8],
    target: [u8; 16],
    _opt: [u8; 2],
    mac: [u8; 6],
}

/// One record for the decision just made: debug for answers, stragglers and fenced
/// frames, trace for every other frame.
#[inline(never)]
pub fn decision(ctx: &XdpContext, d: u32) {
    let _ = try_decision(ctx, d);
}

#[inline(always)]
fn try_decision(ctx: &XdpContext, d: u32) -> Result<(), u32> {
    let ifindex = ctx.ingress_ifindex();
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let eth = unsafe { &*eth };
    let off = if u16::from_be(eth.ether_type) == ETH_P_8021Q { ETH_HLEN + 4 } else { ETH_HLEN };
    match d {
        decision::ANSWERED_ARP | decision::ANSWERED_ARP_PROBE => {
            let a: *const ArpReply = ptr_at(ctx, off)?;
            let a = unsafe { &*a };
            debug!(ctx, "if {}: ARP {:i} is at {:mac}, told {:i} ({:mac})", ifindex, a.spa, a.sha, a.tpa, a.tha);
        }
        decision::ANSWERED_NS | decision::ANSWERED_DAD => {
            let n: *const NaReply = ptr_at(ctx, off)?;
            let n = unsafe { &*n };
            debug!(ctx, "if {}: NA {:i} is at {:mac}, told {:i} ({:mac})", ifindex, n.target, n.mac, n.dst, eth.dst_addr);
        }
        decision::ACCEPTED_STRAGGLER => {
            debug!(ctx, "if {}: straggler from {:mac} to a failed adapter's MAC accepted", ifindex, eth.src_addr);
        }
        decision::DROPPED_FENCED => {
            debug!(ctx, "if {}: frame from {:mac} to a fenced cluster VIP dropped", ifindex, eth.src_addr);
        }
        _ => trace!(ctx, "if {}: decision {} for a frame from {:mac}", ifindex, d, eth.src_addr),
    }
    Ok(())
}
