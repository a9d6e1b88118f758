//! Steering on the way in: which adapter answers a spread-mode client, the client table
//! (learned from requests answered and from VIP traffic), MACs of failed adapters taken
//! over by their heir, and stragglers.

use aya_ebpf::programs::XdpContext;
use vip_common::{
    client_bucket, decision, vserver_index, FlowInfo, FlowKey, Straggler, VipInfo, VipKey, ADAPTER_UP, BUCKET_WORDS,
    MAX_ADAPTERS, NO_SLOT, VIP_SPREAD, VIP_VSERVER,
};

use crate::{
    maps::{self, BUCKETS, EVENTS, FLOWS, VIPS},
    parse::{eq6, ptr_at, set6, EthHdr, Ipv4Hdr},
};

/// At most one straggler event per client this often (the agent limits corrections further).
const EVENT_GAP_NS: u64 = 20_000_000;

#[inline(always)]
pub fn flow_key(vip: &VipKey, client: [u32; 4]) -> FlowKey {
    FlowKey { vip: vip.addr, client, vlan: vip.vlan, family: vip.family, _pad: 0 }
}

/// Spread mode: the slot of the adapter that answers this client. A client already in the
/// table stays where it is while that adapter is up and allowed; a new one goes by its
/// bucket, which the agent fills by weight and moves by load.
#[inline(never)]
pub fn spread_owner(vip: &VipInfo, allowed: u64, fk: &FlowKey) -> u8 {
    if let Some(f) = unsafe { FLOWS.get(fk) } {
        if let Some(a) = maps::adapter(f.ifindex) {
            if a.state == ADAPTER_UP
                && a.slot == f.slot
                && (a.slot as u32) < MAX_ADAPTERS
                && allowed & (1u64 << a.slot) != 0
            {
                return a.slot;
            }
        }
    }
    let b = client_bucket(&fk.client);
    match BUCKETS.get(vip.policy * BUCKET_WORDS + b / 8) {
        Some(w) => w[(b & 7) as usize],
        None => NO_SLOT,
    }
}

/// A request, as [`answerer`] needs it (one pointer argument: BPF calls take five).
pub struct Question {
    pub key: VipKey,
    pub client: [u32; 4],
    pub ifindex: u32,
    pub dst: [u8; 6],
    pub requester: [u8; 6],
    /// An ARP probe or DAD solicitation: answered, but the client is not entered in the
    /// table (it has no address yet).
    pub probe: bool,
}

/// Who answers: the MAC to answer from, and what the answer counter needs.
pub struct Answerer {
    pub mac: [u8; 6],
    pub slot: u8,
    pub vip_id: u32,
}

/// Whether the adapter answers the request: the map checks, then spread mode's one-adapter-per-client rule. A spread
/// client answered is entered in the client table (`learn`: not for probes). Its own BPF
/// function, keeping the callers' stacks small.
#[inline(never)]
pub fn answerer(q: &Question) -> Result<Answerer, u32> {
    let hit = maps::lookup(q.ifindex, &q.dst, &q.key)?;
    let fk = flow_key(&q.key, q.client);
    if hit.vip.flags & VIP_SPREAD != 0 && !hit.moved && spread_owner(&hit.vip, hit.allowed, &fk) != hit.adapter.slot {
        return Err(decision::PASSED_SPREAD_OTHER);
    }
    // A client is entered in the table only from a request answered here: a frame of any
    // other kind could carry a forged source address (ARP requests are what switch ARP
    // inspection checks). In spread mode this adapter is the one it will use; in the other
    // modes its traffic then tells which one it does.
    if !q.probe {
        learn_answered(&fk, hit.via, hit.via_slot, &q.requester);
    }
    Ok(Answerer { mac: hit.adapter.mac, slot: hit.adapter.slot, vip_id: hit.vip.id })
}

/// How long a client answered on one CPU is taken as known there: requests again within
/// it, from the same MAC on the same adapter, leave the client table alone. Short: what
/// another CPU, the client's traffic or the agent wrote since is not seen here, so the
/// table may lag that long (two ticks of the agent's clock). Clients ask seldom; this is
/// for floods of requests.
const RECENT_NS: u64 = 2 * vip_common::CLOCK_TICK_MS * 1_000_000;

