//! The reads of `charthero-sync status` on PostgreSQL (mirrors `store::sqlite::status`).

use postgres::GenericClient;
use time::OffsetDateTime;

use crate::status::Status;

pub fn read_status(
    _db: &mut impl GenericClient,
    _now: OffsetDateTime,
    _configured: &[String],
) -> anyhow::Result<Status> {
    anyhow::bail!("the PostgreSQL backend does not support `status` yet")
}

/// Live encounters, and the live documents that are notes, finished transcripts and anything else.
pub fn live_content_counts(_db: &mut impl GenericClient) -> anyhow::Result<[i64; 4]> {
    anyhow::bail!("the PostgreSQL backend does not support `status` yet")
}
