//! Privacy before persistence: pattern scrubbing, keyed pseudonyms, payload redaction.
//!
//! - [`Scrubber`] finds and replaces e-mail addresses, phone numbers, IP addresses, bearer
//!   tokens, API keys and other secrets, and coordinate pairs in free text. `sightline pii-scan`
//!   uses the same patterns to audit what was stored.
//! - [`KeyRing`] turns identifiers into pseudonyms with keyed BLAKE3. The key rotates every
//!   `rotation_days` (30 by default) of *event time*: the key of period `p` is derived from the
//!   configured secret and `p`, and the pseudonym carries the key id `<key-id>.<p>`, so the same
//!   user gets the same pseudonym within a period and unlinkable ones across periods. Replays
//!   give the same pseudonyms as the live run.
//! - [`Privacy::redact_payload`] is what a dead-letter record keeps of a bad record: the JSON
//!   with every field handled as its schema says (identifiers pseudonymized, free text scrubbed,
//!   dropped fields removed, undeclared fields replaced by `[redacted]`), or, when the record is
//!   not JSON, its scrubbed text.
//!
//! This crate is the compliance boundary: everything that decides what personal data may
//! reach storage is here, on top of the registry's annotations (`sightline-schemas`). The
//! decoder (`sightline-ingest`) calls it on every record; `pii-scan` and the fuzz target use
//! its scrubber to audit what was stored.
//!
//! ```
//! use std::sync::Arc;
//! use sightline_privacy::{KeyRing, Pseudonymizer, Scrubber};
//!
//! let ring = Arc::new(KeyRing::from_hex("k1", &"0f".repeat(32), 30).unwrap());
//! let mut pseudonyms = Pseudonymizer::new(ring);
//! let a = pseudonyms.pseudonym("u_71aa", 1_769_178_600_000);
//! assert!(a.starts_with("k1."));
//! assert_eq!(a, pseudonyms.pseudonym("u_71aa", 1_769_178_600_001), "stable within a period");
//! assert_eq!(Scrubber::new().scrub("mail jane@example.com now"), "mail [email] now");
//! ```

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use regex::Regex;
use serde_json::{Map, Value};

use sightline_schemas::registry::{FieldRule, ObjectRule, PiiAction, Registry};
use sightline_schemas::{MAX_KEY_ID, Pseudonym};

/// Default key rotation period.
pub const DEFAULT_ROTATION_DAYS: u32 = 30;
/// Longest payload a dead-letter record keeps, in bytes; longer ones are cut (and marked).
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// What undeclared values are replaced with in dead-letter payloads.
pub const REDACTED: &str = "[redacted]";

