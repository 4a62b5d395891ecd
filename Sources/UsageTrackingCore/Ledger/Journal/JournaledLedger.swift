import Dispatch
import Glibc
import Synchronization

/// The SQLite ledger behind a journal (`LedgerJournal`): the engine of `--fsync always` with a
/// state directory. A commit appends its rows to the journal and syncs it, which is all a
/// callback waits for; a thread of its own folds what the journal holds into the database
/// (`UsageLedger`) within a second of its being appended, or at once when a journal file is half
/// full.
///
/// Contract (`LedgerEngine`'s, with what the journal adds):
/// - Durability: a commit that returns is on disk, in the journal if not yet in the database.
///   `UsageLedger` reads the journal's records that the database does not hold when it opens, and
///   its `restore` writes them in first (one transaction, recording the last one's sequence), in
///   either `--fsync` mode, so a crash at any point loses nothing acknowledged and counts nothing
///   twice; a damaged journal is refused like a damaged database, and every file left as it was.
/// - Ordering: the fold writes records in the order they were appended, merged; the database
///   records the last sequence it holds in the same transaction.
/// - Health: a fold that fails is retried every second, and until one succeeds `commit` throws
///   its error, so callbacks are refused (503) as they would be by a database that cannot
///   commit, and the journal does not grow past what the database has not refused. When both
///   files are full, or a batch is larger than a file, the commit goes straight to the database.
/// - Readers of the database see what was acknowledged up to about a second ago.
/// - `close` folds everything and removes the journal's files: at rest the directory holds the
///   database alone.
public final class JournaledLedger: LedgerEngine, @unchecked Sendable {
    private struct Pending {
        /// Committed to the journal, not yet taken by a fold.
        var batch: LedgerBatch
        /// The last record appended.
        var through: UInt64 = 0
        /// When the oldest record in `batch` was appended (monotonic nanoseconds).
        var oldest: UInt64?
        /// The last record the database holds.
        var folded: UInt64 = 0
        /// Why the last fold failed, until one succeeds.
        var failure: LedgerError?
        /// When a fold last succeeded (wall-clock seconds).
        var lastFold: Int64
        /// A commit has asked for a fold that has not started yet.
        var urged = false
        var stopping = false
    }

    /// Seconds: an idle ledger still folds this often, and a heartbeat commit fails after twice
    /// this without a successful fold.
    static let heartbeat: Int64 = 30
    /// How long a record waits to be folded at most (tests set it longer, to hold records in the
    /// journal).
    private let foldInterval: Duration

    private let ledger: UsageLedger
    /// The committer's alone (`commit`), as is `known`.
    private let journal: LedgerJournal
    /// Series whose labels are in the database or in a journal record: a record names only
    /// the others' labels.
    private var known = IDSet()
    private var encoder = LedgerRowsEncoder(labelNames: [], metricIDs: [], outcomesMetricID: 0, outcomeSeries: [:])
    private let pending: Mutex<Pending>
    /// Held by whoever writes to the database (the fold thread, or a commit that goes straight
    /// there), with what it guards: what a failed fold took from `Pending`.
    private let folding = Mutex(())
    private var carried: LedgerBatch
    private let wake = DispatchSemaphore(value: 0)
    private let done = DispatchSemaphore(value: 0)
    private var started = false

    public var location: (key: String, value: String) { self.ledger.location }

    public init(_ ledger: UsageLedger, directory: String, maxRequestIDs: Int, foldInterval: Duration = .seconds(1)) {
        self.ledger = ledger
        self.foldInterval = foldInterval
        self.journal = LedgerJournal(directory: directory)
        self.pending = Mutex(Pending(batch: LedgerBatch(maxRequestIDs: maxRequestIDs), lastFold: Int64(time(nil))))
        self.carried = LedgerBatch(maxRequestIDs: maxRequestIDs)
    }

    public func restore(into metrics: UsageMetrics, requestIDs: RequestIDWindow?, now: Int64) throws(LedgerError) -> RestoredCounts {
        let restored = try self.ledger.restore(into: metrics, requestIDs: requestIDs, now: now)
        let folded = self.ledger.journalSequence
        self.known = self.ledger.storedIDs
        self.encoder = self.ledger.rowsEncoder
        self.journal.start(after: folded)
        self.pending.withLock {
            $0.folded = folded
            $0.through = folded
        }
        // Now rather than on the first callback; until it succeeds, appends retry it and commits
        // go straight to the database.
        try? self.journal.prepare()
        self.started = true
        DispatchQueue(label: "usage-tracking.ledger-fold").async {
            self.foldLoop()
            self.done.signal()
        }
        return restored
    }

