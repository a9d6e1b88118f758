//! Gratuitous ARP and unsolicited NA announcements, paced per adapter.
//!
//! A change queues `count` rounds per (adapter, VIP), `interval` apart. Each adapter has a
//! token bucket of `max_per_second` so that thousands of VIPs moving at once do not flood
//! the switch; whatever the bucket does not allow now stays queued for the pump task.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use vip_packet::{Arp, Mac, Nd};

use crate::packet::PacketSocket;

/// The announcement frame for `addr` from `mac`, tagged with `vlan` if non-zero.
pub fn frame(mac: Mac, addr: IpAddr, vlan: u16) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => {
            let f = Arp::announcement(mac, a);
            if vlan != 0 { f.with_tci(vlan) } else { f }.to_bytes()
        }
        IpAddr::V6(a) => {
            let f = Nd::unsolicited_advert(mac, a);
            if vlan != 0 { f.with_tci(vlan) } else { f }.to_bytes()
        }
    }
}

/// A correction for one client: a unicast ARP reply / unsolicited NA (Override) telling it
/// that `addr` is at `mac`. Linux updates an existing neighbor entry from either.
pub fn unicast_frame(mac: Mac, addr: IpAddr, vlan: u16, client_mac: Mac, client: IpAddr) -> Vec<u8> {
    match (addr, client) {
        (IpAddr::V4(a), IpAddr::V4(c)) => {
            let f = Arp { eth_dst: client_mac, eth_src: mac, tci: None, op: 2, sha: mac, spa: a, tha: client_mac, tpa: c };
            if vlan != 0 { f.with_tci(vlan) } else { f }.to_bytes()
        }
        (IpAddr::V6(a), IpAddr::V6(c)) => {
            let mut f = Nd::unsolicited_advert(mac, a);
            (f.eth_dst, f.dst) = (client_mac, c);
            if vlan != 0 { f.with_tci(vlan) } else { f }.to_bytes()
        }
        // A table entry's VIP and client are always of one family.
        _ => Vec::new(),
    }
}

/// Ethertype of the MAC-move learning frame (IEEE 802 local experimental 1): hosts
/// ignore it, switches learn its source.
pub const ETH_P_LEARN: u16 = 0x88b5;

/// A broadcast frame from `mac` that only teaches switches where `mac` now is.
pub fn learning_frame(mac: Mac) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&vip_packet::BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_LEARN.to_be_bytes());
    f.extend_from_slice(b"vip MAC move");
    f.resize(60, 0);
    f
}

struct Pending {
    due: Instant,
    seq: u64,
    vip: u32,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

struct Lane {
    sock: PacketSocket,
    tokens: f64,
    refilled: Instant,
    queue: BinaryHeap<Reverse<Pending>>,
}

pub struct Announcer {
    count: u32,
    interval: Duration,
    rate: f64,
    burst: f64,
    seq: u64,
    lanes: HashMap<u32, Lane>,
    pub sent: u64,
    pub send_errors: u64,
}

impl Announcer {
    pub fn new(count: u32, interval: Duration, max_per_second: u32) -> Announcer {
        let rate = max_per_second as f64;
        // A tenth of a second's worth may go at once, so a failover's first round leaves
        // immediately unless it is very large.
        let burst = (rate / 10.0).max(1.0);
        Announcer { count, interval, rate, burst, seq: 0, lanes: HashMap::new(), sent: 0, send_errors: 0 }
    }

    /// Opens the sending socket for an adapter (again, if it was re-created).
    pub fn add_adapter(&mut self, ifindex: u32) -> std::io::Result<()> {
        let sock = PacketSocket::open(ifindex, false)?;
        let (tokens, refilled) = (self.burst, Instant::now());
        self.lanes.insert(ifindex, Lane { sock, tokens, refilled, queue: BinaryHeap::new() });
        Ok(())
    }

