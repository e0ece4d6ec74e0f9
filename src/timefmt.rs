//! Timestamps: parsing RFC 3339 (any offset, normalized to UTC), the text people and the API see
//! ([`format_utc`]: fractional seconds only when present), and the one text format the warehouse
//! stores ([`format_stored`]: always nine fractional digits, so that text order is time order and
//! every instant is exact), plus integer nanoseconds and [`Micros`], the list bounds.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

/// Parses an RFC 3339 timestamp with an explicit offset and normalizes it to UTC.
/// The error says what is wrong in words an operator can act on.
pub fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, String> {
    match OffsetDateTime::parse(text, &Rfc3339) {
        // `9999-12-31T23:59:59-05:00` is a valid text whose UTC instant is past year 9999.
        Ok(t) => t
            .checked_to_offset(UtcOffset::UTC)
            .ok_or_else(|| format!("{text:?} is after 9999-12-31T23:59:59.999999999Z")),
        Err(_) if looks_naive(text) => Err(format!(
            "{text:?} has no timezone offset; write it as RFC 3339 with `Z` or `+hh:mm`, e.g. \"2026-01-01T00:00:00Z\""
        )),
        Err(e) => Err(format!(
            "{text:?} is not an RFC 3339 timestamp (e.g. \"2026-01-01T00:00:00Z\"): {e}"
        )),
    }
}

/// The earliest and latest instants an operator may name (`sync.start_at`, `--backfill-from`,
/// `purge --from`, ...): the warehouse orders time by i64 nanoseconds, which end in 2262.
pub const OPERATOR_RANGE: (OffsetDateTime, OffsetDateTime) = (
    time::macros::datetime!(1970-01-01 00:00:00 UTC),
    time::macros::datetime!(2200-01-01 00:00:00 UTC),
);

/// [`parse_rfc3339`] for instants an operator types, which must also lie in [`OPERATOR_RANGE`].
pub fn parse_operator_instant(text: &str) -> Result<OffsetDateTime, String> {
    let t = parse_rfc3339(text)?;
    let (earliest, latest) = OPERATOR_RANGE;
    if t < earliest || t >= latest {
        return Err(format!(
            "{text:?} is outside the supported range {} .. {}",
            format_utc(earliest),
            format_utc(latest)
        ));
    }
    Ok(t)
}

/// A date (`2026-05-25`) or a date-time without an offset: the common mistake worth naming.
fn looks_naive(text: &str) -> bool {
    let b = text.as_bytes();
    let is_date = b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    is_date && !text[10..].contains(['Z', 'z', '+', '-'])
}

