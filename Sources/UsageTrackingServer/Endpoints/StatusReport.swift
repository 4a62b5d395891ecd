import Glibc
import NIOCore
import Synchronization
import UsageTrackingCore

/// What the status page records beyond the recent callbacks: callbacks per second, the last
/// scrape, reload and secret match, and the top label values (computed on demand, cached).
final class StatusTracking: Sendable {
    let rates = CallbackRates()
    let events = StatusEvents()
    /// The pod's name in Kubernetes (a pod's hostname is its name).
    let hostName = StatusTracking.readHostName()
    let startedAtUnix = wallClock()

    /// How many values per label the page ranks.
    static let topCount = 20
    /// How long a ranking is reused, at least: browsers refresh every 2 s, and several open
    /// pages must share one ranking. A ranking that took long is reused for ten times as long
    /// (about 7 s at 1M series, where one costs about 0.7 s of the render thread), so an open
    /// page never spends more than a tenth of that thread on it.
    static let rankingLifetime = TimeAmount.seconds(2)
    static let rankingLifetimePerComputeTime: Int64 = 10

    struct Rankings: Sendable {
        var computedAt: Double
        /// Per counted family, in `UsageMetrics.countedFamilies` order.
        var families: [(name: String, labels: [LabelRanking])]
    }

    private let cachedRankings = Mutex<(until: NIODeadline, rankings: Rankings)?>(nil)

    /// The current rankings, recomputed once the cached ones have expired (see
    /// `rankingLifetime`). Runs off the event loops (0.7 s at 1M series); the lock is held only
    /// to read or replace the cache, never while ranking.
    /// `tokenTypes`: per family, its token type label's index; such a family is ranked by input
    /// and output only, since the other types are parts of those two.
    func rankings(of families: [CounterFamily], tokenTypes: [Int?], now: NIODeadline = .now()) -> Rankings {
        if let cached = self.cachedRankings.withLock({ $0 }), now < cached.until {
            return cached.rankings
        }
        let started = NIODeadline.now()
        let rankings = Rankings(
            computedAt: wallClock(),
            families: zip(families, tokenTypes).map { family, type in
                let wholes = type.map { type in { (labels: LabelValues) in labels[type] == "input" || labels[type] == "output" } }
                return (family.name, LabelRanking.rank(family, top: Self.topCount, include: wholes))
            }
        )
        let took = NIODeadline.now() - started
        let lifetime = max(Self.rankingLifetime, .nanoseconds(took.nanoseconds * Self.rankingLifetimePerComputeTime))
        self.cachedRankings.withLock { $0 = (now + lifetime, rankings) }
        return rankings
    }

    private static func readHostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "unknown" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Everything the status page and the JSON `/debug` show, gathered once per request off the
/// event loop, so both render the same facts.
struct StatusReport {
    struct Rate {
        var kind: CallbackRates.Kind
        var perSecond: [UInt64]
        var lastMinute: Double
        var lastFiveMinutes: Double
    }

    struct UserView {
        var name: String
        /// Series with this user, highest count first, at most `StatusReport.userSeriesShown`.
        var series: [(labels: LabelValues, value: UInt64)]
        var seriesCount: Int
        var total: UInt64
        var recentAccepted: [RecentCallbacks.Accepted]
    }

    /// Series listed for one user: a user can have a series per path, and the page stays small.
    static let userSeriesShown = 50

    var hostName: String
    var uptimeSeconds: Double
    var startedAt: Double
    var configuration: [(String, JSONText)]
    var labelNames: [String]
    var series: [(name: String, count: Int)]
    var outcomes: [(outcome: CallbackOutcome, count: UInt64)]
    /// Model answers by outcome; empty without `--ext-proc-port`.
    var tokenStreams: [(outcome: TokenStreamOutcome, count: UInt64)]
    var rates: [Rate]
    var rankings: StatusTracking.Rankings
    /// Per family name, per label: distinct values held against the label's `max_values` (nil
    /// when the label has no budget). Read live: one lock per family.
    var budgets: [String: [(held: Int, limit: Int?)]]
    var recentAccepted: [RecentCallbacks.Accepted]
    var recentRejected: [RecentCallbacks.Rejected]
    var lastScrape: StatusEvents.Scrape?
    var lastReload: StatusEvents.SecretReload?
    var lastSecretMatch: StatusEvents.SecretMatch?
    var user: UserView?

