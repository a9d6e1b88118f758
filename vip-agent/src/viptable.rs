//! `VIP_TABLE`: the VIPs again, beside the `VIPS` hash, in buckets of two slots indexed by
//! the key's hash ([`vip_common::table_bucket`]), so the data plane finds a VIP with one
//! inlined array read (a hash lookup cost it 30 to 40 ns a frame). `VIPS` stays the
//! authority: a bucket with more VIPs than slots says so ([`TABLE_OVERFLOW`]) and the data
//! plane looks those up in `VIPS`; so does a reader that meets a slot being written.
//!
//! The table is shared memory. Each slot is eight 32-bit words written with single
//! atomic stores under a sequence count in its tag (odd while written), as a seqlock: the
//! data plane reads the tag, the entry, then the tag again, and trusts the entry only if
//! the tag is even and unchanged. Its loads stay in that order on x86-64, where loads are
//! not reordered with loads; elsewhere the agent leaves the table empty (every VIP then
//! overflows to `VIPS`; see [`Table::enabled`]).

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use vip_common::{filter_bit, table_bucket, VipInfo, VipKey, VipSlot, TABLE_BUCKETS, TABLE_OVERFLOW, TAG_KEY, TAG_SEQ_SHIFT};

/// 32-bit words per slot and per bucket.
const SLOT_WORDS: usize = 8;
const BUCKET_WORDS: usize = 16;
const TAG: usize = 4;

/// Where the table's words live: the memory-mapped map, or memory in a test.
pub trait Words {
    fn word(&self, i: usize) -> &AtomicU32;
}

impl Words for [AtomicU32] {
    fn word(&self, i: usize) -> &AtomicU32 {
        &self[i]
    }
}

/// The agent's side of the table: writes slots, and remembers the VIPs that did not fit
/// (per bucket), to move one in when a slot frees.
pub struct Table {
    overflow: HashMap<u32, HashMap<VipKey, VipInfo>>,
    /// False where the data plane's reads of a slot could be reordered (not x86-64): the
    /// table stays empty and every bucket is marked overflowed.
    enabled: bool,
}

impl Default for Table {
    fn default() -> Self {
        Self::new(cfg!(target_arch = "x86_64"))
    }
}

fn bucket_of(key: &VipKey) -> u32 {
    table_bucket(filter_bit(key))
}

