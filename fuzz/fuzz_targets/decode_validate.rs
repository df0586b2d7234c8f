//! Fuzz target: decode + validate + privacy on arbitrary bytes, in both record formats.
//!
//! Invariants checked beyond "never panics":
//! - an accepted event never keeps a raw identifier: its ids are pseudonyms;
//! - a rejected record always names a failure kind and, for schema failures, a violation;
//! - the redacted dead-letter payload holds nothing the PII scanner would find.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sightline_ingest::{Decoder, FlatDefaults, Format};
use sightline_privacy::{KeyRing, Scrubber};
use sightline_schemas::FailureKind;

struct Setup {
    envelope: Decoder,
    flat: Decoder,
    scrubber: Scrubber,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // A fixed key for fuzzing only.
        let keys = Arc::new(KeyRing::from_hex("fz", &"c3".repeat(32), 30).expect("key"));
        let envelope = Decoder::new(64 * 1024, keys);
        let flat = envelope
            .clone()
            .with_format(Format::Flat(FlatDefaults::default()));
        Setup {
            envelope,
            flat,
            scrubber: Scrubber::new(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    for decoder in [&s.envelope, &s.flat] {
        let mut decoder = decoder.clone();
        match decoder.decode(data) {
            Ok(event) => {
                assert!(
                    event.user_id.starts_with("fz.")
                        && event.tenant_id.starts_with("fz.")
                        && event.session_id.starts_with("fz.")
                );
            }
            Err(err) => {
                let schema_failure = matches!(
                    err.kind,
                    FailureKind::MissingField
                        | FailureKind::UnknownField
                        | FailureKind::UnknownSchemaVersion
                        | FailureKind::PiiRejected
                );
                assert!(
                    !schema_failure || !err.violations.is_empty(),
                    "a schema failure without a violation: {err:?}"
                );
                let stored = format!("{} {:?} {:?}", err.reason, err.violations, err.event_name);
                assert!(
                    s.scrubber.scan(&stored).is_empty(),
                    "the dead letter's fields hold personal data: {stored}"
                );
                if let Some(payload) = decoder.redact_payload(data, err.event_time_ms) {
                    let found = s.scrubber.scan(&payload);
                    assert!(
                        found.is_empty(),
                        "redacted payload still holds {found:?}: {payload}"
                    );
                }
            }
        }
    }
});