/// Formats as `2026-05-25T14:00:00Z`, or `2026-05-25T14:00:00.25Z` when there is a fraction.
pub fn format_utc(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let mut out = t
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .expect("a UTC date-time in years 0..=9999 always formats");
    let nanos = t.nanosecond();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// The width of every timestamp the warehouse stores: `2026-05-25T14:00:00.000000000Z`.
pub const STORED_WIDTH: usize = 30;

/// Formats an instant as the warehouse stores it: RFC 3339 in UTC with exactly nine fractional
/// digits, `2026-05-25T14:00:00.250000000Z`. One fixed width makes text order time order in every
/// column (the product contract), and nine digits keep every instant exact, whatever precision
/// ChartHero sent (migration V5 brought older rows to this width). Every timestamp the store
/// writes comes from here.
pub fn format_stored(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let mut out = t
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .expect("a UTC date-time in years 0..=9999 always formats");
    out.push_str(&format!(".{:09}Z", t.nanosecond()));
    out
}

/// An instant at microsecond precision: the only kind of bound the sync sends to the list route.
///
/// The vendor publishes a pydantic-style OpenAPI artifact, so its server may parse datetimes to
/// microseconds and either reject more fractional digits or truncate them (which turns a
/// `[t, t + 1 ns)` range into an empty one). A `Micros` has no sub-microsecond part, so its
/// text never has more than six fractional digits and every range built from them is at least
/// one microsecond wide, whatever the server does with more digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(i64);

impl Micros {
    /// The microsecond containing `t`: the latest `Micros` not after it. As an inclusive lower
    /// bound it admits everything `t` admits (and the rest of that microsecond).
    pub fn floor(t: OffsetDateTime) -> Micros {
        Micros(unix_nanos(t).div_euclid(1_000))
    }

    /// The earliest `Micros` not before `t`. As an exclusive upper bound it admits everything
    /// `t` admits.
    pub fn ceil(t: OffsetDateTime) -> Micros {
        let nanos = unix_nanos(t);
        Micros(nanos.div_euclid(1_000) + i64::from(nanos.rem_euclid(1_000) != 0))
    }

    /// The next microsecond: `[m, m.next())` is the narrowest range the list route can be asked for.
    pub fn next(self) -> Micros {
        Micros(self.0.saturating_add(1))
    }

    /// The latest multiple of `unit` microseconds (≥ 1) not after `self`: as an inclusive lower
    /// bound it admits everything `self` admits.
    pub fn floor_to(self, unit: i64) -> Micros {
        Micros(self.0 - self.0.rem_euclid(unit))
    }

    /// The earliest multiple of `unit` microseconds (≥ 1) not before `self`: as an exclusive
    /// upper bound it admits everything `self` admits.
    pub fn ceil_to(self, unit: i64) -> Micros {
        match self.0.rem_euclid(unit) {
            0 => self,
            rest => Micros(self.0.saturating_add(unit - rest)),
        }
    }

    /// The end of the narrowest range a list route that reads its bounds to `unit`
    /// microseconds can be asked for from `self`: `[self.floor_to(unit), self.step(unit))`.
    /// With `unit` 1, [`Micros::next`].
    pub fn step(self, unit: i64) -> Micros {
        Micros(self.floor_to(unit).0.saturating_add(unit))
    }

    /// The microsecond halfway between `self` and `other` (rounded down).
    pub fn midpoint(self, other: Micros) -> Micros {
        Micros(self.0 + (other.0 - self.0) / 2)
    }

    /// Microseconds from `self` to `later`.
    pub fn micros_until(self, later: Micros) -> i64 {
        later.0 - self.0
    }

    pub fn instant(self) -> OffsetDateTime {
        from_unix_nanos(self.as_nanos())
    }

    /// Nanoseconds since the Unix epoch, for comparisons with the `*_ns` columns.
    pub fn as_nanos(self) -> i64 {
        self.0.saturating_mul(1_000)
    }
}

impl std::fmt::Display for Micros {
    /// RFC 3339 in UTC with at most six fractional digits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_utc(self.instant()))
    }
}

