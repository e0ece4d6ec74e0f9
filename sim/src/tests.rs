//! End-to-end checks of the simulator over loopback with a minimal raw HTTP/1.1 client, so the
//! exact bytes on the wire (unencoded `+`, truncated bodies, dropped connections) are visible.
//! Unit tests of the individual rules live next to the code in each module.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::*;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn reason(&self) -> String {
        self.json()["reason_code"].as_str().unwrap_or("<none>").to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One keep-alive connection.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(sim: &Simulator) -> Conn {
        let stream = TcpStream::connect(sim.local_addr()).await.unwrap();
        Conn {
            stream: BufReader::new(stream),
        }
    }

    /// Sends `GET path` with an optional bearer key; `Err` when the connection ends before the
    /// whole response arrived.
    async fn get(&mut self, path: &str, key: Option<&str>) -> std::io::Result<Reply> {
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let request = format!("GET {path} HTTP/1.1\r\nHost: sim\r\n{auth}\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            let (name, value) = trimmed.split_once(':').unwrap();
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
        let reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        let length: usize = reply.header("content-length").unwrap().parse().unwrap();
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok(Reply { body, ..reply })
    }
}

async fn get(sim: &Simulator, path: &str) -> Reply {
    Conn::open(sim)
        .await
        .get(path, Some(&sim.api_key()))
        .await
        .unwrap()
}

fn options(encounters: usize) -> SimOptions {
    SimOptions {
        seed: 11,
        encounters,
        start: datetime!(2026-01-01 00:00 UTC),
        end: datetime!(2026-03-01 00:00 UTC),
        ..SimOptions::default()
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["encounter_id"].as_str().unwrap().to_owned())
        .collect()
}

fn parse_ts(value: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(value.as_str().unwrap(), &Rfc3339).unwrap()
}

#[tokio::test]
async fn paging_both_ways_visits_every_encounter_once_in_order() {
    let sim = Simulator::start(options(450)).await.unwrap();
    let expected: Vec<_> = sim.snapshot().into_iter().map(|e| e.encounter_id).collect();
    let mut conn = Conn::open(&sim).await;
    let key = sim.api_key();
    let mut asc = Vec::new();
    let mut desc = Vec::new();
    for offset in (0..450).step_by(100) {
        let page = conn
            .get(
                &format!("/external/v1/encounters?limit=100&offset={offset}&sort_order=asc"),
                Some(&key),
            )
            .await
            .unwrap();
        assert_eq!(page.status, 200);
        let json = page.json();
        assert_eq!(
            (json["total"].as_u64(), json["offset"].as_u64()),
            (Some(450), Some(offset))
        );
        asc.extend(ids(&json));
        let page = conn
            .get(
                &format!("/external/v1/encounters?offset={offset}&limit=100"),
                Some(&key),
            )
            .await
            .unwrap();
        desc.extend(ids(&page.json()));
    }
    assert_eq!(asc, expected);
    desc.reverse();
    assert_eq!(desc, expected);
    assert_eq!(
        sim.stats().route(Route::List),
        10,
        "all pages on one keep-alive connection"
    );
    sim.shutdown();
}

#[tokio::test]
async fn list_items_match_the_snapshot_exactly() {
    let sim = Simulator::start(options(40)).await.unwrap();
    let page = get(&sim, "/external/v1/encounters?limit=100&sort_order=asc")
        .await
        .json();
    let snapshot = serde_json::to_value(sim.snapshot()).unwrap();
    let items = page["items"].as_array().unwrap();
    for (item, expected) in items.iter().zip(snapshot.as_array().unwrap()) {
        assert_eq!(item["encounter_id"], expected["encounter_id"]);
        assert_eq!(item["created_at"], expected["created_at"]);
        assert_eq!(item["updated_at"], expected["updated_at"]);
        assert_eq!(item["status"], expected["status"]);
        let docs = item["documents"].as_array().unwrap();
        for (doc, want) in docs.iter().zip(expected["documents"].as_array().unwrap()) {
            let keys: Vec<_> = doc.as_object().unwrap().keys().cloned().collect();
            assert_eq!(keys.len(), 6, "summary has exactly six fields: {keys:?}");
            assert_eq!(doc["document_id"], want["document_id"]);
            assert_eq!(doc["audio_duration_seconds"], want["audio_duration_seconds"]);
        }
        let patient = item["patient"].as_object().unwrap();
        assert!(patient.len() == 1 || patient.len() == 4, "{patient:?}");
    }
    sim.shutdown();
}

#[tokio::test]
async fn window_filters_are_inclusive_exclusive_and_plus_must_be_encoded() {
    let sim = Simulator::start(options(300)).await.unwrap();
    let all = sim.snapshot();
    let start = all[50].created_at;
    let end = all[120].created_at;
    let in_window = all
        .iter()
        .filter(|e| e.created_at >= start && e.created_at < end)
        .count();
    let shifted = |at: OffsetDateTime| {
        at.to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap())
            .format(&Rfc3339)
            .unwrap()
    };
    let encoded = format!(
        "/external/v1/encounters?start_at={}&end_at={}",
        shifted(start).replace('+', "%2B"),
        shifted(end).replace('+', "%2B")
    );
    let reply = get(&sim, &encoded).await;
    assert_eq!(reply.json()["total"].as_u64(), Some(in_window as u64));
    let raw_plus = format!("/external/v1/encounters?start_at={}", shifted(start));
    let reply = get(&sim, &raw_plus).await;
    assert_eq!((reply.status, reply.reason()), (422, "invalid_query".to_owned()));
    assert_eq!(reply.json()["field"], "start_at");
    sim.shutdown();
}

