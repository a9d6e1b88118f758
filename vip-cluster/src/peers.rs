//! What a node knows of its peers from their heartbeats, and what that proves: the pure
//! half of the cluster's safety (times are arguments, in boot-clock nanoseconds; no
//! sockets, no clock of its own).
//!
//! * **Acks.** Each heartbeat carries, per member, the newest sequence number heard from
//!   it. A node's *peer deadline* is `sent(m) + fence` for the newest of its own sequence
//!   numbers `m` that a majority of the members (itself included) has acked, counting
//!   only peers that go by the same member list version.
//! * **Votes.** A node stops acking a peer incarnation for good when it has heard nothing
//!   new from it for `suspect` (or the peer left the member list); once the last new
//!   sequence number it acked was received at least `suspect` ago, it *votes* against it.
//! * **Cut.** The leader may move a node's VIPs without waiting for its deadline when
//!   enough members vote against it that no majority can ack it any more
//!   (`n - majority + 1` of them). Since `suspect >= fence x RATE`, by the time a vote is
//!   cast the acks it withdrew have expired: whatever majority last acked the node
//!   included a voter, and that voter received the acked heartbeat at least `suspect`
//!   before voting. Members that moved to a newer list stop counting for the node too,
//!   but only `fence x RATE` after the leader saw them move.
//!
//! The one assumption is on clock *rate*: any two nodes' clocks advance within
//! [`MAX_RATE_ERROR`] of each other. Clocks are never compared, only durations.

use std::collections::{HashMap, VecDeque};

use crate::wire::{Heartbeat, Incarnation, FLAG_LEAVING};

/// How far apart two nodes' clock rates may be (1%: NTP keeps real machines within
/// 0.01%, virtual machines within 0.1%).
pub const MAX_RATE_ERROR: f64 = 0.01;

/// A duration measured on one node that is surely at least `d` on every other:
/// `d x (1 + e) / (1 - e)`.
pub fn rate_margin(d: u64) -> u64 {
    (d as f64 * (1.0 + MAX_RATE_ERROR) / (1.0 - MAX_RATE_ERROR)).ceil() as u64
}

/// Own heartbeats remembered (for their send times): 4 s at 10 ms.
const SENT_KEPT: usize = 400;
/// A member never heard from is suspected only this long after it joined: its first
/// heartbeats may wait for the network (address resolution) and it holds nothing yet.
pub const JOIN_GRACE_NS: u64 = 2_000_000_000;
/// Former members remembered.
const FORMER_KEPT: usize = 64;
/// Member lists remembered by version (for peers that still go by an older one).
const VIEWS_KEPT: usize = 8;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Silence after which a peer is suspected (and no longer acked).
    pub suspect_ns: u64,
    /// How long a majority's ack keeps a node answering.
    pub fence_ns: u64,
}

impl Timing {
    /// The rule the safety argument needs: a vote is never cast before the acks it
    /// withdraws have expired, on any node's clock.
    pub fn check(&self) -> Result<(), String> {
        if self.suspect_ns < rate_margin(self.fence_ns) {
            return Err(format!(
                "suspect ({} ms) must be at least fence x {:.3} ({} ms)",
                self.suspect_ns / 1_000_000,
                (1.0 + MAX_RATE_ERROR) / (1.0 - MAX_RATE_ERROR),
                rate_margin(self.fence_ns).div_ceil(1_000_000)
            ));
        }
        Ok(())
    }
}

/// A member list, as the leader wrote it (its version is the etcd revision of that write).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    pub version: u64,
    pub members: Vec<Incarnation>,
}

impl View {
    pub fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }
    /// Members that must vote against a node before no majority can ack it.
    pub fn cut_size(&self) -> usize {
        self.members.len() + 1 - self.majority()
    }
}

#[derive(Debug, Clone, Default)]
struct Peer {
    /// Newest sequence number heard, and when it arrived.
    seq: u64,
    heard_at: Option<u64>,
    /// When it joined this node's view (a peer never heard is suspected from there).
    known_at: u64,
    /// Newest of this node's sequence numbers it acked (under the same view).
    acked_me: u64,
    /// The view version it goes by, and when that was last seen to change.
    version: u64,
    version_seen_at: u64,
    votes: Vec<Incarnation>,
    leaving: bool,
}

