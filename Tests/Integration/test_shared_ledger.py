"""The shared ledger (issue 17) as it runs: several instances of the built binary with --ledger-url
on one real PostgreSQL (postgres_server.py: Debian's server, its own cluster, a non-root uid,
loopback, a password), under keep-alive callers; replicas killed with SIGKILL, the database
stopped and started under load; totals read back through /usage, psql and a real Prometheus.
Every process here is started here and ended by its PID; every wait and load is bounded."""
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

from conftest import ROOT, Prometheus, Replies, Service, callback, post, request, stop
from test_ledger import BINARY, graceful, killed, log_record, outcomes, resend, scrape, track, usage, wait_until

_names = itertools.count()
SECRET = "shared-ledger-test-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


@pytest.fixture
def database(postgres):
    """A database of its own for each test: tests never see each other's counts."""
    return postgres.create_database(f"usage_{os.getpid()}_{next(_names)}")


def replica(postgres, database, tmp_path, instance, *arguments, secret=True):
    """One instance of the binary on the shared ledger."""
    password = postgres.password_file(tmp_path / f"password-{instance}")
    env = {**os.environ, "USAGE_TRACKING_CALLBACK_SECRET": SECRET} if secret else None
    return Service("--ledger-url", postgres.url(database), "--ledger-password-file", password, "--instance", instance,
                   *arguments, env=env)


def send(port, user, request_id=None, path="/v1/completions"):
    headers = {"Content-Type": "application/json", **AUTH}
    if request_id is not None:
        headers["x-request-id"] = request_id
    status, _, body = request(port, "POST", "/track", callback(user, "g", path).encode(), headers)
    return status, body


def usage_of(port, user, **parameters):
    status, headers, body = request(port, "GET", "/usage?" + urllib.parse.urlencode({"user": user, **parameters}), headers=AUTH)
    return status, headers, json.loads(body)


def requests_total(port, user):
    status, _, answer = usage_of(port, user)
    assert status == 200, answer
    return answer["families"]["llm_requests_total"]["total"] if "llm_requests_total" in answer["families"] else 0


def total_becomes(port, user, expected):
    """True once /usage says `expected`: an answer is cached 2 s, so a count made just after an
    earlier question shows within that."""
    deadline = time.monotonic() + 3
    while (total := requests_total(port, user)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return total == expected


def month_per_user(postgres, database):
    """README's month-per-user query, as an operator runs it in psql, for the current month."""
    now = time.gmtime()
    this_month = f"{now.tm_year:04d}-{now.tm_mon:02d}-01 00:00+00"
    next_month = f"{now.tm_year + now.tm_mon // 12:04d}-{now.tm_mon % 12 + 1:02d}-01 00:00+00"
    query = README_QUERY.replace("'2026-12-01 00:00+00'", f"'{this_month}'").replace("'2027-01-01 00:00+00'", f"'{next_month}'")
    return {user: int(total) for user, total in postgres.psql(query, database)}


def readme_query():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("### One ledger for many replicas"):]
    return section[section.index("```sql\n") + 7:section.index("```", section.index("```sql\n") + 7)]


README_QUERY = readme_query()


# --- one ledger, many replicas ------------------------------------------------------------------

def test_three_replicas_write_one_ledger_and_every_reader_sums_all_of_them(postgres, database, tmp_path):
    replicas = [replica(postgres, database, tmp_path, f"r{i}") for i in range(3)]
    prometheus = None
    try:
        sent = {"alice": [3, 2, 0], "bob": [0, 0, 4]}
        for user, per_replica in sent.items():
            for service, count in zip(replicas, per_replica):
                for _ in range(count):
                    assert send(service.port, user)[0] == 202
        for service in replicas:
            assert requests_total(service.port, "alice") == 5
            assert requests_total(service.port, "bob") == 4
        assert requests_total(replicas[0].port, "nobody") == 0
        assert month_per_user(postgres, database) == {"alice": 5, "bob": 4}
        # Each replica restores its own row of running totals, and Prometheus sums them.
        assert postgres.psql("SELECT instance, sum(total) FROM series s JOIN metric m ON m.id = s.metric_id "
                             "WHERE m.name = 'llm_requests_total' GROUP BY 1 ORDER BY 1", database) == [
            ("r0", "3"), ("r1", "2"), ("r2", "4")]
        prometheus = Prometheus([service.port for service in replicas])
        result = prometheus.wait_for("sum by (user) (llm_requests_total)", lambda r: len(r) == 2
                                     and sum(float(s["value"][1]) for s in r) == 9)
        assert {s["metric"]["user"]: float(s["value"][1]) for s in result} == {"alice": 5.0, "bob": 4.0}
    finally:
        if prometheus:
            prometheus.stop()
        for service in replicas:
            service.stop()


