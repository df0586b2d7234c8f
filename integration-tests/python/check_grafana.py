"""Runs every query of the Grafana dashboard against a Prometheus that a replay wrote to, at the
end of the replay, and fails when one returns no data (a panel over a metric or label that
does not exist) or when the dashboard is not a well-formed Grafana dashboard.

With --scraped, runs instead the queries of the panels over the pipeline's own /metrics (their
description starts "Scraped"), against a Prometheus that scraped a running pipeline.

usage: check_grafana.py [--scraped] DASHBOARD_JSON PROMETHEUS_URL
"""

import json
import sys
import urllib.parse
import urllib.request

args = sys.argv[1:]
scraped = "--scraped" in args
args = [a for a in args if a != "--scraped"]
path, prom = args[0], args[1].rstrip("/")
dashboard = json.load(open(path))
failures = []
for key in ("uid", "title", "panels", "schemaVersion"):
    if key not in dashboard:
        failures.append(f"the dashboard has no {key}")


def query(expr, at=None):
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    with urllib.request.urlopen(f"{prom}/api/v1/query?{urllib.parse.urlencode(params)}") as r:
        answer = json.load(r)
    if answer.get("status") != "success":
        raise RuntimeError(answer)
    return answer["data"]["result"]


# The end of the replay (the newest sample in Prometheus' head: the newest window's end), where
# every panel must have data; queried a second after it.
with urllib.request.urlopen(f"{prom}/api/v1/status/tsdb") as r:
    head = json.load(r)["data"]["headStats"]
if not head.get("numSeries"):
    sys.exit("FAIL Prometheus holds no series: no replay wrote to it")
at = head["maxTime"] / 1000 + 1
queries = 0
for panel in dashboard["panels"]:
    if panel.get("type") == "row":
        continue
    if panel.get("description", "").startswith("Scraped") != scraped:
        continue
    if "gridPos" not in panel or "datasource" not in panel:
        failures.append(f"panel {panel.get('title')}: no gridPos or datasource")
    for target in panel.get("targets", []):
        queries += 1
        expr = target["expr"]
        try:
            result = query(expr, at)
        except Exception as e:  # noqa: BLE001 - a bad query is a failure, reported
            failures.append(f"panel {panel['title']}: `{expr}` failed: {e}")
            continue
        if not result:
            failures.append(f"panel {panel['title']}: `{expr}` returned no data")
if queries == 0:
    failures.append("no query was run")
for f in failures[:20]:
    print(f"FAIL {f}")
if failures:
    sys.exit(1)
kind = "scraped from /metrics" if scraped else "over the remote-written tables"
print(f"ok   every query of the Grafana dashboard's panels {kind} returns data ({queries} queries)")
