//! Tidy checks on the source tree itself, not on behaviour: every Rust file opens with a `//!`
//! header saying what it owns, the layering invariants of ARCHITECTURE.md that can be read off
//! the text (the API client never mentions rusqlite, the store never mentions reqwest, only the
//! SQLite backend behind the store seam names rusqlite), and the
//! simulator's top-level modules import each other without a cycle.
//!
//! These read files under `CARGO_MANIFEST_DIR` and start nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir` (recursively), sorted, as paths relative to the repository root.
fn rust_files(dir: &str) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                out.push(path.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let base = root();
    let mut out = Vec::new();
    walk(&base, &base.join(dir), &mut out);
    out.sort();
    out
}

fn read(relative: &Path) -> String {
    fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("reading {}: {e}", relative.display()))
}

#[test]
fn every_rust_file_opens_with_a_module_header() {
    let files: Vec<PathBuf> = ["src", "sim/src", "benches", "tests"]
        .iter()
        .flat_map(|dir| rust_files(dir))
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("src/lib.rs")) && files.iter().any(|f| f.ends_with("tidy.rs")),
        "the walk found too little: {files:?}"
    );
    let offenders: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let text = read(file);
            let first = text.lines().map(str::trim).find(|line| !line.is_empty());
            match first {
                Some(line) if line.starts_with("//!") => None,
                Some(line) => Some(format!("{}: first line is `{line}`", file.display())),
                None => Some(format!("{}: empty file", file.display())),
            }
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "every module must open with a `//!` header saying what it owns and what it does not do; \
         missing in:\n{}",
        offenders.join("\n")
    );
}

/// `file:line: text` of every line of a file under `dir` that contains `word`.
fn mentions(dir: &str, word: &str) -> Vec<String> {
    rust_files(dir)
        .iter()
        .flat_map(|file| {
            read(file)
                .lines()
                .enumerate()
                .filter(|(_, line)| line.contains(word))
                .map(|(n, line)| format!("{}:{}: {}", file.display(), n + 1, line.trim()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_api_client_never_touches_sqlite_and_the_store_never_does_network_io() {
    assert!(!rust_files("src/api").is_empty() && !rust_files("src/store").is_empty());
    let sqlite_in_api = mentions("src/api", "rusqlite");
    assert!(
        sqlite_in_api.is_empty(),
        "ARCHITECTURE.md: the API client never touches SQLite, but src/api mentions rusqlite:\n{}",
        sqlite_in_api.join("\n")
    );
    let network_in_store = mentions("src/store", "reqwest");
    assert!(
        network_in_store.is_empty(),
        "ARCHITECTURE.md: the store never does network I/O, but src/store mentions reqwest:\n{}",
        network_in_store.join("\n")
    );
}

#[test]
fn the_store_formats_every_timestamp_in_the_one_stored_width() {
    // `format_utc` drops trailing zeros (for people and the API); a value written with it would
    // sort wrongly as text among the fixed-width ones (ARCHITECTURE.md).
    assert!(
        !mentions("src/store", "format_stored").is_empty(),
        "the check reads the store"
    );
    // `status::read` renders the watermark for people, outside the store.
    let variable_width = mentions("src/store", "format_utc");
    assert!(
        variable_width.is_empty(),
        "ARCHITECTURE.md: the store writes timestamps only with timefmt::format_stored, but:\n{}",
        variable_width.join("\n")
    );
}

#[test]
fn rusqlite_is_named_only_in_the_sqlite_backend_behind_the_store_seam() {
    // The sync, content, audit, daemon, status and one-shot commands reach the warehouse only
    // through the store's seam (`store::Backend`, `store::WriteTx`, `store::Reader`, opened by
    // `store::open*`), whose signatures carry no rusqlite type. rusqlite is named only in the
    // SQLite implementation, which runs on the writer thread or in `store::blocking`, so no
    // async task can call it either; and only the seam itself reaches into that implementation.
    let backend = "src/store/sqlite/";
    assert!(
        !mentions("src/store/sqlite", "rusqlite").is_empty(),
        "the check reads the SQLite backend"
    );
    let elsewhere: Vec<String> = mentions("src", "rusqlite")
        .into_iter()
        .filter(|hit| !hit.starts_with(backend))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "ARCHITECTURE.md: only the SQLite backend names rusqlite, but it is named outside {backend}:\n{}",
        elsewhere.join("\n")
    );
    let past_the_seam: Vec<String> = mentions("src", "sqlite::")
        .into_iter()
        .filter(|hit| !hit.starts_with("src/store/"))
        .collect();
    assert!(
        past_the_seam.is_empty(),
        "ARCHITECTURE.md: only the store seam opens its SQLite backend, but:\n{}",
        past_the_seam.join("\n")
    );
}

/// The code of a file without comments: whole comment lines (doc comments included) are
/// dropped, and a trailing `//` comment is cut where `//` follows whitespace (so `http://` in a
/// string survives).
fn code_only(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(|line| match line.find(" //") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn leading_ident(text: &str) -> &str {
    let text = text.trim_start();
    let end = text.find(|c| !is_ident_char(c)).unwrap_or(text.len());
    &text[..end]
}

/// The first path segment of every `crate::` path in `code`: `crate::store::Store` and
/// `use crate::store;` give `store`, `use crate::{model::{A, B}, store}` gives `model` and
/// `store`, a glob `crate::*` gives `*`. Paths inside strings count too (serde's
/// `serialize_with = "crate::…"` is a real dependency).
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].chars().next_back().is_some_and(is_ident_char) {
            continue; // `my_crate::`, not this crate
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first identifier of each comma-separated element at depth one.
            let mut depth = 1;
            let mut element_start = true;
            for (i, c) in group.char_indices() {
                if element_start && !c.is_whitespace() {
                    element_start = false;
                    let name = if c == '*' { "*" } else { leading_ident(&group[i..]) };
                    if !name.is_empty() {
                        found.insert(name.to_owned());
                    }
                }
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => element_start = true,
                    _ => {}
                }
            }
        } else if rest.starts_with('*') {
            found.insert("*".to_owned());
        } else {
            let name = leading_ident(rest);
            if !name.is_empty() {
                found.insert(name.to_owned());
            }
        }
    }
    found
}

/// Names the crate root re-exports, mapped to the module that defines them
/// (`pub use model::{DocKind, …};` maps `DocKind` to `model`).
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let code = code_only(lib);
    let mut map = BTreeMap::new();
    for (at, _) in code.match_indices("pub use ") {
        let statement = &code[at + "pub use ".len()..];
        let statement = &statement[..statement.find(';').unwrap_or(statement.len())];
        let statement = statement.trim().trim_start_matches("crate::");
        let Some((module, items)) = statement.split_once("::") else {
            continue;
        };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            // `A as B` exports `B`.
            let name = item.split(" as ").last().unwrap_or("").trim();
            if !name.is_empty() {
                map.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    map
}

/// The simulator's top-level modules (`sim/src/<name>.rs`, or a `sim/src/<name>/` directory)
/// and, for each, the other top-level modules its code names through `crate::` paths, root
/// re-exports resolved to their defining module (a glob `crate::*` names all of them).
fn sim_module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("sim/src");
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let relative = path.strip_prefix(root()).unwrap().to_path_buf();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let text: String = rust_files(relative.to_str().unwrap())
                .iter()
                .map(|f| read(f))
                .collect();
            sources.entry(stem).or_default().push_str(&text);
        } else if path.extension().is_some_and(|ext| ext == "rs") && stem != "lib" {
            sources.entry(stem).or_default().push_str(&read(&relative));
        }
    }
    let reexports = root_reexports(&read(Path::new("sim/src/lib.rs")));
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(module, text)| {
            let mut uses = BTreeSet::new();
            for name in crate_paths(&code_only(text)) {
                if name == "*" {
                    uses.extend(reexports.values().cloned());
                } else if modules.contains(&name) {
                    uses.insert(name);
                } else if let Some(owner) = reexports.get(&name) {
                    uses.insert(owner.clone());
                }
            }
            uses.remove(module);
            (module.clone(), uses)
        })
        .collect()
}

