"""The suite's own model server behind Envoy: it answers like OpenAI (Chat Completions JSON and
SSE, Responses SSE), Anthropic (Messages SSE) and vLLM (usage in every chunk), optionally
gzipped, flushed chunk by chunk; and it can fail (an error status, a reset mid-answer). A test
registers each answer under a name and asks for it with the `x-test-answer` request header, so
the counts it expects are computed from exactly the bytes sent. The bodies are this suite's own."""
import gzip
import http.client
import json
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CREATED = 1767225600


@dataclass
class Answer:
    """What the upstream sends: `chunks` one by one (flushed, `delay` seconds apart) as a chunked
    body when `streamed`, else joined with a Content-Length. `reset_after`: after that many chunks
    the connection is reset (RST) instead of ending the body."""
    chunks: list
    content_type: str = "application/json"
    status: int = 200
    streamed: bool = False
    gzipped: bool = False
    delay: float = 0.0
    reset_after: int | None = None
    headers: dict = field(default_factory=dict)  # more response headers
    sent: int = 0  # chunks written so far
    broken: bool = False  # a write failed: the other side went away mid-answer
    done: threading.Event = field(default_factory=threading.Event)


def sse(*events):
    """SSE chunks from (event name or None, JSON-able data or a raw string)."""
    chunks = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        chunks.append(((f"event: {name}\n" if name else "") + f"data: {text}\n\n").encode())
    return chunks


def streamed(chunks, **options):
    return Answer(chunks, content_type="text/event-stream", streamed=True, **options)


def openai_json(model, prompt, completion, cached=0, reasoning=0, **options):
    body = {
        "id": "chatcmpl-e2e", "object": "chat.completion", "created": CREATED, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "The loopback is quiet today."}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached},
                  "completion_tokens_details": {"reasoning_tokens": reasoning}},
    }
    return Answer([json.dumps(body).encode()], **options)


def openai_chunk(model, text=None, usage=None, include_usage_key=True):
    chunk = {"id": "chatcmpl-e2e", "object": "chat.completion.chunk", "created": CREATED, "model": model,
             "choices": [] if text is None else [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    if include_usage_key:
        chunk["usage"] = usage
    return chunk


def openai_sse(model, words, usage=None, **options):
    """Chat Completions streaming; `usage` (prompt, completion, cached, reasoning) as the
    include_usage chunk before [DONE], or none at all."""
    events = [(None, openai_chunk(model, word)) for word in words]
    if usage is not None:
        prompt, completion, cached, reasoning = usage
        events.append((None, openai_chunk(model, usage={
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}})))
    events.append((None, "[DONE]"))
    return streamed(sse(*events), **options)


def vllm_sse(model, prompt, words, **options):
    """vLLM with continuous usage stats: every chunk carries the cumulative usage so far, the
    last one (choices empty) the final figures."""
    events = [(None, openai_chunk(model, word, usage={"prompt_tokens": prompt, "completion_tokens": n,
                                                      "total_tokens": prompt + n}))
              for n, word in enumerate(words, 1)]
    final = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
    events += [(None, openai_chunk(model, usage=final)), (None, "[DONE]")]
    return streamed(sse(*events), **options)


def anthropic_sse(model, uncached, cache_read, cache_creation, outputs, deltas=(), **options):
    """Messages streaming: usage in message_start, then content, then one message_delta per
    value in `outputs` (cumulative output_tokens, as Anthropic sends them). `deltas` is the
    text streamed in between."""
    events = [("message_start", {"type": "message_start", "message": {
        "id": "msg_e2e", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": uncached, "cache_read_input_tokens": cache_read,
                  "cache_creation_input_tokens": cache_creation, "output_tokens": 1}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": text}}) for text in deltas]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": n}}) for n in outputs]
    events.append(("message_stop", {"type": "message_stop"}))
    return streamed(sse(*events), **options)


def responses_sse(model, prompt, output, cached=0, reasoning=0, **options):
    """Responses API streaming: the usage arrives in `response.completed`."""
    response = {"id": "resp_e2e", "object": "response", "created_at": CREATED, "model": model, "status": "in_progress",
                "output": []}
    done = dict(response, status="completed", usage={
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output})
    return streamed(sse(("response.created", {"type": "response.created", "response": response}),
                        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Quiet "}),
                        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "loopback."}),
                        ("response.completed", {"type": "response.completed", "response": done})), **options)


class Upstream:
    """A threading HTTP/1.1 server on 127.0.0.1 (port from the OS) serving registered answers."""

    def __init__(self):
        self.answers = {}
        self.requests = []  # (answer name, request headers) as they arrived
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, *_):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", "0")))
                name = self.headers.get("x-test-answer", "")
                upstream.requests.append((name, dict(self.headers.items())))
                answer = upstream.answers.get(name)
                if answer is None:
                    answer = Answer([b'{"error":"no answer registered"}'], status=404)
                try:
                    upstream.send(self, answer)
                except (BrokenPipeError, ConnectionResetError):
                    answer.broken = True
                    self.close_connection = True
                finally:
                    answer.done.set()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def answer(self, name, answer):
        self.answers[name] = answer
        return answer

    @staticmethod
    def send(handler, answer):
        handler.send_response(answer.status)
        handler.send_header("Content-Type", answer.content_type)
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if answer.gzipped else None
        if answer.gzipped:
            handler.send_header("Content-Encoding", "gzip")
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        if not answer.streamed:
            body = b"".join(answer.chunks)
            body = gzip.compress(body) if answer.gzipped else body
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            answer.sent = len(answer.chunks)
            return
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.flush()
        for index, chunk in enumerate(answer.chunks):
            if answer.reset_after is not None and index == answer.reset_after:
                # SO_LINGER 0: close() sends RST instead of FIN, a crash-like end of the answer.
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                handler.close_connection = True
                handler.connection.close()
                return
            if compressor is not None:
                chunk = compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            handler.wfile.flush()
            answer.sent = index + 1
            if answer.delay:
                time.sleep(answer.delay)
        if compressor is not None:
            tail = compressor.flush()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes  # decoded (gunzipped) as far as it arrived
    events: list  # (seconds since the request was sent, SSE event data) in arrival order
    complete: bool  # the body ended as HTTP says it ends (not cut off)


def call(port, path, answer, api_key=None, request_id=None, model="m", stream=False, headers=None,
         cancel_after=None, timeout=20):
    """POST through Envoy and read the answer incrementally; with `cancel_after`, the client closes
    the connection once that many SSE events have arrived."""
    head = {"Content-Type": "application/json", "x-test-answer": answer, **(headers or {})}
    if api_key:
        head["Authorization"] = f"Bearer {api_key}"
    if request_id:
        head["x-request-id"] = request_id
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.request("POST", path, body=body, headers=head)
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS) if headers.get("content-encoding") == "gzip" else None
        text, events, complete = b"", [], False
        pending = b""
        while True:
            try:
                piece = response.read1(65536)
            except (http.client.IncompleteRead, ConnectionError):
                break
            if not piece:
                complete = True
                break
            if decoder is not None:
                try:
                    piece = decoder.decompress(piece)
                except zlib.error:  # says gzip but is not: keep the bytes as they came
                    decoder = None
            text += piece
            pending += piece
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
                events.append((time.monotonic() - started, b"".join(data).decode()))
            if cancel_after is not None and len(events) >= cancel_after:
                break
        return Reply(response.status, headers, text, events, complete)
    finally:
        connection.close()
