import Dispatch
import Glibc
import Logging
import NIOCore
import NIOPosix
import Synchronization
import UsageTrackingCore

/// The ledger's only user after startup: one thread that commits what the callbacks counted,
/// through `LedgerEngine` (SQLite, behind its journal in `always` mode, or PostgreSQL), whose
/// contract it relies on.
///
/// Contract:
/// - `always` mode: a callback is handed over with `commit` and its reply waits on the future;
///   the event loop goes on serving others. The thread takes everything handed over since its
///   last commit, from every connection and event loop, decides duplicates in arrival order,
///   writes it all in one transaction, and only then counts it in memory and completes the
///   futures: a 202 means the count is on disk, and `/metrics` never shows a count the ledger
///   does not hold. A failed commit completes them with `.unavailable` (503, not counted) and
///   gives their request ids back, so a retry counts.
/// - `interval` mode: callbacks are counted in memory and acknowledged at once, and `record`
///   adds them to a batch committed every `--fsync-interval`; a failed batch is kept (summed, so
///   it grows with distinct series and hours, not with callbacks) and retried.
/// - Outcomes other than accepted and duplicate are counted in memory by the event loop and
///   reach the ledger with the next commit, in both modes.
/// - Health: a failed commit marks the ledger failing (`/readyz` 503, `ledger_errors_total`),
///   logs an error (then at most every 10 s while it lasts); the thread retries every second,
///   with no traffic needed, and the first success clears it. While healthy it commits at least
///   every 30 s, so `ledger_last_commit_timestamp_seconds` shows it is alive.
/// - `stop` commits everything still pending, then closes the ledger.
final class LedgerWriter: Sendable {
    enum Verdict: Sendable {
        case counted, duplicate, unavailable
    }

    private struct Waiter {
        /// One `/track` callback, or a model answer's token counts.
        var callbacks: [Callback]
        /// Whether this is a `/track` callback, counted in `usage_tracking_callbacks_total`.
        var isCallback: Bool
        var digest: UInt64?
        var promise: EventLoopPromise<Verdict>
    }

    private struct Pending {
        var waiters: [Waiter] = []
        var batch: LedgerBatch
        /// The thread is (about to be) waiting on `wake`.
        var idle = false
        var stopping = false
    }

    let mode: FsyncMode
    private let interval: TimeAmount
    private let metrics: UsageMetrics
    private let health: LedgerHealth
    private let logger: Logger
    private let pending: Mutex<Pending>
    private let wake = DispatchSemaphore(value: 0)
    private let done = DispatchSemaphore(value: 0)
    private let thread = NIOThreadPool(numberOfThreads: 1)
    /// Used only by the writer thread (and by `start`'s caller before the thread runs).
    private nonisolated(unsafe) let ledger: any LedgerEngine

    static let heartbeat: Int64 = 30
    static let retryDelay: Int64 = 1

    init(ledger: any LedgerEngine, mode: FsyncMode, interval: TimeAmount, metrics: UsageMetrics, health: LedgerHealth, logger: Logger) {
        self.ledger = ledger
        self.mode = mode
        self.interval = interval
        self.metrics = metrics
        self.health = health
        self.logger = logger
        self.pending = Mutex(Pending(batch: LedgerBatch(maxRequestIDs: metrics.requestIDs?.maxIDs ?? 0)))
    }

    /// Starts the thread.
    func start() {
        self.thread.start()
        // The pool's one thread is the writer until `run` returns at `stop`.
        self.thread.submit { _ in
            self.run()
            self.done.signal()
        }
    }

    /// False until the ledger has been restored: a database not reachable at startup. Nothing is
    /// counted meanwhile, and `/metrics` is not served (it would show a reset).
    var isOpen: Bool { self.health.isOpen }

    /// `always` mode: hands a callback over; the future says what became of it.
    func commit(_ callback: Callback, digest: UInt64?, on eventLoop: EventLoop) -> EventLoopFuture<Verdict> {
        self.commit(Waiter(callbacks: [callback], isCallback: true, digest: digest, promise: eventLoop.makePromise()))
    }

    /// `always` mode: hands a model answer's token counts over as one unit.
    func commit(tokens: [Callback], digest: UInt64?, on eventLoop: EventLoop) -> EventLoopFuture<Verdict> {
        self.commit(Waiter(callbacks: tokens, isCallback: false, digest: digest, promise: eventLoop.makePromise()))
    }

    private func commit(_ waiter: Waiter) -> EventLoopFuture<Verdict> {
        let promise = waiter.promise
        let (signal, accepted) = self.pending.withLock { pending -> (Bool, Bool) in
            guard !pending.stopping else { return (false, false) }
            pending.waiters.append(waiter)
            guard pending.idle else { return (false, true) }
            pending.idle = false
            return (true, true)
        }
        if signal { self.wake.signal() }
        if !accepted { promise.succeed(.unavailable) }
        return promise.futureResult
    }

