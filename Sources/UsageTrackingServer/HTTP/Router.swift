import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// Which endpoint answers a request, and how: the one place that knows the routes. The
/// connection handler does what the answer says; the endpoints know nothing of connections.
enum Router {
    /// How a request is answered.
    enum Answer {
        /// A whole reply, ready now.
        case reply(HTTPResponse)
        /// A callback counted (or a repeat of one): the prebuilt 202.
        case accepted
        /// `--fsync always`: the answer waits for the ledger's commit (then see `committed`).
        case committing(EventLoopFuture<LedgerWriter.Verdict>, Callback)
        /// Too slow for the event loop (it reads the whole store): rendered off it.
        case rendering(@Sendable () -> HTTPResponse)
        /// Read from elsewhere (the shared ledger): the reply comes when the future does.
        case waiting(EventLoopFuture<HTTPResponse>)
    }

    /// Whether the route reads a request body; the others' bodies are dropped as they arrive.
    static func takesBody(_ route: Route) -> Bool { route == .track }

    /// Checks made from the head alone, before any body byte is buffered: a refusal here is
    /// answered at once and the connection closes without reading the body.
    static func refusal(_ head: RequestHead, route: Route, state: ServerState) -> CallbackRejection? {
        route == .track ? TrackEndpoint.check(head, state: state) : nil
    }

    /// The refusal of a body larger than `--max-body-bytes`.
    static func bodyTooLarge(_ state: ServerState) -> CallbackRejection {
        TrackEndpoint.tooLarge(state)
    }

    /// Answers a request received in full (or refused before it was). `sender` is the peer, as
    /// the status page shows it.
    static func answer(_ request: ReceivedRequest, sender: String?, state: ServerState, on eventLoop: EventLoop) -> Answer {
        if let reply = request.reply { return .reply(reply) }
        let head = request.head
        switch request.route {
        case .track:
            if let rejection = request.rejection {
                return .reply(TrackEndpoint.reply(to: rejection, head, sender: sender, state: state))
            }
            switch TrackEndpoint.handle(head, body: request.body, sender: sender, state: state, on: eventLoop) {
            case .accepted: return .accepted
            case .rejected(let rejection): return .reply(TrackEndpoint.reply(to: rejection, head, sender: sender, state: state))
            case .committing(let commit, let callback): return .committing(commit, callback)
            }
        case .usage:
            return UsageEndpoint.answer(head, state: state, on: eventLoop)
        case .metrics where head.isRead && !(state.ledgerWriter.map { $0.isOpen } ?? true):
            // The counts are not back from the ledger yet: a scrape now would look like a reset.
            return .reply(.error(.serviceUnavailable, "unavailable", ["the usage ledger is not reachable yet; the counts are served once it is"]))
        // A `where` binds to one pattern only, hence one per route.
        case .metrics where head.isRead, .debug where head.isRead, .status where head.isRead:
            // All three read the whole store (the status page ranks it), so none runs on the loop;
            // each takes its place first, so that the render thread's queue is bounded.
            if request.route == .metrics {
                guard let slot = state.metricsReplies.take() else { return .reply(MetricsEndpoint.busy) }
                return .rendering { [state] in MetricsEndpoint.reply(head, from: sender, slot: slot, state: state) }
            }
            guard let slot = state.pageRenders.take() else { return .reply(Self.pagesBusy) }
            let route = request.route
            return .rendering { [state] in
                withExtendedLifetime(slot) {
                    route == .debug ? DebugEndpoint.reply(head, state: state) : StatusPageEndpoint.reply(head, state: state)
                }
            }
        case .metrics, .healthz, .readyz, .debug, .status, .other:
            return .reply(Self.readOnlyReply(request, state: state))
        }
    }

    /// Status page and `/debug` requests rendered or waiting for the render thread at once: a
    /// person and a script or two; more would delay the scrapes queued behind them.
    static let maxPageRenders = 4

    static let pagesBusy = HTTPResponse.error(
        .serviceUnavailable, "too many status page and /debug requests are in progress",
        ["at most \(maxPageRenders) are rendered or wait to be at once, so that scrapes do not wait behind them; retry once one is answered"],
        headers: [("retry-after", "1")]
    )

    /// The answer to a callback once the ledger's commit says what became of it.
    static func committed(
        _ verdict: LedgerWriter.Verdict, _ callback: Callback, _ request: ReceivedRequest, sender: String?, state: ServerState
    ) -> Answer {
        guard let rejection = TrackEndpoint.committed(verdict, callback, request.head, sender: sender, state: state) else {
            return .accepted
        }
        return .reply(TrackEndpoint.reply(to: rejection, request.head, sender: sender, state: state))
    }

    private static func readOnlyReply(_ request: ReceivedRequest, state: ServerState) -> HTTPResponse {
        let path = Route.path(of: request.head.uri).truncated(toUTF8Bytes: ClientText.echoedBytes)
        guard request.route != .other else {
            return .error(.notFound, "not found", ["no route for \(path)"])
        }
        guard request.head.isRead else {
            return .error(
                .methodNotAllowed, "method not allowed",
                ["\(request.head.echoedMethod) \(path) is not allowed; use GET"],
                headers: [("allow", "GET, HEAD")]
            )
        }
        switch request.route {
        case .healthz: return HealthEndpoints.liveness()
        case .readyz: return HealthEndpoints.readiness(state: state)
        case .track, .other, .metrics, .debug, .status, .usage: preconditionFailure("answered elsewhere")
        }
    }
}
