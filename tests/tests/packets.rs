//! Table-driven packet tests of the XDP program through BPF_PROG_TEST_RUN.

use vip_common::decision;
use vip_tests::{
    fixtures::{table, unhex, valid_requests, Arrival, TableEnv, GOLDEN_ARP_REPLY, GOLDEN_NA, XDP_PASS, XDP_TX},
    hex, root_or_skip,
};

#[test]
fn table_rows() {
    if !root_or_skip("table_rows") {
        return;
    }
    let env = TableEnv::new();
    // The adapter states below are written as stores to the memory-mapped ADAPTERS map;
    // every row that depends on them shows the kernel sees those stores.
    assert!(env.dp.adapters_mapped(), "ADAPTERS is not memory-mapped");
    let rows = table();
    assert!(rows.len() > 60, "the table lost rows");
    env.within(|env| {
        let mut failures = vec![];
        for row in &rows {
            let before = env.dp.decisions().expect("decisions");
            let r = env.run(&row.frame, row.on);
            let after = env.dp.decisions().expect("decisions");
            let bumped: Vec<usize> = (0..before.len()).filter(|&i| after[i] != before[i]).collect();
            let expected_out = row.output.clone().unwrap_or_else(|| row.frame.clone());
            if r.action != row.action {
                failures.push(format!("{}: action {} want {}", row.desc, r.action, row.action));
            }
            if r.output != expected_out {
                failures.push(format!("{}: output\n  got  {}\n  want {}", row.desc, hex(&r.output), hex(&expected_out)));
            }
            if bumped != [row.decision as usize] || after[row.decision as usize] != before[row.decision as usize] + 1 {
                let names: Vec<_> = bumped.iter().map(|&i| decision::NAMES[i]).collect();
                failures.push(format!("{}: decisions bumped {names:?}, want [{}]", row.desc, decision::NAMES[row.decision as usize]));
            }
        }
        assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
        eprintln!("{} rows passed", rows.len());
    });
}

#[test]
fn golden_answers() {
    if !root_or_skip("golden_answers") {
        return;
    }
    let env = TableEnv::new();
    env.within(|env| {
        let rows = table();
        let arp = rows.iter().find(|r| r.desc == "arp request for a VIP").unwrap();
        let r = env.run(&arp.frame, Arrival::Up);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(hex(&r.output), hex(&unhex(GOLDEN_ARP_REPLY)));
        let ns = rows.iter().find(|r| r.desc == "neighbor solicitation for a VIP").unwrap();
        let r = env.run(&ns.frame, Arrival::Up);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(hex(&r.output), hex(&unhex(GOLDEN_NA)));
    });
}

#[test]
fn answers_are_counted_per_vip_and_adapter() {
    if !root_or_skip("answers_are_counted_per_vip_and_adapter") {
        return;
    }
    let env = TableEnv::new();
    let (arp, ns) = (valid_requests()[0].1.clone(), valid_requests()[2].1.clone());
    env.within(|env| {
        for _ in 0..3 {
            assert_eq!(env.run(&arp, Arrival::Up).action, XDP_TX);
        }
        assert_eq!(env.run(&arp, Arrival::Down).action, XDP_PASS);
        assert_eq!(env.run(&ns, Arrival::Up).action, XDP_TX);
    });
    // VIP ids follow fixtures::hosted(): 0 is VIP4, 2 is VIP6; slot 0 is the Up adapter.
    assert_eq!((env.dp.answers(0), env.dp.answers(1), env.dp.answers(2)), (3, 0, 1));
    assert_eq!(env.dp.traffic(0).unwrap().answers, 4, "per adapter: the Up adapter's answers");
    assert_eq!(env.dp.traffic(1).unwrap().answers, 0);
}

