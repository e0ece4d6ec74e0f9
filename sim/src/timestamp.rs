//! Time as the simulator holds it: `i64` unix nanoseconds. Conversions to and from
//! `OffsetDateTime`, truncation to microseconds, the wall clock at the API's precision, and the
//! RFC 3339 text of an instant (`Z` or its own offset, fractional seconds only when non-zero),
//! including the serde helpers the public types in `model` serialize their timestamps with.
//!
//! It depends on no other module. It does not decide how a response renders a timestamp (shifted
//! offsets, coarser `created_at`: that is `render`), nor which timestamps are truncated (`store`).

use serde::Serializer;
use time::{Date, OffsetDateTime, UtcOffset};

/// One microsecond in nanoseconds: the precision of the real API's timestamps.
pub(crate) const MICROSECOND: i64 = 1_000;

/// Unix nanoseconds of an instant, saturated to the `i64` range (years 1677..=2262).
pub(crate) fn nanos(at: OffsetDateTime) -> i64 {
    let n = at.unix_timestamp_nanos();
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

pub(crate) fn instant(nanos: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos)).expect("i64 nanos are in range")
}

/// Truncates unix nanoseconds to whole microseconds (toward the past).
pub(crate) fn micros(nanos: i64) -> i64 {
    nanos - nanos.rem_euclid(MICROSECOND)
}

/// The wall clock at microsecond precision, the precision of the real API's timestamps.
pub(crate) fn now_nanos() -> i64 {
    micros(nanos(OffsetDateTime::now_utc()))
}

/// Formatted RFC 3339 text on the stack (the longest form is 35 bytes).
pub(crate) struct TsText {
    buf: [u8; 40],
    len: usize,
}

impl TsText {
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("timestamps are ASCII")
    }

    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    fn digits(&mut self, value: u32, width: usize) {
        for i in (0..width).rev() {
            self.push(b'0' + ((value / 10u32.pow(i as u32)) % 10) as u8);
        }
    }
}

/// RFC 3339 in the instant's own offset: `Z` for UTC, else `±hh:mm`; the fraction carries only
/// its significant digits and is left out when zero.
pub(crate) fn format_datetime(at: OffsetDateTime) -> TsText {
    let mut out = TsText { buf: [0; 40], len: 0 };
    out.digits(at.year() as u32, 4);
    out.push(b'-');
    out.digits(u32::from(u8::from(at.month())), 2);
    out.push(b'-');
    out.digits(u32::from(at.day()), 2);
    out.push(b'T');
    out.digits(u32::from(at.hour()), 2);
    out.push(b':');
    out.digits(u32::from(at.minute()), 2);
    out.push(b':');
    out.digits(u32::from(at.second()), 2);
    let mut fraction = at.nanosecond();
    if fraction != 0 {
        out.push(b'.');
        let mut width = 9;
        while fraction.is_multiple_of(10) {
            fraction /= 10;
            width -= 1;
        }
        out.digits(fraction, width);
    }
    let offset = at.offset();
    if offset.is_utc() {
        out.push(b'Z');
    } else {
        let seconds = offset.whole_seconds();
        out.push(if seconds < 0 { b'-' } else { b'+' });
        let minutes = seconds.unsigned_abs() / 60;
        out.digits(minutes / 60, 2);
        out.push(b':');
        out.digits(minutes % 60, 2);
    }
    out
}

/// `YYYY-MM-DD`.
pub(crate) fn format_date(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// Serde helper for public types: canonical UTC RFC 3339.
pub(crate) fn serialize_instant<S: Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(format_datetime(at.to_offset(UtcOffset::UTC)).as_str())
}

/// Serde helper for public types: optional plain date.
pub(crate) fn serialize_opt_date<S: Serializer>(date: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
    match date {
        Some(date) => s.serialize_str(&format_date(*date)),
        None => s.serialize_none(),
    }
}