/// A cycle in `graph` as the path that closes it (`["a", "b", "a"]`), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit<'g>(
        node: &'g str,
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<&'g str>,
        path: &mut Vec<&'g str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|&n| n == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|n| n.to_string()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_simulator_modules_import_each_other_without_a_cycle() {
    let graph = sim_module_graph();
    assert!(
        graph.len() >= 5 && graph.values().any(|uses| !uses.is_empty()),
        "the module graph was not read: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = graph
            .iter()
            .map(|(module, uses)| {
                format!(
                    "  {module} -> {}",
                    uses.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        panic!(
            "sim/src modules import each other in a cycle: {}\nmove the shared items down into a \
             module both can use, or into the module that owns them; the graph:\n{}",
            cycle.join(" -> "),
            edges.join("\n")
        );
    }
}

#[test]
fn tidy_import_parsing_sees_every_form_of_crate_path() {
    let code = code_only(
        "use crate::{a::{B, C}, b};\n\
         use crate::c;\n\
         //! see crate::commented\n\
         fn f() { crate::d::e(); } // crate::trailing\n\
         #[serde(serialize_with = \"crate::f::g\")]\n\
         use crate::*;\n\
         use my_crate::h;\n\
         const URL: &str = \"http://x\"; fn g() { crate::i::j() }\n",
    );
    let found: Vec<String> = crate_paths(&code).into_iter().collect();
    assert_eq!(found, ["*", "a", "b", "c", "d", "f", "i"]);
    let reexports = root_reexports("pub use model::{A, B as C};\npub use state::Sim;\n");
    assert_eq!(reexports["A"], "model");
    assert_eq!(reexports["C"], "model");
    assert_eq!(reexports["Sim"], "state");
    assert!(!reexports.contains_key("B"));

    let graph = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            graph.entry(from.to_string()).or_default().insert(to.to_string());
            graph.entry(to.to_string()).or_default();
        }
        graph
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "b")])),
        Some(vec!["b".to_owned(), "c".to_owned(), "b".to_owned()])
    );
}
