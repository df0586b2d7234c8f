"""Recomputes the `experiment_did` rows of the rollouts declared in a replay's configuration
from its input file, independently of Sightline (plain Python and scipy over the JSON lines),
and compares them with the lake (read with DuckDB). The definitions are the README's
("Rollouts by tenant"):

- per tenant and period (`analytics.cuped-period-ms`), over the accepted standard-route events
  that carry a user: the distinct users, and each metric (errors: events of type `error`;
  events: every event; error_rate: errors / events; support_tickets, whose rule is the
  triage rule that check_product.py checks, are left out here);
- a tenant's value is the metric per distinct user (error_rate: the ratio of its sums), its
  change the mean over the periods from its cohort's start to the window's less the mean over
  the lookback's periods before it, and the pre-trend the later half of those less the earlier;
- per cohort, DiD = mean treated change - mean control change (controls: every other tenant
  with data), its variance the sum of the tenants' squared influences with n/(n-1) per group
  (a lone treated tenant borrows the controls' variance), Student's t with Welch-Satterthwaite
  degrees of freedom; all cohorts: weighted by treated tenants.

usage: check_did.py LAKE_DIR INPUT_FILE CONFIG
"""

import glob
import math
import sys
import tomllib
from collections import defaultdict

import duckdb
from accepted import accepted_lines, event_time_ms
from scipy import stats

lake, input_path, config_path = sys.argv[1], sys.argv[2], sys.argv[3]
with open(config_path, "rb") as f:
    config = tomllib.load(f)
window_ms = config["pipeline"]["window-ms"]
period_ms = config["analytics"]["cuped-period-ms"]
periods = config["analytics"]["cuped-lookback-ms"] // period_ms
rollouts = [e for e in config["experiments"] if e.get("rollout")]
con = duckdb.connect()
failures = []

events = []
for _, e in accepted_lines(con, lake, input_path):
    if e.get("data_sensitivity") == "restricted" or e.get("pii_classification") == "high":
        continue
    if not e.get("user_id") or not e.get("tenant_id"):
        continue
    events.append((e["tenant_id"], e["user_id"], event_time_ms(e), e["event_type"] == "error"))

rows = con.execute(f"SELECT * EXCLUDE (dt, hr, window_start, window_end), epoch_ms(window_start) AS ws FROM read_parquet('{lake}/experiment_did/**/*.parquet', hive_partitioning=true)").fetchall() if glob.glob(f"{lake}/experiment_did/**/*.parquet", recursive=True) else []
names = [d[0] for d in con.description] if rows else []
got = {(r["experiment_id"], r["ws"], r["metric"], r["cohort_start_ms"]): r for r in (dict(zip(names, row)) for row in rows)}


def did(cohorts, alpha):
    """cohorts: [(treated changes, {control: change})]. Returns (estimate, p, lower, upper) or None."""
    usable = [(t, c) for t, c in cohorts if t and len(c) >= 2]
    n_treated = sum(len(t) for t, _ in usable)
    if not n_treated:
        return None
    estimate, terms, influence = 0.0, [], defaultdict(float)
    for t, c in usable:
        w = len(t) / n_treated
        mt, mc = sum(t) / len(t), sum(c.values()) / len(c)
        estimate += w * (mt - mc)
        vc = sum((x - mc) ** 2 for x in c.values()) / (len(c) - 1)
        if len(t) >= 2:
            vt = sum((x - mt) ** 2 for x in t) / (len(t) - 1)
            terms.append((w * w * vt / len(t), len(t) - 1))
        else:
            terms.append((w * w * vc, len(c) - 1))
        for k, x in c.items():
            influence[k] += w * (x - mc) / len(c)
    n = len(influence)
    terms.append((sum(v * v for v in influence.values()) * n / (n - 1), n - 1))
    var = sum(v for v, _ in terms)
    if not var > 0:
        return None
    df = var * var / sum(v * v / d for v, d in terms if v > 0)
    se = math.sqrt(var)
    half = stats.t.ppf(1 - alpha / 2, df) * se
    return estimate, min(1.0, 2 * stats.t.sf(abs(estimate) / se, df)), estimate - half, estimate + half


