//! Bounded memo tables for the decoder's repeated work, and the shared [`Label`] strings they
//! hand out.
//!
//! Events repeat a small set of strings: feature areas, surfaces, workflows, app versions,
//! experiment assignments. The decoder memoizes what it derives from them (a scrubbed label)
//! as a shared [`Label`], so that a repeat costs one hash lookup instead of a scrub pass and an
//! allocation, and every later copy (into the aggregates' keys) is a reference count.
//!
//! User and session identifiers are not memoized: there are too many active at once for a
//! table of them to stay in cache, and a keyed hash costs less than the misses
//! ([`sightline_schemas::Pseudonym`]). Tenants are: every event names one, and there are few.
//!
//! A [`Memo`] keeps two generations of at most `capacity` entries each: when the current one is
//! full it becomes the previous one, and the previous one is dropped. A value found in the
//! previous generation moves to the current one, so what is in use stays; memory is bounded
//! whatever the cardinality of the input, and a stream of distinct values costs one insertion
//! each. The hasher is seeded per process (foldhash), so input cannot be crafted to collide.
//!
//! Keys are the raw strings (a label before scrubbing, the raw JSON of an assignment set): a
//! memo lives in one worker's memory, never leaves it, and holds no more than the records in
//! flight already do.

use std::collections::HashMap;

pub use sightline_schemas::Label;

type Table<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// A bounded map from raw strings to what was derived from them. See the module documentation.
#[derive(Clone, Debug)]
pub struct Memo<V> {
    current: Table<V>,
    previous: Table<V>,
    capacity: usize,
}

impl<V: Clone> Memo<V> {
    /// A memo of at most `capacity` entries per generation (at least 1).
    pub fn new(capacity: usize) -> Memo<V> {
        Memo {
            current: Table::default(),
            previous: Table::default(),
            capacity: capacity.max(1),
        }
    }

    /// The value memoized for `key`; otherwise `derive(key)`, memoized.
    pub fn get_or_derive(&mut self, key: &str, derive: impl FnOnce(&str) -> V) -> V {
        self.get_valid_or_derive(key, |_| true, derive)
    }

    /// The value memoized for `key` if it passes `valid`; otherwise `derive(key)`, memoized in
    /// its place (a value that depends on something besides the key, such as a key period).
    pub fn get_valid_or_derive(
        &mut self,
        key: &str,
        valid: impl Fn(&V) -> bool,
        derive: impl FnOnce(&str) -> V,
    ) -> V {
        if let Some(value) = self.current.get_mut(key) {
            if !valid(value) {
                *value = derive(key);
            }
            return value.clone();
        }
        let (boxed, value) = match self.previous.remove_entry(key) {
            Some((boxed, value)) if valid(&value) => (boxed, value),
            Some((boxed, _)) => (boxed, derive(key)),
            None => (Box::from(key), derive(key)),
        };
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(boxed, value.clone());
        value
    }

    /// Entries held, both generations.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether the memo holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn derives_once_per_key_while_in_use() {
        let mut memo = Memo::new(4);
        let mut calls = 0;
        for _ in 0..3 {
            for key in ["a", "b", "c"] {
                let v = memo.get_or_derive(key, |k| {
                    calls += 1;
                    k.to_uppercase()
                });
                assert_eq!(v, key.to_uppercase());
            }
        }
        assert_eq!(calls, 3);
    }

    #[test]
    fn a_value_that_is_no_longer_valid_is_derived_again() {
        let mut memo = Memo::new(4);
        // (the current period, the period `derive` stamps, what the memo must hand out)
        for (period, stamp, want) in [(1, 1, "t@1"), (1, 99, "t@1"), (2, 2, "t@2"), (2, 99, "t@2")]
        {
            let got = memo.get_valid_or_derive(
                "t",
                |v: &(i32, String)| v.0 == period,
                |k| (stamp, format!("{k}@{stamp}")),
            );
            assert_eq!(got.1, want);
        }
        assert_eq!(memo.len(), 1);
    }

    proptest! {
        /// Whatever the sequence of keys, the memo returns what `derive` would, and never holds
        /// more than two generations.
        #[test]
        fn agrees_with_deriving_every_time(keys in proptest::collection::vec(0u8..40, 0..400), capacity in 1usize..16) {
            let mut memo = Memo::new(capacity);
            for k in keys {
                let key = format!("k{k}");
                let got = memo.get_or_derive(&key, |k| format!("{k}!"));
                prop_assert_eq!(got, format!("{key}!"));
                prop_assert!(memo.len() <= 2 * capacity);
            }
        }
    }
}
