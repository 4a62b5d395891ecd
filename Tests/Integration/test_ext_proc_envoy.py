"""Token accounting end to end on loopback, with real parts only: a client → a real Envoy whose
ext_proc filter streams each exchange to the usage-tracking binary's gRPC port → the suite's own
model server answering like OpenAI, Anthropic and vLLM. A filter in Envoy sets the identity
headers an AuthPolicy would; the counts are read back through a real Prometheus and must equal
what the upstream's answers said. Both ways the filter can run: observability mode (Envoy does
not wait, the service answers nothing) and blocking (the service CONTINUEs every message)."""
import collections
import http.client
import statistics
import time
from dataclasses import dataclass

import pytest

import llm_upstream as llm
from conftest import Prometheus, Service, free_port
from envoy_proxy import Envoy, binary as envoy_binary

MODES = {"observability": True, "blocking": False}

# API key → (user, groups) that Envoy's identity filter puts into x-usage-user / x-usage-groups.
IDENTITIES = {
    "key-alice": ("alice", "team-a"),
    "key-bob": ("bob", "ml,research"),
    "key-carol": ("carol", "team-a"),
    "key-dave": ("dave", "ops"),
    "key-erin": ("erin", "team-b"),
    "key-frank": ("frank", "ml"),
    "key-grace": ("grace", "ops"),
}
TYPES = ("input", "output", "cached_input", "cache_write", "reasoning")
EXT_PROC_ERRORS = ("streams_failed", "failure_mode_allowed", "message_timeouts", "spurious_msgs_received")


def openai_tokens(prompt, completion, cached=0, reasoning=0):
    """OpenAI's cached tokens are part of prompt_tokens, reasoning part of completion_tokens."""
    return {"input": prompt, "output": completion, "cached_input": cached, "reasoning": reasoning}


def anthropic_tokens(uncached, cache_read, cache_creation, output):
    """Anthropic's input_tokens leaves the cache out: input is the sum of all three."""
    return {"input": uncached + cache_read + cache_creation, "cached_input": cache_read,
            "cache_write": cache_creation, "output": output}


@dataclass
class Case:
    """One request through Envoy: who sends it (API key, None: no identity), where, the answer the
    upstream gives, the tokens it must count and the outcome it must record."""
    name: str
    key: str | None
    path: str
    model: str
    answer: llm.Answer
    outcome: str
    tokens: dict | None = None
    stream: bool = False
    request_id: str | None = None
    cancel_after: int | None = None