    public func commit(_ batch: LedgerBatch, now: Int64) throws(LedgerError) -> Set<UInt64> {
        var batch = batch
        batch.settle(refused: [], at: now)
        let (failure, folded) = self.pending.withLock { ($0.failure, $0.folded) }
        if let failure { throw failure }
        guard !batch.isEmpty else {
            // The writer's heartbeat: the ledger is alive only if its folds still succeed.
            let since = now - self.pending.withLock { $0.lastFold }
            guard since <= 2 * Self.heartbeat else {
                throw .failed(self.ledger.path, "the journal has not been folded into the database for \(since) s")
            }
            return []
        }
        let (rows, new) = self.encoder.rows(of: batch, known: self.known, now: now)
        let appended: UInt64?
        do {
            appended = try self.journal.append(rows, folded: folded)
        } catch {
            // The record may still be read back after a crash: the database records its sequence
            // as held (its counts are not in it: the caller refuses them), so a replay skips it.
            self.pending.withLock { $0.through = error.sequence }
            try? self.fold(adding: nil, now: now)
            throw error.error
        }
        guard let sequence = appended else {
            try self.fold(adding: batch, now: now)
            for id in new { self.known.insert(id) }
            return []
        }
        for id in new { self.known.insert(id) }
        let urge = self.pending.withLock { pending -> Bool in
            pending.batch.merge(batch)
            pending.through = sequence
            if pending.oldest == nil { pending.oldest = monotonicNanoseconds() }
            // Once per fold, not on every append while it runs.
            guard self.journal.used > LedgerJournal.capacity / 2, !pending.urged else { return false }
            pending.urged = true
            return true
        }
        if urge { self.wake.signal() }
        return []
    }

    public func close() {
        guard self.started else {
            // Never restored: the journal may hold records the database does not; leave them.
            self.journal.close()
            self.ledger.close()
            return
        }
        self.pending.withLock { $0.stopping = true }
        self.wake.signal()
        self.done.wait()
        self.started = false
        let emptied: Bool
        do {
            try self.fold(adding: nil, now: Int64(time(nil)))
            emptied = true
        } catch {
            // The journal keeps what the database could not take; the next start replays it.
            emptied = false
        }
        if emptied { self.journal.remove() } else { self.journal.close() }
        self.ledger.close()
    }

    // MARK: the fold

    /// Folds once the oldest record not yet taken is `foldInterval` old, or at once when a
    /// commit finds a journal file half full; with nothing pending it still wakes every interval,
    /// to retry a failed fold and for the heartbeat.
    private func foldLoop() {
        while true {
            let oldest = self.pending.withLock { $0.oldest }
            let interval = UInt64(self.foldInterval / .nanoseconds(1))
            let now = monotonicNanoseconds()
            let wait = oldest.map { $0 + interval > now ? $0 + interval - now : 0 } ?? interval
            let signaled = self.wake.wait(timeout: .now() + .nanoseconds(Int(min(wait, interval)))) == .success
            let (stopping, due) = self.pending.withLock { ($0.stopping, $0.oldest.map { $0 + interval <= monotonicNanoseconds() } ?? true) }
            if stopping { return }
            if signaled || due { try? self.fold(adding: nil, now: Int64(time(nil)), unlessIdle: true) }
        }
    }

    /// Writes into the database what the journal holds (and `batch`, not journaled, when given),
    /// in one transaction. `unlessIdle`: nothing to write and no heartbeat due is no commit.
    private func fold(adding batch: LedgerBatch?, now: Int64, unlessIdle: Bool = false) throws(LedgerError) {
        let result = self.folding.withLock { _ in self.foldHoldingLock(adding: batch, now: now, unlessIdle: unlessIdle) }
        try result.get()
    }

    private func foldHoldingLock(adding batch: LedgerBatch?, now: Int64, unlessIdle: Bool) -> Result<Void, LedgerError> {
        let (taken, through, failing, lastFold) = self.pending.withLock { pending in
            let taken = (pending.batch, pending.through, pending.failure != nil, pending.lastFold)
            pending.batch = LedgerBatch(maxRequestIDs: pending.batch.maxRequestIDs)
            pending.oldest = nil
            pending.urged = false
            return taken
        }
        var merged = self.carried
        merged.merge(taken)
        if unlessIdle, merged.isEmpty, batch == nil, !failing, now - lastFold < Self.heartbeat { return .success(()) }
        var written = merged
        if let batch { written.merge(batch) }
        do {
            try self.ledger.commit(written, now: now, journalSequence: through)
        } catch {
            self.carried = merged
            self.pending.withLock { $0.failure = error }
            return .failure(error)
        }
        self.carried = LedgerBatch(maxRequestIDs: merged.maxRequestIDs)
        self.pending.withLock {
            $0.folded = through
            $0.failure = nil
            $0.lastFold = now
        }
        return .success(())
    }
}
