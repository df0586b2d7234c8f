"""Reads a Sightline lake with DuckDB and pyarrow, exactly as the README tells users to, and
checks what every reader must see: the same rows, UTC timestamps, Hive partitions that agree
with the data, and totals that agree with the replay's summary.

usage: check_lake.py LAKE_DIR SUMMARY_FILE
"""

import re
import sys

import duckdb
import pyarrow.dataset as ds

TABLES = ["event_counts", "latency", "latency_by_variant", "quality", "dead_letter"]

lake, summary_path = sys.argv[1], sys.argv[2]
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


def scan(table):
    return f"read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning=true)"


for table in TABLES:
    duck_rows = con.execute(f"SELECT count(*) FROM {scan(table)}").fetchone()[0]
    arrow_rows = ds.dataset(f"{lake}/{table}", format="parquet", partitioning="hive").count_rows()
    check(f"{table}: duckdb and pyarrow read the same {duck_rows} rows", duck_rows == arrow_rows and duck_rows > 0, f"{duck_rows} vs {arrow_rows}")
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {scan(table)})").fetchall())
    check(f"{table}: window_start is a UTC timestamp", types.get("window_start") == "TIMESTAMP WITH TIME ZONE", str(types.get("window_start")))
    mismatched = con.execute(
        f"SELECT count(*) FROM {scan(table)} WHERE strftime(window_start, '%Y-%m-%d') != CAST(dt AS VARCHAR) "
        f"OR CAST(strftime(window_start, '%H') AS INTEGER) != CAST(hr AS INTEGER)"
    ).fetchone()[0]
    check(f"{table}: dt/hr partitions agree with window_start", mismatched == 0, f"{mismatched} rows disagree")
    schema = ds.dataset(f"{lake}/{table}", format="parquet").schema
    check(f"{table}: pyarrow sees microsecond UTC timestamps", str(schema.field("window_start").type) == "timestamp[us, tz=UTC]", str(schema.field("window_start").type))

accepted_counts = con.execute(f"SELECT sum(count) FROM {scan('event_counts')}").fetchone()[0]
accepted_quality = con.execute(f"SELECT sum(count) FROM {scan('quality')} WHERE outcome = 'accepted'").fetchone()[0]
late_quality = con.execute(f"SELECT sum(count) FROM {scan('quality')} WHERE outcome = 'late'").fetchone()[0] or 0
rejected_quality = con.execute(f"SELECT sum(count) FROM {scan('quality')} WHERE outcome NOT IN ('accepted', 'late')").fetchone()[0] or 0
dead = con.execute(f"SELECT count(*) FROM {scan('dead_letter')}").fetchone()[0]
check("event_counts total equals the accepted events", accepted_counts == numbers["accepted"], f"{accepted_counts} vs {numbers}")
check("quality accepted/rejected/late equal the summary", (accepted_quality, rejected_quality, late_quality) == (numbers["accepted"], numbers["rejected"], numbers["late"]), f"{(accepted_quality, rejected_quality, late_quality)} vs {numbers}")
check("one dead letter per rejected or late record", dead == numbers["rejected"] + numbers["late"], f"{dead}")
check("every record read is accounted for", numbers["read"] == numbers["accepted"] + numbers["rejected"] + numbers["late"], str(numbers))
disordered = con.execute(
    f"SELECT count(*) FROM {scan('latency')} WHERE NOT (p50_ms <= p90_ms AND p90_ms <= p95_ms AND p95_ms <= p99_ms AND p99_ms <= max_ms AND count > 0)"
).fetchone()[0]
check("latency quantiles are ordered", disordered == 0, f"{disordered} rows")
windows = con.execute(f"SELECT count(DISTINCT window_start), count(DISTINCT filename) FROM read_parquet('{lake}/event_counts/**/*.parquet', filename=true)").fetchone()
check("one file per window", windows[0] == windows[1], str(windows))

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
