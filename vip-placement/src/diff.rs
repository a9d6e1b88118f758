//! What changed between two assignments: the applier's whole worklist.

use crate::{Assignment, Run, Slot, BUCKETS, NO_SLOT};

/// A slice of one class's members whose placement, or whose answering adapters, changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub class: u32,
    /// Members `start .. start + len` of the class.
    pub start: u32,
    pub len: u32,
    /// The run that covered them (None: the class is new).
    pub before: Option<Run>,
    /// The run that covers them now.
    pub after: Run,
    /// Allowed and up, before and after.
    pub answering_before: u64,
    pub answering_after: u64,
}

impl Segment {
    /// Adapters that answer it now and did not before.
    pub fn gained(&self) -> u64 {
        self.answering_after & !self.answering_before
    }

    /// Adapters that answered it and no longer do.
    pub fn lost(&self) -> u64 {
        self.answering_before & !self.answering_after
    }

    /// Its members now belong to another run than before (the data plane must point them
    /// at another policy).
    pub fn relayout(&self) -> bool {
        self.before.as_ref().is_none_or(|b| b.start != self.after.start)
    }

    /// Spread buckets whose owner changed: (bucket, from, to); `NO_SLOT` for none.
    pub fn moved_buckets(&self) -> Vec<(usize, Slot, Slot)> {
        let old = self.before.as_ref().and_then(|b| b.buckets.as_deref());
        let Some(new) = self.after.buckets.as_deref() else { return vec![] };
        (0..BUCKETS)
            .map(|b| (b, old.map_or(NO_SLOT, |o| o[b]), new[b]))
            .filter(|(_, f, t)| f != t)
            .collect()
    }
}

impl Segment {
    /// Spread clients the agent must move to another adapter, as (bucket, from, to):
    /// those whose bucket left an adapter that no longer answers, and, with `rebalance`,
    /// those whose bucket went back to its reference owner. Clients of an adapter that
    /// still answers otherwise stay where they are (the data plane keeps them there).
    pub fn client_moves(&self, rebalance: bool) -> Vec<(usize, Slot, Slot)> {
        self.moved_buckets()
            .into_iter()
            .filter(|&(_, from, to)| {
                from != NO_SLOT && to != NO_SLOT && (rebalance || self.answering_after & crate::bit(from) == 0)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Diff {
    pub segments: Vec<Segment>,
    /// Adapters whose heir changed: (adapter, before, after).
    pub heirs: Vec<(Slot, Option<Slot>, Option<Slot>)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.heirs.is_empty()
    }
}

/// The segments of `next` that differ from `prev` (both for the same classes), in class
/// and member order. O(classes + runs): never per VIP.
pub fn diff(prev: &Assignment, next: &Assignment) -> Diff {
    let mut segments = vec![];
    for (ci, p) in next.classes.iter().enumerate() {
        let old = prev.classes.get(ci);
        let mut cuts: Vec<u32> = p.runs.iter().flat_map(|r| [r.start, r.end()]).collect();
        if let Some(o) = old {
            cuts.extend(o.runs.iter().flat_map(|r| [r.start, r.end()]));
        }
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (s, e) = (w[0], w[1]);
            let Some(after) = p.run_at(s) else { continue };
            let before = old.and_then(|o| o.run_at(s));
            let (ab, aa) = (before.map_or(0, |b| b.allowed & prev.up), after.allowed & next.up);
            let same = before.is_some_and(|b| {
                b.start == after.start
                    && b.allowed == after.allowed
                    && b.away == after.away
                    && b.stranded == after.stranded
                    && b.buckets == after.buckets
            });
            if same && ab == aa {
                continue;
            }
            segments.push(Segment {
                class: ci as u32,
                start: s,
                len: e - s,
                before: before.cloned(),
                after: after.clone(),
                answering_before: ab,
                answering_after: aa,
            });
        }
    }
    let n = prev.heirs.len().max(next.heirs.len());
    let heirs = (0..n)
        .filter_map(|a| {
            let (b, x) = (prev.heirs.get(a).copied().flatten(), next.heirs.get(a).copied().flatten());
            (b != x).then_some((a as Slot, b, x))
        })
        .collect();
    Diff { segments, heirs }
}
