import Logging
import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// One per connection, after NIO's request decoder. Routes each request, answers it on the
/// event loop, and writes the serialised reply straight to the socket.
///
/// Requests are answered in the order they arrive. A request is received (head checks, body
/// limit) as soon as its parts arrive, and answered at once unless a reply is still being produced
/// off the loop (`/metrics` rendering, a callback's ledger commit) or the socket is not taking
/// writes; then it waits in `waiting`.
///
/// Backpressure: while anything waits, while a reply renders (a ledger commit excepted, see
/// `mayRead`), or while the channel is not writable, the handler holds back `read`, so the
/// socket is not read again until the replies drain. What one connection can make the server
/// hold is therefore one socket read cycle of requests (each body within `--max-body-bytes`),
/// the outbound buffer up to its high water mark, and one reply.
///
/// Replies are flushed once per socket read, so a pipelined batch goes out in one write.
final class HTTPConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private struct Request {
        var head: HTTPRequestHead
        var route: Route
        var startNanoseconds: UInt64
        var body: ByteBuffer?
        /// A refusal decided before the request is answered (from the head, or an oversize body).
        var rejection: CallbackRejection?
        /// Answer, then close: nothing after this request on the stream is read.
        var closeAfter = false
        /// A reply decided before the request could be routed (timeout, unparsable request).
        var reply: HTTPResponse?
    }

    private let state: ServerState
    /// The request being received.
    private var receiving: Request?
    /// Requests received in full and not yet answered, in order.
    private var waiting = CircularBuffer<Request>(initialCapacity: 4)
    /// True while a reply is being produced off the loop (a render, a ledger commit).
    private var rendering = false
    /// The reply being produced is a ledger commit's: reading goes on meanwhile (see `mayRead`).
    private var committing = false
    /// Mirrors the channel's writability (kept here so the hot path reads a stored Bool).
    private var writable = true
    /// A `read` asked for while reading had to wait; issued once the replies drain.
    private var readHeld = false
    /// Set once nothing more is to be read: a refusal that closes, or shutdown.
    private var inputDone = false
    /// Set once shutdown asks connections to finish: close after the last request received.
    private var quiescing = false
    /// Set once a reply that closes the connection was written; later input is discarded.
    private var closing = false
    private var discarded = 0
    /// On the event loop's clock (`EventLoop.now`), which tests can advance.
    private var lastActivity = NIODeadline.uptimeNanoseconds(0)
    private var timer: Scheduled<Void>?
    /// The peer as the status page shows it, formatted once per connection rather than per callback.
    private var peer: String?

    init(state: ServerState) {
        self.state = state
    }

    /// Request body bytes this connection holds (received and waiting), which the body limit bounds.
    var heldBodyBytes: Int {
        self.waiting.reduce(self.receiving?.body?.readableBytes ?? 0) { $0 + ($1.body?.readableBytes ?? 0) }
    }

    // MARK: lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.lastActivity = context.eventLoop.now
        self.peer = context.channel.remoteAddress?.statusText
        self.writable = context.channel.isWritable
        if context.channel.isActive { self.scheduleTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        self.peer = context.channel.remoteAddress?.statusText
        self.scheduleTimer(context: context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is ChannelShouldQuiesceEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        self.quiescing = true
        if self.receiving == nil {
            self.inputDone = true
            if !self.rendering, self.waiting.isEmpty { context.close(promise: nil) }
        }
    }

    /// One timer per connection enforces both time limits without a schedule per request: the
    /// idle timeout (no bytes for that long, whether or not replies wait to be read) and the
    /// request timeout (a request still arriving
    /// that long after its head, however steadily it trickles). It fires at the earlier deadline,
    /// and at least once per request timeout, so a request that starts after it was set is
    /// seen in time to be cut off at its own deadline.
    private func scheduleTimer(context: ChannelHandlerContext) {
        guard self.timer == nil else { return }
        let config = self.state.configuration
        let now = context.eventLoop.now
        var deadline = min(self.lastActivity + config.idleTimeout, now + config.requestTimeout)
        if let receiving = self.receiving {
            deadline = min(deadline, .uptimeNanoseconds(receiving.startNanoseconds) + config.requestTimeout)
        }
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.timer = nil
            self.timerFired(context: context)
        }
    }

    private func timerFired(context: ChannelHandlerContext) {
        guard !self.closing else { return }
        let config = self.state.configuration
        let now = context.eventLoop.now
        if let request = self.receiving, now >= .uptimeNanoseconds(request.startNanoseconds) + config.requestTimeout {
            let seconds = config.requestTimeout.nanoseconds / 1_000_000_000
            self.state.logger.info("request timed out", metadata: ["route": "\(request.route)", "seconds": "\(seconds)"])
            var timedOut = request
            timedOut.body = nil
            timedOut.closeAfter = true
            timedOut.reply = .error(.requestTimeout, "request timeout", ["the request did not arrive in full within \(seconds) s"])
            self.received(context: context, timedOut)
            context.flush()
        } else if self.receiving == nil, !self.rendering, now >= self.lastActivity + config.idleTimeout {
            // Silent, or with replies waiting that the client has not read for that long.
            context.close(promise: nil)
        } else {
            self.scheduleTimer(context: context)
        }
    }

    // MARK: reading

    func read(context: ChannelHandlerContext) {
        if self.mayRead {
            context.read()
        } else {
            self.readHeld = true
        }
    }

    /// Reading waits while replies are owed; once the connection is closing, what arrives is
    /// read only to be discarded. A callback waiting for its commit does not stop reading: it
    /// takes about a millisecond, what arrives meanwhile waits in `waiting` (which does stop
    /// reading), and pausing and resuming the socket's read interest for every callback would
    /// cost two system calls each.
    private var mayRead: Bool {
        self.closing || (self.writable && (!self.rendering || self.committing) && self.waiting.isEmpty && !self.inputDone)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        self.writable = context.channel.isWritable
        if self.writable {
            self.answerWaiting(context: context)
            context.flush()
        }
        context.fireChannelWritabilityChanged()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
        context.fireChannelReadComplete()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.closing, !self.inputDone else {
            self.discard(context: context, self.unwrapInboundIn(data))
            return
        }
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            // One clock read serves the timers and the latency histogram.
            self.lastActivity = context.eventLoop.now
            var request = Request(head: head, route: Route(uri: head.uri), startNanoseconds: self.lastActivity.uptimeNanoseconds)
            // NIO's decoder stops parsing after a request that asks to upgrade; answer it and close.
            if head.headers.contains(name: "upgrade") { request.closeAfter = true }
            if request.route == .track {
                request.rejection = TrackEndpoint.check(head, state: self.state)
                if request.rejection != nil {
                    // Refused from the head alone: answer now and close without reading the body.
                    request.closeAfter = true
                    self.received(context: context, request)
                    return
                }
                // curl and others wait (about a second) for this before sending a body. Sent only
                // when no earlier reply is still owed, so replies stay in order.
                if self.waiting.isEmpty, !self.rendering, head.headers.first(name: "expect")?.lowercased() == "100-continue" {
                    context.write(self.wrapOutboundOut(HTTPResponse.continueBytes), promise: nil)
                }
            }
            self.receiving = request
        case .body(var chunk):
            self.lastActivity = context.eventLoop.now
            guard self.receiving?.route == .track else { return }
            if (self.receiving?.body?.readableBytes ?? 0) + chunk.readableBytes > self.state.configuration.maxBodyBytes {
                var request = self.receiving!
                request.body = nil
                request.rejection = TrackEndpoint.tooLarge(self.state)
                request.closeAfter = true
                self.received(context: context, request)
                return
            }
            // Mutated in place through `self.receiving`, so a body in several chunks is not copied
            // once per chunk.
            if self.receiving?.body == nil {
                self.receiving?.body = chunk
            } else {
                self.receiving?.body?.writeBuffer(&chunk)
            }
        case .end:
            guard let request = self.receiving else { return }
            self.received(context: context, request)
        }
    }

    /// A request has arrived in full (or was refused before it did): answer it now if nothing is
    /// ahead of it, or queue it.
    private func received(context: ChannelHandlerContext, _ request: Request) {
        self.receiving = nil
        if request.closeAfter || self.quiescing { self.inputDone = true }
        if self.writable, !self.rendering, self.waiting.isEmpty {
            self.answer(context: context, request)
        } else {
            self.waiting.append(request)
        }
    }

    /// Answers queued requests while nothing blocks them, then lets reading resume.
    private func answerWaiting(context: ChannelHandlerContext) {
        while self.writable, !self.rendering, !self.closing, let next = self.waiting.popFirst() {
            self.answer(context: context, next)
        }
        if self.readHeld, self.mayRead {
            self.readHeld = false
            context.read()
        }
    }

    // MARK: answering

    private func answer(context: ChannelHandlerContext, _ request: Request) {
        if let reply = request.reply {
            self.complete(context: context, request, reply: reply)
            return
        }
        let head = request.head
        switch request.route {
        case .track:
            if let rejection = request.rejection {
                self.refuse(context: context, request, rejection)
                return
            }
            switch TrackEndpoint.handle(head, body: request.body, sender: self.peer, state: self.state, on: context.eventLoop) {
            case .accepted: self.acknowledge(context: context, request)
            case .rejected(let rejection): self.refuse(context: context, request, rejection)
            case .committing(let commit, let callback):
                // Like a render: later requests wait, in order, while the ledger commits.
                self.rendering = true
                self.committing = true
                commit.assumeIsolated().whenComplete { result in
                    self.rendering = false
                    self.committing = false
                    let verdict = (try? result.get()) ?? .unavailable
                    if let rejection = TrackEndpoint.committed(verdict, callback, head, sender: self.peer, state: self.state) {
                        self.refuse(context: context, request, rejection)
                    } else {
                        self.acknowledge(context: context, request)
                    }
                    self.answerWaiting(context: context)
                    context.flush()
                }
            }
        // A `where` binds to one pattern only, hence one per route.
        case .metrics where head.isRead, .debug where head.isRead, .status where head.isRead:
            // All three read the whole store (the status page ranks it), so none runs on the loop.
            self.rendering = true
            let render: @Sendable () -> HTTPResponse
            switch request.route {
            case .debug: render = { [state] in DebugEndpoint.reply(head, state: state) }
            case .status: render = { [state] in StatusPageEndpoint.reply(head, state: state) }
            default: render = { [state, peer] in MetricsEndpoint.reply(head, from: peer, state: state) }
            }
            self.state.runOffLoop(context.eventLoop, render)
                .assumeIsolated().whenComplete { result in
                    self.rendering = false
                    let reply = (try? result.get()) ?? .error(.serviceUnavailable, "shutting down", ["the server is stopping"])
                    self.complete(context: context, request, reply: reply)
                    self.answerWaiting(context: context)
                    context.flush()
                }
        case .metrics, .healthz, .readyz, .debug, .status, .other:
            self.complete(context: context, request, reply: self.readOnlyReply(request))
        }
    }

    private func acknowledge(context: ChannelHandlerContext, _ request: Request) {
        if self.closesAfter(request) {
            self.complete(context: context, request, reply: HTTPResponse(status: .accepted))
        } else {
            // The hot path: the prebuilt 202, no serialisation.
            context.write(self.wrapOutboundOut(HTTPResponse.acceptedBytes), promise: nil)
            self.observe(context: context, request)
        }
    }

    private func refuse(context: ChannelHandlerContext, _ request: Request, _ rejection: CallbackRejection) {
        self.complete(context: context, request, reply: TrackEndpoint.reply(to: rejection, request.head, sender: self.peer, state: self.state))
    }

    private func readOnlyReply(_ request: Request) -> HTTPResponse {
        let path = Route.path(of: request.head.uri).truncated(toUTF8Bytes: ClientText.echoedBytes)
        guard request.route != .other else {
            return .error(.notFound, "not found", ["no route for \(path)"])
        }
        guard request.head.method == .GET || request.head.method == .HEAD else {
            return .error(
                .methodNotAllowed, "method not allowed",
                ["\(request.head.method.rawValue) \(path) is not allowed; use GET"],
                headers: [("allow", "GET, HEAD")]
            )
        }
        switch request.route {
        case .healthz: return HealthEndpoints.liveness()
        case .readyz: return HealthEndpoints.readiness(state: self.state)
        case .track, .other, .metrics, .debug, .status: preconditionFailure("answered elsewhere")
        }
    }

    /// Whether the reply to `request` is the last on this connection. From shutdown on (the
    /// drain included) the connection closes after the last request it has received in full, so
    /// a keep-alive caller moves to another replica and nothing it sent is cut off.
    private func closesAfter(_ request: Request) -> Bool {
        if request.closeAfter || !request.head.isKeepAlive { return true }
        guard self.quiescing || self.state.stopping.load(ordering: .relaxed) else { return false }
        return self.waiting.isEmpty && self.receiving == nil
    }

    private func complete(context: ChannelHandlerContext, _ request: Request, reply: HTTPResponse) {
        let close = self.closesAfter(request)
        let bytes = reply.serialized(allocator: context.channel.allocator, omitBody: request.head.method == .HEAD, close: close)
        self.observe(context: context, request)
        if close {
            self.writeAndClose(context: context, bytes)
        } else {
            context.write(self.wrapOutboundOut(bytes), promise: nil)
        }
    }

    /// The last reply on this connection. The socket is half-closed once the reply is out, so the
    /// peer reads all of it and then the end of the stream; anything it still sends is read and
    /// discarded until it closes its side, or `lingerTime` passes. Closing outright with unread
    /// input would make the kernel send a reset, which can destroy the reply before it is read.
    private func writeAndClose(context: ChannelHandlerContext, _ bytes: ByteBuffer) {
        self.closing = true
        self.inputDone = true
        context.writeAndFlush(self.wrapOutboundOut(bytes), promise: nil)
        let halfClosed = context.eventLoop.makePromise(of: Void.self)
        context.close(mode: .output, promise: halfClosed)
        halfClosed.futureResult.assumeIsolated().whenComplete { result in
            guard case .success = result else {
                context.close(promise: nil)
                return
            }
            context.eventLoop.assumeIsolated().scheduleTask(in: Self.lingerTime) { context.close(promise: nil) }
            context.read()
        }
    }

    static let lingerTime = TimeAmount.seconds(2)
    /// How much a closing connection reads and discards before it closes outright.
    static let lingerBytes = 64 * 1024

    private func discard(context: ChannelHandlerContext, _ part: HTTPServerRequestPart) {
        guard case .body(let chunk) = part else { return }
        self.discarded += chunk.readableBytes
        if self.discarded > Self.lingerBytes { context.close(promise: nil) }
    }

    private func observe(context: ChannelHandlerContext, _ request: Request) {
        let elapsed = context.eventLoop.now.uptimeNanoseconds &- request.startNanoseconds
        self.state.metrics.observe(route: request.route.rawValue, nanoseconds: elapsed)
    }

    // MARK: errors

    /// A request NIO cannot parse gets one plain reply, after the replies still owed, and the
    /// connection is closed, since nothing after it on the stream can be trusted.
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !self.closing, !self.inputDone else { return }
        let response: HTTPResponse
        switch error as? HTTPParserError {
        case .headerOverflow?:
            response = .error(.requestHeaderFieldsTooLarge, "request header too large", ["request head exceeds \(self.state.configuration.maxHeaderBytes) bytes"])
        case let parserError?:
            response = .error(.badRequest, "malformed HTTP request", ["not valid HTTP/1.1 (\(parserError))"])
        case nil:
            self.closing = true
            context.close(promise: nil)
            return
        }
        self.state.logger.info("bad HTTP request", metadata: ["error": "\(error)"])
        let now = context.eventLoop.now.uptimeNanoseconds
        let unparsed = HTTPRequestHead(version: .http1_1, method: .GET, uri: "")
        self.received(context: context, Request(head: unparsed, route: .other, startNanoseconds: now, closeAfter: true, reply: response))
        context.flush()
    }
}

extension HTTPRequestHead {
    /// GET or HEAD: what the read-only routes answer.
    fileprivate var isRead: Bool { self.method == .GET || self.method == .HEAD }
}
