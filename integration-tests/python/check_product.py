"""Recomputes the command-queue, integration-health, feedback, alerts and triage tables from a replayed
input file, independently of Sightline (plain Python over the JSON lines), and compares them
with the lake (read with DuckDB). The definitions are the README's.

Accepted events are the input lines that are not dead letters. The alerts include the
experiments' compliance alerts. Quantiles are the exact samples
at rank floor(q*(n-1)); the lake's must be within 1% of them. Alerts use the default rules
(error rate > 5% with at least 20 calls: page; p99 > 2 s: warning; breaker open: critical).

usage: check_product.py LAKE_DIR INPUT_FILE WINDOW_MS
"""

import glob
import json
import sys
from collections import defaultdict

import duckdb
from accepted import accepted_lines, event_time_ms

lake, input_path, window_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = duckdb.connect()
failures = []


def parquet(table, restricted):
    root = f"{lake}/restricted/{table}" if restricted else f"{lake}/{table}"
    if not glob.glob(f"{root}/**/*.parquet", recursive=True):
        return []
    cur = con.execute(f"SELECT * EXCLUDE (dt, hr, window_start, window_end), epoch_ms(window_start) AS ws FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true)")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def quantile(samples, q):
    s = sorted(samples)
    return s[int(q * (len(s) - 1))]


def near(got, exact, rel=0.01):
    return got is not None and abs(got - exact) <= rel * abs(exact) + 1e-6


def check_spread(where, got, samples, q_names):
    if not samples:
        return
    for q, name in q_names:
        if not near(got.get(name), quantile(samples, q)):
            failures.append(f"{where}: {name} {got.get(name)} vs exact {quantile(samples, q)}")


events = []
for _, e in accepted_lines(con, lake, input_path):
    at = event_time_ms(e)
    e["_at"], e["_w"] = at, at - at % window_ms
    e["_r"] = e.get("data_sensitivity") == "restricted" or e.get("pii_classification") == "high"
    e["_p"] = e.get("properties") or {}
    events.append(e)

# command_queue
cq = defaultdict(lambda: {"generated": 0, "viewed": 0, "accepted": 0, "dismissed": 0, "aps_a": [], "aps_d": [], "ttd": [], "reasons": defaultdict(int)})
for e in events:
    n = e["event_name"]
    if n not in ("recommendation_generated", "recommendation_viewed", "recommendation_accepted", "recommendation_dismissed"):
        continue
    groups = ["all"] + ([e["_p"]["action_type"]] if "action_type" in e["_p"] else [])
    for g in groups:
        c = cq[(e["_r"], e["_w"], g)]
        c[{"recommendation_generated": "generated", "recommendation_viewed": "viewed", "recommendation_accepted": "accepted", "recommendation_dismissed": "dismissed"}[n]] += 1
        if n == "recommendation_accepted":
            c["aps_a"].append(e["_p"]["aps_score"])
            c["ttd"].append(e["_p"]["time_to_decision_seconds"])
        if n == "recommendation_dismissed":
            c["aps_d"].append(e["_p"]["aps_score"])
            c["reasons"][e["_p"]["dismiss_reason"]] += 1
got = {(r, row["ws"], row["action_type"]): row for r in (False, True) for row in parquet("command_queue", r)}
if set(got) != set(cq):
    failures.append(f"command_queue rows: {len(set(cq) - set(got))} missing, {len(set(got) - set(cq))} extra")
for key, c in cq.items():
    row = got.get(key)
    if row is None:
        continue
    for col in ("generated", "viewed", "accepted", "dismissed"):
        if row[col] != c[col]:
            failures.append(f"command_queue {key}: {col} {row[col]} vs {c[col]}")
    rate = c["accepted"] / c["generated"] if c["generated"] else None
    if (rate is None) != (row["acceptance_rate"] is None) or (rate is not None and abs(rate - row["acceptance_rate"]) > 1e-12):
        failures.append(f"command_queue {key}: acceptance_rate {row['acceptance_rate']} vs {rate}")
    if row["aps_accepted_count"] != len(c["aps_a"]) or (c["aps_a"] and not near(row["aps_accepted_mean"], sum(c["aps_a"]) / len(c["aps_a"]), 1e-6)):
        failures.append(f"command_queue {key}: aps_accepted count/mean")
    check_spread(f"command_queue {key}", row, c["aps_a"], [(0.5, "aps_accepted_p50"), (0.9, "aps_accepted_p90")])
    check_spread(f"command_queue {key}", row, c["aps_d"], [(0.5, "aps_dismissed_p50"), (0.9, "aps_dismissed_p90")])
    check_spread(f"command_queue {key}", row, c["ttd"], [(0.5, "time_to_decision_s_p50"), (0.9, "time_to_decision_s_p90")])
    if json.loads(row["dismiss_reasons"]) != dict(c["reasons"]):
        failures.append(f"command_queue {key}: dismiss_reasons {row['dismiss_reasons']} vs {dict(c['reasons'])}")

