//! Build script: gives the binary its git revision for `--version` (`CHARTHERO_GIT_REV`).
//!
//! The revision is, first found: the environment variable `CHARTHERO_GIT_REV` (set by whoever
//! builds from a tree without `.git`, e.g. a source tarball), `git rev-parse --short HEAD`, or
//! `unknown`. The script reruns when that variable or the checked-out commit changes (HEAD, the
//! branch it points to, packed refs), not on every edit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

/// The files whose change means another commit is checked out. Only existing files are named:
/// cargo reruns the script on every build for a path that does not exist.
fn head_files() -> Vec<PathBuf> {
    let (Some(git_dir), Some(common_dir)) = (
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ) else {
        return Vec::new();
    };
    let head = Path::new(&git_dir).join("HEAD");
    let mut files = vec![head.clone(), Path::new(&common_dir).join("packed-refs")];
    if let Some(branch) = std::fs::read_to_string(&head)
        .ok()
        .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
    {
        files.push(Path::new(&common_dir).join(branch));
    }
    files.retain(|f| f.exists());
    files
}

fn main() {
    println!("cargo:rerun-if-env-changed=CHARTHERO_GIT_REV");
    let from_env = std::env::var("CHARTHERO_GIT_REV")
        .ok()
        .filter(|r| !r.trim().is_empty());
    let rev = match from_env {
        Some(rev) => rev.trim().to_owned(),
        None => {
            for file in head_files() {
                println!("cargo:rerun-if-changed={}", file.display());
            }
            git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    // Without any rerun-if-changed of a file, cargo would rerun the script after every edit.
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=CHARTHERO_GIT_REV={rev}");
}
