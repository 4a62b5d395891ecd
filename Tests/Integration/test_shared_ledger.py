"""The shared ledger as processes: several replicas of the built binary with --ledger-url on one
real PostgreSQL (postgres_server.py), callbacks spread over them, GET /usage on each answering for
all, through a database restart, a replica restart, and with the settings Deploy/examples/postgres
gives the pods. Skipped, with the reason, while the binary has no --ledger-url; every other failure
fails. Every process is started here and stopped by its PID; every wait is bounded."""
import datetime
import json
import os
import subprocess
import threading
import time
import urllib.parse

import pytest

from conftest import DEPLOY, ROOT, Service, callback, listening, one, request, stop

BINARY = os.environ.get("USAGE_TRACKING_BINARY", os.path.join(ROOT, ".build", "debug", "usage-tracking"))
SECRET = "shared-ledger-test-secret"
BEARER = {"Authorization": f"Bearer {SECRET}"}
# /usage answers from a short cache: a count shows within this many seconds of its 202.
USAGE_SECONDS = 15


# Session-scoped so that it runs before the session's PostgreSQL starts for nothing.
@pytest.fixture(scope="session", autouse=True)
def binary_with_ledger_url():
    if not os.access(BINARY, os.X_OK):
        pytest.fail(f"{BINARY} not built; run `swift build` (Tests/run-suite does)")
    help_text = subprocess.run([BINARY, "--help"], capture_output=True, text=True, timeout=30)
    if "--ledger-url" not in help_text.stdout + help_text.stderr:
        pytest.skip(f"{BINARY} has no --ledger-url in --help yet: the shared ledger is not built into this binary")


@pytest.fixture
def database(postgres, request):
    """A database of its own for each test, so counts never leak between tests."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return postgres.create_database(name)


def environment(**variables):
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "USAGE_TRACKING_CALLBACK_SECRET": SECRET, **variables}


def replica(postgres, database, tmp_path, instance, *arguments):
    password = postgres.password_file(tmp_path / f"password-{instance}")
    return Service("--ledger-url", postgres.url(database), "--ledger-password-file", password, "--instance", instance,
                   *arguments, env=environment())


def track(service, user, groups="free", request_id=None):
    headers = {"Content-Type": "application/json", **BEARER}
    if request_id:
        headers["x-request-id"] = request_id
    status, _, body = request(service.port, "POST", "/track", callback(user, groups).encode(), headers)
    return status, body


def get_usage(service, user, headers=BEARER, **parameters):
    query = urllib.parse.urlencode({"user": user, **parameters})
    status, response_headers, body = request(service.port, "GET", f"/usage?{query}", headers=headers)
    return status, response_headers, body


def usage(service, user, **parameters):
    status, headers, body = get_usage(service, user, **parameters)
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


def total(answer, family="llm_requests_total"):
    """A family's total in a /usage answer; a family with nothing counted may be left out."""
    return answer["families"].get(family, {"total": 0})["total"]


def wait_for_total(service, user, expected, **parameters):
    """The /usage answer once its total is `expected`, within USAGE_SECONDS (its cache)."""
    deadline = time.time() + USAGE_SECONDS
    while True:
        answer = usage(service, user, **parameters)
        if total(answer) == expected or time.time() >= deadline:
            assert total(answer) == expected, answer
            return answer
        time.sleep(0.25)


def this_month():
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + datetime.timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ"), end.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_replicas_count_into_one_ledger_and_each_answers_for_all(postgres, database, tmp_path):
    replicas = [replica(postgres, database, tmp_path, name) for name in ("replica-a", "replica-b", "replica-c")]
    try:
        for i in range(30):
            assert track(replicas[i % 3], "alice", "free" if i % 2 else "premium")[0] == 202
        for i in range(7):
            assert track(replicas[i % 3], "bob")[0] == 202
        start, end = this_month()
        for service in replicas:
            answer = wait_for_total(service, "alice", 30)
            # The default window is this calendar month, UTC.
            assert (answer["user"], answer["from"], answer["to"]) == ("alice", start, end)
            assert total(wait_for_total(service, "bob", 7)) == 7
            assert total(usage(service, "carol")) == 0
        by = usage(replicas[1], "alice", by="groups")["families"]["llm_requests_total"]["by"]
        assert sorted((entry["labels"]["groups"], entry["total"]) for entry in by) == [("free", 15), ("premium", 15)]
        assert all(set(entry["labels"]) == {"groups"} for entry in by)
    finally:
        for service in replicas:
            service.stop()


def test_usage_window_counts_only_what_falls_inside_it(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "replica-a")
    try:
        for _ in range(4):
            assert track(service, "alice")[0] == 202
        start, end = this_month()
        assert total(wait_for_total(service, "alice", 4, **{"from": start, "to": end})) == 4
        past = usage(service, "alice", **{"from": "2020-01-01T00:00:00Z", "to": "2020-02-01T00:00:00Z"})
        assert (past["from"], past["to"], total(past)) == ("2020-01-01T00:00:00Z", "2020-02-01T00:00:00Z", 0)
    finally:
        service.stop()