checked = 0
expected = set()
for exp in rollouts:
    alpha = exp.get("alpha", 0.05)
    cohorts = [(c["start-ms"], set(c["tenants"])) for c in exp["rollout"]]
    treated_all = set().union(*(t for _, t in cohorts))
    first = min(s for s, _ in cohorts) // period_ms - periods
    ends = sorted({at - at % window_ms + window_ms for _, _, at, _ in events})
    for end in ends:
        cells = defaultdict(lambda: [set(), 0, 0])
        for tenant, user, at, error in events:
            if at < end and at // period_ms >= first:
                c = cells[(tenant, at // period_ms)]
                c[0].add(user)
                c[1] += error
                c[2] += 1
        if not cells:
            continue
        now = (end - 1) // period_ms
        controls = sorted({t for t, _ in cells} - treated_all)
        started = [(s, t) for s, t in cohorts if s < end]
        for metric in ("errors", "events", "error_rate"):
            def value(tenant, p):
                c = cells.get((tenant, p))
                if c is None:
                    return None
                return {"errors": c[1] / len(c[0]), "events": c[2] / len(c[0]), "error_rate": c[1] / c[2] if c[2] else None}[metric]

            def mean(tenant, a, b):
                vs = [v for v in (value(tenant, p) for p in range(a, b)) if v is not None]
                return sum(vs) / len(vs) if vs else None

            def change(tenant, start, placebo):
                pre_to = start // period_ms
                pre_from, post_from = pre_to - periods, -(-start // period_ms)
                if placebo:
                    mid = pre_from + (pre_to - pre_from) // 2
                    a, b = mean(tenant, mid, pre_to), mean(tenant, pre_from, mid)
                else:
                    a, b = mean(tenant, post_from, now + 1), mean(tenant, pre_from, pre_to)
                return None if a is None or b is None else a - b

            def cohort_changes(start, tenants, placebo):
                t = [x for x in (change(k, start, placebo) for k in sorted(tenants)) if x is not None]
                c = {k: x for k in controls if (x := change(k, start, placebo)) is not None}
                return t, c

            wanted = [(s, [cohort_changes(s, t, False)], [cohort_changes(s, t, True)]) for s, t in started]
            if len(started) > 1:
                wanted.append((None, [w[1][0] for w in wanted], [w[2][0] for w in wanted]))
            for start, main, placebo in wanted:
                key = (exp["id"], end - window_ms, metric, start)
                expected.add(key)
                row = got.get(key)
                if row is None:
                    failures.append(f"experiment_did {key}: missing")
                    continue
                d, p = did(main, alpha), did(placebo, alpha)
                state = "insufficient" if d is None else "pre_trend" if p is not None and p[1] < alpha else ("significant_positive" if d[0] > 0 else "significant_negative") if d[1] < alpha else "running"
                if row["state"] != state:
                    failures.append(f"experiment_did {key}: state {row['state']} vs {state}")
                for col, want in (("estimate", d and d[0]), ("p_value", d and d[1]), ("lower", d and d[2]), ("upper", d and d[3]), ("pre_trend", p and p[0]), ("pre_trend_p_value", p and p[1])):
                    have = row[col]
                    if (have is None) != (want is None) or (want is not None and abs(have - want) > 1e-9 * max(1.0, abs(want))):
                        failures.append(f"experiment_did {key}: {col} {have} vs {want}")
                treated = sum(len(t) for t, _ in main)
                control = len(set().union(*(c.keys() for _, c in main)))
                if (row["treated_tenants"], row["control_tenants"]) != (treated, control):
                    failures.append(f"experiment_did {key}: tenants {row['treated_tenants']}, {row['control_tenants']} vs {treated}, {control}")
                checked += d is not None
extra = {k for k in got if k[2] != "support_tickets"} - expected
if extra:
    failures.append(f"experiment_did: {len(extra)} rows not expected, e.g. {sorted(extra, key=str)[:2]}")

if not checked:
    failures.append("no DiD estimate was compared: the input does not exercise the rollout")
for f in failures[:20]:
    print(f"FAIL {f}")
if failures:
    print(f"{len(failures)} differences from the independent computation")
    sys.exit(1)
print(f"ok   experiment_did ({checked} estimates over {len(got)} rows) equals an independent computation")
