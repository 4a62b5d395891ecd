"""The Envoy ext_proc listener of the built binary, driven over grpcio with Envoy's own generated
classes (PyPI xds-protos): proof that the protocol subset the service compiles is wire-compatible
with Envoy's, and that its bounds hold on a real HTTP/2 connection. Streams are few, on loopback,
and each has a deadline."""
import json
import re
import signal
import socket
import threading
import time

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

from conftest import Service, request
from test_hardening import startup_failure

Request = ext_proc.ProcessingRequest
Response = ext_proc.ProcessingResponse


class ExtProc:
    """The binary with its ext_proc port on, and a grpcio stub of Envoy's ExternalProcessor."""

    def __init__(self, *arguments):
        self.service = Service("--ext-proc-port", "0", "--log-level", "debug", *arguments)
        self.port = self._port()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ext_proc_grpc.ExternalProcessorStub(self.channel)

    def _port(self):
        """From the line logged before the HTTP one, parsed the same way."""
        for line in self.service.lines:
            match = re.search(r'"msg":"listening ext_proc","address":"[^"]*:(\d+)"', line)
            if match:
                return int(match.group(1))
        self.service.stop()
        pytest.fail("no ext_proc listening line:\n" + "".join(self.service.lines))

    def metric(self, name):
        _, _, body = request(self.service.port, "GET", "/metrics")
        match = re.search(rf"^{re.escape(name)} (\d+)$", body.decode(), re.MULTILINE)
        return int(match.group(1)) if match else None

    def reports(self, count, seconds=10):
        """The first `count` stream reports logged (at debug level, values cut to 64 bytes), waiting for them."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            found = [line for line in list(self.service.lines) if '"msg":"ext_proc stream ended"' in line]
            if len(found) >= count:
                return [json.loads(line) for line in found]
            time.sleep(0.05)
        pytest.fail(f"fewer than {count} reports:\n" + "".join(self.service.lines))

    def close(self):
        self.channel.close()
        self.service.stop()


@pytest.fixture
def listener():
    running = ExtProc("--ext-proc-max-streams", "2")
    yield running
    running.close()


def header_map(pairs):
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=key, raw_value=value.encode()) for key, value in pairs])


IDENTITY = [(":method", "POST"), (":path", "/v1/chat/completions?x=1"), ("x-usage-user", "alice"),
            ("x-usage-groups", "premium"), ("x-request-id", "req-1")]
ANSWER_HEAD = [(":status", "200"), ("content-type", "application/json")]
# Request headers SEND, response headers SEND, response body STREAMED.
STREAMED = [
    Request(request_headers=ext_proc.HttpHeaders(headers=header_map(IDENTITY))),
    Request(response_headers=ext_proc.HttpHeaders(headers=header_map(ANSWER_HEAD))),
    Request(response_body=ext_proc.HttpBody(body=b'{"model":"m","usage":', end_of_stream=False)),
    Request(response_body=ext_proc.HttpBody(body=b'{"prompt_tokens":3,"completion_tokens":5}}', end_of_stream=True)),
]


def held_open(messages, release):
    """Sends `messages`, then keeps the stream open until `release` is set (at most 10 s)."""
    yield from messages
    release.wait(10)


def test_each_phase_is_answered_with_an_empty_continue(listener):
    replies = list(listener.stub.Process(iter(STREAMED), timeout=10))
    assert replies == [
        Response(request_headers=ext_proc.HeadersResponse()),
        Response(response_headers=ext_proc.HeadersResponse()),
        Response(response_body=ext_proc.BodyResponse()),
        Response(response_body=ext_proc.BodyResponse()),
    ]
    # Envoy reads an absent CommonResponse as CONTINUE with nothing changed.
    assert all(not getattr(reply, reply.WhichOneof("response")).HasField("response") for reply in replies)
    [report] = listener.reports(1)
    assert {key: report[key] for key in ("user", "groups", "path", "request_id", "identity_problem", "end")} == {
        "user": "alice", "groups": "premium", "path": "/v1/chat/completions", "request_id": "req-1", "identity_problem": "",
        "end": "complete"}


def test_observability_mode_gets_no_reply(listener):
    observed = []
    for message in STREAMED:
        copy = Request()
        copy.CopyFrom(message)
        copy.observability_mode = True
        observed.append(copy)
    assert list(listener.stub.Process(iter(observed), timeout=10)) == []
    [report] = listener.reports(1)
    assert (report["user"], report["end"]) == ("alice", "complete")


def test_a_stream_over_the_cap_is_refused_with_resource_exhausted(listener):
    release = threading.Event()
    held = [listener.stub.Process(held_open(STREAMED[:1], release), timeout=10) for _ in range(2)]
    try:
        for call in held:
            next(call)  # the request headers' reply: the stream is open on the server
        assert listener.metric("usage_tracking_ext_proc_streams_open") == 2
        with pytest.raises(grpc.RpcError) as refused:
            list(listener.stub.Process(iter(STREAMED), timeout=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == "2 streams are open, the most --ext-proc-max-streams allows"
    finally:
        release.set()
    for call in held:
        assert list(call) == []
    assert listener.metric('usage_tracking_ext_proc_errors_total{reason="over_capacity"}') == 1
    listener.reports(2)
    assert listener.metric("usage_tracking_ext_proc_streams_open") == 0


def test_a_message_over_4_mib_ends_its_stream(listener):
    huge = Request(response_body=ext_proc.HttpBody(body=b"x" * (4 << 20), end_of_stream=True))
    with pytest.raises(grpc.RpcError) as ended:
        list(listener.stub.Process(iter([STREAMED[0], huge]), timeout=10))
    # grpc-swift's transport resets the stream (RST_STREAM) rather than sending a status.
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    [report] = listener.reports(1)
    assert report["end"].startswith('protocolError("a gRPC message over 4194304 bytes or badly')
    assert report["user"] == "alice"
    assert listener.metric('usage_tracking_ext_proc_errors_total{reason="invalid_message"}') == 1
    # A message just under the bound is taken.
    fits = Request(response_body=ext_proc.HttpBody(body=b"x" * ((4 << 20) - 16), end_of_stream=True))
    assert len(fits.SerializeToString()) <= 4 << 20
    assert len(list(listener.stub.Process(iter([STREAMED[0], fits]), timeout=10))) == 2


def test_a_silent_stream_ends_after_the_idle_timeout():
    running = ExtProc("--ext-proc-idle-timeout", "1")
    try:
        release = threading.Event()
        call = running.stub.Process(held_open(STREAMED[:1], release), timeout=10)
        assert next(call) == Response(request_headers=ext_proc.HeadersResponse())
        with pytest.raises(grpc.RpcError) as ended:
            next(call)
        release.set()
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert ended.value.details() == "no message for 1 s (--ext-proc-idle-timeout)"
        [report] = running.reports(1)
        assert report["end"] == "idleTimeout"
        assert running.metric('usage_tracking_ext_proc_errors_total{reason="idle_timeout"}') == 1
    finally:
        running.close()


def test_sigterm_ends_open_streams_after_the_shutdown_timeout_and_exits_0():
    running = ExtProc("--shutdown-timeout", "1")
    try:
        release = threading.Event()
        call = running.stub.Process(held_open(STREAMED[:2], release), timeout=10)
        assert len([next(call), next(call)]) == 2
        started = time.time()
        running.service.process.send_signal(signal.SIGTERM)
        assert running.service.process.wait(timeout=10) == 0
        assert time.time() - started < 8
        with pytest.raises(grpc.RpcError):
            list(call)
        release.set()
        [report] = running.reports(1)
        assert (report["user"], report["end"]) == ("alice", "aborted")
    finally:
        running.close()


@pytest.mark.parametrize("arguments,message", [
    (("--ext-proc-port", "70000"), "--ext-proc-port (USAGE_TRACKING_EXT_PROC_PORT) must be from 0 to 65535, got 70000"),
    (("--ext-proc-max-streams", "0"), "--ext-proc-max-streams (USAGE_TRACKING_EXT_PROC_MAX_STREAMS) must be from 1 to 1000000, got 0"),
    (("--ext-proc-idle-timeout", "0"), "--ext-proc-idle-timeout (USAGE_TRACKING_EXT_PROC_IDLE_TIMEOUT) must be from 1 to 3600, got 0"),
])
def test_a_bad_ext_proc_setting_stops_startup_naming_it(arguments, message):
    status, output = startup_failure(arguments)
    assert status != 0
    assert message in output


def test_a_busy_ext_proc_port_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, output = startup_failure(("--port", "0", "--ext-proc-port", str(port)))
    assert status == 1
    assert f"cannot listen on 127.0.0.1:{port}: " in output
