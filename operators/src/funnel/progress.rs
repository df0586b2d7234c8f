//! One unit's progress through a funnel, updated event by event.
//!
//! A unit's events reach this state in sequence order (event time, then the order hash), each
//! once, when the dataflow's frontier has passed its time. The state is per *entry window*
//! the unit has entered and not yet closed, and it holds no event: only, per step, the chains
//! that could still go further, and the shortest time to convert found so far (PostHog's
//! per-step funnel state, kept per entry window and made exact for exclusions and the three
//! orders). For `ordered` and `strict` funnels its size is bounded by the steps, not by the
//! unit's activity; for `unordered` ones, by the window's step-1 events whose chains are
//! still open:
//!
//! - `ordered`: among the chains that have reached a step, only those not *dominated* are
//!   kept: a chain with a later step-1 time and a ceiling at least as high (the highest step
//!   it may still reach; exclusions lower it) does everything the other one could, sooner and
//!   with a later deadline. At most one chain per step and ceiling: `n²` at worst, `n` without
//!   exclusions.
//! - `strict`: per step, the chain that has just reached it with the latest step-1 time (any
//!   other event of the unit ends every chain that does not advance on it).
//! - `unordered`: every step-1 event of the window starts a chain, kept with a maximum
//!   matching of later events to distinct steps (at most `n − 1` events). A chain ends at its
//!   deadline, at an exclusion, or when it has every step. An event with no augmenting path
//!   now never has one later (Kuhn), so the events that did not match are not kept.
//!
//! [`Entry::reaches`] gives what the batch semantics in [`super`] define: the same rows as
//! enumerating every chain from every step-1 event of the window (the reference tests check
//! this against such an enumeration).

use serde::{Deserialize, Serialize};
use sightline_schemas::WEIGHT_ONE;
use smallvec::SmallVec;

use super::{Breakdowns, FunnelDef, Order, Reach, Touch};
use crate::window::Windows;

/// A chain that has reached a step (`ordered`, `strict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Chain {
    /// The step it has reached, 0-based.
    pub step: u8,
    /// The most steps it may still reach (exclusions lower it).
    pub ceiling: u8,
    /// Its step-1 event time, ms.
    pub t1: u64,
}

/// An `unordered` chain: its step-1 time and a maximum matching of later events to steps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matching {
    /// Its step-1 event time, ms.
    pub t1: u64,
    /// The steps (bits, step 1 excluded) each matched event could take.
    pub masks: Vec<u32>,
    /// Per step, the matched event (an index into `masks`) that takes it.
    pub taken: Vec<Option<usize>>,
}

/// A unit's progress in one entry window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The entry window.
    pub window_start_ms: u64,
    /// The breakdown values of its first step-1 event.
    pub breakdown: Breakdowns,
    /// Per step, the shortest time to convert found so far (`u64::MAX`: not reached).
    pub fastest: Vec<u64>,
    /// Chains still able to go further (`ordered`, `strict`); without exclusions at most one
    /// per step, so a few fit inline.
    pub chains: SmallVec<[Chain; 3]>,
    /// Chains still able to go further (`unordered`).
    pub matchings: Vec<Matching>,
    /// Per step, the unit's Horvitz–Thompson weight once it has reached the step, millionths:
    /// the weight of the entry's first step-1 event, then at each step the larger of the step
    /// before's and that of the event that first took the entry to the step. Under the
    /// sampling contract (keep a unit's event iff `hash(unit) < rate`), a unit is seen through
    /// steps 1…k iff its hash is below the smallest of their events' rates, so the largest
    /// weight is exactly 1 / the probability of seeing it there (Horvitz–Thompson), whenever a
    /// step's events share a rate. Empty while every weight is 1 (unsampled traffic allocates
    /// nothing).
    #[serde(default)]
    pub weights: Vec<u64>,
}

/// Step `k` of `n` is reached for the first time, by an event of weight `w`.
fn first_reach(weights: &mut Vec<u64>, n: usize, k: usize, w: u64) {
    if weights.is_empty() {
        if w == WEIGHT_ONE {
            return;
        }
        *weights = vec![WEIGHT_ONE; n];
    }
    if k > 0
        && k < weights.len()
        && let Some(&before) = weights.get(k - 1)
    {
        weights[k] = before.max(w);
    }
}

/// A unit's open entry windows, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// One per entry window not yet closed.
    pub entries: Vec<Entry>,
}

impl Progress {
    /// Applies the unit's next touch (in sequence order). Returns the start of the entry
    /// window the touch opened, if it opened one.
    pub fn apply(&mut self, def: &FunnelDef, windows: Windows, touch: &Touch) -> Option<u64> {
        for entry in &mut self.entries {
            entry.advance(def, touch);
        }
        if touch.steps & 1 == 0 {
            return None;
        }
        let start = windows.start_of(touch.at_ms);
        // Step-1 events come in time order: the touch's window is the newest or a new one.
        let opened = match self.entries.last() {
            Some(last) if last.window_start_ms == start => None,
            _ => {
                // A unit enters a window at most once per window: no spare capacity.
                self.entries.reserve_exact(1);
                self.entries.push(Entry {
                    window_start_ms: start,
                    breakdown: touch.breakdown.clone(),
                    fastest: vec![u64::MAX; def.steps.len()],
                    chains: SmallVec::new(),
                    matchings: Vec::new(),
                    weights: if touch.weight_micros == WEIGHT_ONE {
                        Vec::new()
                    } else {
                        vec![touch.weight_micros; def.steps.len()]
                    },
                });
                Some(start)
            }
        };
        if let Some(entry) = self.entries.last_mut() {
            entry.start(def, touch.at_ms);
        }
        opened
    }