def test_usage_breaks_down_by_label_and_reads_the_span_asked_for(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "r0")
    try:
        for path, count in (("/v1/chat/completions", 3), ("/v1/completions", 1)):
            for _ in range(count):
                assert send(service.port, "carol", path=path)[0] == 202
        status, headers, answer = usage_of(service.port, "carol", by="path")
        assert status == 200
        assert headers["cache-control"] == "private, max-age=2"
        assert headers["content-type"].startswith("application/json")
        assert answer["families"]["llm_requests_total"] == {"total": 4, "by": [
            {"labels": {"path": "/v1/chat/completions"}, "total": 3}, {"labels": {"path": "/v1/completions"}, "total": 1}]}
        now = time.time()
        month = time.strftime("%Y-%m-01T00:00:00Z", time.gmtime(now))
        assert answer["from"] == month
        # The hour the counts are in, and the one before it.
        this_hour = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(now))
        before = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(now - 3600))
        status, _, answer = usage_of(service.port, "carol", **{"from": before, "to": this_hour})
        assert status == 200 and answer["families"]["llm_requests_total"]["total"] == 0
        status, _, answer = usage_of(service.port, "carol", **{"from": this_hour})
        assert status == 200 and answer["families"]["llm_requests_total"]["total"] == 4
    finally:
        service.stop()


def test_the_readmes_usage_example_prints_what_it_shows(postgres, database, tmp_path):
    from test_readme import console_examples, same
    [(command, expected)] = console_examples(shared_ledger=True)
    service = replica(postgres, database, tmp_path, "r0")
    try:
        for path, count in (("/v1/chat/completions", 5), ("/v1/completions", 2)):
            for _ in range(count):
                assert send(service.port, "premiumuser1", path=path)[0] == 202
        now = time.gmtime()
        month = f"{now.tm_year:04d}-{now.tm_mon:02d}-01T00:00:00Z"
        following = f"{now.tm_year + now.tm_mon // 12:04d}-{now.tm_mon % 12 + 1:02d}-01T00:00:00Z"
        expected = expected.replace("2026-12-01T00:00:00Z", month).replace("2027-01-01T00:00:00Z", following)
        run = command.replace("http://localhost:8080/", f"http://127.0.0.1:{service.port}/")
        result = subprocess.run(["bash", "-o", "pipefail", "-c", run], capture_output=True, text=True, timeout=20,
                                env={**os.environ, "secret": SECRET})
        assert result.returncode == 0, result.stderr
        assert same(expected, result.stdout), f"$ {command}\n--- README\n{expected}\n--- printed\n{result.stdout}"
    finally:
        service.stop()


def test_an_answer_is_kept_two_seconds_then_asked_again(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "r0")
    try:
        assert send(service.port, "kate")[0] == 202
        assert requests_total(service.port, "kate") == 1
        asked = time.monotonic()
        assert send(service.port, "kate")[0] == 202
        assert requests_total(service.port, "kate") == 1  # the kept answer
        assert time.monotonic() - asked < 1.5
        time.sleep(2.1)
        assert requests_total(service.port, "kate") == 2
    finally:
        service.stop()


def test_usage_refusals_name_every_problem(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "r0")
    try:
        status, headers, body = request(service.port, "GET", "/usage?user=a")
        assert (status, json.loads(body)) == (401, {"error": "unauthorized", "problems": ["missing credentials in Authorization"]})
        assert headers["www-authenticate"] == 'Bearer realm="usage-tracking"'
        status, _, answer = usage_of(service.port, "", by="colour", to="soon")
        assert (status, answer) == (400, {"error": "bad request", "problems": [
            "user is required: /usage?user=NAME",
            "to: not an RFC 3339 time such as 2027-01-01T00:00:00Z",
            "by: 'colour' is not a label of any family; labels: groups, path, user"]})
        status, _, body = request(service.port, "POST", "/usage?user=a", body=b"{}", headers=AUTH)
        assert (status, json.loads(body)) == (405, {"error": "method not allowed", "problems": ["POST /usage is not allowed; use GET"]})
    finally:
        service.stop()


