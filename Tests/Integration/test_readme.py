"""README.md's examples, run: every ```console block against the built binary, in order, and the
YAML an operator is told to copy, built or compared with what Deploy/ holds.

Comparison rules for console output, the only liberties taken:
- the README's `http://localhost:8080` becomes the port the binary was started on;
- CRLF line ends (HTTP headers) are compared as LF;
- ISO-8601 UTC times (`2026-11-23T00:51:52.436Z`) match any such time;
- a last expected line `...` stands for whatever output follows;
- trailing newlines at the end of an output are ignored.
"""
import datetime
import json
import os
import re
import subprocess
import time

import yaml

from conftest import DEPLOY, EXAMPLE, README, Service, kustomize_objects, need, one

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def readme():
    with open(README) as f:
        return f.read()


def blocks(language):
    return re.findall(r"^ *```" + language + r"\n(.*?)^ *```$", readme(), re.M | re.S)


def console_examples(shared_ledger=False):
    """(command, expected output) pairs from every ```console block, in README order: those that
    need the shared ledger (/usage, run in test_shared_ledger.py) or the others."""
    examples = []
    for block in blocks("console"):
        lines = block.rstrip("\n").split("\n")
        i = 0
        while i < len(lines):
            assert lines[i].startswith("$ "), f"console block line is not a command: {lines[i]!r}"
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + lines[i].strip()
            i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            examples.append((command, "\n".join(output)))
    return [(c, o) for c, o in examples if ("/usage" in c) == shared_ledger]


def normalise(text):
    return TIME.sub("<time>", text.replace("\r\n", "\n")).rstrip("\n")


def same(expected, actual):
    expected, actual = normalise(expected), normalise(actual)
    if expected.endswith("\n..."):
        return actual.startswith(expected[:-len("...")])
    return actual == expected