/// This node's side of the heartbeat protocol.
#[derive(Debug)]
pub struct Peers {
    me: Incarnation,
    timing: Timing,
    view: View,
    views: VecDeque<View>,
    /// When this node moved to its current view.
    view_since: u64,
    seq: u64,
    sent: VecDeque<(u64, u64)>,
    peers: HashMap<Incarnation, Peer>,
    /// Peers that left the view, as last known (the leader still has to prove them cut).
    former: HashMap<Incarnation, Peer>,
    /// Incarnations no longer acked, for good: when their last acked heartbeat arrived
    /// (None: never heard).
    stopped: HashMap<Incarnation, Option<u64>>,
}

/// Why the leader may (or may not yet) move a node's VIPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// No majority can ack it since this time (this node's clock): its peer deadline
    /// has passed then.
    At(u64),
    /// Not provable yet: so many more members must vote (or move to a newer view).
    Needs(usize),
}

impl Peers {
    pub fn new(me: Incarnation, timing: Timing) -> Peers {
        Peers {
            me,
            timing,
            view: View::default(),
            views: VecDeque::new(),
            view_since: 0,
            seq: 0,
            sent: VecDeque::new(),
            peers: HashMap::new(),
            former: HashMap::new(),
            stopped: HashMap::new(),
        }
    }