/// VIPs placed alike share one policy: one store changes who answers all of them.
#[test]
fn one_policy_store_moves_every_vip_sharing_it() {
    if !root_or_skip("one_policy_store_moves_every_vip_sharing_it") {
        return;
    }
    let mut env = TableEnv::new();
    let reqs: Vec<Vec<u8>> = valid_requests().into_iter().map(|r| r.1).collect();
    env.within(|env| {
        for r in &reqs {
            assert_eq!(env.run(r, Arrival::Up).action, XDP_TX);
            assert_eq!(env.run(r, Arrival::NotAllowed).action, XDP_PASS);
        }
    });
    env.dp.set_policy(0, 0b100).expect("policy");
    assert_eq!(env.dp.policy(0), 0b100);
    let before = env.dp.decisions().unwrap();
    env.within(|env| {
        for r in &reqs {
            assert_eq!(env.run(r, Arrival::Up).action, XDP_PASS, "slot 0 no longer allowed");
            assert_eq!(env.run(r, Arrival::NotAllowed).action, XDP_TX, "slot 2 allowed now");
        }
    });
    let after = env.dp.decisions().unwrap();
    let d = decision::PASSED_ADAPTER_NOT_ALLOWED as usize;
    assert_eq!(after[d] - before[d], reqs.len() as u64);
    env.dp.set_policy(0, 0b011).expect("policy");
}

#[test]
fn removed_vip_and_adapter_stop_answers() {
    if !root_or_skip("removed_vip_and_adapter_stop_answers") {
        return;
    }
    let mut env = TableEnv::new();
    let arp = valid_requests()[0].1.clone();
    env.within(|env| assert_eq!(env.run(&arp, Arrival::Up).action, XDP_TX));
    let key = vip_tests::fixtures::hosted()[0];
    env.dp.remove_vip(key).expect("remove vip");
    let before = env.dp.decisions().unwrap();
    env.within(|env| assert_eq!(env.run(&arp, Arrival::Up).action, XDP_PASS));
    let after = env.dp.decisions().unwrap();
    assert_eq!(after[decision::PASSED_NOT_VIP as usize], before[decision::PASSED_NOT_VIP as usize] + 1);
    env.dp.set_vip(key, vip_common::VipInfo { policy: 0, id: 0, flags: 0, _pad: 0 }).expect("re-add vip");
    env.within(|env| assert_eq!(env.run(&arp, Arrival::Up).action, XDP_TX));
    let up = env.ifindex(Arrival::Up);
    env.dp.remove_adapter(up).expect("remove adapter");
    let before = env.dp.decisions().unwrap();
    env.within(|env| assert_eq!(env.run(&arp, Arrival::Up).action, XDP_PASS));
    let after = env.dp.decisions().unwrap();
    assert_eq!(after[decision::PASSED_ADAPTER_UNKNOWN as usize], before[decision::PASSED_ADAPTER_UNKNOWN as usize] + 1);
}

/// The VIP filter (`VIP_FILTER`): every hosted VIP's bit is set; an address that is no VIP
/// but shares a VIP's bit goes on to the hash lookup and is passed, untouched; removing a
/// VIP clears its bit (no other VIP shares it), and adding it back sets it first.
#[test]
fn the_vip_filter_never_hides_a_vip_and_forgets_removed_ones() {
    if !root_or_skip("the_vip_filter_never_hides_a_vip_and_forgets_removed_ones") {
        return;
    }
    use vip_common::{filter_bit, VipKey};
    use vip_tests::fixtures::{hosted, ipv4_to, UP_MAC, VIP4};
    let mut env = TableEnv::new();
    for k in hosted() {
        assert!(env.dp.maybe_vip(&k), "{k:?} has no filter bit");
    }
    // An address of 10.0.0.0/8 whose bit is VIP4's.
    let vip = VipKey::v4(VIP4.octets(), 0);
    let twin = (1u32..1 << 24)
        .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 | i))
        .find(|a| filter_bit(&VipKey::v4(a.octets(), 0)) == filter_bit(&vip))
        .expect("an address sharing VIP4's bit");
    let f = ipv4_to(UP_MAC, twin);
    let before = env.dp.decisions().unwrap();
    let out = env.within(|env| env.run(&f, Arrival::Up));
    let after = env.dp.decisions().unwrap();
    assert_eq!((out.action, &out.output), (XDP_PASS, &f), "a frame to {twin} (VIP4's bit)");
    let d = decision::PASSED_NOT_NEIGHBOR as usize;
    assert_eq!(after[d], before[d] + 1, "{twin} went through the hash lookup and passed as no VIP");
    assert!(hosted().iter().filter(|k| **k != vip).all(|k| filter_bit(k) != filter_bit(&vip)), "the fixture's VIPs share a bit");
    env.dp.remove_vip(vip).expect("remove");
    assert!(!env.dp.maybe_vip(&vip), "a removed VIP's bit stays set");
    assert!(hosted().iter().filter(|k| **k != vip).all(|k| env.dp.maybe_vip(k)), "removing one VIP cleared another's bit");
    env.dp.set_vip(vip, vip_common::VipInfo { policy: 0, id: 0, flags: 0, _pad: 0 }).expect("re-add");
    assert!(env.dp.maybe_vip(&vip));
    let arp = valid_requests()[0].1.clone();
    env.within(|env| assert_eq!(env.run(&arp, Arrival::Up).action, XDP_TX));
}

