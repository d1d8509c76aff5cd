//! The extent map: which bytes of a volume live where.
//!
//! A map is an ordered set of non-overlapping extents keyed by logical offset. Each
//! extent is either data at a location (a segment and an offset in it) or allocated
//! zeroes; bytes not covered by any extent are holes. Maps are persistent B-trees
//! (`imbl::OrdMap`): cloning one is O(1) and the clones share every node until one of
//! them changes, so a snapshot or a clone gets its own complete map for the price of a
//! pointer, and a read is one lookup whatever the depth of the snapshot chain.
//!
//! Adjacent extents whose locations continue each other are merged, so a volume written
//! sequentially (an imported image) needs few extents however large it is.

use imbl::OrdMap;

/// Where data lives. Implemented by the store's segment locations and by tests.
pub trait Location: Clone {
    /// The location `delta` bytes further on.
    fn advance(&self, delta: u64) -> Self;
    /// Whether `next` starts exactly where `self`, covering `len` bytes, ends.
    fn continues(&self, len: u64, next: &Self) -> bool;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<L> {
    Data(L),
    /// Allocated zeroes (write-zeroes with NO_HOLE).
    Zero,
}

impl<L: Location> Target<L> {
    fn advance(&self, delta: u64) -> Target<L> {
        match self {
            Target::Data(l) => Target::Data(l.advance(delta)),
            Target::Zero => Target::Zero,
        }
    }

    fn continues(&self, len: u64, next: &Target<L>) -> bool {
        match (self, next) {
            (Target::Data(a), Target::Data(b)) => a.continues(len, b),
            (Target::Zero, Target::Zero) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Ext<L> {
    len: u64,
    target: Target<L>,
}

#[derive(Debug, Clone)]
pub struct ExtentMap<L: Location> {
    tree: OrdMap<u64, Ext<L>>,
}

impl<L: Location> Default for ExtentMap<L> {
    fn default() -> Self {
        ExtentMap {
            tree: OrdMap::new(),
        }
    }
}

impl<L: Location> ExtentMap<L> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of extents.
    pub fn extent_count(&self) -> usize {
        self.tree.len()
    }

    /// Sets `len` bytes at `start` to `target` (`None` makes them a hole). `removed` is
    /// called for every piece of an existing extent that is replaced, with its offset,
    /// length and target.
    pub fn set(
        &mut self,
        start: u64,
        len: u64,
        target: Option<Target<L>>,
        mut removed: impl FnMut(u64, u64, &Target<L>),
    ) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        if let Some(t) = &target
            && self.set_inside(start, end, t, &mut removed)
        {
            return;
        }
        // An extent that starts before `start` and reaches into the range is cut.
        if let Some((&k, e)) = self.tree.get_prev(&start)
            && k < start
            && k + e.len > start
        {
            let e = e.clone();
            let e_end = k + e.len;
            self.tree.insert(
                k,
                Ext {
                    len: start - k,
                    target: e.target.clone(),
                },
            );
            removed(start, e_end.min(end) - start, &e.target.advance(start - k));
            if e_end > end {
                self.tree.insert(
                    end,
                    Ext {
                        len: e_end - end,
                        target: e.target.advance(end - k),
                    },
                );
            }
        }
        // Extents that start inside the range are removed; a tail past `end` is kept.
        let inside: Vec<u64> = self.tree.range(start..end).map(|(k, _)| *k).collect();
        for k in inside {
            let Some(e) = self.tree.remove(&k) else {
                continue;
            };
            let e_end = k + e.len;
            if e_end > end {
                removed(k, end - k, &e.target);
                self.tree.insert(
                    end,
                    Ext {
                        len: e_end - end,
                        target: e.target.advance(end - k),
                    },
                );
            } else {
                removed(k, e.len, &e.target);
            }
        }
        let Some(mut target) = target else { return };
        let (mut s, mut l) = (start, len);
        if let Some((&k, e)) = self.tree.get_prev(&start)
            && k + e.len == start
            && e.target.continues(e.len, &target)
        {
            target = e.target.clone();
            l += e.len;
            s = k;
            self.tree.remove(&k);
        }
        if let Some(e) = self.tree.get(&end)
            && target.continues(l, &e.target)
        {
            l += e.len;
            self.tree.remove(&end);
        }
        self.tree.insert(s, Ext { len: l, target });
    }

    /// The common case of a small write into a larger extent (a clone's first writes over
    /// its origin's data): `[start, end)` lies strictly inside one extent and the new target
    /// merges with neither remaining piece. Sets it with one lookup and three inserts
    /// instead of the general path's seven tree walks; returns false (nothing changed)
    /// when the case does not apply.
    fn set_inside(
        &mut self,
        start: u64,
        end: u64,
        target: &Target<L>,
        removed: &mut impl FnMut(u64, u64, &Target<L>),
    ) -> bool {
        let Some((&k, e)) = self.tree.get_prev(&start) else {
            return false;
        };
        let e_end = k + e.len;
        if k >= start || e_end <= end {
            return false;
        }
        let head_len = start - k;
        let tail_target = e.target.advance(end - k);
        if e.target.continues(head_len, target) || target.continues(end - start, &tail_target) {
            return false;
        }
        let old = e.target.advance(head_len);
        let head_target = e.target.clone();
        removed(start, end - start, &old);
        self.tree.insert(
            k,
            Ext {
                len: head_len,
                target: head_target,
            },
        );
        self.tree.insert(
            end,
            Ext {
                len: e_end - end,
                target: tail_target,
            },
        );
        self.tree.insert(
            start,
            Ext {
                len: end - start,
                target: target.clone(),
            },
        );
        true
    }

    /// Calls `f(offset, len, target)` for consecutive pieces covering `len` bytes at
    /// `start`, in order; holes are passed as `None`.
    pub fn visit(&self, start: u64, len: u64, mut f: impl FnMut(u64, u64, Option<Target<L>>)) {
        let end = start.saturating_add(len);
        let mut pos = start;
        if let Some((&k, e)) = self.tree.get_prev(&start)
            && k + e.len > start
        {
            let piece_end = (k + e.len).min(end);
            f(start, piece_end - start, Some(e.target.advance(start - k)));
            pos = piece_end;
        }
        if pos < end {
            for (&k, e) in self.tree.range(pos..end) {
                if k > pos {
                    f(pos, k - pos, None);
                }
                let piece_end = (k + e.len).min(end);
                f(k, piece_end - k, Some(e.target.clone()));
                pos = piece_end;
            }
        }
        if pos < end {
            f(pos, end - pos, None);
        }
    }

    /// Every extent in order: (offset, len, target).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, &Target<L>)> {
        self.tree.iter().map(|(k, e)| (*k, e.len, &e.target))
    }

