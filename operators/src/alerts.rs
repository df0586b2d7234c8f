//! Integration health with its circuit-breaker state, and the alert rules evaluated on every
//! closed window (command-center spec: error rate > 5% pages, p99 > 2 s warns, an open breaker
//! is critical).
//!
//! [`health`] takes the closed windows of [`crate::product::integration_health`] in window
//! order on one worker (a few rows per window) and carries two things across windows: which
//! breakers are open (opened, and no successful call since) and which rules are firing. Every
//! window with integration data is evaluated, and in it an integration whose breaker is open has
//! a row even without calls, and a firing rule whose integration had no calls resolves. Windows
//! without any integration data are not evaluated (the state carries over them unchanged): what
//! is evaluated depends on the input alone, never on how far the frontier happened to move.
//! Each window's [`HealthWindow`] holds its rows, the alert transitions (`firing`, `resolved`)
//! and the state after it, which the pipeline saves so that a restart resumes from it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sightline_schemas::Label;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;

use crate::close::ClosedWindow;
use crate::product::{ProductKey, Tally};
use crate::window::{Time, Windows};

/// The alert rules and their thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertRules {
    /// `error_rate` fires above this share of failed calls.
    pub error_rate: f64,
    /// Its severity.
    pub error_rate_severity: String,
    /// `latency_p99` fires above this p99 of successful calls, ms.
    pub p99_ms: f64,
    /// Its severity.
    pub p99_severity: String,
    /// `breaker_open`'s severity (it fires while a breaker is open).
    pub breaker_severity: String,
    /// Below this many calls in a window, the error-rate and latency rules do not fire.
    pub min_calls: i64,
}

impl Default for AlertRules {
    fn default() -> Self {
        AlertRules {
            error_rate: 0.05,
            error_rate_severity: "page".into(),
            p99_ms: 2000.0,
            p99_severity: "warning".into(),
            breaker_severity: "critical".into(),
            min_calls: 20,
        }
    }
}

/// What carries over from one window to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    /// The end of the last window evaluated, ms (0: none yet).
    pub window_end_ms: u64,
    /// Integrations whose breaker is open.
    pub open: BTreeSet<String>,
    /// `(rule, integration)` pairs firing.
    pub firing: BTreeSet<(String, String)>,
}

impl HealthState {
    /// Whether anything carries over (an open breaker, a firing rule).
    pub fn active(&self) -> bool {
        !self.open.is_empty() || !self.firing.is_empty()
    }
}

/// One integration's row of one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthRow {
    /// The integration.
    pub integration: Label,
    /// Calls, failures, rate-limit hits, latency, breaker opens of the window.
    pub tally: Tally,
    /// The breaker's state at the window's end.
    pub breaker_open: bool,
}

/// A rule's change of state for one integration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// `error_rate`, `latency_p99`, `breaker_open`, or `compliance` (an experiment's).
    pub rule: String,
    /// The integration (the experiment, for `compliance`).
    pub subject: String,
    /// `page`, `warning`, `critical` (as configured).
    pub severity: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// The window it changed in.
    pub window_start_ms: u64,
    /// Its end.
    pub window_end_ms: u64,
    /// The rule's value in the window (error rate, p99 ms, 1 for an open breaker), to four
    /// decimal places (the rule compared the exact value).
    pub value: f64,
    /// The threshold.
    pub threshold: f64,
    /// Calls in the window (events, for `compliance`).
    pub calls: i64,
}

impl Alert {
    /// The record key on the alerts topic: rule, subject and window, so that a replay of the
    /// window yields the same key.
    pub fn key(&self, route: &str) -> String {
        format!(
            "{route}/{}/{}/{}",
            self.rule, self.subject, self.window_start_ms
        )
    }
}

/// One evaluated window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthWindow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// Rows, by integration.
    pub rows: Vec<HealthRow>,
    /// Alert transitions.
    pub alerts: Vec<Alert>,
    /// The state after the window.
    pub state: HealthState,
}

/// Evaluates one window: its rows, alert transitions and the state after it.
pub fn evaluate(
    start: u64,
    end: u64,
    tallies: BTreeMap<Label, Tally>,
    before: &HealthState,
    rules: &AlertRules,
) -> HealthWindow {
    let mut state = HealthState {
        window_end_ms: end,
        open: before.open.clone(),
        firing: BTreeSet::new(),
    };
    let mut rows = Vec::new();
    let mut integrations: BTreeSet<Label> = tallies.keys().cloned().collect();
    integrations.extend(before.open.iter().map(|i| Label::from(i.as_str())));
    let mut values: Vec<(String, String, bool, f64, f64, i64)> = Vec::new();
    for integration in integrations {
        let tally = tallies.get(&integration).cloned().unwrap_or_default();
        let name = integration.to_string();
        // Open after an open until a later successful call.
        match (tally.last_at("opened"), tally.last_at("success")) {
            (Some(opened), Some(success)) if opened >= success => state.open.insert(name.clone()),
            (Some(_), None) => state.open.insert(name.clone()),
            (_, Some(_)) => state.open.remove(&name),
            (None, None) => false,
        };
        let open = state.open.contains(&name);
        let calls = tally.get("calls");
        let rate = if calls > 0 {
            tally.get("failures") as f64 / calls as f64
        } else {
            0.0
        };
        let p99 = tally
            .dist("latency_ms")
            .and_then(|h| h.quantile(0.99))
            .map_or(0.0, |v| v / 1_000_000.0);
        let enough = calls >= rules.min_calls;
        values.push((
            "error_rate".into(),
            name.clone(),
            enough && rate > rules.error_rate,
            rate,
            rules.error_rate,
            calls,
        ));
        values.push((
            "latency_p99".into(),
            name.clone(),
            enough && p99 > rules.p99_ms,
            p99,
            rules.p99_ms,
            calls,
        ));
        values.push((
            "breaker_open".into(),
            name.clone(),
            open,
            f64::from(u8::from(open)),
            1.0,
            calls,
        ));
        rows.push(HealthRow {
            integration,
            tally,
            breaker_open: open,
        });
    }
    let severity = |rule: &str| match rule {
        "error_rate" => rules.error_rate_severity.clone(),
        "latency_p99" => rules.p99_severity.clone(),
        _ => rules.breaker_severity.clone(),
    };
    let mut alerts = Vec::new();
    let mut seen = BTreeSet::new();
    for (rule, subject, fires, value, threshold, calls) in values {
        let key = (rule.clone(), subject.clone());
        seen.insert(key.clone());
        let was = before.firing.contains(&key);
        if fires {
            state.firing.insert(key.clone());
        }
        if fires != was {
            alerts.push(Alert {
                severity: severity(&rule),
                rule,
                subject,
                state: if fires { "firing" } else { "resolved" }.into(),
                window_start_ms: start,
                window_end_ms: end,
                value: shown(value),
                threshold,
                calls,
            });
        }
    }
    // A firing rule of an integration that had nothing in this window: its condition no
    // longer holds.
    for (rule, subject) in before.firing.difference(&seen) {
        alerts.push(Alert {
            severity: severity(rule),
            rule: rule.clone(),
            subject: subject.clone(),
            state: "resolved".into(),
            window_start_ms: start,
            window_end_ms: end,
            value: 0.0,
            threshold: 0.0,
            calls: 0,
        });
    }
    HealthWindow {
        window_start_ms: start,
        window_end_ms: end,
        rows,
        alerts,
        state,
    }
}