/// A client answered: entered in the client table unless this CPU entered it, as it is
/// now, within `RECENT_NS` (a client asking again does not look up and rewrite the
/// table each time; one that moved is written at once).
/// Inlined: one more BPF call level would put the NS path past the stack limit.
#[inline(always)]
pub fn learn_answered(fk: &FlowKey, ifindex: u32, slot: u8, mac: &[u8; 6]) {
    let now = maps::now_ns();
    let Some(r) = maps::RECENT.get_ptr_mut(maps::recent_index(fk)) else {
        return learn(fk, ifindex, slot, mac, 0);
    };
    let r = unsafe { &mut *r };
    if maps::same_flow(&r.flow, fk) && r.ifindex == ifindex && eq6(&r.mac, mac) && now.wrapping_sub(r.at_ns) < RECENT_NS {
        return;
    }
    learn(fk, ifindex, slot, mac, 0);
    r.flow = *fk;
    r.ifindex = ifindex;
    set6(&mut r.mac, mac);
    r.at_ns = now;
}

/// Records that `client` uses adapter `ifindex` (slot `slot`) for the VIP.
// Its own BPF function: the stack of each path stays within the 512-byte limit.
#[inline(never)]
pub fn learn(fk: &FlowKey, ifindex: u32, slot: u8, mac: &[u8; 6], bytes: u64) {
    let now = maps::now_ns();
    if let Some(f) = FLOWS.get_ptr_mut(fk) {
        let f = unsafe { &mut *f };
        f.ifindex = ifindex;
        f.slot = slot;
        set6(&mut f.mac, mac);
        f.seen_ns = now;
        if bytes != 0 {
            f.packets += 1;
            f.bytes += bytes;
        }
        return;
    }
    let mut f = FlowInfo {
        ifindex,
        slot,
        _pad: 0,
        mac: [0; 6],
        _pad2: [0; 4],
        seen_ns: now,
        packets: (bytes != 0) as u64,
        bytes,
        event_ns: 0,
    };
    set6(&mut f.mac, mac);
    let _ = FLOWS.insert(fk, &f, 0);
}

/// VIP traffic from a client in the table: which adapter it uses now, and its counters.
/// Only from the MAC it was entered with (from an answered request): a frame with a
/// forged source address changes nothing, so it cannot redirect anyone's replies.
// Its own BPF function: the stack of each path stays within the 512-byte limit.
#[inline(never)]
pub fn refresh(fk: &FlowKey, ifindex: u32, slot: u8, mac: &[u8; 6], bytes: u64) -> bool {
    let Some(f) = FLOWS.get_ptr_mut(fk) else { return false };
    let f = unsafe { &mut *f };
    if !eq6(&f.mac, mac) {
        return false;
    }
    f.ifindex = ifindex;
    f.slot = slot;
    f.seen_ns = maps::now_ns();
    f.packets += 1;
    f.bytes += bytes;
    true
}

/// Whether the kernel's own neighbour table agrees that traffic from `client` to `vip`
/// comes from `mac`: the next hop it would send a reply to (the client itself, or its
/// router) has that MAC. A forged source address fails this (unless the MAC is forged too).
/// Not resolved yet (the kernel has not replied once): no.
// Its own BPF function: the lookup's parameters are 64 bytes of stack.
#[inline(never)]
pub fn kernel_agrees(ctx: &XdpContext, vip: &VipKey, client: &[u32; 4], mac: &[u8; 6], ifindex: u32) -> bool {
    use aya_ebpf::bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS};
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.ifindex = ifindex;
    if vip.family == vip_common::FAMILY_IPV4 {
        p.family = 2; // AF_INET
        p.__bindgen_anon_3.ipv4_src = vip.addr[0];
        p.__bindgen_anon_4.ipv4_dst = client[0];
    } else {
        p.family = 10; // AF_INET6
        p.__bindgen_anon_3.ipv6_src = vip.addr;
        p.__bindgen_anon_4.ipv6_dst = *client;
    }
    // An output lookup through the arrival adapter (an input lookup would need forwarding
    // on): it vouches when the kernel replies through the adapter the client uses.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            aya_ebpf::EbpfContext::as_ptr(ctx),
            &mut p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            aya_ebpf::bindings::BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && eq6(&p.dmac, mac)
}

/// A straggler reached the failed adapter's heir: tell the agent (at most once per
/// EVENT_GAP_NS per client). Only for a client in the table, from its own MAC.
// Its own BPF function: the stack of each path stays within the 512-byte limit.
#[inline(never)]
fn straggler(fk: &FlowKey, ifindex: u32, client_mac: &[u8; 6], to_mac: &[u8; 6]) {
    // The precise clock: events are spaced by 20 ms, a few ticks.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let Some(f) = FLOWS.get_ptr_mut(fk) else { return };
    let f = unsafe { &mut *f };
    if !eq6(&f.mac, client_mac) || now.wrapping_sub(f.event_ns) < EVENT_GAP_NS {
        return;
    }
    f.event_ns = now;
    if let Some(mut e) = EVENTS.reserve::<Straggler>(0) {
        let s = Straggler { flow: *fk, ifindex, client_mac: *client_mac, to_mac: *to_mac };
        e.write(s);
        e.submit(0);
    }
}

