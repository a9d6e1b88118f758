//! The applier: turns the placement core's diff into map writes, host changes (unicast
//! filters for moved MACs) and announcements, in the order safety needs: the data plane
//! first (new placements written before VIPs point at them), the network last. Its work
//! follows the diff: segments and heirs that changed, never every VIP.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use vip_common::{client_bucket, VipInfo, VipKey, MAX_POLICIES};
use vip_placement::{bit, slots, Assignment, Diff, Mode, Segment, Slot, NO_SLOT};

use crate::{
    agent::{flow_client, flow_hash, Agent, Health},
    announce::{self, Job},
};

/// Data-plane policies (`POLICIES` entries, one per run of a class), by (stable class id,
/// first member of the run).
#[derive(Default)]
pub struct Policies {
    by_run: HashMap<(u32, u32), u32>,
    free: Vec<u32>,
    next: u32,
    /// Ids an adopted map still uses: not handed out until the VIPs moved off them.
    reserved: HashSet<u32>,
}

impl Policies {
    /// A table whose first ids avoid those an adopted map uses.
    pub fn avoiding(used: impl IntoIterator<Item = u32>) -> Policies {
        Policies { reserved: used.into_iter().collect(), ..Default::default() }
    }

    pub fn get(&self, class: u32, start: u32) -> Option<u32> {
        self.by_run.get(&(class, start)).copied()
    }

    /// The run's policy, and whether it is new.
    fn get_or_alloc(&mut self, class: u32, start: u32) -> Option<(u32, bool)> {
        if let Some(&p) = self.by_run.get(&(class, start)) {
            return Some((p, false));
        }
        let p = match self.free.pop() {
            Some(p) => p,
            None => {
                while self.reserved.contains(&self.next) {
                    self.next += 1;
                }
                if self.next >= MAX_POLICIES {
                    // Reserved ids are used last: overwritten only when nothing else is left.
                    let r = *self.reserved.iter().next()?;
                    self.reserved.remove(&r);
                    r
                } else {
                    self.next += 1;
                    self.next - 1
                }
            }
        };
        self.by_run.insert((class, start), p);
        Some((p, true))
    }

    /// Frees the policies of `class` whose runs are gone.
    fn retain(&mut self, class: u32, starts: &HashSet<u32>) {
        let gone: Vec<(u32, u32)> = self.by_run.keys().filter(|k| k.0 == class && !starts.contains(&k.1)).copied().collect();
        for k in gone {
            if let Some(p) = self.by_run.remove(&k) {
                self.free.push(p);
            }
        }
    }

    /// The adopted map's ids are no longer used.
    fn release_reserved(&mut self) {
        self.reserved.clear();
    }

    pub fn len(&self) -> usize {
        self.by_run.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_run.is_empty()
    }
}

/// VIP entries are written this many per batch; link events are looked at in between.
const VIP_CHUNK: usize = 4096;

impl Agent {
    /// Writes what a decision changed in the maps: heirs, policies and spread tables, and
    /// the VIPs whose run (so policy) changed.
    pub(crate) fn apply_maps(&mut self, df: &Diff, next: &Assignment) {
        for &(a, _, h) in &df.heirs {
            if let Err(e) = self.write_adapter(a as usize, h) {
                tracing::error!(adapter = %self.adapters[a as usize].name, error = %e, "adapter map write failed");
            }
        }
        let mut touched = HashSet::new();
        let mut repoint = vec![];
        for seg in &df.segments {
            let Some(pid) = self.write_policy(seg.class, &seg.after) else { continue };
            touched.insert(seg.class);
            if seg.relayout() {
                let members = &self.classes.list[seg.class as usize].members;
                for &v in &members[seg.start as usize..(seg.start + seg.len) as usize] {
                    if self.vip_policy[v as usize] != pid {
                        repoint.push((v, pid));
                    }
                }
            }
        }
        self.repoint(repoint);
        for c in touched {
            let starts: HashSet<u32> = next.classes[c as usize].runs.iter().map(|r| r.start).collect();
            let sid = self.class_sid[c as usize];
            self.policies.retain(sid, &starts);
        }
    }

    /// Writes run `r` of class `c` to its policy (allocating one); returns its id.
    fn write_policy(&mut self, c: u32, r: &vip_placement::Run) -> Option<u32> {
        let sid = self.class_sid[c as usize];
        let Some((pid, _)) = self.policies.get_or_alloc(sid, r.start) else {
            tracing::error!(policies = MAX_POLICIES, "no data-plane policy left for a group of VIPs; they keep their old placement");
            return None;
        };
        if let Some(b) = &r.buckets {
            let _ = self.dp.set_buckets(pid, &b[..]);
        }
        let _ = self.dp.set_policy(pid, r.allowed);
        Some(pid)
    }