/// The patterns, each with the marker that replaces its matches. Order matters: the first
/// alternative that matches at a position wins.
const PATTERNS: &[(&str, &str)] = &[
    (
        "email",
        r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}",
    ),
    ("token", r"(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"),
    (
        "token",
        r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}",
    ),
    ("token", r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"),
    ("token", r"\bAKIA[0-9A-Z]{16}\b"),
    ("token", r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    ("token", r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"),
    ("token", r"\bAIza[0-9A-Za-z_\-]{35}"),
    (
        "token",
        r#"(?i:\b(?:api[_\-]?key|secret|password|passwd|access[_\-]?token|auth[_\-]?token)"?\s*[=:]\s*"?)[^\s,;"\[][^\s,;"]{5,}"#,
    ),
    (
        "coordinates",
        r"-?\b\d{1,3}\.\d{4,}\s*,\s*-?\d{1,3}\.\d{4,}\b",
    ),
    (
        "ip",
        r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
    ),
    ("ip", r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b"),
    (
        "ip",
        r"\b(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?\b",
    ),
    ("ip", r"\b(?:[0-9A-Fa-f]{1,4}:){1,7}:"),
    ("ip", r"::(?:[fF]{4}:)?[0-9A-Fa-f]{1,4}\b"),
    (
        "phone",
        r"(?:\+\d{1,3}[\s.\-]?)?\(?\b\d{2,4}\)?[\s.\-]\d{3,4}[\s.\-]\d{3,4}\b",
    ),
    ("phone", r"\(\d{3}\)\s?\d{3}[\s.\-]?\d{4}\b"),
    ("phone", r"\b\d{3}[.\-]?\d{3}[.\-]?\d{4}\b"),
    ("phone", r"\+\d{8,15}\b"),
];

/// A cheap test that is true whenever a pattern can match (a superset, checked by a property
/// test): every pattern needs an `@`, a `:` or `=`, at least four digits, or one of a few
/// token prefixes. Most labels and paths pass none of these and skip the regex (measured in
/// `benches/README.md`).
fn might_match(text: &str) -> bool {
    let bytes = text.as_bytes();
    let starts = |i: usize, prefix: &[u8]| {
        bytes
            .get(i..i + prefix.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(prefix))
    };
    let mut digits = 0u32;
    for (i, &b) in bytes.iter().enumerate() {
        let hit = match b.to_ascii_lowercase() {
            b'@' | b':' | b'=' => true,
            b'0'..=b'9' => {
                digits += 1;
                digits >= 4
            }
            b'b' => starts(i, b"bearer"),
            b'e' => starts(i, b"eyj"),
            b's' | b'p' | b'r' => starts(i + 1, b"k_"),
            b'a' => starts(i, b"akia") || starts(i, b"aiza"),
            b'g' => starts(i + 1, b"h"),
            b'x' => starts(i, b"xox"),
            _ => false,
        };
        if hit {
            return true;
        }
    }
    false
}

/// One match of a PII or secret pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `email`, `token`, `coordinates`, `ip` or `phone`.
    pub kind: &'static str,
    /// The matched text.
    pub text: String,
}

/// Finds and replaces personal data and secrets in free text.
#[derive(Clone, Debug)]
pub struct Scrubber {
    any: Regex,
}

impl Default for Scrubber {
    fn default() -> Self {
        Scrubber::new()
    }
}

impl Scrubber {
    /// The scrubber with Sightline's patterns (compiled once per process; clones share it).
    pub fn new() -> Scrubber {
        static COMPILED: std::sync::LazyLock<Regex> = std::sync::LazyLock::new(|| {
            let alternation: Vec<String> = PATTERNS
                .iter()
                .enumerate()
                .map(|(i, (_, p))| format!("(?P<p{i}>{p})"))
                .collect();
            // The patterns are constants, tested below.
            #[allow(clippy::expect_used)]
            Regex::new(&alternation.join("|")).expect("scrubber patterns compile")
        });
        Scrubber {
            any: COMPILED.clone(),
        }
    }

    /// Whether `text` contains anything to scrub.
    pub fn finds(&self, text: &str) -> bool {
        might_match(text) && self.any.is_match(text)
    }

    /// Every match in `text`.
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        if !might_match(text) {
            return Vec::new();
        }
        self.any
            .captures_iter(text)
            .filter_map(|c| {
                let (i, m) =
                    (0..PATTERNS.len()).find_map(|i| c.name(&format!("p{i}")).map(|m| (i, m)))?;
                Some(Finding {
                    kind: PATTERNS[i].0,
                    text: m.as_str().to_owned(),
                })
            })
            .collect()
    }

    /// Whether `key` may be kept as an object key or pointer segment: a short identifier-like
    /// name in which the scrubber finds nothing.
    pub fn safe_key(&self, key: &str) -> bool {
        !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            && !self.finds(key)
    }

    /// `text` with every match replaced by its marker (`[email]`, `[phone]`, …).
    pub fn scrub<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if !self.finds(text) {
            return Cow::Borrowed(text);
        }
        Cow::Owned(
            self.any
                .replace_all(text, |c: &regex::Captures<'_>| {
                    let kind = (0..PATTERNS.len())
                        .find(|i| c.name(&format!("p{i}")).is_some())
                        .map_or("redacted", |i| PATTERNS[i].0);
                    format!("[{kind}]")
                })
                .into_owned(),
        )
    }
}

