"""Shared harness for the integration suite: the built usage-tracking binary and a real
Prometheus (Debian's package) on loopback, each started on a port of its own and stopped by PID."""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "Deploy")
EXAMPLE = os.path.join(DEPLOY, "examples", "kuadrant")
DASHBOARDS = os.path.join(ROOT, "Dashboards")
README = os.path.join(ROOT, "README.md")
CRDS = os.path.join(os.path.dirname(ROOT), "shared", "crds")


def need(program):
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed; Tests/run-suite installs it")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None, timeout=15):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def post(path, body, headers=()):
    """A raw HTTP/1.1 POST of `body` (bytes) with extra header lines, for keep-alive and pipelined sockets."""
    head = [f"POST {path} HTTP/1.1", "Host: t", "Content-Type: application/json", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Replies:
    """Reads whole replies, one after another, from a keep-alive (possibly pipelined) socket."""

    def __init__(self, sock):
        self.stream = sock.makefile("rb")

    def next(self):
        """(status, headers, body); raises ConnectionError on the end of the stream."""
        status_line = self.stream.readline()
        if not status_line:
            raise ConnectionError("closed before a reply")
        headers = {}
        while (line := self.stream.readline().decode()) not in ("\r\n", ""):
            name, value = line.split(":", 1)
            headers[name.lower()] = value.strip()
        body = self.stream.read(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body


def stop(process):
    """SIGTERM, then SIGKILL if it has not exited within 15 s; only ever a process started here."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def listening(line):
    """(protocol, port) if `line` is the log line of a listener coming up, else None:
    `{"msg":"listening","address":"HOST:PORT",...}` for HTTP, `"msg":"listening ext_proc"` for
    the gRPC listener of --ext-proc-port."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("msg") not in ("listening", "listening ext_proc"):
        return None
    return "http" if entry["msg"] == "listening" else "grpc", int(entry["address"].rsplit(":", 1)[1])


class Service:
    """The built binary on 127.0.0.1 with ports the OS chose, read back from its log: `port` for
    HTTP and, when started with --ext-proc-port, `ext_proc_port` for gRPC."""

    def __init__(self, *arguments, binary=None, wrapper=(), env=None):
        """`wrapper` is a command the binary is run under (a sandbox); `env`, when given, is its
        whole environment."""
        binary = binary or os.environ.get("USAGE_TRACKING_BINARY", os.path.join(ROOT, ".build", "debug", "usage-tracking"))
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} not built; run `swift build` (Tests/run-suite does)")
        self.binary = binary
        self.process = subprocess.Popen([*wrapper, binary, "--host", "127.0.0.1", "--port", "0", *arguments],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        expected = {"http", "grpc"} if any(a.startswith("--ext-proc-port") for a in arguments) else {"http"}
        ports = {}
        deadline = time.time() + 20
        while time.time() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if found := listening(line):
                ports[found[0]] = found[1]
            if expected <= ports.keys():
                self.port, self.ext_proc_port = ports["http"], ports.get("grpc")
                threading.Thread(target=self._drain, daemon=True).start()
                return
        stop(self.process)
        pytest.fail("usage-tracking did not start:\n" + "".join(self.lines))

    def _drain(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def track(self, body, content_type="application/json"):
        status, _, _ = request(self.port, "POST", "/track", body=body.encode(), headers={"Content-Type": content_type})
        return status

    def stop(self):
        stop(self.process)


class Prometheus:
    """A real Prometheus scraping one target every second, evaluating `rule_groups` every second."""

    def __init__(self, target_port, rule_groups=None):
        self.directory = tempfile.mkdtemp(prefix="prometheus-")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "usage-tracking", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        if rule_groups:
            with open(os.path.join(self.directory, "rules.yaml"), "w") as f:
                yaml.safe_dump({"groups": rule_groups}, f)
            config["rule_files"] = [os.path.join(self.directory, "rules.yaml")]
        with open(os.path.join(self.directory, "prometheus.yml"), "w") as f:
            yaml.safe_dump(config, f)
        self.port = free_port()
        self.process = subprocess.Popen(
            [need("prometheus"), f"--config.file={self.directory}/prometheus.yml",
             f"--storage.tsdb.path={self.directory}/data", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if request(self.port, "GET", "/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                pytest.fail("prometheus exited: " + self.process.stderr.read())
            time.sleep(0.2)
        stop(self.process)
        pytest.fail("prometheus did not become ready")

    def query(self, promql):
        """Instant query; returns (status, result list or error text)."""
        status, _, body = request(self.port, "GET", "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        document = json.loads(body)
        if document.get("status") != "success":
            return "error", document.get("error", body.decode())
        return "success", document["data"]["result"]

    def wait_for(self, promql, done, seconds=30):
        deadline = time.time() + seconds
        result = None
        while time.time() < deadline:
            status, result = self.query(promql)
            if status == "success" and done(result):
                return result
            time.sleep(0.5)
        return result

    def stop(self):
        stop(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


def callback(user, groups, path="/v1/completions"):
    return json.dumps({"groups": groups, "host": "localhost:8000", "method": "POST", "path": path, "user": user},
                      sort_keys=True, separators=(",", ":"))


@pytest.fixture
def service():
    running = Service()
    yield running
    running.stop()


def kustomize_objects(directory=DEPLOY):
    """The objects `kubectl kustomize` builds from a directory (Deploy/ unless told)."""
    result = subprocess.run([need("kubectl"), "kustomize", directory], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects, kind):
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"{len(matches)} objects of kind {kind}"
    return matches[0]


def prometheus_rule_groups():
    return one(kustomize_objects(), "PrometheusRule")["spec"]["groups"]


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL on loopback for the whole session (postgres_server.py); a missing
    package fails the test rather than skipping it."""
    from postgres_server import PostgresServer  # here: postgres_server itself imports this module
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()
