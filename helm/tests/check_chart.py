"""The Helm chart, rendered and linted by Helm's own Go SDK (helm-python-sdk), without a cluster.

For the default values and every value set under helm/sightline/ci/:
- the values pass the chart's values.schema.json, and the chart lints clean (strict);
- every rendered manifest passes `kubernetes-validate --strict` for a current Kubernetes;
- the ConfigMap's sightline.toml is accepted by `sightline config check`;
- the PrometheusRule's groups pass `promtool check rules`, the dashboard ConfigMap is JSON;
- the pods run as non-root with a read-only root filesystem and no privilege escalation, and
  wait for the pipeline's own shutdown grace before SIGKILL.
Then invalid value sets are refused by the schema, each naming the value, and the Dockerfile
the chart's image comes from is parsed and checked against the chart's defaults.

Usage: check_chart.py SIGHTLINE_BINARY
"""

import glob
import json
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "sightline")
KUBE = "1.34.0"
sightline = sys.argv[1]
bin_dir = os.path.dirname(sys.executable)
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + ("" if ok else f": {detail}"))
    if not ok:
        failures.append(name)


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


chart = helm.Chart.load(CHART)
sets = {"default": {}}
for path in sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml"))):
    with open(path) as f:
        sets[os.path.basename(path)] = helm.values_from_yaml(f.read()) or {}

