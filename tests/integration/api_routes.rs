//! Every route's success path, every documented reason code produced by the simulator and
//! classified by the client, and the list route's validation rules.

use charthero_sim::{DocKind, Fault, FaultRule, KeyState, NewEncounter, Route as SimRoute, Unavailable};
use charthero_sync::api::wire::DocumentDetail;
use charthero_sync::api::{ApiError, Client, ErrorClass, ListQuery, SortOrder};
use charthero_sync::secret::ApiKey;
use charthero_sync::timefmt::Micros;
use time::OffsetDateTime;

use crate::support::TestEnv;

/// A client that does not retry, so each error is seen as the server sent it.
fn client(env: &TestEnv, key: &str) -> Client {
    let mut raw = env.raw_config();
    raw.limits.max_attempts = 1;
    let cfg = raw.validate().unwrap();
    Client::new(&cfg.api, &cfg.limits, &ApiKey::new(key).unwrap()).unwrap()
}

fn all(limit: u32, offset: u32, sort: SortOrder) -> ListQuery {
    ListQuery {
        start_at: None,
        end_at: None,
        offset,
        limit,
        sort,
    }
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, ApiError>) -> ApiError {
    r.expect_err("the request should have failed")
}

fn assert_reason(err: &ApiError, status: u16, reason: &str, class: ErrorClass) {
    assert_eq!(err.status(), Some(status), "{err}");
    assert_eq!(err.reason_code(), Some(reason), "{err}");
    assert_eq!(err.class(), class, "{err}");
}

#[tokio::test]
async fn the_list_route_pages_in_created_at_then_id_order_both_ways() {
    let env = TestEnv::with_encounters(7, 250).await;
    let c = client(&env, &env.sim.api_key());
    let snapshot = env.sim.snapshot();
    let mut asc = Vec::new();
    for offset in [0, 100, 200] {
        let page = c
            .list_encounters(&all(100, offset, SortOrder::Asc))
            .await
            .unwrap();
        assert_eq!((page.total, page.limit, page.offset), (250, 100, offset));
        asc.extend(page.items.into_iter().map(|e| e.encounter_id));
    }
    let expected: Vec<_> = snapshot.iter().map(|e| e.encounter_id.clone()).collect();
    assert_eq!(asc, expected);
    let desc = c.list_encounters(&all(5, 0, SortOrder::Desc)).await.unwrap();
    let newest: Vec<_> = desc.items.iter().map(|e| e.encounter_id.clone()).collect();
    let expected_newest: Vec<_> = expected.iter().rev().take(5).cloned().collect();
    assert_eq!(newest, expected_newest);

    // start_at is inclusive and end_at exclusive.
    let pivot = snapshot[100].created_at;
    let from_pivot = ListQuery {
        start_at: Some(Micros::floor(pivot)),
        end_at: Some(Micros::floor(snapshot[200].created_at)),
        ..all(100, 0, SortOrder::Asc)
    };
    let page = c.list_encounters(&from_pivot).await.unwrap();
    let first = page.items.first().unwrap();
    assert_eq!(first.created_at.0, pivot);
    assert!(
        page.items
            .iter()
            .all(|e| e.created_at.0 < snapshot[200].created_at)
    );
}

#[tokio::test]
async fn detail_document_transcript_and_audio_routes_return_their_documented_shapes() {
    let env = TestEnv::with_encounters(3, 0).await;
    let sim = &env.sim;
    let id = sim.insert(NewEncounter {
        docs: vec![
            DocKind::Note,
            DocKind::AmbientFinal,
            DocKind::Ambient,
            DocKind::Unsupported,
        ],
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::hours(2))
    });
    let c = client(&env, &sim.api_key());
    let e = c.encounter(&id).await.unwrap();
    let upstream = sim.encounter(&id).unwrap();
    assert_eq!(e.encounter_id, id);
    assert_eq!(e.documents.len(), 4);
    let docs: Vec<_> = upstream.documents.iter().map(|d| d.document_id.clone()).collect();

    match c.document(&id, &docs[0]).await.unwrap() {
        DocumentDetail::Note(n) => {
            assert_eq!(n.content.format, "markdown");
            assert_eq!(Some(n.content.text), sim.note_text(&id, &docs[0]));
        }
        other => panic!("expected a note, got {other:?}"),
    }
    match c.document(&id, &docs[1]).await.unwrap() {
        DocumentDetail::Ambient(a) => assert_eq!(a.document_id, docs[1]),
        other => panic!("expected ambient metadata, got {other:?}"),
    }
    let err = expect_err(c.document(&id, &docs[3]).await);
    assert_reason(
        &err,
        400,
        "unsupported_document_type",
        ErrorClass::ResourceUnavailable,
    );

    let t = c.transcript(&id, &docs[1]).await.unwrap();
    let expected = sim.transcript(&id, &docs[1]).unwrap();
    assert_eq!(t.transcript.turns.len(), expected.turns.len());
    assert_eq!(t.transcript.turns[0].text, expected.turns[0].text);
    let not_ready = expect_err(c.transcript(&id, &docs[2]).await);
    assert_eq!(not_ready.class(), ErrorClass::ResourceUnavailable, "{not_ready}");

    let audio = c.audio(&id, &docs[1]).await.unwrap();
    assert!(audio.expires_at.0 > OffsetDateTime::now_utc());
    assert!(audio.audio_url.expose().starts_with(&sim.base_url()));
    let wav = reqwest::get(audio.audio_url.expose()).await.unwrap();
    assert_eq!(wav.status(), 200);
}

