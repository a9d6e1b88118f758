//! Spread tables: which adapter answers the clients of each bucket.

use crate::{bit, Adapter, Slot, BUCKETS, NO_SLOT};

/// Smooth weighted round robin over `(slot, weight)` into [`BUCKETS`] buckets: each slot
/// as often as its weight, interleaved, so any run of consecutive buckets (a subnet's
/// consecutive client addresses) is shared by weight within one.
pub fn weighted_table(members: &[(Slot, u32)]) -> [Slot; BUCKETS] {
    let mut out = [NO_SLOT; BUCKETS];
    if members.is_empty() {
        return out;
    }
    let total: i64 = members.iter().map(|m| m.1 as i64).sum();
    let mut current = vec![0i64; members.len()];
    for b in out.iter_mut() {
        for (c, m) in current.iter_mut().zip(members) {
            *c += m.1 as i64;
        }
        let best = (0..members.len()).max_by_key(|&k| (current[k], std::cmp::Reverse(k))).expect("not empty");
        current[best] -= total;
        *b = members[best].0;
    }
    out
}

/// The table for one run: `reference` is the table it would have with every member up
/// (its own adapters by weight, or the adapters that took it over); `previous` what it
/// had. A bucket goes to its reference owner when that owner answers, else stays with
/// its previous owner when that one answers, else (an orphan) to the answering adapter
/// with the least load per weight, counting the load the orphans bring along (their old
/// owner's load shared over its orphaned buckets), then the fewest buckets per weight.
pub fn place_buckets(
    reference: &[Slot; BUCKETS],
    previous: Option<&[Slot; BUCKETS]>,
    answering: u64,
    adapters: &[Adapter],
) -> [Slot; BUCKETS] {
    let mut out = [NO_SLOT; BUCKETS];
    if answering == 0 {
        return out;
    }
    let owns = |s: Slot| s != NO_SLOT && answering & bit(s) != 0;
    let mut orphans = vec![];
    for b in 0..BUCKETS {
        let r = reference[b];
        let p = previous.map_or(NO_SLOT, |p| p[b]);
        out[b] = if owns(r) {
            r
        } else if owns(p) {
            p
        } else {
            orphans.push((b, p));
            NO_SLOT
        };
    }
    if orphans.is_empty() {
        return out;
    }
    let n = adapters.len();
    let mut count = vec![0u32; n];
    for &s in out.iter().filter(|&&s| s != NO_SLOT) {
        count[s as usize] += 1;
    }
    // Each old owner's load, shared over the buckets it loses.
    let mut lost = vec![0u32; n];
    for &(_, p) in &orphans {
        if (p as usize) < n {
            lost[p as usize] += 1;
        }
    }
    let mut given = vec![0f64; n];
    let candidates: Vec<usize> = (0..n).filter(|&j| answering & bit(j as Slot) != 0).collect();
    for (b, p) in orphans {
        let share = if (p as usize) < n { adapters[p as usize].load / lost[p as usize].max(1) as f64 } else { 0.0 };
        let cost = |j: usize| {
            let a = &adapters[j];
            let w = a.weight.max(1) as f64;
            ((a.load + given[j]) / w, count[j] as f64 / w)
        };
        let j = *candidates
            .iter()
            .min_by(|&&x, &&y| {
                let (cx, cy) = (cost(x), cost(y));
                cx.0.total_cmp(&cy.0).then(cx.1.total_cmp(&cy.1)).then(x.cmp(&y))
            })
            .expect("answering is not empty");
        out[b] = j as Slot;
        given[j] += share;
        count[j] += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_table_interleaves_by_weight() {
        let t = weighted_table(&[(0, 1), (1, 2), (2, 1)]);
        let n = |s| t.iter().filter(|&&x| x == s).count();
        assert_eq!((n(0), n(1), n(2)), (60, 120, 60));
        // Any 4 consecutive buckets hold one 0, two 1s and one 2.
        for w in t.windows(4) {
            let c = |s| w.iter().filter(|&&x| x == s).count();
            assert_eq!((c(0), c(1), c(2)), (1, 2, 1), "{w:?}");
        }
        assert!(weighted_table(&[]).iter().all(|&s| s == NO_SLOT));
    }
}