def test_usage_without_a_shared_ledger_is_404_and_says_why(tmp_path):
    for arguments in ((), ("--state-dir", str(tmp_path / "ledger"))):
        service = Service(*arguments)
        try:
            status, _, body = request(service.port, "GET", "/usage?user=a")
            assert (status, json.loads(body)) == (404, {"error": "no shared ledger", "problems": [
                "/usage reads the ledger all replicas share (--ledger-url); this service has none, so it knows only its "
                "own counts (see /metrics)"]})
        finally:
            service.stop()


def test_hashed_users_are_asked_for_by_name(postgres, database, tmp_path):
    config = tmp_path / "metering.yaml"
    config.write_text("metrics:\n  - name: llm_requests_total\n    labels:\n"
                      "      - {name: user, from: user, required: true, hash: hmac-sha256}\n"
                      "      - {name: path, from: path, kind: route}\n")
    key = tmp_path / "key"
    key.write_text("k" * 32)
    service = replica(postgres, database, tmp_path, "r0", "--config", str(config), "--label-hmac-key-file", str(key))
    try:
        for _ in range(2):
            assert send(service.port, "dave")[0] == 202
        assert requests_total(service.port, "dave") == 2
        stored = postgres.psql("SELECT user_label FROM series WHERE user_label IS NOT NULL", database)
        assert stored and all(row[0] != "dave" for row in stored)
    finally:
        service.stop()


# --- exactly once across replicas ---------------------------------------------------------------

def pipelined(port, request_ids, user, start, results):
    """Sends every id on one keep-alive connection, pipelined in chunks, once `start` is set."""
    body = callback(user, "g").encode()
    start.wait()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = Replies(sock)
        for chunk_start in range(0, len(request_ids), 50):
            chunk = request_ids[chunk_start:chunk_start + 50]
            sock.sendall(b"".join(post("/track", body, [f"x-request-id: {r}", f"Authorization: Bearer {SECRET}"]) for r in chunk))
            for _ in chunk:
                results.append(replies.next()[0])


def test_the_same_request_ids_sent_to_two_replicas_at_once_count_once(postgres, database, tmp_path):
    first, second = replica(postgres, database, tmp_path, "a"), replica(postgres, database, tmp_path, "b")
    try:
        ids = [f"twice-{i}" for i in range(400)]
        start = threading.Event()
        results = []
        threads = [threading.Thread(target=pipelined, args=(s.port, ids, "erin", start, results)) for s in (first, second)]
        for thread in threads:
            thread.start()
        start.set()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive()
        assert results == [202] * 800
        assert requests_total(first.port, "erin") == 400
        assert postgres.psql("SELECT count(*) FROM request_id", database) == [("400",)]
        counted = [outcomes(scrape(s.port)) for s in (first, second)]
        assert sum(c["accepted"] for c in counted) == 400
        assert sum(c["duplicate"] for c in counted) == 400
        assert sum(usage(scrape(s.port)).get("erin", 0) for s in (first, second)) == 400
    finally:
        first.stop()
        second.stop()


class Callers:
    """Keep-alive callers that go on through refusals: every id sent and every id acknowledged."""

    def __init__(self, port, users, tag, seconds):
        self.sent, self.acked, self.statuses = [], [], {}
        self.stop_at = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.call, args=(port, user, tag), daemon=True) for user in users]
        for thread in self.threads:
            thread.start()

    def call(self, port, user, tag):
        body = callback(user, "load").encode()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                replies = Replies(sock)
                for i in itertools.count():
                    if time.monotonic() > self.stop_at:
                        return
                    request_id = f"{tag}-{user}-{i}"
                    with self.lock:
                        self.sent.append((user, request_id))
                    sock.sendall(post("/track", body, [f"x-request-id: {request_id}", f"Authorization: Bearer {SECRET}"]))
                    status, _, _ = replies.next()
                    with self.lock:
                        self.statuses[status] = self.statuses.get(status, 0) + 1
                        if status == 202:
                            self.acked.append((user, request_id))
                    if status != 202:
                        time.sleep(0.01)
        except OSError:
            return  # the replica was killed under this caller

    def join(self):
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive()