impl Table {
    pub fn new(enabled: bool) -> Table {
        Table { overflow: HashMap::new(), enabled }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// VIPs kept in `VIPS` only, their bucket full.
    pub fn overflowed(&self) -> usize {
        self.overflow.values().map(|m| m.len()).sum()
    }

    /// The slot of `key` in its bucket, if it is in one.
    fn find(w: &(impl Words + ?Sized), b: u32, key: &VipKey) -> Option<usize> {
        (0..2).find(|&s| {
            let base = b as usize * BUCKET_WORDS + s * SLOT_WORDS;
            let t = w.word(base + TAG).load(Ordering::Acquire);
            t & TAG_KEY == VipSlot::tag_of(key) && (0..4).all(|i| w.word(base + i).load(Ordering::Relaxed) == key.addr[i])
        })
    }

    fn empty_slot(w: &(impl Words + ?Sized), b: u32) -> Option<usize> {
        (0..2).find(|&s| w.word(b as usize * BUCKET_WORDS + s * SLOT_WORDS + TAG).load(Ordering::Acquire) & TAG_KEY == 0)
    }

    /// Writes slot `s` of bucket `b` (None: empties it) under its sequence count. The
    /// overflow bit of the first slot's tag is kept.
    fn write(w: &(impl Words + ?Sized), b: u32, s: usize, entry: Option<(&VipKey, &VipInfo)>) {
        let base = b as usize * BUCKET_WORDS + s * SLOT_WORDS;
        let tag = w.word(base + TAG);
        let t = tag.load(Ordering::Relaxed);
        let seq = t >> TAG_SEQ_SHIFT;
        let keep = t & TABLE_OVERFLOW;
        // Odd: a reader that sees this, or sees it change, asks VIPS instead.
        tag.store((t & !(0xff << TAG_SEQ_SHIFT)) | ((seq + 1) & 0xff) << TAG_SEQ_SHIFT, Ordering::Relaxed);
        fence(Ordering::Release);
        let (addr, policy, id, flags, key_tag) = match entry {
            Some((k, v)) => (k.addr, v.policy, v.id, v.flags, VipSlot::tag_of(k)),
            None => ([0; 4], 0, 0, 0, 0),
        };
        for (i, a) in addr.iter().enumerate() {
            w.word(base + i).store(*a, Ordering::Relaxed);
        }
        w.word(base + 5).store(policy, Ordering::Relaxed);
        w.word(base + 6).store(id, Ordering::Relaxed);
        w.word(base + 7).store(flags, Ordering::Relaxed);
        tag.store(key_tag | keep | ((seq + 2) & 0xff) << TAG_SEQ_SHIFT, Ordering::Release);
    }

    fn set_overflow(w: &(impl Words + ?Sized), b: u32, on: bool) {
        let tag = w.word(b as usize * BUCKET_WORDS + TAG);
        let t = tag.load(Ordering::Relaxed);
        let n = if on { t | TABLE_OVERFLOW } else { t & !TABLE_OVERFLOW };
        if n != t {
            tag.store(n, Ordering::Release);
        }
    }

    /// Adds or replaces `key` (after its `VIPS` entry is written).
    pub fn set(&mut self, w: &(impl Words + ?Sized), key: &VipKey, info: &VipInfo) {
        let b = bucket_of(key);
        if !self.enabled {
            Self::set_overflow(w, b, true);
            return;
        }
        if let Some(s) = Self::find(w, b, key) {
            return Self::write(w, b, s, Some((key, info)));
        }
        if let Some(m) = self.overflow.get_mut(&b) {
            if let Some(v) = m.get_mut(key) {
                *v = *info;
                return;
            }
        }
        match Self::empty_slot(w, b) {
            Some(s) => Self::write(w, b, s, Some((key, info))),
            None => {
                Self::set_overflow(w, b, true);
                self.overflow.entry(b).or_default().insert(*key, *info);
            }
        }
    }

    /// Takes `key` out (before its `VIPS` entry is removed). A VIP that overflowed this
    /// bucket takes the freed slot; the mark goes when none is left.
    pub fn remove(&mut self, w: &(impl Words + ?Sized), key: &VipKey) {
        let b = bucket_of(key);
        if !self.enabled {
            return;
        }
        let freed = Self::find(w, b, key);
        if let Some(s) = freed {
            Self::write(w, b, s, None);
        }
        let Some(m) = self.overflow.get_mut(&b) else { return };
        m.remove(key);
        if let (Some(s), Some((k, v))) = (freed, m.iter().next().map(|(k, v)| (*k, *v))) {
            Self::write(w, b, s, Some((&k, &v)));
            m.remove(&k);
        }
        if m.is_empty() {
            self.overflow.remove(&b);
            Self::set_overflow(w, b, false);
        }
    }

    /// Makes the table hold exactly `entries` (the `VIPS` map's), for a table adopted from
    /// pins or filled by another agent: every bucket that needs it is marked overflowed
    /// first (readers ask `VIPS` meanwhile), then slots are written, then marks that are
    /// no longer needed are cleared.
    pub fn rebuild(&mut self, w: &(impl Words + ?Sized), entries: &[(VipKey, VipInfo)]) {
        self.overflow.clear();
        let mut want: HashMap<u32, Vec<(VipKey, VipInfo)>> = HashMap::new();
        for (k, v) in entries {
            want.entry(bucket_of(k)).or_default().push((*k, *v));
        }
        // The buckets to look at: those that hold or should hold a VIP, or are marked
        // (one pass over the tags; most buckets are empty and stay so).
        let mut todo: Vec<u32> = want.keys().copied().collect();
        for b in 0..TABLE_BUCKETS {
            let tag = |s: usize| w.word(b as usize * BUCKET_WORDS + s * SLOT_WORDS + TAG).load(Ordering::Relaxed);
            let (t0, t1) = (tag(0), tag(1));
            if (t0 | t1) & (TAG_KEY | TABLE_OVERFLOW) != 0 && !want.contains_key(&b) {
                todo.push(b);
            }
        }
        todo.sort_unstable();
        for b in todo {
            let keys = want.get(&b).map(|v| &v[..]).unwrap_or(&[]);
            if !self.enabled {
                Self::set_overflow(w, b, true);
                continue;
            }
            Self::set_overflow(w, b, true);
            // Slots holding keys no longer wanted are emptied; wanted keys already in a
            // slot are rewritten in place (their info may differ).
            let mut placed = vec![];
            for s in 0..2 {
                let base = b as usize * BUCKET_WORDS + s * SLOT_WORDS;
                let t = w.word(base + TAG).load(Ordering::Relaxed);
                if t & TAG_KEY == 0 {
                    continue;
                }
                let addr: [u32; 4] = std::array::from_fn(|i| w.word(base + i).load(Ordering::Relaxed));
                match keys.iter().find(|(k, _)| VipSlot::tag_of(k) == t & TAG_KEY && k.addr == addr) {
                    Some((k, v)) => {
                        Self::write(w, b, s, Some((k, v)));
                        placed.push(*k);
                    }
                    None => Self::write(w, b, s, None),
                }
            }
            for (k, v) in keys {
                if placed.contains(k) {
                    continue;
                }
                match Self::empty_slot(w, b) {
                    Some(s) => {
                        Self::write(w, b, s, Some((k, v)));
                        placed.push(*k);
                    }
                    None => {
                        self.overflow.entry(b).or_default().insert(*k, *v);
                    }
                }
            }
            if !self.overflow.contains_key(&b) {
                Self::set_overflow(w, b, false);
            }
        }
    }

    /// What the data plane would find for `key`: `Some(Some(info))` from a slot,
    /// `Some(None)` certainly not a VIP, `None` ask `VIPS` (the bucket overflowed).
    pub fn lookup(w: &(impl Words + ?Sized), key: &VipKey) -> Option<Option<VipInfo>> {
        let b = bucket_of(key);
        if let Some(s) = Self::find(w, b, key) {
            let base = b as usize * BUCKET_WORDS + s * SLOT_WORDS;
            let r = |i: usize| w.word(base + i).load(Ordering::Relaxed);
            return Some(Some(VipInfo { policy: r(5), id: r(6), flags: r(7), _pad: 0 }));
        }
        if w.word(b as usize * BUCKET_WORDS + TAG).load(Ordering::Acquire) & TABLE_OVERFLOW != 0 {
            return None;
        }
        Some(None)
    }
}

/// 32-bit words in the whole table.
pub const WORDS: usize = TABLE_BUCKETS as usize * BUCKET_WORDS;

#[cfg(test)]
mod tests {
    use super::*;
    use vip_common::FAMILY_IPV4;

