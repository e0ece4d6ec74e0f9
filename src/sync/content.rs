//! Fetching what the encounter list only points at: note details (their text; documents of
//! unknown types are asked once), finalized transcripts and, when enabled, recordings. What to
//! fetch is decided by paging, from the list alone (`store::upsert`; ambient details are never
//! needed); this module only works the queue it writes into the database, concurrently with
//! paging and under the same limiter, and every outcome moves the item on: saved, not ready
//! (retried on a bounded schedule), unavailable, skipped because its route is closed to this
//! key, or dead-lettered.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{CycleError, SyncContext};
use crate::api::wire::{DocumentDetail, TranscriptResponse};
use crate::api::{ApiError, ApiErrorKind, ErrorClass};
use crate::store::hex;
use crate::store::{DetailOutcome, Pending, RecordingRecord, RunCounts, TranscriptRecord, Work, WorkItem};

/// Items claimed from the queue at a time; bounds memory whatever the backlog.
const BATCH: usize = 128;

/// When the transcript route says "not yet" for a finished document, or the document or audio
/// route "not found" for a note or recording its encounter's listing shows: ask again after
/// these delays, then only when the document changes.
const NOT_READY_SCHEDULE: [Duration; 5] = [
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(60 * 60),
    Duration::from_secs(6 * 60 * 60),
];

/// Routes closed to this key for the rest of the cycle (403 `missing_scope`,
/// `route_not_allowed`, ...), each reported once.
#[derive(Debug, Default)]
pub(super) struct RouteGate {
    disabled: Mutex<Vec<(Work, String)>>,
}

impl RouteGate {
    fn disable(&self, work: Work, reason: &str) {
        let mut disabled = self.disabled.lock().expect("gate lock");
        if disabled.iter().all(|(w, _)| *w != work) {
            tracing::warn!(
                route = work.as_str(),
                reason_code = reason,
                "route closed to this API key; skipping it for the rest of the cycle"
            );
            disabled.push((work, reason.to_owned()));
        }
    }

    fn closed(&self) -> Vec<Work> {
        self.disabled
            .lock()
            .expect("gate lock")
            .iter()
            .map(|(w, _)| *w)
            .collect()
    }

    /// `audio:missing_scope,transcript:route_not_allowed`, or `None`.
    pub fn summary(&self) -> Option<String> {
        let disabled = self.disabled.lock().expect("gate lock");
        (!disabled.is_empty()).then(|| {
            disabled
                .iter()
                .map(|(w, r)| format!("{}:{r}", w.as_str()))
                .collect::<Vec<_>>()
                .join(",")
        })
    }
}