/// The VIP table (`VIP_TABLE`): three VIPs that hash to one two-slot bucket are all
/// answered, the third from `VIPS` (the bucket marked overflowed); removing one in a slot
/// moves the third in and clears the mark; a removed VIP is answered by neither; an
/// address of the same bucket that is no VIP is passed.
#[test]
fn the_vip_table_answers_every_vip_and_overflows_to_the_hash() {
    if !root_or_skip("the_vip_table_answers_every_vip_and_overflows_to_the_hash") {
        return;
    }
    use vip_common::{filter_bit, table_bucket, VipInfo, VipKey};
    use vip_packet::Arp;
    use vip_tests::fixtures::{CLIENT4, CLIENT_MAC};
    let mut env = TableEnv::new();
    // 100.64.0.0/10: a range so large that some addresses share a bucket (addresses of
    // one /16 never do: the hash spreads consecutive numbers evenly).
    let addr = |i: u32| std::net::Ipv4Addr::from(0x6440_0000 | i);
    let bucket = |a: std::net::Ipv4Addr| table_bucket(filter_bit(&VipKey::v4(a.octets(), 0)));
    let b0 = bucket(addr(1));
    let same: Vec<std::net::Ipv4Addr> = (1u32..1 << 22).map(addr).filter(|a| bucket(*a) == b0).take(4).collect();
    assert_eq!(same.len(), 4, "four addresses of 100.64.0.0/10 in one bucket");
    let (vips, stranger) = (&same[..3], same[3]);
    for (i, a) in vips.iter().enumerate() {
        env.dp.set_vip(VipKey::v4(a.octets(), 0), VipInfo { policy: 0, id: 100 + i as u32, flags: 0, _pad: 0 }).expect("vip");
    }
    assert_eq!(env.dp.table_overflowed(), 1, "two slots, three VIPs");
    assert_eq!(env.dp.table_lookup(&VipKey::v4(vips[2].octets(), 0)), None, "the third is left to VIPS");
    let answered = |env: &TableEnv, a: std::net::Ipv4Addr| {
        let req = Arp::request(CLIENT_MAC, CLIENT4, a).to_bytes();
        env.within(|env| env.run(&req, Arrival::Up).action) == XDP_TX
    };
    for a in vips {
        assert!(answered(&env, *a), "{a} not answered");
    }
    assert!(!answered(&env, stranger), "{stranger}, no VIP, answered");
    env.dp.remove_vip(VipKey::v4(vips[0].octets(), 0)).expect("remove");
    assert_eq!(env.dp.table_overflowed(), 0, "the third moved into the freed slot");
    assert!(
        matches!(env.dp.table_lookup(&VipKey::v4(vips[2].octets(), 0)), Some(Some(v)) if v.id == 102),
        "the third in a slot, with its own entry"
    );
    assert!(!answered(&env, vips[0]), "a removed VIP answered");
    assert!(answered(&env, vips[1]) && answered(&env, vips[2]));
    assert_eq!(env.dp.table_lookup(&VipKey::v4(stranger.octets(), 0)), Some(None), "the bucket says: no VIP");
}

#[test]
fn every_truncation_is_passed() {
    if !root_or_skip("every_truncation_is_passed") {
        return;
    }
    let env = TableEnv::new();
    env.within(|env| {
        let mut checked = 0;
        for (kind, frame) in valid_requests() {
            assert_eq!(env.run(&frame, Arrival::Up).action, XDP_TX, "{kind}: the whole frame must be answered");
            // The kernel refuses test runs shorter than an Ethernet header (14 bytes), and no
            // driver hands XDP such a frame either.
            for len in 14..frame.len() {
                let cut = &frame[..len];
                let before = env.dp.decisions().unwrap()[decision::PASSED_TRUNCATED as usize];
                let r = env.run(cut, Arrival::Up);
                assert_eq!(r.action, XDP_PASS, "{kind} cut to {len} bytes was answered");
                assert_eq!(r.output, cut, "{kind} cut to {len} bytes was modified");
                let after = env.dp.decisions().unwrap()[decision::PASSED_TRUNCATED as usize];
                assert_eq!(after, before + 1, "{kind} cut to {len} bytes not counted as truncated");
                checked += 1;
            }
        }
        eprintln!("{checked} truncations passed");
    });
}