# integration_health and alerts
ih = defaultdict(lambda: {"calls": 0, "failures": 0, "rl": 0, "lat": [], "opens": 0, "opened": None, "success": None})
for e in events:
    n, p = e["event_name"], e["_p"]
    if n == "integration_call_success":
        c = ih[(e["_r"], e["_w"], p["integration"])]
        c["calls"] += 1
        c["lat"].append(p["duration_ms"])
        c["success"] = max(c["success"] or 0, e["_at"])
        c["rl"] += p["status_code"] == 429
    elif n == "integration_call_failed":
        c = ih[(e["_r"], e["_w"], p["integration"])]
        c["calls"] += 1
        c["failures"] += 1
        c["rl"] += p["status_code"] == 429
    elif n == "circuit_breaker_opened":
        c = ih[(e["_r"], e["_w"], p["service"])]
        c["opens"] += 1
        c["opened"] = max(c["opened"] or 0, e["_at"])
expected_rows, expected_alerts = {}, set()
for route in (False, True):
    data_windows = sorted({w for (r, w, _) in ih if r == route})
    if not data_windows:
        continue
    open_, firing = set(), set()
    w, last = data_windows[0], data_windows[-1]
    while w <= last:
        names = {i for (r, ww, i) in ih if r == route and ww == w} | open_
        if not names and not firing:
            w = min((d for d in data_windows if d > w), default=last + window_ms)
            continue
        now = set()
        for i in sorted(names):
            c = ih.get((route, w, i), {"calls": 0, "failures": 0, "rl": 0, "lat": [], "opens": 0, "opened": None, "success": None})
            if c["opened"] is not None and (c["success"] is None or c["opened"] >= c["success"]):
                open_.add(i)
            elif c["success"] is not None:
                open_.discard(i)
            expected_rows[(route, w, i)] = (c, i in open_)
            p99 = quantile(c["lat"], 0.99) if c["lat"] else 0.0
            enough = c["calls"] >= 20
            if enough and c["calls"] and c["failures"] / c["calls"] > 0.05:
                now.add(("error_rate", i))
            if enough and p99 > 2000.0:
                now.add(("latency_p99", i))
            if i in open_:
                now.add(("breaker_open", i))
        for rule, i in now - firing:
            expected_alerts.add((route, w, rule, i, "firing"))
        for rule, i in firing - now:
            expected_alerts.add((route, w, rule, i, "resolved"))
        firing = now
        w += window_ms
got = {(r, row["ws"], row["integration"]): row for r in (False, True) for row in parquet("integration_health", r)}
if set(got) != set(expected_rows):
    failures.append(f"integration_health rows: {sorted(set(expected_rows) - set(got))[:3]} missing, {sorted(set(got) - set(expected_rows))[:3]} extra")
for key, (c, is_open) in expected_rows.items():
    row = got.get(key)
    if row is None:
        continue
    for col, value in (("calls", c["calls"]), ("failures", c["failures"]), ("rate_limit_hits", c["rl"]), ("breaker_opens", c["opens"]), ("latency_count", len(c["lat"]))):
        if row[col] != value:
            failures.append(f"integration_health {key}: {col} {row[col]} vs {value}")
    if row["breaker_state"] != ("open" if is_open else "closed"):
        failures.append(f"integration_health {key}: breaker_state {row['breaker_state']}")
    check_spread(f"integration_health {key}", row, c["lat"], [(0.5, "latency_p50_ms"), (0.95, "latency_p95_ms"), (0.99, "latency_p99_ms")])
# Compliance alerts of the experiments (analysed with the default metrics, which count every
# event of an exposed unit, so an experiment has data in a window when a standard-route event of
# a unit exposed by then, or a restricted event with its assignment, falls in it): `firing` in
# the first window with restricted events that carry its assignment, `resolved` at the next
# window with data and none.
exposed_at = defaultdict(dict)
for e in events:
    if not e["_r"]:
        unit = (e["tenant_id"], e["user_id"])
        for exp in e.get("experiment_assignments") or {}:
            exposed_at[unit][exp] = min(exposed_at[unit].get(exp, e["_at"]), e["_at"])
with_data, compliance = defaultdict(set), defaultdict(set)
for e in events:
    if e["_r"]:
        for exp in e.get("experiment_assignments") or {}:
            with_data[exp].add(e["_w"])
            compliance[exp].add(e["_w"])
    else:
        for exp, at in exposed_at.get((e["tenant_id"], e["user_id"]), {}).items():
            if e["_at"] >= at:
                with_data[exp].add(e["_w"])
compliance_alerts = 0
for exp, windows in with_data.items():
    firing = False
    for w in sorted(windows):
        now = w in compliance[exp]
        if now != firing:
            expected_alerts.add((False, w, "compliance", exp, "firing" if now else "resolved"))
            compliance_alerts += 1
        firing = now
if not compliance_alerts:
    failures.append("no compliance alert: the input does not exercise the experiments' compliance check")