/// Works the queue until it is empty and paging has finished.
pub(super) async fn drain(
    ctx: &SyncContext,
    run_id: i64,
    paging_done: &CancellationToken,
    stop: &CancellationToken,
    gate: &RouteGate,
    counts: &mut RunCounts,
) -> Result<(), CycleError> {
    // While paging runs, one request slot is left to the pager so that a content backlog never
    // stalls it; once paging is done, content may use them all. A slot is held while an item's
    // requests run, not while its result is written, so writes never leave a slot idle.
    let paging_slots = ctx.max_in_flight.saturating_sub(1).max(1);
    let slots = Semaphore::new(if paging_done.is_cancelled() {
        ctx.max_in_flight
    } else {
        paging_slots
    });
    let mut widened = paging_done.is_cancelled();
    // Recordings of finished ambient documents are queued once paging is done: paging decides
    // transcripts from the list alone and knows nothing of `[audio]`, and one pass after it
    // also catches audio just enabled and recordings purged. Once the rest is done, one more
    // pass queues the recordings of documents whose transcript was fetched after it: a fetched
    // transcript proves its recording final, whatever word the document's status uses. This
    // holds the cycle's transcript count at the last pass (None: none yet).
    let mut recordings_queued_at: Option<u64> = None;
    // Items under way: fetching (at most the slots) or writing what they fetched.
    let max_running = 2 * ctx.max_in_flight;
    // Claimed items not yet started, and the keys of those started and not yet finished (an
    // item stays pending in the queue until its result commits, so claims must skip both).
    let mut queue: VecDeque<WorkItem> = VecDeque::new();
    let mut busy: HashSet<(Work, String)> = HashSet::new();
    let mut running = FuturesUnordered::new();
    // Whether the last claim may have left more behind (it came back full), and when it was.
    let mut more = true;
    let mut claimed_at = Instant::now();
    loop {
        if stop.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        if !widened && paging_done.is_cancelled() {
            slots.add_permits(ctx.max_in_flight - paging_slots);
            widened = true;
        }
        if ctx.audio.enabled && recordings_queued_at.is_none() && paging_done.is_cancelled() {
            let queued = queue_recordings(ctx).await?;
            tracing::debug!(queued, "recordings queued");
            recordings_queued_at = Some(counts.transcripts_fetched);
        }
        // Claim more before the queue runs dry, so that no slot idles at a batch's tail; once
        // the backlog is drained, look for new work when idle or every 100 ms.
        let due = more || running.is_empty() || claimed_at.elapsed() >= Duration::from_millis(100);
        if queue.len() < max_running && due {
            // Read before claiming, so that work written by the last page is claimed before we stop.
            let paging_finished = paging_done.is_cancelled();
            let mut skip = gate.closed();
            skip.extend(Work::ALL.into_iter().filter(|&work| !enabled(ctx, work)));
            let mut exclude = busy.clone();
            exclude.extend(queue.iter().map(|i| (i.work, i.document_id.clone())));
            let org_id = ctx.org.id();
            let batch = ctx
                .writer
                .call(move |c| {
                    c.claim_work(
                        org_id.as_deref(),
                        run_id,
                        &skip,
                        &exclude,
                        BATCH,
                        OffsetDateTime::now_utc(),
                    )
                })
                .await?;
            more = batch.len() == BATCH;
            claimed_at = Instant::now();
            if batch.is_empty() && queue.is_empty() && running.is_empty() {
                if paging_finished
                    && ctx.audio.enabled
                    && recordings_queued_at.is_none_or(|n| counts.transcripts_fetched > n)
                {
                    recordings_queued_at = Some(counts.transcripts_fetched);
                    let queued = queue_recordings(ctx).await?;
                    if queued > 0 {
                        tracing::debug!(queued, "recordings of transcripts fetched this cycle queued");
                        more = true;
                        continue;
                    }
                }
                if paging_finished {
                    return Ok(());
                }
                tokio::select! {
                    _ = paging_done.cancelled() => {}
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            queue.extend(batch);
        }
        while running.len() < max_running
            && let Some(item) = queue.pop_front()
        {
            busy.insert((item.work, item.document_id.clone()));
            running.push(process(ctx, run_id, item, gate, &slots));
        }
        let Some((key, result)) = running.next().await else {
            continue;
        };
        busy.remove(&key);
        if stop.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        match result? {
            Done::Document => counts.documents_fetched += 1,
            Done::Transcript => counts.transcripts_fetched += 1,
            Done::Recording => counts.recordings_fetched += 1,
            Done::DeadLetter => counts.dead_letters += 1,
            Done::Other => {}
        }
        ctx.live.content(counts);
    }
}

/// Whether the configuration asks for `work` at all (`[content]`, `[audio]`).
pub(super) fn enabled(ctx: &SyncContext, work: Work) -> bool {
    match work {
        Work::Document => ctx.content.details,
        Work::Transcript => ctx.content.transcripts,
        Work::Audio => ctx.audio.enabled,
    }
}

enum Done {
    Document,
    Transcript,
    Recording,
    DeadLetter,
    /// Not ready, unavailable, or skipped: counted elsewhere or not at all.
    Other,
}

/// Does one item; only errors that must stop the cycle (401, the database) come back as `Err`.
/// Returns the item's key with the result.
async fn process(
    ctx: &SyncContext,
    run_id: i64,
    item: WorkItem,
    gate: &RouteGate,
    slots: &Semaphore,
) -> ((Work, String), Result<Done, CycleError>) {
    let key = (item.work, item.document_id.clone());
    (key, process_item(ctx, run_id, item, gate, slots).await)
}

/// Queues the recordings the organization's finished ambient documents lack; answers how many.
async fn queue_recordings(ctx: &SyncContext) -> Result<usize, CycleError> {
    let org_id = ctx.org.id();
    Ok(ctx
        .writer
        .call(move |c| c.queue_missing_audio(org_id.as_deref()))
        .await?)
}

async fn process_item(
    ctx: &SyncContext,
    run_id: i64,
    item: WorkItem,
    gate: &RouteGate,
    slots: &Semaphore,
) -> Result<Done, CycleError> {
    let fetched = {
        let _slot = slots.acquire().await.expect("the slots are never closed");
        if gate.closed().contains(&item.work) {
            // Closed while this item waited.
            return Ok(Done::Other);
        }
        match item.work {
            Work::Document => fetch_document(ctx, &item).await,
            Work::Transcript => fetch_transcript(ctx, &item).await,
            Work::Audio => fetch_recording(ctx, &item).await,
        }
    };
    let err = match fetched {
        Ok(Fetched { done, saved }) => {
            saved.await?;
            return Ok(done);
        }
        Err(e) => e,
    };
    // A refused key, or a pause the server asked for: nothing else can be fetched either.
    if err.is_auth() || err.is_paused() {
        return Err(err.into());
    }
    if err.status() == Some(403) && err.class() == ErrorClass::OperatorMustAct {
        gate.disable(item.work, err.reason_code().unwrap_or("forbidden"));
        return Ok(Done::Other);
    }
    tracing::warn!(
        work = item.work.as_str(),
        document_id = item.document_id,
        encounter_id = item.encounter_id,
        reason_code = err.reason_code().unwrap_or("none"),
        "giving up on this item for the cycle: {err}"
    );
    let message = err.to_string();
    let reason = err.reason_code().map(str::to_owned);
    let org = ctx.org.name.clone();
    ctx.writer
        .write(move |c| {
            c.dead_letter(
                &org,
                &item,
                run_id,
                reason.as_deref(),
                &message,
                OffsetDateTime::now_utc(),
            )
        })
        .await?;
    Ok(Done::DeadLetter)
}

/// What fetching an item came to, and the write of its result, queued.
struct Fetched {
    done: Done,
    saved: Pending<()>,
}

impl Fetched {
    fn new(done: Done, saved: Pending<()>) -> Result<Fetched, ApiError> {
        Ok(Fetched { done, saved })
    }
}

async fn fetch_document(ctx: &SyncContext, item: &WorkItem) -> Result<Fetched, ApiError> {
    let outcome = match ctx.client.document(&item.encounter_id, &item.document_id).await {
        Ok(DocumentDetail::Note(n)) => DetailOutcome::Note {
            format: n.content.format,
            text: Some(n.content.text).filter(|_| ctx.privacy.note_text),
            created_at: n.created_at.0,
            updated_at: n.updated_at.0,
        },
        Ok(DocumentDetail::Ambient(a)) => DetailOutcome::Ambient {
            status: a.status,
            audio_duration_seconds: a.audio_duration_seconds,
            created_at: a.created_at.0,
            updated_at: a.updated_at.0,
        },
        Err(e) if e.class() == ErrorClass::ResourceUnavailable => {
            if e.reason_code() == Some("unsupported_document_type") {
                DetailOutcome::Unsupported
            } else if gone(&e) {
                DetailOutcome::Unavailable
            } else {
                // 404 (`encounter_not_found` included), 409 or 410 for a note its encounter's
                // listing still shows: a document route that lags the list.
                tracing::debug!(
                    document_id = item.document_id,
                    status = e.status(),
                    "document detail not found yet"
                );
                return not_ready(ctx, item);
            }
        }
        Err(e) => return Err(e),
    };
    let fetched = matches!(
        outcome,
        DetailOutcome::Note { .. } | DetailOutcome::Ambient { .. }
    );
    let (item, audio) = (item.clone(), ctx.audio.enabled);
    Fetched::new(
        if fetched { Done::Document } else { Done::Other },
        ctx.writer
            .write(move |c| c.save_detail(&item, &outcome, audio, OffsetDateTime::now_utc())),
    )
}

async fn fetch_transcript(ctx: &SyncContext, item: &WorkItem) -> Result<Fetched, ApiError> {
    let doc = item.document_id.clone();
    let item = item.clone();
    match ctx.client.transcript(&item.encounter_id, &item.document_id).await {
        Ok(TranscriptResponse { transcript, .. }) => {
            let record = TranscriptRecord::new(
                transcript.provider,
                transcript.audio_duration_seconds,
                transcript
                    .turns
                    .into_iter()
                    .map(|t| {
                        (
                            t.speaker,
                            t.start,
                            t.end,
                            Some(t.text).filter(|_| ctx.privacy.transcript_text),
                        )
                    })
                    .collect(),
            );
            Fetched::new(
                Done::Transcript,
                ctx.writer
                    .write(move |c| c.save_transcript(&item, &record, OffsetDateTime::now_utc())),
            )
        }
        Err(e) if gone(&e) => Fetched::new(Done::Other, ctx.writer.write(move |c| c.mark_unavailable(&item))),
        // The vendor does not document what an unfinished transcript answers; any other
        // "this resource, not now" status means: not ready yet.
        Err(e) if e.class() == ErrorClass::ResourceUnavailable => {
            tracing::debug!(document_id = doc, status = e.status(), "transcript not ready yet");
            not_ready(ctx, &item)
        }
        Err(e) => Err(e),
    }
}

/// The route said "not yet" for `item`: asked again on [`NOT_READY_SCHEDULE`].
fn not_ready(ctx: &SyncContext, item: &WorkItem) -> Result<Fetched, ApiError> {
    let item = item.clone();
    Fetched::new(
        Done::Other,
        ctx.writer
            .write(move |c| c.not_ready(&item, &NOT_READY_SCHEDULE, OffsetDateTime::now_utc())),
    )
}

/// The content itself is gone or not ours, as opposed to "not ready yet" — and as opposed to a
/// route closed to the key or the organization (403 `route_not_allowed`, `missing_scope`, …),
/// which the route gate reports and a later cycle retries once the operator or vendor acted.
/// Not `encounter_not_found`: the one 404 the contract documents, a server may answer it for a
/// transcript not generated yet although its document reads final, for a note its document
/// route has not caught up with or a recording not stored yet, and whether the encounter is
/// gone is the list's to say (a removed encounter's work is never claimed). Only an answer of
/// the resource-unavailable class: a 429 or 5xx is retried whatever its body says.
fn gone(e: &ApiError) -> bool {
    e.class() == ErrorClass::ResourceUnavailable
        && matches!(
            e.reason_code(),
            Some("unsupported_document_type" | "cross_organization_denied" | "demo_training_denied")
        )
}

async fn fetch_recording(ctx: &SyncContext, item: &WorkItem) -> Result<Fetched, ApiError> {
    let dir = &ctx.audio.directory;
    // A signed URL can expire while we wait for the rate limiter; one fresh URL is worth asking.
    let mut fresh_link_asked = false;
    let (tmp, size, sha, ext) = loop {
        let link = match ctx.client.audio(&item.encounter_id, &item.document_id).await {
            Ok(link) => link,
            Err(e) if gone(&e) => {
                let item = item.clone();
                return Fetched::new(Done::Other, ctx.writer.write(move |c| c.mark_unavailable(&item)));
            }
            // 404, 409 or 410 for a recording whose document reads final: its audio is not
            // stored yet (it is processed after the transcript).
            Err(e) if e.class() == ErrorClass::ResourceUnavailable => {
                tracing::debug!(
                    document_id = item.document_id,
                    status = e.status(),
                    "recording not found yet"
                );
                return not_ready(ctx, item);
            }
            Err(e) => return Err(e),
        };
        let ext = extension_of(link.audio_url.expose());
        let tmp = dir.join(format!(
            ".partial-{}-{:016x}",
            item.document_id,
            fastrand::u64(..)
        ));
        match ctx
            .client
            .download(&link.audio_url, link.expires_at.0, &tmp, ctx.audio.max_bytes)
            .await
        {
            Ok((size, sha)) => break (tmp, size, sha, ext),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                if matches!(e.kind, ApiErrorKind::LinkExpired) && !fresh_link_asked {
                    fresh_link_asked = true;
                    continue;
                }
                return Err(e);
            }
        }
    };
    let sha = hex(&sha);
    let name = format!("{sha}.{ext}");
    let duration = place_recording(tmp, dir.join(&name))
        .await
        .map_err(|e| ApiError {
            route: crate::api::Route::Recording,
            kind: ApiErrorKind::LocalIo(e.to_string()),
        })?
        .or(item.audio_duration_seconds);
    let record = RecordingRecord {
        path: name,
        size_bytes: size,
        sha256: sha,
        duration_seconds: duration,
    };
    let (enc, doc) = (item.encounter_id.clone(), item.document_id.clone());
    Fetched::new(
        Done::Recording,
        ctx.writer
            .write(move |c| c.save_recording(&enc, &doc, &record, OffsetDateTime::now_utc())),
    )
}

/// The file extension of a URL's path (`wav`, `mp3`, ...), or `bin`.
fn extension_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            let path = u.path().to_owned();
            let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
            (1..=5).contains(&ext.len()).then_some(ext)
        })
        .filter(|e| e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "bin".to_owned())
}