    pub fn me(&self) -> Incarnation {
        self.me
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// A new member list from etcd. Peers that left it are no longer acked.
    pub fn set_view(&mut self, view: View, now: u64) {
        if view.version <= self.view.version && !self.view.members.is_empty() {
            return;
        }
        for gone in self.view.members.iter().filter(|m| !view.members.contains(m)) {
            if *gone != self.me {
                let heard = self.peers.get(gone).and_then(|p| p.heard_at);
                self.stopped.entry(*gone).or_insert(heard);
            }
        }
        for m in &view.members {
            if *m != self.me {
                self.peers.entry(*m).or_insert_with(|| Peer { known_at: now, ..Default::default() });
            }
        }
        let gone: Vec<Incarnation> = self.peers.keys().filter(|k| !view.members.contains(k)).copied().collect();
        for k in gone {
            if let Some(p) = self.peers.remove(&k) {
                self.former.insert(k, p);
            }
        }
        if self.former.len() > FORMER_KEPT {
            let mut old: Vec<(u64, Incarnation)> = self.former.iter().map(|(k, p)| (p.heard_at.unwrap_or(p.known_at), *k)).collect();
            old.sort();
            for (_, k) in old.iter().take(self.former.len() - FORMER_KEPT) {
                self.former.remove(k);
            }
        }
        self.views.push_back(view.clone());
        while self.views.len() > VIEWS_KEPT {
            self.views.pop_front();
        }
        self.view = view;
        self.view_since = now;
    }

    /// Suspects the peers silent for `suspect` (never heard: [`JOIN_GRACE_NS`] after they
    /// joined, since a new member holds nothing yet). Returns the ones suspected now.
    pub fn tick(&mut self, now: u64) -> Vec<Incarnation> {
        let s = self.timing.suspect_ns;
        let mut new = vec![];
        for (who, p) in &self.peers {
            if self.stopped.contains_key(who) {
                continue;
            }
            let (since, after) = match p.heard_at {
                Some(h) => (h, s),
                None => (p.known_at, s.max(JOIN_GRACE_NS)),
            };
            if now.saturating_sub(since) >= after {
                self.stopped.insert(*who, p.heard_at);
                new.push(*who);
            }
        }
        new
    }

    /// Whether this node still acks `who`.
    pub fn acking(&self, who: &Incarnation) -> bool {
        self.peers.contains_key(who) && !self.stopped.contains_key(who)
    }

    /// Incarnations this node votes against now.
    pub fn my_votes(&self, now: u64) -> Vec<Incarnation> {
        let s = self.timing.suspect_ns;
        let mut v: Vec<Incarnation> =
            self.stopped.iter().filter(|(_, heard)| heard.is_none_or(|h| now.saturating_sub(h) >= s)).map(|(k, _)| *k).collect();
        v.sort();
        v
    }

    /// The next heartbeat to send (the same frame goes out on every path).
    pub fn heartbeat(&mut self, cluster: u64, leaving: bool, now: u64) -> Heartbeat {
        self.seq += 1;
        self.sent.push_back((self.seq, now));
        while self.sent.len() > SENT_KEPT {
            self.sent.pop_front();
        }
        let mut acks: Vec<(Incarnation, u64)> =
            self.peers.iter().filter(|(k, p)| p.heard_at.is_some() && !self.stopped.contains_key(k)).map(|(k, p)| (*k, p.seq)).collect();
        acks.sort();
        Heartbeat {
            cluster,
            from: self.me,
            seq: self.seq,
            members: self.view.version,
            flags: if leaving { FLAG_LEAVING } else { 0 },
            acks,
            votes: self.my_votes(now),
        }
    }

    /// A heartbeat received (any path; duplicates are harmless).
    pub fn receive(&mut self, hb: &Heartbeat, now: u64) {
        if hb.from == self.me || self.stopped.contains_key(&hb.from) {
            return;
        }
        let Some(p) = self.peers.get_mut(&hb.from) else { return };
        if hb.seq > p.seq || p.heard_at.is_none() {
            p.seq = p.seq.max(hb.seq);
            p.heard_at = Some(now);
        }
        if hb.members != p.version {
            p.version = hb.members;
            p.version_seen_at = now;
        }
        p.votes = hb.votes.clone();
        p.leaving = hb.flags & FLAG_LEAVING != 0;
        if hb.members == self.view.version {
            if let Some((_, seq)) = hb.acks.iter().find(|(who, _)| *who == self.me) {
                p.acked_me = p.acked_me.max(*seq);
            }
        }
    }

    /// Until when a majority's acks keep this node answering (None: no majority acks it).
    pub fn deadline(&self) -> Option<u64> {
        let mut acks: Vec<u64> = self.peers.values().filter(|p| p.version == self.view.version).map(|p| p.acked_me).collect();
        acks.push(self.seq);
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let m = *acks.get(self.view.majority().checked_sub(1)?)?;
        if m == 0 || !self.view.members.contains(&self.me) {
            return None;
        }
        let sent = self.sent.iter().find(|(s, _)| *s == m)?.1;
        Some(sent + self.timing.fence_ns)
    }

    /// When this node or one of its peers last moved to another member list (acks
    /// count only between nodes on the same one, so support pauses for a heartbeat or two).
    pub fn view_moved_at(&self) -> u64 {
        self.peers.values().map(|p| p.version_seen_at).fold(self.view_since, u64::max)
    }

    /// The peer heard last (for status): when, and whether it said it is leaving.
    pub fn heard(&self, who: &Incarnation) -> Option<(u64, bool)> {
        self.peers.get(who).or_else(|| self.former.get(who)).and_then(|p| Some((p.heard_at?, p.leaving)))
    }

    /// The leader's question: can `x` no longer be acked by a majority, and since when?
    pub fn cut(&self, x: &Incarnation, now: u64) -> Cut {
        // The view x goes by: what it last said, or ours if never heard.
        let px = self.peers.get(x).or_else(|| self.former.get(x));
        let vx = px.filter(|p| p.heard_at.is_some()).map_or(self.view.version, |p| p.version);
        let Some(view) = self.views.iter().rev().find(|v| v.version == vx) else {
            // A view this node never had: wait for x's key to go (the lease backstop).
            return Cut::Needs(usize::MAX);
        };
        let wait = rate_margin(self.timing.fence_ns);
        let mut times: Vec<u64> = vec![];
        for m in view.members.iter().filter(|m| *m != x) {
            let t = if *m == self.me {
                if self.my_votes(now).contains(x) {
                    Some(now)
                } else if self.view.version != vx {
                    Some(self.view_since + wait)
                } else {
                    None
                }
            } else {
                match self.peers.get(m) {
                    Some(p) if p.version == vx && p.votes.contains(x) => Some(now),
                    Some(p) if p.heard_at.is_some() && p.version != vx => Some(p.version_seen_at + wait),
                    _ => None,
                }
            };
            times.extend(t);
        }
        let need = view.cut_size();
        if times.len() < need {
            return Cut::Needs(need - times.len());
        }
        times.sort_unstable();
        Cut::At(times[need - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn inc(n: u64) -> Incarnation {
        Incarnation { node: n, incarnation: 100 + n }
    }

    fn timing() -> Timing {
        Timing { suspect_ns: 100 * MS, fence_ns: 80 * MS }
    }

    /// A cluster of `n` nodes on one view, exchanging heartbeats every 10 ms through a
    /// network that delivers `link(from, to)`.
    struct Sim {
        nodes: Vec<Peers>,
        now: u64,
    }

    impl Sim {
        fn new(n: u64) -> Sim {
            let view = View { version: 7, members: (1..=n).map(inc).collect() };
            let nodes = (1..=n)
                .map(|i| {
                    let mut p = Peers::new(inc(i), timing());
                    p.set_view(view.clone(), 0);
                    p
                })
                .collect();
            Sim { nodes, now: 0 }
        }

        /// Runs `ms` milliseconds; `alive(i)` and `link(i, j)` say who sends and what arrives.
        fn run(&mut self, ms: u64, alive: impl Fn(usize) -> bool, link: impl Fn(usize, usize) -> bool) {
            for _ in 0..ms / 10 {
                self.now += 10 * MS;
                let n = self.nodes.len();
                let hbs: Vec<Option<Heartbeat>> =
                    (0..n).map(|i| alive(i).then(|| self.nodes[i].heartbeat(1, false, self.now))).collect();
                for (i, hb) in hbs.iter().enumerate() {
                    let Some(hb) = hb else { continue };
                    for j in 0..n {
                        if j != i && alive(j) && link(i, j) {
                            self.nodes[j].receive(hb, self.now);
                        }
                    }
                }
                for (i, node) in self.nodes.iter_mut().enumerate() {
                    if alive(i) {
                        node.tick(self.now);
                    }
                }
            }
        }

        fn answering(&self, i: usize, at: u64) -> bool {
            self.nodes[i].deadline().is_some_and(|d| d > at)
        }
    }

    #[test]
    fn timing_rule() {
        assert!(timing().check().is_ok());
        assert!(Timing { suspect_ns: 80 * MS, fence_ns: 80 * MS }.check().is_err());
        // 80 ms x 1.01 / 0.99 = 81.6 ms.
        assert!(Timing { suspect_ns: 81 * MS, fence_ns: 80 * MS }.check().is_err());
        assert!(Timing { suspect_ns: 82 * MS, fence_ns: 80 * MS }.check().is_ok());
    }

    #[test]
    fn a_healthy_cluster_keeps_everyone_answering() {
        for n in [1, 2, 3, 5] {
            let mut s = Sim::new(n);
            s.run(300, |_| true, |_, _| true);
            for i in 0..n as usize {
                assert!(s.answering(i, s.now), "{n} nodes: node {i} not answering");
                let d = s.nodes[i].deadline().unwrap();
                assert!(d >= s.now + 60 * MS, "{n} nodes: node {i} deadline only {} ms ahead", (d - s.now) / MS);
                assert!(s.nodes[i].my_votes(s.now).is_empty());
            }
        }
    }

    #[test]
    fn a_member_list_change_pauses_support_for_a_heartbeat_or_two_and_says_when() {
        let mut s = Sim::new(3);
        s.run(200, |_| true, |_, _| true);
        let before = s.nodes[0].view_moved_at();
        // Node 0 gets the new list first: its peers' acks stop counting for it until they
        // have the list too, and view_moved_at says so (the runtime then keeps the
        // deadline in force rather than turning to etcd).
        let v8 = View { version: 8, members: (1..=3).map(inc).collect() };
        s.nodes[0].set_view(v8.clone(), s.now);
        assert!(s.nodes[0].view_moved_at() > before);
        assert_eq!(s.nodes[0].deadline(), None, "no peer on list 8 yet");
        for i in 1..3 {
            s.nodes[i].set_view(v8.clone(), s.now + MS);
        }
        s.run(20, |_| true, |_, _| true);
        assert!(s.answering(0, s.now), "support back within two heartbeats");
        assert!(s.nodes[0].view_moved_at() >= s.now - 20 * MS, "peers seen moving count too");
    }

    /// The safety property, scenario by scenario: whenever the leader (node 0) may cut a
    /// node, that node's own deadline has already passed.
    #[test]
    fn a_cut_node_has_stopped_answering() {
        struct Case {
            what: &'static str,
            n: u64,
            victim: usize,
            alive: fn(usize) -> bool,
            link: fn(usize, usize) -> bool,
            cut_within_ms: Option<u64>,
        }
        let cases = [
            Case { what: "3 nodes, node 2 dies", n: 3, victim: 2, alive: |i| i != 2, link: |_, _| true, cut_within_ms: Some(130) },
            Case { what: "2 nodes, node 1 dies", n: 2, victim: 1, alive: |i| i != 1, link: |_, _| true, cut_within_ms: Some(130) },
            Case { what: "5 nodes, node 4 dies", n: 5, victim: 4, alive: |i| i != 4, link: |_, _| true, cut_within_ms: Some(130) },
            Case {
                what: "3 nodes, node 2 cut off from everyone but alive",
                n: 3,
                victim: 2,
                alive: |_| true,
                link: |i, j| i != 2 && j != 2,
                cut_within_ms: Some(130),
            },
            Case {
                what: "3 nodes, node 2 hears the others but they do not hear it",
                n: 3,
                victim: 2,
                alive: |_| true,
                link: |i, _| i != 2,
                cut_within_ms: Some(130),
            },
            Case {
                what: "5 nodes, node 4 still reaches node 3 only: 2 of 5 is no majority",
                n: 5,
                victim: 4,
                alive: |_| true,
                link: |i, j| (i != 4 && j != 4) || (i, j) == (4, 3) || (i, j) == (3, 4),
                cut_within_ms: Some(130),
            },
            Case {
                what: "5 nodes, node 4 still reaches nodes 2 and 3: it keeps a majority, never cut",
                n: 5,
                victim: 4,
                alive: |_| true,
                link: |i, j| !matches!((i.min(j), i.max(j)), (0, 4) | (1, 4)),
                cut_within_ms: None,
            },
            Case {
                what: "3 nodes, the leader alone loses node 2: node 1 still acks it, no cut",
                n: 3,
                victim: 2,
                alive: |_| true,
                link: |i, j| !matches!((i.min(j), i.max(j)), (0, 2)),
                cut_within_ms: None,
            },
        ];
        for c in cases {
            let mut s = Sim::new(c.n);
            s.run(200, |_| true, |_, _| true);
            let t0 = s.now;
            let x = inc(c.victim as u64 + 1);
            let mut cut_at = None;
            for _ in 0..100 {
                s.run(10, c.alive, c.link);
                if let Cut::At(t) = s.nodes[0].cut(&x, s.now) {
                    // Safety: at the cut time the victim's own deadline has passed
                    // (both clocks are one here; rate errors are covered by the margin).
                    if (c.alive)(c.victim) {
                        assert!(!s.answering(c.victim, t.max(s.now)), "{}: cut at {} ms while it answers", c.what, (t - t0) / MS);
                    }
                    cut_at.get_or_insert(t);
                }
            }
            match (c.cut_within_ms, cut_at) {
                (Some(ms), Some(t)) => assert!(t - t0 <= ms * MS, "{}: cut only after {} ms", c.what, (t - t0) / MS),
                (Some(_), None) => panic!("{}: never cut", c.what),
                (None, Some(t)) => panic!("{}: cut after {} ms though a majority acks it", c.what, (t - t0) / MS),
                (None, None) => assert!(s.answering(c.victim, s.now), "{}: should still answer", c.what),
            }
        }
    }

    #[test]
    fn a_node_without_a_majority_stops_answering_within_fence() {
        let mut s = Sim::new(3);
        s.run(200, |_| true, |_, _| true);
        let t0 = s.now;
        // Node 0 hears nothing any more.
        s.run(100, |_| true, |i, j| i != 0 && j != 0);
        let d = s.nodes[0].deadline().unwrap();
        assert!(d <= t0 + 80 * MS, "deadline {} ms after the partition", (d - t0) / MS);
        // The other two still ack each other.
        assert!(s.answering(1, s.now) && s.answering(2, s.now));
    }

    #[test]
    fn a_suspected_incarnation_is_never_acked_again() {
        let mut s = Sim::new(3);
        s.run(200, |_| true, |_, _| true);
        s.run(150, |_| true, |i, j| i != 2 && j != 2);
        assert!(!s.nodes[0].acking(&inc(3)) && !s.nodes[1].acking(&inc(3)));
        // The network heals: node 2 is heard again but gets no majority back.
        s.run(300, |_| true, |_, _| true);
        assert!(!s.nodes[0].acking(&inc(3)));
        assert!(!s.answering(2, s.now), "a suspected incarnation regained a majority");
        assert!(matches!(s.nodes[0].cut(&inc(3), s.now), Cut::At(_)));
    }

    #[test]
    fn a_peer_on_another_view_does_not_count() {
        let mut s = Sim::new(3);
        s.run(200, |_| true, |_, _| true);
        // Nodes 0 and 1 move to a view without node 2 (the leader removed it).
        let v = View { version: 8, members: vec![inc(1), inc(2)] };
        let t0 = s.now;
        s.nodes[0].set_view(v.clone(), s.now);
        s.nodes[1].set_view(v, s.now);
        s.run(20, |_| true, |_, _| true);
        // Node 2 no longer has a majority of its own view acking it...
        let mut cut = None;
        for _ in 0..30 {
            s.run(10, |_| true, |_, _| true);
            if let Cut::At(t) = s.nodes[0].cut(&inc(3), s.now) {
                assert!(!s.answering(2, t.max(s.now)), "cut while node 2 answers");
                cut.get_or_insert(t);
            }
        }
        let t = cut.expect("node 2 cut after the view change");
        assert!(t - t0 <= 130 * MS, "cut after {} ms", (t - t0) / MS);
        assert!(!s.answering(2, s.now));
        // ...and the two others keep answering on the new view.
        assert!(s.answering(0, s.now) && s.answering(1, s.now));
    }

    #[test]
    fn one_node_alone_answers_on_its_own_majority() {
        let mut s = Sim::new(1);
        s.run(50, |_| true, |_, _| true);
        assert!(s.answering(0, s.now));
    }
}

#[cfg(test)]
mod former {
    use super::*;

    const MS: u64 = 1_000_000;

    fn inc(n: u64) -> Incarnation {
        Incarnation { node: n, incarnation: 100 + n }
    }

    /// A member dropped from the leader's view is still judged by the view it went by: the
    /// leader may not cut it while a lagging peer of the old view still acks it.
    #[test]
    fn a_former_member_is_cut_in_its_own_view() {
        let t = Timing { suspect_ns: 100 * MS, fence_ns: 80 * MS };
        let old = View { version: 7, members: vec![inc(1), inc(2), inc(3)] };
        let new = View { version: 8, members: vec![inc(1), inc(2)] };
        let mut a = Peers::new(inc(1), t);
        let mut b = Peers::new(inc(2), t);
        let mut x = Peers::new(inc(3), t);
        for p in [&mut a, &mut b, &mut x] {
            p.set_view(old.clone(), 0);
        }
        let mut now = 0;
        let step = |a: &mut Peers, b: &mut Peers, x: &mut Peers, now: u64, b_hears_x: bool| {
            let (ha, hb, hx) = (a.heartbeat(1, false, now), b.heartbeat(1, false, now), x.heartbeat(1, false, now));
            a.receive(&hb, now);
            a.receive(&hx, now);
            b.receive(&ha, now);
            if b_hears_x {
                b.receive(&hx, now);
            }
            x.receive(&ha, now);
            x.receive(&hb, now);
            for p in [a, b, x] {
                p.tick(now);
            }
        };
        for _ in 0..20 {
            now += 10 * MS;
            step(&mut a, &mut b, &mut x, now, true);
        }
        // Only the leader (a) moves to the new view; b lags and keeps acking x.
        a.set_view(new, now);
        for _ in 0..30 {
            now += 10 * MS;
            step(&mut a, &mut b, &mut x, now, true);
            if let Cut::At(t) = a.cut(&inc(3), now) {
                assert!(t > now, "cut while b still acks x under the old view (x answers: {:?})", x.deadline().map(|d| d > now));
            }
            assert!(x.deadline().is_some_and(|d| d > now), "x lost its majority of the old view");
        }
        // b stops hearing x: it votes after suspect_ms, and then the leader may cut x.
        let from = now;
        let mut cut = None;
        for _ in 0..30 {
            now += 10 * MS;
            step(&mut a, &mut b, &mut x, now, false);
            if let Cut::At(t) = a.cut(&inc(3), now) {
                if t <= now {
                    assert!(x.deadline().is_none_or(|d| d <= now), "cut while x answers");
                    cut.get_or_insert(now);
                }
            }
        }
        let c = cut.expect("x cut once b votes");
        assert!(c - from <= 130 * MS, "cut {} ms after b stopped hearing x", (c - from) / MS);
    }
}
