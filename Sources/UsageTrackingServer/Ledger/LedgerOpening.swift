import Logging
import UsageTrackingCore

extension LedgerWriter {
    /// Opens the ledger in `directory`, restores its counts into `metrics` and starts the writer.
    /// Runs before the listener opens, so no scrape sees a reset.
    static func open(
        _ directory: String, configuration: ServerConfiguration, metrics: UsageMetrics, logger: Logger
    ) throws -> LedgerWriter {
        let started = monotonicNanoseconds()
        let ledger: UsageLedger
        let restored: RestoredCounts
        do {
            ledger = try UsageLedger(
                directory: directory, families: metrics.families, seriesIDs: metrics.seriesIDs, retentionDays: configuration.ledgerRetentionDays
            )
            restored = try ledger.restore(into: metrics, requestIDs: metrics.requestIDs, now: LedgerWriter.now())
        } catch {
            throw StateDirectoryError(underlying: error)
        }
        logger.info(
            "ledger restored",
            metadata: [
                "file": "\(ledger.path)", "series": "\(restored.series)", "request_ids": "\(restored.requestIDs)",
                "seconds": "\(Double(monotonicNanoseconds() - started) / 1e9)", "fsync": "\(configuration.fsync.rawValue)",
            ]
        )
        if restored.unexposedSeries > 0 {
            logger.notice(
                "the ledger holds series of metrics the config no longer has: kept in the ledger, not exposed",
                metadata: ["series": "\(restored.unexposedSeries)", "metrics": .array(restored.unexposedMetrics.map { .string($0) })]
            )
        }
        let writer = LedgerWriter(
            ledger: ledger, mode: configuration.fsync, interval: configuration.fsyncInterval, metrics: metrics,
            health: metrics.ledger!, logger: logger
        )
        writer.start()
        return writer
    }
}

/// The state directory cannot be used; says which flag set it.
struct StateDirectoryError: Error, CustomStringConvertible {
    var underlying: any Error
    var description: String { "--state-dir (USAGE_TRACKING_STATE_DIR): \(self.underlying)" }
}
