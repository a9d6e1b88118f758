//! Conflict detection before a VIP is first brought up (seed 002; RFC 5227 ARP probes,
//! RFC 4862 duplicate address detection). Runs before the VIP is in the maps or on the
//! host, so neither the data plane nor the kernel answers the probes themselves.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use vip_packet::{Arp, Mac, Nd};

use crate::packet::{PacketSocket, BURST};

/// A VIP to probe and the adapter (ifindex, MAC) to probe from (none: only listened for).
/// Kept small: start-up probes every VIP at once, 100,000 of them.
pub struct ProbeTarget {
    pub vip: u32,
    pub addr: IpAddr,
    pub vlan: u16,
    pub from: Option<(u32, Mac)>,
}

/// What answered for a VIP: the foreign MAC and what it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub mac: Mac,
    pub what: &'static str,
}

/// If `frame` shows another host using or claiming `addr`, says how.
pub fn conflict_in(frame: &[u8], addr: &IpAddr, ours: &HashSet<Mac>) -> Option<Conflict> {
    let eth = vip_packet::parse_eth(frame)?;
    if ours.contains(&eth.src) {
        return None;
    }
    match addr {
        IpAddr::V4(a) => {
            let arp = vip_packet::parse_arp(frame)?;
            if ours.contains(&arp.sha) {
                return None;
            }
            if arp.spa == *a {
                return Some(Conflict { mac: arp.sha, what: if arp.op == 2 { "ARP reply" } else { "ARP request" } });
            }
            // Another host probing for the same address at the same time (RFC 5227 §2.1.1).
            if arp.spa.is_unspecified() && arp.tpa == *a && arp.op == 1 {
                return Some(Conflict { mac: arp.sha, what: "ARP probe" });
            }
            None
        }
        IpAddr::V6(a) => {
            let nd = vip_packet::parse_nd(frame)?;
            if nd.target != *a {
                return None;
            }
            if nd.icmp_type == vip_packet::ND_NEIGHBOR_ADVERT {
                return Some(Conflict { mac: eth.src, what: "neighbor advertisement" });
            }
            if nd.icmp_type == vip_packet::ND_NEIGHBOR_SOLICIT && nd.src.is_unspecified() {
                return Some(Conflict { mac: eth.src, what: "duplicate address detection" });
            }
            None
        }
    }
}

/// The addresses an ARP or neighbor discovery frame could be claiming or probing.
fn named(frame: &[u8]) -> Vec<IpAddr> {
    if let Some(a) = vip_packet::parse_arp(frame) {
        return vec![IpAddr::V4(a.spa), IpAddr::V4(a.tpa)];
    }
    if let Some(n) = vip_packet::parse_nd(frame) {
        return vec![IpAddr::V6(n.target)];
    }
    vec![]
}

fn probe_frame(mac: Mac, addr: &IpAddr, vlan: u16) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => {
            let f = Arp::request(mac, std::net::Ipv4Addr::UNSPECIFIED, *a);
            if vlan != 0 { f.with_tci(vlan) } else { f }.to_bytes()
        }
        IpAddr::V6(a) => {
            let f = Nd::dad(mac, *a);
            if vlan != 0 { f.with_tci(vlan) } else { f }.to_bytes()
        }
    }
}

/// Sends one probe. When the device's queue is full anyway (another sender filled it) the
/// frame is dropped with ENOBUFS: wait for it to drain and send again, for up to a
/// second, rather than fail the start or skip the probe.
fn send_retrying(sock: &PacketSocket, frame: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match sock.send(frame) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS) | Some(libc::EAGAIN)) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(200));
            }
            r => return r,
        }
    }
}
/// The targets by address, without an allocation per address: the first target of each
/// address, and for each target the next one with the same address (the same address on
/// several VLANs).
struct ByAddr {
    first: HashMap<IpAddr, u32>,
    next: Vec<u32>,
}

impl ByAddr {
    const END: u32 = u32::MAX;

    fn new(targets: &[ProbeTarget]) -> ByAddr {
        let mut first: HashMap<IpAddr, u32> = HashMap::with_capacity(targets.len());
        let mut next = vec![Self::END; targets.len()];
        for (i, t) in targets.iter().enumerate().rev() {
            if let Some(old) = first.insert(t.addr, i as u32) {
                next[i] = old;
            }
        }
        ByAddr { first, next }
    }

    /// The targets probing `addr`, in order.
    fn targets(&self, addr: &IpAddr) -> impl Iterator<Item = usize> + '_ {
        let mut at = self.first.get(addr).copied().unwrap_or(Self::END);
        std::iter::from_fn(move || {
            (at != Self::END).then(|| {
                let i = at as usize;
                at = self.next[i];
                i
            })
        })
    }
}

/// One adapter's share of the probes (indices of targets) and where its sender stands:
/// round `round`, next frame `at`, next burst allowed at `next`.
struct Lane {
    items: Vec<u32>,
    round: u32,
    at: usize,
    next: Option<Instant>,
}

