"""Deploy/ and Dashboards/ checked with the real tools: kustomize, yamllint, Kubernetes schemas,
the CRDs in ../shared/crds, promtool, and a real Prometheus fed by real callbacks."""
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse

import jsonschema
import pytest
import yaml

from conftest import (CRDS, DASHBOARDS, DEPLOY, EXAMPLE, README, ROOT, Prometheus, callback, kustomize_objects,
                      need, one, prometheus_rule_groups)

# CRDs from ../shared/crds, read from there; those the project keeps (verbatim, Tests/CRDs/ORIGIN.md).
PROJECT_CRDS = os.path.join(ROOT, "Tests", "CRDs")
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"): os.path.join(CRDS, "monitoring.coreos.com_servicemonitors.yaml"),
          ("monitoring.coreos.com/v1", "PrometheusRule"): os.path.join(CRDS, "monitoring.coreos.com_prometheusrules.yaml"),
          ("kuadrant.io/v1", "AuthPolicy"): os.path.join(CRDS, "kuadrant.io_authpolicies.yaml"),
          ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"):
              os.path.join(PROJECT_CRDS, "gateway.envoyproxy.io_envoyextensionpolicies.yaml"),
          ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"): os.path.join(PROJECT_CRDS, "gateway.envoyproxy.io_envoyproxies.yaml"),
          ("networking.istio.io/v1alpha3", "EnvoyFilter"): os.path.join(PROJECT_CRDS, "networking.istio.io_envoyfilters.yaml")}

SERVICE_KINDS = ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "Service",
                 "ServiceMonitor"]
# The name of the Secret the operator creates, in the service's namespace and in Authorino's.
CALLBACK_SECRET = "usage-tracking-callback"
# The gRPC port Envoy's ext_proc filter streams model answers to.
EXT_PROC_PORT_NAME, EXT_PROC_PORT = "grpc-ext-proc", 9000


def summary(objects):
    return sorted((o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects)


def test_base_is_the_service_alone():
    assert summary(kustomize_objects()) == [(kind, "llm-d", "usage-tracking") for kind in SERVICE_KINDS]


def test_base_holds_no_credentials():
    objects = kustomize_objects()
    assert [o["kind"] for o in objects if o["kind"] == "Secret"] == []
    # The secret reaches the pod only as a file from a Secret the base does not contain.
    config = one(objects, "ConfigMap")["data"]
    assert config["USAGE_TRACKING_CALLBACK_SECRET_FILE"] == "/etc/usage-tracking/secret"
    assert "USAGE_TRACKING_CALLBACK_SECRET" not in config
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [c.get("env", []) for c in pod["containers"]] == [[]]
    assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == [CALLBACK_SECRET]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"callback-secret": os.path.dirname(config["USAGE_TRACKING_CALLBACK_SECRET_FILE"]),
                      "config": os.path.dirname(config["USAGE_TRACKING_CONFIG"])}
    # No text that looks like a placeholder credential either (the old base had two).
    text = subprocess.run([need("kubectl"), "kustomize", DEPLOY], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"stringData|api_key|CHANGE-ME-to|EXAMPLE-ONLY", text)


