"""The built binary against hostile or unlucky conditions, over real sockets on 127.0.0.1: clients
that never read, descriptor exhaustion, a connection cap, a stalled log reader, bad settings,
stray signals and a rolling update. Every load here is bounded in count and time."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import ROOT, Replies, Service, callback, free_port, post, request, stop

BINARY = os.environ.get("USAGE_TRACKING_BINARY", os.path.join(ROOT, ".build", "debug", "usage-tracking"))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill_series(port, count):
    """`count` distinct users, pipelined on one connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = Replies(sock)
        batch = 2000
        for start in range(0, count, batch):
            sock.sendall(b"".join(post("/track", callback(f"user-{i:07d}", "free").encode()) for i in range(start, min(count, start + batch))))
            for _ in range(start, min(count, start + batch)):
                assert replies.next()[0] == 202


def test_a_client_that_never_reads_cannot_make_the_server_buffer_its_replies():
    service = Service()
    try:
        fill_series(service.port, 40_000)
        size = len(request(service.port, "GET", "/metrics")[2])
        assert size > 3_000_000
        before = rss_bytes(service.process.pid)
        sock = socket.create_connection(("127.0.0.1", service.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        scrapes = 60
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n" * scrapes)
        time.sleep(3)
        growth = rss_bytes(service.process.pid) - before
        # Unbounded, 60 unread replies of this size would hold about 60 x 3 MB.
        assert growth < 40 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB with {scrapes} unread scrapes of {size / 1e6:.1f} MB"
        # The server still answers everyone else at once.
        assert request(service.port, "GET", "/healthz", timeout=2)[0] == 200
        sock.close()
    finally:
        service.stop()


def test_scrapers_that_do_not_read_hold_at_most_four_replies():
    """A /metrics reply is held from its render until the socket has taken it, four at most: of six
    scrapers that do not read, four get their replies (each about 6 MB, more than a socket's send
    buffer takes) and two a 503 that says why; so does anyone else until one of the four goes."""
    service = Service()
    stalled = []
    try:
        fill_series(service.port, 80_000)
        assert len(request(service.port, "GET", "/metrics")[2]) > 5_000_000
        for _ in range(6):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", service.port))
            sock.settimeout(20)  # the renders run one after another on the render thread
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            stalled.append(sock)
        firsts = sorted(sock.recv(12) for sock in stalled)
        assert firsts == [b"HTTP/1.1 200"] * 4 + [b"HTTP/1.1 503"] * 2
        status, headers, body = request(service.port, "GET", "/metrics")
        assert status == 503
        assert headers["retry-after"] == "1"
        assert json.loads(body) == {"error": "too many /metrics replies are in progress",
                                    "problems": ["at most 4 are held, from the request until its scraper has read the reply; retry once one has"]}
        assert request(service.port, "GET", "/healthz", timeout=2)[0] == 200
        for sock in stalled:
            sock.close()
        stalled = []
        deadline = time.monotonic() + 10
        while (status := request(service.port, "GET", "/metrics")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
    finally:
        for sock in stalled:
            sock.close()
        service.stop()


def test_page_requests_cannot_queue_without_bound_ahead_of_a_scrape():
    """Status page and /debug requests share the render thread with scrapes: of 200 sent at once
    on connections of their own, at most 4 wait for it at a time and the others get a 503 that
    says why, so a scrape sent behind them waits for a few renders, not two hundred."""
    service = Service()
    sockets = []
    try:
        fill_series(service.port, 100_000)  # each ?user= render scans every series
        for index in range(200):
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=30)
            sockets.append(sock)
        for index, sock in enumerate(sockets):
            sock.sendall(f"GET /{'debug' if index % 2 else ''}?user=nobody HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        status, _, body = request(service.port, "GET", "/metrics", timeout=30)
        assert status == 200 and b"llm_requests_total" in body
        replies = [Replies(sock).next() for sock in sockets]
        refused = [reply for reply in replies if reply[0] == 503]
        assert len(refused) + len([reply for reply in replies if reply[0] == 200]) == 200
        assert len(refused) >= 100, f"{len(refused)} of 200 refused"
        for _, headers, body in refused:
            assert headers["retry-after"] == "1"
            assert json.loads(body) == {
                "error": "too many status page and /debug requests are in progress",
                "problems": ["at most 4 are rendered or wait to be at once, so that scrapes do not wait behind them; retry once one is answered"]}
        assert request(service.port, "GET", "/?user=nobody")[0] == 200
    finally:
        for sock in sockets:
            sock.close()
        service.stop()


def test_descriptor_exhaustion_neither_spins_nor_stops_the_service():
    service = Service(wrapper=("prlimit", "--nofile=48:48"))
    try:
        sockets = []
        for _ in range(80):  # past the descriptor limit; the rest wait in the backlog
            sockets.append(socket.create_connection(("127.0.0.1", service.port), timeout=5))
        time.sleep(0.5)
        start = cpu_seconds(service.process.pid)
        time.sleep(2)
        spent = cpu_seconds(service.process.pid) - start
        assert spent < 0.5, f"{spent:.2f} s of CPU in 2 s at the descriptor limit: the accept loop spins"
        assert any("cannot accept connections" in line for line in service.lines)
        for sock in sockets:
            sock.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if request(service.port, "GET", "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("no reply once descriptors were free again")
    finally:
        service.stop()


def test_connections_beyond_the_cap_wait_until_one_closes():
    service = Service("--max-connections", "3")
    try:
        held = [socket.create_connection(("127.0.0.1", service.port), timeout=5) for _ in range(3)]
        for sock in held:  # each accepted and served
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert Replies(sock).next()[0] == 200
        waiting = socket.create_connection(("127.0.0.1", service.port), timeout=5)
        waiting.settimeout(1)
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        with pytest.raises(socket.timeout):
            waiting.recv(1)
        held.pop().close()
        waiting.settimeout(5)
        assert Replies(waiting).next()[0] == 200
        for sock in [*held, waiting]:
            sock.close()
    finally:
        service.stop()


def test_a_stalled_log_reader_never_blocks_callbacks():
    port = free_port()
    # Standard output is a pipe nobody reads: it fills after 64 KiB.
    process = subprocess.Popen([BINARY, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if request(port, "GET", "/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        long_id = "r" * 2000
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            replies = Replies(sock)
            for start in range(0, 10_000, 500):
                sock.sendall(post("/track", b'{"groups":1}', [f"x-request-id: {long_id}"]) * 500)
                for _ in range(500):
                    assert replies.next()[0] == 422
        started = time.time()
        assert request(port, "GET", "/healthz", timeout=2)[0] == 200
        assert time.time() - started < 1
        metrics = request(port, "GET", "/metrics", timeout=5)[2].decode()
        dropped = next(int(line.split()[1]) for line in metrics.splitlines() if line.startswith("usage_tracking_log_dropped_total "))
        assert dropped > 0
    finally:
        process.kill()
        process.wait()


def startup_failure(arguments=(), env=None):
    result = subprocess.run([BINARY, "--host", "127.0.0.1", *arguments], capture_output=True, text=True, timeout=20,
                            env={"PATH": "/usr/bin:/bin", **(env or {})})
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("arguments,env,message", [
    ((), {"PORT": "70000"}, "--port (PORT) must be from 0 to 65535, got 70000"),
    (("--port", "-1"), {}, "--port (PORT) must be from 0 to 65535, got -1"),
    (("--idle-timeout", "0"), {}, "--idle-timeout (USAGE_TRACKING_IDLE_TIMEOUT) must be from 1 to 3600, got 0"),
    (("--idle-timeout", "-1"), {}, "--idle-timeout (USAGE_TRACKING_IDLE_TIMEOUT) must be from 1 to 3600, got -1"),
    ((), {"USAGE_TRACKING_DRAIN_DELAY": "-5"}, "--drain-delay (USAGE_TRACKING_DRAIN_DELAY) must be from 0 to 600, got -5"),
    (("--shutdown-timeout", "-1"), {}, "--shutdown-timeout (USAGE_TRACKING_SHUTDOWN_TIMEOUT) must be from 0 to 600, got -1"),
    (("--event-loop-threads", "0"), {}, "--event-loop-threads (USAGE_TRACKING_EVENT_LOOP_THREADS) must be from 1 to 256, got 0"),
    (("--max-connections", "0"), {}, "--max-connections (USAGE_TRACKING_MAX_CONNECTIONS) must be from 1 to 1000000, got 0"),
    (("--request-timeout", "0"), {}, "--request-timeout (USAGE_TRACKING_REQUEST_TIMEOUT) must be from 1 to 600, got 0"),
    (("--max-body-bytes", "0"), {}, "--max-body-bytes (USAGE_TRACKING_MAX_BODY_BYTES) must be from 16 to 16777216, got 0"),
    (("--max-label-bytes", "0"), {}, "--max-label-bytes (USAGE_TRACKING_MAX_LABEL_BYTES) must be from 1 to 65536, got 0"),
    (("--max-header-bytes", "100"), {}, "--max-header-bytes (USAGE_TRACKING_MAX_HEADER_BYTES) must be from 1024 to 1048576, got 100"),
    (("--callback-secret-header", ""), {}, "--callback-secret-header (USAGE_TRACKING_CALLBACK_SECRET_HEADER) must be a header name, got ''"),
    (("--callback-secret-header", "x y"), {}, "--callback-secret-header (USAGE_TRACKING_CALLBACK_SECRET_HEADER) must be a header name, got 'x y'"),
    ((), {"USAGE_TRACKING_CALLBACK_SECRET": "  \t "}, "USAGE_TRACKING_CALLBACK_SECRET is set but holds no secret"),
    ((), {"USAGE_TRACKING_CALLBACK_SECRET": ""}, "USAGE_TRACKING_CALLBACK_SECRET is set but holds no secret"),
])
def test_a_bad_setting_stops_startup_naming_it(arguments, env, message):
    status, output = startup_failure(arguments, env)
    assert status != 0
    assert message in output


def test_a_secret_file_without_a_secret_stops_startup():
    with tempfile.NamedTemporaryFile("w", suffix=".secret") as f:
        f.write("\n   \n")
        f.flush()
        status, output = startup_failure(("--port", "0", "--callback-secret-file", f.name))
    assert status == 1
    assert f"callback secret file {f.name} holds no secret" in output


def test_a_busy_port_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, output = startup_failure(("--port", str(port)))
    assert status == 1
    assert f"cannot listen on 127.0.0.1:{port}: " in output
    assert "Address already in use" in output


@contextlib.contextmanager
def service_with_secret_file(secret):
    """The binary reading its secrets from a file that holds `secret`; yields it and the path."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "secret")
        with open(path, "w") as f:
            f.write(secret + "\n")
        service = Service("--callback-secret-file", path)
        try:
            yield service, path
        finally:
            service.stop()


def test_an_emptied_secret_file_keeps_refusing_and_warns():
    with service_with_secret_file("first") as (service, path):
        with open(path, "w") as f:
            f.write("")
        deadline = time.time() + 10
        while time.time() < deadline and not any('"level":"warning"' in line and "holds no secret" in line for line in service.lines):
            time.sleep(0.1)
        assert any('"level":"warning"' in line and "holds no secret" in line for line in service.lines)
        for headers in ({}, {"Authorization": "Bearer first"}, {"Authorization": "Bearer "}):
            status, _, _ = request(service.port, "POST", "/track", body=b'{"user":"a"}', headers=headers)
            assert status == 401


def test_stray_signals_do_not_stop_the_service_and_sighup_rereads_secrets():
    with service_with_secret_file("one") as (service, _):
        for number in (signal.SIGUSR1, signal.SIGUSR2):
            service.process.send_signal(number)
        service.process.send_signal(signal.SIGHUP)
        deadline = time.time() + 5
        while time.time() < deadline and not any("callback secrets reloaded" in line for line in service.lines):
            time.sleep(0.05)
        assert service.process.poll() is None
        assert sum('"msg":"signal ignored"' in line for line in service.lines) == 2
        assert any('"signal":"SIGHUP"' in line for line in service.lines)
        assert any("callback secrets reloaded" in line for line in service.lines), "SIGHUP re-reads the file even unchanged"
        assert request(service.port, "POST", "/track", body=b'{"user":"a"}', headers={"Authorization": "Bearer one"})[0] == 202


def test_a_second_sigterm_ends_the_drain():
    service = Service("--drain-delay", "60")
    try:
        service.process.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        while time.time() < deadline and not any("draining" in line for line in service.lines):
            time.sleep(0.05)
        assert request(service.port, "GET", "/readyz")[0] == 503
        started = time.time()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=10) == 0
        assert time.time() - started < 5
        assert any("drain ended early" in line for line in service.lines)
    finally:
        stop(service.process)


def test_a_rolling_update_loses_no_callback():
    """Keep-alive callers behind a Service: they stop opening connections once /readyz turns 503
    (the endpoint is removed), keep using the ones they have, and reconnect when told to close."""
    service = Service("--drain-delay", "2")
    removed = threading.Event()
    finished = threading.Event()
    outcomes = []
    lock = threading.Lock()

    def endpoints():
        while not finished.is_set():
            try:
                if request(service.port, "GET", "/readyz", timeout=1)[0] == 503:
                    removed.set()
                    return
            except OSError:
                removed.set()
                return
            time.sleep(0.1)

    def caller(index):
        sent = answered = closes = 0
        lost = []
        sock = replies = None
        deadline = time.time() + 20
        while time.time() < deadline:
            if sock is None:
                if removed.is_set():
                    break
                sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
                replies = Replies(sock)
            sock.sendall(post("/track", callback(f"caller-{index}", "free").encode()))
            sent += 1
            try:
                status, headers, _ = replies.next()
                assert status == 202
                answered += 1
            except OSError as error:
                lost.append(repr(error))
                sock.close()
                sock = None
                continue
            if headers.get("connection") == "close":
                closes += 1
                sock.close()
                sock = None
            time.sleep(0.01)
        if sock is not None:
            sock.close()
        with lock:
            outcomes.append((sent, answered, closes, lost))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)] + [threading.Thread(target=endpoints)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1)
        service.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        finished.set()
        assert service.process.wait(timeout=20) == 0
    finally:
        finished.set()
        stop(service.process)
    assert len(outcomes) == 8
    for sent, answered, closes, lost in outcomes:
        assert lost == [] and sent == answered, f"{sent} sent, {answered} answered: {lost}"
        assert closes >= 1, "every keep-alive caller was told to close during the drain"


def test_a_refusal_from_the_head_is_answered_before_the_body_and_the_connection_ends():
    with tempfile.NamedTemporaryFile("w", suffix=".secret") as f:
        f.write("s\n")
        f.flush()
        service = Service("--callback-secret-file", f.name)
        try:
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
            sock.sendall(b"POST /track HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2000000000\r\n\r\n")
            status, headers, body = Replies(sock).next()
            assert (status, headers.get("connection")) == (401, "close")
            assert body == b'{"error":"unauthorized","problems":["missing credentials in Authorization"]}\n'
            # A client that goes on sending regardless is cut off after a little lingering.
            started = time.time()
            with pytest.raises(OSError):
                while time.time() - started < 10:
                    sock.sendall(b"x" * 65536)
                    if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                        raise ConnectionError("end of stream")
            assert time.time() - started < 5
            sock.close()
        finally:
            service.stop()