#[tokio::test]
async fn every_authentication_reason_code_is_a_401_the_operator_must_fix() {
    let env = TestEnv::with_encounters(1, 3).await;
    let sim = &env.sim;
    let q = all(10, 0, SortOrder::Asc);

    let err = expect_err(client(&env, "not-a-chartHero-key").list_encounters(&q).await);
    assert_reason(&err, 401, "malformed_token", ErrorClass::OperatorMustAct);
    let err = expect_err(client(&env, "ch_sk_unknown_key").list_encounters(&q).await);
    assert_reason(&err, 401, "invalid_key", ErrorClass::OperatorMustAct);
    assert!(err.is_auth());

    for (state, reason) in [
        (KeyState::Disabled, "disabled_key"),
        (KeyState::Revoked, "revoked_key"),
        (KeyState::Expired, "expired_key"),
    ] {
        let key = format!("ch_sk_{reason}");
        sim.add_key(&key, &["encounters:read", "patients:read", "documents:read"]);
        sim.set_key_state(&key, state);
        let err = expect_err(client(&env, &key).list_encounters(&q).await);
        assert_reason(&err, 401, reason, ErrorClass::OperatorMustAct);
    }

    // Organization- and environment-level refusals.
    sim.add_key(
        "ch_sk_test_sandbox",
        &["encounters:read", "patients:read", "documents:read"],
    );
    sim.set_production(true);
    let err = expect_err(client(&env, "ch_sk_test_sandbox").list_encounters(&q).await);
    assert_reason(&err, 401, "test_prefix_not_allowed", ErrorClass::OperatorMustAct);
    sim.set_production(false);
    sim.set_api_keys_disabled(true);
    let err = expect_err(client(&env, &sim.api_key()).list_encounters(&q).await);
    assert_reason(&err, 401, "api_keys_disabled", ErrorClass::OperatorMustAct);
    sim.set_api_keys_disabled(false);
    sim.add_key(
        "ch_sk_user_scoped",
        &["encounters:read", "patients:read", "documents:read"],
    );
    sim.set_key_org_scoped("ch_sk_user_scoped", false);
    let err = expect_err(client(&env, "ch_sk_user_scoped").list_encounters(&q).await);
    assert_reason(&err, 403, "org_scope_only_required", ErrorClass::OperatorMustAct);

    // No Authorization header at all: our client always sends one, so ask directly.
    let url = format!("{}/external/v1/encounters", sim.base_url());
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["reason_code"], "missing_bearer");
}

#[tokio::test]
async fn scope_enablement_and_availability_errors_are_classified() {
    let env = TestEnv::with_encounters(2, 5).await;
    let sim = &env.sim;
    let q = all(10, 0, SortOrder::Asc);
    let full = client(&env, &sim.api_key());
    let ids: Vec<_> = sim.snapshot().into_iter().map(|e| e.encounter_id).collect();

    sim.add_key(
        "ch_sk_no_recordings",
        &["encounters:read", "patients:read", "documents:read"],
    );
    let limited = client(&env, "ch_sk_no_recordings");
    let amb = sim.insert(NewEncounter {
        docs: vec![DocKind::AmbientFinal],
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::hours(3))
    });
    let doc = sim.encounter(&amb).unwrap().documents[0].document_id.clone();
    let err = expect_err(limited.audio(&amb, &doc).await);
    assert_reason(&err, 403, "missing_scope", ErrorClass::OperatorMustAct);
    limited.transcript(&amb, &doc).await.unwrap();

    for reason in ["route_not_allowed", "organization_not_allowlisted"] {
        sim.disable_route(SimRoute::Transcript, reason);
        let err = expect_err(full.transcript(&amb, &doc).await);
        assert_reason(&err, 403, reason, ErrorClass::OperatorMustAct);
        sim.enable_route(SimRoute::Transcript);
    }

    sim.mark_unavailable(&ids[0], Unavailable::CrossOrganization);
    sim.mark_unavailable(&ids[1], Unavailable::DemoTraining);
    sim.remove(&ids[2]);
    let err = expect_err(full.encounter(&ids[0]).await);
    assert_reason(
        &err,
        403,
        "cross_organization_denied",
        ErrorClass::ResourceUnavailable,
    );
    let err = expect_err(full.encounter(&ids[1]).await);
    assert_reason(&err, 403, "demo_training_denied", ErrorClass::ResourceUnavailable);
    let err = expect_err(full.encounter(&ids[2]).await);
    assert_reason(&err, 404, "encounter_not_found", ErrorClass::ResourceUnavailable);
    let page = full.list_encounters(&q).await.unwrap();
    assert_eq!(page.total, 3, "unavailable and removed encounters leave the list");

    sim.push_fault(FaultRule::once(
        Some(SimRoute::List),
        Fault::status(503, "digest_key_unavailable"),
    ));
    let err = expect_err(full.list_encounters(&q).await);
    assert_reason(&err, 503, "digest_key_unavailable", ErrorClass::Retryable);
}

