"""Reads a Sightline lake with DuckDB and pyarrow, exactly as the README tells users to, and
checks what every reader must see: the same rows, UTC timestamps, Hive partitions that agree
with the data, totals that agree with the replay's summary (over the standard route and the
restricted one under restricted/), and the retention tags in the Parquet metadata.

usage: check_lake.py LAKE_DIR SUMMARY_FILE INPUT_FILE [--dirty]

--dirty: the input holds personal data where it must not be (`generate --dirty-fraction`), so
records rejected for it must be in the lake, and their rejected values must not.
"""

import glob
import json
import re
import sys

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq

TABLES = ["event_counts", "latency", "latency_by_variant", "quality", "quality_summary", "dead_letter", "funnels", "command_queue", "integration_health", "feedback", "alerts", "triage"]
PRIVACY_COUNTERS = "('pseudonymized_fields', 'scrubbed_fields', 'dropped_fields', 'pii_violations')"

lake, summary_path, input_path = sys.argv[1], sys.argv[2], sys.argv[3]
dirty = "--dirty" in sys.argv[4:]
with open(input_path, "rb") as f:
    input_lines = sum(1 for _ in f)
summary = open(summary_path, encoding="utf-8").read()
numbers = {k: int(v) for k, v in re.findall(r"(read|accepted|rejected|late) (\d+)", summary)}

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")


def dirs(table):
    """The table's directories: the standard route, and the restricted route when present."""
    return [d for d in (f"{lake}/{table}", f"{lake}/restricted/{table}") if glob.glob(f"{d}/**/*.parquet", recursive=True)]


def scan(table):
    paths = ", ".join(f"'{d}/**/*.parquet'" for d in dirs(table))
    return f"read_parquet([{paths}], hive_partitioning=true)"


check("restricted records are written under restricted/", len(dirs("event_counts")) == 2, str(dirs("event_counts")))
for table in TABLES:
    duck_rows = con.execute(f"SELECT count(*) FROM {scan(table)}").fetchone()[0]
    arrow_rows = sum(ds.dataset(d, format="parquet", partitioning="hive").count_rows() for d in dirs(table))
    check(f"{table}: duckdb and pyarrow read the same {duck_rows} rows", duck_rows == arrow_rows and duck_rows > 0, f"{duck_rows} vs {arrow_rows}")
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {scan(table)})").fetchall())
    check(f"{table}: window_start is a UTC timestamp", types.get("window_start") == "TIMESTAMP WITH TIME ZONE", str(types.get("window_start")))
    mismatched = con.execute(
        f"SELECT count(*) FROM {scan(table)} WHERE strftime(window_start, '%Y-%m-%d') != CAST(dt AS VARCHAR) "
        f"OR CAST(strftime(window_start, '%H') AS INTEGER) != CAST(hr AS INTEGER)"
    ).fetchone()[0]
    check(f"{table}: dt/hr partitions agree with window_start", mismatched == 0, f"{mismatched} rows disagree")
    schema = ds.dataset(dirs(table)[0], format="parquet").schema
    check(f"{table}: pyarrow sees microsecond UTC timestamps", str(schema.field("window_start").type) == "timestamp[us, tz=UTC]", str(schema.field("window_start").type))