    fn mem() -> Vec<AtomicU32> {
        (0..WORDS).map(|_| AtomicU32::new(0)).collect()
    }

    fn v4(i: u32) -> VipKey {
        VipKey::v4((0x0a00_0000u32 + i).to_be_bytes(), 0)
    }

    fn info(id: u32) -> VipInfo {
        VipInfo { policy: id % 7, id, flags: 0, _pad: 0 }
    }

    /// Three keys that share one bucket.
    fn colliding() -> [VipKey; 3] {
        let mut by: HashMap<u32, Vec<VipKey>> = HashMap::new();
        for i in 0.. {
            let k = v4(i);
            let v = by.entry(bucket_of(&k)).or_default();
            v.push(k);
            if v.len() == 3 {
                return [v[0], v[1], v[2]];
            }
        }
        unreachable!()
    }

    /// Every key of `vips` as the data plane finds it: from a slot, or (overflowed)
    /// from VIPS; and nothing else is found.
    fn check(w: &[AtomicU32], vips: &HashMap<VipKey, VipInfo>, others: &[VipKey]) {
        for (k, v) in vips {
            match Table::lookup(w, k) {
                Some(Some(got)) => assert_eq!(got, *v, "{k:?}"),
                Some(None) => panic!("{k:?} hidden"),
                None => {}
            }
        }
        for k in others {
            if !vips.contains_key(k) {
                assert!(!matches!(Table::lookup(w, k), Some(Some(_))), "{k:?} found after removal");
            }
        }
    }