/// Sends a raw GET with the simulator's key and returns (status, reason_code, field).
async fn raw_get(env: &TestEnv, key: &str, path_and_query: &str) -> (u16, String, Option<String>) {
    let url = format!("{}/external/v1{path_and_query}", env.sim.base_url());
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    (
        status,
        body["reason_code"].as_str().unwrap_or_default().to_owned(),
        body["field"].as_str().map(str::to_owned),
    )
}

#[tokio::test]
async fn the_list_route_validates_its_parameters_as_documented() {
    let env = TestEnv::with_encounters(4, 3).await;
    let key = env.sim.api_key();
    let id = env.sim.snapshot()[0].encounter_id.clone();
    let cases: Vec<(String, u16, &str)> = vec![
        ("/encounters?limit=050".into(), 422, "invalid_limit"),
        ("/encounters?limit=0".into(), 422, "invalid_limit"),
        ("/encounters?limit=101".into(), 422, "invalid_limit"),
        ("/encounters?offset=10001".into(), 422, "invalid_offset"),
        ("/encounters?offset=-1".into(), 422, "invalid_offset"),
        ("/encounters?sort_order=up".into(), 422, "invalid_sort"),
        (
            "/encounters?start_at=2026-01-01T00:00:00".into(),
            422,
            "invalid_query",
        ),
        ("/encounters?end_at=2026-01-01".into(), 422, "invalid_query"),
        // A raw `+` decodes to a space: the client must percent-encode offsets.
        (
            "/encounters?start_at=2026-01-01T00:00:00+00:00".into(),
            422,
            "invalid_query",
        ),
        (
            "/encounters?start_at=2026-02-01T00:00:00Z&end_at=2026-01-01T00:00:00Z".into(),
            422,
            "invalid_query",
        ),
        ("/encounters?owners=me".into(), 400, "unsupported_filter"),
        (
            format!("/encounters/{id}?expand=documents"),
            400,
            "unsupported_filter",
        ),
    ];
    for (path, status, reason) in cases {
        let (got_status, got_reason, _) = raw_get(&env, &key, &path).await;
        assert_eq!((got_status, got_reason.as_str()), (status, reason), "{path}");
    }
    let (_, _, field) = raw_get(&env, &key, "/encounters?limit=050").await;
    assert_eq!(field.as_deref(), Some("limit"));
    let (status, _, _) = raw_get(
        &env,
        &key,
        "/encounters?start_at=2026-01-01T00:00:00%2B02:00&limit=100",
    )
    .await;
    assert_eq!(status, 200, "an encoded offset is accepted");

    // The scope check runs before query validation.
    env.sim
        .add_key("ch_sk_docs_only", &["encounters:read", "documents:read"]);
    let (status, reason, _) = raw_get(&env, "ch_sk_docs_only", "/encounters?limit=050").await;
    assert_eq!((status, reason.as_str()), (403, "missing_scope"));
}

#[tokio::test]
async fn bodies_over_the_size_cap_are_refused_and_errors_never_show_the_key() {
    let env = TestEnv::start(charthero_sim::SimOptions {
        large_transcript_every: 1,
        ..crate::support::sim_options(6, 0)
    })
    .await;
    let id = env.sim.insert(NewEncounter::at(
        OffsetDateTime::now_utc() - time::Duration::hours(1),
    ));
    let doc = env.sim.encounter(&id).unwrap().documents[0].document_id.clone();
    let mut raw = env.raw_config();
    raw.api.max_response_bytes = 256 * 1024;
    raw.limits.max_attempts = 1;
    let cfg = raw.validate().unwrap();
    let key = ApiKey::new(&env.sim.api_key()).unwrap();
    let c = Client::new(&cfg.api, &cfg.limits, &key).unwrap();
    let err = expect_err(c.transcript(&id, &doc).await);
    assert!(err.to_string().contains("api.max_response_bytes"), "{err}");
    assert_eq!(err.class(), ErrorClass::OperatorMustAct);

    // A 2 MB transcript passes under the default cap.
    let c = client(&env, &env.sim.api_key());
    let t = c.transcript(&id, &doc).await.unwrap();
    let bytes: usize = t.transcript.turns.iter().map(|t| t.text.len()).sum();
    assert!(bytes > 1_500_000, "{bytes}");

    // Neither errors nor Debug output carry the key.
    let canary = "ch_sk_canary_never_shown";
    let c = client(&env, canary);
    let err = expect_err(c.encounter(&id).await);
    let shown = format!("{err} {err:?} {c:?} {cfg:?}");
    assert!(!shown.contains("canary"), "{shown}");
    let offline = Client::new(&cfg.api, &cfg.limits, &ApiKey::new(canary).unwrap()).unwrap();
    env.sim.shutdown();
    let err = expect_err(offline.encounter(&id).await);
    assert!(!format!("{err} {err:?}").contains("canary"));
}
