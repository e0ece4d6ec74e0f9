//! Query-string validation with the API's rules and reason codes.
//!
//! Parsing uses `application/x-www-form-urlencoded` semantics, as the real server does: a raw `+`
//! decodes to a space, so a client that sends `+02:00` unencoded gets `invalid_query`. Datetimes
//! are read at the configured [`QueryPrecision`]. This module only judges the query; it does not
//! know about authentication, resources or HTTP.

use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::options::QueryPrecision;

/// A rejected query: status, reason code, offending key, human message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueryError {
    pub(crate) status: u16,
    pub(crate) reason_code: &'static str,
    pub(crate) field: Option<String>,
    pub(crate) message: String,
}

impl QueryError {
    fn new(status: u16, reason_code: &'static str, field: &str, message: String) -> QueryError {
        QueryError {
            status,
            reason_code,
            field: Some(field.to_owned()),
            message,
        }
    }
}

/// Validated list parameters with the documented defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListParams {
    pub(crate) limit: u32,
    pub(crate) offset: u32,
    pub(crate) sort_desc: bool,
    pub(crate) start_at: Option<OffsetDateTime>,
    pub(crate) end_at: Option<OffsetDateTime>,
}

const LIST_KEYS: [&str; 5] = ["limit", "offset", "sort_order", "start_at", "end_at"];
pub(crate) const MAX_LIMIT: u32 = 100;
pub(crate) const MAX_OFFSET: u32 = 10_000;

fn pairs(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Detail routes accept no query keys at all.
pub(crate) fn reject_any(query: Option<&str>) -> Result<(), QueryError> {
    match pairs(query).into_iter().next() {
        Some((key, _)) => Err(unsupported(&key)),
        None => Ok(()),
    }
}

fn unsupported(key: &str) -> QueryError {
    QueryError::new(
        400,
        "unsupported_filter",
        key,
        format!("Query parameter '{key}' is not supported on this route."),
    )
}

/// Validates a list query. Unknown keys are reported first (400), then duplicated keys (422),
/// then each value in the order limit, offset, sort_order, start_at, end_at, then the range.
/// Datetimes are truncated (or refused) per `precision` before the range check.
pub(crate) fn parse_list(query: Option<&str>, precision: QueryPrecision) -> Result<ListParams, QueryError> {
    let pairs = pairs(query);
    if let Some((key, _)) = pairs.iter().find(|(k, _)| !LIST_KEYS.contains(&k.as_str())) {
        return Err(unsupported(key));
    }
    let mut values: [Option<&str>; 5] = [None; 5];
    for (key, value) in &pairs {
        let at = LIST_KEYS
            .iter()
            .position(|k| k == key)
            .expect("unknown keys were rejected above");
        if values[at].replace(value).is_some() {
            return Err(QueryError::new(
                422,
                "invalid_query",
                key,
                format!("Query parameter '{key}' may be given only once."),
            ));
        }
    }
    let [limit, offset, sort_order, start_at, end_at] = values;
    let limit = match limit {
        None => 50,
        Some(raw) => canonical_uint(raw)
            .filter(|n| (1..=u64::from(MAX_LIMIT)).contains(n))
            .ok_or_else(|| {
                QueryError::new(
                    422,
                    "invalid_limit",
                    "limit",
                    format!("limit must be an integer between 1 and {MAX_LIMIT}."),
                )
            })? as u32,
    };
    let offset = match offset {
        None => 0,
        Some(raw) => canonical_uint(raw)
            .filter(|n| *n <= u64::from(MAX_OFFSET))
            .ok_or_else(|| {
                QueryError::new(
                    422,
                    "invalid_offset",
                    "offset",
                    format!("offset must be an integer between 0 and {MAX_OFFSET}."),
                )
            })? as u32,
    };
    let sort_desc = match sort_order {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => {
            return Err(QueryError::new(
                422,
                "invalid_sort",
                "sort_order",
                "sort_order must be 'asc' or 'desc'.".to_owned(),
            ));
        }
    };
    let start_at = start_at
        .map(|raw| datetime("start_at", raw, precision))
        .transpose()?;
    let end_at = end_at.map(|raw| datetime("end_at", raw, precision)).transpose()?;
    if let (Some(start), Some(end)) = (start_at, end_at)
        && start >= end
    {
        return Err(QueryError::new(
            422,
            "invalid_query",
            "start_at",
            "start_at must be earlier than end_at.".to_owned(),
        ));
    }
    Ok(ListParams {
        limit,
        offset,
        sort_desc,
        start_at,
        end_at,
    })
}

/// `^(0|[1-9][0-9]*)$` as a number; `None` for anything else, including overflow.
fn canonical_uint(raw: &str) -> Option<u64> {
    let bytes = raw.as_bytes();
    let canonical =
        !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) && (bytes[0] != b'0' || bytes.len() == 1);
    if canonical { raw.parse().ok() } else { None }
}

