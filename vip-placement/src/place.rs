//! State in, assignment and refusals out.

use std::sync::Arc;

use crate::{
    bit, slots,
    spread::{place_buckets, weighted_table},
    Adapter, Assignment, Class, Classes, Mode, Node, Placement, Reason, Refusal, Run, Slot,
};

/// Everything a decision depends on.
pub struct Input<'a> {
    pub nodes: &'a [Node],
    pub adapters: &'a [Adapter],
    pub classes: &'a Classes,
    /// The assignment in force (for stickiness), made for the same classes;
    /// `Assignment::default()` at first.
    pub previous: &'a Assignment,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub assignment: Assignment,
    /// Every takeover refused in this assignment (the caller reports the new ones).
    pub refusals: Vec<Refusal>,
}

/// The rules, in the order they apply:
/// 1. An adapter counts as up only while its node is up.
/// 2. A class whose own adapters include one that is up stays at home, on the node of the
///    first such adapter in its list: `all` and `spread` allow all its adapters on that
///    node (the data plane skips those that are down, so a failure rewrites nothing);
///    `primary` allows only that first adapter. A `stay` class that is taken over by
///    adapters still up stays with them instead (rule 3).
/// 3. A class with none of its own adapters up is stranded if `failover = false`; else it
///    is taken over by the other adapters that are up and fit (VLAN carried, subnet
///    reachable; see [`crate::classify`]), on one node, within `max_vips`. Classes that
///    already hold a takeover are placed first, on the adapters they hold first, so an
///    unrelated change never moves or strands them. Capacity is counted per VIP in
///    member order: when it runs out part-way, the class splits into runs.
///    `primary` takes one adapter per VIP.
/// 4. Spread buckets: a bucket goes to its reference owner (its own adapters by weight,
///    or the takers by weight) when that owner answers, else stays where it was, else
///    goes to the least loaded answering adapter ([`place_buckets`]).
/// 5. An adapter that is down gets an heir: the one it had if still up, else the least
///    loaded adapter up on its node.
pub fn place(input: &Input) -> Decision {
    let Input { nodes, adapters, classes, previous } = *input;
    let up = up_mask(nodes, adapters);
    let mut used = vec![0u64; adapters.len()];
    let mut placements: Vec<Placement> = vec![Placement::default(); classes.len()];
    let mut refusals = vec![];
    let mut takeovers = vec![];

    let held_up = |ci: usize| previous.classes.get(ci).is_some_and(|p| p.runs.iter().any(|r| r.away && r.allowed & up != 0));
    for (ci, c) in classes.list.iter().enumerate() {
        let key = &c.key;
        let k = c.members.len() as u32;
        if key.stay && key.failover && held_up(ci) {
            takeovers.push(ci);
            continue;
        }
        let first_up = key.homes.iter().copied().find(|&h| up & bit(h) != 0);
        let run = match first_up {
            Some(h) => {
                let on_node = homes_on(c, adapters, adapters[h as usize].node);
                let allowed = if key.mode == Mode::Primary { bit(h) } else { on_node };
                Run { start: 0, len: k, allowed, away: false, stranded: false, buckets: None }
            }
            None if !key.failover => stranded_run(c, adapters, 0, k),
            None => {
                takeovers.push(ci);
                continue;
            }
        };
        for &h in &key.homes {
            used[h as usize] += k as u64;
        }
        placements[ci].runs.push(run);
    }

    // Classes that hold a takeover keep it: they are placed first.
    let held = |ci: usize| -> u64 {
        previous.classes.get(ci).map_or(0, |p| p.runs.iter().filter(|r| r.away).fold(0, |m, r| m | r.allowed))
    };
    takeovers.sort_by_key(|&ci| (held(ci) & up == 0, ci));
    for ci in takeovers {
        let c = &classes.list[ci];
        let (runs, why) = take_over(c, ci as u32, adapters, up, held(ci) & up, &mut used);
        placements[ci].runs = runs;
        refusals.extend(why);
    }

    for (ci, c) in classes.list.iter().enumerate() {
        if c.key.mode != Mode::Spread {
            continue;
        }
        for r in &mut placements[ci].runs {
            // At home the reference is its own adapters on the node; away, its takers.
            let reference_of = if r.away { r.allowed } else { r.allowed & c.key.home_mask() };
            let members: Vec<(Slot, u32)> = slots(reference_of).map(|s| (s, adapters[s as usize].weight.max(1))).collect();
            let reference = weighted_table(&members);
            let before = previous.classes.get(ci).and_then(|p| p.run_at(r.start)).and_then(|p| p.buckets.as_deref());
            r.buckets = Some(Arc::new(place_buckets(&reference, before, r.allowed & up, adapters)));
        }
    }

    let heirs = (0..adapters.len()).map(|a| heir(a, adapters, up, previous)).collect();
    refusals.sort();
    Decision { assignment: Assignment { classes: placements, heirs, up }, refusals }
}