    /// Makes every VIP point at its run's policy (after a reclassification, or at start):
    /// compares all (cheap), writes only those that differ, frees what nothing uses.
    pub(crate) fn reconcile(&mut self, next: &Assignment) {
        let mut repoint = vec![];
        for (c, p) in next.classes.iter().enumerate() {
            for r in &p.runs {
                let sid = self.class_sid[c];
                let pid = match self.policies.get(sid, r.start) {
                    Some(p) => p,
                    None => match self.write_policy(c as u32, r) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                let members = &self.classes.list[c].members;
                for &v in &members[r.start as usize..r.end() as usize] {
                    if self.vip_policy[v as usize] != pid {
                        repoint.push((v, pid));
                    }
                }
            }
        }
        self.repoint(repoint);
        let mut live: HashMap<u32, HashSet<u32>> = HashMap::new();
        for (c, p) in next.classes.iter().enumerate() {
            live.entry(self.class_sid[c]).or_default().extend(p.runs.iter().map(|r| r.start));
        }
        let known: HashSet<u32> = self.class_ids.values().copied().collect();
        for sid in known {
            self.policies.retain(sid, live.get(&sid).unwrap_or(&HashSet::new()));
        }
        self.policies.release_reserved();
    }

    /// Points VIPs at policies, thousands per syscall, looking at link events between
    /// batches so a carrier loss is acted on at once even during a big change.
    fn repoint(&mut self, list: Vec<(u32, u32)>) {
        for chunk in list.chunks(VIP_CHUNK) {
            let keys: Vec<VipKey> = chunk.iter().map(|&(v, _)| self.vips[v as usize].key).collect();
            let infos: Vec<VipInfo> = chunk
                .iter()
                .map(|&(v, pid)| VipInfo { policy: pid, id: v, flags: self.vips[v as usize].flags, _pad: 0 })
                .collect();
            match self.dp.set_vips(&keys, &infos) {
                Ok(()) => {
                    for &(v, pid) in chunk {
                        self.vip_policy[v as usize] = pid;
                    }
                }
                Err(e) => tracing::error!(error = %e, vips = chunk.len(), "VIP map write failed"),
            }
            if list.len() > VIP_CHUNK {
                self.preempt();
            }
        }
    }

    /// Whether adapter `s` is down with its MAC moved to its heir.
    fn mac_moved(&self, s: Slot, next: &Assignment) -> bool {
        let a = &self.adapters[s as usize];
        !a.health.answers() && a.move_mac && next.heirs.get(s as usize).copied().flatten().is_some()
    }

    /// MACs that move with a change of heir (seed 002): the heir's NIC is told to accept
    /// the MAC (its unicast filter) and sends a learning frame so the switch moves the MAC
    /// to its port; an adapter back home takes its MAC back the same way.
    pub(crate) fn move_macs(&mut self, df: &Diff, tag: u64, _now: Instant) {
        for &(a, before, after) in &df.heirs {
            let a = a as usize;
            if !self.adapters[a].move_mac {
                continue;
            }
            let Some(mac) = self.adapters[a].mac else { continue };
            if let Some(old) = self.adapters[a].mac_at.take() {
                if let Err(e) = self.host.set_unicast(&mut self.rtnl, old, mac, false) {
                    tracing::debug!(error = %e, "unicast filter entry not removed");
                }
            }
            match after.and_then(|h| self.adapters[h as usize].ifindex.map(|ix| (h, ix))) {
                Some((h, ix)) => {
                    if let Err(e) = self.host.set_unicast(&mut self.rtnl, ix, mac, true) {
                        tracing::warn!(heir = %self.adapters[h as usize].name, error = %e, "could not add the moved MAC to the heir's filter");
                    }
                    self.adapters[a].mac_at = Some(ix);
                    self.ann.send(Job::Learn { ifindex: ix, mac, tag: Some(tag), keep: true });
                    tracing::info!(adapter = %self.adapters[a].name, heir = %self.adapters[h as usize].name, "MAC moved");
                }
                None if before.is_some() && self.adapters[a].health == Health::Up => {
                    // Home again: the switch learns its port back from this frame.
                    if let Some(ix) = self.adapters[a].ifindex {
                        self.ann.send(Job::Learn { ifindex: ix, mac, tag: Some(tag), keep: false });
                    }
                }
                None => {}
            }
        }
    }

    /// Announcements a decision calls for, per segment that changed:
    /// - `all`: when an adapter stopped answering and its MAC did not move, every adapter
    ///   answering now announces (seed 001); otherwise those that started answering do;
    /// - `primary`: the adapter answering now announces whenever that changed;
    /// - `spread`: nothing is broadcast; the clients that must move are told one by one
    ///   ([`Agent::move_clients`]).
    ///
    /// Adapters that stopped answering a class stop announcing it.
    pub(crate) fn announce(&mut self, df: &Diff, tag: Option<u64>, _now: Instant) {
        let next = self.assignment.clone();
        let classes = self.classes.clone();
        for seg in &df.segments {
            let class = &classes.list[seg.class as usize];
            let lost = seg.lost();
            for l in slots(lost) {
                if let Some(ix) = self.adapters[l as usize].ifindex {
                    self.ann.send(Job::Cancel { ifindex: ix, class: seg.class });
                }
            }
            let targets = match class.key.mode {
                Mode::Spread => {
                    self.move_clients(seg, class.key.rebalance, tag, &next);
                    0
                }
                Mode::All if lost != 0 && slots(lost).all(|l| self.mac_moved(l, &next)) => seg.gained(),
                Mode::All if lost != 0 => seg.answering_after,
                Mode::All => seg.gained(),
                Mode::Primary if lost != 0 || seg.gained() != 0 => seg.answering_after,
                Mode::Primary => 0,
            };
            for t in slots(targets) {
                let a = &self.adapters[t as usize];
                let (Some(ifindex), Some(mac)) = (a.ifindex, a.mac) else { continue };
                self.ann.send(Job::Vips { ifindex, mac, classes: classes.clone(), class: seg.class, start: seg.start, len: seg.len, tag });
            }
        }
    }

    /// Spread clients whose adapter changed: the known ones (from the client index, read
    /// off the failover path) get a unicast ARP reply / NA from their new adapter and
    /// their table entry points there at once. A failed adapter whose MAC moved needs
    /// nothing (its clients are served through its heir). When none of a failed adapter's
    /// clients of some VIPs are known, those VIPs are broadcast by the adapter that took
    /// most of its buckets (paced like every announcement).
    fn move_clients(&mut self, seg: &Segment, rebalance: bool, tag: Option<u64>, next: &Arc<Assignment>) {
        let Some(after) = seg.after.buckets.clone() else { return };
        let moves = seg.client_moves(rebalance);
        if moves.is_empty() {
            return;
        }
        // Adapters clients leave: failed ones (whose MAC did not move), and with
        // rebalance the ones that gave buckets back.
        let mut leaving = 0u64;
        let mut rebalanced = [NO_SLOT; vip_placement::BUCKETS];
        for &(b, from, to) in &moves {
            if seg.answering_after & bit(from) == 0 {
                if !self.mac_moved(from, next) {
                    leaving |= bit(from);
                }
            } else {
                rebalanced[b] = to;
                leaving |= bit(from);
            }
        }
        let (start, end) = (seg.start, seg.start + seg.len);
        let mut told: HashSet<u32> = HashSet::new();
        let clients = self.clients.clone();
        for f in slots(leaving) {
            let failed = seg.answering_after & bit(f) == 0;
            let Some(ix) = self.adapters[f as usize].ifindex else { continue };
            for (k, info) in clients.by_ifindex.get(&ix).map(|v| &v[..]).unwrap_or(&[]) {
                let key = VipKey { addr: k.vip, vlan: k.vlan, family: k.family, _pad: 0 };
                let Some(&v) = self.by_key.get(&key) else { continue };
                let (c, pos) = self.classes.of_vip[v as usize];
                if c != seg.class || pos < start || pos >= end {
                    continue;
                }
                let b = client_bucket(&k.client) as usize;
                let t = if failed { after[b] } else { rebalanced[b] };
                if t == NO_SLOT || t == f || seg.answering_after & bit(t) == 0 {
                    continue;
                }
                let a = &self.adapters[t as usize];
                let (Some(tix), Some(mac)) = (a.ifindex, a.mac) else { continue };
                let mut nf = *info;
                nf.ifindex = tix;
                nf.slot = t;
                if let Err(e) = self.dp.set_flow(*k, nf) {
                    tracing::warn!(error = %e, "client table write failed");
                }
                let vs = &self.vips[v as usize];
                let frame = announce::unicast_frame(mac, vs.addr, vs.vlan, info.mac, flow_client(k));
                self.ann.send(Job::Frame { ifindex: tix, frame, key: flow_hash(k), tag });
                self.clients_moved += 1;
                told.insert(v);
            }
        }
        let failed_unmoved = moves.iter().any(|&(_, f, _)| seg.answering_after & bit(f) == 0 && !self.mac_moved(f, next));
        if !failed_unmoved {
            return;
        }
        tracing::info!(clients = told.len(), vips = seg.len, "spread clients moved");
        // Nobody known for some VIPs: a broadcast from the adapter that took most buckets.
        let mut count = [0u32; vip_placement::MAX_SLOTS];
        for &s in after.iter().filter(|&&s| s != NO_SLOT) {
            count[s as usize] += 1;
        }
        let Some(heaviest) = (0..vip_placement::MAX_SLOTS).filter(|&s| count[s] > 0).max_by_key(|&s| (count[s], std::cmp::Reverse(s)))
        else {
            return;
        };
        let a = &self.adapters[heaviest];
        let (Some(ifindex), Some(mac)) = (a.ifindex, a.mac) else { return };
        let members = &self.classes.list[seg.class as usize].members;
        let mut run_start: Option<u32> = None;
        for pos in start..=end {
            let untold = pos < end && !told.contains(&members[pos as usize]);
            match (untold, run_start) {
                (true, None) => run_start = Some(pos),
                (false, Some(s)) => {
                    self.ann.send(Job::Vips { ifindex, mac, classes: self.classes.clone(), class: seg.class, start: s, len: pos - s, tag });
                    run_start = None;
                }
                _ => {}
            }
        }
    }
}
