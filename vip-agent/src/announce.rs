//! Gratuitous ARP and unsolicited NA announcements, unicast corrections and MAC-move
//! learning frames, sent by a thread of their own and paced per adapter.
//!
//! The agent's event loop hands over jobs and never waits on a send. A job names a range
//! of VIPs (a run of one class), not a list of frames: frames are built as they go out,
//! so 100,000 VIPs cost a few bytes of queue. A new job for the same (adapter, run)
//! replaces the pending one, so a flapping link cannot pile up rounds; single frames are
//! bounded. Each adapter has a token bucket of `max_per_second` (a tenth of a second's
//! worth, at most [`crate::packet::BURST`] frames, may go at once) so that thousands of
//! VIPs moving neither flood the switch nor fill the adapter's queue.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use vip_packet::{Arp, Mac, Nd};
use vip_placement::Classes;

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
pub fn unicast_frame(
    mac: Mac,
    addr: IpAddr,
    vlan: u16,
    client_mac: Mac,
    client: IpAddr,
) -> Vec<u8> {
    match (addr, client) {
        (IpAddr::V4(a), IpAddr::V4(c)) => {
            let f = Arp {
                eth_dst: client_mac,
                eth_src: mac,
                tci: None,
                op: 2,
                sha: mac,
                spa: a,
                tha: client_mac,
                tpa: c,
            };
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

/// Every VIP, by index: what announcements are built from.
pub type Addresses = Arc<Vec<crate::agent::VipSpec>>;

/// What the event loop asks of the announcer.
pub enum Job {
    /// The VIP list changed (the cluster's definitions): announcements queued for the old
    /// list are dropped, later jobs index the new one.
    Addresses(Addresses),
    /// Opens the sending socket of an adapter (again, if it was re-created).
    AddAdapter {
        ifindex: u32,
    },
    RemoveAdapter {
        ifindex: u32,
    },
    /// The adapter went down: drop everything queued on it.
    Clear {
        ifindex: u32,
    },
    /// Stop announcing class `class`'s members on the adapter (it no longer answers them).
    Cancel {
        ifindex: u32,
        class: u32,
    },
    /// `count` rounds announcing members `start .. start + len` of class `class` from
    /// `mac` on `ifindex`. Replaces a pending job for the same adapter and run.
    Vips {
        ifindex: u32,
        mac: Mac,
        classes: Arc<Classes>,
        class: u32,
        start: u32,
        len: u32,
        tag: Option<u64>,
    },
    /// One frame (a unicast correction), sent once. Replaces a pending one with the same key.
    Frame {
        ifindex: u32,
        frame: Vec<u8>,
        key: u64,
        tag: Option<u64>,
    },
    /// `count` rounds of the learning frame from `mac` (a MAC that moved, or came home),
    /// and with `keep` one every [`KEEP_LEARNING`] after that, so the switch's entry
    /// for a moved MAC never ages out. Cancels the learning frames for `mac` queued on
    /// other adapters.
    Learn {
        ifindex: u32,
        mac: Mac,
        tag: Option<u64>,
        keep: bool,
    },
}

/// Counters the status reads while the thread runs.
#[derive(Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
    /// Corrections not queued because the queue was full.
    pub dropped: AtomicU64,
    /// Frames still to send (an estimate: ranges count their remaining VIPs).
    pub queued: AtomicU64,
}

/// Told once per (tag, adapter): the first frame of a tagged job left at this instant.
pub type OnSent = Box<dyn Fn(u64, u32, Instant) + Send>;

/// The handle the event loop keeps.
#[derive(Clone)]
pub struct Announcer {
    tx: mpsc::Sender<Job>,
    pub stats: Arc<Stats>,
}

impl Announcer {
    /// The handle, and the thread's body to run (see `runtime::supervised`). `on_sent`
    /// is called from that thread.
    pub fn new(
        count: u32,
        interval: Duration,
        max_per_second: u32,
        addrs: Addresses,
        on_sent: OnSent,
    ) -> (Announcer, impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let mut worker = Worker::new(
            count,
            interval,
            max_per_second,
            addrs,
            stats.clone(),
            on_sent,
        );
        (Announcer { tx, stats }, move || worker.run(rx))
    }

    pub fn send(&self, job: Job) {
        // The thread ends only with the process; a failed send means it died, which its
        // supervisor reports.
        let _ = self.tx.send(job);
    }

    pub fn sent(&self) -> u64 {
        self.stats.sent.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> u64 {
        self.stats.queued.load(Ordering::Relaxed)
    }
}

/// How often an heir re-teaches the switch a MAC that moved to it (switches age entries
/// out after about 300 s).
pub const KEEP_LEARNING: Duration = Duration::from_secs(30);

/// At most this many single frames wait per adapter; more are dropped (and counted).
const MAX_FRAMES_PER_LANE: usize = 65_536;

enum Work {
    Vips {
        mac: Mac,
        classes: Arc<Classes>,
        class: u32,
        start: u32,
        len: u32,
        cursor: u32,
        round: u32,
        /// When this round's first frame left: the next round is due `interval` later.
        begun: Option<Instant>,
        key: (u32, u32),
    },
    Frame {
        frame: Vec<u8>,
        key: u64,
    },
    Learn {
        mac: Mac,
        round: u32,
        keep: bool,
    },
}

struct Entry {
    work: Work,
    tag: Option<u64>,
    /// Times the device was busy for it.
    busy: u32,
}

struct Lane {
    sock: PacketSocket,
    tokens: f64,
    refilled: Instant,
    /// (due, id); ids no longer in `entries` were replaced or cancelled.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    entries: HashMap<u64, Entry>,
    runs: HashMap<(u32, u32), u64>,
    frames: HashMap<u64, u64>,
    /// Learning frames by MAC (an heir may hold several moved MACs).
    learn: HashMap<Mac, u64>,
}

struct Worker {
    count: u32,
    interval: Duration,
    rate: f64,
    burst: f64,
    next_id: u64,
    addrs: Addresses,
    lanes: HashMap<u32, Lane>,
    stats: Arc<Stats>,
    on_sent: OnSent,
    told: std::collections::HashSet<(u64, u32)>,
}

impl Worker {
    fn new(
        count: u32,
        interval: Duration,
        max_per_second: u32,
        addrs: Addresses,
        stats: Arc<Stats>,
        on_sent: OnSent,
    ) -> Worker {
        let rate = max_per_second as f64;
        Worker {
            count: count.max(1),
            interval,
            rate,
            burst: (rate / 10.0).clamp(1.0, crate::packet::BURST as f64),
            next_id: 0,
            addrs,
            lanes: HashMap::new(),
            stats,
            on_sent,
            told: Default::default(),
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        let mut next: Option<Instant> = None;
        loop {
            let job = match next {
                Some(t) => match rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
                    Ok(j) => Some(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(j) => Some(j),
                    Err(_) => return,
                },
            };
            let now = Instant::now();
            if let Some(j) = job {
                self.take(j, now);
                // Everything already queued comes in before sending: a burst of jobs is
                // deduplicated as a whole.
                while let Ok(j) = rx.try_recv() {
                    self.take(j, now);
                }
            }
            next = self.pump(Instant::now());
            self.stats.queued.store(self.queued(), Ordering::Relaxed);
        }
    }

    fn push(&mut self, ifindex: u32, due: Instant, e: Entry) -> Option<u64> {
        let lane = self.lanes.get_mut(&ifindex)?;
        self.next_id += 1;
        let id = self.next_id;
        lane.heap.push(Reverse((due, id)));
        lane.entries.insert(id, e);
        Some(id)
    }

    fn take(&mut self, job: Job, now: Instant) {
        match job {
            Job::Addresses(a) => {
                self.addrs = a;
                for l in self.lanes.values_mut() {
                    l.heap.clear();
                    l.entries.clear();
                    l.runs.clear();
                }
            }
            Job::AddAdapter { ifindex } => match PacketSocket::open(ifindex, false) {
                Ok(sock) => {
                    let lane = Lane {
                        sock,
                        tokens: self.burst,
                        refilled: now,
                        heap: BinaryHeap::new(),
                        entries: HashMap::new(),
                        runs: HashMap::new(),
                        frames: HashMap::new(),
                        learn: HashMap::new(),
                    };
                    self.lanes.insert(ifindex, lane);
                }
                Err(e) => {
                    tracing::error!(ifindex, error = %e, "no announcement socket for the adapter")
                }
            },
            Job::RemoveAdapter { ifindex } => {
                self.lanes.remove(&ifindex);
            }
            Job::Clear { ifindex } => {
                if let Some(l) = self.lanes.get_mut(&ifindex) {
                    l.heap.clear();
                    l.entries.clear();
                    l.runs.clear();
                    l.frames.clear();
                    l.learn.clear();
                }
            }
            Job::Cancel { ifindex, class } => {
                if let Some(l) = self.lanes.get_mut(&ifindex) {
                    let gone: Vec<(u32, u32)> =
                        l.runs.keys().filter(|k| k.0 == class).copied().collect();
                    for k in gone {
                        if let Some(id) = l.runs.remove(&k) {
                            l.entries.remove(&id);
                        }
                    }
                }
            }
            Job::Vips {
                ifindex,
                mac,
                classes,
                class,
                start,
                len,
                tag,
            } => {
                let key = (class, start);
                if let Some(old) = self
                    .lanes
                    .get_mut(&ifindex)
                    .and_then(|l| l.runs.remove(&key))
                {
                    self.lanes
                        .get_mut(&ifindex)
                        .expect("lane")
                        .entries
                        .remove(&old);
                }
                let work = Work::Vips {
                    mac,
                    classes,
                    class,
                    start,
                    len,
                    cursor: 0,
                    round: 0,
                    begun: None,
                    key,
                };
                if let Some(id) = self.push(ifindex, now, Entry { work, tag, busy: 0 }) {
                    self.lanes
                        .get_mut(&ifindex)
                        .expect("lane")
                        .runs
                        .insert(key, id);
                }
            }
            Job::Frame {
                ifindex,
                frame,
                key,
                tag,
            } => {
                let Some(l) = self.lanes.get_mut(&ifindex) else {
                    return;
                };
                if let Some(old) = l.frames.remove(&key) {
                    l.entries.remove(&old);
                } else if l.frames.len() >= MAX_FRAMES_PER_LANE {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if let Some(id) = self.push(
                    ifindex,
                    now,
                    Entry {
                        work: Work::Frame { frame, key },
                        tag,
                        busy: 0,
                    },
                ) {
                    self.lanes
                        .get_mut(&ifindex)
                        .expect("lane")
                        .frames
                        .insert(key, id);
                }
            }
            Job::Learn {
                ifindex,
                mac,
                tag,
                keep,
            } => {
                // One place teaches the switch where a MAC is: the newest.
                for l in self.lanes.values_mut() {
                    if let Some(old) = l.learn.remove(&mac) {
                        l.entries.remove(&old);
                    }
                }
                if let Some(id) = self.push(
                    ifindex,
                    now,
                    Entry {
                        work: Work::Learn {
                            mac,
                            round: 0,
                            keep,
                        },
                        tag,
                        busy: 0,
                    },
                ) {
                    self.lanes
                        .get_mut(&ifindex)
                        .expect("lane")
                        .learn
                        .insert(mac, id);
                }
            }
        }
    }

    /// Sends what is due and allowed by each bucket; returns when to run again.
    fn pump(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut sent_events = vec![];
        for (&ifindex, lane) in self.lanes.iter_mut() {
            lane.tokens = (lane.tokens
                + now.duration_since(lane.refilled).as_secs_f64() * self.rate)
                .min(self.burst);
            lane.refilled = now;
            while let Some(&Reverse((due, id))) = lane.heap.peek() {
                if !lane.entries.contains_key(&id) {
                    lane.heap.pop();
                    continue;
                }
                if due > now {
                    next = Some(next.map_or(due, |n| n.min(due)));
                    break;
                }
                if lane.tokens < 1.0 {
                    let wait = now + Duration::from_secs_f64((1.0 - lane.tokens) / self.rate);
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                    break;
                }
                lane.heap.pop();
                let mut e = lane.entries.remove(&id).expect("present");
                // Send as much of this entry as the bucket allows; what remains goes back.
                let mut again: Option<Instant> = None;
                let mut done = false;
                match &mut e.work {
                    Work::Frame { frame, key } => {
                        if !send(
                            &lane.sock,
                            frame,
                            &self.stats,
                            e.tag,
                            ifindex,
                            &mut sent_events,
                            e.busy < BUSY_RETRIES,
                        ) {
                            e.busy += 1;
                            again = Some(now + BUSY_RETRY);
                        } else {
                            lane.tokens -= 1.0;
                            lane.frames.remove(key);
                            done = true;
                        }
                    }
                    Work::Learn { mac, round, keep } => {
                        if !send(
                            &lane.sock,
                            &learning_frame(*mac),
                            &self.stats,
                            e.tag,
                            ifindex,
                            &mut sent_events,
                            e.busy < BUSY_RETRIES,
                        ) {
                            e.busy += 1;
                            again = Some(now + BUSY_RETRY);
                        } else {
                            lane.tokens -= 1.0;
                            *round += 1;
                            if *round < self.count {
                                again = Some(now + self.interval);
                            } else if *keep {
                                again = Some(now + KEEP_LEARNING);
                            } else {
                                lane.learn.remove(mac);
                                done = true;
                            }
                        }
                    }
                    Work::Vips {
                        mac,
                        classes,
                        class,
                        start,
                        len,
                        cursor,
                        round,
                        begun,
                        key,
                    } => {
                        let begun_at = *begun.get_or_insert(now);
                        let members = classes
                            .list
                            .get(*class as usize)
                            .map(|c| &c.members[..])
                            .unwrap_or(&[]);
                        let end = (*start + *len).min(members.len() as u32);
                        let mut busy = false;
                        while *start + *cursor < end && lane.tokens >= 1.0 {
                            let vip = members[(*start + *cursor) as usize] as usize;
                            if let Some(v) = self.addrs.get(vip) {
                                let f = frame(*mac, v.addr, v.vlan);
                                if !send(
                                    &lane.sock,
                                    &f,
                                    &self.stats,
                                    e.tag,
                                    ifindex,
                                    &mut sent_events,
                                    e.busy < BUSY_RETRIES,
                                ) {
                                    e.busy += 1;
                                    busy = true;
                                    break;
                                }
                            }
                            lane.tokens -= 1.0;
                            *cursor += 1;
                        }
                        if busy {
                            again = Some(now + BUSY_RETRY);
                        } else if *start + *cursor < end {
                            // The bucket ran dry: go on when it refills.
                            again = Some(now);
                        } else {
                            *round += 1;
                            *cursor = 0;
                            *begun = None;
                            if *round < self.count {
                                again = Some(begun_at + self.interval);
                            } else {
                                lane.runs.remove(key);
                                done = true;
                            }
                        }
                    }
                }
                if !done {
                    let at = again.unwrap_or(now);
                    lane.heap.push(Reverse((at, id)));
                    lane.entries.insert(id, e);
                }
            }
        }
        for (tag, ifindex, at) in sent_events {
            if self.told.insert((tag, ifindex)) {
                (self.on_sent)(tag, ifindex, at);
            }
        }
        if self.told.len() > 4096 {
            self.told.clear();
        }
        next
    }

    fn queued(&self) -> u64 {
        self.lanes
            .values()
            .flat_map(|l| l.entries.values())
            .map(|e| match &e.work {
                Work::Vips {
                    len, cursor, round, ..
                } => {
                    (*len as u64 - *cursor as u64)
                        + (*len as u64) * (self.count.saturating_sub(*round + 1)) as u64
                }
                Work::Frame { .. } => 1,
                Work::Learn { round, .. } => self.count.saturating_sub(*round) as u64,
            })
            .sum()
    }
}

/// A device's queue full (ENOBUFS, EAGAIN: a link that just came up, a veth whose peer
/// is busy) is retried this much later, this many times.
const BUSY_RETRY: Duration = Duration::from_millis(1);
const BUSY_RETRIES: u32 = 50;

/// Sends one frame; false when the device was busy and it should be tried again.
fn send(
    sock: &PacketSocket,
    frame: &[u8],
    stats: &Stats,
    tag: Option<u64>,
    ifindex: u32,
    events: &mut Vec<(u64, u32, Instant)>,
    retry: bool,
) -> bool {
    match sock.send(frame) {
        Ok(()) => {
            stats.sent.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = tag {
                events.push((t, ifindex, Instant::now()));
            }
            true
        }
        Err(e) if retry && matches!(e.raw_os_error(), Some(libc::ENOBUFS) | Some(libc::EAGAIN)) => {
            false
        }
        Err(e) => {
            stats.send_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(ifindex, error = %e, "announcement not sent");
            true
        }
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
        assert_eq!(
            (a.sha, a.spa, a.tpa, a.op),
            (
                mac,
                "192.0.2.10".parse().unwrap(),
                "192.0.2.10".parse().unwrap(),
                1
            )
        );
        let f = frame(mac, "2001:db8::10".parse().unwrap(), 100);
        let e = vip_packet::parse_eth(&f).expect("eth");
        assert_eq!(e.vlan(), 100);
        let n = vip_packet::parse_nd(&f).expect("nd");
        assert_eq!(n.icmp_type, vip_packet::ND_NEIGHBOR_ADVERT);
        assert_eq!(n.flags, vip_packet::NA_FLAG_OVERRIDE);
        assert!(vip_packet::icmpv6_checksum_ok(
            &n.src,
            &n.dst,
            &n.icmp_bytes()
        ));
    }
}
