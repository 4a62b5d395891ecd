import Logging
import NIOCore
import NIOHTTP1
import Synchronization
import UsageTrackingCore

/// What all connections share: the counters, the decoder, the secrets and the debug lists.
/// Everything here is safe to use from any event loop.
final class ServerState: Sendable {
    /// Runs work too slow for an event loop (rendering `/metrics`: 0.1 s at 100k series, over a
    /// second at 1M) elsewhere and delivers the reply back on `eventLoop`, so a scrape never
    /// stalls the callbacks that share the loop. The server uses a `NIOThreadPool`.
    typealias OffLoopRunner = @Sendable (
        _ eventLoop: EventLoop, _ work: @escaping @Sendable () -> HTTPResponse
    ) -> EventLoopFuture<HTTPResponse>

    let configuration: ServerConfiguration
    let logger: Logger
    /// The logger's level admits debug lines. Read once: asking the logger costs a copy of its
    /// handler, on every callback.
    let logsDebug: Bool
    let metrics: UsageMetrics
    let decoder: CallbackDecoder
    let secrets: CallbackSecrets
    /// nil when the debug view is turned off, so nothing is recorded for it either.
    let recent: RecentCallbacks?
    /// What the status page shows beyond the recent callbacks; nil with the debug view off.
    let status: StatusTracking?
    let startedAt = NIODeadline.now()
    let ready = Atomic<Bool>(false)
    /// Set at SIGTERM, before the drain: from then on every connection closes after its last reply.
    let stopping = Atomic<Bool>(false)
    let runOffLoop: OffLoopRunner
    /// For labels configured with `hash: hmac-sha256`; the status page looks users up through it.
    let labelHasher: LabelHasher?
    /// Commits counts to the ledger; nil without `--state-dir`.
    let ledgerWriter: LedgerWriter?
    /// The token families' decoder; nil without `--ext-proc-port`.
    let tokenDecoder: TokenDecoder?
    /// `GET /usage`'s reader of the shared ledger and its cache; nil without `--ledger-url`.
    let usage: UsageAnswers?
    /// `/metrics` requests from their routing until their sockets have taken their replies.
    let metricsReplies = ReplySlots(limit: MetricsEndpoint.maxHeldReplies)
    /// Status page and `/debug` requests from their routing until their render is done: they
    /// share the render thread with scrapes, which would otherwise wait behind any number of them.
    let pageRenders = ReplySlots(limit: Router.maxPageRenders)

    init(
        configuration: ServerConfiguration, logger: Logger, metrics: UsageMetrics, secrets: CallbackSecrets,
        ledgerWriter: LedgerWriter? = nil, usageReader: PostgresUsageReader? = nil, runOffLoop: @escaping OffLoopRunner
    ) {
        self.runOffLoop = runOffLoop
        self.usage = usageReader.map { UsageAnswers(reader: $0) }
        self.ledgerWriter = ledgerWriter
        self.configuration = configuration
        self.logger = logger
        self.logsDebug = logger.logLevel <= .debug
        self.metrics = metrics
        self.secrets = secrets
        self.labelHasher = configuration.labelHMACKey.map { LabelHasher(key: $0) }
        self.decoder = CallbackDecoder(schema: metrics.schema, maximumValueBytes: configuration.maxLabelBytes, hasher: self.labelHasher)
        let hasher = self.labelHasher
        self.tokenDecoder = configuration.extProc.map { _ in
            TokenDecoder(schema: metrics.schema, maximumValueBytes: configuration.maxLabelBytes, hasher: hasher)
        }
        self.recent = configuration.debugEnabled ? RecentCallbacks(capacity: 100) : nil
        self.status = configuration.debugEnabled ? StatusTracking() : nil
    }
}

extension ServerState {
    /// Counts an outcome in memory and, with a ledger, in its next commit.
    func record(_ outcome: CallbackOutcome) {
        self.metrics.record(outcome)
        self.ledgerWriter?.record(outcome, at: LedgerWriter.now())
    }

    /// Serving, and able to count: not starting or stopping, and the ledger (if any) committing.
    var isReady: Bool {
        self.ready.load(ordering: .relaxed) && !(self.metrics.ledger?.isFailing ?? false) && (self.metrics.ledger?.isOpen ?? true)
    }
}