alerts = {(r, row["ws"], row["rule"], row["subject"], row["state"]) for r in (False, True) for row in parquet("alerts", r)}
if alerts != expected_alerts:
    failures.append(f"alerts: missing {sorted(expected_alerts - alerts)[:4]}, extra {sorted(alerts - expected_alerts)[:4]}")

# feedback
fb = defaultdict(lambda: {"count": 0, "scores": [0] * 5, "all": [], "sent": defaultdict(int), "tags": defaultdict(int), "blocked": 0})
for e in events:
    if e["event_name"] != "project_feedback_submitted":
        continue
    p = e["_p"]
    breakdowns = [("all", "all")] + [(f"experiment:{k}", v) for k, v in (e.get("experiment_assignments") or {}).items()] + [("user_role", e.get("user_role") or "(none)")]
    for b, v in breakdowns:
        c = fb[(e["_r"], e["_w"], e["feature_area"], b, v)]
        c["count"] += 1
        c["scores"][p["score"] - 1] += 1
        c["all"].append(p["score"])
        c["sent"][p["sentiment"]] += 1
        for t in p["tags"]:
            c["tags"][t] += 1
        c["blocked"] += bool(p["blocked"])
got = {(r, row["ws"], row["feature_area"], row["breakdown"], row["breakdown_value"]): row for r in (False, True) for row in parquet("feedback", r)}
if set(got) != set(fb):
    failures.append(f"feedback rows: {len(set(fb) - set(got))} missing, {len(set(got) - set(fb))} extra")
for key, c in fb.items():
    row = got.get(key)
    if row is None:
        continue
    if row["count"] != c["count"] or [row[f"score_{s}"] for s in range(1, 6)] != c["scores"] or row["blocked"] != c["blocked"]:
        failures.append(f"feedback {key}: counts")
    if not near(row["mean_score"], sum(c["all"]) / len(c["all"]), 1e-9):
        failures.append(f"feedback {key}: mean_score {row['mean_score']}")
    if json.loads(row["sentiments"]) != dict(c["sent"]) or json.loads(row["tags"]) != dict(c["tags"]):
        failures.append(f"feedback {key}: sentiments or tags")

# triage: critical feedback with the same user's errors of the 15 minutes before
errors_by_user = defaultdict(list)
for e in events:
    if e["event_type"] == "error":
        p = e["_p"]
        code = p.get("error_code") or p.get("error_type")
        if code is None and "status_code" in p:
            code = str(float(p["status_code"])).removesuffix(".0")
        errors_by_user[(e["_r"], e["user_id"])].append((e["_at"], e["event_name"], code))
expected_triage = {}
for e in events:
    p = e["_p"]
    if e["event_name"] != "project_feedback_submitted" or not (p["score"] <= 2 or p["blocked"]):
        continue
    errs = sorted((t, n, c) for (t, n, c) in errors_by_user[(e["_r"], e["user_id"])] if e["_at"] - 900_000 <= t <= e["_at"])
    expected_triage[e["event_id"]] = (e["_r"], e["_w"], [n for _, n, _ in errs], [c for _, _, c in errs], p["score"], p["blocked"], p["correlation_id"])
got = {row["event_id"]: row for r in (False, True) for row in parquet("triage", r)}
if set(got) != set(expected_triage):
    failures.append(f"triage: {len(set(expected_triage) - set(got))} missing, {len(set(got) - set(expected_triage))} extra")
for event_id, (restricted, w, names, codes, score, blocked, correlation) in expected_triage.items():
    row = got.get(event_id)
    if row is None:
        continue
    if (row["ws"], row["route"] == "restricted") != (w, restricted):
        failures.append(f"triage {event_id}: window or route")
    if json.loads(row["recent_error_names"]) != names or json.loads(row["recent_error_codes"]) != codes:
        failures.append(f"triage {event_id}: errors {row['recent_error_names']} {row['recent_error_codes']} vs {names} {codes}")
    if row["score"] != score or row["blocked"] != blocked or row["correlation_id"] != correlation:
        failures.append(f"triage {event_id}: score, blocked or correlation_id")
    if row["recent_errors"] != len(names):
        failures.append(f"triage {event_id}: recent_errors {row['recent_errors']}")
with_errors = sum(1 for v in expected_triage.values() if v[2])
if not with_errors:
    failures.append("no triage record has recent errors: the input does not exercise the join")

fired = sum(1 for a in expected_alerts if a[4] == "firing")
resolved = sum(1 for a in expected_alerts if a[4] == "resolved")
if not fired or not resolved:
    failures.append(f"the input fires {fired} and resolves {resolved} alerts: it does not exercise the rules")
for f in failures[:20]:
    print(f"FAIL {f}")
if failures:
    print(f"{len(failures)} differences from the independent computation")
    sys.exit(1)
print(f"ok   command_queue ({len(cq)} rows), integration_health ({len(expected_rows)}), feedback ({len(fb)}), alerts ({fired} firing, {resolved} resolved), triage ({len(expected_triage)} records, {with_errors} with recent errors) equal an independent computation")
