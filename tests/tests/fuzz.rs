//! Fuzz test: random and mutated frames through the real XDP program (BPF_PROG_TEST_RUN),
//! checked against an independent oracle (`vip_packet::parse_question`).
//!
//! Invariants: never XDP_ABORTED (nor DROP: the program only passes or answers); a passed
//! frame is untouched; a frame is answered if and only if it is a valid request for a
//! hosted VIP, on that VIP's VLAN, arriving on an allowed, healthy adapter and addressed to
//! it (broadcast/multicast or its MAC); every answer is exactly the expected frame and
//! parses back as a well-formed ARP reply / Neighbor Advertisement; every frame bumps
//! exactly one decision counter.

use std::net::{Ipv4Addr, Ipv6Addr};

use vip_common::{decision, VipKey};
use vip_packet::{
    expected_answer, parse_answer, parse_question, solicited_node, Answer, Arp, Nd, Question, ALL_NODES, BROADCAST,
};
use vip_tests::{
    fixtures::{
        arrival_mac, hosted, valid_requests, Arrival, TableEnv, ARRIVALS, CLIENT4, CLIENT6, CLIENT_MAC, OTHER_MAC, UP_MAC,
        VIP4, VIP4_VLAN, VIP6, VIP6_VLAN, XDP_PASS, XDP_TX,
    },
    hex, root_or_skip,
};

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Frames per run: `VIP_FUZZ_FRAMES` (`cargo xtask fuzz` runs 1,000,000 per seed), else
/// the suite's shorter run.
fn frames() -> usize {
    std::env::var("VIP_FUZZ_FRAMES").ok().and_then(|s| s.replace('_', "").parse().ok()).unwrap_or(120_000)
}

fn macs(r: &mut Rng) -> [u8; 6] {
    r.pick(&[CLIENT_MAC, UP_MAC, OTHER_MAC, BROADCAST, [0; 6], [0x33, 0x33, 0xff, 0, 0, 0x10], [1, 0, 0x5e, 0, 0, 1]])
}

fn tci(r: &mut Rng) -> Option<u16> {
    r.pick(&[None, None, None, Some(100), Some(0xe064), Some(200), Some(0), Some(0x0fff)])
}

/// An ARP frame with fields drawn from interesting values.
fn structured_arp(r: &mut Rng) -> Vec<u8> {
    let ips = [VIP4, VIP4_VLAN, CLIENT4, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, Ipv4Addr::new(10, 0, 0, 1)];
    let a = Arp {
        eth_dst: macs(r),
        eth_src: macs(r),
        tci: tci(r),
        op: r.pick(&[1, 1, 1, 2, 3, 0]),
        sha: macs(r),
        spa: r.pick(&ips),
        tha: macs(r),
        tpa: r.pick(&ips),
    };
    a.to_bytes()
}

/// An NS (or NA) with fields drawn from interesting values; checksum right unless mutated later.
fn structured_nd(r: &mut Rng) -> Vec<u8> {
    let targets: [Ipv6Addr; 5] = [VIP6, VIP6_VLAN, "2001:db8::99".parse().unwrap(), ALL_NODES, CLIENT6];
    let target = r.pick(&targets);
    let src = r.pick(&[CLIENT6, Ipv6Addr::UNSPECIFIED, ALL_NODES, VIP6]);
    let dst = r.pick(&[solicited_node(&target), solicited_node(&target), target, ALL_NODES, solicited_node(&VIP6)]);
    let mut options = vec![];
    for _ in 0..r.below(4) {
        let t = r.pick(&[1u8, 2, 14, 200]);
        let n = r.below(24);
        options.push((t, r.bytes(n)));
    }
    let n = Nd {
        eth_dst: r.pick(&[vip_packet::ipv6_multicast_mac(&dst), UP_MAC, OTHER_MAC, BROADCAST]),
        eth_src: macs(r),
        tci: tci(r),
        src,
        dst,
        hop_limit: r.pick(&[255, 255, 255, 254, 64, 0]),
        icmp_type: r.pick(&[135, 135, 135, 136, 128]),
        code: r.pick(&[0, 0, 0, 1]),
        flags: r.pick(&[0, 0x60]),
        target,
        options,
    };
    let mut f = n.to_bytes();
    if r.below(10) == 0 {
        // Zero one option length byte and fix the checksum, so only the length is wrong.
        let opt_start = f.len() - n.options.iter().map(|(_, b)| (b.len() + 2).div_ceil(8) * 8).sum::<usize>();
        if opt_start < f.len() {
            f[opt_start + 1] = 0;
            refresh_checksum(&mut f);
        }
    }
    f
}

