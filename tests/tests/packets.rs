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
    assert_eq!(env.dp.answers(0, 0).unwrap(), 3);
    assert_eq!(env.dp.answers(0, 1).unwrap(), 0);
    assert_eq!(env.dp.answers(2, 0).unwrap(), 1);
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
    env.dp.set_vip(key, vip_common::VipInfo { allowed: 0b011, id: 0, flags: 0 }).expect("re-add vip");
    env.within(|env| assert_eq!(env.run(&arp, Arrival::Up).action, XDP_TX));
    let up = env.ifindex(Arrival::Up);
    env.dp.remove_adapter(up).expect("remove adapter");
    let before = env.dp.decisions().unwrap();
    env.within(|env| assert_eq!(env.run(&arp, Arrival::Up).action, XDP_PASS));
    let after = env.dp.decisions().unwrap();
    assert_eq!(after[decision::PASSED_ADAPTER_UNKNOWN as usize], before[decision::PASSED_ADAPTER_UNKNOWN as usize] + 1);
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