/// Why a key could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The secret is too short or not hex.
    #[error("the pseudonym key must be at least 32 hex digits (16 bytes): {0}")]
    Invalid(String),
    /// The key file could not be read.
    #[error("cannot read the pseudonym key file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key id is empty, longer than [`MAX_KEY_ID`] bytes, or has characters outside
    /// `[A-Za-z0-9_-]`.
    #[error("the key id `{0}` must be 1 to 16 characters, only letters, digits, `_` and `-`")]
    KeyId(String),
    /// The rotation period is zero.
    #[error("the key rotation period must be at least one day")]
    Rotation,
}

/// The pseudonymization key: a secret, its id, and the rotation period.
#[derive(Clone)]
pub struct KeyRing {
    key_id: String,
    secret: Vec<u8>,
    rotation_ms: i64,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("KeyRing")
            .field("key_id", &self.key_id)
            .field("rotation_ms", &self.rotation_ms)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// A key ring from a hex secret (at least 16 bytes).
    pub fn from_hex(key_id: &str, hex: &str, rotation_days: u32) -> Result<KeyRing, KeyError> {
        let hex = hex.trim();
        let secret = decode_hex(hex)
            .filter(|s| s.len() >= 16)
            .ok_or_else(|| KeyError::Invalid(format!("{} characters", hex.len())))?;
        KeyRing::new(key_id, secret, rotation_days)
    }

    /// A key ring whose hex secret is the content of `path`.
    pub fn from_file(key_id: &str, path: &Path, rotation_days: u32) -> Result<KeyRing, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::File {
            path: path.display().to_string(),
            source,
        })?;
        KeyRing::from_hex(key_id, &text, rotation_days)
    }

    /// A key ring with a random secret (pseudonyms differ from run to run): for demos and
    /// one-off replays that configure no key.
    pub fn ephemeral(rotation_days: u32) -> Result<KeyRing, KeyError> {
        let mut secret = vec![0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
            .map_err(|source| KeyError::File {
                path: "/dev/urandom".into(),
                source,
            })?;
        KeyRing::new("ephemeral", secret, rotation_days)
    }

    fn new(key_id: &str, secret: Vec<u8>, rotation_days: u32) -> Result<KeyRing, KeyError> {
        if key_id.is_empty()
            || key_id.len() > MAX_KEY_ID
            || !key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(KeyError::KeyId(key_id.to_owned()));
        }
        if rotation_days == 0 {
            return Err(KeyError::Rotation);
        }
        Ok(KeyRing {
            key_id: key_id.to_owned(),
            secret,
            rotation_ms: i64::from(rotation_days) * 86_400_000,
        })
    }

    /// The rotation period `event_time_ms` falls in (periods start at the Unix epoch).
    pub fn period(&self, event_time_ms: i64) -> i64 {
        event_time_ms.div_euclid(self.rotation_ms)
    }

    /// The linking key: derived from the secret, never rotated. Unit links
    /// ([`Pseudonymizer::link_of`]) follow a unit across key periods inside the process and
    /// its state checkpoints; they are never stored in a table or sent on a topic.
    fn link_key(&self) -> [u8; 32] {
        blake3::derive_key(
            &format!("sightline unit link {}", self.key_id),
            &self.secret,
        )
    }

    /// The key of one period, derived from the secret.
    fn period_key(&self, period: i64) -> [u8; 32] {
        let mut material = self.secret.clone();
        material.extend_from_slice(&period.to_le_bytes());
        blake3::derive_key(&format!("sightline pseudonym {}", self.key_id), &material)
    }
}

/// A key ring with the key of the most recent period cached. One per worker.
///
/// Pseudonyms of users and sessions are computed for every event, not memoized: a memo of the
/// active users and sessions missed cache on nearly every lookup (the input streams through
/// the caches), and a keyed hash of a short identifier costs less than those misses
/// (`benches/README.md`). Tenants are few, and the decoder memoizes theirs per key period.
#[derive(Clone, Debug)]
pub struct Pseudonymizer {
    ring: Arc<KeyRing>,
    /// The linking key, derived on first use.
    link: Option<[u8; 32]>,
    /// The period, its key, and the pseudonym prefix `<key-id>.<period>.`.
    cached: Option<(i64, [u8; 32], String)>,
}

impl Pseudonymizer {
    /// A pseudonymizer over `ring`.
    pub fn new(ring: Arc<KeyRing>) -> Pseudonymizer {
        Pseudonymizer {
            ring,
            link: None,
            cached: None,
        }
    }