/// Adapters that count as up: their own link and their node.
pub fn up_mask(nodes: &[Node], adapters: &[Adapter]) -> u64 {
    adapters
        .iter()
        .enumerate()
        .filter(|(_, a)| a.up && nodes.get(a.node).is_some_and(|n| n.up))
        .fold(0, |m, (j, _)| m | bit(j as Slot))
}

/// The class's own adapters on `node`.
fn homes_on(c: &Class, adapters: &[Adapter], node: usize) -> u64 {
    c.key.homes.iter().filter(|&&h| adapters[h as usize].node == node).fold(0, |m, &h| m | bit(h))
}

/// Nobody answers: its own adapters stay allowed (all down), so the first to return
/// answers at once.
fn stranded_run(c: &Class, adapters: &[Adapter], start: u32, len: u32) -> Run {
    let node = c.key.homes.first().map_or(0, |&h| adapters[h as usize].node);
    let allowed = match (c.key.mode, c.key.homes.first()) {
        (Mode::Primary, Some(&h)) => bit(h),
        _ => homes_on(c, adapters, node),
    };
    Run { start, len, allowed, away: false, stranded: true, buckets: None }
}

/// Places a class none of whose own adapters is up: by the adapters that are up and fit,
/// each within its spare capacity, those in `held` first. Returns its runs and the
/// refusals (one per run and adapter that could not take it).
fn take_over(c: &Class, ci: u32, adapters: &[Adapter], up: u64, held: u64, used: &mut [u64]) -> (Vec<Run>, Vec<Refusal>) {
    let key = &c.key;
    let k = c.members.len() as u32;
    let mut cands: Vec<Slot> = slots(key.fit & up).collect();
    // What it holds first, then its own node (seed 004: a good port on the same node),
    // then in adapter order.
    let home_node = key.homes.first().map(|&h| adapters[h as usize].node);
    cands.sort_by_key(|&s| (held & bit(s) == 0, Some(adapters[s as usize].node) != home_node, s));
    // One node answers a VIP: the node of the first candidate.
    if let Some(&first) = cands.first() {
        let node = adapters[first as usize].node;
        cands.retain(|&s| adapters[s as usize].node == node);
    }
    let spare: Vec<(Slot, u32)> = cands
        .iter()
        .map(|&s| {
            let a = &adapters[s as usize];
            let left = a.max_vips.map_or(u64::MAX, |m| (m as u64).saturating_sub(used[s as usize]));
            (s, left.min(k as u64) as u32)
        })
        .collect();
    // (start, len, allowed) pieces, then runs.
    let mut pieces: Vec<(u32, u32, u64)> = vec![];
    match key.mode {
        Mode::All | Mode::Spread => {
            // Member j is answered by every candidate with more than j places left.
            let mut cuts: Vec<u32> = spare.iter().map(|x| x.1).filter(|&x| x < k).collect();
            cuts.extend([0, k]);
            cuts.sort_unstable();
            cuts.dedup();
            for w in cuts.windows(2) {
                let allowed = spare.iter().filter(|x| x.1 > w[0]).fold(0, |m, x| m | bit(x.0));
                pieces.push((w[0], w[1] - w[0], allowed));
            }
            for &(s, n) in &spare {
                used[s as usize] += n as u64;
            }
        }
        Mode::Primary => {
            let mut j = 0;
            for &(s, n) in &spare {
                let take = n.min(k - j);
                if take > 0 {
                    pieces.push((j, take, bit(s)));
                    used[s as usize] += take as u64;
                    j += take;
                }
            }
            if j < k {
                pieces.push((j, k - j, 0));
            }
        }
    }
    // Neighbours with the same adapters are one run.
    let mut merged: Vec<(u32, u32, u64)> = vec![];
    for p in pieces.into_iter().filter(|p| p.1 > 0) {
        match merged.last_mut() {
            Some(m) if m.2 == p.2 => m.1 += p.1,
            _ => merged.push(p),
        }
    }
    let mut runs = vec![];
    let mut why = vec![];
    for (start, len, allowed) in merged {
        let run = if allowed == 0 {
            stranded_run(c, adapters, start, len)
        } else {
            Run { start, len, allowed, away: true, stranded: false, buckets: None }
        };
        let mut refused = vec![];
        for s in slots(up & !key.home_mask() & !allowed) {
            let b = bit(s);
            let reason = if key.unfit_vlan & b != 0 {
                Reason::Vlan(key.vlan)
            } else if key.unfit_subnet & b != 0 {
                Reason::Subnet
            } else if !cands.contains(&s) {
                // Fit, but on another node than the one taking it.
                continue;
            } else if key.mode == Mode::Primary && allowed != 0 {
                // Primary: a candidate after the one chosen was simply not needed; one
                // before it was full.
                let pos = |x: Slot| cands.iter().position(|&c| c == x);
                let chosen = slots(allowed).next().and_then(pos);
                if pos(s) > chosen {
                    continue;
                }
                Reason::MaxVips(adapters[s as usize].max_vips.unwrap_or(u32::MAX))
            } else {
                Reason::MaxVips(adapters[s as usize].max_vips.unwrap_or(u32::MAX))
            };
            refused.push(Refusal { class: ci, start, len, adapter: Some(s), reason });
        }
        if run.stranded && refused.is_empty() {
            refused.push(Refusal { class: ci, start, len, adapter: None, reason: Reason::NoOtherAdapter });
        }
        why.extend(refused);
        runs.push(run);
    }
    if runs.is_empty() {
        // An empty class (no members): nothing to place.
        runs.push(stranded_run(c, adapters, 0, 0));
    }
    (runs, why)
}

