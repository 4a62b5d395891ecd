/// A ledger: where every committed count is kept so that it survives a restart. The SQLite
/// engine (`UsageLedger`) keeps one replica's counts in a file; the PostgreSQL engine
/// (`PostgresLedger`) keeps every replica's in one database. The server's writer thread
/// drives it through this and nothing else.
///
/// Contract, whatever the engine:
/// - Ordering: one caller at a time (engines need not be thread-safe). `restore` runs once,
///   before the first `commit`; commits take effect in the order they are made; nothing is
///   called after `close`.
/// - Restore: puts every series' total back into the metrics and the request ids still within
///   the dedupe window back into the window, so the first scrape after a restart shows the
///   totals from before it and a retried callback is still recognised. Series the current
///   config has no family for are counted in the result, kept, and not exposed. A ledger that
///   cannot be read whole is refused (thrown, and the server does not start): never started
///   from zero, and left as it was.
/// - Durability: a `commit` that returns has the whole batch durable: it survives a crash of
///   the process or of the machine. A batch is one transaction: all of it, or none.
/// - Request ids: the batch's claims (`LedgerBatch.claim`) are settled inside the commit's
///   transaction: a claim whose id the ledger already holds within the dedupe window is refused
///   (returned, and not counted); the others are added with their ids. A ledger only one
///   process writes refuses none (the process's own window has decided already).
/// - Refusal: a `commit` that throws leaves the ledger as it was before the call, stored rows
///   and the engine's own bookkeeping alike, so the caller may retry the same batch (merged
///   with newer counts) and nothing is counted twice.
/// - Errors name where the ledger is (`LedgerError`).
/// - `close` releases what the engine holds (files, locks, connections); what was committed
///   stays.
public protocol LedgerEngine: AnyObject {
    /// Puts the ledger's totals back into `metrics` and its recent request ids into
    /// `requestIDs`, before any callback arrives. `now` is wall-clock seconds.
    func restore(into metrics: UsageMetrics, requestIDs: RequestIDWindow?, now: Int64) throws(LedgerError) -> RestoredCounts

    /// Writes `batch` in one transaction and returns once it is durable, with the digests of
    /// the claims it refused as duplicates; on error nothing of it is written and the caller
    /// keeps it. `now` is wall-clock seconds.
    func commit(_ batch: LedgerBatch, now: Int64) throws(LedgerError) -> Set<UInt64>

    func close()

    /// Where the ledger is, for logs: ("file", its path) or ("ledger", a URL without password).
    var location: (key: String, value: String) { get }
}

/// What `restore` found.
public struct RestoredCounts: Sendable {
    public var series = 0
    public var requestIDs = 0
    /// Series of metrics (or label sets) the current config no longer has: kept in the
    /// ledger, not exposed.
    public var unexposedSeries = 0
    public var unexposedMetrics: [String] = []
}