def overlay(tmp_path, **fields):
    """A kustomize overlay of Deploy/ in a temporary directory, built."""
    directory = tmp_path / "overlay"
    directory.mkdir()
    fields = {"resources": [os.path.relpath(DEPLOY, directory)], **fields}
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(fields))
    return kustomize_objects(str(directory))


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("fields,namespace,name", [
    ({"namespace": "team-x"}, "team-x", "usage-tracking"),
    ({"namePrefix": "team-x-"}, "llm-d", "team-x-usage-tracking"),
    ({"namespace": "team-x", "namePrefix": "team-x-"}, "team-x", "team-x-usage-tracking"),
])
def test_base_works_under_namespace_and_name_prefix_overlays(tmp_path, fields, namespace, name):
    objects = overlay(tmp_path, **fields)
    assert summary(objects) == [(kind, namespace, name) for kind in SERVICE_KINDS]
    configmap, deployment, service, monitor, budget, policy = (
        one(objects, kind) for kind in ("ConfigMap", "Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget",
                                        "NetworkPolicy"))
    pod = deployment["spec"]["template"]
    # References follow the renamed objects; the selectors still find the pods.
    assert pod["spec"]["containers"][0]["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     budget["spec"]["selector"]["matchLabels"], policy["spec"]["podSelector"]["matchLabels"]):
        assert selector and matches(selector, pod["metadata"]["labels"])
    # The ServiceMonitor finds the Service in its own namespace and scrapes its HTTP port only:
    # the gRPC port (ext_proc) serves no /metrics.
    assert "namespaceSelector" not in monitor["spec"]
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [p["name"] for p in service["spec"]["ports"]] == ["http", EXT_PROC_PORT_NAME]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    # The operator's Secret keeps its documented name in every overlay; the config follows the ConfigMap.
    assert [v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v] == [CALLBACK_SECRET]
    assert [v["configMap"]["name"] for v in pod["spec"]["volumes"] if "configMap" in v] == [configmap["metadata"]["name"]]


LEDGER = os.path.join(DEPLOY, "examples", "ledger")
LEDGER_OBJECTS = [("ConfigMap", "usage-tracking"), ("NetworkPolicy", "usage-tracking"),
                  ("PodDisruptionBudget", "usage-tracking"), ("PrometheusRule", "usage-tracking"),
                  ("Service", "usage-tracking"), ("Service", "usage-tracking-pods"),
                  ("ServiceMonitor", "usage-tracking"), ("StatefulSet", "usage-tracking")]


def overlay_objects(resource, components, **fields):
    """What an overlay of one's own builds from `resource` with `components`, as README shows it."""
    with tempfile.TemporaryDirectory() as directory:
        fields = {"resources": [os.path.relpath(resource, directory)],
                  "components": [os.path.relpath(c, directory) for c in components], **fields}
        with open(os.path.join(directory, "kustomization.yaml"), "w") as f:
            yaml.safe_dump(fields, f)
        return kustomize_objects(directory)


def ledger_objects(**fields):
    """The base with the ledger Component."""
    return overlay_objects(DEPLOY, [LEDGER], **fields)


def without(mapping, *keys):
    return {k: v for k, v in mapping.items() if k not in keys}


def test_ledger_component_replaces_the_deployment_with_a_statefulset():
    assert summary(ledger_objects()) == [(kind, "llm-d", name) for kind, name in LEDGER_OBJECTS]
    # On its own it must fail, not yield a StatefulSet beside the base's Deployment without its settings.
    alone = subprocess.run([need("kubectl"), "kustomize", LEDGER], capture_output=True, text=True)
    assert alone.returncode != 0 and "nothing selected by ConfigMap" in alone.stderr, alone.stdout + alone.stderr


def test_ledger_keeps_each_replicas_counts_on_a_volume_of_its_own():
    objects = ledger_objects()
    config = one(objects, "ConfigMap")["data"]
    spec = one(objects, "StatefulSet")["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    # One ReadWriteOnce claim per replica, on the cluster's default StorageClass unless told.
    [claim] = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"]
    assert claim["metadata"]["name"] not in [v["name"] for v in pod["volumes"]]
    # The binary writes its ledger where the claim is mounted, writable, and acknowledges only
    # what is on disk.
    [mount] = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert config["USAGE_TRACKING_STATE_DIR"] == mount["mountPath"] == "/var/lib/usage-tracking"
    assert not mount.get("readOnly", False)
    assert config["USAGE_TRACKING_FSYNC"] == "always"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The volume is group-owned by the pod's group, which the process runs as.
    security = pod["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"] == security["runAsUser"] == 65532
    # Scaling down or deleting the StatefulSet keeps every ledger.
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenScaled": "Retain", "whenDeleted": "Retain"}
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert spec["replicas"] == one(kustomize_objects(), "Deployment")["spec"]["replicas"]
    # The governing Service exists and is headless.
    governing = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == spec["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


def test_ledger_pods_are_selected_once_by_each_selector():
    objects = ledger_objects()
    statefulset = one(objects, "StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    services = [o for o in objects if o["kind"] == "Service"]
    for selector in (statefulset["spec"]["selector"]["matchLabels"],
                     one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
                     *(s["spec"]["selector"] for s in services)):
        assert selector and matches(selector, labels)
    # Prometheus scrapes each pod through one Service only: a second would double every sum.
    monitor = one(objects, "ServiceMonitor")
    scraped = [s["metadata"]["name"] for s in services if matches(monitor["spec"]["selector"]["matchLabels"],
                                                                    s["metadata"].get("labels", {}))]
    assert scraped == ["usage-tracking"]
    assert one(kustomize_objects(), "Service") == next(s for s in services if s["metadata"]["name"] == "usage-tracking")


def test_ledger_statefulset_runs_the_base_deployments_pod():
    """statefulset.yaml copies deployment.yaml's pod template; only the ledger volume and fsGroup
    may differ. Change both files together."""
    base = one(kustomize_objects(), "Deployment")["spec"]["template"]
    template = one(ledger_objects(), "StatefulSet")["spec"]["template"]
    container, base_container = template["spec"]["containers"][0], base["spec"]["containers"][0]
    for field in ("name", "image", "securityContext", "livenessProbe", "readinessProbe", "resources", "envFrom",
                  "ports", "env", "args", "command"):
        assert container.get(field) == base_container.get(field), f"{field} differs from deployment.yaml's"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Everything else too, once the two additions are taken out.
    expected = {**base, "spec": {**base["spec"], "containers": [base_container]}}
    container = {**container, "volumeMounts": [m for m in container["volumeMounts"] if m["name"] != "ledger"]}
    security = without(template["spec"]["securityContext"], "fsGroup", "fsGroupChangePolicy")
    assert {**template, "spec": {**template["spec"], "containers": [container], "securityContext": security}} == expected


@pytest.mark.parametrize("fields,namespace,prefix", [
    ({"namespace": "team-x"}, "team-x", ""),
    ({"namespace": "team-x", "namePrefix": "team-x-"}, "team-x", "team-x-"),
])
def test_ledger_works_under_namespace_and_name_prefix_overlays(fields, namespace, prefix):
    objects = ledger_objects(**fields)
    assert summary(objects) == [(kind, namespace, prefix + name) for kind, name in LEDGER_OBJECTS]
    statefulset = one(objects, "StatefulSet")
    assert statefulset["spec"]["serviceName"] == prefix + "usage-tracking-pods"
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [{"configMapRef": {"name": prefix + "usage-tracking"}}]
    assert [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v] == [prefix + "usage-tracking"]
    assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == [CALLBACK_SECRET]


POSTGRES = os.path.join(DEPLOY, "examples", "postgres")
# The Secret with the database role's password, which the operator creates beside the callback's.
LEDGER_SECRET = "usage-tracking-ledger"
INSTANCE_FROM_POD_NAME = [{"name": "USAGE_TRACKING_INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]


def postgres_objects(**fields):
    """The base with the shared-ledger Component."""
    return overlay_objects(DEPLOY, [POSTGRES], **fields)


def test_postgres_component_changes_the_configmap_and_the_deployment_only():
    base, shared = kustomize_objects(), postgres_objects()
    # The same objects by kind and name: no StatefulSet, no PersistentVolumeClaim, no Secret.
    assert summary(shared) == summary(base)
    assert sorted(o["kind"] for o in shared if o not in base) == ["ConfigMap", "Deployment"]
    # On its own it builds nothing, rather than half a deployment.
    alone = subprocess.run([need("kubectl"), "kustomize", POSTGRES], capture_output=True, text=True)
    assert alone.returncode != 0 or not alone.stdout.strip(), alone.stdout


def test_postgres_replicas_reach_one_database_with_a_password_file_only():
    objects = postgres_objects()
    config = one(objects, "ConfigMap")["data"]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert deployment["spec"]["replicas"] == 3
    # The URL names the role, the database and the port, never a password; the binary refuses
    # --state-dir beside it.
    url = urllib.parse.urlsplit(config["USAGE_TRACKING_LEDGER_URL"])
    assert (url.scheme, url.username, url.password, url.port, url.path) == ("postgres", "usage_tracking", None, 5432,
                                                                             "/usage")
    assert url.hostname == "postgres.usage-tracking-db.svc" and not url.query
    assert "USAGE_TRACKING_STATE_DIR" not in config
    # A 202 only once the count is committed, as with ../ledger.
    assert config["USAGE_TRACKING_FSYNC"] == "always"
    # The password is a file from the Secret's key `password`, mounted read-only as a directory
    # (so a rotation reaches it), and appears nowhere else.
    path = config["USAGE_TRACKING_LEDGER_PASSWORD_FILE"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == os.path.dirname(path)]
    assert mount["readOnly"] is True and "subPath" not in mount
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mount["name"]] == {"name": mount["name"], "secret": {
        "secretName": LEDGER_SECRET, "items": [{"key": "password", "path": os.path.basename(path)}]}}
    # Readable by uid 65532 as the callback secret is: the default mode, no fsGroup.
    assert "defaultMode" not in volumes["callback-secret"]["secret"] and "fsGroup" not in pod["securityContext"]
    assert [k for k in config if "PASSWORD" in k] == ["USAGE_TRACKING_LEDGER_PASSWORD_FILE"]
    text = yaml.safe_dump_all(objects)
    assert "kind: Secret" not in text and "stringData" not in text
    assert re.findall(r"postgres://[^\s'\"]*", text) == [config["USAGE_TRACKING_LEDGER_URL"]]
    # Each replica names itself after its pod; the ConfigMap cannot (the downward API is per pod).
    assert container["env"] == INSTANCE_FROM_POD_NAME and "USAGE_TRACKING_INSTANCE" not in config
    # No volume of its own: nothing writable but what the base has.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not [v for v in pod["volumes"] if set(v) - {"name", "secret", "configMap"}]


def test_postgres_deployment_runs_the_base_pod_plus_the_password_and_the_instance():
    base = one(kustomize_objects(), "Deployment")
    shared = one(postgres_objects(), "Deployment")
    template = json.loads(json.dumps(shared["spec"]["template"]))
    container = template["spec"]["containers"][0]
    assert container.pop("env") == INSTANCE_FROM_POD_NAME
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "ledger-password"]
    template["spec"]["volumes"] = [v for v in template["spec"]["volumes"] if v["name"] != "ledger-password"]
    assert template == base["spec"]["template"]
    assert without(shared["spec"], "replicas", "template") == without(base["spec"], "replicas", "template")


def test_postgres_needs_no_egress_rule_while_the_base_restricts_ingress_only():
    """If the base's NetworkPolicy ever restricts egress, the Component must open TCP 5432."""
    policy = one(postgres_objects(), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]
    with open(os.path.join(POSTGRES, "kustomization.yaml")) as f:
        assert "allow TCP 5432" in f.read()


@pytest.mark.parametrize("fields,namespace,prefix", [
    ({"namespace": "team-x"}, "team-x", ""),
    ({"namespace": "team-x", "namePrefix": "team-x-"}, "team-x", "team-x-"),
])
def test_postgres_works_under_namespace_and_name_prefix_overlays(fields, namespace, prefix):
    objects = postgres_objects(**fields)
    assert summary(objects) == [(kind, namespace, prefix + "usage-tracking") for kind in SERVICE_KINDS]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [{"configMapRef": {"name": prefix + "usage-tracking"}}]
    # The operator's Secrets keep their documented names.
    assert sorted(v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v) == [CALLBACK_SECRET, LEDGER_SECRET]


QUOTA = os.path.join(DEPLOY, "examples", "quota")
QUOTA_LIMIT = 1000
USER_ID = 'auth.identity.metadata.annotations["secret.kuadrant.io/user-id"]'
QUOTA_MESSAGE = "Monthly quota of 1000 requests used up for the free tier; it renews on the 1st (UTC)"
LOOKUP_FAILED = "Usage could not be checked; try again shortly"


@functools.lru_cache(maxsize=1)
def quota_build():
    """The Kuadrant example with the quota Component; built once, not to be changed."""
    return overlay_objects(EXAMPLE, [QUOTA])


def quota_rules():
    return one(quota_build(), "AuthPolicy")["spec"]["rules"]


def test_quota_adds_a_lookup_a_rule_and_a_denial_message_to_the_kuadrant_example():
    assert summary(quota_build()) == summary(kustomize_objects(EXAMPLE))
    original = one(kustomize_objects(EXAMPLE), "AuthPolicy")
    policy = json.loads(json.dumps(one(quota_build(), "AuthPolicy")))
    rules = policy["spec"]["rules"]
    assert set(rules.pop("metadata")) == {"usage"}
    assert set(rules["authorization"]) == {"allowed-groups", "monthly-quota"}
    del rules["authorization"]["monthly-quota"]
    assert set(rules["response"].pop("unauthorized")) == {"message"}
    # All else as it was: the callback still waits for the success filter, so a request the quota
    # denies is not counted.
    assert policy == original
    # Components need a base: on its own it builds nothing.
    alone = subprocess.run([need("kubectl"), "kustomize", QUOTA], capture_output=True, text=True)
    assert alone.returncode != 0 or not alone.stdout.strip(), alone.stdout


def test_quota_lookup_asks_the_service_with_the_callbacks_secret():
    rules = quota_rules()
    lookup, callback = rules["metadata"]["usage"], rules["callbacks"]["usage-tracking"]["http"]
    http = lookup["http"]
    assert http["method"] == "GET" and "url" not in http
    assert http["sharedSecretRef"] == callback["sharedSecretRef"] == {"name": CALLBACK_SECRET, "key": "secret"}
    assert http["credentials"] == callback["credentials"] == {"authorizationHeader": {"prefix": "Bearer"}}
    # The callback's Service and port (test_example_callback_matches_the_service checks those
    # against the base), path /usage, the callback's user.
    track = urllib.parse.urlsplit(callback["url"])
    assert cel(http["urlExpression"], authorization("free", "freeuser1")) == (
        f"{track.scheme}://{track.netloc}/usage?user=freeuser1")
    assert USER_ID in callback["body"]["expression"]
    # Looked up for exactly the users the rule limits; cached per user, briefly.
    assert lookup["when"] == rules["authorization"]["monthly-quota"]["when"]
    assert lookup["cache"] == {"key": {"expression": USER_ID}, "ttl": 10}
    with open(os.path.join(QUOTA, "kustomization.yaml")) as f:
        text = f.read()
    assert "requests in flight" in text and "ttl" in text  # the race, explained


def cel(source, activation):
    """`source` evaluated by a real CEL implementation (cel-python) over the Authorization JSON."""
    try:
        import celpy
    except ImportError:
        pytest.fail("cel-python is not installed; Tests/run-suite installs it into .venv-tests/")
    environment = celpy.Environment()
    return environment.program(environment.compile(source)).evaluate(activation)


def as_struct(value):
    """JSON as Authorino hands it to CEL, a protobuf Struct: every number a double."""
    if isinstance(value, dict):
        return {k: as_struct(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_struct(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def authorization(groups, user, usage=None):
    """The Authorization JSON for an API key of ../kuadrant with these annotations, and `usage`
    as auth.metadata.usage when the lookup left one."""
    import celpy
    auth = {"identity": {"metadata": {"annotations": {"secret.kuadrant.io/user-id": user, "kuadrant.io/groups": groups}}},
            "metadata": {} if usage is None else {"usage": usage}}
    return {"auth": celpy.json_to_cel(as_struct(auth))}


def usage_answer(user, total):
    """GET /usage's answer for a user with `total` requests this month, or no family at all (None)."""
    families = {} if total is None else {"llm_requests_total": {"total": total, "by": [
        {"labels": {"groups": "free", "path": "/v1/chat/completions"}, "total": total}]}}
    return {"user": user, "from": "2026-12-01T00:00:00Z", "to": "2027-01-01T00:00:00Z", "families": families}


def quota_decision(rules, groups, user, answer):
    """(allowed, denial message) of the quota rule as Authorino takes it: the lookup runs only
    when its `when` holds and leaves `answer` (None: it failed); the rule applies only when its own
    `when` holds, and a predicate that errors denies."""
    import celpy
    identity = authorization(groups, user)
    looked_up = all(cel(w["predicate"], identity) for w in rules["metadata"]["usage"]["when"])
    activation = authorization(groups, user, answer if looked_up else None)
    rule = rules["authorization"]["monthly-quota"]
    allowed = True
    if all(cel(w["predicate"], activation) for w in rule["when"]):
        try:
            allowed = all(cel(p["predicate"], activation) == celpy.celtypes.BoolType(True)
                          for p in rule["patternMatching"]["patterns"])
        except celpy.CELEvalError:
            allowed = False
    return allowed, None if allowed else cel(rules["response"]["unauthorized"]["message"]["expression"], activation)


@pytest.mark.parametrize("groups,user,answer,expected", [
    ("free", "freeuser1", usage_answer("freeuser1", QUOTA_LIMIT - 1), (True, None)),
    ("free", "freeuser1", usage_answer("freeuser1", QUOTA_LIMIT), (False, QUOTA_MESSAGE)),
    ("free", "freeuser1", usage_answer("freeuser1", QUOTA_LIMIT + 1), (False, QUOTA_MESSAGE)),
    ("free", "freeuser1", usage_answer("freeuser1", 0), (True, None)),
    ("free", "freeuser1", usage_answer("freeuser1", None), (True, None)),  # nothing counted this month yet
    ("premium", "premiumuser1", usage_answer("premiumuser1", 50 * QUOTA_LIMIT), (True, None)),
    ("free,premium", "both1", usage_answer("both1", 50 * QUOTA_LIMIT), (True, None)),
    ("premium", "premiumuser1", None, (True, None)),  # never looked up, so nothing to fail
    ("freedom", "other1", usage_answer("other1", 50 * QUOTA_LIMIT), (True, None)),  # not the group free
    # Fails closed for free users: no answer, an error answer (Authorino keeps any body, a 401's
    # too), an answer about someone else.
    ("free", "freeuser1", None, (False, LOOKUP_FAILED)),
    ("free", "freeuser1", {"error": "unauthorized"}, (False, LOOKUP_FAILED)),
    ("free", "freeuser1", usage_answer("freeuser2", 0), (False, LOOKUP_FAILED)),
])
def test_quota_denies_only_free_users_at_or_past_the_monthly_limit(groups, user, answer, expected):
    assert quota_decision(quota_rules(), groups, user, answer) == expected


def test_quota_denial_message_leaves_other_denials_alone():
    """A request denied by another rule (the example's allowed-groups) is not told about quotas."""
    message = quota_rules()["response"]["unauthorized"]["message"]["expression"]
    for groups, user, answer in (("other", "someone", None), ("premium", "premiumuser1", None),
                                 ("free", "freeuser1", usage_answer("freeuser1", 3))):
        assert cel(message, authorization(groups, user, answer)) == "Unauthorized"


ENVOY_GATEWAY = os.path.join(DEPLOY, "examples", "envoy-gateway")
ISTIO = os.path.join(DEPLOY, "examples", "istio")
IDENTITY_HEADERS = os.path.join(DEPLOY, "examples", "identity-headers")
# What the AuthPolicy's success headers carry, read as the callback's body reads user and groups.
IDENTITY = {"x-usage-user": 'auth.identity.metadata.annotations["secret.kuadrant.io/user-id"]',
            "x-usage-groups": 'auth.identity.metadata.annotations["kuadrant.io/groups"]'}


def ext_proc_builds():
    """Each ext_proc example as `kubectl apply -k` would install it, and with its observability Component."""
    return {"envoy-gateway": kustomize_objects(ENVOY_GATEWAY),
            "envoy-gateway/observability": overlay_objects(ENVOY_GATEWAY, [os.path.join(ENVOY_GATEWAY, "observability")]),
            "istio": kustomize_objects(ISTIO),
            "istio/observability": overlay_objects(ISTIO, [os.path.join(ISTIO, "observability")])}


def ext_proc_service_port(objects=None):
    """The base Service's gRPC port, and the Service."""
    service = one(objects or kustomize_objects(), "Service")
    [port] = [p for p in service["spec"]["ports"] if p["name"] == EXT_PROC_PORT_NAME]
    return service, port


def test_the_configmaps_stream_cap_fits_the_memory_limit():
    """At the 16 KiB per open stream that test_ext_proc_grpc.py bounds (about 6 KiB measured),
    the ConfigMap's cap on open ext_proc streams takes at most half the container's memory limit."""
    objects = kustomize_objects()
    config = one(objects, "ConfigMap")["data"]
    limit = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(config["USAGE_TRACKING_EXT_PROC_MAX_STREAMS"]) * 16 * 1024 <= int(limit[:-2]) * 1024 * 1024 // 2


def test_ext_proc_port_runs_from_the_configmap_to_the_service():
    objects = kustomize_objects()
    config = one(objects, "ConfigMap")["data"]
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    [container_port] = [p for p in container["ports"] if p["name"] == EXT_PROC_PORT_NAME]
    assert int(config["USAGE_TRACKING_EXT_PROC_PORT"]) == container_port["containerPort"] == EXT_PROC_PORT
    service, port = ext_proc_service_port(objects)
    # Istio and Envoy Gateway take the protocol from appProtocol (and Istio from a `grpc-` name):
    # plaintext HTTP/2, which ext_proc's gRPC needs.
    assert port == {"name": EXT_PROC_PORT_NAME, "port": EXT_PROC_PORT, "targetPort": EXT_PROC_PORT_NAME,
                    "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}
    assert EXT_PROC_PORT_NAME.startswith("grpc-") and len(EXT_PROC_PORT_NAME) <= 15
    with open(os.path.join(DEPLOY, "Containerfile")) as f:
        assert re.search(rf"^EXPOSE {EXT_PROC_PORT}$", f.read(), re.M)


def test_network_policy_opens_each_port_only_to_its_callers():
    rules = one(kustomize_objects(), "NetworkPolicy")["spec"]["ingress"]
    opened = {tuple(p["port"] for p in rule["ports"]):
              sorted(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"])
              for rule in rules}
    assert opened == {(8080,): ["kuadrant-system", "monitoring"], (EXT_PROC_PORT,): ["envoy-gateway-system"]}
    assert all(set(peer) == {"namespaceSelector"} for rule in rules for peer in rule["from"])


def test_ext_proc_examples_build_on_the_kuadrant_example():
    kuadrant = summary(kustomize_objects(EXAMPLE))
    assert {name: sorted(set(summary(objects)) - set(kuadrant)) for name, objects in ext_proc_builds().items()} == {
        "envoy-gateway": [("EnvoyExtensionPolicy", "llm-d", "usage-tracking"), ("EnvoyProxy", "gateway-system", "llm-gateway")],
        "envoy-gateway/observability": [("EnvoyExtensionPolicy", "llm-d", "usage-tracking"),
                                        ("EnvoyProxy", "gateway-system", "llm-gateway")],
        "istio": [("EnvoyFilter", "gateway-system", "usage-tracking-ext-proc")],
        "istio/observability": [("EnvoyFilter", "gateway-system", "usage-tracking-ext-proc")]}
    for name in ("envoy-gateway", "istio"):
        with open(os.path.join(DEPLOY, "examples", name, "kustomization.yaml")) as f:
            assert "EXAMPLE ONLY" in f.read()
    # Components need a base: on their own they build nothing, rather than half an example.
    for component in (IDENTITY_HEADERS, os.path.join(ENVOY_GATEWAY, "observability"), os.path.join(ISTIO, "observability")):
        alone = subprocess.run([need("kubectl"), "kustomize", component], capture_output=True, text=True)
        assert alone.returncode != 0 or not alone.stdout.strip(), component


@pytest.mark.parametrize("build", ["envoy-gateway", "istio"])
def test_authpolicy_adds_the_identity_headers_and_nothing_else(build):
    """The Kuadrant example's AuthPolicy, plus the two success headers ext_proc reads."""
    policy = one(ext_proc_builds()[build], "AuthPolicy")
    original = one(kustomize_objects(EXAMPLE), "AuthPolicy")
    success = policy["spec"]["rules"]["response"]["success"]
    assert success["headers"] == {name: {"plain": {"expression": e}} for name, e in IDENTITY.items()}
    without_headers = json.loads(json.dumps(policy))
    del without_headers["spec"]["rules"]["response"]["success"]["headers"]
    assert without_headers == original
    # The same user and groups as the callback sends for the same request.
    body = original["spec"]["rules"]["callbacks"]["usage-tracking"]["http"]["body"]["expression"]
    assert f'"user": {IDENTITY["x-usage-user"]},' in body and f'"groups": {IDENTITY["x-usage-groups"]},' in body


def test_envoy_gateway_runs_ext_proc_after_kuadrant_on_the_authpolicys_route():
    objects = ext_proc_builds()["envoy-gateway"]
    policy, proxy = one(objects, "EnvoyExtensionPolicy"), one(objects, "EnvoyProxy")
    auth = one(objects, "AuthPolicy")
    # Only where the AuthPolicy sets the identity headers: elsewhere a client could send its own.
    assert policy["metadata"]["namespace"] == auth["metadata"]["namespace"]
    assert policy["spec"]["targetRefs"] == [auth["spec"]["targetRef"]]
    # Merged into Kuadrant's Gateway-level policy (its wasm filter) rather than replacing it on the route.
    assert policy["spec"]["mergeType"] in ("JSONMerge", "StrategicMerge")
    [ext_proc] = policy["spec"]["extProc"]
    service, port = ext_proc_service_port()
    assert ext_proc["backendRefs"] == [{"name": service["metadata"]["name"], "port": port["port"]}]
    assert policy["metadata"]["namespace"] == service["metadata"]["namespace"]  # no ReferenceGrant needed
    assert ext_proc["processingMode"] == {"request": {}, "response": {"body": "Streamed"}}
    assert ext_proc["failOpen"] is True and ext_proc["messageTimeout"] == "1s"
    assert "shadowMode" not in ext_proc
    # Envoy Gateway's default order runs ext_proc before wasm: every ext_proc filter moves after
    # the last wasm filter, so it sees the request after Kuadrant checked it and set the headers.
    assert proxy["spec"] == {"filterOrder": [{"name": "envoy.filters.http.ext_proc", "after": "envoy.filters.http.wasm"}]}


def envoy_filter_patches(build):
    """The EnvoyFilter's HTTP filter patches by filter name."""
    patches = one(ext_proc_builds()[build], "EnvoyFilter")["spec"]["configPatches"]
    return {p["patch"]["value"]["name"]: p for p in patches if p["applyTo"] == "HTTP_FILTER"}


def test_istio_speaks_h2c_to_the_port_and_neither_example_caps_streams_per_connection():
    """The listener allows 10,000 resets in 10 s per connection, so Envoy's connections may live
    (Tests/Integration/test_ext_proc_envoy.py runs a real Envoy with no cap); Istio's cluster for
    the port must still be told it speaks HTTP/2."""
    patches = one(ext_proc_builds()["istio"], "EnvoyFilter")["spec"]["configPatches"]
    (cluster,) = [p for p in patches if p["applyTo"] == "CLUSTER"]
    service, port = ext_proc_service_port()
    name = f"outbound|{port['port']}||{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert cluster["match"] == {"context": "GATEWAY", "cluster": {"name": name}}
    assert cluster["patch"]["operation"] == "MERGE"
    options = cluster["patch"]["value"]["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options == {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                       "explicit_http_config": {"http2_protocol_options": {}}}
    policy = one(ext_proc_builds()["envoy-gateway"], "EnvoyExtensionPolicy")
    assert "backendSettings" not in policy["spec"]["extProc"][0]


def test_istio_runs_ext_proc_after_kuadrant_and_strips_client_identity_before_it():
    objects = ext_proc_builds()["istio"]
    envoy_filter = one(objects, "EnvoyFilter")
    # Applied after Kuadrant's own EnvoyFilter (priority 0, in the Gateway's namespace).
    assert envoy_filter["spec"]["priority"] > 0
    assert [ref["kind"] for ref in envoy_filter["spec"]["targetRefs"]] == ["Gateway"]
    patches = envoy_filter_patches("istio")
    assert set(patches) == {"envoy.filters.http.ext_proc", "envoy.filters.http.header_mutation"}
    kuadrant_filter = {"context": "GATEWAY", "listener": {"filterChain": {"filter": {
        "name": "envoy.filters.network.http_connection_manager", "subFilter": {"name": "envoy.filters.http.wasm"}}}}}
    for patch in patches.values():
        assert patch["applyTo"] == "HTTP_FILTER" and patch["match"] == kuadrant_filter
    ext_proc, strip = patches["envoy.filters.http.ext_proc"], patches["envoy.filters.http.header_mutation"]
    assert ext_proc["patch"]["operation"] == "INSERT_AFTER" and strip["patch"]["operation"] == "INSERT_BEFORE"
    config = ext_proc["patch"]["value"]["typed_config"]
    assert config["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    service, port = ext_proc_service_port()
    cluster = f"outbound|{port['port']}||{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert config["grpc_service"] == {"envoy_grpc": {"cluster_name": cluster}}
    # What the Envoy Gateway example asks for, in Envoy's own terms.
    assert config["processing_mode"] == {"request_header_mode": "SEND", "request_body_mode": "NONE",
                                         "response_header_mode": "SEND", "response_body_mode": "STREAMED"}
    assert config["failure_mode_allow"] is True and config["message_timeout"] == "1s"
    assert "observability_mode" not in config
    # Removed before Kuadrant's filter: exactly the headers the AuthPolicy sets after it.
    mutation = strip["patch"]["value"]["typed_config"]
    assert mutation["@type"] == "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
    assert mutation["mutations"] == {"request_mutations": [{"remove": name} for name in IDENTITY]}


def test_observability_components_stop_envoy_waiting_and_change_nothing_else():
    builds = ext_proc_builds()
    synchronous, shadow = (one(builds[b], "EnvoyExtensionPolicy") for b in ("envoy-gateway", "envoy-gateway/observability"))
    expected = json.loads(json.dumps(synchronous))
    expected["spec"]["extProc"][0]["shadowMode"] = True
    del expected["spec"]["extProc"][0]["messageTimeout"]  # no wait, so no timeout
    assert shadow == expected
    # The CRD's CEL rule, not evaluated by the schema check: shadow mode takes Streamed bodies only.
    assert {m.get("body", "Streamed") for m in shadow["spec"]["extProc"][0]["processingMode"].values()} == {"Streamed"}
    synchronous, shadow = (envoy_filter_patches(b)["envoy.filters.http.ext_proc"] for b in ("istio", "istio/observability"))
    expected = json.loads(json.dumps(synchronous))
    expected["patch"]["value"]["typed_config"]["observability_mode"] = True
    del expected["patch"]["value"]["typed_config"]["message_timeout"]
    assert shadow == expected
    assert envoy_filter_patches("istio")["envoy.filters.http.header_mutation"] == (
        envoy_filter_patches("istio/observability")["envoy.filters.http.header_mutation"])


@pytest.mark.parametrize("api_version,kind,path,wrong", [
    # A misspelt filter name, which Envoy Gateway would otherwise leave out of the order silently.
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy", ["spec", "filterOrder", 0, "after"], "envoy.filters.http.wasm_shim"),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy", ["spec", "extProc", 0, "processingMode", "response", "body"],
     "Streaming"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter", ["spec", "configPatches", 0, "patch", "operation"], "INSERT_AFTERWARDS"),
])
def test_ext_proc_crds_refuse_what_envoy_would_not_take(api_version, kind, path, wrong):
    validator = crd_validator(api_version, kind)
    obj = json.loads(json.dumps(one(ext_proc_builds()["envoy-gateway" if "envoyproxy" in api_version else "istio"], kind)))
    assert not schema_errors(validator, obj)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = wrong
    assert any(f"'{wrong}' is not one of" in e for e in schema_errors(validator, obj)), schema_errors(validator, obj)


def job_selectors():
    """Every job="..." matcher in the alert rules and dashboard queries."""
    exprs = [r["expr"] for g in prometheus_rule_groups() for r in g["rules"]]
    exprs += [t["expr"] for _, board in dashboards() for p in board["panels"] for t in p["targets"]]
    return [m for e in exprs for m in re.findall(r'job\s*=~?\s*"([^"]*)"', e)]


def test_job_label_survives_a_name_prefix(tmp_path):
    """Prometheus takes `job` from the Service label the ServiceMonitor names in jobLabel, falling
    back to the Service's name, which a namePrefix changes. The rules and dashboards must select
    the job the overlay really produces."""
    objects = overlay(tmp_path, namePrefix="team-x-")
    service, monitor = one(objects, "Service"), one(objects, "ServiceMonitor")
    job = service["metadata"]["labels"].get(monitor["spec"].get("jobLabel", ""), service["metadata"]["name"])
    selectors = job_selectors()
    assert len(selectors) == 7  # rules: up three times, scrape duration; dashboards: memory, CPU, scrape
    assert set(selectors) == {job} == {"usage-tracking"}


@pytest.mark.parametrize("filename", ["servicemonitor.yaml", "prometheusrule.yaml"])
def test_release_label_is_one_uncomment_away(filename):
    with open(os.path.join(DEPLOY, filename)) as f:
        text = f.read()
    lines = re.findall(r"^( *)# (release: \S+)  # CHANGE-ME.*$", text, re.M)
    assert len(lines) == 1, f"{filename}: want one commented `release:` line"
    indent, line = lines[0]
    uncommented = re.sub(r"^ *# release: .*$", indent + line, text, flags=re.M)
    labels = yaml.safe_load(uncommented)["metadata"]["labels"]
    assert labels == {"app": "usage-tracking", "release": "kube-prometheus-stack"}


def test_config_is_a_mounted_file_the_binary_accepts_and_the_hold_is_two_scrape_intervals(tmp_path):
    objects = kustomize_objects()
    config = one(objects, "ConfigMap")["data"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["items"] == [{"key": "config.yaml", "path": os.path.basename(config["USAGE_TRACKING_CONFIG"])}]
    interval = one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["interval"]
    assert int(config["USAGE_TRACKING_NEW_SERIES_HOLD"]) == 2 * int(interval.rstrip("s"))
    path = tmp_path / "config.yaml"
    path.write_text(config["config.yaml"])
    binary = os.path.join(ROOT, ".build", "debug", "usage-tracking")
    printed = subprocess.run([binary, "--config", str(path), "--print-config"], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    builtin = subprocess.run([binary, "--print-config"], capture_output=True, text=True, check=True).stdout
    assert printed.stdout == builtin, "the ConfigMap's config is the built-in one, spelt out to edit"


def test_metering_example_config_is_valid_and_its_callback_sends_every_field_it_reads():
    example = os.path.join(DEPLOY, "examples", "metering")
    binary = os.path.join(ROOT, ".build", "debug", "usage-tracking")
    printed = subprocess.run([binary, "--config", os.path.join(example, "config.yaml"), "--print-config"],
                             capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    schema = yaml.safe_load(printed.stdout)
    labels = {label["name"]: label for metric in schema["metrics"] for label in metric["labels"]}
    assert {"tier", "auth_mode", "auth_id"} <= set(labels)
    with open(os.path.join(example, "authpolicy.yaml")) as f:
        policy = yaml.safe_load(f)
    body = policy["spec"]["rules"]["callbacks"]["usage-tracking"]["http"]["body"]["expression"]
    sent = set(re.findall(r'^\s*"([\w.]+)":', body, re.MULTILINE))
    read = {label["from"] for label in labels.values() if "from" in label}
    assert read <= sent, f"the config reads fields the callback does not send: {read - sent}"
    for name in ("tier", "auth_mode", "auth_id"):
        assert f'"{labels[name]["from"]}": auth.identity.metadata.annotations[' in body


def test_drain_delay_covers_a_scrape_and_the_grace_period_covers_both():
    objects = kustomize_objects()
    config = one(objects, "ConfigMap")["data"]
    drain, shutdown = int(config["USAGE_TRACKING_DRAIN_DELAY"]), int(config["USAGE_TRACKING_SHUTDOWN_TIMEOUT"])
    interval = one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["interval"]
    grace = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert (drain, shutdown, interval, grace) == (25, 15, "15s", 50)
    assert drain >= int(interval.rstrip("s")) + 10  # a scrape interval plus endpoint propagation
    assert grace > drain + shutdown


def test_example_builds_on_its_own_and_says_its_keys_are_examples():
    objects = kustomize_objects(EXAMPLE)
    assert summary(objects) == [("AuthPolicy", "llm-d", "llm-api"),
                                ("Secret", "kuadrant-system", "freeuser1-api-key"),
                                ("Secret", "kuadrant-system", "premiumuser1-api-key")]
    for secret in (o for o in objects if o["kind"] == "Secret"):
        assert secret["stringData"]["api_key"].startswith("EXAMPLE-ONLY-"), secret["metadata"]["name"]
    with open(os.path.join(EXAMPLE, "kustomization.yaml")) as f:
        assert "EXAMPLE ONLY" in f.read()
    with open(os.path.join(EXAMPLE, "api-keys.yaml")) as f:
        assert "EXAMPLE KEYS" in f.read()


def test_example_callback_matches_the_service():
    policy = one(kustomize_objects(EXAMPLE), "AuthPolicy")["spec"]["rules"]
    call = policy["callbacks"]["usage-tracking"]
    # The `when` reads the identity success filter, which runs only for authorized requests.
    assert call["when"] == [{"predicate": "has(auth.response.identity)"}]
    assert "identity" in policy["response"]["success"]["filters"]
    # Under Kuadrant request.id is empty; the request id is Envoy's header.
    assert call["http"]["headers"] == {"x-request-id": {"expression": 'request.headers["x-request-id"]'}}
    assert call["http"]["sharedSecretRef"] == {"name": CALLBACK_SECRET, "key": "secret"}
    assert call["http"]["credentials"] == {"authorizationHeader": {"prefix": "Bearer"}}
    base = kustomize_objects()
    service = one(base, "Service")
    assert call["http"]["url"] == (f"http://{service['metadata']['name']}.{service['metadata']['namespace']}"
                                   ".svc.cluster.local/track")
    assert service["spec"]["ports"][0]["port"] == 80
    # The key Authorino reads is the file name the service reads.
    assert one(base, "ConfigMap")["data"]["USAGE_TRACKING_CALLBACK_SECRET_FILE"].endswith("/secret")


def test_yamllint_is_clean():
    files = glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True)
    files += glob.glob(os.path.join(DASHBOARDS, "*.yaml"))
    assert os.path.join(EXAMPLE, "authpolicy.yaml") in files
    assert os.path.join(LEDGER, "statefulset.yaml") in files
    assert {os.path.join(d, "kustomization.yaml") for d in (POSTGRES, QUOTA)} <= set(files)
    result = subprocess.run([need("yamllint"), "--strict", "-c", os.path.join(DEPLOY, ".yamllint"), *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def all_objects():
    objects = kustomize_objects() + kustomize_objects(EXAMPLE) + ledger_objects()
    # The shared ledger and the quota build on the base and the Kuadrant example, the ext_proc
    # examples on the Kuadrant one: only what they add or change.
    builds = [postgres_objects(), quota_build(), *ext_proc_builds().values()]
    return objects + [o for build in builds for o in build if o not in objects]


def test_core_objects_validate_against_kubernetes_schemas():
    core = [o for o in all_objects() if (o["apiVersion"], o["kind"]) not in CUSTOM]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(core, f)
    try:
        result = subprocess.run([need("kubernetes-validate"), "--strict", "-k", "1.30.0", f.name],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count(" passed for resource ") == len(core) == 15, result.stdout
    finally:
        os.unlink(f.name)


def crd_validator(api_version, kind):
    path = CUSTOM[(api_version, kind)]
    if not os.path.exists(path) and os.path.dirname(path) == CRDS:
        pytest.skip(f"CRD {path} is absent: the project reads CRDs from ../shared/crds and does not copy them")
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # EnvoyProxy's is 1.4 MB
    version = api_version.split("/")[1]
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    # The CRDs carry Go regular expressions ("(?i)" mid-pattern) that Python's metaschema check
    # refuses, so validate without checking the schema itself. Their CEL rules
    # (x-kubernetes-validations) are not evaluated here.
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, obj):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("api_version,kind", sorted(CUSTOM))
def test_custom_resources_validate_against_their_crds(api_version, kind):
    validator = crd_validator(api_version, kind)
    objects = [o for o in all_objects() if (o["apiVersion"], o["kind"]) == (api_version, kind)]
    assert objects
    for obj in objects:
        assert not schema_errors(validator, obj)
    # The validation is live: a spec of the wrong type is refused.
    assert list(validator.iter_errors({**objects[0], "spec": "not an object"}))


def rules_directory():
    directory = tempfile.mkdtemp(prefix="rules-")
    with open(os.path.join(directory, "usage-tracking.rules.yaml"), "w") as f:
        yaml.safe_dump({"groups": prometheus_rule_groups()}, f, sort_keys=False)
    shutil.copy(os.path.join(DEPLOY, "tests", "prometheusrule-test.yaml"), directory)
    return directory


@pytest.mark.parametrize("arguments,expected", [
    (["check", "rules", "usage-tracking.rules.yaml"], "SUCCESS: 19 rules found"),
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


def alerts():
    return [r for g in prometheus_rule_groups() for r in g["rules"] if "alert" in r]


def test_every_alert_is_tested_firing_and_not_firing():
    with open(os.path.join(DEPLOY, "tests", "prometheusrule-test.yaml")) as f:
        cases = [case for test in yaml.safe_load(f)["tests"] for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    names = {r["alert"] for r in alerts()}
    assert len(names) == 16 and {"UsageTrackingCallbacksStopped", "UsageTrackingLedgerStale",
                                  "UsageTrackingTokensNotCounted", "UsageTrackingExtProcOverCapacity"} <= names
    assert firing == silent == names


def readme_anchors():
    """The anchors GitHub gives README's headings: lower case, punctuation dropped, spaces to dashes."""
    with open(README) as f:
        text = re.sub(r"^```.*?^```$", "", f.read(), flags=re.M | re.S)  # `# ...` in code is no heading
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


RUNBOOK = "https://github.com/CHANGE-ME/usage-tracking/blob/main/README.md#"


def test_every_alert_explains_itself_and_links_a_readme_section():
    anchors = readme_anchors()
    assert {"troubleshooting", "my-usage-is-not-showing-up", "deploying"} <= anchors
    for rule in alerts():
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert annotations["runbook_url"] == RUNBOOK + rule["alert"].lower()
        assert annotations["runbook_url"][len(RUNBOOK):] in anchors, rule["alert"]


def test_unauthorized_alert_is_a_rate_over_a_window():
    rule = next(r for r in alerts() if r["alert"] == "UsageTrackingUnauthorizedCallbacks")
    assert re.search(r'\brate\(usage_tracking_callbacks_total\{outcome="unauthorized"\}\[10m\]\)', rule["expr"])
    assert rule["expr"].rstrip().endswith("* 60 > 1") and rule["for"] == "5m"


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


def test_dashboards_build_as_configmaps_for_the_grafana_sidecar():
    objects = kustomize_objects(DASHBOARDS)
    assert summary(objects) == [("ConfigMap", "monitoring", "usage-tracking-dashboard-llm-usage"),
                                ("ConfigMap", "monitoring", "usage-tracking-dashboard-service")]
    packaged = {}
    for configmap in objects:
        assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
        packaged.update(configmap["data"])
    # Every dashboard is packaged, byte for byte.
    files = {}
    for path in glob.glob(os.path.join(DASHBOARDS, "*.json")):
        with open(path) as f:
            files[os.path.basename(path)] = f.read()
    assert packaged == files and len(files) == 2
    # A client-side `kubectl apply` keeps a copy in an annotation limited to 256 KiB.
    assert all(len(text) < 200_000 for text in packaged.values())


@pytest.fixture(scope="module")
def fed_prometheus():
    """The service and a Prometheus evaluating the project's rules, after real callbacks:
    accepted ones for two groups and three paths, and refused ones of several kinds; and real
    model answers through the ext_proc port (grpcio, Envoy's generated classes): counted ones
    on two models, answers without usage, and a stream left silent past the idle timeout."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
    from test_ext_proc_grpc import SSE_HEAD, STREAMED, answer, held_open
    from conftest import Service
    service = Service("--ext-proc-port", "0", "--ext-proc-idle-timeout", "1")
    prometheus = Prometheus(service.port, rule_groups=prometheus_rule_groups())
    channel = grpc.insecure_channel(f"127.0.0.1:{service.ext_proc_port}")
    stub = ext_proc_grpc.ExternalProcessorStub(channel)

    def model_answer(i, usage=True):
        model = ["model-a", "model-b"][i % 2]
        chunk = ('data: {"id":"c","object":"chat.completion.chunk","model":"%s","choices":[]%s}\n\ndata: [DONE]\n\n' % (
            model, ',"usage":{"prompt_tokens":%d,"completion_tokens":%d}' % (10 + i, 20 + i) if usage else "")).encode()
        list(stub.Process(iter(answer([chunk], user=f"user{i % 4}", request_id=f"fed-{i}-{usage}", head=SSE_HEAD)), timeout=10))

    try:
        for i in range(40):
            assert service.track(callback(f"user{i % 4}", "premium" if i % 2 else "free",
                                          ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"][i % 3])) == 202
            model_answer(i)
            if i % 10 == 0:
                assert service.track('{"groups":"free"}') == 422
                assert service.track("{") == 400
                model_answer(i, usage=False)
            time.sleep(0.1)
        # An Envoy that goes quiet mid-stream: ended after the idle timeout, an ext_proc error.
        release = threading.Event()
        call = stub.Process(held_open(STREAMED[:1], release), timeout=10)
        next(call)
        with pytest.raises(grpc.RpcError):
            next(call)
        release.set()
        # Two scrapes after the last callback, so rates and increases see the final counts.
        for i in range(3):
            time.sleep(1.2)
            assert service.track(callback("user0", "free")) == 202
            model_answer(100 + i)
        yield prometheus
    finally:
        channel.close()
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


LEDGER_ALERTS = ["UsageTrackingDuplicateCallbacks", "UsageTrackingLedgerFailing", "UsageTrackingLedgerStale"]


def test_ledger_alerts_are_silent_without_a_ledger(fed_prometheus):
    """The base runs without --state-dir: no ledger metrics, so nothing to be stale about."""
    rules = {r["alert"]: r["expr"] for r in alerts()}
    for name in LEDGER_ALERTS:
        status, result = fed_prometheus.query(rules[name])
        assert status == "success" and result == [], (name, result)
    _, exposed = fed_prometheus.query('{__name__=~"usage_tracking_ledger_.*"}')
    assert exposed == []


def dashboard_targets():
    return [(f"{name}: {panel['title']} [{target['refId']}]", target["expr"])
            for name, board in dashboards() for panel in board["panels"] for target in panel["targets"]]


@pytest.mark.parametrize("panel,expr", dashboard_targets())
def test_dashboard_query_returns_data(fed_prometheus, panel, expr):
    status, result = fed_prometheus.query(substitute(expr))
    assert status == "success", result
    assert result, f"{panel} shows nothing for data that exists: {substitute(expr)}"


def token_series():
    """Two users on two models, one of them through two replicas; every 15 s, as scraped."""
    per_scrape = {
        'llm_tokens_total{user="alice",groups="premium",model="m1",type="input",instance="a"}': 30,
        'llm_tokens_total{user="alice",groups="premium",model="m1",type="input",instance="b"}': 15,
        'llm_tokens_total{user="alice",groups="premium",model="m1",type="cached_input",instance="a"}': 15,
        'llm_tokens_total{user="alice",groups="premium",model="m1",type="output",instance="a"}': 15,
        'llm_tokens_total{user="alice",groups="premium",model="m1",type="reasoning",instance="a"}': 3,
        'llm_tokens_total{user="bob",groups="free",model="m2",type="input",instance="a"}': 15,
        'llm_tokens_total{user="bob",groups="free",model="m2",type="output",instance="b"}': 30,
        'usage_tracking_token_streams_total{outcome="counted",instance="a"}': 12,
        'usage_tracking_token_streams_total{outcome="no_usage",instance="a"}': 3,
        'usage_tracking_token_streams_total{outcome="not_model_answer",instance="b"}': 15,
        'usage_tracking_ext_proc_errors_total{reason="over_capacity",instance="a"}': 3,
    }
    series = [{"series": s, "values": f"0+{n}x40"} for s, n in per_scrape.items()]
    return series + [{"series": 'usage_tracking_ext_proc_streams_open{instance="a"}', "values": "5x40"},
                     {"series": 'usage_tracking_ext_proc_streams_open{instance="b"}', "values": "7x40"}]


# What each token panel shows at 10 minutes, over a 5 minute range: input plus output only in
# totals (cached_input and reasoning are parts of them), replicas summed, not_model_answer left out.
TOKEN_PANELS = {
    "Tokens in range": [("{}", 2100)],
    "Model answers without usage in range": [("{}", 0.2)],
    "Tokens per second by type": [('{type="input"}', 4), ('{type="output"}', 3), ('{type="cached_input"}', 1),
                                  ('{type="reasoning"}', 0.2)],
    "Top 10 users by tokens in range": [('{user="alice"}', 1200), ('{user="bob"}', 900)],
    "Tokens by model in range": [('{model="m1"}', 1200), ('{model="m2"}', 900)],
    "Tokens per user, model and type in range": [
        ('{user="alice",groups="premium",model="m1",type="input"}', 900),
        ('{user="alice",groups="premium",model="m1",type="cached_input"}', 300),
        ('{user="alice",groups="premium",model="m1",type="output"}', 300),
        ('{user="alice",groups="premium",model="m1",type="reasoning"}', 60),
        ('{user="bob",groups="free",model="m2",type="input"}', 300),
        ('{user="bob",groups="free",model="m2",type="output"}', 600)],
    "Token streams by outcome": [('{outcome="counted"}', 0.8), ('{outcome="no_usage"}', 0.2),
                                 ('{outcome="not_model_answer"}', 1)],
    "ext_proc errors by reason": [('{reason="over_capacity"}', 0.2)],
    "ext_proc streams open": [('{instance="a"}', 5), ('{instance="b"}', 7)],
}


# Metrics of the ext_proc listener: their panels return data on the fed Prometheus (above), and
# show exact figures on the synthetic series below.
TOKEN_METRICS = ("llm_tokens_total", "usage_tracking_token_streams_total", "usage_tracking_ext_proc_")


def test_token_panels_show_what_they_say_on_synthetic_series(tmp_path):
    targets = [(panel["title"], target["expr"]) for _, board in dashboards() for panel in board["panels"]
               for target in panel["targets"] if any(m in target["expr"] for m in TOKEN_METRICS)]
    assert sorted(title for title, _ in targets) == sorted(TOKEN_PANELS)
    cases = [{"expr": substitute(expr), "eval_time": "10m",
              "exp_samples": [{"labels": labels, "value": value} for labels, value in TOKEN_PANELS[title]]}
             for title, expr in targets]
    (tmp_path / "panels-test.yaml").write_text(yaml.safe_dump({
        "rule_files": [], "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": token_series(), "promql_expr_test": cases}]}))
    result = subprocess.run([need("promtool"), "test", "rules", "panels-test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


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
    # Users are filtered by a regex: a list of every user would be as long as the user budget.
    user = next(v for v in board["templating"]["list"] if v["name"] == "user")
    assert user["type"] == "textbox" and "user" not in found
    status, result = fed_prometheus.query(substitute('count(count by (user) (llm_requests_total{user=~"$user"}))'))
    assert status == "success" and result[0]["value"][1] == "4"


def test_in_range_panels_show_whole_requests():
    board = dict(dashboards())["llm-usage.json"]
    for panel in board["panels"]:
        for target in panel["targets"]:
            if "increase(" in target["expr"] and not target["expr"].startswith("count("):
                assert "round(increase(" in target["expr"], panel["title"]


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