    pub fn remove_adapter(&mut self, ifindex: u32) {
        self.lanes.remove(&ifindex);
    }

    /// Drops everything still queued on an adapter (it went down).
    pub fn clear(&mut self, ifindex: u32) {
        if let Some(l) = self.lanes.get_mut(&ifindex) {
            l.queue.clear();
        }
    }

    /// Drops what is queued for one VIP on one adapter (the VIP left it).
    pub fn cancel(&mut self, ifindex: u32, vip: u32) {
        if let Some(l) = self.lanes.get_mut(&ifindex) {
            l.queue.retain(|p| p.0.vip != vip);
        }
    }

    /// Queues `count` rounds of `frame` on `ifindex`, the first due `now`.
    pub fn queue(&mut self, ifindex: u32, vip: u32, frame: Vec<u8>, now: Instant) {
        let Some(lane) = self.lanes.get_mut(&ifindex) else { return };
        for round in 0..self.count {
            self.seq += 1;
            let due = now + self.interval * round;
            lane.queue.push(Reverse(Pending { due, seq: self.seq, vip, frame: frame.clone() }));
        }
    }

    /// Queues `frame` once (a correction), due `now`.
    pub fn queue_once(&mut self, ifindex: u32, vip: u32, frame: Vec<u8>, now: Instant) {
        let Some(lane) = self.lanes.get_mut(&ifindex) else { return };
        self.seq += 1;
        lane.queue.push(Reverse(Pending { due: now, seq: self.seq, vip, frame }));
    }

    /// Sends whatever is due and allowed by each bucket. Returns when the first frame of
    /// this call left (if any) and when the pump should run next.
    pub fn pump(&mut self, now: Instant) -> (Option<Instant>, Option<Instant>) {
        let mut first = None;
        let mut next: Option<Instant> = None;
        for lane in self.lanes.values_mut() {
            lane.tokens = (lane.tokens + now.duration_since(lane.refilled).as_secs_f64() * self.rate).min(self.burst);
            lane.refilled = now;
            while let Some(Reverse(p)) = lane.queue.peek() {
                if p.due > now {
                    next = Some(next.map_or(p.due, |n| n.min(p.due)));
                    break;
                }
                if lane.tokens < 1.0 {
                    let wait = Duration::from_secs_f64((1.0 - lane.tokens) / self.rate);
                    next = Some(next.map_or(now + wait, |n| n.min(now + wait)));
                    break;
                }
                lane.tokens -= 1.0;
                let Reverse(p) = lane.queue.pop().expect("peeked");
                match lane.sock.send(&p.frame) {
                    Ok(()) => {
                        self.sent += 1;
                        if first.is_none() {
                            first = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        self.send_errors += 1;
                        tracing::warn!(ifindex = lane.sock.ifindex(), error = %e, "announcement not sent");
                    }
                }
            }
        }
        (first, next)
    }

    pub fn queued(&self) -> usize {
        self.lanes.values().map(|l| l.queue.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_back_as_announcements() {
        let mac = [2, 0, 0, 0, 1, 1];
        let f = frame(mac, "192.0.2.10".parse().unwrap(), 0);
        let a = vip_packet::parse_arp(&f).expect("arp");
        assert_eq!((a.sha, a.spa, a.tpa, a.op), (mac, "192.0.2.10".parse().unwrap(), "192.0.2.10".parse().unwrap(), 1));
        let f = frame(mac, "2001:db8::10".parse().unwrap(), 100);
        let e = vip_packet::parse_eth(&f).expect("eth");
        assert_eq!(e.vlan(), 100);
        let n = vip_packet::parse_nd(&f).expect("nd");
        assert_eq!(n.icmp_type, vip_packet::ND_NEIGHBOR_ADVERT);
        assert_eq!(n.flags, vip_packet::NA_FLAG_OVERRIDE);
        assert!(vip_packet::icmpv6_checksum_ok(&n.src, &n.dst, &n.icmp_bytes()));
    }
}