    /// The key period of `event_time_ms`: pseudonyms of one value are equal within it.
    pub fn period_of(&self, event_time_ms: i64) -> i64 {
        self.ring.period(event_time_ms)
    }

    /// The pseudonym of `value` at `event_time_ms`: `<key-id>.<period>.<24 hex digits>`.
    pub fn pseudonym(&mut self, value: &str, event_time_ms: i64) -> String {
        self.pseudonym_of(value, event_time_ms).as_str().to_owned()
    }

    /// The unit link of `value`: a 64-bit keyed hash under the linking key, the same in every
    /// key period (never 0, which means "not computed" on an event). Two distinct values
    /// collide with probability 2⁻⁶⁴ per pair.
    pub fn link_of(&mut self, value: &str) -> u64 {
        let ring = &self.ring;
        let key = self.link.get_or_insert_with(|| ring.link_key());
        let digest = blake3::keyed_hash(key, value.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        u64::from_le_bytes(first).max(1)
    }

    /// [`Pseudonymizer::pseudonym`] as an inline [`Pseudonym`], without an allocation.
    pub fn pseudonym_of(&mut self, value: &str, event_time_ms: i64) -> Pseudonym {
        let period = self.ring.period(event_time_ms);
        let (_, key, prefix) = match &self.cached {
            Some(cached) if cached.0 == period => cached,
            _ => self.cached.insert((
                period,
                self.ring.period_key(period),
                format!("{}.{period}.", self.ring.key_id),
            )),
        };
        let digest = blake3::keyed_hash(key, value.as_bytes());
        Pseudonym::from_digest(prefix, digest.as_bytes())
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// Scrubber and pseudonymizer together: everything one worker needs to make a record safe to
/// store.
#[derive(Clone, Debug)]
pub struct Privacy {
    /// Pattern scrubbing.
    pub scrubber: Scrubber,
    /// Pseudonyms.
    pub pseudonyms: Pseudonymizer,
}

impl Privacy {
    /// Privacy with the given key ring.
    pub fn new(ring: Arc<KeyRing>) -> Privacy {
        Privacy {
            scrubber: Scrubber::new(),
            pseudonyms: Pseudonymizer::new(ring),
        }
    }

    /// What a dead-letter record keeps of the raw record `bytes`: see the module docs.
    /// `event_time_ms` selects the pseudonym key (the record's own time when it has one).
    pub fn redact_payload(&mut self, bytes: &[u8], event_time_ms: Option<i64>) -> String {
        let text = String::from_utf8_lossy(bytes);
        let mut out = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(mut record)) => {
                let time = event_time_ms
                    .or_else(|| {
                        record
                            .get("timestamp")
                            .and_then(Value::as_str)
                            .and_then(sightline_schemas::parse_rfc3339_ms)
                    })
                    .unwrap_or_else(now_ms);
                self.redact_record(&mut record, time);
                Value::Object(record).to_string()
            }
            Ok(mut other) => {
                self.redact_unknown(&mut other);
                other.to_string()
            }
            Err(_) => self.redact_unparsed(&text),
        };
        if out.len() > MAX_PAYLOAD_BYTES {
            let mut cut = MAX_PAYLOAD_BYTES;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("…[truncated]");
        }
        out
    }

    /// A record that is not valid JSON: the content of every string literal is replaced by
    /// `[redacted]` (a key-looking literal followed by `:` is kept when it is a safe name), and
    /// the text between them is pattern-scrubbed. Identifiers cannot be told from anything else
    /// here, so none is kept.
    fn redact_unparsed(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len().min(MAX_PAYLOAD_BYTES));
        let mut rest = text;
        while let Some(open) = rest.find('"') {
            out.push_str(&self.scrubber.scrub(&rest[..open]));
            let body = &rest[open + 1..];
            let mut end = None;
            let mut escaped = false;
            for (i, c) in body.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let (content, after) = match end {
                Some(i) => (&body[..i], &body[i + 1..]),
                None => (body, ""),
            };
            let is_key = after.trim_start().starts_with(':');
            out.push('"');
            out.push_str(if is_key && self.scrubber.safe_key(content) {
                content
            } else {
                REDACTED
            });
            if end.is_some() {
                out.push('"');
            }
            rest = after;
        }
        out.push_str(&self.scrubber.scrub(rest));
        out
    }