work = tempfile.mkdtemp()
for name, values in sets.items():
    try:
        chart.validate_schema(values)
        check(f"{name}: values pass values.schema.json", True)
    except helm.HelmError as e:
        check(f"{name}: values pass values.schema.json", False, str(e))
        continue
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE}")
    problems = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
    check(f"{name}: helm lint --strict", not problems and not report.get("errors"), json.dumps(report)[:2000])
    manifests = chart.render(values, name="telemetry", namespace="observability", is_install=True)
    docs = []
    for template, text in sorted(manifests.items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((template, doc))
    kinds = sorted({d["kind"] for _, d in docs})
    print(f"     {name}: {len(docs)} objects: {', '.join(kinds)}")
    # Kubernetes' own schemas (the CRDs of prometheus-operator are not among them).
    core = [d for _, d in docs if d["apiVersion"] != "monitoring.coreos.com/v1"]
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump_all(core, f)
    v = run([os.path.join(bin_dir, "kubernetes-validate"), "-k", KUBE, "--strict", "--quiet", path])
    check(f"{name}: kubernetes-validate --strict (Kubernetes {KUBE})", v.returncode == 0, v.stdout + v.stderr)

    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    config_map = next(d for d in by_kind["ConfigMap"] if "sightline.toml" in d.get("data", {}))
    toml_path = os.path.join(work, f"{name}.toml")
    with open(toml_path, "w") as f:
        f.write(config_map["data"]["sightline.toml"])
    c = run([sightline, "config", "check", toml_path], env={k: v for k, v in os.environ.items() if not k.startswith("SIGHTLINE__")})
    check(f"{name}: sightline config check accepts the ConfigMap's sightline.toml", c.returncode == 0, c.stdout + c.stderr)

    sts = by_kind["StatefulSet"][0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    sc = container["securityContext"]
    check(
        f"{name}: non-root, read-only root filesystem, no privilege escalation, capabilities dropped",
        pod["securityContext"].get("runAsNonRoot") is True
        and sc.get("readOnlyRootFilesystem") is True
        and sc.get("allowPrivilegeEscalation") is False
        and sc.get("capabilities", {}).get("drop") == ["ALL"],
        json.dumps([pod["securityContext"], sc]),
    )
    grace = (values.get("config", {}).get("pipeline", {}) or {}).get("shutdown-grace-ms", 20000)
    check(
        f"{name}: terminationGracePeriodSeconds covers the pipeline's shutdown grace",
        pod["terminationGracePeriodSeconds"] == grace // 1000 + 10,
        str(pod["terminationGracePeriodSeconds"]),
    )
    probes = (container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"])
    check(f"{name}: probes on /healthz and /readyz", probes == ("/healthz", "/readyz"), str(probes))
    key = next(e for e in container["env"] if e["name"] == "SIGHTLINE__PRIVACY__KEY")
    check(f"{name}: the privacy key comes from a Secret", "secretKeyRef" in key.get("valueFrom", {}), json.dumps(key))
    check(f"{name}: pods start in parallel behind a headless Service that publishes not-ready addresses",
          spec["podManagementPolicy"] == "Parallel"
          and any(s["spec"].get("clusterIP") == "None" and s["spec"].get("publishNotReadyAddresses") for s in by_kind["Service"]))

    # A cluster: every pod's address in the configuration, the port open on pods and on the
    # headless Service; secured brokers: the Secrets mounted where the configuration reads them.
    import tomllib

    toml = tomllib.loads(config_map["data"]["sightline.toml"])
    replicas = values.get("replicas", 1)
    full = sts["metadata"]["name"]
    strategy = spec["updateStrategy"]["type"]
    check(
        f"{name}: {'OnDelete' if replicas > 1 else 'RollingUpdate'} updates ({strategy})",
        strategy == ("OnDelete" if replicas > 1 else values.get("updateStrategy", {}).get("type", "RollingUpdate")),
    )
    if replicas > 1:
        policy = by_kind.get("NetworkPolicy", [])
        rules = policy[0]["spec"]["ingress"] if policy else []
        cluster_rule = next((r for r in rules if any(p["port"] == 2101 for p in r.get("ports", []))), {})
        check(
            f"{name}: a NetworkPolicy admits the cluster's port from the release's pods only",
            len(policy) == 1
            and cluster_rule.get("from", [{}])[0].get("podSelector", {}).get("matchLabels") == spec["selector"]["matchLabels"],
            json.dumps(rules),
        )
        want = [f"{full}-{i}.{full}-headless.observability.svc.cluster.local:2101" for i in range(replicas)]
        ports = [p["name"] for p in container["ports"]]
        headless = next(s for s in by_kind["Service"] if s["spec"].get("clusterIP") == "None")
        check(
            f"{name}: a {replicas}-process cluster: every pod's address, its own index from the host name, the port on pods and Service",
            toml.get("cluster", {}).get("processes") == want
            and "process" not in toml["cluster"]
            and toml["cluster"].get("listen") == "0.0.0.0:2101"
            and "cluster" in ports
            and any(p["name"] == "cluster" for p in headless["spec"]["ports"])
            and toml["lake"]["location"].startswith("s3://"),
            json.dumps([toml.get("cluster"), ports]),
        )
    else:
        check(f"{name}: one process, no [cluster]", "cluster" not in toml, json.dumps(toml.get("cluster")))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    tls = values.get("kafka", {}).get("tls", {}).get("existingSecret")
    sasl = values.get("kafka", {}).get("sasl", {}).get("existingSecret")
    options = toml.get("kafka", {}).get("options", {})
    files = toml.get("kafka", {}).get("option-files", {})
    check(
        f"{name}: the brokers' CA and SASL password come from Secrets, mounted where the configuration reads them",
        (not tls or (secrets.get("kafka-tls") == tls and options.get("ssl.ca.location", "").startswith(mounts["kafka-tls"])))
        and all(options.get(opt, "").startswith("/etc/sightline/kafka-tls/")
                for key, opt in [("certKey", "ssl.certificate.location"), ("keyKey", "ssl.key.location")]
                if values.get("kafka", {}).get("tls", {}).get(key))
        and (not sasl or (secrets.get("kafka-sasl") == sasl and files.get("sasl.password", "").startswith(mounts["kafka-sasl"])))
        and "sasl.password" not in options,
        json.dumps([mounts, secrets, options, files]),
    )

    for rule in by_kind.get("PrometheusRule", []):
        rules_path = os.path.join(work, f"{name}-rules.yml")
        with open(rules_path, "w") as f:
            yaml.safe_dump(rule["spec"], f)
        p = run(["promtool", "check", "rules", rules_path])
        check(f"{name}: promtool check rules on the PrometheusRule", p.returncode == 0, p.stdout + p.stderr)
    for cm in by_kind["ConfigMap"]:
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            dashboard = json.loads(cm["data"]["sightline.json"])
            check(f"{name}: the Grafana dashboard ConfigMap holds the dashboard", len(dashboard.get("panels", [])) > 10)

# Invalid values: refused by the schema before anything renders, naming the value.
for values, named in [
    ({"replicas": 0}, "replicas"),
    ({"replicas": 3}, "location"),
    ({"replicas": 2, "config": {"kafka": {"topics": [{"name": "t"}]}, "lake": {"location": "/data/lake"}}}, "location"),
    ({"config": {"kafka": {"topics": [{"name": "t"}]}, "lake": {"location": "s3://b"}, "cluster": {"processes": []}}}, "cluster"),
    ({"kafka": {"sasl": {"password": "hunter2"}}}, "password"),
    ({"replicas": 3, "updateStrategy": {"type": "RollingUpdate"},
      "config": {"kafka": {"topics": [{"name": "t"}]}, "lake": {"location": "s3://b"}}}, "OnDelete"),
    ({"httpPort": "9464"}, "httpPort"),
    ({"privacy": {"existingSecret": ""}}, "existingSecret"),
    ({"config": {"kafka": {"topics": []}}}, "topics"),
    ({"config": {"pipeline": {"workers": 0}}}, "workers"),
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "enabled"),
    ({"replica": 1}, "replica"),
]:
    try:
        chart.validate_schema(values)
        check(f"invalid values {values} refused", False, "accepted")
    except helm.HelmError as e:
        check(f"invalid values {values} refused naming {named}", named in str(e), str(e))
    try:
        chart.render(values, name="telemetry", namespace="observability")
        check(f"invalid values {values} do not render", False, "rendered")
    except helm.HelmError:
        pass

# The image the chart runs: the Dockerfile, parsed by BuildKit's own parser (PyPI `dockerfile`;
# no Docker engine runs here, so it is not built): two stages, the build stage's cargo command
# the one the test command runs, and a runtime user and port that match the chart's defaults.
import dockerfile

commands = dockerfile.parse_file(os.path.join(os.path.dirname(ROOT), "Dockerfile"))
stages = [c for c in commands if c.cmd.upper() == "FROM"]
runs = " ".join(" ".join(c.value) for c in commands if c.cmd.upper() == "RUN")
user = [c.value[0] for c in commands if c.cmd.upper() == "USER"]
exposed = [v for c in commands if c.cmd.upper() == "EXPOSE" for v in c.value]
defaults = chart.values
check("Dockerfile: multi-stage (build, runtime)", len(stages) == 2, str([c.value for c in stages]))
check("Dockerfile: builds with cargo build --release --locked -p sightline", "cargo build --release --locked -p sightline" in runs, runs)
check("Dockerfile: the runtime has CA certificates and OpenSSL (TLS to brokers)", "ca-certificates" in runs, runs)
check(
    "Dockerfile: runs as the chart's non-root user and exposes its HTTP and cluster ports",
    user == [f"{defaults['podSecurityContext']['runAsUser']}:{defaults['podSecurityContext']['runAsGroup']}"]
    and exposed == [str(defaults["httpPort"]), str(defaults["cluster"]["port"])],
    f"{user} {exposed}",
)

if failures:
    print(f"{len(failures)} chart check(s) failed")
    sys.exit(1)
print("chart: every check passed")