/// Nanoseconds since the Unix epoch, for ordering and arithmetic in SQL.
pub fn unix_nanos(t: OffsetDateTime) -> i64 {
    // i64 nanoseconds cover the years 1678..2262, far beyond any encounter; an instant outside
    // saturates instead of wrapping around to the other end of time.
    let nanos = t.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

/// The inverse of [`unix_nanos`].
pub fn from_unix_nanos(nanos: i64) -> OffsetDateTime {
    // The one sanctioned call: i64 nanoseconds (years 1677..2262) are always inside `time`'s
    // range (years -9999..=9999), so the error branch cannot be taken.
    #[allow(clippy::disallowed_methods)]
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos));
    t.unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instant_whose_utc_form_is_past_year_9999_is_an_error_not_a_panic() {
        let err = parse_rfc3339("9999-12-31T23:59:59-05:00").unwrap_err();
        assert!(err.contains("after 9999-12-31"), "{err}");
        assert_eq!(
            parse_rfc3339("9999-12-31T23:59:59+05:00").unwrap(),
            time::macros::datetime!(9999-12-31 18:59:59 UTC)
        );
    }

    #[test]
    fn units_round_outward_and_step_to_the_next_boundary() {
        let t = Micros::floor(time::macros::datetime!(2026-03-10 12:00:00.123456 UTC));
        let at = |text: &str| Micros::floor(parse_rfc3339(text).unwrap());
        assert_eq!(t.floor_to(1), t);
        assert_eq!(t.step(1), t.next());
        assert_eq!(t.floor_to(1_000), at("2026-03-10T12:00:00.123Z"));
        assert_eq!(t.ceil_to(1_000), at("2026-03-10T12:00:00.124Z"));
        assert_eq!(t.step(1_000), at("2026-03-10T12:00:00.124Z"));
        assert_eq!(t.floor_to(1_000_000), at("2026-03-10T12:00:00Z"));
        assert_eq!(t.step(1_000_000), at("2026-03-10T12:00:01Z"));
        // A boundary is its own floor and ceiling; its step is the next boundary.
        let ms = at("2026-03-10T12:00:00.124Z");
        assert_eq!((ms.floor_to(1_000), ms.ceil_to(1_000)), (ms, ms));
        assert_eq!(ms.step(1_000), at("2026-03-10T12:00:00.125Z"));
        // Before 1970 too (negative microseconds round toward the past).
        let old = at("1969-12-31T23:59:59.999500Z");
        assert_eq!(old.floor_to(1_000), at("1969-12-31T23:59:59.999Z"));
        assert_eq!(old.ceil_to(1_000), at("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn offsets_are_normalized_to_utc() {
        let t = parse_rfc3339("2026-05-25T16:00:00+02:00").unwrap();
        assert_eq!(format_utc(t), "2026-05-25T14:00:00Z");
        let t = parse_rfc3339("2026-05-25T09:30:00.250-04:30").unwrap();
        assert_eq!(format_utc(t), "2026-05-25T14:00:00.25Z");
    }

    #[test]
    fn naive_and_malformed_timestamps_are_explained() {
        assert!(
            parse_rfc3339("2026-05-25T14:00:00")
                .unwrap_err()
                .contains("no timezone offset")
        );
        assert!(
            parse_rfc3339("2026-05-25")
                .unwrap_err()
                .contains("no timezone offset")
        );
        assert!(
            parse_rfc3339("yesterday")
                .unwrap_err()
                .contains("not an RFC 3339")
        );
    }

    #[test]
    fn query_bounds_never_carry_more_than_six_fractional_digits() {
        let t = parse_rfc3339("2026-05-25T14:00:00.123456789Z").unwrap();
        assert_eq!(Micros::floor(t).to_string(), "2026-05-25T14:00:00.123456Z");
        assert_eq!(Micros::ceil(t).to_string(), "2026-05-25T14:00:00.123457Z");
        assert_eq!(Micros::floor(t).next(), Micros::ceil(t));
        let exact = parse_rfc3339("2026-05-25T14:00:00.5Z").unwrap();
        assert_eq!(Micros::floor(exact), Micros::ceil(exact));
        assert_eq!(Micros::floor(exact).instant(), exact);
        // Before the epoch the floor still rounds towards the past.
        let old = parse_rfc3339("1969-12-31T23:59:59.9999995Z").unwrap();
        assert_eq!(Micros::floor(old).to_string(), "1969-12-31T23:59:59.999999Z");
        assert_eq!(Micros::ceil(old).to_string(), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn operator_instants_outside_the_warehouse_range_are_refused() {
        assert!(parse_operator_instant("2026-01-01T00:00:00Z").is_ok());
        for text in [
            "0001-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "9999-12-31T23:59:59Z",
        ] {
            let err = parse_operator_instant(text).unwrap_err();
            assert!(err.contains("outside the supported range"), "{text}: {err}");
        }
    }

    #[test]
    fn nanos_saturate_instead_of_wrapping() {
        let far = parse_rfc3339("9999-01-01T00:00:00Z").unwrap();
        assert_eq!(unix_nanos(far), i64::MAX);
    }

    #[test]
    fn stored_timestamps_have_one_width_and_sort_as_their_instants() {
        let texts = [
            "2026-05-25T14:00:00Z",
            "2026-05-25T14:00:00.000000001Z",
            "2026-05-25T14:00:00.1Z",
            "2026-05-25T14:00:00.123456789Z",
            "2026-05-25T14:00:00.5Z",
            "2026-05-25T14:00:01Z",
            "2026-05-25T16:00:01.5+02:00",
        ];
        let stored: Vec<String> = texts
            .iter()
            .map(|t| format_stored(parse_rfc3339(t).unwrap()))
            .collect();
        assert_eq!(stored[0], "2026-05-25T14:00:00.000000000Z");
        assert_eq!(stored[4], "2026-05-25T14:00:00.500000000Z");
        assert_eq!(stored[6], "2026-05-25T14:00:01.500000000Z");
        for (text, s) in texts.iter().zip(&stored) {
            assert_eq!(s.len(), STORED_WIDTH, "{s}");
            // Exact: parsing the stored text gives the instant back.
            assert_eq!(parse_rfc3339(s).unwrap(), parse_rfc3339(text).unwrap());
        }
        let mut sorted = stored.clone();
        sorted.sort();
        assert_eq!(sorted, stored, "text order is time order");
    }

    #[test]
    fn nanos_round_trip() {
        let t = parse_rfc3339("2026-05-25T14:00:00.123456789Z").unwrap();
        assert_eq!(from_unix_nanos(unix_nanos(t)), t);
    }
}
