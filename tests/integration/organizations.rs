//! Several organizations in one daemon: three clinics on one simulated host (different sizes,
//! one churning, one whose key is revoked mid-run) synced by the binary into one warehouse; keys
//! that read the wrong clinic refused before any write; a warehouse written by the previous
//! release (schema V4) upgraded in place.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use charthero_sim::{KeyState, ListRequest, NewEncounter, RateLimit, SimOptions, Simulator};
use charthero_sync::sync::CyclePlan;
use time::OffsetDateTime;
use time::macros::datetime;

use crate::support::{
    charthero_sync, compare, compare_content, compare_organization, reader, run, sim_options, text,
};

/// The budget every key gets in these tests, and the process's ceiling (lower than the three
/// keys together, so the ceiling binds).
const KEY_RPS: f64 = 60.0;
const KEY_BURST: u32 = 5;
const CEILING_RPS: f64 = 100.0;
const CEILING_BURST: u32 = 8;

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// One `[[organizations]]` entry.
struct OrgEntry<'a> {
    name: &'a str,
    organization_id: Option<&'a str>,
    api_key_file: Option<PathBuf>,
}

fn config_text(dir: &Path, base_url: &str, start_at: OffsetDateTime, orgs: &[OrgEntry<'_>]) -> PathBuf {
    let mut text = format!(
        "[api]\nbase_url = \"{base_url}\"\n\n[database]\npath = \"{}\"\n\n\
         [sync]\nstart_at = \"{}\"\nsettle_lag = \"0s\"\n\n\
         [limits]\nrequests_per_second = {CEILING_RPS:.1}\nburst = {CEILING_BURST}\nmax_in_flight = 6\n",
        dir.join("warehouse.db").display(),
        charthero_sync::timefmt::format_utc(start_at),
    );
    for o in orgs {
        text.push_str(&format!(
            "\n[[organizations]]\nname = \"{}\"\nrequests_per_second = {KEY_RPS:.1}\nburst = {KEY_BURST}\n\
             max_in_flight = 3\n",
            o.name
        ));
        if let Some(id) = o.organization_id {
            text.push_str(&format!("organization_id = \"{id}\"\n"));
        }
        if let Some(f) = &o.api_key_file {
            text.push_str(&format!("api_key_file = \"{}\"\n", f.display()));
        }
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The configuration of two organizations, alpha and beta, with their keys in the files given
/// and no `organization_id` (each learnt from its first page).
fn alpha_and_beta(
    dir: &Path,
    base_url: &str,
    start_at: OffsetDateTime,
    alpha_key: &Path,
    beta_key: &Path,
) -> PathBuf {
    config_text(
        dir,
        base_url,
        start_at,
        &[
            OrgEntry {
                name: "alpha",
                organization_id: None,
                api_key_file: Some(alpha_key.to_owned()),
            },
            OrgEntry {
                name: "beta",
                organization_id: None,
                api_key_file: Some(beta_key.to_owned()),
            },
        ],
    )
}

/// [`alpha_and_beta`] with alpha's and beta's keys written to files beside it.
fn keyed_alpha_and_beta(
    dir: &Path,
    base_url: &str,
    start_at: OffsetDateTime,
    alpha_key: &str,
    beta_key: &str,
) -> PathBuf {
    let (a, b) = (dir.join("a.key"), dir.join("b.key"));
    write_private(&a, alpha_key);
    write_private(&b, beta_key);
    alpha_and_beta(dir, base_url, start_at, &a, &b)
}

/// `charthero-sync --config <config> <args>`.
fn with_config(config: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = charthero_sync();
    cmd.args(["--config", config.to_str().unwrap()]).args(args);
    cmd
}

fn org_options(seed: u64, encounters: usize, organization_id: &str) -> SimOptions {
    SimOptions {
        organization_id: organization_id.to_owned(),
        ..sim_options(seed, encounters)
    }
}

/// One simulator host serving a clinic per `(seed, encounters, organization_id)`.
async fn clinics(clinics: &[(u64, usize, &str)]) -> Vec<Simulator> {
    Simulator::start_organizations(
        clinics
            .iter()
            .map(|&(seed, encounters, id)| org_options(seed, encounters, id))
            .collect(),
    )
    .await
    .unwrap()
}

fn watch_budgets(sims: &[Simulator]) {
    for sim in sims {
        sim.set_rate_limit(Some(RateLimit {
            requests_per_second: KEY_RPS,
            burst: KEY_BURST,
            enforce: false,
        }));
    }
    sims[0].set_host_rate_limit(Some(RateLimit {
        requests_per_second: CEILING_RPS,
        burst: CEILING_BURST,
        enforce: false,
    }));
}

/// The tables analysts join, each with its `organization_id`.
const DATA_TABLES: [&str; 7] = [
    "encounters",
    "patients",
    "documents",
    "transcripts",
    "transcript_turns",
    "recordings",
    "encounter_history",
];

/// No row anywhere carries another organization's id: every data row names one of `ids`, and
/// agrees with the row it belongs to.
fn assert_rows_stay_in_their_organization(db: &Path, ids: &[String]) {
    let conn = reader(db);
    for table in DATA_TABLES {
        let found: Vec<Option<String>> = conn
            .prepare(&format!("SELECT DISTINCT organization_id FROM {table}"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for id in found {
            assert!(
                id.as_ref().is_some_and(|id| ids.contains(id)),
                "{table} holds a row of organization {id:?}"
            );
        }
    }
    let mismatched: i64 = conn
        .query_row(
            "SELECT (SELECT count(*) FROM documents d JOIN encounters e USING (encounter_id)
                      WHERE d.organization_id IS NOT e.organization_id)
                  + (SELECT count(*) FROM transcripts t JOIN documents d USING (document_id)
                      WHERE t.organization_id IS NOT d.organization_id)
                  + (SELECT count(*) FROM transcript_turns tt JOIN transcripts t USING (document_id)
                      WHERE tt.organization_id IS NOT t.organization_id)
                  + (SELECT count(*) FROM recordings r JOIN documents d USING (document_id)
                      WHERE r.organization_id IS NOT d.organization_id)
                  + (SELECT count(*) FROM encounter_history h JOIN encounters e USING (encounter_id)
                      WHERE h.organization_id IS NOT e.organization_id)
                  + (SELECT count(*) FROM encounters e JOIN patients p USING (patient_id)
                      WHERE p.organization_id IS NOT e.organization_id)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        mismatched, 0,
        "rows whose organization differs from their parent's"
    );
}

fn status_json(config: &Path) -> serde_json::Value {
    let mut cmd = charthero_sync();
    cmd.args(["--config", config.to_str().unwrap(), "status", "--json"]);
    let out = std::process::Command::output(&mut cmd).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn organization<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["organizations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no organization {name} in {status:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clinics_one_churning_one_revoked_end_equal_isolated_and_within_every_budget() {
    let sims = clinics(&[
        (151, 300, "org_north"),
        (152, 150, "org_south"),
        (153, 200, "org_east"),
    ])
    .await;
    let [north, south, east] = [&sims[0], &sims[1], &sims[2]];
    watch_budgets(&sims);
    let dir = tempfile::tempdir().unwrap();
    // One key from each source: a file, the organization's environment variable, a credential.
    let north_key = dir.path().join("north.key");
    write_private(&north_key, &north.api_key());
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    write_private(&credentials.join("charthero-api-key.east"), &east.api_key());
    let start_at = OffsetDateTime::now_utc() - time::Duration::days(61);
    let config = config_text(
        dir.path(),
        &north.base_url(),
        start_at,
        &[
            OrgEntry {
                name: "north",
                organization_id: Some("org_north"),
                api_key_file: Some(north_key),
            },
            // No organization_id: learnt from its first page and held to.
            OrgEntry {
                name: "south",
                organization_id: None,
                api_key_file: None,
            },
            OrgEntry {
                name: "east",
                organization_id: Some("org_east"),
                api_key_file: None,
            },
        ],
    );
    let sync = |extra: &[&str]| {
        let mut cmd = charthero_sync();
        cmd.args(["--config", config.to_str().unwrap(), "sync"])
            .args(extra)
            .env("CHARTHERO_API_KEY_SOUTH", south.api_key())
            .env("CREDENTIALS_DIRECTORY", &credentials);
        cmd
    };

    // South churns on every list request (inserts now and in time already paged, removals
    // behind the cursor, status changes); east's key is revoked after its second list request.
    let churned = Arc::new(Mutex::new(0u32));
    let count = churned.clone();
    south.set_list_hook(Some(Arc::new(move |sim: &Simulator, req: &ListRequest| {
        let snapshot = sim.snapshot();
        let now = OffsetDateTime::now_utc();
        let cursor = req.start_at.unwrap_or(now);
        let mut n = count.lock().unwrap();
        *n += 1;
        sim.insert(NewEncounter::at(now - time::Duration::seconds(5)));
        if let Some(behind) = snapshot.iter().filter(|e| e.created_at < cursor).nth(*n as usize) {
            sim.remove(&behind.encounter_id);
            sim.insert(NewEncounter::at(
                behind.created_at + time::Duration::milliseconds(1),
            ));
        }
        if let Some(e) = snapshot.get(*n as usize * 7 % snapshot.len().max(1)) {
            sim.update_status(&e.encounter_id, "signed");
        }
    })));
    let east_key = east.api_key();
    east.set_list_hook(Some(Arc::new(move |sim: &Simulator, req: &ListRequest| {
        if req.seq == 1 {
            sim.set_key_state(&east_key, KeyState::Revoked);
        }
    })));
    let mut first = sync(&[]);
    first.env("RUST_LOG", "debug");
    let out = run(first).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("east"), "{}", text(&out));
    for key in [north.api_key(), south.api_key(), east.api_key()] {
        assert!(!text(&out).contains(&key), "a key reached the output");
    }
    south.set_list_hook(None);
    east.set_list_hook(None);
    assert!(*churned.lock().unwrap() >= 2, "the churn barely ran");

    // A reconcile of all history: the healthy two end equal; east is still refused.
    let from = charthero_sync::timefmt::format_utc(start_at);
    let out = run(sync(&["--backfill-from", &from])).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let db = dir.path().join("warehouse.db");
    for sim in [north, south] {
        compare_organization(sim, &db).assert_empty();
        let bad = compare_content(sim, &db);
        assert!(
            bad.is_empty(),
            "{} documents differ, e.g. {:?}",
            bad.len(),
            bad.first()
        );
    }

    let status = status_json(&config);
    let e = organization(&status, "east");
    assert_eq!(e["state"], "stopped", "{e:#}");
    assert_eq!(e["reason_code"], "revoked_key", "{e:#}");
    for (name, id) in [("north", "org_north"), ("south", "org_south")] {
        let o = organization(&status, name);
        assert_eq!(o["state"], "ok", "{o:#}");
        assert_eq!(o["organization_id"], id, "{o:#}");
        assert!(o["complete_through"].is_string(), "{o:#}");
    }
    assert_eq!(
        organization(&status, "north")["encounters"].as_u64(),
        Some(north.visible_count() as u64)
    );

    let ids = ["org_north", "org_south", "org_east"].map(String::from);
    assert_rows_stay_in_their_organization(&db, &ids);
    // Every stored encounter is its own clinic's (east's few rows from before the revocation
    // included).
    let conn = reader(&db);
    let stored: Vec<(String, String)> = conn
        .prepare("SELECT encounter_id, organization_id FROM encounters")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (encounter_id, organization_id) in stored {
        let owner = sims
            .iter()
            .find(|s| s.organization_id() == organization_id)
            .unwrap();
        assert!(
            owner.encounter(&encounter_id).is_some(),
            "{encounter_id} stored as {organization_id} but not that clinic's"
        );
    }

    // Server-counted: no key over its budget, the host never over the process's ceiling.
    for (name, sim) in [("north", north), ("south", south), ("east", east)] {
        let stats = sim.stats();
        assert_eq!(
            stats.rate_violations, 0,
            "{name}'s key exceeded its budget: {stats:?}"
        );
    }
    let (requests, violations) = north.host_stats();
    assert!(requests > 500, "only {requests} requests reached the host");
    assert_eq!(
        violations, 0,
        "the process exceeded its ceiling over {requests} requests"
    );
    // The revoked key stopped cleanly: nothing but a handful of refusals after the revocation.
    assert!(east.stats().status(401) >= 1);
    assert!(east.stats().status(401) <= 8, "{:?}", east.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_clinic_is_refused_by_check_and_by_sync_before_any_write() {
    let sims = clinics(&[(161, 80, "org_real"), (162, 60, "org_next_door")]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("clinic.key");
    write_private(&key, &sims[0].api_key());
    let start_at = OffsetDateTime::now_utc() - time::Duration::days(61);
    let config = config_text(
        dir.path(),
        &sims[0].base_url(),
        start_at,
        &[OrgEntry {
            name: "clinic",
            organization_id: Some("org_expected"),
            api_key_file: Some(key.clone()),
        }],
    );
    let cmd = |args: &[&str]| {
        let mut cmd = charthero_sync();
        cmd.args(["--config", config.to_str().unwrap()]).args(args);
        cmd
    };
    let out = run(cmd(&["check"])).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("organization_id  FAILED") && text(&out).contains("org_real"),
        "{}",
        text(&out)
    );
    let out = run(cmd(&["sync"])).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("org_expected"), "{}", text(&out));
    let db = dir.path().join("warehouse.db");
    let conn = reader(&db);
    for table in DATA_TABLES {
        let n: i64 = conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "{table} got rows of the wrong clinic");
    }
    let status = status_json(&config);
    let c = organization(&status, "clinic");
    assert_eq!(
        (c["state"].as_str(), c["reason_code"].as_str()),
        (Some("stopped"), Some("organization_mismatch")),
        "{c:#}"
    );

    // Without a configured organization_id, the first sync records each name's clinic; keys
    // swapped between the two names afterwards are refused, and nothing more is written.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
    write_private(&a, &sims[0].api_key());
    write_private(&b, &sims[1].api_key());
    let entries = |a: &Path, b: &Path| alpha_and_beta(dir.path(), &sims[0].base_url(), start_at, a, b);
    let config = entries(&a, &b);
    let mut sync = charthero_sync();
    sync.args(["--config", config.to_str().unwrap(), "sync"]);
    let out = run(sync).await;
    assert!(out.status.success(), "{}", text(&out));
    let db = dir.path().join("warehouse.db");
    let before: i64 = reader(&db)
        .query_row("SELECT count(*) FROM encounters", [], |r| r.get(0))
        .unwrap();
    let config = entries(&b, &a);
    let mut sync = charthero_sync();
    sync.args(["--config", config.to_str().unwrap(), "sync"]);
    // Even a cycle whose windows list nothing confirms the key's clinic before it writes.
    let out = run(sync).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("refused before anything was written") && text(&out).contains("org_next_door"),
        "{}",
        text(&out)
    );
    let after: i64 = reader(&db)
        .query_row("SELECT count(*) FROM encounters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(before, after);
    assert_rows_stay_in_their_organization(&db, &["org_real".into(), "org_next_door".into()]);
    // `check` refuses what the sync refuses: the warehouse holds the other clinic for each name.
    let mut check = charthero_sync();
    check.args(["--config", config.to_str().unwrap(), "check"]);
    let out = run(check).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("but this warehouse holds organization_id \"org_real\" for alpha: refused"),
        "{}",
        text(&out)
    );

    // Two names given keys of one clinic: the first sync would claim it for one and refuse the
    // other, and `check` says so before any sync.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.key");
    write_private(&a, &sims[0].api_key());
    let config = alpha_and_beta(dir.path(), &sims[0].base_url(), start_at, &a, &a);
    let mut check = charthero_sync();
    check.args(["--config", config.to_str().unwrap(), "check"]);
    let out = run(check).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("organization_id  ok      org_real (not configured")
            && text(&out).contains("but organization alpha (above) reads that clinic: refused"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinic_whose_ids_another_clinic_holds_fails_naming_one_and_never_takes_its_rows() {
    // Two clinics whose server mints IDs per clinic: the same seed gives both the same
    // encounter, document and patient IDs (and the same patients' names).
    let sims = clinics(&[(171, 120, "org_first"), (171, 90, "org_second")]).await;
    // The same seed gives the same default key too: the second clinic's key is its own.
    let second_key = "ch_sk_sim_second_clinic_key";
    sims[1].add_key(
        second_key,
        &[
            "encounters:read",
            "patients:read",
            "documents:read",
            "recordings:read",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let start_at = OffsetDateTime::now_utc() - time::Duration::days(61);
    let config = keyed_alpha_and_beta(
        dir.path(),
        &sims[0].base_url(),
        start_at,
        &sims[0].api_key(),
        second_key,
    );
    let cmd = |args: &[&str]| with_config(&config, args);
    let out = run(cmd(&["sync", "--organization", "alpha"])).await;
    assert!(out.status.success(), "{}", text(&out));
    let db = dir.path().join("warehouse.db");
    compare_organization(&sims[0], &db).assert_empty();
    assert!(compare_content(&sims[0], &db).is_empty());
    let data_counts = || -> Vec<i64> {
        let conn = reader(&db);
        DATA_TABLES
            .iter()
            .map(|t| {
                conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
                    .unwrap()
            })
            .collect()
    };
    let alpha_rows = data_counts();

    let out = run(cmd(&["sync"])).await;
    assert_eq!(
        out.status.code(),
        Some(i32::from(charthero_sync::exit::ID_COLLISION)),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("is stored for organization alpha, another clinic of this warehouse")
            && text(&out).contains("charthero-sync@.service"),
        "{}",
        text(&out)
    );
    // Nothing of beta was written, and alpha's rows are as alpha's clinic has them.
    compare_organization(&sims[0], &db).assert_empty();
    assert!(compare_content(&sims[0], &db).is_empty());
    assert_rows_stay_in_their_organization(&db, &["org_first".into()]);
    assert_eq!(data_counts(), alpha_rows);
    let status = status_json(&config);
    assert_eq!(organization(&status, "alpha")["state"], "ok");
    let beta = organization(&status, "beta");
    assert_eq!(
        (beta["state"].as_str(), beta["reason_code"].as_str()),
        (Some("stopped"), Some("id_collision")),
        "{beta:#}"
    );
    let reason: String = reader(&db)
        .query_row(
            "SELECT reason_code FROM sync_runs WHERE organization = 'beta' ORDER BY run_id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reason, "id_collision");
    // Every page of beta collided, so beta recorded no window and holds no watermark.
    let windows: i64 = reader(&db)
        .query_row(
            "SELECT count(*) FROM sync_windows WHERE organization = 'beta'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        (windows, &beta["complete_through"]),
        (0, &serde_json::Value::Null)
    );

    // The daemon, on a schedule of every second: beta stops after its one failed cycle (every
    // later one would spend requests to reach the same page), alpha keeps its schedule.
    let runs = |org: &str| -> i64 {
        reader(&db)
            .query_row(
                "SELECT count(*) FROM sync_runs WHERE organization = ?1",
                [org],
                |r| r.get(0),
            )
            .unwrap()
    };
    let (alpha_runs, beta_runs) = (runs("alpha"), runs("beta"));
    let every_second = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[sync]\n", "[sync]\nschedule = \"* * * * * *\"\n");
    std::fs::write(&config, every_second).unwrap();
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    // Logging warnings only (RUST_LOG=warn), whose lines still name their organization.
    let mut daemon = cmd(&["run"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while runs("alpha") < alpha_runs + 3 {
        assert!(std::time::Instant::now() < deadline, "alpha stopped syncing");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || daemon.wait().unwrap())
        .await
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(runs("beta"), beta_runs + 1, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("stopping") && l.contains("id_collision") && l.contains("beta")),
        "{log}"
    );
    // A daemon serving beta alone ends with it, with an exit code systemd does not restart on
    // (restarting would read up to the same page again).
    let out = run(cmd(&["run", "--organization", "beta"])).await;
    let code = charthero_sync::exit::ID_COLLISION;
    assert_eq!(out.status.code(), Some(i32::from(code)), "{}", text(&out));
    assert_eq!(runs("beta"), beta_runs + 2);
    for unit in ["charthero-sync.service", "charthero-sync@.service"] {
        let prevented = crate::support::restart_prevented(unit);
        assert!(prevented.contains(&code.to_string()), "{unit}: {prevented:?}");
    }
}

/// The data set `tests/fixtures/v4-warehouse.db` was written from, by the previous release's
/// own sync (`tests/fixtures/v4fixture.rs.txt` is the program, run against that release).
fn fixture_options() -> SimOptions {
    SimOptions {
        seed: 606,
        encounters: 200,
        turns_per_transcript: (4, 12),
        start: datetime!(2026-02-01 00:00 UTC),
        end: datetime!(2026-03-01 00:00 UTC),
        ..SimOptions::default()
    }
}

fn table_counts(conn: &rusqlite::Connection) -> Vec<(String, i64)> {
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
               AND name NOT GLOB '*_fts*' AND name NOT IN ('refinery_schema_history', 'sync_state')
             ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    tables
        .into_iter()
        .map(|t| {
            let n = conn
                .query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
                .unwrap();
            (t, n)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_of_the_previous_release_upgrades_in_place_and_the_next_cycle_lists_only_its_horizon() {
    let sim = Simulator::start(fixture_options()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("warehouse.db");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v4-warehouse.db"),
        &db,
    )
    .unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (before, watermark) = {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let version: i64 = conn
            .query_row("SELECT max(version) FROM refinery_schema_history", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(version, 4, "the fixture is a V4 warehouse");
        // That release gave up on a note after one "not found": unavailable, without its text.
        let given_up = conn
            .execute(
                "UPDATE documents SET detail_state = 'unavailable', content_format = NULL, content_text = NULL
                 WHERE document_id = (SELECT min(document_id) FROM documents WHERE schema_type = 'document')",
                [],
            )
            .unwrap();
        assert_eq!(given_up, 1);
        let watermark: String = conn
            .query_row(
                "SELECT value FROM sync_state WHERE name = 'complete_through'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (table_counts(&conn), watermark)
    };

    let mut raw = charthero_sync::config::RawConfig::default();
    raw.api.base_url = sim.base_url();
    raw.api.api_key_file = None;
    raw.database.path = Some(db.clone());
    raw.sync.start_at = "2026-01-01T00:00:00Z".into();
    raw.sync.settle_lag = "0s".into();
    raw.limits.requests_per_second = 5_000.0;
    raw.limits.burst = 200;
    let config = raw.validate().unwrap();
    let key = charthero_sync::secret::ApiKey::new(&sim.api_key()).unwrap();

    // Opening migrates: every row kept, every data row in the clinic, the watermark moved.
    {
        let conn =
            charthero_sync::store::sqlite::open_writer(&db, std::time::Duration::from_secs(5)).unwrap();
        let after = table_counts(&conn);
        for (table, n) in &before {
            let kept = after.iter().find(|(t, _)| t == table).map(|(_, n)| *n);
            assert_eq!(kept, Some(*n), "{table} rows after the upgrade");
        }
        for table in DATA_TABLES {
            let orphans: i64 = conn
                .query_row(
                    &format!("SELECT count(*) FROM {table} WHERE organization_id IS NOT 'org_sim'"),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(orphans, 0, "{table} rows without the clinic's organization_id");
        }
        let (organization, moved): (String, String) = conn
            .query_row(
                "SELECT organization, value FROM organization_state WHERE name = 'complete_through'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        // The same instant (a later migration may rewrite its text to another width).
        let instant = |t: &str| charthero_sync::timefmt::parse_rfc3339(t).unwrap();
        assert_eq!(organization, "default");
        assert_eq!(instant(&moved), instant(&watermark));
        let runs: i64 = conn
            .query_row(
                "SELECT count(*) FROM sync_runs WHERE organization <> 'default'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(runs, 0);
        // V10 asks for it once more, at once.
        let asked_again: i64 = conn
            .query_row(
                "SELECT count(*) FROM documents WHERE detail_state = 'not_ready' AND detail_next_at_ns = 0",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(asked_again, 1);
    }

    sim.reset_stats();
    let cancel = tokio_util::sync::CancellationToken::new();
    let report = charthero_sync::sync_once(&config, &key, "test", CyclePlan::full(None, false), &cancel)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Nothing was created since the watermark: one request lists the horizon, no history again.
    assert_eq!(report.counts.list_requests, 1, "{:?}", report.counts);
    assert_eq!(sim.stats().route(charthero_sim::Route::List), 1);
    assert_eq!(report.counts.encounters_new, 0);
    assert_eq!(report.counts.documents_fetched, 1, "{:?}", report.counts);
    compare(&sim, &db).assert_empty();
    let bad = compare_content(&sim, &db);
    assert!(
        bad.is_empty(),
        "{} documents differ, e.g. {:?}",
        bad.len(),
        bad.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_daemon_a_refused_key_stops_its_organization_only() {
    let sims = clinics(&[(171, 120, "org_live"), (172, 50, "org_gone")]).await;
    sims[1].set_key_state(&sims[1].api_key(), KeyState::Revoked);
    let dir = tempfile::tempdir().unwrap();
    let mut raw = charthero_sync::config::RawConfig::default();
    raw.api.base_url = sims[0].base_url();
    raw.api.api_key_file = None;
    raw.database.path = Some(dir.path().join("warehouse.db"));
    raw.sync.start_at =
        charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc() - time::Duration::days(61));
    raw.sync.settle_lag = "0s".into();
    raw.sync.schedule = "* * * * * *".into();
    raw.limits.requests_per_second = 2_000.0;
    raw.limits.burst = 100;
    for name in ["live", "gone"] {
        raw.organizations.push(charthero_sync::config::RawOrganization {
            name: name.into(),
            ..Default::default()
        });
    }
    let config = raw.validate().unwrap();
    let keys = config
        .organizations
        .iter()
        .cloned()
        .zip([&sims[0], &sims[1]])
        .map(|(org, sim)| (org, charthero_sync::secret::ApiKey::new(&sim.api_key()).unwrap()))
        .collect();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let daemon = {
        let (config, shutdown) = (config.clone(), shutdown.clone());
        tokio::spawn(async move {
            charthero_sync::daemon::serve_organizations(
                &config,
                keys,
                Vec::new(),
                None,
                &charthero_sync::daemon::notify::Notifier::silent(),
                &shutdown,
            )
            .await
        })
    };
    // The live organization keeps its schedule after the other stopped: new encounters arrive.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let late = sims[0].insert(NewEncounter::at(OffsetDateTime::now_utc()));
    let db = config
        .database
        .sqlite_path()
        .expect("a SQLite warehouse")
        .to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let seen: i64 = reader(&db)
            .query_row(
                "SELECT count(*) FROM encounters WHERE encounter_id = ?1",
                [&late],
                |r| r.get(0),
            )
            .unwrap();
        if seen == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the live organization stopped syncing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        !daemon.is_finished(),
        "the daemon ended with one organization still healthy"
    );
    shutdown.cancel();
    daemon.await.unwrap().expect("a clean shutdown");
    compare_organization(&sims[0], &db).assert_empty();
    let conn = reader(&db);
    let status =
        charthero_sync::status::read(&conn, OffsetDateTime::now_utc(), &["live".into(), "gone".into()])
            .unwrap();
    let gone = status.organizations.iter().find(|o| o.name == "gone").unwrap();
    assert_eq!(
        (gone.state.as_str(), gone.reason_code.as_deref()),
        ("stopped", Some("revoked_key"))
    );
    // One refused request, then nothing more with that key.
    assert_eq!(sims[1].stats().status(401), 1, "{:?}", sims[1].stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_organization_option_selects_clinics_and_an_unknown_name_is_a_usage_error() {
    let sims = clinics(&[(181, 40, "org_alpha"), (182, 30, "org_beta")]).await;
    let dir = tempfile::tempdir().unwrap();
    let start_at = OffsetDateTime::now_utc() - time::Duration::days(61);
    let config = keyed_alpha_and_beta(
        dir.path(),
        &sims[0].base_url(),
        start_at,
        &sims[0].api_key(),
        &sims[1].api_key(),
    );
    let cmd = |args: &[&str]| with_config(&config, args);
    let out = run(cmd(&["sync", "--organization", "nope"])).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("alpha, beta"), "{}", text(&out));

    let out = run(cmd(&["sync", "--organization", "alpha"])).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sims[1].stats().requests, 0, "beta was not selected");
    compare_organization(&sims[0], &dir.path().join("warehouse.db")).assert_empty();

    let out = run(cmd(&[
        "backfill",
        "--from",
        &charthero_sync::timefmt::format_utc(start_at),
        "--organization",
        "beta",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("of organization beta"), "{}", text(&out));
    let status = status_json(&config);
    assert_eq!(organization(&status, "alpha")["state"], "ok");
    assert_eq!(organization(&status, "beta")["state"], "never_synced");
    assert_eq!(organization(&status, "beta")["backfills_pending"], 1);

    let out = run(cmd(&["check"])).await;
    assert!(out.status.success(), "{}", text(&out));
    for line in [
        "organization alpha",
        "organization beta",
        "org_alpha (as this warehouse records)",
        "org_beta (not configured",
    ] {
        assert!(text(&out).contains(line), "{line}: {}", text(&out));
    }
    let mut status = cmd(&["status"]);
    let out = std::process::Command::output(&mut status).unwrap();
    assert!(
        text(&out).contains("organization beta (clinic not known yet): never_synced"),
        "{}",
        text(&out)
    );

    // The plan asks each clinic's own key for its own range.
    let out = run(cmd(&["plan", "--json"])).await;
    assert!(out.status.success(), "{}", text(&out));
    let plans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = plans
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["organization"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(plans[0]["encounters"], 40);
    assert_eq!(plans[1]["encounters"], 30);
    let out = run(cmd(&["plan", "--organization", "beta"])).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("organization     beta"), "{}", text(&out));
    assert!(!text(&out).contains("alpha"), "{}", text(&out));

    // ChartHero paused alpha's key (a kept `Retry-After`): `check` and `plan` send alpha nothing
    // and say so, and still probe and estimate beta; both exit 1.
    let until = OffsetDateTime::now_utc() + time::Duration::minutes(30);
    rusqlite::Connection::open(dir.path().join("warehouse.db"))
        .unwrap()
        .execute(
            "INSERT INTO organization_state (organization, name, value) VALUES ('alpha', 'paused_until', ?1)",
            [charthero_sync::timefmt::format_stored(until)],
        )
        .unwrap();
    let alpha_requests = sims[0].stats().requests;
    let out = run(cmd(&["check"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for line in [
        "api              paused  ChartHero asked this key to wait (Retry-After) until",
        "org_beta (not configured",
        "alpha: ChartHero asked the key to wait until",
    ] {
        assert!(text(&out).contains(line), "{line}: {}", text(&out));
    }
    let out = run(cmd(&["plan", "--json"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let plans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plans.as_array().map(Vec::len), Some(1), "{plans}");
    assert_eq!(plans[0]["organization"], "beta");
    assert!(
        text(&out).contains(
            "cannot estimate the backfill of alpha: GET /encounters: ChartHero asked for no requests until"
        ),
        "{}",
        text(&out)
    );
    assert_eq!(sims[0].stats().requests, alpha_requests, "alpha's key was paused");

    // A backfill of every organization queues one per organization, and the note names each.
    let out = run(cmd(&[
        "backfill",
        "--from",
        &charthero_sync::timefmt::format_utc(start_at),
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out));
    for line in [
        "queued backfill 2 of organization alpha",
        "queued backfill 3 of organization beta",
        "will pick backfills 2, 3 up",
    ] {
        assert!(text(&out).contains(line), "{line}: {}", text(&out));
    }
}