def cases(mode):
    """Every kind of answer, each user and model its own so every series can be checked apart."""
    chat, messages, responses = "/v1/chat/completions", "/v1/messages", "/v1/responses"
    words = ["Loop", "back ", "is ", "quiet."]
    long_text = [f"word{i} " for i in range(200)]
    return [
        Case("openai json", "key-alice", chat, "gpt-4.1-mini",
             llm.openai_json("gpt-4.1-mini", 1200, 85, cached=1024, reasoning=40), "counted",
             openai_tokens(1200, 85, 1024, 40)),
        Case("openai json gzip", "key-bob", chat, "gpt-4.1",
             llm.openai_json("gpt-4.1", 310, 42, gzipped=True), "counted", openai_tokens(310, 42)),
        Case("openai sse with usage", "key-alice", chat, "gpt-4o",
             llm.openai_sse("gpt-4o", words, usage=(75, 12, 64, 0), delay=0.01), "counted",
             openai_tokens(75, 12, 64), stream=True),
        Case("openai sse with usage gzip", "key-carol", chat, "gpt-4o",
             llm.openai_sse("gpt-4o", words, usage=(90, 20, 0, 8), delay=0.01, gzipped=True), "counted",
             openai_tokens(90, 20, 0, 8), stream=True),
        Case("openai sse without usage", "key-bob", chat, "gpt-4o-mini",
             llm.openai_sse("gpt-4o-mini", words), "no_usage", stream=True),
        Case("openai sse without usage gzip", "key-carol", chat, "gpt-4o-mini",
             llm.openai_sse("gpt-4o-mini", words, gzipped=True), "no_usage", stream=True),
        Case("anthropic sse", "key-dave", messages, "claude-sonnet-4-5",
             llm.anthropic_sse("claude-sonnet-4-5", 25, 2000, 300, [30, 57], deltas=words, delay=0.01), "counted",
             anthropic_tokens(25, 2000, 300, 57), stream=True),
        Case("anthropic sse gzip", "key-alice", messages, "claude-haiku-4-5",
             llm.anthropic_sse("claude-haiku-4-5", 12, 0, 150, [9], deltas=words, gzipped=True), "counted",
             anthropic_tokens(12, 0, 150, 9), stream=True),
        Case("responses sse", "key-bob", responses, "o4-mini",
             llm.responses_sse("o4-mini", 500, 220, cached=128, reasoning=192), "counted",
             openai_tokens(500, 220, 128, 192), stream=True),
        Case("responses sse gzip", "key-dave", responses, "gpt-5",
             llm.responses_sse("gpt-5", 60, 7, gzipped=True), "counted", openai_tokens(60, 7), stream=True),
        Case("vllm sse", "key-carol", chat, "meta-llama/Llama-3.1-8B-Instruct",
             llm.vllm_sse("meta-llama/Llama-3.1-8B-Instruct", 33, words), "counted",
             openai_tokens(33, len(words)), stream=True),
        Case("vllm sse gzip", "key-dave", chat, "Qwen/Qwen2.5-7B-Instruct",
             llm.vllm_sse("Qwen/Qwen2.5-7B-Instruct", 48, words[:3], gzipped=True), "counted",
             openai_tokens(48, 3), stream=True),
        Case("rate limited", "key-alice", chat, "gpt-4.1-mini",
             llm.Answer([b'{"error":{"type":"rate_limit","message":"try again later"}}'], status=429),
             "not_model_answer"),
        Case("server error gzip", "key-bob", messages, "claude-sonnet-4-5",
             llm.Answer([b'{"type":"error","error":{"type":"overloaded_error"}}'], status=529, gzipped=True),
             "not_model_answer"),
        Case("cut json", "key-bob", chat, "gpt-4.1",
             llm.Answer([b'{"id":"chatcmpl-cut","model":"gpt-4.1","usage":{"prompt_tok']), "unreadable"),
        Case("gzip that is not", "key-erin", chat, "gpt-4.1",
             llm.Answer([b'{"usage":{"prompt_tokens":1}}'], headers={"Content-Encoding": "gzip"}), "unreadable"),
        Case("no identity", None, chat, "gpt-4.1-mini", llm.openai_json("gpt-4.1-mini", 999, 99), "no_identity"),
        Case("first of a repeated id", "key-erin", chat, "gpt-4.1-nano",
             llm.openai_json("gpt-4.1-nano", 20, 5), "counted", openai_tokens(20, 5), request_id=f"e2e-{mode}-once"),
        Case("repeat of that id", "key-erin", chat, "gpt-4.1-nano",
             llm.openai_json("gpt-4.1-nano", 20, 5), "duplicate", request_id=f"e2e-{mode}-once"),
        # Usage arrives in message_start; the client leaves after 10 of ~205 events (2 s of answer).
        Case("client cancels", "key-frank", messages, "claude-opus-4-1",
             llm.anthropic_sse("claude-opus-4-1", 40, 0, 0, [200], deltas=long_text, delay=0.01), "aborted",
             anthropic_tokens(40, 0, 0, 1), stream=True, cancel_after=10),
        Case("upstream resets", "key-grace", messages, "claude-3-5-haiku",
             llm.anthropic_sse("claude-3-5-haiku", 18, 512, 0, [20], deltas=long_text[:20], delay=0.01, reset_after=6),
             "aborted", anthropic_tokens(18, 512, 0, 1), stream=True),
    ]