def test_the_comparison_rules_are_narrow():
    assert same("HTTP/1.1 202 Accepted\ncontent-length: 0\n", "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
    assert not same("HTTP/1.1 202 Accepted\ncontent-length: 0", "HTTP/1.1 202 Accepted\r\ncontent-length: 1\r\n")
    assert same('{"time":"2026-11-23T00:51:52.436Z"}', '{"time":"2030-01-01T12:00:00.000Z"}')
    assert not same('{"time":"2026-11-23T00:51:52.436Z"}', '{"time":"yesterday"}')
    assert same("a 1\nb 2\n...", "a 1\nb 2\nc 3\n")
    assert not same("a 1\nb 2\n...", "a 1\nb 3\nc 3\n")
    assert not same("a 1\nb 2", "a 1\nb 2\nc 3")


def test_console_examples_print_what_the_readme_shows():
    examples = console_examples()
    assert [c.split()[0:3] for c, _ in examples] == [
        ["curl", "-si", "-X"], ["curl", "-si", "-X"], ["curl", "-si", "-X"],
        ["curl", "-s", "http://localhost:8080/metrics"], ["curl", "-si", "http://localhost:8080/readyz"],
        ["curl", "-s", "http://localhost:8080/debug"]]
    need("curl"), need("jq")
    service = Service()  # defaults, as README's `swift run` starts it, on a port of its own
    try:
        for command, expected in examples:
            assert command.count("http://localhost:8080/") == 1, command
            run = command.replace("http://localhost:8080/", f"http://127.0.0.1:{service.port}/")
            result = subprocess.run(["bash", "-o", "pipefail", "-c", run], capture_output=True, text=True, timeout=20)
            assert result.returncode == 0, f"{command}\n{result.stderr}"
            assert same(expected, result.stdout), f"$ {command}\n--- README\n{expected}\n--- printed\n{result.stdout}"
    finally:
        service.stop()


def test_overlay_shown_builds_with_the_release_label(tmp_path):
    overlay = next(b for b in blocks("yaml") if b.lstrip().startswith("# my-usage-tracking/kustomization.yaml"))
    fields = yaml.safe_load(overlay)
    assert fields["resources"] == ["../usage-tracking/Deploy"]
    fields["resources"] = [os.path.relpath(DEPLOY, tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(fields))
    objects = kustomize_objects(str(tmp_path))
    labelled = sorted(o["kind"] for o in objects if o["metadata"]["labels"].get("release") == "kube-prometheus-stack")
    assert labelled == ["PrometheusRule", "ServiceMonitor"]
    image = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/usage-tracking:0.1.0"


def test_callback_shown_is_the_examples():
    snippet = yaml.safe_load(next(b for b in blocks("yaml") if b.startswith("response:")))
    rules = one(kustomize_objects(EXAMPLE), "AuthPolicy")["spec"]["rules"]
    assert snippet == {"response": rules["response"], "callbacks": rules["callbacks"]}


def test_secret_commands_match_what_the_deployment_mounts():
    commands = re.findall(r"^ *kubectl -n (\S+) create secret generic (\S+) --from-literal=(\w+)=\"\$secret\"$",
                          readme(), re.M)
    assert commands == [("llm-d", "usage-tracking-callback", "secret"),
                        ("kuadrant-system", "usage-tracking-callback", "secret")]
    pod = one(kustomize_objects(), "Deployment")["spec"]["template"]["spec"]
    assert pod["volumes"][0]["secret"]["secretName"] == "usage-tracking-callback"
    assert one(kustomize_objects(), "ConfigMap")["data"]["USAGE_TRACKING_CALLBACK_SECRET_FILE"] == (
        pod["containers"][0]["volumeMounts"][0]["mountPath"] + "/secret")


def test_postgres_component_shown_builds_into_the_overlay_shown(tmp_path):
    overlay = next(b for b in blocks("yaml") if b.lstrip().startswith("# my-usage-tracking/kustomization.yaml"))
    section = readme().split("### Sharing one ledger between replicas", 1)[1].split("\n### ", 1)[0]
    addition = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    fields = {**yaml.safe_load(overlay), **yaml.safe_load(addition)}
    assert fields["components"] == ["../usage-tracking/Deploy/examples/postgres"]
    fields["resources"] = [os.path.relpath(DEPLOY, tmp_path)]
    fields["components"] = [os.path.relpath(os.path.join(DEPLOY, "examples", "postgres"), tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(fields))
    objects = kustomize_objects(str(tmp_path))
    assert one(objects, "ConfigMap")["data"]["USAGE_TRACKING_LEDGER_URL"] == "postgres://usage_tracking@db.example.svc:5432/usage"
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    secret = re.search(r"kubectl -n (\S+) create secret generic (\S+) --from-literal=(\w+)=", section).groups()
    volume = next(v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["secret"]["secretName"] == secret[1])
    assert (secret[0], [item["key"] for item in volume["secret"]["items"]]) == ("llm-d", [secret[2]])


def test_ledger_component_shown_builds_into_the_overlay_shown(tmp_path):
    overlay = next(b for b in blocks("yaml") if b.lstrip().startswith("# my-usage-tracking/kustomization.yaml"))
    addition = next(b for b in blocks("yaml") if b.lstrip().startswith("# my-usage-tracking/kustomization.yaml, beside"))
    fields = {**yaml.safe_load(overlay), **yaml.safe_load(addition)}
    assert fields["components"] == ["../usage-tracking/Deploy/examples/ledger"]
    fields["resources"] = [os.path.relpath(DEPLOY, tmp_path)]
    fields["components"] = [os.path.relpath(os.path.join(DEPLOY, "examples", "ledger"), tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(fields))
    objects = kustomize_objects(str(tmp_path))
    assert [o["kind"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")] == ["StatefulSet"]
    image = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/usage-tracking:0.1.0"
    # The names the README gives the pods, claims and mount are the ones the build produces.
    statefulset = one(objects, "StatefulSet")
    claim = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    section = readme().split("### Keeping counts across restarts", 1)[1].split("\n## ", 1)[0]
    assert f"`{claim}-{statefulset['metadata']['name']}-0`" in section
    assert f"`{one(objects, 'ConfigMap')['data']['USAGE_TRACKING_STATE_DIR']}`" in section


FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"


def at(moment):
    """A wrapper that runs the binary with its wall clock starting at `moment` (UTC), through
    Debian's libfaketime preloaded; the monotonic clock its timers use is left alone. Each step
    execs the next, so the process signalled is the binary's. The shell is there because the
    Swift binary exec'd straight from `env` under libfaketime sees no arguments (seen here)."""
    assert os.path.exists(FAKETIME), "libfaketime missing; Tests/run-suite installs Debian's faketime"
    return ("env", f"LD_PRELOAD={FAKETIME}", f"FAKETIME=@{moment}", "TZ=UTC", "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "sh", "-c", 'exec "$0" "$@"')


def kill(service):
    """Ends a binary run under libfaketime with SIGKILL: libfaketime's semaphore waits can leave
    libdispatch's workers asleep at shutdown (a hang seen here, never without it). In `always`
    mode every 202 was committed before it was sent, so nothing counted depends on the exit."""
    service.process.kill()
    service.process.wait()


def month_query(query, copy, month):
    """The README's query for `month` (its two bounds each replaced once, from the text as written)."""
    first, following = month, (month.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    bounds = {"2026-11-01": first.isoformat(), "2026-12-01": following.isoformat()}
    assert all(query.count(bound) == 1 for bound in bounds), query
    return re.sub("|".join(bounds), lambda m: bounds[m.group()], query.replace("/tmp/ledger.sqlite", str(copy)))


def test_ledger_query_shown_reads_what_was_counted(tmp_path):
    """The README's snapshot and invoice query, run as written against a ledger the binary wrote
    with its clock pinned to the last hour of the README's month (November 2026), and again
    after a restart (from kill -9) just past midnight into December: each count is billed to its own month,
    whatever today's date. (Where `interval` mode books a count acknowledged before midnight
    but committed after it: `UsageLedgerTests`.)"""
    need("sqlite3")
    block = next(b for b in blocks("sh") if "--snapshot-ledger" in b)
    snapshot, query = block.split("\n", 1)
    state = tmp_path / "state"
    copy = tmp_path / "ledger.sqlite"

    def send(service, user, times):
        for _ in range(times):
            assert service.track(json.dumps({"user": user, "groups": "g", "path": "/v1/completions"})) == 202

    service = Service("--state-dir", str(state), wrapper=at("2026-11-30 23:59:00"))
    try:
        send(service, "alice", 3)
        send(service, "bob", 1)
    finally:
        kill(service)
    service = Service("--state-dir", str(state), wrapper=at("2026-12-01 00:00:00"))
    try:
        send(service, "carol", 2)
        time.sleep(1.5)  # `always` mode: the snapshot holds what the journal's last fold wrote in (README)
        run = snapshot.replace("usage-tracking", service.binary, 1).replace("/var/lib/usage-tracking", str(state))
        run = run.replace("/tmp/ledger.sqlite", str(copy))
        result = subprocess.run(run, shell=True, capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"ledger copied to {copy}\n"
    finally:
        kill(service)

    def rows(query):
        result = subprocess.run(query, shell=True, capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        if not result.stdout:
            return []  # sqlite3 prints no header for no rows
        lines = [line.split() for line in result.stdout.strip().split("\n")]
        assert lines[0] == ["user", "requests"]
        return lines[2:]

    assert rows(query.replace("/tmp/ledger.sqlite", str(copy))) == [["alice", "3"], ["bob", "1"]]
    assert rows(month_query(query, copy, datetime.date(2026, 12, 1))) == [["carol", "2"]]
    assert rows(month_query(query, copy, datetime.date(2026, 10, 1))) == []


def test_month_query_bounds_are_replaced_once():
    """The substitution above cannot chain (December's first bound is November's second)."""
    query = "h.hour >= unixepoch('2026-11-01') AND h.hour < unixepoch('2026-12-01') FROM /tmp/ledger.sqlite"
    assert month_query(query, "x", datetime.date(2026, 12, 1)) == \
        "h.hour >= unixepoch('2026-12-01') AND h.hour < unixepoch('2027-01-01') FROM x"
    assert month_query(query, "x", datetime.date(2028, 2, 1)) == \
        "h.hour >= unixepoch('2028-02-01') AND h.hour < unixepoch('2028-03-01') FROM x"
