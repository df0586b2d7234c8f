//! RFC 3339 / ISO-8601 UTC timestamps, parsed and formatted without allocation.
//!
//! Event timestamps are the hot path of decoding, so this is a small hand-written parser
//! rather than a general date library. It accepts `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`
//! (a space instead of `T` and a lower-case `z` are accepted too) and returns milliseconds
//! since the Unix epoch, UTC. Fractions beyond milliseconds are truncated.

/// The wall clock, in milliseconds since the Unix epoch (0 if the clock is before it). The one
/// place the pipeline reads the wall clock for event-time decisions (idle partitions, the
/// future-skew limit, the current key period).
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Parses an RFC 3339 timestamp into milliseconds since the Unix epoch (UTC).
///
/// Returns `None` for anything that is not a valid timestamp, including out-of-range
/// fields (month 13, hour 24, February 30th).
#[inline]
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let mut v: i64 = 0;
        for &c in &b[range] {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        for _ in digits..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 60 + m;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
    Some(secs * 1000 + millis)
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
///
/// Years outside 0..=9999 cannot be written in this form; they are clamped (no event time
/// the decoder accepts is outside them).
pub fn format_rfc3339_ms(ms: i64) -> String {
    let bytes = rfc3339_bytes(ms);
    // Every byte written is an ASCII digit or separator.
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// The 24 ASCII bytes of [`format_rfc3339_ms`], written digit by digit: `write!` through
/// `core::fmt` costs about ten times as much, and the benchmark reader formats one per event.
pub fn rfc3339_bytes(ms: i64) -> [u8; 24] {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, rem) = (rem / 3_600_000, rem % 3_600_000);
    let (mi, rem) = (rem / 60_000, rem % 60_000);
    let (s, milli) = (rem / 1000, rem % 1000);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut digits = |at: usize, width: usize, value: i64| {
        let mut v = value;
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    digits(0, 4, y.clamp(0, 9999));
    digits(5, 2, m);
    digits(8, 2, d);
    digits(11, 2, h);
    digits(14, 2, mi);
    digits(17, 2, s);
    digits(20, 3, milli);
    out
}

/// The UTC calendar date and hour of a millisecond timestamp: `(year, month, day, hour)`.
pub fn utc_date_hour(ms: i64) -> (i64, i64, i64, i64) {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    (y, m, d, rem / 3_600_000)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
#[inline]
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_known_instants() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-01-23T14:30:00Z"),
            Some(1_769_178_600_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-01-23T14:30:00.5Z"),
            Some(1_769_178_600_500)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-01-23T14:30:00.123456Z"),
            Some(1_769_178_600_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-01-23T16:30:00+02:00"),
            Some(1_769_178_600_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000)
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-01-23",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-01-23T24:00:00Z",
            "2026-01-23T14:30:00",
            "2026-01-23T14:30:00.Z",
            "2026-01-23T14:30:00Zjunk",
            "20x6-01-23T14:30:00Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn format_then_parse_roundtrips(ms in 0i64..8_000_000_000_000) {
            prop_assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Some(ms));
        }

        /// chrono, an independent calendar, formats and parses the same instants.
        #[test]
        fn format_and_parse_match_chrono(ms in 0i64..253_402_300_799_999) {
            let reference = chrono::DateTime::from_timestamp_millis(ms).unwrap();
            let text = reference.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
            prop_assert_eq!(format_rfc3339_ms(ms), text.clone());
            prop_assert_eq!(parse_rfc3339_ms(&text), Some(ms));
            let offset = reference
                .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap())
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
            prop_assert_eq!(parse_rfc3339_ms(&offset), Some(ms), "{}", offset);
        }
    }
}