    /// Removes and returns the entry of the window starting at `start`.
    pub fn take(&mut self, start: u64) -> Option<Entry> {
        let i = self
            .entries
            .iter()
            .position(|e| e.window_start_ms == start)?;
        Some(self.entries.remove(i))
    }
}

impl Entry {
    /// A step-1 event of this window at `t1` starts a chain.
    fn start(&mut self, def: &FunnelDef, t1: u64) {
        let n = def.steps.len();
        self.fastest[0] = 0;
        match def.order {
            Order::Ordered | Order::Strict => {
                self.chains.push(Chain {
                    step: 0,
                    ceiling: n as u8,
                    t1,
                });
                prune(&mut self.chains);
            }
            Order::Unordered if n > 1 => self.matchings.push(Matching {
                t1,
                masks: Vec::new(),
                taken: vec![None; n],
            }),
            Order::Unordered => {}
        }
    }

    /// The chains of this window take `touch` (which comes after each chain's step-1 event).
    fn advance(&mut self, def: &FunnelDef, touch: &Touch) {
        let n = def.steps.len();
        let at = touch.at_ms;
        let alive = |t1: u64| t1.saturating_add(def.window_ms) >= at;
        let fastest = &mut self.fastest;
        let weights = &mut self.weights;
        let w = touch.weight_micros;
        match def.order {
            Order::Ordered => {
                self.chains.retain(|c| alive(c.t1));
                if self.chains.is_empty() {
                    return;
                }
                for (x, exclusion) in def.exclusions.iter().enumerate() {
                    if touch.exclusions & (1 << x) == 0 {
                        continue;
                    }
                    // Chains whose last step is in [from, to): nothing from `to` on.
                    let to = exclusion.to_step.min(n);
                    for c in &mut self.chains {
                        let step = usize::from(c.step) + 1;
                        if step >= exclusion.from_step && step < to {
                            c.ceiling = c.ceiling.min((to - 1) as u8);
                        }
                    }
                }
                // Highest step first, so that the touch takes one step of a chain.
                let before = self.chains.len();
                for k in (1..n).rev() {
                    if touch.steps & (1 << k) == 0 {
                        continue;
                    }
                    for i in 0..before {
                        let c = self.chains[i];
                        if usize::from(c.step) + 1 == k && usize::from(c.ceiling) > k {
                            if fastest[k] == u64::MAX {
                                first_reach(weights, n, k, w);
                            }
                            fastest[k] = fastest[k].min(at - c.t1);
                            self.chains.push(Chain { step: k as u8, ..c });
                        }
                    }
                }
                prune(&mut self.chains);
            }
            Order::Strict => {
                // Every event of the unit comes here: a chain that does not advance ends.
                self.chains.retain_mut(|c| {
                    let k = usize::from(c.step) + 1;
                    if !alive(c.t1) || k >= n || touch.steps & (1 << k) == 0 {
                        return false;
                    }
                    if fastest[k] == u64::MAX {
                        first_reach(weights, n, k, w);
                    }
                    fastest[k] = fastest[k].min(at - c.t1);
                    c.step = k as u8;
                    true
                });
                prune(&mut self.chains);
            }
            Order::Unordered => {
                let all: u32 = if n >= 32 { u32::MAX } else { (1 << n) - 1 };
                let mask = touch.steps & all & !1;
                self.matchings.retain_mut(|m| {
                    if !alive(m.t1) || touch.exclusions != 0 {
                        return false;
                    }
                    if mask == 0 {
                        return true;
                    }
                    m.masks.push(mask);
                    let event = m.masks.len() - 1;
                    if !super::augment(event, &m.masks, &mut m.taken, &mut 0) {
                        m.masks.pop();
                        return true;
                    }
                    let done = m.masks.len();
                    if fastest[done] == u64::MAX {
                        first_reach(weights, n, done, w);
                    }
                    fastest[done] = fastest[done].min(at - m.t1);
                    done + 1 < n
                });
            }
        }
    }

    /// The entry's rows: for `all` and each breakdown value, every step reached with its
    /// shortest time to convert.
    pub fn reaches(&self) -> Vec<Reach> {
        let reached = self.fastest.iter().take_while(|t| **t != u64::MAX).count();
        let all = (crate::product::ALL.clone(), crate::product::ALL.clone());
        let mut out = Vec::new();
        for (breakdown, value) in std::iter::once(&all).chain(self.breakdown.iter()) {
            for (k, ttc) in self.fastest.iter().take(reached).enumerate() {
                out.push(Reach {
                    window_start_ms: self.window_start_ms,
                    breakdown: breakdown.clone(),
                    value: value.clone(),
                    step: (k + 1) as u8,
                    ttc_ms: *ttc,
                    weight_micros: self.weights.get(k).copied().unwrap_or(WEIGHT_ONE),
                });
            }
        }
        out
    }
}

/// Keeps, per step, the chains no other chain dominates (a later step-1 time and a ceiling at
/// least as high), one per step and ceiling.
fn prune(chains: &mut SmallVec<[Chain; 3]>) {
    if chains.len() < 2 {
        return;
    }
    // By step, then highest ceiling first, then latest start first.
    chains.sort_unstable_by(|a, b| (a.step, b.ceiling, b.t1).cmp(&(b.step, a.ceiling, a.t1)));
    let mut step = None;
    let mut latest = 0u64;
    chains.retain(|c| {
        if step != Some(c.step) {
            step = Some(c.step);
            latest = c.t1;
            return true;
        }
        // A chain with a ceiling at least as high has a start at least `latest`.
        if c.t1 > latest {
            latest = c.t1;
            true
        } else {
            false
        }
    });
}