/// Steering in the data plane, row by row: spread mode's one answering adapter and its
/// client table, a failed adapter's MAC moved to its heir, and stragglers.
#[test]
fn steering_rows() {
    use vip_common::{client_bucket, AdapterInfo, FlowKey, VipInfo, VipKey, ADAPTER_DOWN, ADAPTER_MAC_MOVED, SPREAD_BUCKETS, VIP_SPREAD};
    use vip_packet::{parse_arp, parse_eth, Arp, BROADCAST};
    use vip_tests::fixtures::{arrival_mac, ipv4_to, CLIENT4, CLIENT_MAC, DOWN_MAC, UP_MAC, VIP4};
    if !root_or_skip("steering_rows") {
        return;
    }
    let mut env = TableEnv::new();
    let key = VipKey::v4(VIP4.octets(), 0);
    let flow = FlowKey { vip: key.addr, client: [u32::from_ne_bytes(CLIENT4.octets()), 0, 0, 0], vlan: 0, family: 4, _pad: 0 };
    let req = Arp::request(CLIENT_MAC, CLIENT4, VIP4).to_bytes();
    let decided = |env: &TableEnv, frame: &[u8], on: Arrival| {
        let before = env.dp.decisions().unwrap();
        let r = env.run(frame, on);
        let after = env.dp.decisions().unwrap();
        let bumped: Vec<&str> = (0..before.len()).filter(|&i| after[i] != before[i]).map(|i| decision::NAMES[i]).collect();
        assert_eq!(bumped.len(), 1, "{bumped:?}");
        (r, bumped[0])
    };

    // Spread over slots 0 (Up) and 2 (NotAllowed, here allowed, policy 1): the bucket decides.
    env.dp.set_policy(1, 0b101).unwrap();
    env.dp.set_vip(key, VipInfo { policy: 1, id: 0, flags: VIP_SPREAD, _pad: 0 }).unwrap();
    env.dp.set_buckets(1, &[2; SPREAD_BUCKETS as usize]).unwrap();
    let (r, d) = env.within(|env| decided(env, &req, Arrival::Up));
    assert_eq!((r.action, d), (XDP_PASS, "passed_spread_other"), "bucket owned by slot 2");
    assert!(env.dp.flow(&flow).is_none(), "a request not answered is not learned");
    let (r, d) = env.within(|env| decided(env, &req, Arrival::NotAllowed));
    assert_eq!((r.action, d), (XDP_TX, "answered_arp"));
    assert_eq!(env.dp.flow(&flow).map(|f| f.slot), Some(2), "the answered client is entered on its adapter");
    env.dp.remove_flow(&flow).unwrap();
    let mut table = vec![2u8; SPREAD_BUCKETS as usize];
    table[client_bucket(&flow.client) as usize] = 0;
    env.dp.set_buckets(1, &table).unwrap();
    let (r, d) = env.within(|env| decided(env, &req, Arrival::Up));
    assert_eq!((r.action, d), (XDP_TX, "answered_arp"), "its bucket moved to slot 0");
    let (_, d) = env.within(|env| decided(env, &req, Arrival::NotAllowed));
    assert_eq!(d, "passed_spread_other");
    let f = env.dp.flow(&flow).expect("answered spread client is in the table");
    assert_eq!((f.ifindex, f.slot, f.mac), (env.ifindex(Arrival::Up), 0, CLIENT_MAC));
    // A known client stays with its adapter when its bucket moves (no rebalance).
    env.dp.set_buckets(1, &[2; SPREAD_BUCKETS as usize]).unwrap();
    let (_, d) = env.within(|env| decided(env, &req, Arrival::Up));
    assert_eq!(d, "answered_arp", "the table entry keeps the client on its adapter");
    env.dp.remove_flow(&flow).unwrap();
    let (_, d) = env.within(|env| decided(env, &req, Arrival::Up));
    assert_eq!(d, "passed_spread_other", "without its entry the bucket decides again");
    // Traffic alone enters nobody: its source address could be forged (only an answered
    // request enters a client, and switch ARP inspection vets requests).
    let (r, d) = env.within(|env| decided(env, &ipv4_to(UP_MAC, VIP4), Arrival::Up));
    assert_eq!((r.action, d), (XDP_PASS, "passed_vip_traffic"));
    assert!(env.dp.flow(&flow).is_none(), "traffic alone entered a client");
    // Answered (on slot 2), then its traffic to the Up adapter's MAC moves its entry there
    // and counts.
    env.dp.set_buckets(1, &[2; SPREAD_BUCKETS as usize]).unwrap();
    let (_, d) = env.within(|env| decided(env, &req, Arrival::NotAllowed));
    assert_eq!(d, "answered_arp");
    let (r, d) = env.within(|env| decided(env, &ipv4_to(UP_MAC, VIP4), Arrival::Up));
    assert_eq!((r.action, d), (XDP_PASS, "passed_vip_traffic"));
    let f = env.dp.flow(&flow).expect("the answered client");
    assert_eq!((f.ifindex, f.packets), (env.ifindex(Arrival::Up), 1));
    // The same source address from another MAC (a forgery) changes nothing.
    let mut forged = ipv4_to(arrival_mac(Arrival::NotAllowed), VIP4);
    forged[6..12].copy_from_slice(&[0x02, 0xee, 0, 0, 0, 0x66]);
    let (r, d) = env.within(|env| decided(env, &forged, Arrival::NotAllowed));
    assert_eq!((r.action, d), (XDP_PASS, "passed_vip_traffic"));
    let f = env.dp.flow(&flow).expect("the answered client");
    assert_eq!((f.ifindex, f.packets, f.mac), (env.ifindex(Arrival::Up), 1, CLIENT_MAC), "a forged frame moved the client's replies");
    env.dp.set_vip(key, VipInfo { policy: 0, id: 0, flags: 0, _pad: 0 }).unwrap();
    env.dp.remove_flow(&flow).unwrap();

    // The Down adapter (slot 1) failed; Up is its heir and holds its MAC.
    let down = env.ifindex(Arrival::Down);
    let up = env.ifindex(Arrival::Up);
    env.dp.set_mac(DOWN_MAC, down).unwrap();
    env.dp.set_adapter(down, AdapterInfo { mac: DOWN_MAC, slot: 1, state: ADAPTER_DOWN, heir: up, flags: ADAPTER_MAC_MOVED }).unwrap();
    let unicast_req = Arp { eth_dst: DOWN_MAC, ..Arp::request(CLIENT_MAC, CLIENT4, VIP4) }.to_bytes();
    let (r, d) = env.within(|env| decided(env, &unicast_req, Arrival::Up));
    assert_eq!((r.action, d), (XDP_TX, "answered_arp"), "a request to the moved MAC is answered by the heir");
    assert_eq!(parse_arp(&r.output).unwrap().sha, DOWN_MAC, "as the moved MAC: the client's cache stays right");
    let (_, d) = env.within(|env| decided(env, &unicast_req, Arrival::NotAllowed));
    assert_eq!(d, "passed_not_for_us", "only the heir takes the moved MAC");
    let frame = ipv4_to(DOWN_MAC, VIP4);
    let (r, d) = env.within(|env| decided(env, &frame, Arrival::Up));
    assert_eq!((r.action, d), (XDP_PASS, "accepted_moved_mac"));
    assert_eq!(parse_eth(&r.output).unwrap().dst, UP_MAC, "rewritten so the kernel takes it");
    assert_eq!(r.output[6..], frame[6..], "nothing else changes");
    assert_eq!(env.dp.flow(&flow).unwrap().ifindex, down, "the client uses the moved MAC: replies leave from it");

    // Without move_mac the same frame is a straggler: accepted, and the agent told (the
    // client is in the table, from the request answered above).
    env.dp.set_adapter(down, AdapterInfo { mac: DOWN_MAC, slot: 1, state: ADAPTER_DOWN, heir: up, flags: 0 }).unwrap();
    let mut events = env.dp.take_events().expect("event ring");
    let (r, d) = env.within(|env| decided(env, &frame, Arrival::Up));
    assert_eq!((r.action, d), (XDP_PASS, "accepted_straggler"));
    assert_eq!(parse_eth(&r.output).unwrap().dst, UP_MAC);
    let item = events.next().expect("a straggler event");
    let ev: vip_common::Straggler = bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<vip_common::Straggler>()]);
    drop(item);
    assert_eq!((ev.flow, ev.ifindex, ev.client_mac, ev.to_mac), (flow, up, CLIENT_MAC, DOWN_MAC));
    let (_, d) = env.within(|env| decided(env, &frame, Arrival::Up));
    assert_eq!(d, "accepted_straggler");
    assert!(events.next().is_none(), "a second straggler within 20 ms sends no second event");
    // A straggler not in the table (a forged source, say): accepted, nobody told.
    env.dp.remove_flow(&flow).unwrap();
    let (_, d) = env.within(|env| decided(env, &frame, Arrival::Up));
    assert_eq!(d, "accepted_straggler");
    assert!(events.next().is_none(), "an unknown client's straggler frame reached the agent");
    assert!(env.dp.flow(&flow).is_none(), "a straggler frame entered a client");
    let (_, d) = env.within(|env| decided(env, &frame, Arrival::NotAllowed));
    assert_eq!(d, "passed_not_for_us", "only the heir takes stragglers");
    let (_, d) = env.within(|env| decided(env, &ipv4_to(BROADCAST, VIP4), Arrival::Up));
    assert_eq!(d, "passed_not_for_us");

}