    /// Renames the keys of `map` that are not safe names.
    fn safe_keys(&self, map: &mut Map<String, Value>) {
        if map.keys().all(|k| self.scrubber.safe_key(k)) {
            return;
        }
        let old = std::mem::take(map);
        for (i, (key, value)) in old.into_iter().enumerate() {
            let key = if self.scrubber.safe_key(&key) {
                key
            } else {
                format!("[redacted-key-{i}]")
            };
            map.insert(key, value);
        }
    }

    fn redact_record(&mut self, record: &mut Map<String, Value>, time: i64) {
        let registry = Registry::embedded();
        let consent = record.get("geo_consent") == Some(&Value::Bool(true));
        let schema = record
            .get("event_name")
            .and_then(Value::as_str)
            .and_then(|name| {
                let version = record.get("schema_version").and_then(Value::as_str);
                registry.schema_of(name, version)
            });
        let properties_rule = schema.map(|s| &s.properties);
        self.safe_keys(record);
        let keys: Vec<String> = record.keys().cloned().collect();
        for key in keys {
            if key == "properties" {
                if let Some(props) = record.get_mut(&key) {
                    match (properties_rule, props) {
                        (Some(rule), Value::Object(map)) => self.redact_object(map, rule, time),
                        (_, other) => self.redact_unknown(other),
                    }
                }
                continue;
            }
            let action = registry.envelope_action(&key);
            let keep = match action {
                Some(PiiAction::Consent) => consent,
                Some(PiiAction::Drop) => false,
                _ => true,
            };
            if !keep {
                record.remove(&key);
                continue;
            }
            if let Some(value) = record.get_mut(&key) {
                match action {
                    Some(PiiAction::Pseudonymize) => self.pseudonymize(value, time),
                    Some(_) => self.scrub_strings(value),
                    None => undeclared(value),
                }
            }
        }
    }

    fn redact_object(&mut self, map: &mut Map<String, Value>, rule: &ObjectRule, time: i64) {
        self.safe_keys(map);
        let keys: Vec<String> = map.keys().cloned().collect();
        for key in keys {
            let Some(value) = map.get_mut(&key) else {
                continue;
            };
            match rule.field(&key) {
                Some((_, field))
                    if matches!(field.action, PiiAction::Drop | PiiAction::Consent) =>
                {
                    map.remove(&key);
                }
                Some((_, field)) => self.redact_field(value, field, time),
                None => undeclared(value),
            }
        }
    }

    fn redact_field(&mut self, value: &mut Value, field: &FieldRule, time: i64) {
        match (value, field.action) {
            (Value::Object(map), _) => match &field.object {
                Some(rule) => self.redact_object(map, rule, time),
                None => map.values_mut().for_each(undeclared),
            },
            (Value::Array(items), _) => {
                for item in items {
                    match &field.items {
                        Some(rule) => self.redact_field(item, rule, time),
                        None => undeclared(item),
                    }
                }
            }
            (value, PiiAction::Pseudonymize) => self.pseudonymize(value, time),
            (value, _) => self.scrub_strings(value),
        }
    }

    fn pseudonymize(&mut self, value: &mut Value, time: i64) {
        match value {
            Value::String(s) => *s = self.pseudonyms.pseudonym(s, time),
            // A number where an identifier belongs (a wrong-typed `user_id`) is still the
            // identifier: it gets the pseudonym of its text, never kept as it came.
            Value::Number(n) => {
                let pseudonym = self.pseudonyms.pseudonym(&n.to_string(), time);
                *value = Value::String(pseudonym);
            }
            other => undeclared(other),
        }
    }