accepted_counts = con.execute(f"SELECT sum(count) FROM {scan('event_counts')}").fetchone()[0]
accepted_quality = con.execute(f"SELECT sum(count) FROM {scan('quality')} WHERE outcome = 'accepted'").fetchone()[0]
late_quality = con.execute(f"SELECT sum(count) FROM {scan('quality')} WHERE outcome = 'late'").fetchone()[0] or 0
rejected_quality = con.execute(f"SELECT sum(count) FROM {scan('quality')} WHERE outcome NOT IN ('accepted', 'late') AND outcome NOT IN {PRIVACY_COUNTERS}").fetchone()[0] or 0
dead = con.execute(f"SELECT count(*) FROM {scan('dead_letter')}").fetchone()[0]
check("event_counts total equals the accepted events", accepted_counts == numbers["accepted"], f"{accepted_counts} vs {numbers}")
unweighted = con.execute(
    f"SELECT (SELECT count(*) FROM {scan('event_counts')} WHERE weighted_count != count)"
    f" + (SELECT count(*) FROM {scan('quality_summary')} WHERE weighted_accepted != accepted)"
    f" + (SELECT count(*) FROM {scan('latency')} WHERE weighted_count != count)"
    + (f" + (SELECT count(*) FROM {scan('funnels')} WHERE weighted_units != units)" if dirs("funnels") else "")
).fetchone()[0]
check("events without sample_rate weigh 1 (weighted = raw in event_counts, quality_summary, latency, funnels)", unweighted == 0, f"{unweighted} rows differ")
check("quality accepted/rejected/late equal the summary", (accepted_quality, rejected_quality, late_quality) == (numbers["accepted"], numbers["rejected"], numbers["late"]), f"{(accepted_quality, rejected_quality, late_quality)} vs {numbers}")
check("one dead letter per rejected or late record", dead == numbers["rejected"] + numbers["late"], f"{dead}")
check("every input line was read", numbers["read"] == input_lines, f"{numbers['read']} read, {input_lines} lines")
check(
    "every line read is in the lake: an accepted event in event_counts or a dead letter",
    accepted_counts + dead == input_lines,
    f"{accepted_counts} accepted + {dead} dead letters vs {input_lines} lines",
)
summary_totals = con.execute(f"SELECT sum(accepted), sum(rejected), sum(late) FROM {scan('quality_summary')}").fetchone()
check("quality_summary totals equal the summary", tuple(summary_totals) == (numbers["accepted"], numbers["rejected"], numbers["late"]), str(summary_totals))
wrong_verdicts = con.execute(
    f"SELECT count(*) FROM {scan('quality_summary')} WHERE meets_rejection_target != (rejection_rate < 0.01) OR meets_pii_target != (pii_violation_rate < 0.001)"
).fetchone()[0]
check("quality_summary verdicts follow the seed's targets (< 1% rejected, < 0.1% PII violations)", wrong_verdicts == 0, f"{wrong_verdicts} rows")
PSEUDONYM = r"^[A-Za-z0-9_-]{1,16}\.[0-9]+\.[0-9a-f]{24}$"  # <key-id>.<period>.<24 hex digits>
kept, raw = con.execute(
    f"""SELECT count(*), count(*) FILTER (WHERE json_type(payload, path) != 'VARCHAR'
                                        OR NOT regexp_matches(json_extract_string(payload, path), '{PSEUDONYM}'))
        FROM (SELECT payload, unnest(['$.user_id', '$.tenant_id', '$.session_id']) AS path
              FROM {scan('dead_letter')} WHERE json_valid(payload))
        WHERE json_type(payload, path) IS NOT NULL AND json_type(payload, path) NOT IN ('NULL', 'BOOLEAN')"""
).fetchone()
check("identifiers kept in dead letters are pseudonyms, never raw (numbers included)", kept > 0 and raw == 0, f"{raw} of {kept} not pseudonyms")
def at_pointer(document, pointer):
    """The value at a JSON pointer, or None when it is not there."""
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(document, dict) and part in document:
            document = document[part]
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return None
    return document


kept_rejected = []
rejected_seen = 0
for d in dirs("dead_letter"):
    for row in ds.dataset(d, format="parquet", partitioning="hive").to_table(columns=["kind", "violations", "payload"]).to_pylist():
        if row["kind"] != "pii_rejected" or row["payload"] is None:
            continue
        try:
            payload = json.loads(row["payload"])
        except ValueError:
            continue
        for violation in json.loads(row["violations"]):
            if violation["keyword"] != "x-pii":
                continue
            rejected_seen += 1
            value = at_pointer(payload, violation["pointer"])
            if value not in (None, "[redacted]"):
                kept_rejected.append((violation["pointer"], value))
check(
    "a value rejected as personal data (x-pii) is never kept in its dead letter",
    not kept_rejected and (rejected_seen > 0 or not dirty),
    f"{len(kept_rejected)} of {rejected_seen} kept: {kept_rejected[:3]}",
)

explained = con.execute(f"SELECT count(*) FROM {scan('dead_letter')} WHERE kind NOT IN ('late', 'empty', 'oversize', 'invalid_utf8', 'truncated', 'malformed_json') AND json_array_length(violations::JSON) = 0").fetchone()[0]
check("schema failures carry their violations (pointer, keyword)", explained == 0, f"{explained} rows without")


def retention(table, route_dir):
    files = glob.glob(f"{route_dir}/{table}/**/*.parquet", recursive=True)
    return {pq.read_metadata(f).metadata.get(b"sightline.retention_days") for f in files}


check("aggregates carry their 365-day retention", retention("event_counts", lake) == {b"365"}, str(retention("event_counts", lake)))
check("dead letters carry the 90-day raw retention", retention("dead_letter", lake) == {b"90"}, str(retention("dead_letter", lake)))
check("restricted data carries its 30-day retention", retention("event_counts", f"{lake}/restricted") == {b"30"}, str(retention("event_counts", f"{lake}/restricted")))
disordered = con.execute(
    f"SELECT count(*) FROM {scan('latency')} WHERE NOT (p50_ms <= p90_ms AND p90_ms <= p95_ms AND p95_ms <= p99_ms AND p99_ms <= max_ms AND count > 0)"
).fetchone()[0]
check("latency quantiles are ordered", disordered == 0, f"{disordered} rows")
windows = con.execute(f"SELECT count(DISTINCT window_start), count(DISTINCT filename) FROM read_parquet('{lake}/event_counts/**/*.parquet', filename=true)").fetchone()
check("one file per window", windows[0] == windows[1], str(windows))

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
