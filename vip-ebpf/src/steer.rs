//! Steering on the way in: which adapter answers a spread-mode client, the client table
//! (learned from requests answered and from VIP traffic), MACs of failed adapters taken
//! over by their heir, and stragglers.

use aya_ebpf::programs::XdpContext;
use vip_common::{
    client_bucket, decision, vserver_index, AdapterInfo, FlowInfo, FlowKey, Recent, Straggler, VipKey, ADAPTER_UP,
    BUCKET_WORDS, MAX_ADAPTERS, NO_SLOT, VIP_SPREAD, VIP_VSERVER,
};

use crate::{
    maps::{self, BUCKETS, EVENTS, FLOWS},
    parse::{eq6, ld_mac, mac_bytes, mac_word, ptr_at, set6, EthHdr, ETH_HLEN},
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
pub fn spread_owner(policy: u32, allowed: u64, fk: &FlowKey) -> u8 {
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
    match BUCKETS.get(policy * BUCKET_WORDS + b / 8) {
        Some(w) => w[(b & 7) as usize],
        None => NO_SLOT,
    }
}

/// A request, as [`answerer`] needs it. MACs as `parse::ld_mac` reads them.
pub struct Question {
    pub key: VipKey,
    /// The key's filter bit (`maps::maybe_vip`).
    pub bit: u32,
    pub client: [u32; 4],
    /// The frame's Ethernet destination.
    pub dst: u64,
    /// Where the answer goes.
    pub requester: u64,
    /// An ARP probe or DAD solicitation: answered, but the client is not entered in the
    /// table (it has no address yet).
    pub probe: bool,
}

/// Who answers: the MAC to answer from, and what the answer counter needs.
pub struct Answerer {
    pub mac: u64,
    pub slot: u8,
    pub vip_id: u32,
}

/// Whether the adapter a request arrived on (`adapter`, its `ADAPTERS` entry) answers it:
/// the map checks, then spread mode's one-adapter-per-client rule. A client answered is
/// entered in the client table (not for probes). Inlined into the ARP and NS paths.
#[inline(always)]
pub fn answerer(ctx: &XdpContext, adapter: Option<&AdapterInfo>, q: &Question) -> Result<Answerer, u32> {
    use decision::*;
    let vip = maps::vip(&q.key, q.bit).ok_or(PASSED_NOT_VIP)?;
    if maps::fenced(vip.flags) {
        return Err(DROPPED_FENCED);
    }
    let adapter = match adapter {
        Some(a) if a.state != vip_common::ADAPTER_UNKNOWN => a,
        _ => return Err(PASSED_ADAPTER_UNKNOWN),
    };
    let ifindex = ctx.ingress_ifindex() as u32;
    let (mut mac, mut via, mut via_slot, mut moved) = (mac_word(&adapter.mac), ifindex, adapter.slot, false);
    // Multicast and broadcast are for everyone; a unicast frame must be for this adapter
    // (or for a failed adapter whose MAC moved here).
    if q.dst & 1 == 0 && q.dst != mac {
        let owner_ix = maps::moved_here(ifindex, q.dst);
        let owner = match maps::adapter_ref(owner_ix) {
            Some(o) if owner_ix != 0 => o,
            _ => return Err(PASSED_NOT_FOR_US),
        };
        (mac, via, via_slot, moved) = (mac_word(&owner.mac), owner_ix, owner.slot, true);
    }
    if adapter.state != ADAPTER_UP {
        return Err(PASSED_ADAPTER_DOWN);
    }
    let allowed = maps::allowed(&vip);
    if (adapter.slot as u32) >= MAX_ADAPTERS || allowed & (1u64 << adapter.slot) == 0 {
        return Err(PASSED_ADAPTER_NOT_ALLOWED);
    }
    let fk = flow_key(&q.key, q.client);
    if vip.flags & VIP_SPREAD != 0 && !moved && spread_owner(vip.policy, allowed, &fk) != adapter.slot {
        return Err(PASSED_SPREAD_OTHER);
    }
    // A client is entered in the table only from a request answered here: a frame of any
    // other kind could carry a forged source address (ARP requests are what switch ARP
    // inspection checks). In spread mode this adapter is the one it will use; in the other
    // modes its traffic then tells which one it does.
    if !q.probe {
        learn_answered(&fk, via, via_slot, q.requester);
    }
    Ok(Answerer { mac, slot: adapter.slot, vip_id: vip.id })
}

/// How long a client table entry this CPU wrote is taken as known here: a request again
/// within it, or traffic, from the same MAC on the same adapter, leaves the entry alone
/// (its traffic is counted in `RECENT`, added to the entry when it is next written).
/// Short: what another CPU or the agent wrote since is not seen here, so the table may
/// lag that long (two ticks of the agent's clock).
const RECENT_NS: u64 = 2 * vip_common::CLOCK_TICK_MS * 1_000_000;
const RECENT_UNITS: u32 = vip_common::recent_time(RECENT_NS);

/// Whether `r` says this CPU wrote `fk`'s entry as (`ifindex`, `mac`) lately, and the
/// agent has changed no entry since.
#[inline(always)]
fn fresh(r: &Recent, fk: &FlowKey, ifindex: u32, mac: u64, now: u32) -> bool {
    maps::same_flow(&r.flow, fk)
        && r.ifindex == ifindex
        && mac_word(&r.mac) == mac
        && now.wrapping_sub(r.at) < RECENT_UNITS
        && r.gen == maps::flows_gen()
}

/// A client answered: entered in the client table unless this CPU entered it so lately.
#[inline(always)]
pub fn learn_answered(fk: &FlowKey, ifindex: u32, slot: u8, mac: u64) {
    let Some(r) = maps::RECENT.get_ptr_mut(vip_common::recent_index(fk)) else {
        return learn(fk, ifindex, slot, mac, 0);
    };
    let now = vip_common::recent_time(maps::now_ns());
    if !fresh(unsafe { &*r }, fk, ifindex, mac, now) {
        remember(unsafe { &mut *r }, fk, ifindex, mac, slot as u64);
    }
}

/// VIP traffic from a client: whether it is in the table from this MAC (`mac`), now on
/// `ifindex`. Known lately on this CPU: counted in `RECENT`, no table lookup.
#[inline(always)]
fn seen(fk: &FlowKey, ifindex: u32, slot: u8, mac: u64, len: u64) -> bool {
    let Some(r) = maps::RECENT.get_ptr_mut(vip_common::recent_index(fk)) else {
        return refresh(fk, ifindex, slot, mac, len);
    };
    let r = unsafe { &mut *r };
    if fresh(r, fk, ifindex, mac, vip_common::recent_time(maps::now_ns())) && r.bytes < 1 << 62 {
        r.packets += 1;
        r.bytes += len;
        return true;
    }
    remember(r, fk, ifindex, mac, len << 8 | slot as u64 | 1 << 63)
}

/// `r` is taken for `fk`: its own counts go to its entry first. Then, for a request
/// answered (`len_slot` the slot), the client is entered; for traffic (`len_slot`:
/// top bit set, the frame's length above the slot), its entry is refreshed if it is
/// there from `mac`. Returns whether the client is in the table from `mac`; `r` records
/// it when it is.
#[inline(never)]
fn remember(r: &mut Recent, fk: &FlowKey, ifindex: u32, mac: u64, len_slot: u64) -> bool {
    if r.packets != 0 {
        if let Some(f) = FLOWS.get_ptr_mut(&r.flow) {
            let f = unsafe { &mut *f };
            f.packets += r.packets as u64;
            f.bytes += r.bytes;
        }
        r.packets = 0;
        r.bytes = 0;
    }
    let slot = len_slot as u8;
    let ok = if len_slot >> 63 != 0 {
        refresh(fk, ifindex, slot, mac, (len_slot << 1) >> 9)
    } else {
        learn(fk, ifindex, slot, mac, 0);
        true
    };
    if ok {
        r.flow = *fk;
        r.ifindex = ifindex;
        set6(&mut r.mac, &mac_bytes(mac));
        r.at = vip_common::recent_time(maps::now_ns());
        r.gen = maps::flows_gen();
    }
    ok
}

/// Records that `client` uses adapter `ifindex` (slot `slot`) for the VIP.
// Its own BPF function: the stack of each path stays within the 512-byte limit.
#[inline(never)]
pub fn learn(fk: &FlowKey, ifindex: u32, slot: u8, mac: u64, bytes: u64) {
    let now = maps::now_ns();
    let mac = mac_bytes(mac);
    if let Some(f) = FLOWS.get_ptr_mut(fk) {
        let f = unsafe { &mut *f };
        f.ifindex = ifindex;
        f.slot = slot;
        set6(&mut f.mac, &mac);
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
    set6(&mut f.mac, &mac);
    let _ = FLOWS.insert(fk, &f, 0);
}

/// VIP traffic from a client in the table: which adapter it uses now, and its counters.
/// Only from the MAC it was entered with (from an answered request): a frame with a
/// forged source address changes nothing, so it cannot redirect anyone's replies.
#[inline(always)]
fn refresh(fk: &FlowKey, ifindex: u32, slot: u8, mac: u64, bytes: u64) -> bool {
    let Some(f) = FLOWS.get_ptr_mut(fk) else { return false };
    let f = unsafe { &mut *f };
    if mac_word(&f.mac) != mac {
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
pub fn kernel_agrees(ctx: &XdpContext, vip: &VipKey, client: &[u32; 4], mac: u64, ifindex: u32) -> bool {
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
    rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && eq6(&p.dmac, &mac_bytes(mac))
}

/// A straggler reached the failed adapter's heir: tell the agent (at most once per
/// EVENT_GAP_NS per client). Only for a client in the table, from its own MAC.
#[inline(always)]
fn straggler(fk: &FlowKey, ifindex: u32, client_mac: u64, to_mac: u64) {
    // The precise clock: events are spaced by 20 ms, a few ticks.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let Some(f) = FLOWS.get_ptr_mut(fk) else { return };
    let f = unsafe { &mut *f };
    if mac_word(&f.mac) != client_mac || now.wrapping_sub(f.event_ns) < EVENT_GAP_NS {
        return;
    }
    f.event_ns = now;
    if let Some(mut e) = EVENTS.reserve::<Straggler>(0) {
        let s = Straggler { flow: *fk, ifindex, client_mac: mac_bytes(client_mac), to_mac: mac_bytes(to_mac) };
        e.write(s);
        e.submit(0);
    }
}

/// IPv4 traffic to a key whose filter bit (`bit`) is set (`addrs`: destination, then
/// source above it; `vlan_bit`: VLAN ID, then the bit below it), arriving on `adapter`
/// (as the entry point read it). Its own BPF function: the
/// entry point's stack stays small for the NS path's calls.
#[inline(never)]
pub fn ipv4(ctx: &XdpContext, addrs: u64, vlan_bit: u64, adapter: Option<&AdapterInfo>) -> u64 {
    // Packed: BPF functions take five arguments.
    let (dst, src, vlan, bit) = (addrs as u32, (addrs >> 32) as u32, (vlan_bit >> 32) as u16, vlan_bit as u32);
    let key = VipKey { addr: [dst, 0, 0, 0], vlan, family: vip_common::FAMILY_IPV4, _pad: 0 };
    crate::verdict::pack(traffic(ctx, adapter, &key, bit, [src, 0, 0, 0]))
}


/// Traffic to `vip` (`bit`: its filter bit, set) from `client`, arriving on `adapter`.
/// Frames to this adapter are learned; frames to a failed adapter whose heir this is are
/// accepted (`taken_over`). Inlined into the entry point for IPv4.
#[inline(always)]
pub fn traffic(ctx: &XdpContext, adapter: Option<&AdapterInfo>, vip: &VipKey, bit: u32, client: [u32; 4]) -> Result<u32, u32> {
    let Some(info) = maps::vip(vip, bit) else { return Err(decision::PASSED_NOT_NEIGHBOR) };
    let flags = info.flags;
    if maps::fenced(flags) {
        return Err(decision::DROPPED_FENCED);
    }
    let adapter = match adapter {
        Some(a) if a.state != vip_common::ADAPTER_UNKNOWN => a,
        _ => return Err(decision::PASSED_ADAPTER_UNKNOWN),
    };
    if adapter.state != ADAPTER_UP {
        return Err(decision::PASSED_ADAPTER_DOWN);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN > end {
        return Err(decision::PASSED_TRUNCATED);
    }
    // SAFETY: the Ethernet header is within the frame.
    let (dst, src) = unsafe { (ld_mac(start as *const u8), ld_mac((start + 6) as *const u8)) };
    let fk = flow_key(vip, client);
    if dst != mac_word(&adapter.mac) {
        return taken_over(ctx, vip, &fk, flags);
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    let len = (end - start) as u64;
    // A known client refreshes its entry; another is entered only if the kernel's
    // neighbour table vouches for its MAC.
    if !seen(&fk, ifindex, adapter.slot, src, len) && (maps::learn_any_traffic() || kernel_agrees(ctx, vip, &client, src, ifindex)) {
        learn(&fk, ifindex, adapter.slot, src, len);
    }
    maps::count_traffic(adapter.slot, len, false);
    deliver(ctx, flags, decision::PASSED_VIP_TRAFFIC)
}

/// A virtual server's VIP, once accepted, goes to the virtual server; others to the host.
#[inline(always)]
fn deliver(ctx: &XdpContext, flags: u32, d: u32) -> Result<u32, u32> {
    if flags & VIP_VSERVER != 0 {
        crate::vserver::to_vserver(ctx, vserver_index(flags))
    } else {
        Err(d)
    }
}

/// VIP traffic not sent to the adapter's own MAC: to a failed adapter whose heir this is,
/// accepted (the destination rewritten to this adapter so the kernel takes it) as the
/// moved MAC, or as a straggler the agent must correct.
#[inline(never)]
fn taken_over(ctx: &XdpContext, vip: &VipKey, fk: &FlowKey, flags: u32) -> Result<u32, u32> {
    let ifindex = ctx.ingress_ifindex() as u32;
    let Some(adapter) = maps::adapter_ref(ifindex) else { return Err(decision::PASSED_ADAPTER_UNKNOWN) };
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let eth = unsafe { &mut *eth };
    if eth.dst_addr[0] & 1 != 0 {
        return Err(decision::PASSED_NOT_FOR_US);
    }
    let Some((owner_ix, owner)) = maps::inherited(ifindex, &eth.dst_addr) else {
        return Err(decision::PASSED_NOT_FOR_US);
    };
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (to, src) = (mac_word(&eth.dst_addr), mac_word(&eth.src_addr));
    set6(&mut eth.dst_addr, &adapter.mac);
    maps::count_traffic(adapter.slot, len, false);
    let client = fk.client;
    if maps::mac_moved(&owner) {
        // The client still uses the failed adapter's MAC, and may: its replies go out
        // from that MAC too (see the egress program).
        if !seen(fk, owner_ix, owner.slot, src, len) && (maps::learn_any_traffic() || kernel_agrees(ctx, vip, &client, src, ifindex)) {
            learn(fk, owner_ix, owner.slot, src, len);
        }
        return deliver(ctx, flags, decision::ACCEPTED_MOVED_MAC);
    }
    if FLOWS.get_ptr_mut(fk).is_none() && (maps::learn_any_traffic() || kernel_agrees(ctx, vip, &client, src, ifindex)) {
        learn(fk, ifindex, adapter.slot, src, 0);
    }
    straggler(fk, ifindex, src, to);
    deliver(ctx, flags, decision::ACCEPTED_STRAGGLER)
}
