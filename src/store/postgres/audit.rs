//! The history audit's bookkeeping and the range counts it compares on PostgreSQL (mirrors
//! `store::sqlite::audit`).

use postgres::GenericClient;
use time::OffsetDateTime;

use crate::store::{Audit, AuditTally};

pub fn open_audit(
    _db: &mut impl GenericClient,
    _organization: &str,
    _start: OffsetDateTime,
    _end: OffsetDateTime,
    _requested_by: &str,
    _now: OffsetDateTime,
) -> anyhow::Result<Audit> {
    anyhow::bail!("the PostgreSQL backend does not support history audits yet")
}

pub fn audit_due(
    _db: &mut impl GenericClient,
    _organization: &str,
    _every: time::Duration,
    _now: OffsetDateTime,
) -> anyhow::Result<bool> {
    anyhow::bail!("the PostgreSQL backend does not support history audits yet")
}

pub fn advance_audit(
    _db: &mut impl GenericClient,
    _audit_id: i64,
    _cursor: OffsetDateTime,
    _tally: &AuditTally,
) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support history audits yet")
}

pub fn finish_audit(
    _db: &mut impl GenericClient,
    _audit_id: i64,
    _now: OffsetDateTime,
) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support history audits yet")
}

pub fn audit_failed(_db: &mut impl GenericClient, _audit_id: i64, _error: &str) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support history audits yet")
}

pub fn live_count_in_range(
    _db: &mut impl GenericClient,
    _organization_id: Option<&str>,
    _start_ns: i64,
    _end_ns: i64,
) -> anyhow::Result<u64> {
    anyhow::bail!("the PostgreSQL backend does not support counting live encounters yet")
}

pub fn nth_live_created_ns(
    _db: &mut impl GenericClient,
    _organization_id: Option<&str>,
    _start_ns: i64,
    _end_ns: i64,
    _n: u64,
) -> anyhow::Result<Option<i64>> {
    anyhow::bail!("the PostgreSQL backend does not support history audits yet")
}

pub fn block_agrees(
    _db: &mut impl GenericClient,
    _organization_id: Option<&str>,
    _start_ns: i64,
    _end_ns: i64,
    _offset: u64,
    _block: &[(String, i64)],
) -> anyhow::Result<bool> {
    anyhow::bail!("the PostgreSQL backend does not support history audits yet")
}