/// A cluster VIP (`VIP_CLUSTER`) is answered only while the node's deadline in `FENCE`
/// lies ahead; past it, requests and traffic for it are dropped (neither the program nor
/// the kernel answers), each counted as `dropped_fenced`. Other VIPs never look at it.
#[test]
fn a_cluster_vip_is_answered_only_before_its_deadline() {
    if !root_or_skip("a_cluster_vip_is_answered_only_before_its_deadline") {
        return;
    }
    const XDP_DROP: u32 = 1;
    let mut env = TableEnv::new();
    let boot = || vip_cluster::node::boot_ns();
    let reqs: Vec<Vec<u8>> = valid_requests().into_iter().map(|r| r.1).collect();
    let mut frames = reqs.clone();
    frames.push(vip_tests::fixtures::ipv4_to(vip_tests::fixtures::arrival_mac(Arrival::Up), vip_tests::topo::VIP4));
    let run_all = |env: &TableEnv| -> Vec<u32> { env.within(|env| frames.iter().map(|f| env.run(f, Arrival::Up).action).collect()) };
    // A node's own VIPs: the deadline does not matter.
    env.dp.set_fence(0);
    assert!(env.within(|env| reqs.iter().all(|r| env.run(r, Arrival::Up).action == XDP_TX)));
    for (id, key) in vip_tests::fixtures::hosted().into_iter().enumerate() {
        env.dp.set_vip(key, vip_common::VipInfo { policy: 0, id: id as u32, flags: vip_common::VIP_CLUSTER, _pad: 0 }).unwrap();
    }
    let cases: [(&str, u64, bool); 3] = [
        ("no deadline", 0, false),
        ("deadline 10 s ahead", boot() + 10_000_000_000, true),
        ("deadline passed", boot().saturating_sub(1_000_000), false),
    ];
    for (what, until, answers) in cases {
        env.dp.set_fence(until);
        let before = env.dp.decisions().unwrap();
        let actions = run_all(&env);
        let after = env.dp.decisions().unwrap();
        let dropped = after[decision::DROPPED_FENCED as usize] - before[decision::DROPPED_FENCED as usize];
        if answers {
            assert!(actions[..reqs.len()].iter().all(|&a| a == XDP_TX), "{what}: {actions:?}");
            assert_eq!(actions[reqs.len()], XDP_PASS, "{what}: traffic to the VIP is the kernel's");
            assert_eq!(dropped, 0, "{what}");
        } else {
            assert!(actions.iter().all(|&a| a == XDP_DROP), "{what}: {actions:?}");
            assert_eq!(dropped, frames.len() as u64, "{what}: one dropped_fenced per frame");
        }
    }
    for (id, key) in vip_tests::fixtures::hosted().into_iter().enumerate() {
        env.dp.set_vip(key, vip_common::VipInfo { policy: 0, id: id as u32, flags: 0, _pad: 0 }).unwrap();
    }
}