def test_kill_9_of_a_replica_loses_no_acknowledged_callback_and_counts_none_twice(postgres, database, tmp_path):
    users = [f"kill-{i}" for i in range(4)]
    service = replica(postgres, database, tmp_path, "k")
    try:
        callers = Callers(service.port, users, "kill", seconds=30)
        wait_until(lambda: len(callers.acked) >= 200, 20, "the load was not acknowledged")
        killed(service)
        callers.join()
        service = replica(postgres, database, tmp_path, "k")
        restored = usage(scrape(service.port))
        for user in users:
            acked = sum(1 for u, _ in callers.acked if u == user)
            sent = sum(1 for u, _ in callers.sent if u == user)
            assert acked <= restored.get(user, 0) <= sent, (user, acked, sent, restored)
            assert requests_total(service.port, user) == restored.get(user, 0)
        # Every id sent, again: each is now counted exactly once.
        for user in users:
            resend_with_secret(service.port, [r for u, r in callers.sent if u == user], user)
        for user in users:
            assert total_becomes(service.port, user, sum(1 for u, _ in callers.sent if u == user))
        graceful(service)
    finally:
        stop(service.process)


def resend_with_secret(port, request_ids, user):
    resend(port, request_ids, user, headers=[f"Authorization: Bearer {SECRET}"])


def test_postgres_stopped_and_started_under_load_refuses_meanwhile_and_resumes_by_itself(postgres, database, tmp_path):
    users = [f"outage-{i}" for i in range(3)]
    service = replica(postgres, database, tmp_path, "o")
    try:
        callers = Callers(service.port, users, "outage", seconds=25)
        wait_until(lambda: len(callers.acked) >= 100, 20, "the load was not acknowledged")
        postgres.stop("immediate")
        try:
            wait_until(lambda: callers.statuses.get(503, 0) >= 20, 20, "no refusal while the database was down")
            assert request(service.port, "GET", "/readyz")[0] == 503
            status, body = send(service.port, "probe")
            assert status == 503
            assert json.loads(body)["problems"] == ["the usage ledger cannot commit (see the service's log); this callback was not counted"]
            asked = time.monotonic()
            assert usage_of(service.port, "nobody-asked-before") == (503, {
                "content-type": "application/json", "content-length": "100"}, {
                "error": "unavailable", "problems": ["the shared ledger cannot be read now (see the service's log)"]})
            assert time.monotonic() - asked < 3
        finally:
            postgres.start()
        wait_until(lambda: request(service.port, "GET", "/readyz")[0] == 200, 30, "/readyz did not recover")
        assert scrape(service.port)["usage_tracking_ledger_errors_total"] > 0
        acked_before = len(callers.acked)
        wait_until(lambda: len(callers.acked) > acked_before + 50, 20, "callbacks were not acknowledged again")
        callers.join()
        log_record(service, "ledger commits succeed again", seconds=1)
        for user in users:
            acked = sum(1 for u, _ in callers.acked if u == user)
            assert requests_total(service.port, user) == acked
        # The refused ones, again: counted now, once each.
        for user in users:
            resend_with_secret(service.port, [r for u, r in callers.sent if u == user], user)
            assert total_becomes(service.port, user, sum(1 for u, _ in callers.sent if u == user))
    finally:
        postgres.start() if postgres.pid is None else None
        service.stop()


def test_in_interval_mode_a_database_outage_is_bridged_in_memory_and_committed_after(postgres, database, tmp_path):
    users = [f"bridge-{i}" for i in range(2)]
    service = replica(postgres, database, tmp_path, "b", "--fsync", "interval", "--fsync-interval", "1")
    try:
        callers = Callers(service.port, users, "bridge", seconds=12)
        wait_until(lambda: len(callers.acked) >= 50, 20, "the load was not acknowledged")
        postgres.stop("immediate")
        try:
            acked = len(callers.acked)
            wait_until(lambda: len(callers.acked) > acked + 50, 20, "callbacks were not acknowledged while the database was down")
            wait_until(lambda: request(service.port, "GET", "/readyz")[0] == 503, 10, "/readyz did not report the failing commits")
        finally:
            postgres.start()
        callers.join()
        assert set(callers.statuses) == {202}
        wait_until(lambda: request(service.port, "GET", "/readyz")[0] == 200, 30, "/readyz did not recover")
        counted = usage(scrape(service.port))
        wait_until(lambda: all(month_per_user(postgres, database).get(u) == counted[u] for u in users), 10,
                   "what was counted during the outage did not reach the database")
        for user in users:
            assert counted[user] == sum(1 for u, _ in callers.acked if u == user)
    finally:
        service.stop()


