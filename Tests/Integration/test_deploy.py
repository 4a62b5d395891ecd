"""Deploy/ and Dashboards/ checked with the real tools: kustomize, yamllint, Kubernetes schemas,
the CRDs in ../shared/crds, promtool, and a real Prometheus fed by real callbacks."""
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import jsonschema
import pytest
import yaml

from conftest import CRDS, DASHBOARDS, DEPLOY, Prometheus, callback, kustomize_objects, need, prometheus_rule_groups

CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
          ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
          ("kuadrant.io/v1", "AuthPolicy"): "kuadrant.io_authpolicies.yaml"}


def test_kustomize_builds_every_object():
    kinds = sorted((o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in kustomize_objects())
    assert kinds == sorted([
        ("AuthPolicy", "llm-d", "llm-api"),
        ("ConfigMap", "llm-d", "usage-tracking"),
        ("Deployment", "llm-d", "usage-tracking"),
        ("NetworkPolicy", "llm-d", "usage-tracking"),
        ("PodDisruptionBudget", "llm-d", "usage-tracking"),
        ("PrometheusRule", "llm-d", "usage-tracking"),
        ("Secret", "kuadrant-system", "freeuser1-api-key"),
        ("Secret", "kuadrant-system", "premiumuser1-api-key"),
        ("Secret", "kuadrant-system", "usage-tracking-callback"),
        ("Secret", "llm-d", "usage-tracking-callback"),
        ("Service", "llm-d", "usage-tracking"),
        ("ServiceMonitor", "llm-d", "usage-tracking"),
    ])


def test_yamllint_is_clean():
    files = glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True)
    result = subprocess.run([need("yamllint"), "--strict", "-c", os.path.join(DEPLOY, ".yamllint"), *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_objects_validate_against_kubernetes_schemas():
    core = [o for o in kustomize_objects() if (o["apiVersion"], o["kind"]) not in CUSTOM]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(core, f)
    try:
        result = subprocess.run([need("kubernetes-validate"), "--strict", "-k", "1.30.0", f.name],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count(" passed for resource ") == len(core), result.stdout
    finally:
        os.unlink(f.name)


@pytest.mark.parametrize("api_version,kind", sorted(CUSTOM))
def test_custom_resources_validate_against_their_crds(api_version, kind):
    path = os.path.join(CRDS, CUSTOM[(api_version, kind)])
    if not os.path.exists(path):
        pytest.skip(f"CRD {path} is absent: the project reads CRDs from ../shared/crds and does not copy them")
    with open(path) as f:
        crd = yaml.safe_load(f)
    version = api_version.split("/")[1]
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    objects = [o for o in kustomize_objects() if (o["apiVersion"], o["kind"]) == (api_version, kind)]
    assert objects
    # The CRDs carry Go regular expressions ("(?i)" mid-pattern) that Python's metaschema check
    # refuses, so validate without checking the schema itself.
    validator = jsonschema.Draft7Validator(schema)
    for obj in objects:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, errors
    # The validation is live: a spec of the wrong type is refused.
    assert list(validator.iter_errors({**objects[0], "spec": "not an object"}))


def rules_directory():
    directory = tempfile.mkdtemp(prefix="rules-")
    with open(os.path.join(directory, "usage-tracking.rules.yaml"), "w") as f:
        yaml.safe_dump({"groups": prometheus_rule_groups()}, f, sort_keys=False)
    shutil.copy(os.path.join(DEPLOY, "tests", "prometheusrule-test.yaml"), directory)
    return directory


@pytest.mark.parametrize("arguments,expected", [
    (["check", "rules", "usage-tracking.rules.yaml"], "SUCCESS: 10 rules found"),
    (["test", "rules", "prometheusrule-test.yaml"], "SUCCESS"),
])
def test_promtool_on_the_rules(arguments, expected):
    directory = rules_directory()
    try:
        result = subprocess.run([need("promtool"), *arguments], cwd=directory, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert expected in result.stdout + result.stderr
    finally:
        shutil.rmtree(directory)


def test_every_alert_in_the_rules_has_a_unit_test():
    with open(os.path.join(DEPLOY, "tests", "prometheusrule-test.yaml")) as f:
        tested = {case["alertname"] for test in yaml.safe_load(f)["tests"] for case in test.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in prometheus_rule_groups() for r in g["rules"] if "alert" in r}
    assert alerts == tested


def dashboards():
    for path in sorted(glob.glob(os.path.join(DASHBOARDS, "*.json"))):
        with open(path) as f:
            yield os.path.basename(path), json.load(f)


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s",
                     "$namespace": ".*", "$group": ".*", "$user": ".*"}


def substitute(expr):
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    return expr


def test_dashboards_are_importable_and_aggregate_across_replicas():
    names = [name for name, _ in dashboards()]
    assert names == ["llm-usage.json", "usage-tracking-service.json"]
    for name, board in dashboards():
        assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for target in panel["targets"]:
                # Every query aggregates, so N replicas give one right answer, not N partial ones.
                assert re.match(r"^\s*(sum|max|count|topk|histogram_quantile)\b", target["expr"]), target["expr"]
                assert "sum by" in target["expr"] or target["expr"].lstrip().startswith(("sum(", "max by", "count(")), target["expr"]
    usage = dict(dashboards())["llm-usage.json"]
    assert {v["name"] for v in usage["templating"]["list"]} == {"datasource", "namespace", "group", "user"}


@pytest.fixture(scope="module")
def fed_prometheus():
    """The service and a Prometheus evaluating the project's rules, after real callbacks:
    accepted ones for two groups and three paths, and refused ones of several kinds."""
    from conftest import Service
    service = Service()
    prometheus = Prometheus(service.port, rule_groups=prometheus_rule_groups())
    try:
        for i in range(40):
            assert service.track(callback(f"user{i % 4}", "premium" if i % 2 else "free",
                                          ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"][i % 3])) == 202
            if i % 10 == 0:
                assert service.track('{"groups":"free"}') == 422
                assert service.track("{") == 400
            time.sleep(0.1)
        # Two scrapes after the last callback, so rates and increases see the final counts.
        for _ in range(3):
            time.sleep(1.2)
            assert service.track(callback("user0", "free")) == 202
        yield prometheus
    finally:
        prometheus.stop()
        service.stop()


def rule_expressions():
    return [(r.get("record") or r["alert"], r["expr"]) for g in prometheus_rule_groups() for r in g["rules"]]


@pytest.mark.parametrize("name,expr", rule_expressions())
def test_rule_expression_runs_on_real_data(fed_prometheus, name, expr):
    status, result = fed_prometheus.query(expr)
    assert status == "success", result
    if not name[0].isupper():  # recording rules describe usage and must have data
        assert result, f"{name} returned nothing"
        _, recorded = fed_prometheus.query(name)
        assert recorded, f"Prometheus has not recorded {name}"


def dashboard_targets():
    return [(f"{name}: {panel['title']} [{target['refId']}]", target["expr"])
            for name, board in dashboards() for panel in board["panels"] for target in panel["targets"]]


@pytest.mark.parametrize("panel,expr", dashboard_targets())
def test_dashboard_query_returns_data(fed_prometheus, panel, expr):
    status, result = fed_prometheus.query(substitute(expr))
    assert status == "success", result
    assert result, f"{panel} shows nothing for data that exists: {substitute(expr)}"


def test_dashboard_variables_find_their_values(fed_prometheus):
    board = dict(dashboards())["llm-usage.json"]
    found = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        assert variable["query"]["query"] == variable["definition"], variable["name"]
        match = re.match(r"label_values\((.*), (\w+)\)$", variable["definition"])
        status, result = fed_prometheus.query(substitute(match.group(1)))
        assert status == "success", result
        found[variable["name"]] = {s["metric"].get(match.group(2)) for s in result}
    assert found["namespace"] == {None}  # no namespace label outside Kubernetes; the query still runs
    assert found["group"] == {"free", "premium"}
    assert found["user"] == {"user0", "user1", "user2", "user3"}


def test_containerfile_agrees_with_the_package_and_the_deployment():
    """The Containerfile cannot be built here (no container engine); check what can be checked."""
    with open(os.path.join(DEPLOY, "Containerfile")) as f:
        containerfile = f.read()
    with open(os.path.join(os.path.dirname(DEPLOY), "Package.swift")) as f:
        assert '.executable(name: "usage-tracking"' in f.read()
    stages = re.findall(r"^FROM (\S+)", containerfile, re.M)
    assert stages == ["swift:6.3-noble", "ubuntu:24.04"], "build and runtime images must share a distribution (glibc)"
    assert "--product usage-tracking --static-swift-stdlib" in containerfile
    user = re.search(r"^USER (\d+):(\d+)$", containerfile, re.M)
    assert re.search(r"^EXPOSE 8080$", containerfile, re.M)
    deployment = next(o for o in kustomize_objects() if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(user.group(1)), int(user.group(2)))
    assert pod["containers"][0]["ports"][0]["containerPort"] == 8080
