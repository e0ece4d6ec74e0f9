//! The man pages and shell completions, generated from the binary's own clap definition so that
//! they can never disagree with `--help`: `charthero-sync(1)` (with the exit codes, environment
//! and files an operator needs), one page per command (`charthero-sync-sync(1)`, …) and the
//! bash, zsh and fish completions. The hidden `generate` command calls [`write_all`];
//! `packaging/build-deb` installs what it writes.
//!
//! It owns only the rendering: which commands and flags exist is `main.rs`'s clap definition,
//! and where the files go on a system is the package's business.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::exit;

/// The completion files, named as each shell looks them up in its vendor directory
/// (`/usr/share/bash-completion/completions/charthero-sync`,
/// `/usr/share/zsh/vendor-completions/_charthero-sync`,
/// `/usr/share/fish/vendor_completions.d/charthero-sync.fish`).
const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "charthero-sync.bash"),
    (Shell::Zsh, "_charthero-sync"),
    (Shell::Fish, "charthero-sync.fish"),
];

/// The exit codes, as the README documents them.
const EXIT_STATUS: [(u8, &str); 7] = [
    (exit::OK, "Success (for run: a clean shutdown)."),
    (
        exit::CYCLE_FAILED,
        "The sync cycle failed, was interrupted or left work undone (a full disk included); for \
         check: a route the configuration needs does not work.",
    ),
    (
        exit::USAGE,
        "Bad usage or bad configuration: a value out of range, a missing or unsafe API key, a \
         database.path whose directory is missing or not writable. The message names the key.",
    ),
    (
        exit::AUTH_REFUSED,
        "ChartHero refused the API key (HTTP 401), or a key reads another clinic than the one \
         configured or recorded for it; the log names the reason_code.",
    ),
    (
        exit::LOCKED,
        "Another process holds the warehouse's writer lock; the message names it.",
    ),
    (
        exit::STORE_CORRUPT,
        "The warehouse is corrupt or not a SQLite database; nothing writes it until an operator \
         restores or rebuilds it.",
    ),
    (
        exit::ID_COLLISION,
        "A clinic lists IDs the warehouse stores for another clinic (id_collision; for run: once \
         every organization it serves has stopped); such clinics need warehouses of their own.",
    ),
];

const ENVIRONMENT: [(&str, &str); 5] = [
    (
        "CHARTHERO_SYNC_CONFIG",
        "The configuration file, when --config is not given.",
    ),
    (
        "CHARTHERO_API_KEY",
        "The API key, when api_key_file does not exist or this user may not read it.",
    ),
    (
        "CREDENTIALS_DIRECTORY",
        "Set by systemd's LoadCredential=: the key is read from its charthero-api-key file last.",
    ),
    (
        "RUST_LOG",
        "Filters the log (e.g. info, charthero_sync=debug). Logs go to stderr.",
    ),
    ("CHARTHERO_LOG_FORMAT", "text (the default), journald or json."),
];

const FILES: [(&str, &str); 6] = [
    (
        "/etc/charthero-sync/config.toml",
        "The configuration of charthero-sync.service (a conffile: upgrades keep your edits).",
    ),
    (
        "/etc/charthero-sync/api-key",
        "The API key, root-only (chmod 600); the service receives it as a systemd credential.",
    ),
    (
        "/etc/charthero-sync/INSTANCE.toml, /etc/charthero-sync/INSTANCE.api-key",
        "The configuration and key of the template instance charthero-sync@INSTANCE.service.",
    ),
    (
        "/var/lib/charthero-sync/warehouse.db",
        "The warehouse (PHI), with its -wal and -shm files and the writer lock warehouse.db.lock; \
         readable by the charthero-readers group. Removing the package never deletes it.",
    ),
    (
        "/usr/share/doc/charthero-sync/operations.md",
        "The runbook: install, key, check, enable, status, backfill, upgrade, uninstall.",
    ),
    (
        "/usr/share/doc/charthero-sync/config.example.toml",
        "Every configuration key with its default and range.",
    ),
];

/// The visible commands, with their man page names (`charthero-sync-sync`, …).
fn visible_subcommands(cmd: &Command) -> Vec<Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .cloned()
        .collect()
}

