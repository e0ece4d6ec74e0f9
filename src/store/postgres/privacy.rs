//! Privacy policy changes and purges on PostgreSQL (mirrors `store::sqlite::privacy`).

use postgres::GenericClient;
use time::OffsetDateTime;

use crate::config::PrivacyConfig;
use crate::store::PurgeCounts;

pub fn apply_privacy(_db: &mut impl GenericClient, _privacy: &PrivacyConfig) -> anyhow::Result<bool> {
    anyhow::bail!("the PostgreSQL backend does not support privacy policies yet")
}

pub fn purge(
    _db: &mut impl GenericClient,
    _audio_dir: &std::path::Path,
    _start: OffsetDateTime,
    _end: OffsetDateTime,
    _reason: &str,
    _now: OffsetDateTime,
) -> anyhow::Result<PurgeCounts> {
    anyhow::bail!("the PostgreSQL backend does not support purges yet")
}

/// The `created_at` ranges `[start_ns, end_ns)` purged so far: encounters in them are never
/// stored again. Few rows (one per purge), read once per page.
pub fn purged_ranges(db: &mut impl GenericClient) -> anyhow::Result<Vec<(i64, i64)>> {
    Ok(db
        .query("SELECT range_start_ns, range_end_ns FROM purges", &[])?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, postgres::Error>>()?)
}

pub fn last_retention_purge(_db: &mut impl GenericClient) -> anyhow::Result<Option<OffsetDateTime>> {
    anyhow::bail!("the PostgreSQL backend does not support purges yet")
}