def test_hours_past_the_retention_are_deleted_and_running_totals_kept(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "ret", "--ledger-retention-days", "1")
    try:
        assert send(service.port, "nina")[0] == 202
        graceful(service)
        # Two days ago, in this replica's series: as if it had been counted then.
        postgres.psql("INSERT INTO usage_hourly (instance, series_id, hour, amount) SELECT instance, id, "
                      "date_trunc('hour', now()) - interval '2 days', 5 FROM series WHERE instance = 'ret' AND user_label = 'nina'", database)
        assert postgres.psql("SELECT count(*) FROM usage_hourly h JOIN series s ON s.instance = h.instance AND s.id = h.series_id "
                             "WHERE s.user_label = 'nina'", database) == [("2",)]
        service = replica(postgres, database, tmp_path, "ret", "--ledger-retention-days", "1")
        assert send(service.port, "nina")[0] == 202  # the first commit prunes
        assert postgres.psql("SELECT amount FROM usage_hourly h JOIN series s ON s.instance = h.instance AND s.id = h.series_id "
                             "WHERE s.user_label = 'nina'", database) == [("2",)]
        assert usage(scrape(service.port))["nina"] == 2
    finally:
        stop(service.process)


def test_interval_mode_counts_at_once_and_commits_within_the_interval(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "i", "--fsync", "interval", "--fsync-interval", "1")
    try:
        for i in range(5):
            assert send(service.port, "frank", f"iv-{i}")[0] == 202
        assert send(service.port, "frank", "iv-0")[0] == 202  # a repeat, within this replica
        assert usage(scrape(service.port))["frank"] == 5
        wait_until(lambda: month_per_user(postgres, database).get("frank") == 5, 10, "the interval commit did not land")
        graceful(service)
        service = replica(postgres, database, tmp_path, "i")
        assert usage(scrape(service.port))["frank"] == 5
        assert send(service.port, "frank", "iv-1")[0] == 202  # still within the window, after the restart
        assert requests_total(service.port, "frank") == 5
    finally:
        stop(service.process)


# --- startup ------------------------------------------------------------------------------------

def test_a_database_not_reachable_at_start_is_waited_for_with_503s_not_a_crash_loop(postgres, database, tmp_path):
    postgres.stop("fast")
    try:
        service = replica(postgres, database, tmp_path, "late")
    except BaseException:
        postgres.start()
        raise
    try:
        record = log_record(service, "ledger not reachable; callbacks are refused with 503 and /readyz reports 503 until it is")
        assert record["ledger"] == postgres.url(database)
        assert request(service.port, "GET", "/healthz")[0] == 200
        assert request(service.port, "GET", "/readyz")[0] == 503
        status, body = send(service.port, "early")
        assert (status, json.loads(body)["problems"]) == (503, [
            "the usage ledger is not reachable yet (see the service's log); this callback was not counted"])
        status, _, body = request(service.port, "GET", "/metrics")
        assert (status, json.loads(body)["problems"]) == (503, ["the usage ledger is not reachable yet; the counts are served once it is"])
        postgres.start()
        wait_until(lambda: request(service.port, "GET", "/readyz")[0] == 200, 40, "/readyz did not turn 200 once the database was up")
        log_record(service, "ledger restored", seconds=1)
        assert send(service.port, "early")[0] == 202
        assert requests_total(service.port, "early") == 1
        assert outcomes(scrape(service.port))["unavailable"] == 1
    finally:
        if postgres.pid is None:
            postgres.start()
        service.stop()


def refusal(arguments, env=None):
    """Runs the binary expecting it to stop at startup: (exit code, the critical log line's error)."""
    result = subprocess.run([BINARY, "--host", "127.0.0.1", "--port", "0", *arguments], capture_output=True, text=True,
                            timeout=30, env=env)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    errors = [line.get("error") for line in lines if line.get("msg") == "cannot start"]
    return result.returncode, errors[0] if errors else result.stdout + result.stderr


