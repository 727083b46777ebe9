//! Sets of block indices and byte ranges.
//!
//! [`BlockSet`] is a bitmap over the blocks of one content: which blocks are
//! held, wanted, or in flight. [`SpanSet`] is a short sorted list of disjoint
//! half-open spans, used for byte coverage inside one block and for packet
//! numbers in acknowledgements; it is bounded by [`SPANS_MAX`] and forgets the
//! oldest spans past that.

use std::ops::Range;

/// A bitmap over `0..len`.
#[derive(Clone, PartialEq, Eq)]
pub struct BlockSet {
    words: Vec<u64>,
    len: u64,
    count: u64,
}

impl std::fmt::Debug for BlockSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockSet({}/{})", self.count, self.len)
    }
}

impl BlockSet {
    /// An empty set over `0..len`.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            count: 0,
        }
    }

    /// A full set over `0..len`.
    pub fn full(len: u64) -> Self {
        let mut s = Self::new(len);
        s.insert_range(0..len);
        s
    }

    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Number of members.
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Insert `i`; returns true if it was not there. Indices past the end are ignored.
    pub fn insert(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1 << (i % 64);
        if *w & bit == 0 {
            *w |= bit;
            self.count += 1;
            true
        } else {
            false
        }
    }

    /// Remove `i`; returns true if it was there.
    pub fn remove(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1 << (i % 64);
        if *w & bit != 0 {
            *w &= !bit;
            self.count -= 1;
            true
        } else {
            false
        }
    }

    pub fn insert_range(&mut self, r: Range<u64>) {
        for i in r.start..r.end.min(self.len) {
            self.insert(i);
        }
    }

    /// First member at or after `from`.
    pub fn next_member(&self, from: u64) -> Option<u64> {
        self.scan(from, false)
    }

    /// First non-member at or after `from`.
    pub fn next_missing(&self, from: u64) -> Option<u64> {
        self.scan(from, true)
    }

    fn scan(&self, from: u64, invert: bool) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut word = if invert { !self.words[wi] } else { self.words[wi] } & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let i = wi as u64 * 64 + word.trailing_zeros() as u64;
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            word = if invert { !self.words[wi] } else { self.words[wi] };
        }
    }

    /// Maximal runs of members, in order.
    pub fn runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let start = self.next_member(at)?;
            let end = self.next_missing(start).unwrap_or(self.len);
            at = end;
            Some(start..end)
        })
    }
}

/// Most spans a [`SpanSet`] keeps.
pub const SPANS_MAX: usize = 64;

/// Disjoint, sorted, half-open spans of `u64`, bounded at [`SPANS_MAX`]
/// (the lowest spans are dropped first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpanSet {
    spans: Vec<Range<u64>>,
}

impl SpanSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `r`, merging with neighbours. Returns the number of values that were new.
    pub fn insert(&mut self, r: Range<u64>) -> u64 {
        if r.is_empty() {
            return 0;
        }
        // Fast path: extends or lies inside the last span (in-order arrival).
        if let Some(last) = self.spans.last_mut() {
            if r.start >= last.start && r.start <= last.end {
                let new = r.end.saturating_sub(last.end);
                last.end = last.end.max(r.end);
                return new;
            }
        }
        // First span that ends at or after r.start (touches or overlaps).
        let i = self.spans.partition_point(|s| s.end < r.start);
        let mut j = i;
        let mut merged = r.clone();
        let mut overlap = 0;
        while j < self.spans.len() && self.spans[j].start <= merged.end {
            let s = &self.spans[j];
            overlap += s.end.min(r.end).saturating_sub(s.start.max(r.start));
            merged.start = merged.start.min(s.start);
            merged.end = merged.end.max(s.end);
            j += 1;
        }
        self.spans.splice(i..j, std::iter::once(merged));
        if self.spans.len() > SPANS_MAX {
            self.spans.remove(0);
        }
        (r.end - r.start) - overlap
    }

    pub fn contains(&self, v: u64) -> bool {
        let i = self.spans.partition_point(|s| s.end <= v);
        i < self.spans.len() && self.spans[i].start <= v
    }

    /// True if `r` is entirely covered.
    pub fn covers(&self, r: Range<u64>) -> bool {
        if r.is_empty() {
            return true;
        }
        let i = self.spans.partition_point(|s| s.end <= r.start);
        i < self.spans.len() && self.spans[i].start <= r.start && self.spans[i].end >= r.end
    }

    pub fn total(&self) -> u64 {
        self.spans.iter().map(|s| s.end - s.start).sum()
    }

    pub fn max(&self) -> Option<u64> {
        self.spans.last().map(|s| s.end - 1)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Range<u64>> {
        self.spans.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn clear(&mut self) {
        self.spans.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn blockset_scans_and_runs() {
        let mut s = BlockSet::new(200);
        s.insert_range(3..70);
        s.insert(150);
        assert_eq!(s.count(), 68);
        assert_eq!(s.next_member(0), Some(3));
        assert_eq!(s.next_missing(3), Some(70));
        assert_eq!(s.next_member(71), Some(150));
        assert_eq!(s.next_member(151), None);
        assert_eq!(s.runs().collect::<Vec<_>>(), vec![3..70, 150..151]);
        assert!(!s.insert(150));
        assert!(s.remove(150));
        assert_eq!(BlockSet::full(130).next_missing(0), None);
    }

    proptest! {
        #[test]
        fn blockset_matches_a_model(len in 1u64..500, ops in proptest::collection::vec((any::<bool>(), 0u64..520), 0..300)) {
            let mut s = BlockSet::new(len);
            let mut m = BTreeSet::new();
            for (ins, i) in ops {
                if ins { prop_assert_eq!(s.insert(i), i < len && m.insert(i)); }
                else { prop_assert_eq!(s.remove(i), m.remove(&i)); }
            }
            prop_assert_eq!(s.count(), m.len() as u64);
            let from_runs: Vec<u64> = s.runs().flatten().collect();
            prop_assert_eq!(from_runs, m.iter().copied().collect::<Vec<_>>());
        }

        #[test]
        fn spanset_matches_a_model(ops in proptest::collection::vec((0u64..300, 0u64..20), 0..40)) {
            let mut s = SpanSet::new();
            let mut m = BTreeSet::new();
            for (start, len) in ops {
                let new = (start..start + len).filter(|v| m.insert(*v)).count() as u64;
                prop_assert_eq!(s.insert(start..start + len), new);
            }
            for v in 0..330 {
                prop_assert_eq!(s.contains(v), m.contains(&v));
            }
            prop_assert_eq!(s.total(), m.len() as u64);
        }
    }
}
