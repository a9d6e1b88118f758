//! Conflict detection before a VIP is first brought up (seed 002; RFC 5227 ARP probes,
//! RFC 4862 duplicate address detection). Runs before the VIP is in the maps or on the
//! host, so neither the data plane nor the kernel answers the probes themselves.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use vip_packet::{Arp, Mac, Nd};

use crate::packet::PacketSocket;

/// A VIP to probe and the adapters (ifindex, MAC) to probe from.
pub struct ProbeTarget {
    pub vip: u32,
    pub addr: IpAddr,
    pub vlan: u16,
    pub from: Vec<(u32, Mac)>,
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

/// Probes every target at once: `count` probes 20 ms apart from each of its adapters,
/// then listens `wait` more on every adapter. Returns the VIPs someone else answers for.
/// Sends one probe. A burst of thousands (a reload adding VIPs, a start) can fill the
/// device's queue, which drops the frame and says ENOBUFS: wait for it to drain and send
/// again, for up to a second, rather than fail the start or skip the probe.
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

pub fn probe(
    targets: &[ProbeTarget],
    listen_on: &[u32],
    ours: &HashSet<Mac>,
    count: u32,
    wait: Duration,
) -> std::io::Result<HashMap<u32, Conflict>> {
    let mut found = HashMap::new();
    if targets.is_empty() {
        return Ok(found);
    }
    let listeners: Vec<PacketSocket> = listen_on.iter().map(|i| PacketSocket::open(*i, true)).collect::<Result<_, _>>()?;
    let mut senders: HashMap<u32, PacketSocket> = HashMap::new();
    for t in targets {
        for (i, _) in &t.from {
            if !senders.contains_key(i) {
                senders.insert(*i, PacketSocket::open(*i, false)?);
            }
        }
    }
    let mut by_addr: HashMap<IpAddr, Vec<usize>> = HashMap::new();
    for (i, t) in targets.iter().enumerate() {
        by_addr.entry(t.addr).or_default().push(i);
    }
    let gap = Duration::from_millis(20);
    let start = Instant::now();
    let end = start + gap * count.saturating_sub(1) + wait;
    let mut sent = 0;
    let mut buf = vec![0u8; 2048];
    loop {
        let now = Instant::now();
        if sent < count && now >= start + gap * sent {
            for t in targets.iter().filter(|t| !found.contains_key(&t.vip)) {
                for (i, mac) in &t.from {
                    send_retrying(&senders[i], &probe_frame(*mac, &t.addr, t.vlan))?;
                }
            }
            sent += 1;
        }
        if now >= end {
            break;
        }
        let next_probe = if sent < count { start + gap * sent } else { end };
        let slice = next_probe.min(end).saturating_duration_since(now).min(Duration::from_millis(5));
        if listeners.is_empty() {
            std::thread::sleep(slice);
        }
        for l in &listeners {
            // A busy adapter never drains: stop reading when the probe schedule is due.
            while let Some(n) = l.recv(&mut buf, if slice.is_zero() { Duration::ZERO } else { slice / listeners.len() as u32 })? {
                if Instant::now() >= next_probe.min(end) {
                    break;
                }
                if n == 0 {
                    continue;
                }
                // Only the targets the frame names: one lookup per frame, not one check per
                // target (100,000 VIPs are probed at once).
                for addr in named(&buf[..n]) {
                    for &i in by_addr.get(&addr).map(|v| &v[..]).unwrap_or(&[]) {
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