def test_a_wrong_password_and_a_missing_database_stop_startup_with_the_servers_reason(postgres, database, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    code, error = refusal(["--ledger-url", postgres.url(database), "--ledger-password-file", str(wrong)])
    assert code == 1
    assert error == (f"--ledger-url (USAGE_TRACKING_LEDGER_URL): {postgres.url(database)}: the server refused user "
                     f"{postgres.user}: password authentication failed for user \"{postgres.user}\" (check --ledger-password-file)")
    assert "not-the-password" not in error
    password = postgres.password_file(tmp_path / "password")
    code, error = refusal(["--ledger-url", postgres.url("no_such_db"), "--ledger-password-file", password])
    assert (code, error) == (1, f"--ledger-url (USAGE_TRACKING_LEDGER_URL): {postgres.url('no_such_db')}: database no_such_db "
                                "does not exist on the server: database \"no_such_db\" does not exist")


def test_a_newer_schema_is_refused_and_left_as_it_was(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "s")
    assert send(service.port, "gina")[0] == 202
    graceful(service)
    postgres.psql("UPDATE usage_tracking_schema SET version = 2", database)
    before = postgres.psql("SELECT instance, id, labels, total FROM series ORDER BY 1, 2", database)
    code, error = refusal(["--ledger-url", postgres.url(database), "--ledger-password-file", postgres.password_file(tmp_path / "p")])
    assert (code, error) == (1, f"--ledger-url (USAGE_TRACKING_LEDGER_URL): {postgres.url(database)}: written by a newer version "
                                "(schema 2; this build reads up to 1); left as it is")
    assert postgres.psql("SELECT version FROM usage_tracking_schema", database) == [("2",)]
    assert postgres.psql("SELECT instance, id, labels, total FROM series ORDER BY 1, 2", database) == before


@pytest.mark.parametrize("arguments, error", [
    (["--ledger-url", "postgres://u@h/d", "--state-dir", "/tmp/x"],
     "--ledger-url (USAGE_TRACKING_LEDGER_URL) and --state-dir (USAGE_TRACKING_STATE_DIR) are exclusive: one ledger, shared in "
     "PostgreSQL or in a directory of this replica's own"),
    (["--ledger-url", "postgres://u:pw@h/d"],
     "--ledger-url (USAGE_TRACKING_LEDGER_URL): the URL holds a password; give it in --ledger-password-file "
     "(USAGE_TRACKING_LEDGER_PASSWORD_FILE) instead"),
    (["--ledger-password-file", "/etc/hostname"], "--ledger-password-file (USAGE_TRACKING_LEDGER_PASSWORD_FILE) needs --ledger-url (USAGE_TRACKING_LEDGER_URL)"),
    (["--ledger-url", "postgres://u@h/d", "--instance", "two words"],
     "--instance (USAGE_TRACKING_INSTANCE) must be at most 253 printable ASCII characters without spaces"),
])
def test_ledger_flags_are_checked_before_anything_starts(arguments, error):
    result = subprocess.run([BINARY, *arguments], capture_output=True, text=True, timeout=30)
    assert result.returncode == 64, result.stderr
    assert result.stderr.startswith(f"Error: {error}\n"), result.stderr
    assert "pw@" not in result.stderr


def test_a_second_replica_with_the_same_instance_is_refused_until_the_first_is_gone(postgres, database, tmp_path):
    """Two replicas under one name would restore each other's totals (and Prometheus would sum
    them twice): while one holds the name, another stops at startup saying so; once the first has
    gone, the name is free again, with its counts."""
    first = replica(postgres, database, tmp_path, "twin")
    second = None
    try:
        assert send(first.port, "ivy")[0] == 202
        password = postgres.password_file(tmp_path / "password-second")
        refused = subprocess.run([BINARY, "--host", "127.0.0.1", "--port", "0", "--ledger-url", postgres.url(database),
                                  "--ledger-password-file", password, "--instance", "twin"],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1
        [line] = [json.loads(line) for line in refused.stdout.splitlines() if '"cannot start"' in line]
        assert line["error"] == (f"--ledger-url (USAGE_TRACKING_LEDGER_URL): {postgres.url(database)}: --instance twin is in use by "
                                 "another replica's connection; each replica needs a name of its own (the pod name)")
        assert send(first.port, "ivy")[0] == 202, "the first goes on"
        graceful(first)
        second = replica(postgres, database, tmp_path, "twin")
        assert send(second.port, "ivy")[0] == 202
        assert requests_total(second.port, "ivy") == 3
        assert postgres.psql("SELECT instance FROM replica", database) == [("twin",)]
    finally:
        stop(first.process)
        if second:
            stop(second.process)


def test_the_instance_is_the_host_name_unless_given(postgres, database, tmp_path):
    password = postgres.password_file(tmp_path / "password")
    service = Service("--ledger-url", postgres.url(database), "--ledger-password-file", password)
    try:
        assert track(service.port, "lena")[0] == 202
        assert postgres.psql("SELECT instance FROM replica", database) == [(socket.gethostname(),)]
        assert log_record(service, "ledger replica")["instance"] == socket.gethostname()
    finally:
        service.stop()


def test_the_password_is_never_logged_nor_shown(postgres, database, tmp_path):
    service = replica(postgres, database, tmp_path, "p")
    try:
        assert send(service.port, "hank")[0] == 202
        _, _, debug = request(service.port, "GET", "/debug")
        settings = json.loads(debug)["configuration"]
        assert (settings["ledger_url"], settings["ledger_password"], settings["instance"]) == (postgres.url(database), "set", "p")
        _, _, page = request(service.port, "GET", "/")
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(timeout=20)
        time.sleep(0.2)
        everything = "".join(service.lines) + debug.decode() + page.decode()
        assert postgres.password not in everything
    finally:
        stop(service.process)


def test_the_deploy_components_settings_start_a_replica(postgres, database, tmp_path):
    """Deploy/examples/postgres's ConfigMap and env, with the database and the files moved here."""
    from conftest import DEPLOY, one
    from test_deploy import POSTGRES, overlay_objects
    objects = overlay_objects(DEPLOY, [POSTGRES])
    data = one(objects, "ConfigMap")["data"]
    settings = {k: v for k, v in data.items() if k != "config.yaml"}
    (tmp_path / "config.yaml").write_text(data["config.yaml"])
    settings.update(USAGE_TRACKING_LEDGER_URL=postgres.url(database),
                    USAGE_TRACKING_LEDGER_PASSWORD_FILE=postgres.password_file(tmp_path / "password"),
                    USAGE_TRACKING_CONFIG=str(tmp_path / "config.yaml"), USAGE_TRACKING_CALLBACK_SECRET=SECRET)
    # The secret comes from the environment here, no port 9000 is taken, and the stop is not delayed.
    for variable in ("USAGE_TRACKING_CALLBACK_SECRET_FILE", "USAGE_TRACKING_EXT_PROC_PORT", "USAGE_TRACKING_DRAIN_DELAY"):
        settings.pop(variable)
    [instance] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    settings[instance["name"]] = "usage-tracking-7c9f8d6b5-x2x4q"  # what the downward API gives a pod
    service = Service(env={"PATH": os.environ["PATH"], **settings})
    try:
        assert send(service.port, "alice")[0] == 202
        assert requests_total(service.port, "alice") == 1
        assert postgres.psql("SELECT instance FROM replica", database) == [("usage-tracking-7c9f8d6b5-x2x4q",)]
        assert postgres.password not in "".join(service.lines)
    finally:
        service.stop()


def test_a_stalled_database_turns_commits_into_503s_within_the_commit_timeout(postgres, database, tmp_path):
    """A transaction of someone else's holds `replica` locked: every commit waits on it, and
    PostgreSQL ends the wait after the commit timeout (2 s, statement_timeout)."""
    service = replica(postgres, database, tmp_path, "slow")
    try:
        assert send(service.port, "ivan", "before")[0] == 202
        locker = threading.Thread(target=postgres.psql, args=(
            "BEGIN; LOCK TABLE replica IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(6); COMMIT", database))
        locker.start()
        wait_until(lambda: postgres.psql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                                         "WHERE c.relname = 'replica' AND l.mode = 'AccessExclusiveLock' AND l.granted",
                                         database) == [("1",)], 10, "the lock was not taken")
        started = time.monotonic()
        status, body = send(service.port, "ivan", "stalled")
        waited = time.monotonic() - started
        assert (status, json.loads(body)["problems"]) == (503, [
            "the usage ledger cannot commit (see the service's log); this callback was not counted"])
        assert 1.5 < waited < 5, waited
        assert "canceling statement due to statement timeout" in log_record(
            service, "ledger commit failed; /readyz reports 503 until one succeeds")["error"]
        locker.join(timeout=20)
        wait_until(lambda: request(service.port, "GET", "/readyz")[0] == 200, 20, "/readyz did not recover")
        assert send(service.port, "ivan", "stalled")[0] == 202  # refused before, so it counts now
        assert requests_total(service.port, "ivan") == 2
    finally:
        service.stop()


def test_token_counts_go_to_the_shared_ledger_and_usage_answers_them_per_type(postgres, database, tmp_path):
    """A model answer through the ext_proc port, in interval mode: not counted while the database
    has not been reached (nothing may be counted before the restore), counted once it has, and
    /usage answers the token family per type."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
    from test_ext_proc_grpc import SSE_ANSWER, SSE_HEAD, SSE_TOKENS, answer, outcome, series
    postgres.stop("fast")
    try:
        service = replica(postgres, database, tmp_path, "t", "--ext-proc-port", "0", "--fsync", "interval")
    except BaseException:
        postgres.start()
        raise
    channel = grpc.insecure_channel(f"127.0.0.1:{service.ext_proc_port}")
    try:
        stub = ext_proc_grpc.ExternalProcessorStub(channel)
        list(stub.Process(iter(answer([SSE_ANSWER], user="mia", request_id="t-1", head=SSE_HEAD)), timeout=10))
        postgres.start()
        wait_until(lambda: request(service.port, "GET", "/readyz")[0] == 200, 40, "/readyz did not turn 200")

        class Running:  # what test_ext_proc_grpc's series() reads
            pass
        running = Running()
        running.service = service
        assert series(running)[outcome("unavailable")] == 1
        list(stub.Process(iter(answer([SSE_ANSWER], user="mia", request_id="t-2", head=SSE_HEAD)), timeout=10))
        wait_until(lambda: series(running).get(outcome("counted")) == 1, 10, "the answer was not counted")
        wait_until(lambda: usage_of(service.port, "mia")[2]["families"].get("llm_tokens_total", {}).get("types") == SSE_TOKENS, 10,
                   "/usage did not show the tokens")
        assert usage_of(service.port, "mia")[2]["families"]["llm_tokens_total"] == {"types": SSE_TOKENS}
    finally:
        channel.close()
        if postgres.pid is None:
            postgres.start()
        service.stop()


def test_labels_longer_than_an_index_entry_are_stored(postgres, database, tmp_path):
    """Control characters are written as \\u00XX in the labels' JSON, six bytes for one: three
    labels of 256 such bytes make a JSON text longer than a btree entry may be (2,704 bytes before
    compression), so the series' uniqueness is kept on a digest of the labels, not on the text."""
    service = replica(postgres, database, tmp_path, "long")
    try:
        value = "\\u0001" * 256
        body = '{"user":"%s","groups":"%s","path":"/%s"}' % (value, value, "\\u0002" * 255)
        status, _, reply = request(service.port, "POST", "/track", body.encode(), {"Content-Type": "application/json", **AUTH})
        assert status == 202, reply
        assert postgres.psql("SELECT max(length(s.labels)) > 2704, count(*) FROM series s JOIN metric m ON m.id = s.metric_id "
                             "WHERE m.name = 'llm_requests_total'", database) == [("t", "1")]
        assert requests_total(service.port, "\x01" * 256) == 1
    finally:
        service.stop()


def test_a_replica_without_dedupe_leaves_the_others_request_ids_alone(postgres, database, tmp_path):
    first = replica(postgres, database, tmp_path, "with-ids")
    try:
        assert send(first.port, "olga", "kept-id")[0] == 202
    finally:
        first.stop()
    second = replica(postgres, database, tmp_path, "without-ids", "--no-dedupe")
    try:
        assert send(second.port, "olga")[0] == 202  # its first commit prunes
        assert postgres.psql("SELECT count(*) FROM request_id", database) == [("1",)]
    finally:
        second.stop()