    #[test]
    fn scenarios() {
        let [a, b, c] = colliding();
        let w = mem();
        let mut t = Table::new(true);
        let mut vips = HashMap::new();
        // (step, key, Some(info): set / None: remove, overflowed afterwards)
        let steps: [(&str, VipKey, Option<VipInfo>, usize); 8] = [
            ("first key takes a slot", a, Some(info(1)), 0),
            ("second key takes the other", b, Some(info(2)), 0),
            ("third overflows to VIPS", c, Some(info(3)), 1),
            ("a changed in place", a, Some(info(11)), 1),
            ("c changed while overflowed", c, Some(info(13)), 1),
            ("b removed: c takes its slot", b, None, 0),
            ("b back: overflows", b, Some(info(2)), 1),
            ("the overflowed one removed", b, None, 0),
        ];
        for (what, k, v, over) in steps {
            match v {
                Some(v) => {
                    t.set(&w[..], &k, &v);
                    vips.insert(k, v);
                }
                None => {
                    t.remove(&w[..], &k);
                    vips.remove(&k);
                }
            }
            check(&w, &vips, &[a, b, c]);
            assert_eq!(t.overflowed(), over, "{what}");
            let marked = w[bucket_of(&a) as usize * BUCKET_WORDS + TAG].load(Ordering::Relaxed) & TABLE_OVERFLOW != 0;
            assert_eq!(marked, over > 0, "{what}: the overflow mark");
        }
        assert_eq!(Table::lookup(&w[..], &c), Some(Some(info(13))), "c moved into a slot with its latest info");
        assert_eq!(Table::lookup(&w[..], &v4(999_999)).map(|x| x.is_some()), Some(false));
    }

    #[test]
    fn sequence_counts_stay_even_at_rest() {
        let w = mem();
        let mut t = Table::new(true);
        let k = v4(5);
        for i in 0..300 {
            t.set(&w[..], &k, &info(i));
        }
        let b = bucket_of(&k) as usize;
        let tag = w[b * BUCKET_WORDS + TAG].load(Ordering::Relaxed);
        assert_eq!((tag >> TAG_SEQ_SHIFT) & 1, 0);
        assert_eq!(tag & TAG_KEY, VipSlot::tag_of(&k));
        assert_eq!(VipSlot::tag_of(&k) >> 16, FAMILY_IPV4 as u32);
    }

    #[test]
    fn rebuild_matches_the_entries_whatever_the_table_held() {
        let w = mem();
        let mut t = Table::new(true);
        // Held: 0..3000; wanted: 1000..4000, some with new infos.
        for i in 0..3000 {
            t.set(&w[..], &v4(i), &info(i));
        }
        let entries: Vec<(VipKey, VipInfo)> = (1000..4000).map(|i| (v4(i), info(i + (i % 2) * 100_000))).collect();
        let mut fresh = Table::new(true);
        fresh.rebuild(&w[..], &entries);
        let vips: HashMap<VipKey, VipInfo> = entries.iter().copied().collect();
        let gone: Vec<VipKey> = (0..1000).map(v4).collect();
        check(&w, &vips, &gone);
        // And the rebuilt model keeps working: removing everything empties the table.
        for (k, _) in &entries {
            fresh.remove(&w[..], k);
        }
        assert_eq!(fresh.overflowed(), 0);
        assert!(w.iter().enumerate().all(|(i, x)| i % SLOT_WORDS == TAG || x.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_hundred_thousand_sequential_vips_mostly_fit() {
        let w = mem();
        let mut t = Table::new(true);
        for i in 0..100_000 {
            t.set(&w[..], &v4(i), &info(i));
        }
        // Measured: the share left to VIPS (a hash lookup each) at 100,000 addresses in
        // one range, as an operator would number them.
        let share = t.overflowed() as f64 / 100_000.0;
        eprintln!("100,000 sequential VIPs: {} left to VIPS ({:.2}%)", t.overflowed(), share * 100.0);
        assert!(share < 0.05, "{share}");
    }

    #[test]
    fn disabled_marks_every_used_bucket() {
        let w = mem();
        let mut t = Table::new(false);
        t.set(&w[..], &v4(1), &info(1));
        assert_eq!(Table::lookup(&w[..], &v4(1)), None, "asks VIPS");
    }
}
