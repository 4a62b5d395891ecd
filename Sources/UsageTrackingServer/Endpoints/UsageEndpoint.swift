import NIOCore
import NIOHTTP1
import Synchronization
import UsageTrackingCore

/// `GET /usage?user=NAME[&from=RFC3339&to=RFC3339][&by=LABEL,…]`: what one user used in a span
/// of whole UTC hours (the current month by default), summed over every replica, read from the
/// shared ledger (`--ledger-url`). For a quota decision: Authorino's `metadata.http` asks it
/// before a request is allowed.
///
/// Contract:
/// - Authentication: the callback secret, exactly as `/track` takes it (with none configured,
///   open, as `/track` is).
/// - Freshness: an answer is kept `cacheSeconds` and says so in `Cache-Control`: a quota
///   check sees counts at most that old, plus what the replicas have not committed yet
///   (nothing in `always` mode).
/// - Bounds: a span of at most 366 days; `cacheEntries` answers kept at most (beyond it the
///   cache is emptied, never grown); the reader's pool of 4 connections.
/// - Without a shared ledger: 404, saying why. With the database unreachable: 503.
enum UsageEndpoint {
    static let cacheSeconds: Int64 = 2
    static let cacheEntries = 10_000

    static func answer(_ head: RequestHead, state: ServerState, on eventLoop: EventLoop) -> Router.Answer {
        guard head.method == .GET || head.method == .HEAD else {
            return .reply(.error(.methodNotAllowed, "method not allowed", ["\(head.echoedMethod) /usage is not allowed; use GET"], headers: [("allow", "GET, HEAD")]))
        }
        if state.secrets.isRequired, let problem = TrackEndpoint.credentialProblem(head, state: state) {
            return .reply(.error(.unauthorized, "unauthorized", [problem], headers: TrackEndpoint.challenge(state)))
        }
        guard let usage = state.usage else {
            return .reply(.error(
                .notFound, "no shared ledger",
                ["/usage reads the ledger all replicas share (--ledger-url); this service has none, so it knows only its own counts (see /metrics)"]
            ))
        }
        let target = head.uri
        let query = target.firstIndex(of: "?").map { target[target.index(after: $0)...] } ?? ""
        let labelNames = Set(state.metrics.families.flatMap(\.labelNames))
        let parsed: UsageQuery
        switch UsageQuery.parse(query, labelNames: labelNames, maxUserBytes: state.configuration.maxLabelBytes, now: LedgerWriter.now()) {
        case .success(let question): parsed = question
        case .failure(let error): return .reply(.error(.badRequest, "bad request", error.problems))
        }
        let now = monotonicNanoseconds()
        if let cached = usage.cached(parsed, now: now) { return .reply(cached) }
        // The user as each family stores it: hashed where the family hashes its `user` label.
        let definitions = state.metrics.schema.metrics + state.metrics.schema.tokens
        let users = definitions.map { metric -> String? in
            guard let label = metric.labels.first(where: { $0.name == "user" }) else { return nil }
            return label.hash == nil ? parsed.user : state.labelHasher.map { $0.hash(parsed.user) } ?? parsed.user
        }
        let typeLabels = state.metrics.tokenTypeLabels
        let allFamilies = state.metrics.families
        let promise = eventLoop.makePromise(of: HTTPResponse.self)
        Task {
            do {
                let rows = try await usage.reader.rows(parsed, families: allFamilies, users: users, typeLabels: typeLabels)
                let reply = HTTPResponse.json(.ok, parsed.answer(rows), headers: [("cache-control", "private, max-age=\(Self.cacheSeconds)")])
                usage.keep(parsed, reply, now: now)
                promise.succeed(reply)
            } catch {
                state.logger.warning("usage query failed", metadata: ["error": "\(String(describing: error).truncated(toUTF8Bytes: 500))"])
                promise.succeed(.error(.serviceUnavailable, "unavailable", ["the shared ledger cannot be read now (see the service's log)"]))
            }
        }
        return .waiting(promise.futureResult)
    }
}

/// The shared ledger's reader and the answers it gave lately.
final class UsageAnswers: Sendable {
    let reader: PostgresUsageReader
    private let answers = Mutex<[UsageQuery: (expires: UInt64, reply: HTTPResponse)]>([:])

    init(reader: PostgresUsageReader) {
        self.reader = reader
    }

    func cached(_ query: UsageQuery, now: UInt64) -> HTTPResponse? {
        self.answers.withLock { answers in
            guard let entry = answers[query], entry.expires > now else { return nil }
            return entry.reply
        }
    }

    func keep(_ query: UsageQuery, _ reply: HTTPResponse, now: UInt64) {
        self.answers.withLock { answers in
            if answers.count >= UsageEndpoint.cacheEntries {
                answers = answers.filter { $0.value.expires > now }
                if answers.count >= UsageEndpoint.cacheEntries { answers.removeAll(keepingCapacity: true) }
            }
            answers[query] = (now + UInt64(UsageEndpoint.cacheSeconds) * 1_000_000_000, reply)
        }
    }
}
