"""deploy/ assets: validated by the real tools, and consistent with what the server exports."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.metrics import FLEET_GAUGES, Metrics, QualityMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `bash deploy/setup.sh --test` installs Debian's prometheus "
                    "and prometheus-alertmanager")
    return path


def run(*argv, cwd=None):
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_promtool_and_amtool_accept_the_configs(tmp_path):
    assert "SUCCESS" in run(tool("promtool"), "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS: 4 rules found" in run(tool("promtool"), "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in run(tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    spec = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())["spec"]
    (tmp_path / "rule.yml").write_text(yaml.safe_dump(spec))
    assert "SUCCESS" in run(tool("promtool"), "check", "rules", str(tmp_path / "rule.yml"))


def test_probe_alerts_fire_on_failing_and_stuck_probes():
    """alerts_test.yml: a failing probe (its accuracy withdrawn) fires ProbeFailing and
    Stale, a stuck one (the last good accuracy still exported) fires Stale, a good one neither."""
    out = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out
    tested = {t["alertname"] for t in yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"][0]
              ["alert_rule_test"]}
    assert {"TransplantQualityProbeFailing", "TransplantQualityStale"} <= tested


def test_prometheusrule_matches_alerts_yml():
    spec = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())["spec"]
    assert spec == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())


def _exported_names() -> set[str]:
    m = Metrics()
    QualityMetrics(m.registry)
    names = set()
    for fam in m.registry.collect():
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    for fam in m.registry.collect():       # histograms and counters expose suffixed series
        for suffix in ("_total", "_bucket", "_sum", "_count"):
            names.add(fam.name + suffix)
    return names | set(FLEET_GAUGES)       # a fleet replica's (Metrics.watch_fleet)


def test_rules_and_dashboard_use_only_exported_metrics():
    names = _exported_names()
    exprs = [r["expr"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "transplant-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    used = {m for e in exprs for m in re.findall(r"\b(transplant_[a-z_]+)", e)}
    assert used and used <= names, used - names
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for want in ("quality", "swaps", "latency", "throughput", "batch"):
        assert want in titles


def test_alert_carries_the_generation_and_the_webhook_the_token():
    rule = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"][0]
    assert rule["alert"] == "TransplantQualityRegression" and "generation" in rule["expr"]
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    hook = am["receivers"][0]["webhook_configs"][0]
    assert hook["url"].endswith("/alerts") and hook["http_config"]["authorization"]["type"] == "Bearer"
    assert "generation" in am["route"]["group_by"]


def test_kubernetes_manifests():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PrometheusRule", "PersistentVolumeClaim"} <= kinds
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    from server.config import ServeConfig

    cfg = ServeConfig(**yaml.safe_load(cm["data"]["config.yaml"]))      # the shipped config validates
    assert cfg.grpc_listen.endswith(":50051") and cfg.probes


def test_containerfile_runs_the_setup_and_serve():
    text = (DEPLOY / "Containerfile").read_text()
    assert "deploy/setup.sh" in text and '"serve"' in text and "EXPOSE 50051 9400" in text


def test_fleet_manifests_and_rules(tmp_path):
    docs = [d for f in sorted((DEPLOY / "k8s" / "fleet").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    dep = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "transplant")
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    etcd = by_kind["StatefulSet"][0]
    assert etcd["spec"]["replicas"] == 3 and "etcd" in etcd["spec"]["template"]["spec"]["containers"][0]["image"]
    pvc = next(d for d in by_kind["PersistentVolumeClaim"] if d["metadata"]["name"] == "transplant-store")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["store"]["persistentVolumeClaim"]["claimName"] == "transplant-store" and "emptyDir" in vols["state"]
    from server.config import ServeConfig

    cm = next(d for d in by_kind["ConfigMap"] if d["metadata"]["name"] == "transplant-fleet-config")
    cfg = ServeConfig(**yaml.safe_load(cm["data"]["config.yaml"]))
    mounts = {m["name"]: m["mountPath"] for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert cfg.fleet and str(cfg.fleet.store) == mounts["store"] and str(cfg.state_dir) == mounts["state"]
    assert "transplant-etcd-client" in cfg.fleet.etcd
    rules = yaml.safe_load((DEPLOY / "prometheus" / "fleet-alerts.yml").read_text())
    assert by_kind["PrometheusRule"][0]["spec"] == rules
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    rollback = [r["alert"] for r in alerts if r["labels"].get("action") == "rollback"]
    assert rollback and set(rollback) <= set(cfg.rollback_alerts)
    (tmp_path / "fleet.yml").write_text(yaml.safe_dump(rules))
    assert "SUCCESS" in run(tool("promtool"), "check", "rules", str(tmp_path / "fleet.yml"))
    names = _exported_names()
    used = {m for r in rules["groups"][0]["rules"] for m in re.findall(r"\b(transplant_[a-z_]+)", r["expr"])}
    assert used and used <= names, used - names


def test_the_drift_rule_passes_promtool_and_uses_exported_metrics():
    """deploy/prometheus/drift-alerts.yml (opt-in, with drift.enabled) names what the server exports."""
    assert "SUCCESS: 1 rules found" in run(tool("promtool"), "check", "rules", "drift-alerts.yml",
                                           cwd=DEPLOY / "prometheus")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "drift-alerts.yml").read_text())
    used = {m for g in rules["groups"] for r in g["rules"] for m in re.findall(r"\b(transplant_[a-z_]+)", r["expr"])}
    assert used == {"transplant_drift_kl"} and used <= _exported_names()
