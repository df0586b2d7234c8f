//! The guardrail rule: when a guardrail is breached, and when a breach kills an experiment.
//!
//! A guardrail watches one metric's effect (treatment − control, absolute) with a
//! non-inferiority `margin` and the direction in which the metric does harm. At each sampling
//! interval it is **breached** when the one-sided always-valid interval excludes the margin on
//! the harmful side: for a metric whose increase harms (latency, errors), when the interval's
//! lower bound is above `margin`. A **kill** is decided when the breach has persisted for more
//! than two consecutive sampling intervals (the platform spec's "> 2 sampling intervals"),
//! every arm has its minimum units, and the sample-ratio check is healthy. An SRM failure alone
//! makes the experiment `unhealthy` (results are not trusted, so nothing is killed on them)
//! and kills only when configured to. Otherwise the rollout **advances** when no guardrail is
//! breached and the primary effect is confidently positive, and **holds**.
//!
//! No α adjustment across guardrails: a kill needs every condition (intersection-union), as in
//! Spotify's decision rule; persistence on top of a time-uniform test only lowers the false
//! kill rate.

use serde::{Deserialize, Serialize};

use crate::effect::Effect;
use crate::sequential::{Direction, Sequential};

/// Consecutive breached intervals that kill: more than two.
pub const KILL_AFTER: u32 = 3;

/// The direction in which a guardrail metric does harm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Harm {
    /// An increase harms (latency, error rate, abandonment, tickets).
    Increase,
    /// A decrease harms (a conversion used as a guardrail).
    Decrease,
}

/// Whether `effect` breaches `margin` in the `harm` direction: its one-sided always-valid
/// interval lies entirely on the harmful side of the margin.
pub fn breached(effect: &Effect, test: &Sequential, margin: f64, harm: Harm) -> bool {
    match harm {
        Harm::Increase => {
            test.one_sided(effect.estimate, effect.se, effect.n, Direction::Greater)
                .lo
                > margin
        }
        Harm::Decrease => {
            test.one_sided(effect.estimate, effect.se, effect.n, Direction::Less)
                .hi
                < -margin
        }
    }
}

/// What the decision at one sampling interval sees.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// A guardrail is breached at this interval.
    pub breached: bool,
    /// Every arm has its minimum units.
    pub units_ok: bool,
    /// The SRM p-value is at or above the threshold.
    pub srm_ok: bool,
    /// The primary effect is confidently positive.
    pub confident: bool,
}

/// A rollout decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Stop the experiment (roll the treatment back).
    Kill,
    /// Keep the rollout where it is.
    Hold,
    /// Advance the rollout to its next step.
    Advance,
}

impl Action {
    /// `kill`, `hold` or `advance`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Hold => "hold",
            Action::Advance => "advance",
        }
    }
}

/// One guardrail's consecutive breached intervals, and whether it killed (for good).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persistence {
    /// Consecutive breached intervals up to the last one.
    pub breached_intervals: u32,
    /// It killed the experiment.
    pub killed: bool,
}

impl Persistence {
    /// The decision at the next sampling interval, `srm_kills` saying whether an SRM failure
    /// alone kills. Once killed, every later decision is `Kill`.
    pub fn decide(&mut self, evidence: Evidence, srm_kills: bool) -> Action {
        if self.killed {
            return Action::Kill;
        }
        self.breached_intervals = if evidence.breached {
            self.breached_intervals + 1
        } else {
            0
        };
        let kill = if evidence.srm_ok {
            evidence.units_ok && self.breached_intervals >= KILL_AFTER
        } else {
            srm_kills
        };
        if kill {
            self.killed = true;
            Action::Kill
        } else if evidence.srm_ok
            && evidence.units_ok
            && self.breached_intervals == 0
            && evidence.confident
        {
            Action::Advance
        } else {
            Action::Hold
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy(breached: bool) -> Evidence {
        Evidence {
            breached,
            units_ok: true,
            srm_ok: true,
            confident: false,
        }
    }

    #[test]
    fn a_persistent_breach_kills_at_the_third_interval() {
        let mut p = Persistence::default();
        let actions: Vec<Action> = [false, true, true, true, false]
            .into_iter()
            .map(|b| p.decide(healthy(b), false))
            .collect();
        assert_eq!(
            actions,
            [
                Action::Hold,
                Action::Hold,
                Action::Hold,
                Action::Kill,
                Action::Kill
            ]
        );
    }

    #[test]
    fn transient_breaches_do_not_kill() {
        let mut p = Persistence::default();
        for b in [true, true, false, true, false, true, true, false] {
            assert_eq!(p.decide(healthy(b), false), Action::Hold);
        }
    }

    #[test]
    fn srm_alone_kills_only_when_configured() {
        let srm = Evidence {
            srm_ok: false,
            ..healthy(false)
        };
        assert_eq!(Persistence::default().decide(srm, false), Action::Hold);
        assert_eq!(Persistence::default().decide(srm, true), Action::Kill);
        // A breach with an unhealthy split does not kill either.
        let mut p = Persistence::default();
        for _ in 0..5 {
            assert_eq!(
                p.decide(
                    Evidence {
                        breached: true,
                        ..srm
                    },
                    false
                ),
                Action::Hold
            );
        }
    }

    #[test]
    fn a_confident_healthy_result_advances() {
        let e = Evidence {
            confident: true,
            ..healthy(false)
        };
        assert_eq!(Persistence::default().decide(e, false), Action::Advance);
    }
}
