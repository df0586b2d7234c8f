"""Reads every series Sightline sent to a real Prometheus (remote-write) back over the HTTP API,
and compares it with the Parquet tables of the same run (read with DuckDB): the same series,
timestamps and values, exactly. The naming is the README's ("Metrics store"):

- one series per numeric column of a row (booleans as 0/1, nulls absent) of the exported
  tables, named sightline_<table>_<column>, a column ending _ms named ..._milliseconds;
- labels: the table's key columns (below), empty values left out, and `route` (the lake's
  route: `standard`, or `restricted` for tables under the restricted prefix) unless the table
  has its own `route` column;
- the sample's timestamp is the window's end.

usage: check_prometheus.py LAKE_DIR PROMETHEUS_URL
"""

import glob
import json
import sys
import urllib.parse
import urllib.request

import duckdb

lake, prom = sys.argv[1], sys.argv[2].rstrip("/")
KEYS = {
    "event_counts": ["event_name", "event_type", "feature_area"],
    "latency": ["event_name", "feature_area", "surface"],
    "latency_by_variant": ["event_name", "experiment_id", "variant"],
    "quality": ["event_name", "outcome"],
    "quality_summary": [],
    "funnels": ["funnel", "breakdown", "breakdown_value", "step", "step_name"],
    "command_queue": ["action_type"],
    "integration_health": ["integration", "breaker_state"],
    "alerts": ["route", "rule", "subject", "severity", "state"],
    "feedback": ["feature_area", "breakdown", "breakdown_value"],
    "experiment_results": ["experiment_id", "metric", "arm", "state"],
    "experiment_exposures": ["experiment_id", "arm"],
    "guardrail_decisions": ["experiment_id", "rule", "action", "arm"],
    "experiment_did": ["experiment_id", "metric", "cohort_start_ms", "state"],
    "sampling_budgets": ["segment"],
}
NOT_MEASURES = {"epoch", "config_version", "decision_epoch", "version"}
NUMERIC = ("BIGINT", "INTEGER", "DOUBLE", "BOOLEAN")
con = duckdb.connect()
failures = []


def name_of(table, column):
    return f"sightline_{table}_{column[:-3]}_milliseconds" if column.endswith("_ms") else f"sightline_{table}_{column}"


expected = {}
latest = 0
for table, keys in KEYS.items():
    for route, root in (("standard", f"{lake}/{table}"), ("restricted", f"{lake}/restricted/{table}")):
        if not glob.glob(f"{root}/**/*.parquet", recursive=True):
            continue
        cur = con.execute(f"SELECT * EXCLUDE (dt, hr, window_start, window_end), epoch_ms(window_end) AS _end FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true)")
        columns = [(d[0], str(d[1])) for d in cur.description]
        for row in cur.fetchall():
            r = dict(zip([c for c, _ in columns], row))
            labels = {k: str(r[k]) for k in keys if r.get(k) is not None and str(r[k]) != ""}
            if "route" not in keys:
                labels["route"] = route
            latest = max(latest, r["_end"])
            for column, kind in columns:
                if column in keys or column in NOT_MEASURES or column in ("window_start", "window_end", "_end"):
                    continue
                if not kind.startswith(NUMERIC) or r[column] is None:
                    continue
                value = float(r[column])
                key = (name_of(table, column), tuple(sorted(labels.items())), r["_end"])
                if key in expected:
                    failures.append(f"two rows give the series {key}")
                expected[key] = value

query = urllib.parse.urlencode({"query": '{__name__=~"sightline_.+"}[2h]', "time": f"{latest / 1000 + 1:.3f}"})
with urllib.request.urlopen(f"{prom}/api/v1/query?{query}") as response:
    answer = json.load(response)
got = {}
for series in answer["data"]["result"]:
    metric = dict(series["metric"])
    name = metric.pop("__name__")
    for ts, value in series["values"]:
        got[(name, tuple(sorted(metric.items())), round(float(ts) * 1000))] = float(value)

missing = set(expected) - set(got)
extra = set(got) - set(expected)
if missing:
    failures.append(f"{len(missing)} samples of the lake are not in Prometheus, e.g. {sorted(missing)[:2]}")
if extra:
    failures.append(f"{len(extra)} samples in Prometheus are not in the lake, e.g. {sorted(extra)[:2]}")
for key in set(expected) & set(got):
    if expected[key] != got[key]:
        failures.append(f"{key}: Prometheus {got[key]} vs lake {expected[key]}")
if len(expected) < 1000:
    failures.append(f"only {len(expected)} samples expected: the run does not exercise the metrics store")
for f in failures[:20]:
    print(f"FAIL {f}")
if failures:
    print(f"{len(failures)} differences between Prometheus and the lake")
    sys.exit(1)
names = {k[0] for k in expected}
print(f"ok   Prometheus holds exactly the lake's {len(expected)} samples ({len(names)} metrics, {len({k[:2] for k in expected})} series)")