    /// `interval` mode: a callback already counted in memory, to be committed with the batch.
    func record(_ series: [SeriesHandle?], amounts: [UInt64?], digest: UInt64?, at time: Int64) {
        self.pending.withLock { pending in
            pending.batch.add(series, amounts: amounts, at: time)
            pending.batch.add(.accepted, at: time)
            if let digest { pending.batch.add(requestID: digest, seen: time) }
        }
    }

    /// `interval` mode: a model answer's token counts already counted in memory.
    func record(tokens series: [[SeriesHandle?]], amounts: [[UInt64?]], digest: UInt64?, at time: Int64) {
        self.pending.withLock { pending in
            for (series, amounts) in zip(series, amounts) { pending.batch.add(series, amounts: amounts, at: time) }
            if let digest { pending.batch.add(requestID: digest, seen: time) }
        }
    }

    /// An outcome already counted in memory, to be committed with the next batch.
    func record(_ outcome: CallbackOutcome, at time: Int64) {
        self.pending.withLock { $0.batch.add(outcome, at: time) }
    }

    /// Commits what is pending, closes the ledger and ends the thread. Call once no callback can
    /// arrive any more.
    func stop() async {
        self.pending.withLock { $0.stopping = true }
        self.wake.signal()
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async {
                self.done.wait()
                continuation.resume()
            }
        }
        try? await self.thread.shutdownGracefully()
    }

    // MARK: the thread

    private func run() {
        var carried = LedgerBatch(maxRequestIDs: self.metrics.requestIDs?.maxIDs ?? 0)
        if !self.health.isOpen {
            guard self.open(carrying: &carried) else {
                self.ledger.close()
                return
            }
        }
        var lastAttempt = Self.now()
        var lastErrorLog: Int64 = 0
        var failures = 0
        while true {
            let failing = self.health.isFailing
            let wait: Int64 = failing ? Self.retryDelay : (self.mode == .interval ? Int64(self.interval.nanoseconds / 1_000_000_000) : Self.heartbeat)
            let (waiters, fresh, stopping) = self.take(for: wait)
            let now = Self.now()
            var base = carried
            base.merge(fresh)
            // With nothing to write, commit only as the heartbeat or to find out if a failure is over.
            if waiters.isEmpty, base.isEmpty, !stopping, !failing, now - lastAttempt < Self.heartbeat { continue }
            lastAttempt = now
            var batch = base
            var verdicts: [Verdict] = []
            // The series each callback that may count goes to (none for a duplicate).
            var resolved: [[(series: [SeriesHandle?], amounts: [UInt64?])]] = []
            var claimed: [UInt64] = []
            // Callbacks counted without a request id; those with one are claims, which the
            // ledger settles (and counts as accepted or duplicate) in the commit.
            var unclaimed: UInt64 = 0
            var duplicates: UInt64 = 0
            verdicts.reserveCapacity(waiters.count)
            resolved.reserveCapacity(waiters.count)
            for waiter in waiters {
                var digest: UInt64?
                if let waiterDigest = waiter.digest, let window = self.metrics.requestIDs {
                    guard window.claim(waiterDigest, at: now) else {
                        verdicts.append(.duplicate)
                        resolved.append([])
                        if waiter.isCallback { duplicates += 1 }
                        continue
                    }
                    claimed.append(waiterDigest)
                    digest = waiterDigest
                }
                let counts = waiter.callbacks.map { (series: self.metrics.resolve($0), amounts: $0.amounts) }
                if let digest {
                    batch.claim(digest, isCallback: waiter.isCallback, series: counts.map(\.series), amounts: counts.map(\.amounts))
                } else {
                    for count in counts { batch.add(count.series, amounts: count.amounts, at: now) }
                    if waiter.isCallback { unclaimed += 1 }
                }
                resolved.append(counts)
                verdicts.append(.counted)
            }
            if unclaimed > 0 { batch.add(.accepted, count: unclaimed, at: now) }
            if duplicates > 0 { batch.add(.duplicate, count: duplicates, at: now) }
            do {
                let refused = try self.ledger.commit(batch, now: now)
                if failures > 0 {
                    self.logger.notice("ledger commits succeed again", metadata: ["failed_attempts": "\(failures)"])
                }
                failures = 0
                carried = LedgerBatch(maxRequestIDs: carried.maxRequestIDs)
                var accepted: UInt64 = 0
                for (index, waiter) in waiters.enumerated() where verdicts[index] == .counted {
                    // Counted by another replica of a shared ledger: this id is now this one's duplicate too.
                    if let digest = waiter.digest, refused.contains(digest) {
                        verdicts[index] = .duplicate
                        if waiter.isCallback { duplicates += 1 }
                        continue
                    }
                    for (series, amounts) in resolved[index] { self.metrics.add(series, amounts: amounts) }
                    if waiter.isCallback { accepted += 1 }
                }
                self.metrics.record(.accepted, count: accepted)
                self.metrics.record(.duplicate, count: duplicates)
                self.health.committed(at: now)
                Self.complete(zip(waiters, verdicts).map { ($0.promise, $1) })
            } catch {
                self.health.failed()
                failures += 1
                for digest in claimed { self.metrics.requestIDs?.release(digest) }
                // What was counted in memory already is kept for the retry; the callbacks that
                // waited on this commit are refused and not counted.
                carried = base
                if failures == 1 || now - lastErrorLog >= 10 {
                    lastErrorLog = now
                    self.logger.error(
                        "ledger commit failed; /readyz reports 503 until one succeeds",
                        metadata: [
                            "error": "\(error)", "mode": "\(self.mode.rawValue)", "refused_callbacks": "\(waiters.count)",
                            "failed_attempts": "\(failures)",
                        ]
                    )
                }
                Self.complete(waiters.map { ($0.promise, .unavailable) })
            }
            if stopping {
                if !carried.isEmpty, failures < 3 {
                    // A last chance for what shutdown would otherwise lose.
                    usleep(500_000)
                    continue
                }
                if !carried.isEmpty {
                    self.logger.critical("ledger: counts not written at shutdown", metadata: ["callbacks": "\(carried.callbacks)"])
                }
                self.ledger.close()
                return
            }
        }
    }

    /// A ledger not reachable at startup (a database server): restores it as soon as it can,
    /// retrying after 1, 2, 4 … 30 s, refusing what is handed over meanwhile and keeping the
    /// outcomes recorded (`carried`). False when stopped first.
    private func open(carrying carried: inout LedgerBatch) -> Bool {
        var delay: Int64 = 1
        var attempts = 0
        while true {
            let (waiters, fresh, stopping) = self.take(for: delay)
            Self.complete(waiters.map { ($0.promise, .unavailable) })
            carried.merge(fresh)
            if stopping {
                self.logger.warning("stopped before the ledger could be reached", metadata: ["attempts": "\(attempts)"])
                return false
            }
            attempts += 1
            let started = monotonicNanoseconds()
            do {
                let restored = try self.ledger.restore(into: self.metrics, requestIDs: self.metrics.requestIDs, now: Self.now())
                self.health.opened()
                Self.logRestored(restored, ledger: self.ledger, started: started, mode: self.mode, logger: self.logger)
                return true
            } catch {
                self.health.failed()
                self.logger.warning(
                    "ledger not reachable; callbacks are refused with 503 and /readyz reports 503 until it is",
                    metadata: ["error": "\(error)", "attempts": "\(attempts)", "retry_seconds": "\(min(delay * 2, 30))"]
                )
                delay = min(delay * 2, 30)
            }
        }
    }

    /// Logs what `restore` found.
    static func logRestored(_ restored: RestoredCounts, ledger: any LedgerEngine, started: UInt64, mode: FsyncMode, logger: Logger) {
        logger.info(
            "ledger restored",
            metadata: [
                ledger.location.key: "\(ledger.location.value)", "series": "\(restored.series)", "request_ids": "\(restored.requestIDs)",
                "seconds": "\(Double(monotonicNanoseconds() - started) / 1e9)", "fsync": "\(mode.rawValue)",
            ]
        )
        if restored.unexposedSeries > 0 {
            logger.notice(
                "the ledger holds series of metrics the config no longer has: kept in the ledger, not exposed",
                metadata: ["series": "\(restored.unexposedSeries)", "metrics": .array(restored.unexposedMetrics.map { .string($0) })]
            )
        }
    }

    /// Waits for callbacks handed over (`always` mode), for `seconds` or for `stop`, then takes
    /// what is pending: everything that arrived while the last commit was being written.
    private func take(for seconds: Int64) -> (waiters: [Waiter], batch: LedgerBatch, stopping: Bool) {
        let ready = self.pending.withLock { pending -> Bool in
            let ready = !pending.waiters.isEmpty || pending.stopping
            pending.idle = !ready
            return ready
        }
        if !ready {
            _ = self.wake.wait(timeout: .now() + .seconds(Int(seconds)))
        }
        return self.pending.withLock { pending in
            pending.idle = false
            let taken = (pending.waiters, pending.batch, pending.stopping)
            pending.waiters = []
            pending.batch = LedgerBatch(maxRequestIDs: pending.batch.maxRequestIDs)
            return taken
        }
    }

    /// Completes the futures with one task per event loop rather than one hop per callback.
    private static func complete(_ results: [(EventLoopPromise<Verdict>, Verdict)]) {
        var byLoop: [ObjectIdentifier: (EventLoop, [(EventLoopPromise<Verdict>, Verdict)])] = [:]
        for (promise, verdict) in results {
            let loop = promise.futureResult.eventLoop
            byLoop[ObjectIdentifier(loop), default: (loop, [])].1.append((promise, verdict))
        }
        for (loop, results) in byLoop.values {
            loop.execute {
                for (promise, verdict) in results { promise.succeed(verdict) }
            }
        }
    }

    static func now() -> Int64 { Int64(time(nil)) }
}
