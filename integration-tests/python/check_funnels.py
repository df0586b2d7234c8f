"""Recomputes the built-in funnels from a replayed input file, independently of Sightline, and
compares them with the lake's `funnels` table (read with DuckDB).

The accepted events are the input lines that are not dead letters (the `dead_letter` table names
each rejected or late line by its offset). The funnels are the two built-in ones, both ordered
without exclusions, so the reference is the textbook greedy search: from each step-1 event, the
earliest event of each next step, in the order (event time, FNV-1a of the event id), within the
conversion window. Units and routes as documented in ARCHITECTURE.md ("Product analytics").

usage: check_funnels.py LAKE_DIR INPUT_FILE WINDOW_MS
"""

import glob
import json
import sys
from collections import defaultdict
from datetime import datetime

import duckdb

lake, input_path, window_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])

FUNNELS = {
    "project_creation": {
        "unit": lambda e: e.get("user_id"),
        "steps": ["project_viewed", "project_created", "task_assigned"],
        "window_ms": 30 * 60_000,
        "breakdowns": lambda e: [
            (f"experiment:{k}", v) for k, v in sorted((e.get("experiment_assignments") or {}).items())
        ],
    },
    "command_queue_outcomes": {
        "unit": lambda e: (e.get("properties") or {}).get("recommendation_id"),
        "steps": [
            "recommendation_generated",
            "recommendation_accepted",
            "action_executed",
            "outcome_reply_received",
            "outcome_meeting_booked",
            "outcome_deal_advanced",
        ],
        "window_ms": 30 * 86_400_000,
        "breakdowns": lambda e: [("properties.action_type", (e.get("properties") or {}).get("action_type", "(none)"))],
    },
}


def fnv1a(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def event_ms(text):
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000 + 0.5)


con = duckdb.connect()
paths = [p for p in (f"{lake}/dead_letter", f"{lake}/restricted/dead_letter") if glob.glob(f"{p}/**/*.parquet", recursive=True)]
dead = {row[0] for row in con.execute(
    "SELECT \"offset\" FROM read_parquet([" + ", ".join(f"'{p}/**/*.parquet'" for p in paths) + "])"
).fetchall()}

events = []
with open(input_path, "rb") as f:
    for offset, line in enumerate(f):
        if offset in dead:
            continue
        e = json.loads(line)
        restricted = e.get("data_sensitivity") == "restricted" or e.get("pii_classification") == "high"
        events.append((event_ms(e["timestamp"]), fnv1a(e["event_id"]), restricted, e))

expected = {}  # (restricted, window_start, funnel, breakdown, value, step) -> [ttc_ms]
for name, f in FUNNELS.items():
    steps = f["steps"]
    units = defaultdict(list)
    for at, order, restricted, e in events:
        if e["event_name"] not in steps:
            continue
        unit = f["unit"](e)
        if unit is None:
            continue
        units[(restricted, unit)].append((at, order, e))
    for (restricted, _), seq in units.items():
        seq.sort(key=lambda x: (x[0], x[1]))
        firsts = defaultdict(list)
        for i, (at, _, e) in enumerate(seq):
            if e["event_name"] == steps[0]:
                firsts[at - at % window_ms].append(i)
        for start, idxs in firsts.items():
            best = [None] * len(steps)
            for i in idxs:
                t1 = seq[i][0]
                best[0] = 0
                j, k = i + 1, 1
                while k < len(steps) and j < len(seq) and seq[j][0] <= t1 + f["window_ms"]:
                    if seq[j][2]["event_name"] == steps[k]:
                        ttc = seq[j][0] - t1
                        best[k] = ttc if best[k] is None else min(best[k], ttc)
                        k += 1
                    j += 1
            reached = next((k for k, b in enumerate(best) if b is None), len(steps))
            first = seq[idxs[0]][2]
            for b, v in [("all", "all")] + f["breakdowns"](first):
                for k in range(reached):
                    expected.setdefault((restricted, start, name, b, v, k + 1), []).append(best[k])

got = {}
for restricted, root in ((False, f"{lake}/funnels"), (True, f"{lake}/restricted/funnels")):
    if not glob.glob(f"{root}/**/*.parquet", recursive=True):
        continue
    for row in con.execute(
        "SELECT epoch_ms(window_start), funnel, breakdown, breakdown_value, step, units, "
        "conversion_from_entry, conversion_from_previous, median_time_to_convert_ms, p90_time_to_convert_ms "
        f"FROM read_parquet('{root}/**/*.parquet')"
    ).fetchall():
        key = (restricted, row[0], row[1], row[2], row[3], row[4])
        got[key] = row[5:]

failures = []
if set(got) != set(expected):
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    failures.append(f"rows differ: {len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} extra (e.g. {sorted(extra)[:3]})")
for key, times in expected.items():
    if key not in got:
        continue
    units, from_entry, from_previous, median, p90 = got[key]
    times = sorted(times)
    if units != len(times):
        failures.append(f"{key}: {units} units, expected {len(times)}")
    for q, value in ((0.5, median), (0.9, p90)):
        exact = times[int(q * (len(times) - 1))]
        if abs(value - exact) > 0.01 * exact + 1e-6:
            failures.append(f"{key}: q{q} {value} ms, expected {exact} ms within 1%")
    restricted, start, name, b, v, step = key
    entry = len(expected.get((restricted, start, name, b, v, 1), []))
    before = len(expected.get((restricted, start, name, b, v, step - 1), [])) if step > 1 else len(times)
    if abs(from_entry - len(times) / entry) > 1e-9 or abs(from_previous - len(times) / before) > 1e-9:
        failures.append(f"{key}: conversions {from_entry}, {from_previous}")
    if not (0.0 <= from_entry <= 1.0 and 0.0 <= from_previous <= 1.0):
        failures.append(f"{key}: conversion outside [0, 1]")

converted = sum(1 for k in expected if k[5] >= 3)
if converted == 0:
    failures.append("no unit reached step 3 of any funnel: the input does not exercise the funnels")
for f in failures[:20]:
    print(f"FAIL {f}")
if failures:
    print(f"{len(failures)} funnel rows differ from the independent computation")
    sys.exit(1)
print(f"ok   funnels: {len(expected)} rows ({converted} at step 3 or beyond) equal an independent computation")