impl Lane {
    /// The items to send now (a burst at most), given the rounds' schedule: round `r` starts
    /// `gap * r` after `start` and never before the previous round is all sent; bursts are
    /// `spacing` apart. Advances the lane; `None` when nothing is due.
    fn due(&mut self, now: Instant, start: Instant, gap: Duration, spacing: Duration, count: u32) -> Option<std::ops::Range<usize>> {
        if self.round >= count || now < self.wake(start, gap, count)? {
            return None;
        }
        let from = self.at;
        let to = (from + BURST).min(self.items.len());
        self.at = to;
        self.next = Some(now + spacing);
        if to == self.items.len() {
            self.round += 1;
            self.at = 0;
        }
        Some(from..to)
    }

    /// When this lane next has something to send; `None` when it has sent every round.
    fn wake(&self, start: Instant, gap: Duration, count: u32) -> Option<Instant> {
        if self.round >= count || self.items.is_empty() {
            return None;
        }
        let round_start = if self.at == 0 { start + gap * self.round } else { start };
        Some(self.next.map_or(round_start, |n| n.max(round_start)))
    }
}

/// Probes every target: `count` rounds at least 20 ms apart from each of its adapters,
/// paced per adapter (bursts of [`BURST`], `max_per_second` on average), then listens
/// `wait` more after the last probe on every adapter. Returns the VIPs someone else
/// answers for.
pub fn probe(
    targets: &[ProbeTarget],
    listen_on: &[u32],
    ours: &HashSet<Mac>,
    count: u32,
    wait: Duration,
    max_per_second: u32,
) -> std::io::Result<HashMap<u32, Conflict>> {
    let mut found = HashMap::new();
    if targets.is_empty() {
        return Ok(found);
    }
    let listeners: Vec<PacketSocket> = listen_on.iter().map(|i| PacketSocket::open(*i, true)).collect::<Result<_, _>>()?;
    let mut senders: Vec<(PacketSocket, Lane)> = vec![];
    let mut lane_of: HashMap<u32, usize> = HashMap::new();
    for (ti, t) in targets.iter().enumerate() {
        let Some((i, _)) = t.from else { continue };
        let l = match lane_of.get(&i) {
            Some(&l) => l,
            None => {
                senders.push((PacketSocket::open(i, false)?, Lane { items: vec![], round: 0, at: 0, next: None }));
                lane_of.insert(i, senders.len() - 1);
                senders.len() - 1
            }
        };
        senders[l].1.items.push(ti as u32);
    }
    let by_addr = ByAddr::new(targets);
    let gap = Duration::from_millis(20);
    let spacing = Duration::from_secs_f64(BURST as f64 / max_per_second.max(1) as f64);
    let start = Instant::now();
    let mut last_sent = start;
    let mut buf = vec![0u8; 2048];
    loop {
        let now = Instant::now();
        for (sock, lane) in &mut senders {
            if let Some(range) = lane.due(now, start, gap, spacing, count) {
                for &ti in &lane.items[range] {
                    let t = &targets[ti as usize];
                    if let (Some((_, mac)), false) = (t.from, found.contains_key(&t.vip)) {
                        send_retrying(sock, &probe_frame(mac, &t.addr, t.vlan))?;
                    }
                }
                last_sent = Instant::now();
            }
        }
        let next_send = senders.iter().filter_map(|(_, l)| l.wake(start, gap, count)).min();
        let wake = next_send.unwrap_or(last_sent + wait);
        let now = Instant::now();
        if next_send.is_none() && now >= wake {
            break;
        }
        let slice = wake.saturating_duration_since(now).min(Duration::from_millis(5));
        if listeners.is_empty() {
            std::thread::sleep(slice);
            continue;
        }
        let ready = crate::packet::wait_readable(&listeners, slice)?;
        for (l, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            // A busy adapter never drains: stop reading when the next burst is due.
            while let Some(n) = l.recv(&mut buf, Duration::ZERO)? {
                if n != 0 {
                    // Only the targets the frame names: one lookup per frame, not one
                    // check per target (100,000 VIPs are probed at once).
                    for addr in named(&buf[..n]) {
                        for i in by_addr.targets(&addr) {
                            let t = &targets[i];
                            if found.contains_key(&t.vip) {
                                continue;
                            }
                            if let Some(c) = conflict_in(&buf[..n], &t.addr, ours) {
                                found.insert(t.vip, c);
                            }
                        }
                    }
                }
                if Instant::now() >= wake {
                    break;
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Mac = [2, 0, 0, 0, 1, 0];
    const THEM: Mac = [2, 0, 0, 0, 9, 9];

    #[test]
    fn targets_are_found_by_address_on_every_vlan() {
        let t = |vip: u32, addr: &str, vlan: u16| ProbeTarget { vip, addr: addr.parse().unwrap(), vlan, from: None };
        let targets = [t(0, "192.0.2.1", 0), t(1, "2001:db8::1", 0), t(2, "192.0.2.1", 10), t(3, "192.0.2.2", 0), t(4, "192.0.2.1", 20)];
        let by = ByAddr::new(&targets);
        let find = |a: &str| by.targets(&a.parse().unwrap()).collect::<Vec<_>>();
        assert_eq!(find("192.0.2.1"), vec![0, 2, 4]);
        assert_eq!(find("2001:db8::1"), vec![1]);
        assert_eq!(find("192.0.2.2"), vec![3]);
        assert_eq!(find("192.0.2.3"), Vec::<usize>::new());
    }

    /// The pacing schedule, stepped by hand: (time in µs, burst sent as a range, or none).
    #[test]
    fn probes_go_in_bursts_spaced_and_rounds_in_order() {
        let t0 = Instant::now();
        let us = |n: u64| t0 + Duration::from_micros(n);
        let (gap, spacing) = (Duration::from_millis(20), Duration::from_micros(100));
        let mut lane = Lane { items: (0..70).collect(), round: 0, at: 0, next: None };
        let steps: &[(u64, Option<std::ops::Range<usize>>)] = &[
            (0, Some(0..32)),
            (50, None), // the pause after a burst
            (100, Some(32..64)),
            (200, Some(64..70)), // round 0 ends
            (300, None),         // round 1 waits for its start, 20 ms in
            (19_999, None),
            (20_000, Some(0..32)),
            (20_100, Some(32..64)),
            (20_150, None),
            (20_200, Some(64..70)),
            (40_000, None), // both rounds sent
        ];
        for (at, want) in steps {
            assert_eq!(lane.due(us(*at), t0, gap, spacing, 2), want.clone(), "at {at} µs");
        }
        assert_eq!(lane.wake(t0, gap, 2), None);
        // A round that takes longer than the gap: the next one follows it, never overlaps.
        let mut slow = Lane { items: (0..100).collect(), round: 0, at: 0, next: None };
        let spacing = Duration::from_millis(10);
        let mut sent = vec![];
        let mut t = 0;
        while let Some(w) = slow.wake(t0, gap, 2) {
            t = t.max(w.duration_since(t0).as_micros() as u64);
            let r = slow.due(us(t), t0, gap, spacing, 2).expect("due at its wake time");
            sent.push((t, r));
        }
        let starts: Vec<u64> = sent.iter().filter(|(_, r)| r.start == 0).map(|(t, _)| *t).collect();
        assert_eq!(starts, vec![0, 40_000], "{sent:?}");
        assert_eq!(sent.len(), 8);
        assert!(sent.iter().all(|(_, r)| r.len() <= BURST));
        // No adapter to probe from: nothing to send, ever.
        let mut none = Lane { items: vec![], round: 0, at: 0, next: None };
        assert_eq!((none.due(t0, t0, gap, spacing, 2), none.wake(t0, gap, 2)), (None, None));
    }

    #[test]
    fn conflicts_are_recognised() {
        let ours: HashSet<Mac> = [US].into();
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let other4: std::net::Ipv4Addr = "192.0.2.99".parse().unwrap();
        let mut reply = Arp::request(THEM, "192.0.2.10".parse().unwrap(), "0.0.0.0".parse().unwrap());
        reply.op = 2;
        let cases: Vec<(&str, Vec<u8>, &IpAddr, Option<&str>)> = vec![
            ("their reply", reply.to_bytes(), &v4, Some("ARP reply")),
            ("their garp", Arp::announcement(THEM, "192.0.2.10".parse().unwrap()).to_bytes(), &v4, Some("ARP request")),
            ("their probe", probe_frame(THEM, &v4, 0), &v4, Some("ARP probe")),
            ("our own probe", probe_frame(US, &v4, 0), &v4, None),
            ("someone asking", Arp::request(THEM, other4, "192.0.2.10".parse().unwrap()).to_bytes(), &v4, None),
            ("other address", Arp::announcement(THEM, other4).to_bytes(), &v4, None),
            ("their NA", Nd::unsolicited_advert(THEM, "2001:db8::10".parse().unwrap()).to_bytes(), &v6, Some("neighbor advertisement")),
            ("their DAD", probe_frame(THEM, &v6, 0), &v6, Some("duplicate address detection")),
            ("our DAD", probe_frame(US, &v6, 0), &v6, None),
            (
                "their NS resolving it",
                Nd::solicit(THEM, "2001:db8::99".parse().unwrap(), "2001:db8::10".parse().unwrap()).to_bytes(),
                &v6,
                None,
            ),
        ];
        for (name, frame, addr, want) in cases {
            let got = conflict_in(&frame, addr, &ours);
            assert_eq!(got.as_ref().map(|c| c.what), want, "{name}");
            if let Some(c) = got {
                assert_eq!(c.mac, THEM, "{name}");
            }
        }
    }
}
