import Dispatch
import Logging
import UsageTrackingCore

extension LedgerWriter {
    /// Opens the ledger in `directory`, restores its counts into `metrics` and starts the writer.
    /// Runs before the listener opens, so no scrape sees a reset.
    static func open(
        _ directory: String, configuration: ServerConfiguration, metrics: UsageMetrics, logger: Logger
    ) throws -> LedgerWriter {
        let started = monotonicNanoseconds()
        let ledger: any LedgerEngine
        let restored: RestoredCounts
        do {
            let database = try UsageLedger(
                directory: directory, families: metrics.families, seriesIDs: metrics.seriesIDs, retentionDays: configuration.ledgerRetentionDays
            )
            // `always`: a callback waits for a journal append, not for a database commit.
            ledger = configuration.fsync == .always
                ? JournaledLedger(database, directory: directory, maxRequestIDs: metrics.requestIDs?.maxIDs ?? 0) : database
            restored = try ledger.restore(into: metrics, requestIDs: metrics.requestIDs, now: LedgerWriter.now())
        } catch {
            throw StateDirectoryError(underlying: error)
        }
        Self.logRestored(restored, ledger: ledger, started: started, mode: configuration.fsync, logger: logger)
        let writer = LedgerWriter(
            ledger: ledger, mode: configuration.fsync, interval: configuration.fsyncInterval, metrics: metrics,
            health: metrics.ledger!, logger: logger
        )
        writer.start()
        return writer
    }
}

extension LedgerWriter {
    /// Connects to the shared ledger and restores this replica's counts. A server that cannot
    /// be reached is not a reason to stop: the writer goes on trying (see `run`), and until
    /// it succeeds callbacks are refused and `/readyz` says 503. A refused password, a missing
    /// database or a newer schema are: they stop startup with the server's own reason.
    static func open(
        _ address: PostgresAddress, password: String, configuration: ServerConfiguration, metrics: UsageMetrics, logger: Logger
    ) async throws -> LedgerWriter {
        // The engine blocks its caller while it waits on the database: a thread of its own,
        // not one of the concurrency pool's, which the engine's own work runs on.
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(with: Result {
                    try Self.openBlocking(address, password: password, configuration: configuration, metrics: metrics, logger: logger)
                })
            }
        }
    }

    private static func openBlocking(
        _ address: PostgresAddress, password: String, configuration: ServerConfiguration, metrics: UsageMetrics, logger: Logger
    ) throws -> LedgerWriter {
        let ledger = PostgresLedger(
            address: address, password: password, instance: configuration.instance, families: metrics.families, seriesIDs: metrics.seriesIDs,
            retentionDays: configuration.ledgerRetentionDays, logger: logger
        )
        let health = metrics.ledger!
        let started = monotonicNanoseconds()
        do {
            // Briefly: a restore that takes longer goes on in the writer, with /healthz answering.
            let restored = try ledger.restore(into: metrics, requestIDs: metrics.requestIDs, now: LedgerWriter.now(), deadline: .seconds(10))
            health.opened()
            Self.logRestored(restored, ledger: ledger, started: started, mode: configuration.fsync, logger: logger)
        } catch .unreachable(let place, let reason) {
            health.failed()
            logger.warning(
                "ledger not reachable; callbacks are refused with 503 and /readyz reports 503 until it is",
                metadata: ["ledger": "\(place)", "error": "\(reason)", "attempts": "1", "retry_seconds": "1"]
            )
        } catch {
            ledger.close()
            throw LedgerURLError(underlying: error)
        }
        logger.info("ledger replica", metadata: ["instance": "\(configuration.instance)"])
        let writer = LedgerWriter(
            ledger: ledger, mode: configuration.fsync, interval: configuration.fsyncInterval, metrics: metrics, health: health, logger: logger
        )
        writer.start()
        return writer
    }
}

/// The shared ledger cannot be used; says which flag set it.
struct LedgerURLError: Error, CustomStringConvertible {
    var underlying: any Error
    var description: String { "--ledger-url (USAGE_TRACKING_LEDGER_URL): \(self.underlying)" }
}

/// The state directory cannot be used; says which flag set it.
struct StateDirectoryError: Error, CustomStringConvertible {
    var underlying: any Error
    var description: String { "--state-dir (USAGE_TRACKING_STATE_DIR): \(self.underlying)" }
}