/// The heir of adapter `a` when it is down (rule 5 of [`place`]): the one it had if still
/// up, else the least loaded adapter up on its node. None while it is up.
pub fn heir(a: usize, adapters: &[Adapter], up: u64, previous: &Assignment) -> Option<Slot> {
    if up & bit(a as Slot) != 0 {
        return None;
    }
    let node = adapters[a].node;
    let ok = |s: Slot| (s as usize) != a && up & bit(s) != 0 && adapters.get(s as usize).is_some_and(|x| x.node == node);
    if let Some(h) = previous.heirs.get(a).copied().flatten().filter(|&h| ok(h)) {
        return Some(h);
    }
    (0..adapters.len() as Slot).filter(|&s| ok(s)).min_by(|&x, &y| {
        let (p, q) = (&adapters[x as usize], &adapters[y as usize]);
        (p.load / p.weight.max(1) as f64).total_cmp(&(q.load / q.weight.max(1) as f64)).then(x.cmp(&y))
    })
}

impl Assignment {
    /// This assignment carried over to `next` classes (the adapters' addresses changed and
    /// the VIPs were classified again): each new class takes the placement of the old
    /// class that held its first member, as one run, so stickiness survives.
    pub fn carry(&self, old: &Classes, next: &Classes) -> Assignment {
        let classes = next
            .list
            .iter()
            .map(|c| {
                let Some(&first) = c.members.first() else { return Placement::default() };
                let run = old
                    .of_vip
                    .get(first as usize)
                    .and_then(|&(oc, pos)| self.classes.get(oc as usize)?.run_at(pos))
                    .map(|r| Run { start: 0, len: c.members.len() as u32, ..r.clone() });
                Placement { runs: run.into_iter().collect() }
            })
            .collect();
        Assignment { classes, heirs: self.heirs.clone(), up: self.up }
    }
}
