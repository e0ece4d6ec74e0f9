//! What the Debian package takes from the binary: `--version` with the git revision, and the
//! hidden `generate` command's man pages and completions (packaging/build-deb installs them;
//! packaging/test-deb checks the installed package end to end, as root). Also: the files the
//! package and the runbook name agree with the units in `systemd/`.

use std::process::Command;

use crate::support::{run, text};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_charthero-sync"))
}

#[tokio::test]
async fn version_names_the_cargo_version_and_a_git_revision() {
    let out = run({
        let mut c = bin();
        c.arg("--version");
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let rest = line
        .strip_prefix(concat!("charthero-sync ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("--version printed {line:?}"));
    assert!(
        rest == "unknown" || (rest.len() >= 7 && rest.chars().all(|c| c.is_ascii_hexdigit())),
        "the revision in {line:?}"
    );
}

#[tokio::test]
async fn generate_writes_every_man_page_and_completion_and_stays_out_of_help() {
    let dir = tempfile::tempdir().unwrap();
    let out = run({
        let mut c = bin();
        c.args(["generate", "--date", "2026-01-02", "--dir"])
            .arg(dir.path());
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for command in [
        "run", "sync", "backfill", "status", "check", "plan", "migrate", "purge", "reindex", "demo",
        "simulate",
    ] {
        assert!(
            names.contains(&format!("charthero-sync-{command}.1")),
            "no page for {command}: {names:?}"
        );
    }
    for name in [
        "charthero-sync.1",
        "charthero-sync.bash",
        "_charthero-sync",
        "charthero-sync.fish",
    ] {
        assert!(names.contains(&name.to_owned()), "no {name}: {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.contains("generate")),
        "a page for the hidden command: {names:?}"
    );
    let page = std::fs::read_to_string(dir.path().join("charthero-sync.1")).unwrap();
    assert!(
        page.contains("2026\\-01\\-02") || page.contains("2026-01-02"),
        "undated page"
    );

    let help = run({
        let mut c = bin();
        c.arg("--help");
        c
    })
    .await;
    assert!(!text(&help).contains("generate"), "{}", text(&help));
}

#[test]
fn both_units_run_the_packaged_binary_with_the_shipped_paths() {
    let unit = |name: &str| {
        std::fs::read_to_string(format!("{}/systemd/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let main = unit("charthero-sync.service");
    let template = unit("charthero-sync@.service");
    assert!(
        main.contains("\nExecStart=/usr/bin/charthero-sync --config /etc/charthero-sync/config.toml run\n")
    );
    assert!(main.contains("\nLoadCredential=charthero-api-key:/etc/charthero-sync/api-key\n"));
    assert!(
        template.contains("\nExecStart=/usr/bin/charthero-sync --config /etc/charthero-sync/%i.toml run\n")
    );
    assert!(template.contains("\nLoadCredential=charthero-api-key:/etc/charthero-sync/%i.api-key\n"));
    assert!(template.contains("\nStateDirectory=charthero-sync-%i\n"));
    assert!(template.contains("\nGroup=charthero-readers-%i\n"));
    // The template keeps every hardening line of the main unit.
    let hardening = |u: &str| u[u.find("# Hardening.").unwrap()..].to_owned();
    assert_eq!(hardening(&main), hardening(&template));
}
