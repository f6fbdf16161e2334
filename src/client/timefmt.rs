//! Wall-clock timestamps for people: nanoseconds since the UNIX epoch as RFC 3339 UTC text.

/// `ns` (since the UNIX epoch) as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, UTC, to the nanosecond.
/// 0 (a source without a clock) is `-`.
pub fn utc_rfc3339(ns: u64) -> String {
    if ns == 0 {
        return "-".to_string();
    }
    let secs = ns / 1_000_000_000;
    let nanos = ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants_format_as_rfc3339_utc() {
        assert_eq!(utc_rfc3339(1), "1970-01-01T00:00:00.000000001Z");
        assert_eq!(
            utc_rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
        // A leap day, and the last nanosecond of a year.
        assert_eq!(
            utc_rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            utc_rfc3339(1_767_225_599_999_999_999),
            "2025-12-31T23:59:59.999999999Z"
        );
        assert_eq!(utc_rfc3339(u64::MAX), "2554-07-21T23:34:33.709551615Z");
        assert_eq!(utc_rfc3339(0), "-");
    }
}