/// Moves the downloaded (already fsynced) file to its content address with an atomic rename,
/// makes the rename durable, and returns the duration its WAV header states, if it is a WAV.
async fn place_recording(tmp: PathBuf, target: PathBuf) -> std::io::Result<Option<f64>> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut header = Vec::with_capacity(4096);
        std::fs::File::open(&tmp)?.take(4096).read_to_end(&mut header)?;
        std::fs::rename(&tmp, &target)?;
        if let Some(dir) = target.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(wav_duration(&header))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Seconds of audio in a RIFF/WAVE file, from its `fmt ` byte rate and `data` size.
fn wav_duration(header: &[u8]) -> Option<f64> {
    if header.len() < 12 || &header[0..4] != b"RIFF" || &header[8..12] != b"WAVE" {
        return None;
    }
    let u32_at =
        |at: usize| -> Option<u32> { Some(u32::from_le_bytes(header.get(at..at + 4)?.try_into().ok()?)) };
    let mut at = 12;
    let mut byte_rate = None;
    while at + 8 <= header.len() {
        let id = &header[at..at + 4];
        let size = u32_at(at + 4)? as usize;
        match id {
            b"fmt " => byte_rate = u32_at(at + 16),
            b"data" => return byte_rate.filter(|r| *r > 0).map(|r| size as f64 / f64::from(r)),
            _ => {}
        }
        at += 8 + size + (size & 1);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(sample_rate: u32, channels: u16, bits: u16, samples: u32) -> Vec<u8> {
        let block = u32::from(channels * bits / 8);
        let data = samples * block;
        let mut v = Vec::new();
        v.extend_from_slice(b"RIFF");
        v.extend_from_slice(&(36 + data).to_le_bytes());
        v.extend_from_slice(b"WAVEfmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&sample_rate.to_le_bytes());
        v.extend_from_slice(&(sample_rate * block).to_le_bytes());
        v.extend_from_slice(&(block as u16).to_le_bytes());
        v.extend_from_slice(&bits.to_le_bytes());
        v.extend_from_slice(b"data");
        v.extend_from_slice(&data.to_le_bytes());
        v
    }

    #[test]
    fn wav_headers_give_the_duration_and_anything_else_gives_none() {
        assert_eq!(wav_duration(&wav(8_000, 1, 16, 2_000)), Some(0.25));
        assert_eq!(wav_duration(&wav(44_100, 2, 16, 441_000)), Some(10.0));
        assert_eq!(wav_duration(b"ID3\x03 not a wav"), None);
        assert_eq!(wav_duration(&[]), None);
    }

    #[test]
    fn extensions_come_from_the_url_path_only() {
        assert_eq!(extension_of("https://media.example/a/b/rec.WAV?token=x.y"), "wav");
        assert_eq!(extension_of("https://media.example/a/rec?token=x.mp3"), "bin");
        assert_eq!(
            extension_of("https://media.example/a/rec.tar.gz.verylongext"),
            "bin"
        );
    }

    #[test]
    fn the_gate_reports_each_closed_route_once() {
        let gate = RouteGate::default();
        gate.disable(Work::Audio, "missing_scope");
        gate.disable(Work::Audio, "route_not_allowed");
        gate.disable(Work::Transcript, "route_not_allowed");
        assert_eq!(
            gate.summary().as_deref(),
            Some("audio:missing_scope,transcript:route_not_allowed")
        );
        assert_eq!(gate.closed(), vec![Work::Audio, Work::Transcript]);
    }
}