/// Recomputes the ICMPv6 checksum of an IPv6 frame in place (if it is one).
fn refresh_checksum(f: &mut [u8]) {
    let Some(e) = vip_packet::parse_eth(f) else { return };
    let ip = e.payload;
    if f.len() < ip + 44 {
        return;
    }
    let plen = u16::from_be_bytes([f[ip + 4], f[ip + 5]]) as usize;
    if f.len() < ip + 40 + plen || plen < 4 {
        return;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&f[ip + 8..ip + 24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&f[ip + 24..ip + 40]).unwrap());
    let m = &mut f[ip + 40..ip + 40 + plen];
    m[2] = 0;
    m[3] = 0;
    let c = vip_packet::icmpv6_checksum(&src, &dst, m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
}

fn mutate(r: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + r.below(4) {
        match r.below(6) {
            0 | 1 if !f.is_empty() => {
                let i = r.below(f.len());
                f[i] = r.next() as u8;
            }
            2 if !f.is_empty() => {
                let i = r.below(f.len());
                f[i] ^= 1 << r.below(8);
            }
            3 => f.truncate(14 + r.below(f.len().saturating_sub(13).max(1))),
            4 => {
                let n = r.below(40);
                f.extend(r.bytes(n));
            }
            _ => {
                // Mutate, then make the checksum right again to get past it.
                if !f.is_empty() {
                    let i = r.below(f.len());
                    f[i] = r.next() as u8;
                }
                refresh_checksum(&mut f);
            }
        }
    }
    if f.len() < 14 {
        f.resize(14, 0);
    }
    f
}

fn frame(r: &mut Rng, seeds: &[Vec<u8>], rows: &[Vec<u8>]) -> Vec<u8> {
    match r.below(12) {
        0 | 1 => structured_arp(r),
        2 | 3 => structured_nd(r),
        4..=6 => {
            let s = r.pick(seeds);
            mutate(r, s)
        }
        7 => r.pick(seeds),
        // Every row of the packet table, as it is and mutated.
        8 => {
            let s = r.pick(rows);
            mutate(r, s)
        }
        9 => r.pick(rows),
        10 => {
            // Random bytes behind a neighbor-discovery ethertype.
            let n = 14 + r.below(120);
            let mut f = r.bytes(n);
            let t = r.pick(&[[0x08u8, 0x06], [0x86, 0xdd], [0x81, 0x00]]);
            f[12..14].copy_from_slice(&t);
            f
        }
        _ => {
            let n = 14 + r.below(200);
            r.bytes(n)
        }
    }
}

/// Whether the data plane must answer `f` arriving on `on`, per the oracle.
fn must_answer(q: &Question, on: Arrival) -> bool {
    let (key, eth_dst) = match q {
        Question::Arp { vlan, eth_dst, target, .. } => (VipKey::v4(target.octets(), *vlan), *eth_dst),
        Question::Ns { vlan, eth_dst, target, .. } => (VipKey::v6(target.octets(), *vlan), *eth_dst),
    };
    let addressed = eth_dst[0] & 1 == 1 || eth_dst == arrival_mac(on);
    hosted().contains(&key) && on == Arrival::Up && addressed
}

#[test]
fn fuzz_frames() {
    if !root_or_skip("fuzz_frames") {
        return;
    }
    let seed = std::env::var("VIP_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_abcd_0001u64);
    eprintln!("fuzz seed {seed:#x} (set VIP_FUZZ_SEED to replay)");
    let env = TableEnv::new();
    // Mutations start from the valid requests and from every row of the packet table.
    let seeds: Vec<Vec<u8>> = valid_requests().into_iter().map(|(_, f)| f).collect();
    let rows: Vec<Vec<u8>> = vip_tests::fixtures::table().into_iter().map(|r| r.frame).collect();
    let frames = frames();
    let (answered, valid) = env.within(|env| {
        let mut r = Rng(seed);
        let (mut answered, mut valid) = (0usize, 0usize);
        for i in 0..frames {
            let f = frame(&mut r, &seeds, &rows);
            let on = r.pick(&ARRIVALS);
            let q = parse_question(&f);
            valid += q.is_some() as usize;
            let want = q.as_ref().is_some_and(|q| must_answer(q, on));
            let before = env.dp.decisions().unwrap();
            let out = env.run(&f, on);
            let after = env.dp.decisions().unwrap();
            let ctx = || format!("frame {i} on {on:?}: {}", hex(&f));
            assert!(out.action == XDP_PASS || out.action == XDP_TX, "{}: action {}", ctx(), out.action);
            // Exactly one counter, by one, and the one that names what was done.
            let bumped: Vec<usize> = (0..after.len()).filter(|&d| after[d] != before[d]).collect();
            assert_eq!(bumped.len(), 1, "{}: counters bumped {:?}", ctx(), bumped.iter().map(|&d| decision::NAMES[d]).collect::<Vec<_>>());
            let d = bumped[0];
            assert_eq!(after[d] - before[d], 1, "{}: {} bumped by {}", ctx(), decision::NAMES[d], after[d] - before[d]);
            assert_eq!(
                decision::NAMES[d].starts_with("answered"),
                out.action == XDP_TX,
                "{}: decision {} with action {}",
                ctx(),
                decision::NAMES[d],
                out.action
            );
            if out.action == XDP_PASS {
                assert!(!want, "{}: valid question for a hosted VIP was not answered", ctx());
                assert_eq!(out.output, f, "{}: passed frame was modified", ctx());
                continue;
            }
            answered += 1;
            assert!(want, "{}: answered a frame that must pass", ctx());
            let q = q.unwrap();
            assert_eq!(hex(&out.output), hex(&expected_answer(&q, &f, UP_MAC)), "{}: answer differs", ctx());
            match (parse_answer(&out.output), &q) {
                (Some(Answer::Arp(a)), Question::Arp { target, .. }) => {
                    assert_eq!((a.sha, a.eth_src, a.spa), (UP_MAC, UP_MAC, *target), "{}", ctx())
                }
                (Some(Answer::Na(n)), Question::Ns { target, .. }) => {
                    assert_eq!((n.eth_src, n.target, n.hop_limit), (UP_MAC, *target, 255), "{}", ctx());
                    assert_eq!(n.options, vec![(2, UP_MAC.to_vec())], "{}", ctx());
                }
                (a, _) => panic!("{}: answer does not parse back as the right kind: {a:?}", ctx()),
            }
        }
        (answered, valid)
    });
    eprintln!("fuzz seed {seed:#x}: {frames} frames, {valid} valid questions, {answered} answered");
    assert!(answered > frames / 50, "the generator must reach the answer path often ({answered})");
}