class Stack:
    """Upstream, service (gRPC on a port of its own) scraped by Prometheus, and Envoy between
    them; without `service`, Envoy's ext_proc cluster points at a port nobody listens on."""

    def __init__(self, observability, service=True):
        envoy_binary()  # skips here, before anything starts, when Envoy is not installed
        self.upstream = llm.Upstream()
        self.service = self.prometheus = self.envoy = None
        try:
            if service:
                self.service = Service("--ext-proc-port", "0")
                self.prometheus = Prometheus(self.service.port)
            ext_proc_port = self.service.ext_proc_port if service else free_port()
            self.envoy = Envoy(self.upstream.port, ext_proc_port, IDENTITIES, observability)
        except BaseException:
            self.stop()
            raise

    def send(self, case):
        self.upstream.answer(case.name, case.answer)
        # With a key, the client also claims an identity of its own, which Envoy must overwrite.
        claim = {"x-usage-user": "mallory", "x-usage-groups": "admins"} if case.key else {}
        return llm.call(self.envoy.port, case.path, case.name, api_key=case.key, request_id=case.request_id,
                        model=case.model, stream=case.stream, cancel_after=case.cancel_after, headers=claim)

    def logs(self):
        """What to read when a test fails: Envoy's log and the service's."""
        service = "".join(self.service.lines[-60:]) if self.service else "(no service)"
        envoy = f"({self.envoy.log_path}, kept)\n{self.envoy.log()[-6000:]}" if self.envoy else ""
        return f"\n--- envoy log (tail) {envoy}\n--- service log ---\n{service}"

    def stop(self):
        for part in (self.envoy, self.prometheus, self.service, self.upstream):
            if part is not None:
                part.stop()


def run(observability, service=True):
    stack = Stack(observability, service)
    try:
        return stack, [(case, stack.send(case)) for case in cases("observability" if observability else "blocking")]
    except BaseException:
        stack.stop()
        raise


@pytest.fixture(scope="module", params=list(MODES))
def traffic(request):
    """Every case sent once through Envoy in one mode, against a fresh service."""
    stack, sent = run(MODES[request.param])
    try:
        yield stack, sent
    finally:
        stack.stop()


def check_passthrough(stack, sent):
    """The client got what the upstream sent, byte for byte (after gzip), SSE event by event as it
    was flushed; a client leaving made Envoy drop the upstream, an upstream reset cut the client off."""
    for case, reply in sent:
        answer, whole = case.answer, b"".join(case.answer.chunks)
        assert answer.done.wait(10), f"{case.name}: the upstream never finished{stack.logs()}"
        if case.cancel_after is not None:
            assert len(reply.events) == case.cancel_after and not reply.complete, case.name
            assert answer.broken and answer.sent < len(answer.chunks), f"{case.name}: upstream not dropped"
            # Flushed one by one, 10 ms apart: the events arrived spread out, not in one piece.
            assert reply.events[-1][0] - reply.events[0][0] >= 0.5 * 0.01 * (case.cancel_after - 1), reply.events
        elif answer.reset_after is not None:
            assert reply.status == 200 and not reply.complete, case.name
            assert len(reply.events) == answer.reset_after and whole.startswith(reply.body), case.name
        else:
            assert (reply.status, reply.complete, reply.body) == (answer.status, True, whole), case.name
            assert reply.headers.get("content-encoding") == answer.headers.get(
                "Content-Encoding", "gzip" if answer.gzipped else None), case.name
            if case.stream:
                assert len(reply.events) == whole.count(b"\n\n"), case.name


def read(prometheus, query, labels, expected):
    """The query's non-zero series as {label values: int}, once they equal `expected` or after 15 s
    (an aborted stream in observability mode ends ~5 s late: Envoy's deferred close)."""
    def as_dict(result):
        values = {tuple(s["metric"].get(label, "") for label in labels): float(s["value"][1]) for s in result}
        return {key: int(value) if value.is_integer() else value for key, value in values.items() if value}
    result = prometheus.wait_for(query, lambda r: as_dict(r) == expected, seconds=15)
    return as_dict(result or [])


def test_envoy_passes_every_answer_through_unchanged(traffic):
    check_passthrough(*traffic)


