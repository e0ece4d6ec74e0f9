#!/usr/bin/env python3
"""Writes datasette/metadata.json from its one source, docs/schema.md, plus datasette/config.json.

docs/schema.md documents every table, view, search index and column (the tests hold it equal to
the migrations) and the example queries. This script turns it into Datasette metadata:

* each table's and view's description (the paragraphs under its heading) and column descriptions
  (the "meaning" column, or where the value comes from when that is empty);
* full-text search for the search box: a table named as the source of an FTS5 index's column
  ("`transcript_turns.text`") gets `fts_table` and `fts_pk` (rowid);
* one canned query per SQL block of docs/schema.md, named after the line introducing it;
* from config.json: title, the PHI notice, license, source, facets and sort orders, and the
  database names (Datasette names a database after its file: warehouse.db is `warehouse`).

    python3 datasette/generate_metadata.py           # rewrite datasette/metadata.json
    python3 datasette/generate_metadata.py --check   # exit 1 if it is out of date (the tests run this)

Standard library only; nothing is fetched.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "docs" / "schema.md"
CONFIG = ROOT / "datasette" / "config.json"
OUTPUT = ROOT / "datasette" / "metadata.json"

HEADING = re.compile(r"^### `([a-z_0-9]+)`$")
ROW = re.compile(r"^\| `([a-z_0-9]+)` \|(.*)\|$")


def plain(text):
    """Markdown of one table cell or paragraph as plain text (no backticks or link targets)."""
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    return text.replace("`", "").replace("**", "").strip()


def parse_objects(lines):
    """Tables, views and search indexes: {name: {"description": str, "columns": {col: str}}}.

    A description is the text between an object's heading and its column table."""
    objects = {}
    current = None
    for line in lines:
        if line.startswith("## "):
            current = None
            continue
        heading = HEADING.match(line)
        if heading:
            current = {"description": [], "columns": {}, "intro": True}
            objects[heading.group(1)] = current
            continue
        if current is None:
            continue
        if line.startswith("|"):
            current["intro"] = False
            row = ROW.match(line)
            if row:
                cells = [c.strip() for c in row.group(2).split("|")]
                if len(cells) != 4:
                    raise SystemExit(f"docs/schema.md: a column row needs 5 cells: {line}")
                _type, _null, source, meaning = cells
                current["columns"][row.group(1)] = plain(meaning) or f"As in {plain(source)}."
        elif current["intro"] and line.strip():
            current["description"].append(line.strip())
    for obj in objects.values():
        del obj["intro"]
        obj["description"] = plain(" ".join(obj["description"]))
    return objects


def parse_queries(lines):
    """Every ```sql block with the line introducing it: [(title, sql)]."""
    queries = []
    title = None
    block = None
    for line in lines:
        stripped = line.strip()
        if block is not None:
            if stripped.startswith("```"):
                queries.append((title, "\n".join(block).strip()))
                block = None
            else:
                block.append(stripped)
        elif stripped.startswith("```sql"):
            if not title:
                raise SystemExit("docs/schema.md: a SQL block has no line introducing it")
            block = []
        elif stripped:
            # "9. The latest transcript as text (name one ...):" is titled "The latest
            # transcript as text": an aside in parentheses is left out of title and name.
            title = plain(re.sub(r"^\d+\.\s+", "", stripped)).rstrip(":")
            title = re.sub(r"\s*\([^)]*\)$", "", title)
    return queries


def slug(title):
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def fts_sources(objects):
    """{table: fts_table} for every search index whose column names its source `table.column`."""
    out = {}
    for name, obj in objects.items():
        if not name.endswith("_fts"):
            continue
        for description in obj["columns"].values():
            match = re.search(r"rowid = ([a-z_0-9]+)\.rowid", description)
            if match:
                out[match.group(1)] = name
    return out


def generate():
    lines = SCHEMA.read_text(encoding="utf-8").splitlines()
    config = json.loads(CONFIG.read_text(encoding="utf-8"))
    objects = parse_objects(lines)
    search = fts_sources(objects)
    missing = {t for t in search if t not in objects}
    if not search or missing:
        raise SystemExit(f"docs/schema.md: search indexes without a documented source table: {missing or 'none found'}")
    tables = {}
    for name, obj in objects.items():
        if name.endswith("_fts"):
            continue
        table = {"description": obj["description"], "columns": obj["columns"]}
        if name in search:
            table["fts_table"] = search[name]
            table["fts_pk"] = "rowid"
        extra = config["tables"].get(name, {})
        unknown = [c for c in extra.get("facets", []) if c not in obj["columns"]]
        if unknown:
            raise SystemExit(f"datasette/config.json: {name} has no column {unknown}")
        table.update(extra)
        tables[name] = table
    unknown_tables = set(config["tables"]) - set(tables)
    if unknown_tables:
        raise SystemExit(f"datasette/config.json: no such table or view: {sorted(unknown_tables)}")
    queries = {}
    for title, sql in parse_queries(lines):
        name = slug(title)
        if name in queries:
            raise SystemExit(f"docs/schema.md: two queries are introduced as {title!r}")
        queries[name] = {"title": title, "sql": sql}
    database = {"tables": tables, "queries": queries}
    metadata = {
        "title": config["title"],
        "description_html": config["description_html"],
        "license": config["license"],
        "source": config["source"],
        "databases": {name: database for name in config["database_names"]},
    }
    return json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"


def main(argv):
    text = generate()
    if argv[1:] == ["--check"]:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(
                "datasette/metadata.json is out of date with docs/schema.md or datasette/config.json; "
                "run: python3 datasette/generate_metadata.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