/// `cmd` (not yet built) without its hidden commands: the completion generators would offer them
/// otherwise.
fn without_hidden_commands(cmd: &Command) -> Command {
    let mut visible = Command::new(cmd.get_name().to_owned())
        .args(cmd.get_arguments().cloned())
        .subcommands(visible_subcommands(cmd))
        .subcommand_required(cmd.is_subcommand_required_set());
    if let Some(version) = cmd.get_version() {
        visible = visible.version(version.to_owned());
    }
    if let Some(about) = cmd.get_about() {
        visible = visible.about(about.clone());
    }
    visible
}

/// Writes `charthero-sync.1`, one `charthero-sync-<command>.1` per visible command and the three
/// completion files into `dir` (created if missing); returns the paths written. `date`
/// (YYYY-MM-DD) dates the man pages, so that a rebuild of the same revision is identical.
pub fn write_all(cmd: Command, dir: &Path, date: &str) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut visible = without_hidden_commands(&cmd);
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();

    let source = format!("{} {}", cmd.get_name(), cmd.get_version().unwrap_or_default());
    let main = dir.join("charthero-sync.1");
    write_file(&main, &render_main_page(&cmd, date, &source)?)?;
    written.push(main);
    for sub in visible_subcommands(&cmd) {
        let man = clap_mangen::Man::new(sub)
            .date(date)
            .source(source.clone())
            .manual("charthero-sync manual");
        let path = dir.join(man.get_filename());
        let mut page = Vec::new();
        man.render(&mut page)?;
        write_file(&path, &page)?;
        written.push(path);
    }

    for (shell, name) in COMPLETIONS {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut visible, cmd.get_name(), &mut script);
        let path = dir.join(name);
        write_file(&path, &script)?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.flush()
}

/// `charthero-sync(1)`: clap_mangen's sections, then the exit codes (instead of clap's one-line
/// after-help), environment, files and the other pages.
fn render_main_page(cmd: &Command, date: &str, source: &str) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone())
        .date(date)
        .source(source)
        .manual("charthero-sync manual");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;

    let mut roff = Roff::default();
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in EXIT_STATUS {
        roff.control("TP", [])
            .text([bold(code.to_string())])
            .text([roman(meaning)]);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in ENVIRONMENT {
        roff.control("TP", []).text([bold(name)]).text([roman(meaning)]);
    }
    roff.control("SH", ["FILES"]);
    for (path, meaning) in FILES {
        roff.control("TP", []).text([italic(path)]).text([roman(meaning)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut see_also: Vec<_> = visible_subcommands(cmd)
        .iter()
        .map(|s| format!("{}-{}(1)", cmd.get_name(), s.get_name()))
        .collect();
    see_also.extend(["systemctl(1)", "journalctl(1)", "sqlite3(1)"].map(str::to_owned));
    roff.text([roman(see_also.join(", "))]);
    roff.to_writer(&mut page)?;

    man.render_version_section(&mut page)?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Command {
        Command::new("charthero-sync")
            .version("1.2.3 (abc1234)")
            .about("Replicate")
            .arg(clap::Arg::new("config").long("config").global(true))
            .subcommand(Command::new("sync").about("One cycle"))
            .subcommand(Command::new("generate").hide(true))
    }

    #[test]
    fn pages_and_completions_cover_the_visible_commands_and_never_the_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(sample(), dir.path(), "2026-01-01").unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "charthero-sync.1",
                "charthero-sync-sync.1",
                "charthero-sync.bash",
                "_charthero-sync",
                "charthero-sync.fish"
            ]
        );
        let main = std::fs::read_to_string(dir.path().join("charthero-sync.1")).unwrap();
        for section in [
            "EXIT STATUS",
            "ENVIRONMENT",
            "FILES",
            "SEE ALSO",
            "charthero\\-sync\\-sync(1)",
        ] {
            assert!(main.contains(section), "{section} missing from:\n{main}");
        }
        assert!(main.contains("1.2.3 (abc1234)") && main.contains("2026-01-01"));
        for (_, name) in COMPLETIONS {
            let script = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(script.contains("sync"), "{name} does not complete sync");
            assert!(!script.contains("generate"), "{name} offers the hidden command");
        }
    }
}