def test_usage_is_guarded_by_the_callback_secret_exactly_like_track(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "replica-a")
    try:
        for headers in ({}, {"Authorization": "Bearer not-the-secret"}, {"Authorization": SECRET}):
            status, response_headers, body = get_usage(service, "alice", headers=headers)
            track_status, track_headers, track_body = request(
                service.port, "POST", "/track", callback("alice", "free").encode(),
                {"Content-Type": "application/json", **headers})
            assert (status, track_status) == (401, 401), body
            assert json.loads(body)["problems"] == json.loads(track_body)["problems"]
            assert response_headers["www-authenticate"] == track_headers["www-authenticate"]
        assert get_usage(service, "alice")[0] == 200
    finally:
        service.stop()


def test_counts_outlive_a_replica_and_a_database_restart(postgres, database, tmp_path):
    first = replica(postgres, database, tmp_path, "replica-a")
    second = replica(postgres, database, tmp_path, "replica-b")
    try:
        for i in range(10):
            assert track((first, second)[i % 2], "alice")[0] == 202
        first.stop()
        first = replica(postgres, database, tmp_path, "replica-a")
        assert total(wait_for_total(first, "alice", 10)) == 10
        # While the database is down no callback is acknowledged (a 202 means committed).
        postgres.stop("immediate")
        try:
            status, body = track(second, "alice")
            assert status == 503, body
        finally:
            postgres.start()
        deadline = time.time() + 30
        while track(second, "alice")[0] != 202:
            assert time.time() < deadline, "no callback acknowledged 30 s after the database came back"
            time.sleep(0.5)
        assert total(wait_for_total(first, "alice", 11)) == 11
    finally:
        first.stop()
        second.stop()


def test_ledger_url_and_state_dir_are_exclusive(postgres, database, tmp_path):
    result = subprocess.run([BINARY, "--ledger-url", postgres.url(database), "--ledger-password-file",
                             postgres.password_file(tmp_path / "password"), "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=30, env=environment())
    assert result.returncode != 0
    assert "--ledger-url" in result.stderr + result.stdout and "--state-dir" in result.stderr + result.stdout


def test_a_wrong_password_keeps_the_replica_out_of_service_and_unprinted(postgres, database, tmp_path):
    """Either it exits non-zero, or it stays up unready and acknowledges nothing; never a 202, and
    the log says why without the password."""
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password")
    process = subprocess.Popen([BINARY, "--host", "127.0.0.1", "--port", "0", "--ledger-url", postgres.url(database),
                                "--ledger-password-file", str(wrong), "--instance", "replica-a"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment())
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 30
        while process.poll() is None and time.time() < deadline:
            ports = [found[1] for found in map(listening, list(lines)) if found and found[0] == "http"]
            if ports:
                time.sleep(2)  # time to try the database
                assert request(ports[0], "GET", "/readyz")[0] == 503
                status, _, body = request(ports[0], "POST", "/track", callback("alice", "free").encode(),
                                          {"Content-Type": "application/json", **BEARER})
                assert status == 503, body
                break
            time.sleep(0.2)
        else:
            assert process.poll() is not None and process.returncode != 0, "".join(lines)
    finally:
        stop(process)
        reader.join(timeout=5)
    output = "".join(lines)
    assert "password authentication failed" in output, output
    assert "not-the-password" not in output and postgres.password not in output


def test_the_deploy_components_settings_start_a_replica(postgres, database, tmp_path):
    """Deploy/examples/postgres's ConfigMap and env, with the database and the file moved here."""
    from test_deploy import POSTGRES, overlay_objects
    objects = overlay_objects(DEPLOY, [POSTGRES])
    settings = {k: v for k, v in one(objects, "ConfigMap")["data"].items() if k != "config.yaml"}
    settings.update(USAGE_TRACKING_LEDGER_URL=postgres.url(database),
                    USAGE_TRACKING_LEDGER_PASSWORD_FILE=postgres.password_file(tmp_path / "password"),
                    USAGE_TRACKING_CONFIG=str(tmp_path / "config.yaml"))
    (tmp_path / "config.yaml").write_text(one(objects, "ConfigMap")["data"]["config.yaml"])
    # The secret comes from the environment here, no port 9000 is taken, and the stop is not delayed.
    for variable in ("USAGE_TRACKING_CALLBACK_SECRET_FILE", "USAGE_TRACKING_EXT_PROC_PORT", "USAGE_TRACKING_DRAIN_DELAY"):
        settings.pop(variable)
    [instance] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    settings[instance["name"]] = "usage-tracking-7c9f8d6b5-x2x4q"  # what the downward API gives a pod
    service = Service(env=environment(**settings))
    try:
        assert track(service, "alice")[0] == 202
        assert total(wait_for_total(service, "alice", 1)) == 1
        assert postgres.password not in "".join(service.lines)
    finally:
        service.stop()