    fn scrub_strings(&self, value: &mut Value) {
        match value {
            Value::String(s) => {
                if let Cow::Owned(clean) = self.scrubber.scrub(s) {
                    *s = clean;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.scrub_strings(v)),
            Value::Object(map) => {
                self.safe_keys(map);
                map.values_mut().for_each(|v| self.scrub_strings(v));
            }
            _ => {}
        }
    }

    /// Values with no schema to say what they are: strings, numbers and containers are
    /// redacted, booleans and null kept.
    fn redact_unknown(&self, value: &mut Value) {
        match value {
            Value::Object(map) => map.values_mut().for_each(undeclared),
            Value::Array(items) => items.iter_mut().for_each(undeclared),
            other => undeclared(other),
        }
    }
}

/// A value the schema does not declare is replaced by `[redacted]`: strings, objects and
/// arrays, and numbers too (a phone number or an account id can be one). Only `true`, `false`
/// and `null`, which cannot identify anyone, are kept.
fn undeclared(value: &mut Value) {
    if matches!(
        value,
        Value::String(_) | Value::Number(_) | Value::Object(_) | Value::Array(_)
    ) {
        *value = Value::String(REDACTED.to_owned());
    }
}

fn now_ms() -> i64 {
    sightline_schemas::wall_clock_ms() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_schemas::PseudonymTooLong;

    fn ring() -> Arc<KeyRing> {
        Arc::new(
            KeyRing::from_hex(
                "k1",
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                30,
            )
            .unwrap(),
        )
    }

    #[test]
    fn scrubs_each_pattern() {
        let s = Scrubber::new();
        for (text, marker) in [
            ("mail jane.doe@example.com now", "[email]"),
            ("call +1 415 555 0134", "[phone]"),
            ("call (415) 555-0134", "[phone]"),
            ("from 192.168.10.7 today", "[ip]"),
            ("from 2001:db8::8a2e:370:7334", "[ip]"),
            ("Authorization: Bearer abcdef123456789", "[token]"),
            ("key sk_live_4eC39HqLyjWDarjtT1zdp7dc", "[token]"),
            ("AKIAIOSFODNN7EXAMPLE", "[token]"),
            ("password=hunter22", "[token]"),
            ("jwt eyJhbGciOiJI.eyJzdWIiOiIx.SflKxwRJSMeKK", "[token]"),
            ("at 52.520008, 13.404954", "[coordinates]"),
            ("call (415)555-0134", "[phone]"),
            ("call 4155550134", "[phone]"),
            ("from ::1 and 2001:db8::", "[ip]"),
            (r#"{"password":"hunter22"}"#, "[token]"),
        ] {
            let clean = s.scrub(text);
            assert!(clean.contains(marker), "{text} -> {clean}");
            assert!(s.scan(&clean).is_empty(), "{clean} still matches");
        }
        // Found by the fuzz target: a marker after a secret's name is not a secret.
        assert!(s.scan(r#"password:"[redacted]""#).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn the_prefilter_never_hides_a_match(text in "[ -~]{0,40}", glue in proptest::sample::select(vec![
            "jane@x.io", "10.1.2.3", "+1 415 555 0134", "Bearer abcdefghij", "sk_live_abcdefghijkl", "::1", "password=secret1",
            "AKIAIOSFODNN7EXAMPLE", "eyJhbGciOi.eyJzdWIiOi.SflKxwRJSM", "xoxb-1234567890", "(415)555-0134", "52.5200, 13.4049",
        ])) {
            for candidate in [text.clone(), format!("{text}{glue}"), format!("{glue} {text}")] {
                let regex_finds = Scrubber::new().any.is_match(&candidate);
                proptest::prop_assert!(!regex_finds || might_match(&candidate), "{candidate}");
            }
        }
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let s = Scrubber::new();
        for text in [
            "High pipeline value ($50k ARR), demo tomorrow (urgent), strong ICP fit",
            "Gmail API: Daily sending limit exceeded",
            "2026-01-23T14:30:00Z",
            "/crm/v3/objects/deals",
            "Follow up: Demo tomorrow",
            "version 4.3.0-beta.1",
            "k1.689.0a1b2c3d4e5f60718293a4b5",
            "retry 3 of 5 after 1500 ms",
        ] {
            assert!(!s.finds(text), "{text}: {:?}", s.scan(text));
        }
    }

    #[test]
    fn pseudonyms_rotate_with_the_period() {
        let mut p = Pseudonymizer::new(ring());
        let period_ms = 30 * 86_400_000i64;
        let boundary = 700 * period_ms;
        let before = p.pseudonym("casey", boundary - 1);
        let before_again = p.pseudonym("casey", boundary - period_ms + 5);
        let after = p.pseudonym("casey", boundary);
        assert_eq!(before, before_again, "same user, same period");
        assert!(
            before.starts_with("k1.699.") && after.starts_with("k1.700."),
            "{before} {after}"
        );
        assert_ne!(before[7..], after[7..]);
        assert_ne!(p.pseudonym("casey", 5), p.pseudonym("morgan", 5));
        let mut other = Pseudonymizer::new(Arc::new(
            KeyRing::from_hex("k1", &"ab".repeat(32), 30).unwrap(),
        ));
        assert_ne!(
            other.pseudonym("casey", 5),
            p.pseudonym("casey", 5),
            "the secret matters"
        );
    }

    /// Vectors computed outside this code, with the `blake3` package for Python (an
    /// independent BLAKE3): the period key is `derive_key("sightline pseudonym k1", secret ||
    /// period as i64 LE)`, the pseudonym the first 12 bytes of `keyed_hash(key, value)`.
    #[test]
    fn pseudonyms_match_independent_blake3_vectors() {
        let ring = Arc::new(
            KeyRing::from_hex(
                "k1",
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                30,
            )
            .unwrap(),
        );
        assert_eq!(
            ring.period_key(682),
            *blake3::Hash::from_hex(
                "fbe169f3d1a520aa8b5cfbfb1d8265229bee2e5a443fc2c5a5357b14981342d8"
            )
            .unwrap()
            .as_bytes()
        );
        let mut p = Pseudonymizer::new(ring);
        let t = 1_769_178_600_000; // 2026-01-23T14:30:00Z, in period 682 of 30 days
        assert_eq!(p.pseudonym("u_71aa", t), "k1.682.3018d3170d5f9694665202fb");
        assert_eq!(
            p.pseudonym("casey@acmecorp.com", t),
            "k1.682.51232be26c79e630dc0b1258"
        );
    }

    #[test]
    fn an_undeclared_number_is_redacted() {
        let mut privacy = Privacy::new(ring());
        let redacted = privacy.redact_payload(
            br#"{"event_name":"project_viewed","timestamp":"2026-01-23T14:30:00Z","properties":{"zz_phone":4155550134,"zz_flag":true}}"#,
            None,
        );
        assert!(!redacted.contains("4155550134"), "{redacted}");
        assert!(
            redacted.contains(r#""zz_phone":"[redacted]""#),
            "{redacted}"
        );
        assert!(redacted.contains(r#""zz_flag":true"#), "{redacted}");
    }

    #[test]
    fn a_number_where_an_identifier_belongs_is_pseudonymized_too() {
        let mut privacy = Privacy::new(ring());
        let redacted = privacy.redact_payload(
            br#"{"event_name":"project_viewed","timestamp":"2026-01-23T14:30:00Z","user_id":12345,"tenant_id":987654321}"#,
            None,
        );
        assert!(
            !redacted.contains("12345") && !redacted.contains("987654321"),
            "{redacted}"
        );
        let record: Value = serde_json::from_str(&redacted).unwrap();
        let mut pseudonyms = Pseudonymizer::new(ring());
        assert_eq!(
            record["user_id"],
            Value::String(pseudonyms.pseudonym("12345", 1_769_178_600_000)),
            "the pseudonym of the number's text"
        );
    }

    #[test]
    fn inline_pseudonyms_match_a_string_reference() {
        // The reference: the keyed hash of the period, formatted through `String`s.
        let reference = |ring: &KeyRing, value: &str, t: i64| {
            let period = ring.period(t);
            let digest = blake3::keyed_hash(&ring.period_key(period), value.as_bytes());
            let hex: String = digest.as_bytes()[..12]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{}.{period}.{hex}", ring.key_id)
        };
        let long = Arc::new(KeyRing::from_hex("sixteen-chars-id", &"5a".repeat(32), 1).unwrap());
        for ring in [ring(), long] {
            let mut p = Pseudonymizer::new(Arc::clone(&ring));
            let period_ms = ring.rotation_ms;
            // Alternate across period boundaries, so that the cached period key is checked too.
            for t in [5, period_ms + 5, 6, 2 * period_ms, i64::MAX, i64::MIN, -1] {
                for user in ["casey", "morgan", "", "ü-ñ"] {
                    let got = p.pseudonym_of(user, t);
                    assert_eq!(got.as_str(), reference(&ring, user, t), "{t} {user}");
                    assert_eq!(p.pseudonym(user, t), got.as_str());
                }
            }
        }
        assert!(
            KeyRing::from_hex("seventeen-chars-x", &"5a".repeat(32), 30).is_err(),
            "key ids are at most 16 bytes"
        );
    }

    #[test]
    fn a_pseudonym_behaves_like_its_string() {
        let words = ["k1.700.ab", "k1.700.b", "k1.70.ab", "", "k1.700.ab"];
        let pseudonyms: Vec<Pseudonym> = words
            .iter()
            .map(|w| Pseudonym::try_from(*w).unwrap())
            .collect();
        for (a, pa) in words.iter().zip(&pseudonyms) {
            for (b, pb) in words.iter().zip(&pseudonyms) {
                assert_eq!(a.cmp(b), pa.cmp(pb), "{a} {b}");
                assert_eq!(a == b, pa == pb, "{a} {b}");
            }
            let json = serde_json::to_string(pa).unwrap();
            assert_eq!(json, serde_json::to_string(a).unwrap());
            assert_eq!(serde_json::from_str::<Pseudonym>(&json).unwrap(), *pa);
            assert_eq!(format!("{pa} {pa:?}"), format!("{a} {a:?}"));
        }
        assert_eq!(
            Pseudonym::try_from("x".repeat(63).as_str()),
            Err(PseudonymTooLong(63))
        );
        assert!(serde_json::from_str::<Pseudonym>(&format!("\"{}\"", "x".repeat(63))).is_err());
    }

    #[test]
    fn keys_are_checked() {
        assert!(KeyRing::from_hex("k1", "abcd", 30).is_err());
        assert!(KeyRing::from_hex("k1", &"zz".repeat(16), 30).is_err());
        assert!(KeyRing::from_hex("k 1", &"ab".repeat(16), 30).is_err());
        assert!(KeyRing::from_hex("k1", &"ab".repeat(16), 0).is_err());
        assert!(!format!("{:?}", ring()).contains("0011"));
    }

    #[test]
    fn redacts_payloads_by_schema() {
        let mut privacy = Privacy::new(ring());
        let raw = br#"{"event_name":"outcome_reply_received","user_id":"casey","country":"DE","ip":"10.1.2.3","timestamp":"2026-01-23T18:30:00Z",
            "properties":{"draft_id":"d1","recipient":"john@acmecorp.com","reply_sentiment":"upbeat","notes":"ring 415-555-0134","time_to_reply_hours":4.5}}"#;
        let out = privacy.redact_payload(raw, None);
        assert!(
            !out.contains("casey")
                && !out.contains("john@")
                && !out.contains("10.1.2.3")
                && !out.contains("555"),
            "{out}"
        );
        assert!(!out.contains("\"country\""), "no consent, no geo: {out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["user_id"].as_str().unwrap().starts_with("k1."));
        assert_eq!(v["properties"]["draft_id"], "d1");
        assert_eq!(v["properties"]["notes"], REDACTED);
        assert_eq!(v["ip"], REDACTED);
        assert_eq!(v["properties"]["time_to_reply_hours"], 4.5);
        let out = privacy.redact_payload(
            br#"{"user_id": "casey", "jane@x.io": 1, "note": "a \" quote"#,
            None,
        );
        assert!(
            !out.contains("casey") && !out.contains("jane") && !out.contains("quote"),
            "{out}"
        );
        assert!(out.contains(r#""user_id": "[redacted]""#), "{out}");
        let out = privacy.redact_payload(
            br#"{"event_name":"signal_received","jane@x.io":"v","properties":{"ok@x.io":{"a":1}}}"#,
            None,
        );
        assert!(!out.contains('@'), "keys are redacted too: {out}");
    }
}