def test_tokens_read_through_prometheus_equal_what_the_answers_said(traffic):
    stack, sent = traffic
    expected = collections.Counter()
    for case, _ in sent:
        user, groups = IDENTITIES[case.key] if case.key else ("", "")
        for kind, count in (case.tokens or {}).items():
            if count:
                expected[(user, groups, case.path, case.model, kind)] += count
    labels = ("user", "groups", "path", "model", "type")
    actual = read(stack.prometheus, "llm_tokens_total", labels, dict(expected))
    assert actual == dict(expected), stack.logs()
    assert {key[4] for key in actual} == set(TYPES)  # every type shows up somewhere


def test_every_stream_gets_its_outcome(traffic):
    stack, sent = traffic
    expected = dict(collections.Counter(case.outcome for case, _ in sent))
    actual = read(stack.prometheus, "sum by (outcome) (usage_tracking_token_streams_total)", ("outcome",),
                  {(outcome,): n for outcome, n in expected.items()})
    assert actual == {(outcome,): n for outcome, n in expected.items()}, stack.logs()
    assert set(expected) == {"counted", "no_usage", "no_identity", "unreadable", "aborted", "duplicate",
                             "not_model_answer"}


def test_envoy_counts_no_ext_proc_errors(traffic):
    stack, sent = traffic
    stats = stack.envoy.stats()
    prefix = "http.llm.ext_proc."
    assert stats[prefix + "streams_started"] == len(sent), stats
    assert {name: stats[prefix + name] for name in EXT_PROC_ERRORS} == dict.fromkeys(EXT_PROC_ERRORS, 0), stack.logs()
    if stack.envoy.observability:
        assert stats[prefix + "stream_msgs_received"] == 0, "the service must not answer in observability mode"
    else:
        assert stats[prefix + "stream_msgs_received"] > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_traffic_flows_unchanged_when_the_service_is_down(mode):
    """failure_mode_allow: with nothing on the ext_proc port, every answer still gets through."""
    stack, sent = run(MODES[mode], service=False)
    try:
        check_passthrough(stack, sent)
        stats = stack.envoy.stats()
        # Every exchange tried the side stream, failed it, and was let through: what the
        # no-errors check on a healthy stack would see if the service misbehaved.
        failed = {name: stats["http.llm.ext_proc." + name] for name in ("streams_started", "streams_failed", "failure_mode_allowed")}
        assert failed == dict.fromkeys(failed, len(sent)), stats
    finally:
        stack.stop()


def timings(port, count):
    """Milliseconds for `count` small JSON exchanges on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    head = {"Content-Type": "application/json", "Authorization": "Bearer key-alice", "x-test-answer": "latency"}
    try:
        spent = []
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4.1-mini"}', headers=head)
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            spent.append((time.perf_counter() - started) * 1000)
        return sorted(spent)
    finally:
        connection.close()


def test_blocking_ext_proc_latency_is_printed():
    """Benchmark-style figure, not a timing assertion beyond a generous bound: the same exchange
    through a listener without ext_proc and through one whose ext_proc waits for the service."""
    stack = Stack(observability=False)
    try:
        stack.upstream.answer("latency", llm.openai_json("gpt-4.1-mini", 10, 2))
        timings(stack.envoy.plain_port, 20), timings(stack.envoy.port, 20)  # warm connections up
        plain, tracked = timings(stack.envoy.plain_port, 200), timings(stack.envoy.port, 200)
        p99 = lambda spent: spent[int(len(spent) * 0.99) - 1]
        added = statistics.median(tracked) - statistics.median(plain)
        print(f"\nblocking ext_proc, 200 requests: without {statistics.median(plain):.3f} ms median, "
              f"{p99(plain):.3f} ms p99; with {statistics.median(tracked):.3f} ms median, {p99(tracked):.3f} ms p99; "
              f"added {added:.3f} ms median, {p99(tracked) - p99(plain):.3f} ms p99")
        assert added < 50, stack.logs()
        # Only the ext_proc listener is tracked: 220 exchanges counted, none of the plain ones.
        counted = read(stack.prometheus, 'sum(usage_tracking_token_streams_total{outcome="counted"})', (), {(): 220})
        assert counted == {(): 220}, stack.logs()
    finally:
        stack.stop()
