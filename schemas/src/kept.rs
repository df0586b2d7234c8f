//! The properties an accepted event keeps beyond the envelope ([`Kept`]), as its schema
//! declares them (`x-sightline.keep`, [`crate::registry::Kept`]).
//!
//! The operators read them by name (`aps_score`, `integration`, `tags`, …): a new metric is a
//! schema change plus the operator that reads it, never a change of the decoder or of
//! [`crate::Event`]. Numbers are fixed point ([`Measure`]) so that events stay `Eq`, `Ord` and
//! `Hash`, as differential collections need.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Label;

/// A kept number in millionths (fixed point): exact for the integers, booleans (0 or 1) and
/// decimal scores events carry, and totally ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Measure(pub i64);

impl Measure {
    /// Millionths per unit.
    pub const SCALE: f64 = 1_000_000.0;

    /// The nearest measure to `value`; `None` for a value that is not finite or too large.
    pub fn from_f64(value: f64) -> Option<Measure> {
        let scaled = (value * Measure::SCALE).round();
        (scaled.is_finite() && scaled.abs() < 9.0e18).then_some(Measure(scaled as i64))
    }

    /// The value.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Measure::SCALE
    }
}

/// One kept value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KeptValue {
    /// A number or boolean.
    Measure(Measure),
    /// A string, scrubbed when its schema says so.
    Label(Label),
    /// An array of strings (tags), in the order they came.
    Labels(Arc<[Label]>),
}

/// What an accepted event keeps beyond the envelope: `(property, value)` pairs sorted by
/// property name. Empty (no allocation) for events whose schema keeps nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Kept(Option<Arc<[(Label, KeptValue)]>>);

impl Kept {
    /// Kept values from pairs (sorted here).
    pub fn new(mut pairs: Vec<(Label, KeptValue)>) -> Kept {
        Kept::drain_from(&mut pairs)
    }

    /// Kept values from the pairs in `scratch` (sorted here), which is left empty with its
    /// capacity: a decoder reuses one buffer for every event, and the shared list is the
    /// event's one allocation for its kept values (a drained `Vec` has an exact length, so the
    /// list is allocated once, at its size).
    pub fn drain_from(scratch: &mut Vec<(Label, KeptValue)>) -> Kept {
        if scratch.is_empty() {
            return Kept(None);
        }
        scratch.sort_by(|a, b| a.0.cmp(&b.0));
        Kept(Some(scratch.drain(..).collect()))
    }

    /// Every kept pair, sorted by property name.
    pub fn pairs(&self) -> &[(Label, KeptValue)] {
        self.0.as_deref().unwrap_or(&[])
    }

    /// The value of `field`, if the event kept it.
    #[inline]
    pub fn get(&self, field: &str) -> Option<&KeptValue> {
        self.pairs()
            .iter()
            .find(|(name, _)| &**name == field)
            .map(|(_, v)| v)
    }

    /// The number `field`, if the event kept it as a measure.
    #[inline]
    pub fn measure(&self, field: &str) -> Option<f64> {
        match self.get(field) {
            Some(KeptValue::Measure(m)) => Some(m.as_f64()),
            _ => None,
        }
    }

    /// The label `field`, if the event kept it as one.
    #[inline]
    pub fn label(&self, field: &str) -> Option<&Label> {
        match self.get(field) {
            Some(KeptValue::Label(l)) => Some(l),
            _ => None,
        }
    }

    /// The labels of list `field` (empty when absent).
    #[inline]
    pub fn labels(&self, field: &str) -> &[Label] {
        match self.get(field) {
            Some(KeptValue::Labels(l)) => l,
            _ => &[],
        }
    }

    /// `field` as text, whatever its kind: a label as it is, a measure in its shortest
    /// decimal form (`3`, `0.5`), a list joined by `,`. For equality filters and unit keys.
    pub fn text(&self, field: &str) -> Option<String> {
        Some(match self.get(field)? {
            KeptValue::Label(l) => l.to_string(),
            KeptValue::Measure(m) => m.as_f64().to_string(),
            KeptValue::Labels(l) => l.join(","),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_values_up_by_name() {
        let kept = Kept::new(vec![
            (Label::from("score"), KeptValue::Measure(Measure(2_000_000))),
            (
                Label::from("action_type"),
                KeptValue::Label(Label::from("send_email")),
            ),
            (
                Label::from("tags"),
                KeptValue::Labels(vec![Label::from("docs"), Label::from("support")].into()),
            ),
        ]);
        assert_eq!(kept.measure("score"), Some(2.0));
        assert_eq!(kept.label("action_type").map(|l| &**l), Some("send_email"));
        assert_eq!(kept.labels("tags").len(), 2);
        assert_eq!(kept.text("score").as_deref(), Some("2"));
        assert_eq!(kept.text("tags").as_deref(), Some("docs,support"));
        assert!(kept.get("absent").is_none());
        assert!(Kept::new(Vec::new()).pairs().is_empty());
        assert_eq!(Measure::from_f64(0.5), Some(Measure(500_000)));
        assert_eq!(Measure::from_f64(f64::NAN), None);
    }
}