#[tokio::test]
async fn checks_run_in_the_documented_order() {
    let sim = Simulator::start(options(5)).await.unwrap();
    sim.add_key("ch_sk_docs", &["encounters:read", "documents:read"]);
    let mut conn = Conn::open(&sim).await;
    let bad_query = "/external/v1/encounters?limit=0&owners=me";
    let r = conn.get(bad_query, None).await.unwrap();
    assert_eq!((r.status, r.reason()), (401, "missing_bearer".into()));
    let r = conn.get(bad_query, Some("nope")).await.unwrap();
    assert_eq!((r.status, r.reason()), (401, "malformed_token".into()));
    let r = conn.get(bad_query, Some("ch_sk_unknown")).await.unwrap();
    assert_eq!((r.status, r.reason()), (401, "invalid_key".into()));
    let r = conn.get(bad_query, Some("ch_sk_docs")).await.unwrap();
    assert_eq!((r.status, r.reason()), (403, "missing_scope".into()));
    assert_eq!(r.json()["field"], Value::Null);
    let key = sim.api_key();
    let r = conn.get(bad_query, Some(&key)).await.unwrap();
    assert_eq!((r.status, r.reason()), (400, "unsupported_filter".into()));
    assert_eq!(r.json()["field"], "owners");
    let r = conn
        .get("/external/v1/encounters?limit=0", Some(&key))
        .await
        .unwrap();
    assert_eq!((r.status, r.reason()), (422, "invalid_limit".into()));
    let r = conn
        .get("/external/v1/encounters/enc_doesnotexist?x=1", Some(&key))
        .await
        .unwrap();
    assert_eq!((r.status, r.reason()), (400, "unsupported_filter".into()));
    let r = conn
        .get("/external/v1/encounters/enc_doesnotexist", Some(&key))
        .await
        .unwrap();
    assert_eq!((r.status, r.reason()), (404, "encounter_not_found".into()));
    sim.disable_route(Route::List, "route_not_allowed");
    let r = conn.get(bad_query, Some("ch_sk_docs")).await.unwrap();
    assert_eq!((r.status, r.reason()), (403, "route_not_allowed".into()));
    sim.set_key_state("ch_sk_docs", KeyState::Expired);
    let r = conn.get(bad_query, Some("ch_sk_docs")).await.unwrap();
    assert_eq!((r.status, r.reason()), (401, "expired_key".into()));
    sim.add_key(
        "ch_sk_test_sandbox",
        &["encounters:read", "patients:read", "documents:read"],
    );
    sim.enable_route(Route::List);
    let r = conn
        .get("/external/v1/encounters", Some("ch_sk_test_sandbox"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    sim.set_production(true);
    let r = conn
        .get("/external/v1/encounters", Some("ch_sk_test_sandbox"))
        .await
        .unwrap();
    assert_eq!((r.status, r.reason()), (401, "test_prefix_not_allowed".into()));
    let r = conn.get("/external/v1/nothing", Some(&key)).await.unwrap();
    assert_eq!(r.status, 404);
    sim.shutdown();
}

#[tokio::test]
async fn mutations_shift_offsets_and_change_visibility() {
    let sim = Simulator::start(options(30)).await.unwrap();
    let before = sim.snapshot();
    let page = |offset: usize| format!("/external/v1/encounters?sort_order=asc&limit=5&offset={offset}");
    let first = ids(&get(&sim, &page(5)).await.json());
    // A back-dated record lands before the page and pushes everything one place later.
    let new_id = sim.insert(NewEncounter::at(
        before[0].created_at - time::Duration::seconds(1),
    ));
    let shifted = get(&sim, &page(5)).await.json();
    assert_eq!(shifted["total"].as_u64(), Some(31));
    assert_eq!(ids(&shifted)[1..], first[..4]);
    sim.remove(&new_id);
    sim.remove(&before[0].encounter_id);
    let back = ids(&get(&sim, &page(5)).await.json());
    assert_eq!(back[..4], first[1..]);

    let victim = &before[3].encounter_id;
    let updated = sim.encounter(victim).unwrap().updated_at;
    sim.mark_unavailable(victim, Unavailable::DemoTraining);
    let r = get(&sim, &format!("/external/v1/encounters/{victim}")).await;
    assert_eq!((r.status, r.reason()), (403, "demo_training_denied".into()));
    assert!(!sim.snapshot().iter().any(|e| &e.encounter_id == victim));
    sim.restore(victim);
    let r = get(&sim, &format!("/external/v1/encounters/{victim}")).await;
    assert_eq!(r.status, 200);
    assert!(parse_ts(&r.json()["encounter"]["updated_at"]) > updated);
    let r = get(
        &sim,
        &format!("/external/v1/encounters/{}", before[0].encounter_id),
    )
    .await;
    assert_eq!((r.status, r.reason()), (404, "encounter_not_found".into()));
    assert_eq!(sim.visibility(&before[0].encounter_id), Some(Visibility::Removed));
    sim.shutdown();
}

/// A moved `created_at` moves the record between windows: listed at its new instant (in
/// order), no longer at its old one, and its `updated_at` bumped.
#[tokio::test]
async fn a_moved_created_at_moves_the_record_between_windows() {
    let sim = Simulator::start(options(30)).await.unwrap();
    let before = sim.snapshot();
    let moved = &before[20];
    let old = moved.created_at;
    let new = before[2].created_at - time::Duration::seconds(1);
    sim.move_created_at(&moved.encounter_id, new);
    let after = sim.snapshot();
    assert_eq!(after.len(), 30);
    assert_eq!(after[2].encounter_id, moved.encounter_id);
    assert_eq!(after[2].created_at, new);
    assert!(after[2].updated_at > moved.updated_at);
    let window = |at: OffsetDateTime| {
        let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap().replace('+', "%2B");
        format!(
            "/external/v1/encounters?limit=100&start_at={}&end_at={}",
            fmt(at),
            fmt(at + time::Duration::microseconds(1))
        )
    };
    assert!(!ids(&get(&sim, &window(old)).await.json()).contains(&moved.encounter_id));
    assert!(ids(&get(&sim, &window(new)).await.json()).contains(&moved.encounter_id));
    sim.shutdown();
}

#[tokio::test]
async fn documents_transcripts_and_audio_are_served_per_type() {
    let sim = Simulator::start(options(0)).await.unwrap();
    let id = sim.insert(NewEncounter {
        docs: vec![
            DocKind::Note,
            DocKind::AmbientFinal,
            DocKind::Ambient,
            DocKind::Unsupported,
        ],
        ..NewEncounter::at(datetime!(2026-02-01 15:00 UTC))
    });
    let docs: Vec<_> = sim
        .encounter(&id)
        .unwrap()
        .documents
        .into_iter()
        .map(|d| d.document_id)
        .collect();
    let doc = |i: usize, tail: &str| format!("/external/v1/encounters/{id}/documents/{}{tail}", docs[i]);

    let note = get(&sim, &doc(0, "")).await.json();
    assert_eq!(note["document"]["content"]["format"], "markdown");
    assert_eq!(
        note["document"]["content"]["text"].as_str(),
        sim.note_text(&id, &docs[0]).as_deref()
    );
    assert_eq!(note["document"]["status"], Value::Null);
    sim.edit_note(&id, &docs[0], "Edited ✍️");
    let note = get(&sim, &doc(0, "")).await.json();
    assert_eq!(note["document"]["content"]["text"], "Edited ✍️");

    let ambient = get(&sim, &doc(1, "")).await.json();
    let mut keys: Vec<_> = ambient["document"].as_object().unwrap().keys().cloned().collect();
    keys.sort();
    let closed = [
        "audio_duration_seconds",
        "created_at",
        "document_id",
        "encounter_id",
        "schema_type",
        "status",
        "title",
        "updated_at",
    ];
    assert_eq!(keys, closed);

    let transcript = get(&sim, &doc(1, "/transcript")).await.json();
    let expected = serde_json::to_value(sim.transcript(&id, &docs[1]).unwrap()).unwrap();
    assert_eq!(transcript["transcript"], expected);
    let pending = get(&sim, &doc(2, "/transcript")).await;
    assert_eq!(
        (pending.status, pending.reason()),
        (409, "transcript_not_ready".into())
    );
    sim.finalize_transcript(&id, &docs[2]);
    assert_eq!(get(&sim, &doc(2, "/transcript")).await.status, 200);
    for (i, tail) in [(3, ""), (0, "/transcript"), (0, "/audio"), (3, "/audio")] {
        let r = get(&sim, &doc(i, tail)).await;
        assert_eq!(
            (r.status, r.reason()),
            (400, "unsupported_document_type".into()),
            "{i}{tail}"
        );
    }
    let r = get(
        &sim,
        &format!("/external/v1/encounters/{id}/documents/doc_000000000000"),
    )
    .await;
    assert_eq!((r.status, r.reason()), (404, "encounter_not_found".into()));

    let audio = get(&sim, &doc(1, "/audio")).await.json();
    let url = audio["audio_url"].as_str().unwrap();
    assert!(parse_ts(&audio["expires_at"]) > OffsetDateTime::now_utc() + time::Duration::minutes(14));
    let path = url.strip_prefix(&sim.base_url()).unwrap();
    let wav = Conn::open(&sim).await.get(path, None).await.unwrap();
    assert_eq!((wav.status, &wav.body[..4]), (200, &b"RIFF"[..]));
    let tampered = path.replace("token=", "token=0");
    assert_eq!(
        Conn::open(&sim).await.get(&tampered, None).await.unwrap().status,
        403
    );
    assert_eq!(sim.stats().media, 2);
    sim.shutdown();
}

#[tokio::test]
async fn injected_faults_misbehave_as_described_and_then_stop() {
    let sim = Simulator::start(options(20)).await.unwrap();
    let key = sim.api_key();
    let list = "/external/v1/encounters";
    sim.push_fault(FaultRule {
        route: Some(Route::List),
        skip: 0,
        times: 1,
        fault: Fault::Status {
            status: 503,
            reason_code: Some("digest_key_unavailable".into()),
            retry_after: Some("2".into()),
        },
    });
    sim.push_fault(FaultRule::once(Some(Route::List), Fault::HtmlStatus(502)));
    sim.push_fault(FaultRule::once(Some(Route::List), Fault::TruncatedJson));
    let mut conn = Conn::open(&sim).await;
    let r = conn.get(list, Some(&key)).await.unwrap();
    assert_eq!((r.status, r.reason()), (503, "digest_key_unavailable".into()));
    assert_eq!(r.header("retry-after"), Some("2"));
    let r = conn.get(list, Some(&key)).await.unwrap();
    assert_eq!(r.status, 502);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    let r = conn.get(list, Some(&key)).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    assert_eq!(conn.get(list, Some(&key)).await.unwrap().status, 200);

    sim.push_fault(FaultRule::once(None, Fault::DropBeforeResponse));
    assert!(conn.get(list, Some(&key)).await.is_err());
    sim.push_fault(FaultRule::once(None, Fault::DropMidBody));
    let mut conn = Conn::open(&sim).await;
    assert!(
        conn.get(list, Some(&key)).await.is_err(),
        "body shorter than Content-Length"
    );
    let mut conn = Conn::open(&sim).await;
    assert_eq!(conn.get(list, Some(&key)).await.unwrap().status, 200);

    sim.push_fault(FaultRule::once(None, Fault::Hang));
    let hung = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        Conn::open(&sim).await.get(list, Some(&key)),
    )
    .await;
    assert!(hung.is_err(), "no answer while hanging");
    let stats = sim.stats();
    assert_eq!(stats.faults_injected, 6);
    assert_eq!(stats.status(503), 1);
    sim.shutdown();
}

#[tokio::test]
async fn rate_limit_counts_violations_and_enforces_when_asked() {
    let sim = Simulator::start(options(3)).await.unwrap();
    let key = sim.api_key();
    let mut conn = Conn::open(&sim).await;
    sim.set_rate_limit(Some(RateLimit {
        requests_per_second: 2.0,
        burst: 1,
        enforce: false,
    }));
    for _ in 0..5 {
        assert_eq!(
            conn.get("/external/v1/encounters", Some(&key))
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(sim.stats().rate_violations, 2);
    sim.set_rate_limit(Some(RateLimit {
        requests_per_second: 1.0,
        burst: 0,
        enforce: true,
    }));
    assert_eq!(
        conn.get("/external/v1/encounters", Some(&key))
            .await
            .unwrap()
            .status,
        200
    );
    let r = conn.get("/external/v1/encounters", Some(&key)).await.unwrap();
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    sim.shutdown();
}

#[tokio::test]
async fn list_hook_sees_each_page_and_may_mutate_between_pages() {
    let sim = Simulator::start(options(10)).await.unwrap();
    let snapshot = sim.snapshot();
    let inserted = Arc::new(AtomicBool::new(false));
    let flag = inserted.clone();
    let oldest = snapshot[0].created_at;
    sim.set_list_hook(Some(Arc::new(move |sim: &Simulator, req: &ListRequest| {
        if req.seq == 1 && !flag.swap(true, Ordering::SeqCst) {
            sim.insert(NewEncounter::at(oldest - time::Duration::minutes(1)));
        }
    })));
    let page = |offset| format!("/external/v1/encounters?sort_order=asc&limit=5&offset={offset}");
    let first = ids(&get(&sim, &page(0)).await.json());
    let second = ids(&get(&sim, &page(5)).await.json());
    assert!(inserted.load(Ordering::SeqCst));
    assert_eq!(first[4], second[0], "the insert before page two repeats a record");
    sim.shutdown();
}

#[tokio::test]
async fn rendering_switches_keep_instants_and_add_unknown_fields() {
    let sim = Simulator::start(SimOptions {
        offset_timestamps: true,
        extra_fields: true,
        ..options(20)
    })
    .await
    .unwrap();
    let page = get(&sim, "/external/v1/encounters?sort_order=asc&limit=100")
        .await
        .json();
    let snapshot = sim.snapshot();
    assert!(page[render::EXTRA_FIELD].is_object());
    for (item, want) in page["items"].as_array().unwrap().iter().zip(&snapshot) {
        assert!(!item["created_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(parse_ts(&item["created_at"]), want.created_at);
        assert!(item[render::EXTRA_FIELD].is_object());
        assert!(item["patient"][render::EXTRA_FIELD].is_object());
    }
    sim.set_offset_timestamps(false);
    let page = get(&sim, "/external/v1/encounters?limit=1").await.json();
    assert!(page["items"][0]["created_at"].as_str().unwrap().ends_with('Z'));
    sim.shutdown();
}

#[tokio::test]
async fn unordered_rendering_sends_the_same_values_in_other_bytes_each_time() {
    let sim = Simulator::start(SimOptions {
        unordered_rendering: true,
        extra_fields: true,
        ..options(30)
    })
    .await
    .unwrap();
    let path = "/external/v1/encounters?sort_order=asc&limit=100";
    let (a, b) = (get(&sim, path).await, get(&sim, path).await);
    assert_ne!(a.body, b.body);
    // The same values once each encounter's documents are put in one order.
    let canonical = |reply: &Reply| {
        let mut page = reply.json();
        for item in page["items"].as_array_mut().unwrap() {
            item["documents"]
                .as_array_mut()
                .unwrap()
                .sort_by_key(|d| d["document_id"].as_str().unwrap().to_owned());
        }
        page
    };
    assert_eq!(canonical(&a), canonical(&b));
    // Documents move (arrays keep their order when parsed)...
    let documents = |reply: &Reply| -> Vec<Vec<String>> {
        reply.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                let docs = item["documents"].as_array().unwrap();
                docs.iter()
                    .map(|d| d["document_id"].as_str().unwrap().to_owned())
                    .collect()
            })
            .collect()
    };
    assert_ne!(documents(&a), documents(&b));
    // ... and so do keys: the envelope does not always open with the same one.
    let mut first_keys = std::collections::HashSet::new();
    for _ in 0..8 {
        let body = get(&sim, path).await.body;
        let text = String::from_utf8(body).unwrap();
        first_keys.insert(text.split('"').nth(1).unwrap().to_owned());
    }
    assert!(first_keys.len() > 1, "{first_keys:?}");
    let detail = format!("/external/v1/encounters/{}", sim.snapshot()[3].encounter_id);
    let (x, y) = (get(&sim, &detail).await, get(&sim, &detail).await);
    assert_ne!(x.body, y.body);
    sim.shutdown();
}

#[tokio::test]
async fn signed_recording_links_differ_on_every_response_and_only_finished_recordings_have_one() {
    let sim = Simulator::start(SimOptions {
        signed_recording_links: true,
        ..options(40)
    })
    .await
    .unwrap();
    let path = "/external/v1/encounters?sort_order=asc&limit=100";
    let links = |reply: &Reply| -> Vec<(String, String, bool)> {
        let page = reply.json();
        let mut out = Vec::new();
        for item in page["items"].as_array().unwrap() {
            for d in item["documents"].as_array().unwrap() {
                let finished = d["schema_type"] == "ambient_transcript" && d["status"] == "completed";
                if let Some(url) = d["recording"]["audio_url"].as_str() {
                    out.push((
                        url.to_owned(),
                        d["recording"]["expires_at"].as_str().unwrap().to_owned(),
                        finished,
                    ));
                } else {
                    assert!(!finished, "{d}");
                }
            }
        }
        out
    };
    let a = links(&get(&sim, path).await);
    let b = links(&get(&sim, path).await);
    assert!(!a.is_empty() && a.len() == b.len());
    assert!(
        a.iter()
            .all(|(url, _, finished)| *finished && url.contains("?token="))
    );
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.0 != y.0),
        "a token was sent twice"
    );
    sim.shutdown();
}

#[tokio::test]
async fn counts_as_strings_sends_the_list_envelope_counts_as_strings() {
    let sim = Simulator::start(SimOptions {
        counts_as_strings: true,
        ..options(30)
    })
    .await
    .unwrap();
    let page = get(&sim, "/external/v1/encounters?limit=7&offset=2").await.json();
    assert_eq!(
        (&page["limit"], &page["offset"], &page["total"]),
        (&"7".into(), &"2".into(), &"30".into())
    );
    assert_eq!(page["items"].as_array().unwrap().len(), 7);
    sim.shutdown();
}

#[tokio::test]
async fn the_same_seed_serves_the_same_bytes() {
    let (a, b) = (
        Simulator::start(options(50)).await.unwrap(),
        Simulator::start(options(50)).await.unwrap(),
    );
    assert_eq!(a.api_key(), b.api_key());
    let path = "/external/v1/encounters?limit=100";
    assert_eq!(get(&a, path).await.body, get(&b, path).await.body);
    let e = &a.snapshot()[7];
    let ambient = e.documents.iter().find(|d| d.schema_type == "ambient_transcript");
    if let Some(doc) = ambient {
        let path = format!(
            "/external/v1/encounters/{}/documents/{}/transcript",
            e.encounter_id, doc.document_id
        );
        assert_eq!(get(&a, &path).await.body, get(&b, &path).await.body);
    }
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let sim = Simulator::start(options(1)).await.unwrap();
    let mut conn = Conn::open(&sim).await;
    assert_eq!(
        conn.get("/external/v1/encounters", Some(&sim.api_key()))
            .await
            .unwrap()
            .status,
        200
    );
    sim.shutdown();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut rest = Vec::new();
    let read = conn.stream.read_to_end(&mut rest).await;
    assert!(read.is_err() || rest.is_empty(), "the idle connection was closed");
    assert!(
        TcpStream::connect(sim.local_addr()).await.is_err(),
        "the listener is gone"
    );
}

/// Run with `cargo test -p charthero-sim --release -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "sizing check, slow in debug builds"]
async fn a_million_encounters_generate_in_seconds_and_page_quickly() {
    let started = std::time::Instant::now();
    let sim = Simulator::start(SimOptions {
        encounters: 1_000_000,
        ..options(0)
    })
    .await
    .unwrap();
    println!("generated 1,000,000 encounters in {:?}", started.elapsed());
    let started = std::time::Instant::now();
    let mut conn = Conn::open(&sim).await;
    let key = sim.api_key();
    for offset in (0..=10_000).step_by(100) {
        let reply = conn
            .get(
                &format!("/external/v1/encounters?limit=100&offset={offset}"),
                Some(&key),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    println!("101 full pages in {:?}", started.elapsed());
    sim.shutdown();
}

// ----- harsh upstream options -----

fn window(start: &str, end: &str) -> String {
    format!("/external/v1/encounters?limit=100&sort_order=asc&start_at={start}&end_at={end}")
}

fn all_timestamps(encounter: &Encounter) -> Vec<OffsetDateTime> {
    let mut all = vec![
        encounter.created_at,
        encounter.updated_at,
        encounter.date_of_service,
    ];
    for doc in &encounter.documents {
        all.extend([doc.created_at, doc.updated_at]);
    }
    all
}

#[tokio::test]
async fn nanos_precision_filters_inserted_records_at_nanoseconds() {
    let sim = Simulator::start(options(20)).await.unwrap();
    let id = sim.insert(NewEncounter::at(datetime!(2026-03-10 12:00:00.000000001 UTC)));
    let hit = get(
        &sim,
        &window("2026-03-10T12:00:00.000000001Z", "2026-03-10T12:00:00.000000002Z"),
    )
    .await
    .json();
    assert_eq!(ids(&hit), vec![id]);
    let miss = get(
        &sim,
        &window("2026-03-10T12:00:00Z", "2026-03-10T12:00:00.000000001Z"),
    )
    .await
    .json();
    assert_eq!(miss["total"], 0);
    sim.shutdown();
}

#[tokio::test]
async fn truncate_micros_truncates_queries_before_the_range_check_and_stores_micros() {
    let sim = Simulator::start(SimOptions {
        query_precision: QueryPrecision::TruncateMicros,
        ..options(200)
    })
    .await
    .unwrap();
    let id = sim.insert(NewEncounter::at(datetime!(2026-03-10 12:00:00.123456789 UTC)));
    assert_eq!(
        sim.encounter(&id).unwrap().created_at,
        datetime!(2026-03-10 12:00:00.123456 UTC)
    );
    let other = sim.snapshot()[3].encounter_id.clone();
    sim.set_encounter_updated_at(&other, datetime!(2026-03-11 00:00:00.000000999 UTC));
    sim.update_status(&id, "amended");
    sim.add_document(&id, DocKind::Note);
    for encounter in sim.snapshot() {
        for at in all_timestamps(&encounter) {
            assert_eq!(at.nanosecond() % 1_000, 0, "{}: {at}", encounter.encounter_id);
        }
    }

    // [t, t + 1 ns) truncates to [t, t); a start 999 ns after the record still finds it.
    assert_truncated(
        &sim,
        ("2026-03-10T12:00:00.123456Z", "2026-03-10T12:00:00.123456001Z"),
        ("2026-03-10T12:00:00.123456999Z", "2026-03-10T12:00:00.123457Z"),
        &id,
    )
    .await;

    sim.set_query_precision(QueryPrecision::Nanos);
    let exact = get(
        &sim,
        &window("2026-03-10T12:00:00.123456999Z", "2026-03-10T12:00:00.123457Z"),
    )
    .await;
    assert_eq!(exact.json()["total"], 0, "nanosecond filtering again");
    sim.shutdown();
}

#[tokio::test]
async fn truncate_millis_truncates_queries_before_the_range_check_and_stores_millis() {
    let sim = Simulator::start(SimOptions {
        query_precision: QueryPrecision::TruncateMillis,
        ..options(200)
    })
    .await
    .unwrap();
    let id = sim.insert(NewEncounter::at(datetime!(2026-03-10 12:00:00.123456789 UTC)));
    assert_eq!(
        sim.encounter(&id).unwrap().created_at,
        datetime!(2026-03-10 12:00:00.123 UTC)
    );
    for encounter in sim.snapshot() {
        assert_eq!(
            encounter.created_at.nanosecond() % 1_000_000,
            0,
            "{}",
            encounter.encounter_id
        );
    }
    // [t, t + 1 µs) truncates to [t, t); a start 999 µs after the record still finds it.
    assert_truncated(
        &sim,
        ("2026-03-10T12:00:00.123Z", "2026-03-10T12:00:00.123001Z"),
        ("2026-03-10T12:00:00.123999Z", "2026-03-10T12:00:00.124Z"),
        &id,
    )
    .await;
    sim.shutdown();
}

/// A server that truncates list bounds refuses `empty` (it collapses to `[t, t)`) exactly as any
/// empty range, and lists `id` for `found`, whose start is past the record by less than a unit.
async fn assert_truncated(sim: &Simulator, empty: (&str, &str), found: (&str, &str), id: &str) {
    let refused = get(sim, &window(empty.0, empty.1)).await;
    assert_eq!((refused.status, refused.reason()), (422, "invalid_query".into()));
    assert_eq!(refused.json()["field"], "start_at");
    let listed = get(sim, &window(found.0, found.1)).await;
    assert_eq!(ids(&listed.json()), vec![id.to_owned()]);
}

#[tokio::test]
async fn reject_past_micros_refuses_a_seventh_digit_naming_the_parameter() {
    let sim = Simulator::start(options(50)).await.unwrap();
    sim.set_query_precision(QueryPrecision::RejectPastMicros);
    let six = get(
        &sim,
        &window("2026-01-10T00:00:00.123456Z", "2026-02-10T00:00:00.5Z"),
    )
    .await;
    assert_eq!(six.status, 200);
    for (start, end, field) in [
        ("2026-01-10T00:00:00.1234567Z", "2026-02-10T00:00:00Z", "start_at"),
        ("2026-01-10T00:00:00Z", "2026-02-10T00:00:00.000000000Z", "end_at"),
    ] {
        let refused = get(&sim, &window(start, end)).await;
        assert_eq!((refused.status, refused.reason()), (422, "invalid_query".into()));
        let body = refused.json();
        assert_eq!(body["field"], field);
        assert!(
            body["message"].as_str().unwrap().contains("more than 6 digits"),
            "{body}"
        );
    }
    let id = sim.insert(NewEncounter::at(datetime!(2026-03-10 12:00:00.000000777 UTC)));
    assert_eq!(sim.encounter(&id).unwrap().created_at.nanosecond(), 0);
    sim.shutdown();
}

#[tokio::test]
async fn coarse_rendering_changes_only_the_rendered_created_at() {
    let second = Rendering {
        unit: time::Duration::SECOND,
        rounding: Rounding::Truncate,
    };
    let sim = Simulator::start(SimOptions {
        render_created_at: Some(second),
        ..options(250)
    })
    .await
    .unwrap();
    let snapshot = sim.snapshot();
    let mut items = Vec::new();
    for offset in [0, 100, 200] {
        let page = get(
            &sim,
            &format!("/external/v1/encounters?sort_order=asc&limit=100&offset={offset}"),
        )
        .await
        .json();
        assert_eq!(page["total"], 250);
        items.extend(page["items"].as_array().unwrap().clone());
    }
    let mut coarser = 0;
    for (item, want) in items.iter().zip(&snapshot) {
        assert_eq!(item["encounter_id"].as_str(), Some(want.encounter_id.as_str()));
        let rendered = parse_ts(&item["created_at"]);
        assert_eq!(rendered, sim.rendered_created_at(want.created_at));
        assert_eq!(rendered.nanosecond(), 0);
        assert_eq!(parse_ts(&item["updated_at"]), want.updated_at, "only created_at");
        coarser += usize::from(rendered != want.created_at);
    }
    assert!(coarser > 0, "generated data has sub-second created_at values");

    // The filter uses the stored value: the record is in [.5, .7) but shows 10:00:00.
    let id = sim.insert(NewEncounter::at(datetime!(2026-03-10 10:00:00.6 UTC)));
    let page = get(&sim, &window("2026-03-10T10:00:00.5Z", "2026-03-10T10:00:00.7Z"))
        .await
        .json();
    assert_eq!(ids(&page), vec![id.clone()]);
    assert_eq!(page["items"][0]["created_at"], "2026-03-10T10:00:00Z");
    let detail = |sim: Simulator, id: String| async move {
        get(&sim, &format!("/external/v1/encounters/{id}")).await.json()["encounter"]["created_at"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(detail(sim.clone(), id.clone()).await, "2026-03-10T10:00:00Z");

    sim.set_render_created_at(Some(Rendering {
        rounding: Rounding::Nearest,
        ..second
    }));
    assert_eq!(detail(sim.clone(), id.clone()).await, "2026-03-10T10:00:01Z");
    assert_eq!(
        sim.rendered_created_at(datetime!(2026-03-10 10:00:00.5 UTC)),
        datetime!(2026-03-10 10:00:01 UTC)
    );
    sim.set_render_created_at(None);
    assert_eq!(detail(sim.clone(), id.clone()).await, "2026-03-10T10:00:00.6Z");
    let instant = datetime!(2026-03-10 10:00:00.6 UTC);
    assert_eq!(sim.rendered_created_at(instant), instant);
    sim.shutdown();
}

#[tokio::test]
async fn a_rendering_unit_that_is_not_positive_is_refused_at_start() {
    let zero = Rendering {
        unit: time::Duration::ZERO,
        rounding: Rounding::Nearest,
    };
    let refused = Simulator::start(SimOptions {
        render_created_at: Some(zero),
        ..options(0)
    })
    .await;
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::InvalidInput)
    );
}

#[tokio::test]
async fn one_bulk_instant_pages_by_encounter_id_both_ways_up_to_the_offset_cap() {
    let t = datetime!(2026-03-05 09:30 UTC);
    let sim = Simulator::start(SimOptions {
        bulk_instants: vec![(t, 10_150)],
        ..options(50)
    })
    .await
    .unwrap();
    let before = sim.insert(NewEncounter::at(t - time::Duration::NANOSECOND));
    let after = sim.insert(NewEncounter::at(t + time::Duration::MICROSECOND));
    let mut expected: Vec<String> = sim
        .snapshot()
        .into_iter()
        .filter(|e| e.created_at == t)
        .map(|e| e.encounter_id)
        .collect();
    assert_eq!(expected.len(), 10_150);
    assert!(expected.windows(2).all(|w| w[0] < w[1]), "ties by encounter_id");

    let key = sim.api_key();
    let mut conn = Conn::open(&sim).await;
    let (start, end) = ("2026-03-05T09:30:00Z", "2026-03-05T09:30:00.000001Z");
    let mut asc = Vec::new();
    let mut desc = Vec::new();
    for offset in (0..=10_000).step_by(100) {
        for (order, into) in [("asc", &mut asc), ("desc", &mut desc)] {
            let path = format!(
                "/external/v1/encounters?limit=100&offset={offset}&sort_order={order}&start_at={start}&end_at={end}"
            );
            let page = conn.get(&path, Some(&key)).await.unwrap().json();
            assert_eq!(page["total"], 10_150);
            into.extend(ids(&page));
        }
    }
    assert_eq!(asc, expected[..10_100]);
    expected.reverse();
    assert_eq!(desc, expected[..10_100], "desc is the exact reverse of asc");
    assert!(!asc.contains(&before) && !asc.contains(&after) && !desc.contains(&after));
    let capped = conn
        .get(
            &format!("/external/v1/encounters?offset=10001&start_at={start}&end_at={end}"),
            Some(&key),
        )
        .await
        .unwrap();
    assert_eq!((capped.status, capped.reason()), (422, "invalid_offset".into()));
    sim.shutdown();
}

#[tokio::test]
async fn insert_bulk_adds_twenty_thousand_at_one_instant_quickly() {
    let sim = Simulator::start(options(1_000)).await.unwrap();
    let t = sim.snapshot()[500].created_at;
    let ties_before = sim.snapshot().iter().filter(|e| e.created_at == t).count();
    let started = std::time::Instant::now();
    let ids_added = sim.insert_bulk(t, 20_000);
    let elapsed = started.elapsed();
    assert!(elapsed < std::time::Duration::from_secs(1), "{elapsed:?}");
    assert_eq!(ids_added.len(), 20_000);
    let more = sim.insert_bulk(t, 7);
    assert_eq!(sim.visible_count(), 21_007);

    let snapshot = sim.snapshot();
    let key = |e: &Encounter| (e.created_at, e.encounter_id.clone());
    assert!(
        snapshot.windows(2).all(|w| key(&w[0]) < key(&w[1])),
        "index stays sorted"
    );
    assert_eq!(
        snapshot.iter().filter(|e| e.created_at == t).count(),
        ties_before + 20_007
    );
    let added = sim.encounter(&more[0]).unwrap();
    assert_eq!((added.created_at, added.status.as_str()), (t, "completed"));
    assert!(added.updated_at > t);
    assert_eq!(added.documents[0].schema_type, "ambient_transcript");
    assert_eq!(added.documents[0].status.as_deref(), Some("completed"));
    let detail = get(&sim, &format!("/external/v1/encounters/{}", ids_added[19_999])).await;
    assert_eq!(detail.status, 200);
    sim.shutdown();
}

#[tokio::test]
async fn moving_a_document_recomputes_updated_at_so_the_source_goes_backwards() {
    let sim = Simulator::start(options(0)).await.unwrap();
    let source = sim.insert(NewEncounter {
        docs: vec![DocKind::AmbientFinal, DocKind::Note],
        ..NewEncounter::at(datetime!(2026-02-01 10:00 UTC))
    });
    let target = sim.insert(NewEncounter::at(datetime!(2026-02-01 11:00 UTC)));
    let note = sim.encounter(&source).unwrap().documents[1].document_id.clone();
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    sim.edit_note(&source, &note, "Filed to the wrong visit.");
    let detail = |id: &str| {
        let (sim, id) = (sim.clone(), id.to_owned());
        async move { get(&sim, &format!("/external/v1/encounters/{id}")).await.json()["encounter"].clone() }
    };
    let source_before = detail(&source).await;
    let target_before = detail(&target).await;

    sim.move_document(&source, &note, &target);
    let source_after = detail(&source).await;
    let target_after = detail(&target).await;
    assert_eq!(source_after["documents"].as_array().unwrap().len(), 1);
    assert!(
        parse_ts(&source_after["updated_at"]) < parse_ts(&source_before["updated_at"]),
        "content changed, updated_at went backwards"
    );
    let remaining = &sim.encounter(&source).unwrap().documents[0];
    assert_eq!(parse_ts(&source_after["updated_at"]), remaining.updated_at);
    assert!(parse_ts(&target_after["updated_at"]) > parse_ts(&target_before["updated_at"]));
    assert_eq!(target_after["documents"][1]["document_id"], note.as_str());

    let moved = get(
        &sim,
        &format!("/external/v1/encounters/{target}/documents/{note}"),
    )
    .await
    .json();
    assert_eq!(moved["document"]["encounter_id"], target.as_str());
    assert_eq!(moved["document"]["content"]["text"], "Filed to the wrong visit.");
    let gone = get(
        &sim,
        &format!("/external/v1/encounters/{source}/documents/{note}"),
    )
    .await;
    assert_eq!((gone.status, gone.reason()), (404, "encounter_not_found".into()));

    // Moving the last document leaves only the base: here the created_at.
    let ambient = remaining.document_id.clone();
    sim.move_document(&source, &ambient, &target);
    assert_eq!(
        sim.encounter(&source).unwrap().updated_at,
        datetime!(2026-02-01 10:00 UTC)
    );
    sim.shutdown();
}

#[tokio::test]
async fn restore_status_sets_an_older_updated_at_that_later_recomputes_respect() {
    let sim = Simulator::start(options(0)).await.unwrap();
    let id = sim.insert(NewEncounter {
        docs: vec![DocKind::Note],
        ..NewEncounter::at(datetime!(2026-02-01 10:00 UTC))
    });
    let other = sim.insert(NewEncounter::at(datetime!(2026-02-02 10:00 UTC)));
    sim.update_status(&id, "amended");
    let amended = sim.encounter(&id).unwrap().updated_at;
    let restored_at = datetime!(2026-02-01 12:00 UTC);
    sim.restore_status(&id, "completed", restored_at);
    let reply = get(&sim, &format!("/external/v1/encounters/{id}")).await.json();
    assert_eq!(reply["encounter"]["status"], "completed");
    assert_eq!(parse_ts(&reply["encounter"]["updated_at"]), restored_at);
    assert!(restored_at < amended);

    sim.set_encounter_updated_at(&other, datetime!(2026-02-02 10:30 UTC));
    assert_eq!(
        sim.encounter(&other).unwrap().updated_at,
        datetime!(2026-02-02 10:30 UTC)
    );
    // The restored instant is the base: with no documents left, updated_at falls back to it.
    let note = sim.encounter(&id).unwrap().documents[0].document_id.clone();
    sim.move_document(&id, &note, &other);
    assert_eq!(sim.encounter(&id).unwrap().updated_at, restored_at);
    sim.shutdown();
}

#[tokio::test]
async fn backdated_inserts_and_old_removals_change_their_window_totals() {
    let now = OffsetDateTime::now_utc();
    let sim = Simulator::start(SimOptions {
        seed: 11,
        encounters: 600,
        start: now - time::Duration::days(60),
        end: now - time::Duration::hours(1),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let encode = |at: OffsetDateTime| at.format(&Rfc3339).unwrap();
    let around = |at: OffsetDateTime| {
        window(
            &encode(at - time::Duration::days(1)),
            &encode(at + time::Duration::days(1)),
        )
    };

    let old = now - time::Duration::days(28);
    let before = get(&sim, &around(old)).await.json()["total"].as_u64().unwrap();
    let id = sim.insert(NewEncounter::at(old));
    let page = get(&sim, &around(old)).await.json();
    assert_eq!(page["total"].as_u64(), Some(before + 1));
    assert!(ids(&page).contains(&id));
    let inserted = sim.encounter(&id).unwrap();
    assert_eq!(inserted.created_at, old);
    assert!(
        inserted.updated_at >= now,
        "appeared now although created weeks ago"
    );

    let victim = sim
        .snapshot()
        .into_iter()
        .find(|e| (now - e.created_at - time::Duration::days(20)).abs() < time::Duration::days(2))
        .expect("a generated encounter about 20 days old");
    let at = victim.created_at;
    let before = get(&sim, &around(at)).await.json();
    assert!(ids(&before).contains(&victim.encounter_id));
    sim.remove(&victim.encounter_id);
    let after = get(&sim, &around(at)).await.json();
    assert_eq!(after["total"].as_u64(), before["total"].as_u64().map(|t| t - 1));
    assert!(!ids(&after).contains(&victim.encounter_id));
    sim.shutdown();
}

#[tokio::test]
async fn stats_count_list_requests_and_limit_one_probes_apart() {
    let sim = Simulator::start(options(10)).await.unwrap();
    let mut conn = Conn::open(&sim).await;
    let key = sim.api_key();
    for query in ["limit=1", "limit=1&sort_order=asc", "limit=2", "limit=0", ""] {
        conn.get(&format!("/external/v1/encounters?{query}"), Some(&key))
            .await
            .unwrap();
    }
    let stats = sim.stats();
    assert_eq!(stats.route(Route::List), 5);
    assert_eq!(stats.list_probe_requests, 2);
    sim.reset_stats();
    assert_eq!(sim.stats().list_probe_requests, 0);
    sim.shutdown();
}

#[tokio::test]
async fn a_host_of_several_organizations_answers_each_key_from_its_own_clinic() {
    let sims = Simulator::start_organizations(vec![
        SimOptions {
            organization_id: "org_a".into(),
            ..options(30)
        },
        SimOptions {
            seed: 12,
            organization_id: "org_b".into(),
            ..options(20)
        },
    ])
    .await
    .unwrap();
    let (a, b) = (&sims[0], &sims[1]);
    assert_eq!(a.base_url(), b.base_url());
    assert_ne!(a.api_key(), b.api_key());
    b.set_rate_limit(Some(RateLimit {
        requests_per_second: 1.0,
        burst: 0,
        enforce: false,
    }));
    a.set_host_rate_limit(Some(RateLimit {
        requests_per_second: 1.0,
        burst: 1,
        enforce: false,
    }));
    let mut conn = Conn::open(a).await;
    for (sim, id, total) in [(a, "org_a", 30), (b, "org_b", 20)] {
        let page = conn
            .get("/external/v1/encounters?limit=100", Some(&sim.api_key()))
            .await
            .unwrap()
            .json();
        assert_eq!(page["total"], total);
        assert!(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["organization_id"] == id)
        );
        // One clinic's encounter is not found with the other's key.
        let other = if sim.api_key() == a.api_key() { b } else { a };
        let theirs = &other.snapshot()[0].encounter_id;
        let reply = conn
            .get(&format!("/external/v1/encounters/{theirs}"), Some(&sim.api_key()))
            .await
            .unwrap();
        assert_eq!(
            (reply.status, reply.reason()),
            (404, "encounter_not_found".to_owned())
        );
    }
    // Revoking one clinic's key leaves the other's working; an unknown key is invalid.
    b.set_key_state(&b.api_key(), KeyState::Revoked);
    let reply = conn
        .get("/external/v1/encounters", Some(&b.api_key()))
        .await
        .unwrap();
    assert_eq!((reply.status, reply.reason()), (401, "revoked_key".to_owned()));
    let reply = conn
        .get("/external/v1/encounters", Some(&a.api_key()))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let reply = conn
        .get("/external/v1/encounters", Some("ch_sk_nobody"))
        .await
        .unwrap();
    assert_eq!((reply.status, reply.reason()), (401, "invalid_key".to_owned()));
    // Each clinic counts its own key's requests and violations; the host counts them all.
    assert_eq!(a.stats().requests, 4, "{:?}", a.stats());
    assert_eq!(b.stats().requests, 3, "{:?}", b.stats());
    assert!(b.stats().rate_violations >= 1);
    assert_eq!(a.stats().rate_violations, 0);
    let (requests, violations) = a.host_stats();
    assert_eq!(requests, 7);
    assert!(violations >= 5, "{violations}");
    a.shutdown();
}

#[tokio::test]
async fn a_page_cap_holds_pages_short_echoes_the_servers_limit_and_keeps_the_total() {
    let sim = Simulator::start(SimOptions {
        page_cap: Some(PageCap {
            max: 30,
            varying: false,
        }),
        ..options(100)
    })
    .await
    .unwrap();
    let expected: Vec<_> = sim.snapshot().into_iter().map(|e| e.encounter_id).collect();
    let page = get(&sim, "/external/v1/encounters?limit=100&sort_order=asc")
        .await
        .json();
    assert_eq!(
        (page["limit"].as_u64(), page["total"].as_u64()),
        (Some(30), Some(100))
    );
    assert_eq!(ids(&page), expected[..30]);
    // Below the cap, the request's own limit holds.
    let page = get(&sim, "/external/v1/encounters?limit=7&sort_order=asc")
        .await
        .json();
    assert_eq!((page["limit"].as_u64(), ids(&page).len()), (Some(7), 7));
    // Varying: every page between 1 and the cap, and not all the same size.
    sim.set_page_cap(Some(PageCap {
        max: 30,
        varying: true,
    }));
    let mut sizes = std::collections::BTreeSet::new();
    for offset in 0..20 {
        let page = get(
            &sim,
            &format!("/external/v1/encounters?limit=100&offset={offset}&sort_order=asc"),
        )
        .await
        .json();
        let items = ids(&page);
        assert_eq!(page["limit"].as_u64(), Some(items.len() as u64));
        assert_eq!(items, expected[offset..offset + items.len()]);
        sizes.insert(items.len());
    }
    assert!(
        sizes.len() > 3 && sizes.iter().all(|n| (1..=30).contains(n)),
        "{sizes:?}"
    );
    sim.set_page_cap(None);
    let page = get(&sim, "/external/v1/encounters?limit=100").await.json();
    assert_eq!(ids(&page).len(), 100);
    let refused = Simulator::start(SimOptions {
        page_cap: Some(PageCap {
            max: 0,
            varying: false,
        }),
        ..options(0)
    })
    .await;
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::InvalidInput)
    );
    sim.shutdown();
}

#[tokio::test]
async fn a_total_that_counts_unavailable_encounters_counts_them_in_their_range_only() {
    let sim = Simulator::start(SimOptions {
        total_counts_unavailable: true,
        ..options(100)
    })
    .await
    .unwrap();
    let snapshot = sim.snapshot();
    for e in &snapshot[10..13] {
        sim.mark_unavailable(&e.encounter_id, Unavailable::DemoTraining);
    }
    let page = get(&sim, "/external/v1/encounters?limit=100").await.json();
    assert_eq!((ids(&page).len(), page["total"].as_u64()), (97, Some(100)));
    // Only the ranges that hold them count them.
    let at = |e: &Encounter| e.created_at.format(&Rfc3339).unwrap().replace('+', "%2B");
    let before = get(
        &sim,
        &format!("/external/v1/encounters?limit=1&end_at={}", at(&snapshot[10])),
    )
    .await
    .json();
    assert_eq!(before["total"].as_u64(), Some(10));
    let around = get(
        &sim,
        &format!(
            "/external/v1/encounters?limit=100&start_at={}&end_at={}",
            at(&snapshot[10]),
            at(&snapshot[14])
        ),
    )
    .await
    .json();
    assert_eq!((ids(&around).len(), around["total"].as_u64()), (1, Some(4)));
    // Restored or removed, an encounter is counted as the list shows it.
    sim.restore(&snapshot[10].encounter_id);
    sim.remove(&snapshot[11].encounter_id);
    let page = get(&sim, "/external/v1/encounters?limit=100").await.json();
    assert_eq!((ids(&page).len(), page["total"].as_u64()), (98, Some(99)));
    sim.set_total_counts_unavailable(false);
    let page = get(&sim, "/external/v1/encounters?limit=100").await.json();
    assert_eq!(page["total"].as_u64(), Some(98));
    sim.shutdown();
}

#[tokio::test]
async fn a_list_that_filters_after_its_limit_gives_short_and_empty_pages_counted_by_offset() {
    let sim = Simulator::start(SimOptions {
        filter_after_limit: true,
        ..options(30)
    })
    .await
    .unwrap();
    let snapshot = sim.snapshot();
    // Encounters 5..15 (ascending) are hidden from the key.
    for e in &snapshot[5..15] {
        sim.mark_unavailable(&e.encounter_id, Unavailable::DemoTraining);
    }
    let listed = |page: &serde_json::Value| -> Vec<String> { ids(page) };
    let first = get(&sim, "/external/v1/encounters?limit=5&offset=0&sort_order=asc")
        .await
        .json();
    assert_eq!(
        listed(&first),
        snapshot[..5]
            .iter()
            .map(|e| e.encounter_id.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(first["total"].as_u64(), Some(30));
    // The next two pages hold only hidden encounters: empty, though records remain.
    for offset in [5, 10] {
        let page = get(
            &sim,
            &format!("/external/v1/encounters?limit=5&offset={offset}&sort_order=asc"),
        )
        .await
        .json();
        assert!(listed(&page).is_empty(), "{page}");
        assert_eq!(page["total"].as_u64(), Some(30));
    }
    let after = get(&sim, "/external/v1/encounters?limit=5&offset=15&sort_order=asc")
        .await
        .json();
    assert_eq!(
        listed(&after),
        snapshot[15..20]
            .iter()
            .map(|e| e.encounter_id.clone())
            .collect::<Vec<_>>()
    );
    // Descending, a page straddling them comes back short.
    let desc = get(&sim, "/external/v1/encounters?limit=20&offset=0&sort_order=desc")
        .await
        .json();
    assert_eq!(listed(&desc).len(), 15);
    sim.shutdown();
}

#[tokio::test]
async fn dates_of_service_render_in_the_chosen_shapes_as_rendered_date_of_service_says() {
    for (shapes, kinds) in [
        (ServiceDates::Timestamps, 1),
        (ServiceDates::PlainDates, 1),
        (ServiceDates::Assorted, 6),
    ] {
        let sim = Simulator::start(SimOptions {
            service_dates: shapes,
            ..options(90)
        })
        .await
        .unwrap();
        let page = get(&sim, "/external/v1/encounters?limit=100&sort_order=asc")
            .await
            .json();
        let snapshot = sim.snapshot();
        let mut seen = std::collections::BTreeSet::new();
        for (item, encounter) in page["items"].as_array().unwrap().iter().zip(&snapshot) {
            let sent = &item["date_of_service"];
            assert_eq!(*sent, sim.rendered_date_of_service(encounter), "{shapes:?}");
            let day = encounter.date_of_service.date();
            let kind = match sent {
                Value::String(text) if text.is_empty() => "empty",
                Value::String(text) if text.len() == 10 => {
                    assert_eq!(text, &day.to_string());
                    "date"
                }
                Value::String(text) if text.ends_with('Z') => {
                    assert_eq!(parse_ts(sent), encounter.date_of_service);
                    "timestamp"
                }
                Value::String(text) => {
                    assert!(text.starts_with(&day.to_string()) && text.len() == 19, "{text}");
                    "no offset"
                }
                Value::Number(n) => {
                    assert_eq!(n.as_i64(), Some(encounter.date_of_service.unix_timestamp()));
                    "number"
                }
                Value::Null => "null",
                other => panic!("{other}"),
            };
            seen.insert(kind);
        }
        assert_eq!(seen.len(), kinds, "{shapes:?}: {seen:?}");
        sim.shutdown();
    }
}

#[tokio::test]
async fn an_empty_list_fault_answers_a_valid_list_request_with_nothing_and_errors_as_usual() {
    let sim = Simulator::start(options(30)).await.unwrap();
    sim.push_fault(FaultRule {
        route: Some(Route::List),
        skip: 0,
        times: 2,
        fault: Fault::EmptyList,
    });
    let empty = get(&sim, "/external/v1/encounters?limit=7&offset=3").await;
    assert_eq!(empty.status, 200);
    let page = empty.json();
    assert_eq!(page["items"], serde_json::json!([]));
    assert_eq!(
        (
            page["total"].as_u64(),
            page["limit"].as_u64(),
            page["offset"].as_u64()
        ),
        (Some(0), Some(7), Some(3))
    );
    // A request that earns an error still gets it (and uses up the fault).
    let refused = get(&sim, "/external/v1/encounters?limit=0").await;
    assert_eq!((refused.status, refused.reason()), (422, "invalid_limit".into()));
    let normal = get(&sim, "/external/v1/encounters?limit=7").await.json();
    assert_eq!(normal["total"].as_u64(), Some(30));
    assert_eq!(normal["items"].as_array().unwrap().len(), 7);
    sim.shutdown();
}

#[tokio::test]
async fn lagging_document_routes_do_not_find_new_documents_until_they_catch_up() {
    let sim = Simulator::start(SimOptions {
        document_lag: std::time::Duration::from_secs(3600),
        ..options(0)
    })
    .await
    .unwrap();
    let docs = vec![DocKind::Note, DocKind::AmbientFinal];
    let fresh = sim.insert(NewEncounter {
        docs: docs.clone(),
        ..NewEncounter::at(OffsetDateTime::now_utc())
    });
    let old = sim.insert(NewEncounter {
        docs,
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::hours(2))
    });
    let detail = |id: &str, i: usize| {
        let document = sim.encounter(id).unwrap().documents[i].document_id.clone();
        format!("/external/v1/encounters/{id}/documents/{document}")
    };
    // Listed, but not found by the document's routes yet; older documents are.
    assert!(ids(&get(&sim, "/external/v1/encounters?limit=10").await.json()).contains(&fresh));
    let routes = |id: &str| {
        [
            detail(id, 0),
            format!("{}/transcript", detail(id, 1)),
            format!("{}/audio", detail(id, 1)),
        ]
    };
    for path in routes(&fresh) {
        let lagging = get(&sim, &path).await;
        assert_eq!(lagging.status, 404, "{path}");
        assert_eq!(lagging.json()["reason_code"], "encounter_not_found");
    }
    for path in routes(&old) {
        assert_eq!(get(&sim, &path).await.status, 200, "{path}");
    }
    sim.set_document_lag(std::time::Duration::ZERO);
    for path in routes(&fresh) {
        assert_eq!(get(&sim, &path).await.status, 200, "{path}");
    }
}
