import Logging
import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// One per connection, after NIO's request decoder. Routes each request, answers it on the
/// event loop, and writes the serialised reply straight to the socket.
///
/// Requests are answered in the order they arrive. All but `/metrics` are answered before the next
/// one is read; while a `/metrics` reply is rendered off the loop, later pipelined requests wait
/// in `queued`. Replies are flushed once per socket read, so a pipelined batch goes out in one
/// write.
final class HTTPConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = ByteBuffer

    private struct Request {
        var head: HTTPRequestHead
        var route: Route
        var startNanoseconds: UInt64
        var body: ByteBuffer?
        /// A rejection decided from the head; the body is then read but not kept.
        var rejection: CallbackRejection?
    }

    private let state: ServerState
    private var request: Request?
    /// True while a reply is being rendered off the loop; input meanwhile goes to `queued`.
    private var awaitingReply = false
    private var queued: [HTTPServerRequestPart] = []
    /// Set once shutdown asks connections to finish: close after the current reply.
    private var quiescing = false
    /// Set once a reply that closes the connection was written; later input is ignored.
    private var closing = false
    /// On the event loop's clock (`EventLoop.now`), which tests can advance.
    private var lastActivity = NIODeadline.uptimeNanoseconds(0)
    private var idleCheck: Scheduled<Void>?

    init(state: ServerState) {
        self.state = state
    }

    // MARK: lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.lastActivity = context.eventLoop.now
        if context.channel.isActive { self.scheduleIdleCheck(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        self.scheduleIdleCheck(context: context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.idleCheck?.cancel()
        self.idleCheck = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is ChannelShouldQuiesceEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        self.quiescing = true
        if self.request == nil, !self.awaitingReply, self.queued.isEmpty { context.close(promise: nil) }
    }

    /// Idle connections are closed. The timer is not moved on every read (that would cost a
    /// schedule per request); it fires, and re-arms for the remainder if there was activity.
    private func scheduleIdleCheck(context: ChannelHandlerContext) {
        guard self.idleCheck == nil else { return }
        let deadline = self.lastActivity + self.state.configuration.idleTimeout
        self.idleCheck = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.idleCheck = nil
            if context.eventLoop.now >= self.lastActivity + self.state.configuration.idleTimeout {
                context.close(promise: nil)
            } else {
                self.scheduleIdleCheck(context: context)
            }
        }
    }

    // MARK: requests

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.closing else { return }
        let part = self.unwrapInboundIn(data)
        if self.awaitingReply {
            self.queued.append(part)
        } else {
            self.process(context: context, part)
        }
    }

    private func process(context: ChannelHandlerContext, _ part: HTTPServerRequestPart) {
        switch part {
        case .head(let head):
            // One clock read serves the idle timer and the latency histogram.
            self.lastActivity = context.eventLoop.now
            let route = Route(uri: head.uri)
            var request = Request(head: head, route: route, startNanoseconds: self.lastActivity.uptimeNanoseconds)
            if route == .track {
                request.rejection = TrackEndpoint.check(head, state: self.state)
                if request.rejection?.outcome == .tooLarge {
                    // Do not read a body that was announced too large: answer and close now.
                    self.respond(context: context, request, TrackEndpoint.reply(to: request.rejection!, head, state: self.state), forceClose: true)
                    return
                }
                // curl and others wait (about a second) for this before sending a large body.
                if request.rejection == nil, head.headers.first(name: "expect")?.lowercased() == "100-continue" {
                    context.write(self.wrapOutboundOut(HTTPResponse.continueBytes), promise: nil)
                }
            }
            self.request = request
        case .body(var chunk):
            self.lastActivity = context.eventLoop.now
            guard self.request?.route == .track, self.request?.rejection == nil else { return }
            if (self.request?.body?.readableBytes ?? 0) + chunk.readableBytes > self.state.configuration.maxBodyBytes {
                let request = self.request!
                self.request = nil
                self.respond(context: context, request, TrackEndpoint.reply(to: TrackEndpoint.tooLarge(self.state), request.head, state: self.state), forceClose: true)
                return
            }
            // Mutated in place through `self.request`, so a body in several chunks is not copied
            // once per chunk.
            if self.request?.body == nil {
                self.request?.body = chunk
            } else {
                self.request?.body?.writeBuffer(&chunk)
            }
        case .end:
            guard let request = self.request else { return }
            self.request = nil
            self.answer(context: context, request)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
        context.fireChannelReadComplete()
    }

    private func answer(context: ChannelHandlerContext, _ request: Request) {
        let head = request.head
        switch request.route {
        case .track:
            let rejection = request.rejection ?? TrackEndpoint.handle(head, body: request.body, state: self.state)
            if let rejection {
                self.respond(context: context, request, TrackEndpoint.reply(to: rejection, head, state: self.state))
            } else if self.mustClose(head) {
                self.respond(context: context, request, HTTPResponse(status: .accepted))
            } else {
                // The hot path: the prebuilt 202, no serialisation.
                context.write(self.wrapOutboundOut(HTTPResponse.acceptedBytes), promise: nil)
                self.observe(context: context, request)
            }
        case .metrics where head.method == .GET || head.method == .HEAD:
            self.respondOffLoop(context: context, request) { [state] in MetricsEndpoint.reply(head, state: state) }
        case .metrics, .healthz, .readyz, .debug, .other:
            self.respond(context: context, request, self.readOnlyReply(request))
        }
    }

    /// Renders a reply with `ServerState.runOffLoop`, then writes it and carries on with whatever
    /// arrived meanwhile, in order.
    private func respondOffLoop(context: ChannelHandlerContext, _ request: Request, _ work: @escaping @Sendable () -> HTTPResponse) {
        self.awaitingReply = true
        self.state.runOffLoop(context.eventLoop, work).assumeIsolated().whenComplete { result in
            self.awaitingReply = false
            let response = (try? result.get()) ?? .error(.serviceUnavailable, "shutting down", ["the server is stopping"])
            self.respond(context: context, request, response)
            while !self.awaitingReply, !self.closing, !self.queued.isEmpty {
                self.process(context: context, self.queued.removeFirst())
            }
            context.flush()
        }
    }

    private func readOnlyReply(_ request: Request) -> HTTPResponse {
        let path = request.head.uri.prefix { $0 != "?" }
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
        case .debug: return DebugEndpoint.reply(state: self.state)
        case .track, .other, .metrics: preconditionFailure("answered elsewhere")
        }
    }

    private func mustClose(_ head: HTTPRequestHead) -> Bool {
        self.quiescing || !head.isKeepAlive
    }

    private func respond(context: ChannelHandlerContext, _ request: Request, _ response: HTTPResponse, forceClose: Bool = false) {
        let close = forceClose || self.mustClose(request.head)
        let bytes = response.serialized(allocator: context.channel.allocator, omitBody: request.head.method == .HEAD, close: close)
        self.observe(context: context, request)
        if close {
            self.writeAndClose(context: context, bytes)
        } else {
            context.write(self.wrapOutboundOut(bytes), promise: nil)
        }
    }

    /// The last reply on this connection: input after it is ignored, and the socket closes once
    /// the reply is out.
    private func writeAndClose(context: ChannelHandlerContext, _ bytes: ByteBuffer) {
        self.closing = true
        context.writeAndFlush(self.wrapOutboundOut(bytes)).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    private func observe(context: ChannelHandlerContext, _ request: Request) {
        let elapsed = context.eventLoop.now.uptimeNanoseconds &- request.startNanoseconds
        self.state.metrics.observe(route: request.route.rawValue, nanoseconds: elapsed)
    }

    // MARK: errors

    /// A request NIO cannot parse gets one plain reply and the connection is closed, since
    /// nothing after it on the stream can be trusted.
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !self.closing else { return }
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
        self.writeAndClose(context: context, response.serialized(allocator: context.channel.allocator, omitBody: false, close: true))
    }
}
