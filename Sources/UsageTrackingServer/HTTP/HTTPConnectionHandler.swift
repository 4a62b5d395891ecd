import Logging
import NIOCore
import UsageTrackingCore

/// One per connection, the whole pipeline. Parses its requests (`HTTPRequestParser`), receives
/// each (head checks, body limit) as its parts arrive, has the `Router` say how it is answered,
/// and writes the serialised reply straight to the socket.
///
/// The pieces, all on the event loop: `AnswerQueue` keeps the replies in arrival order and holds
/// back reading while they are owed (backpressure); `ConnectionTimer` enforces the idle and
/// request timeouts; `Router` knows the routes and the refusals decided before a body is read.
/// What is left here is the connection itself: receiving, writing, closing.
///
/// Replies are flushed once per socket read, so a pipelined batch goes out in one write.
final class HTTPConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let state: ServerState
    private var parser: HTTPRequestParser
    /// The request being received.
    private var receiving: ReceivedRequest?
    private var queue = AnswerQueue()
    private var timer: ConnectionTimer
    /// Set once shutdown asks connections to finish: close after the last request received.
    private var quiescing = false
    private var discarded = 0
    /// The peer as the status page shows it, formatted once per connection rather than per callback.
    private var peer: String?

    init(state: ServerState) {
        self.state = state
        self.parser = HTTPRequestParser(maxHeadBytes: state.configuration.maxHeaderBytes)
        self.timer = ConnectionTimer(state.configuration)
    }

    /// Request body bytes this connection holds (received and waiting), which the body limit bounds.
    var heldBodyBytes: Int {
        (self.receiving?.body?.readableBytes ?? 0) + self.queue.heldBodyBytes
    }

    /// Requests received in full and waiting for their replies (at most `AnswerQueue.maxWaiting`).
    var waitingRequests: Int { self.queue.count }

    /// Bytes received and left unparsed while requests wait.
    var unparsedBytes: Int { self.parser.unparsedBytes }

    // MARK: lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.timer.touch(context.eventLoop.now)
        self.peer = context.channel.remoteAddress?.statusText
        self.queue.writable = context.channel.isWritable
        if context.channel.isActive { self.scheduleTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        self.peer = context.channel.remoteAddress?.statusText
        self.scheduleTimer(context: context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer.cancel()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is ChannelShouldQuiesceEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        self.quiescing = true
        if self.receiving == nil, self.parser.unparsedBytes == 0 {
            self.queue.inputDone = true
            if !self.queue.producing, self.queue.isEmpty { context.close(promise: nil) }
        }
    }

    private func scheduleTimer(context: ChannelHandlerContext) {
        self.timer.schedule(on: context.eventLoop, receivingSince: self.receiving?.startNanoseconds) {
            self.timer.fired()
            self.timerFired(context: context)
        }
    }

    private func timerFired(context: ChannelHandlerContext) {
        let now = context.eventLoop.now
        // Closing: the last reply is written or waits to be; a client that does not read it
        // keeps the connection for the idle timeout, no longer.
        guard !self.queue.closing else {
            if self.timer.expired(at: now, receivingSince: nil, producing: false) == .idle {
                context.close(promise: nil)
            } else {
                self.scheduleTimer(context: context)
            }
            return
        }
        switch self.timer.expired(at: now, receivingSince: self.receiving?.startNanoseconds, producing: self.queue.producing) {
        case .request?:
            let seconds = self.timer.requestTimeout.nanoseconds / 1_000_000_000
            var timedOut = self.receiving!
            self.state.logger.info("request timed out", metadata: ["route": "\(timedOut.route)", "seconds": "\(seconds)"])
            timedOut.body = nil
            timedOut.closeAfter = true
            timedOut.reply = .error(.requestTimeout, "request timeout", ["the request did not arrive in full within \(seconds) s"])
            self.received(context: context, timedOut)
            context.flush()
            // The 408 may wait behind replies the client does not read: the idle timeout still holds.
            self.scheduleTimer(context: context)
        case .idle?:
            // Silent, or with replies waiting that the client has not read for that long.
            context.close(promise: nil)
        case nil:
            self.scheduleTimer(context: context)
        }
    }

    // MARK: reading

    func read(context: ChannelHandlerContext) {
        if self.queue.allowRead() { context.read() }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        self.queue.writable = context.channel.isWritable
        if self.queue.writable {
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
        let bytes = self.unwrapInboundIn(data)
        guard !self.queue.closing, !self.queue.inputDone else {
            self.discard(context: context, bytes)
            return
        }
        self.parser.append(bytes)
        self.receiveParsed(context: context)
    }

    /// Every request the bytes received complete, until one ends what is read on this connection
    /// or `AnswerQueue.maxWaiting` wait for their replies; the rest stays unparsed until they are
    /// answered (and reading waits with it).
    private func receiveParsed(context: ChannelHandlerContext) {
        while !self.queue.closing, !self.queue.inputDone, !self.queue.isFull {
            let part: HTTPRequestParser.Part?
            do {
                part = try self.parser.next()
            } catch {
                self.refuse(context: context, error)
                return
            }
            guard let part else { return }
            self.receive(context: context, part)
        }
    }

    private func receive(context: ChannelHandlerContext, _ part: HTTPRequestParser.Part) {
        switch part {
        case .head(let head):
            // One clock read serves the timers and the latency histogram.
            let now = context.eventLoop.now
            self.timer.touch(now)
            var request = ReceivedRequest(head: head, route: head.route, startNanoseconds: now.uptimeNanoseconds)
            // Nothing after a request that asks to switch protocols, or to close, is read: answer
            // it and close.
            if head.upgrades || !head.isKeepAlive { request.closeAfter = true }
            if Router.takesBody(request.route) {
                request.rejection = Router.refusal(head, route: request.route, state: self.state)
                if request.rejection != nil {
                    // Refused from the head alone: answer now and close without reading the body.
                    request.closeAfter = true
                    self.received(context: context, request)
                    return
                }
                // curl and others wait (about a second) for this before sending a body. Sent only
                // when no earlier reply is still owed, so replies stay in order.
                // HTTP/1.0 clients know no interim replies (RFC 9110 10.1.1).
                if head.expectsContinue, head.version == .http1_1, self.queue.isEmpty, !self.queue.producing {
                    context.write(self.wrapOutboundOut(HTTPResponse.continueBytes), promise: nil)
                }
            }
            self.receiving = request
        case .body(var chunk):
            self.timer.touch(context.eventLoop.now)
            guard let route = self.receiving?.route, Router.takesBody(route) else { return }
            if (self.receiving?.body?.readableBytes ?? 0) + chunk.readableBytes > self.state.configuration.maxBodyBytes {
                var request = self.receiving!
                request.body = nil
                request.rejection = Router.bodyTooLarge(self.state)
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
            // Moved out rather than copied: no retain and release of each of its parts.
            guard let request = self.receiving.take() else { return }
            self.received(context: context, request)
        }
    }

    /// A request has arrived in full (or was refused before it did): answer it now if nothing is
    /// ahead of it, or queue it.
    private func received(context: ChannelHandlerContext, _ request: ReceivedRequest) {
        self.receiving = nil
        // Once stopping, what has arrived is still answered: input ends after the last of it.
        if request.closeAfter || (self.quiescing && self.parser.unparsedBytes == 0) { self.queue.inputDone = true }
        if self.queue.isClear {
            self.answer(context: context, request)
        } else {
            self.queue.append(request)
        }
    }

    /// Answers queued requests while nothing blocks them, takes in what was received but left
    /// unparsed meanwhile, then lets reading resume.
    private func answerWaiting(context: ChannelHandlerContext) {
        repeat {
            while let next = self.queue.next() {
                self.answer(context: context, next)
            }
            guard self.queue.isEmpty, self.parser.unparsedBytes > 0 else { break }
            self.receiveParsed(context: context)
        } while !self.queue.isEmpty
        if self.queue.resumeHeldRead() { context.read() }
    }

    // MARK: answering

    private func answer(context: ChannelHandlerContext, _ request: ReceivedRequest) {
        self.deliver(context: context, request, Router.answer(request, sender: self.peer, state: self.state, on: context.eventLoop))
    }

    private func deliver(context: ChannelHandlerContext, _ request: ReceivedRequest, _ answer: Router.Answer) {
        switch answer {
        case .reply(let reply):
            self.complete(context: context, request, reply: reply)
        case .accepted:
            self.acknowledge(context: context, request)
        case .committing(let commit, let callback):
            // Like a render: later requests wait, in order, while the ledger commits.
            self.queue.startProducing(commit: true)
            commit.assumeIsolated().whenComplete { result in
                self.queue.finishProducing()
                let verdict = (try? result.get()) ?? .unavailable
                self.deliver(context: context, request, Router.committed(verdict, callback, request, sender: self.peer, state: self.state))
                self.answerWaiting(context: context)
                context.flush()
            }
        case .rendering(let render):
            self.wait(context: context, request, for: self.state.runOffLoop(context.eventLoop, render))
        case .waiting(let reply):
            self.wait(context: context, request, for: reply)
        }
    }

    /// Like a render or a commit: later requests wait, in order, for `reply`.
    private func wait(context: ChannelHandlerContext, _ request: ReceivedRequest, for reply: EventLoopFuture<HTTPResponse>) {
        self.queue.startProducing(commit: false)
        reply.hop(to: context.eventLoop).assumeIsolated().whenComplete { result in
            self.queue.finishProducing()
            let reply = (try? result.get()) ?? .error(.serviceUnavailable, "shutting down", ["the server is stopping"])
            self.complete(context: context, request, reply: reply)
            self.answerWaiting(context: context)
            context.flush()
        }
    }

    private func acknowledge(context: ChannelHandlerContext, _ request: ReceivedRequest) {
        if self.closesAfter(request) {
            self.complete(context: context, request, reply: HTTPResponse(status: .accepted))
        } else {
            // The hot path: the prebuilt 202, no serialisation.
            context.write(self.wrapOutboundOut(HTTPResponse.acceptedBytes), promise: nil)
            self.observe(context: context, request)
        }
    }

    /// Whether the reply to `request` is the last on this connection. From shutdown on (the
    /// drain included) the connection closes after the last request it has received in full, so
    /// a keep-alive caller moves to another replica and nothing it sent is cut off.
    private func closesAfter(_ request: ReceivedRequest) -> Bool {
        if request.closeAfter { return true }
        guard self.quiescing || self.state.stopping.load(ordering: .relaxed) else { return false }
        return self.queue.isEmpty && self.receiving == nil && self.parser.unparsedBytes == 0
    }

    private func complete(context: ChannelHandlerContext, _ request: ReceivedRequest, reply: HTTPResponse) {
        let close = self.closesAfter(request)
        let bytes = reply.serialized(allocator: context.channel.allocator, omitBody: request.head.method == .HEAD, close: close)
        self.observe(context: context, request)
        // A reply's slot is kept until the socket has taken all of it, or the write failed.
        let written = reply.slot.map { slot in
            let promise = context.eventLoop.makePromise(of: Void.self)
            promise.futureResult.whenComplete { _ in withExtendedLifetime(slot) {} }
            return promise
        }
        if close {
            self.writeAndClose(context: context, bytes, promise: written)
        } else {
            context.write(self.wrapOutboundOut(bytes), promise: written)
        }
    }

    /// The last reply on this connection. The socket is half-closed once the reply is out, so the
    /// peer reads all of it and then the end of the stream; anything it still sends is read and
    /// discarded until it closes its side, or `lingerTime` passes. Closing outright with unread
    /// input would make the kernel send a reset, which can destroy the reply before it is read.
    private func writeAndClose(context: ChannelHandlerContext, _ bytes: ByteBuffer, promise: EventLoopPromise<Void>? = nil) {
        self.queue.closing = true
        self.queue.inputDone = true
        context.writeAndFlush(self.wrapOutboundOut(bytes), promise: promise)
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

    private func discard(context: ChannelHandlerContext, _ bytes: ByteBuffer) {
        self.discarded += bytes.readableBytes
        if self.discarded > Self.lingerBytes { context.close(promise: nil) }
    }

    private func observe(context: ChannelHandlerContext, _ request: ReceivedRequest) {
        let elapsed = context.eventLoop.now.uptimeNanoseconds &- request.startNanoseconds
        self.state.metrics.observe(route: request.route.rawValue, nanoseconds: elapsed)
    }

    // MARK: errors

    /// A request that cannot be parsed gets one plain reply, after the replies still owed, and
    /// the connection is closed, since nothing after it on the stream can be trusted.
    private func refuse(context: ChannelHandlerContext, _ failure: HTTPRequestParser.Failure) {
        let summary =
            switch failure.status {
            case .requestHeaderFieldsTooLarge: "request header too large"
            case .notImplemented: "not implemented"
            case .httpVersionNotSupported: "HTTP version not supported"
            default: "malformed HTTP request"
            }
        self.state.logger.info("bad HTTP request", metadata: ["status": "\(failure.status.code)", "problem": "\(failure.problem)"])
        let now = context.eventLoop.now.uptimeNanoseconds
        let reply = HTTPResponse.error(failure.status, summary, [failure.problem])
        // Whatever part of a request was received is dropped with the stream.
        self.receiving = nil
        self.received(context: context, ReceivedRequest(head: .unparsed, route: .other, startNanoseconds: now, closeAfter: true, reply: reply))
        context.flush()
    }

    /// Anything else the pipeline reports (a socket error): nothing can be answered.
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        self.queue.closing = true
        context.close(promise: nil)
    }
}