    /// Bytes covered by data extents.
    pub fn data_bytes(&self) -> u64 {
        self.iter()
            .filter(|(_, _, t)| matches!(t, Target::Data(_)))
            .map(|(_, l, _)| l)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A test location: (tag, offset). Tags stand for segments.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Loc(u8, u64);

    impl Location for Loc {
        fn advance(&self, d: u64) -> Loc {
            Loc(self.0, self.1 + d)
        }
        fn continues(&self, len: u64, next: &Loc) -> bool {
            self.0 == next.0 && self.1 + len == next.1
        }
    }

    const SPACE: usize = 256;

    #[derive(Debug, Clone)]
    enum Op {
        Data(u64, u64, u8, u64),
        Zero(u64, u64),
        Hole(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..SPACE as u64).prop_flat_map(|s| (Just(s), 1..=(SPACE as u64 - s)));
        prop_oneof![
            (range.clone(), 0..3u8, 0..1000u64).prop_map(|((s, l), t, o)| Op::Data(s, l, t, o)),
            range.clone().prop_map(|(s, l)| Op::Zero(s, l)),
            range.prop_map(|(s, l)| Op::Hole(s, l)),
        ]
    }

    /// The model: what every byte maps to.
    type Model = Vec<Option<Target<Loc>>>;

    fn check(map: &ExtentMap<Loc>, model: &Model) {
        // Byte-wise contents agree.
        let mut seen = vec![None; SPACE];
        map.visit(0, SPACE as u64, |o, l, t| {
            for i in 0..l {
                seen[(o + i) as usize] = t.as_ref().map(|t| t.advance(i));
            }
        });
        assert_eq!(&seen, model);
        // Extents do not overlap, have positive length, and neighbours that could merge did.
        let ext: Vec<_> = map.iter().map(|(o, l, t)| (o, l, t.clone())).collect();
        for w in ext.windows(2) {
            let (o1, l1, t1) = &w[0];
            let (o2, _, t2) = &w[1];
            assert!(*l1 > 0 && o1 + l1 <= *o2, "overlap in {ext:?}");
            assert!(
                !(o1 + l1 == *o2 && t1.continues(*l1, t2)),
                "unmerged neighbours in {ext:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn behaves_like_a_byte_array(ops in proptest::collection::vec(op(), 1..60)) {
            let mut map = ExtentMap::new();
            let mut model: Model = vec![None; SPACE];
            for op in ops {
                let (s, l, t) = match op {
                    Op::Data(s, l, tag, o) => (s, l, Some(Target::Data(Loc(tag, o)))),
                    Op::Zero(s, l) => (s, l, Some(Target::Zero)),
                    Op::Hole(s, l) => (s, l, None),
                };
                // `removed` reports exactly the bytes that were mapped before.
                let mut removed_bytes = vec![None; SPACE];
                map.set(s, l, t.clone(), |o, rl, rt| {
                    for i in 0..rl {
                        removed_bytes[(o + i) as usize] = Some(rt.advance(i));
                    }
                });
                for i in s..s + l {
                    prop_assert_eq!(&removed_bytes[i as usize], &model[i as usize]);
                    model[i as usize] = t.as_ref().map(|t| t.advance(i - s));
                }
                check(&map, &model);
            }
        }

        #[test]
        fn clones_are_independent(ops in proptest::collection::vec(op(), 1..30), split in 0usize..30) {
            let mut a = ExtentMap::new();
            let mut snapshot = None;
            for (i, op) in ops.iter().enumerate() {
                if i == split {
                    snapshot = Some(a.clone());
                }
                if let Op::Data(s, l, tag, o) = op {
                    a.set(*s, *l, Some(Target::Data(Loc(*tag, *o))), |_, _, _| {});
                } else if let Op::Hole(s, l) = op {
                    a.set(*s, *l, None, |_, _, _| {});
                }
            }
            if let Some(snap) = snapshot {
                let before: Vec<_> = snap.iter().map(|(o, l, t)| (o, l, t.clone())).collect();
                a.set(0, SPACE as u64, None, |_, _, _| {});
                let after: Vec<_> = snap.iter().map(|(o, l, t)| (o, l, t.clone())).collect();
                prop_assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn a_write_inside_an_extent_splits_it_in_three() {
        let mut map = ExtentMap::new();
        map.set(0, 100, Some(Target::Data(Loc(1, 1000))), |_, _, _| {});
        let mut removed = Vec::new();
        map.set(40, 10, Some(Target::Data(Loc(2, 0))), |o, l, t| {
            removed.push((o, l, t.clone()))
        });
        assert_eq!(removed, vec![(40, 10, Target::Data(Loc(1, 1040)))]);
        let ext: Vec<_> = map.iter().map(|(o, l, t)| (o, l, t.clone())).collect();
        assert_eq!(
            ext,
            vec![
                (0, 40, Target::Data(Loc(1, 1000))),
                (40, 10, Target::Data(Loc(2, 0))),
                (50, 50, Target::Data(Loc(1, 1050))),
            ]
        );
        // Writing the old location back merges all three again.
        map.set(40, 10, Some(Target::Data(Loc(1, 1040))), |_, _, _| {});
        assert_eq!(map.extent_count(), 1);
        // Inside one extent, a target that continues its pieces is merged with them (the
        // fast path declines, the general path merges): zeroes inside zeroes.
        map.set(100, 100, Some(Target::Zero), |_, _, _| {});
        map.set(140, 10, Some(Target::Zero), |_, _, _| {});
        let ext: Vec<_> = map.iter().map(|(o, l, t)| (o, l, t.clone())).collect();
        assert_eq!(
            ext,
            vec![
                (0, 100, Target::Data(Loc(1, 1000))),
                (100, 100, Target::Zero)
            ]
        );
    }

    #[test]
    fn sequential_writes_merge_into_one_extent() {
        let mut map = ExtentMap::new();
        for i in 0..1000u64 {
            map.set(
                i * 4096,
                4096,
                Some(Target::Data(Loc(1, 4096 + i * 4096))),
                |_, _, _| {},
            );
        }
        assert_eq!(map.extent_count(), 1);
        assert_eq!(map.data_bytes(), 1000 * 4096);
    }
}
