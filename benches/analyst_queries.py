#!/usr/bin/env python3
"""Times every documented query and view of a warehouse the way an analyst runs them.

    python3 benches/analyst_queries.py WAREHOUSE.db [RUNS]

Runs each SQL block of docs/schema.md, and for each view a full count, its first page and its
five newest rows, on a read-only connection with Python's own sqlite3 (3.40.1 on Debian 12,
the oldest SQLite the schema promises to serve), RUNS times each (default 5). Prints one line
per query, `queries: <ms median> ms <ms max> ms <rows> rows <name>`, and fails (exit 1) if a
plan runs a full scan inside a per-row subquery (`EXPLAIN QUERY PLAN`: a SCAN under a
CORRELATED subquery). benches/envelope.rs (scenario `queries`) builds the 100,000-encounter
warehouse and runs this; BENCHMARKS.md has the numbers.
"""

import re
import sqlite3
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def documented_queries():
    text = (ROOT / "docs" / "schema.md").read_text(encoding="utf-8")
    out = []
    title = None
    block = None
    for line in text.splitlines():
        stripped = line.strip()
        if block is not None:
            if stripped.startswith("```"):
                out.append((title, "\n".join(block)))
                block = None
            else:
                block.append(stripped)
        elif stripped.startswith("```sql"):
            block = []
        elif stripped:
            title = re.sub(r"^\d+\.\s+", "", stripped).rstrip(":").replace("`", "")
    return out


# The simulator's text has a vocabulary of a few hundred words, each in tens of thousands of
# turns; a real term such as 'metformin' is far rarer. The documented searches are also timed
# with a term that frequent, as the worst case this data set offers.
FREQUENT_TERM_SEARCHES = [
    (
        "worst case: transcripts mentioning 'side effects' (41,144 turns in 100k), best 20",
        "SELECT tt.document_id, tt.turn_index, snippet(transcript_turns_fts, 0, '[', ']', '…', 8) "
        "FROM transcript_turns_fts JOIN transcript_turns tt ON tt.rowid = transcript_turns_fts.rowid "
        "WHERE transcript_turns_fts MATCH 'side effects' ORDER BY rank LIMIT 20",
    ),
    (
        "worst case: notes mentioning 'penicillin' (62,419 notes in 100k), first 50",
        "SELECT d.encounter_id, d.document_id, d.title FROM notes_fts JOIN documents d "
        "ON d.rowid = notes_fts.rowid WHERE notes_fts MATCH 'penicillin' LIMIT 50",
    ),
]


def view_queries(conn):
    views = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view' ORDER BY name")]
    out = []
    for view in views:
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({view})")]
        out.append((f"view {view}: count", f"SELECT count(*) FROM {view}"))
        out.append((f"view {view}: first 100 rows", f"SELECT * FROM {view} LIMIT 100"))
        if "created_at" in columns:
            out.append((f"view {view}: newest 5", f"SELECT * FROM {view} ORDER BY created_at DESC LIMIT 5"))
    return out


def full_scans_in_correlated_subqueries(conn, sql):
    """Plan lines that scan a whole table inside a correlated subquery."""
    rows = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    parent = {r[0]: r[1] for r in rows}
    detail = {r[0]: r[3] for r in rows}
    # Derived tables (a subquery in FROM) are planned as "CO-ROUTINE w" or "MATERIALIZE w" and
    # read as "SCAN w": that reads the subquery's rows, whose own table reads are lines of their
    # own, checked like any other.
    derived = {t.split(" ", 1)[1] for t in detail.values() if t.startswith(("CO-ROUTINE ", "MATERIALIZE "))}
    bad = []
    for node, _parent, _unused, text in rows:
        # A table read whole, directly or through an index (which reads the whole index).
        if not text.startswith("SCAN ") or text.startswith(("SCAN (", "SCAN CONSTANT ROW")):
            continue
        if text.split(" ")[1] in derived:
            continue
        up = parent.get(node)
        while up:
            if "CORRELATED" in detail.get(up, ""):
                bad.append(text)
                break
            up = parent.get(up)
    return bad


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    db = Path(argv[1])
    if not db.is_file():
        print(f"no such warehouse: {db}", file=sys.stderr)
        return 2
    runs = int(argv[2]) if len(argv) == 3 else 5
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    print(f"queries: sqlite {sqlite3.sqlite_version}, {conn.execute('SELECT count(*) FROM encounters').fetchone()[0]} encounters")
    failures = []
    for name, sql in documented_queries() + view_queries(conn) + FREQUENT_TERM_SEARCHES:
        bad = full_scans_in_correlated_subqueries(conn, sql)
        if bad:
            failures.append(f"{name}: {bad}")
        times = []
        rows = 0
        for _ in range(runs):
            started = time.perf_counter()
            rows = len(conn.execute(sql).fetchall())
            times.append((time.perf_counter() - started) * 1000)
        print(f"queries: {statistics.median(times):8.1f} ms {max(times):8.1f} ms {rows:7d} rows  {name}")
    for failure in failures:
        print(f"queries: full scan in a per-row subquery: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