    /// nil when the debug view is off. `user` asks for one user's view too.
    static func gather(state: ServerState, user: String?) -> StatusReport? {
        guard let status = state.status, let recent = state.recent else { return nil }
        let config = state.configuration
        let second = status.rates.currentSecond
        let rates = CallbackRates.Kind.allCases.map { kind in
            let counts = status.rates.perSecond(kind, before: second)
            return Rate(
                kind: kind, perSecond: counts,
                lastMinute: CallbackRates.rate(counts, last: 60, elapsed: second - 1),
                lastFiveMinutes: CallbackRates.rate(counts, last: CallbackRates.window, elapsed: second - 1)
            )
        }
        let accepted = recent.acceptedEntries
        let family = state.metrics.requests
        var userView: UserView? = nil
        // A name longer than any label value cannot match; it is still shown, cut short.
        let user = user.map { $0.utf8.count > config.maxLabelBytes ? $0.truncated(toUTF8Bytes: ClientText.echoedBytes) : $0 }
        if let name = user, let userLabel = family.labelNames.firstIndex(of: "user") {
            // With a hashed `user` label the series hold the name's hash, so look that up.
            let hashed = state.metrics.schema.metrics.first?.labels[userLabel].hash != nil
            let user = hashed ? state.labelHasher.map { $0.hash(name) } ?? name : name
            // Compared under each stripe's lock, copied only when it matches: the scan of 1M
            // series holds no lock for longer than one stripe's comparisons.
            var series = family.series { $0[userLabel].hasSameBytes(as: user) }
            let total = series.reduce(0) { $0 &+ $1.value }
            let count = series.count
            series.sort { $0.value != $1.value ? $0.value > $1.value : $0.labels.lexicographicallyPrecedes($1.labels) }
            userView = UserView(
                name: user, series: Array(series.prefix(Self.userSeriesShown)), seriesCount: count, total: total,
                recentAccepted: accepted.filter { $0.callback.user.hasSameBytes(as: user) }
            )
        }
        return StatusReport(
            hostName: status.hostName,
            uptimeSeconds: Double((NIODeadline.now() - state.startedAt).nanoseconds) / 1e9,
            startedAt: status.startedAtUnix,
            configuration: [
                ("host", .string(config.host)),
                ("port", .integer(Int64(config.port))),
                ("max_body_bytes", .integer(Int64(config.maxBodyBytes))),
                ("max_label_bytes", .integer(Int64(config.maxLabelBytes))),
                ("max_header_bytes", .integer(Int64(config.maxHeaderBytes))),
                ("idle_timeout_seconds", .integer(config.idleTimeout.nanoseconds / 1_000_000_000)),
                ("request_timeout_seconds", .integer(config.requestTimeout.nanoseconds / 1_000_000_000)),
                ("max_connections", .integer(Int64(config.maxConnections))),
                ("drain_delay_seconds", .integer(config.drainDelay.nanoseconds / 1_000_000_000)),
                ("shutdown_timeout_seconds", .integer(config.shutdownTimeout.nanoseconds / 1_000_000_000)),
                ("event_loop_threads", .integer(Int64(config.eventLoopThreads))),
                ("callback_secret_header", .string(config.callbackSecretHeader)),
                ("callback_secret", .string(config.callbackSecret == nil ? "unset" : "set")),
                ("callback_secret_file", config.callbackSecretFile.map(JSONText.string) ?? .null),
                ("callback_secrets_loaded", .integer(Int64(state.secrets.count))),
                ("authentication", .string(state.secrets.isRequired ? "required" : "off")),
                ("config_file", config.schemaFile.map(JSONText.string) ?? .null),
                ("metrics", .array(state.metrics.families.map { JSONText.string($0.name) })),
                ("new_series_hold_seconds", .integer(config.newSeriesHold.nanoseconds / 1_000_000_000)),
                ("label_hmac_key", .string(config.labelHMACKey == nil ? "unset" : "set")),
                ("label_hmac_key_file", config.labelHMACKeyFile.map(JSONText.string) ?? .null),
                ("state_dir", config.stateDirectory.map(JSONText.string) ?? .null),
                ("ledger_url", config.ledgerURL.map { JSONText.string("\($0)") } ?? .null),
                ("ledger_password", .string(config.ledgerPassword == nil ? "unset" : "set")),
                ("instance", .string(config.instance)),
                ("fsync", .string(config.fsync.rawValue)),
                ("fsync_interval_seconds", .integer(config.fsyncInterval.nanoseconds / 1_000_000_000)),
                ("ledger_retention_days", .integer(Int64(config.ledgerRetentionDays))),
                ("dedupe_header", config.dedupeHeader.map(JSONText.string) ?? .null),
                ("dedupe_window_seconds", .integer(config.dedupeWindow.nanoseconds / 1_000_000_000)),
                ("dedupe_max_ids", .integer(Int64(config.dedupeMaxIDs))),
            ],
            labelNames: family.labelNames,
            series: state.metrics.countedFamilies.map { ($0.name, $0.seriesCount) },
            outcomes: state.metrics.outcomeCounts,
            tokenStreams: state.metrics.tokenStreamCounts,
            rates: rates,
            rankings: status.rankings(of: state.metrics.countedFamilies, tokenTypes: state.metrics.tokenTypeLabels),
            budgets: Dictionary(uniqueKeysWithValues: state.metrics.countedFamilies.map { family in
                let held = family.budgetUse().values
                return (family.name, zip(held, family.maxValues).map { ($0, $1 == .max ? nil : $1) })
            }),
            recentAccepted: accepted,
            recentRejected: recent.rejectedEntries,
            lastScrape: status.events.lastScrape,
            lastReload: status.events.lastReload,
            lastSecretMatch: status.events.lastSecretMatch,
            user: userView
        )
    }

    /// The `user` query parameter of a request target, if any.
    static func requestedUser(_ uri: String) -> String? {
        guard let question = uri.firstIndex(of: "?") else { return nil }
        return HTMLText.queryValue("user", in: uri[uri.index(after: question)...]).flatMap { $0.isEmpty ? nil : $0 }
    }
}

extension SocketAddress {
    /// `ip:port` (`[ip]:port` for IPv6), as the status page shows a peer.
    var statusText: String? {
        guard let ip = self.ipAddress, let port = self.port else { return nil }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }
}