/// IPv4 traffic: learn the client if it is for a VIP.
// Its own BPF function: the stack of each path stays within the 512-byte limit.
#[inline(never)]
pub fn ipv4(ctx: &XdpContext, off: usize, vlan: u16) -> Result<u32, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(decision::PASSED_NOT_NEIGHBOR);
    }
    let vip = VipKey::v4(ip.dst_addr, vlan);
    let client = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
    traffic(ctx, &vip, client)
}

/// IPv6 traffic other than a Neighbor Solicitation: learn the client if it is for a VIP.
// Its own BPF function: the stack of each path stays within the 512-byte limit.
#[inline(never)]
pub fn ipv6(ctx: &XdpContext, vip: VipKey, client: [u32; 4]) -> Result<u32, u32> {
    traffic(ctx, &vip, client)
}

/// Traffic to `vip` from `client`. Frames to this adapter are learned; frames to a failed
/// adapter whose heir this is are accepted (the destination rewritten to this adapter so
/// the kernel takes them): as the moved MAC, or as stragglers the agent must correct.
#[inline(always)]
fn traffic(ctx: &XdpContext, vip: &VipKey, client: [u32; 4]) -> Result<u32, u32> {
    // (The entry point, for IPv4, and `ndp::traffic`, for IPv6, read the filter bit.)
    let flags = match unsafe { VIPS.get(vip) } {
        Some(v) => v.flags,
        None => return Err(decision::PASSED_NOT_NEIGHBOR),
    };
    if maps::fenced(flags) {
        return Err(decision::DROPPED_FENCED);
    }
    // A virtual server's VIP, once accepted below, goes to the virtual server.
    let deliver = |d: u32| -> Result<u32, u32> {
        if flags & VIP_VSERVER != 0 {
            crate::vserver::to_vserver(ctx, vserver_index(flags))
        } else {
            Err(d)
        }
    };
    let ifindex = ctx.ingress_ifindex() as u32;
    let adapter = match maps::adapter(ifindex) {
        Some(a) if a.state != vip_common::ADAPTER_UNKNOWN => a,
        _ => return Err(decision::PASSED_ADAPTER_UNKNOWN),
    };
    if adapter.state != ADAPTER_UP {
        return Err(decision::PASSED_ADAPTER_DOWN);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let eth = unsafe { &mut *eth };
    let len = (ctx.data_end() - ctx.data()) as u64;
    let fk = flow_key(vip, client);
    if eq6(&eth.dst_addr, &adapter.mac) {
        let src = eth.src_addr;
        // A known client refreshes its entry; another is entered only if the kernel's
        // neighbour table vouches for its MAC.
        if !refresh(&fk, ifindex, adapter.slot, &src, len) && (maps::learn_any_traffic() || kernel_agrees(ctx, vip, &client, &src, ifindex)) {
            learn(&fk, ifindex, adapter.slot, &src, len);
        }
        maps::count_traffic(adapter.slot, len, false);
        return deliver(decision::PASSED_VIP_TRAFFIC);
    }
    if eth.dst_addr[0] & 1 != 0 {
        return Err(decision::PASSED_NOT_FOR_US);
    }
    let Some((owner_ix, owner)) = maps::inherited(ifindex, &eth.dst_addr) else {
        return Err(decision::PASSED_NOT_FOR_US);
    };
    let to = eth.dst_addr;
    set6(&mut eth.dst_addr, &adapter.mac);
    maps::count_traffic(adapter.slot, len, false);
    if maps::mac_moved(&owner) {
        // The client still uses the failed adapter's MAC, and may: its replies go out
        // from that MAC too (see the egress program).
        let src = eth.src_addr;
        if !refresh(&fk, owner_ix, owner.slot, &src, len) && (maps::learn_any_traffic() || kernel_agrees(ctx, vip, &client, &src, ifindex)) {
            learn(&fk, owner_ix, owner.slot, &src, len);
        }
        return deliver(decision::ACCEPTED_MOVED_MAC);
    }
    let src = eth.src_addr;
    if FLOWS.get_ptr_mut(&fk).is_none() && (maps::learn_any_traffic() || kernel_agrees(ctx, vip, &client, &src, ifindex)) {
        learn(&fk, ifindex, adapter.slot, &src, 0);
    }
    straggler(&fk, ifindex, &src, &to);
    deliver(decision::ACCEPTED_STRAGGLER)
}