/// A timezone-aware RFC 3339 datetime; naive datetimes and bare dates are rejected. Fractional
/// digits past the sixth are kept, dropped or refused per `precision`.
fn datetime(key: &str, raw: &str, precision: QueryPrecision) -> Result<OffsetDateTime, QueryError> {
    let at = OffsetDateTime::parse(raw, &Rfc3339).map_err(|_| {
        QueryError::new(
            422,
            "invalid_query",
            key,
            format!("{key} must be a timezone-aware ISO 8601 datetime, e.g. 2026-05-01T00:00:00Z."),
        )
    })?;
    match precision {
        QueryPrecision::Nanos => Ok(at),
        // Dropping digits of a fraction that only ever adds to the second is a floor, whatever
        // the offset (offsets are whole minutes).
        QueryPrecision::TruncateMicros => Ok(at - Duration::nanoseconds(i64::from(at.nanosecond() % 1_000))),
        QueryPrecision::TruncateMillis => {
            Ok(at - Duration::nanoseconds(i64::from(at.nanosecond() % 1_000_000)))
        }
        QueryPrecision::TruncateSeconds => Ok(at - Duration::nanoseconds(i64::from(at.nanosecond()))),
        QueryPrecision::RejectPastMicros if fraction_digits(raw) > 6 => Err(QueryError::new(
            422,
            "invalid_query",
            key,
            "Input should be a valid datetime, second fraction value is more than 6 digits long".to_owned(),
        )),
        QueryPrecision::RejectPastMicros => Ok(at),
    }
}