/// `value` to four decimal places: what an on-call reads, and no long digit runs in the
/// record (the privacy audit reads ten digits after a decimal point as a phone number).
fn shown(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}

/// Evaluates every closed window of integration tallies in order, from `initial` (the state
/// saved before a restart, or empty); see the module documentation.
pub fn health<'s>(
    closed: StreamVec<'s, Time, ClosedWindow<ProductKey, Tally>>,
    windows: Windows,
    rules: AlertRules,
    initial: HealthState,
) -> StreamVec<'s, Time, HealthWindow> {
    let to_first = Exchange::new(|_: &ClosedWindow<ProductKey, Tally>| 0u64);
    closed.unary_frontier(to_first, "IntegrationHealth", move |_capability, _info| {
        let mut state = initial;
        // Window start → (capability, tallies by integration).
        let mut pending: BTreeMap<u64, (Capability<Time>, BTreeMap<Label, Tally>)> =
            BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                let Some(held) = cap.retain_least(0) else {
                    return;
                };
                for w in data.drain(..) {
                    let (_, tallies) = pending
                        .entry(w.window_start_ms)
                        .or_insert_with(|| (held.clone(), BTreeMap::new()));
                    for (key, tally) in w.entries {
                        use differential_dataflow::difference::Semigroup;
                        tallies.entry(key.group).or_default().plus_equals(&tally);
                    }
                }
            });
            while let Some((&start, _)) = pending.first_key_value() {
                let end = windows.end_of(start);
                // Every worker's part of the window is in once the frontier has passed its end.
                if frontier.less_than(&end) {
                    break;
                }
                let Some((_, (cap, tallies))) = pending.pop_first() else {
                    break;
                };
                let evaluated = evaluate(start, end, tallies, &state, &rules);
                state = evaluated.state.clone();
                output.session(&cap).give(evaluated);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(n: i64, failures: i64) -> Tally {
        let mut t = Tally::new();
        for _ in 0..n {
            t = t.count("calls");
        }
        for _ in 0..failures {
            t = t.count("failures");
        }
        t
    }

    #[test]
    fn rules_fire_and_resolve_once() {
        let rules = AlertRules::default();
        let mut tallies = BTreeMap::new();
        tallies.insert(Label::from("gmail"), calls(40, 10).at("opened", 5));
        let w1 = evaluate(0, 10, tallies, &HealthState::default(), &rules);
        let fired: Vec<(&str, &str)> = w1
            .alerts
            .iter()
            .map(|a| (a.rule.as_str(), a.state.as_str()))
            .collect();
        assert_eq!(
            fired,
            vec![("error_rate", "firing"), ("breaker_open", "firing")]
        );
        // Nothing next window: the error rate resolves, the breaker stays open (no success).
        let w2 = evaluate(10, 20, BTreeMap::new(), &w1.state, &rules);
        assert_eq!(w2.rows.len(), 1, "an open breaker keeps its row");
        assert!(w2.rows[0].breaker_open);
        let changed: Vec<(&str, &str)> = w2
            .alerts
            .iter()
            .map(|a| (a.rule.as_str(), a.state.as_str()))
            .collect();
        assert_eq!(changed, vec![("error_rate", "resolved")]);
        // A successful call closes it.
        let mut tallies = BTreeMap::new();
        tallies.insert(Label::from("gmail"), calls(5, 0).at("success", 25));
        let w3 = evaluate(20, 30, tallies, &w2.state, &rules);
        assert_eq!(w3.alerts.len(), 1);
        assert_eq!(
            (w3.alerts[0].rule.as_str(), w3.alerts[0].state.as_str()),
            ("breaker_open", "resolved")
        );
        assert!(!w3.state.active());
        // Too few calls: no error-rate alert, however bad.
        let mut tallies = BTreeMap::new();
        tallies.insert(Label::from("hubspot"), calls(19, 19));
        let quiet = evaluate(30, 40, tallies, &w3.state, &rules);
        assert!(quiet.alerts.is_empty());
    }
}