/// Number of fractional-second digits of an RFC 3339 text that already parsed (dates and offsets
/// contain no `.`, so the first one starts the fraction).
fn fraction_digits(raw: &str) -> usize {
    raw.split_once('.')
        .map_or(0, |(_, rest)| rest.bytes().take_while(u8::is_ascii_digit).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_list_ns(query: Option<&str>) -> Result<ListParams, QueryError> {
        parse_list(query, QueryPrecision::Nanos)
    }

    fn reason(query: &str) -> (u16, &'static str, Option<String>) {
        let err = parse_list_ns(Some(query)).unwrap_err();
        (err.status, err.reason_code, err.field)
    }

    #[test]
    fn defaults_apply_to_an_empty_query() {
        let params = parse_list_ns(None).unwrap();
        assert_eq!((params.limit, params.offset, params.sort_desc), (50, 0, true));
        assert_eq!(parse_list_ns(Some("")).unwrap(), params);
    }

    #[test]
    fn limit_and_offset_must_be_canonical_and_in_range() {
        for bad in [
            "0",
            "101",
            "050",
            "%2B5",
            "+5",
            "%205",
            "5.0",
            "",
            "-1",
            "99999999999999999999",
        ] {
            assert_eq!(
                reason(&format!("limit={bad}")),
                (422, "invalid_limit", Some("limit".into())),
                "{bad}"
            );
        }
        assert_eq!(
            parse_list_ns(Some("limit=100&offset=10000")).unwrap().offset,
            10_000
        );
        assert_eq!(reason("offset=10001").1, "invalid_offset");
        assert_eq!(reason("offset=01").1, "invalid_offset");
        assert_eq!(parse_list_ns(Some("offset=0")).unwrap().offset, 0);
    }

    #[test]
    fn unknown_keys_are_unsupported_and_duplicates_invalid() {
        assert_eq!(
            reason("limit=5&owners=me"),
            (400, "unsupported_filter", Some("owners".into()))
        );
        assert_eq!(
            reason("limit=5&limit=6"),
            (422, "invalid_query", Some("limit".into()))
        );
        assert_eq!(
            reason("sort_order=ASC"),
            (422, "invalid_sort", Some("sort_order".into()))
        );
        assert_eq!(reject_any(Some("x=1")).unwrap_err().field.as_deref(), Some("x"));
        assert!(reject_any(Some("")).is_ok());
    }

    #[test]
    fn datetimes_must_carry_an_offset_and_plus_must_be_encoded() {
        let ok = parse_list_ns(Some(
            "start_at=2026-05-01T00:00:00%2B02:00&end_at=2026-05-02T00:00:00Z",
        ))
        .unwrap();
        assert_eq!(ok.start_at.unwrap().offset().whole_hours(), 2);
        for bad in [
            "start_at=2026-05-01T00:00:00+02:00",
            "start_at=2026-05-01T00:00:00",
            "start_at=2026-05-01",
        ] {
            assert_eq!(
                reason(bad),
                (422, "invalid_query", Some("start_at".into())),
                "{bad}"
            );
        }
        assert_eq!(
            reason("start_at=2026-05-02T00:00:00Z&end_at=2026-05-02T00:00:00Z"),
            (422, "invalid_query", Some("start_at".into()))
        );
        assert_eq!(reason("end_at=yesterday").2.as_deref(), Some("end_at"));
    }

    #[test]
    fn nanos_mode_filters_at_nanoseconds() {
        let params = parse_list_ns(Some(
            "start_at=2026-05-01T00:00:00.000000001Z&end_at=2026-05-01T00:00:00.000000002Z",
        ))
        .unwrap();
        assert_eq!(params.start_at.unwrap().nanosecond(), 1);
        assert_eq!(params.end_at.unwrap().nanosecond(), 2);
    }

    #[test]
    fn truncate_micros_drops_digits_before_the_range_check() {
        let parse = |q: &str| parse_list(Some(q), QueryPrecision::TruncateMicros);
        let params = parse("start_at=2026-05-01T00:00:00.1234567%2B02:00").unwrap();
        let start = params.start_at.unwrap();
        assert_eq!(
            (start.nanosecond(), start.offset().whole_hours()),
            (123_456_000, 2)
        );
        let err = parse("start_at=2026-05-01T00:00:00Z&end_at=2026-05-01T00:00:00.000000001Z").unwrap_err();
        assert_eq!(
            (err.status, err.reason_code, err.field.as_deref()),
            (422, "invalid_query", Some("start_at"))
        );
        assert!(parse("start_at=2026-05-01T00:00:00Z&end_at=2026-05-01T00:00:00.000001Z").is_ok());
    }

    #[test]
    fn reject_past_micros_names_the_parameter() {
        let parse = |q: &str| parse_list(Some(q), QueryPrecision::RejectPastMicros);
        assert!(parse("start_at=2026-05-01T00:00:00.123456Z&end_at=2026-05-02T00:00:00Z").is_ok());
        for (query, field) in [
            ("start_at=2026-05-01T00:00:00.1234567Z", "start_at"),
            ("end_at=2026-05-01T00:00:00.000000000Z", "end_at"),
            (
                "start_at=2026-05-01T00:00:00Z&end_at=2026-05-01T00:00:01.0000001%2B02:00",
                "end_at",
            ),
        ] {
            let err = parse(query).unwrap_err();
            assert_eq!(
                (err.status, err.reason_code, err.field.as_deref()),
                (422, "invalid_query", Some(field)),
                "{query}"
            );
            assert!(err.message.contains("more than 6 digits"), "{}", err.message);
        }
        // A malformed value keeps the usual message.
        let err = parse("start_at=2026-05-01").unwrap_err();
        assert!(err.message.contains("timezone-aware"));
    }
}
