import GRDB
import GRDBSQLite
import Glibc

import struct Foundation.Data

/// The SQLite ledger engine (`LedgerEngine`, whose contract it keeps): every counted increment
/// of every family and of `usage_tracking_callbacks_total`, in a SQLite database in the state
/// directory.
///
/// Storage contract:
/// - Files: `usage.sqlite` (with SQLite's `-wal` and `-shm` beside it) and `usage.lock`. One
///   process owns a directory: `usage.lock` is held with `flock` for the process's life (the
///   kernel drops it when the process dies, `kill -9` included) and names its holder.
/// - Durability: WAL journal, `synchronous = FULL`, so a `commit` that returns is on disk. What
///   is committed survives a crash of the process or of the machine; what was not is lost whole
///   (a batch is one transaction).
/// - Contents (README, "The ledger"): `metric` (name and label names), `series` (labels as a JSON
///   object and the running total, which is what `/metrics` exposes), `usage_hourly` (what each
///   series counted in each UTC hour, kept `retentionDays`), `request_id_block` (digests of the
///   request ids within the dedupe window, packed, one row per commit), `ledger_state` (time of the
///   last commit, last journal record held). Schema 1 kept a `request_id` row per id; opening it
///   moves them into one block, in the transaction that sets schema 2.
/// - The journal (`LedgerJournal`, written by `JournaledLedger` in `always` mode): its records
///   after the last one the database holds are read at `init` (damage refused like the
///   database's) and written in by `restore`, in either mode, before anything is read back.
/// - Startup never loses a count silently: a file that is not a SQLite database, a database that
///   fails SQLite's `quick_check`, or one written by a newer version stops the process with a
///   message naming the file, and the database and its WAL are left as they were (the checks
///   read through a read-only connection before anything opens the file for writing).
/// - Concurrency: not thread-safe; the server's writer thread is its only user after startup.
///   Readers such as `sqlite3` may read while it runs (WAL).
/// - Disk: bounded by series, series-hours within the retention, and ids within the dedupe
///   window (a block is deleted once its newest id has left the window); SQLite checkpoints the
///   WAL every 1000 pages and truncates it to 64 MiB at most. `restore` holds at most twice the
///   window's `maxIDs` ids at a time, keeping the newest.
public final class UsageLedger: LedgerEngine {
    public static let databaseName = "usage.sqlite"
    public static let lockName = "usage.lock"
    /// The schema this build writes; a database with a higher `user_version` is refused.
    public static let schemaVersion = 2

    public let path: String
    private let directory: String
    public var location: (key: String, value: String) { ("file", self.path) }
    private let queue: DatabaseQueue
    private let lock: DirectoryLock
    private let families: [CounterFamily]
    private let seriesIDs: SeriesIDs
    private let retention: Int64
    /// Set by `restore`, from the ids the database gave each family and outcome.
    private var encoder = LedgerRowsEncoder(labelNames: [], metricIDs: [], outcomesMetricID: 0, outcomeSeries: [:])
    /// Series ids that have a row in `series`; the others are inserted by the next commit.
    private var stored = IDSet()
    private var lastPrune: Int64 = 0
    /// The last journal record the database holds (0: none), and the records after it that
    /// `restore` writes in first: what a crash in `--fsync always` mode left in the journal.
    private(set) var journalSequence: UInt64
    private var journalRecords: [LedgerJournal.Record]
    /// Request ids are kept this long (the dedupe window), 0 without dedupe.
    private var requestIDWindow: Int64 = 0

    /// Takes the directory (creating it), checks what is there and opens it for writing.
    public init(directory: String, families: [CounterFamily], seriesIDs: SeriesIDs, retentionDays: Int) throws(LedgerError) {
        self.families = families
        self.seriesIDs = seriesIDs
        self.retention = Int64(retentionDays) * 86_400
        self.directory = directory
        self.path = directory.hasSuffix("/") ? directory + Self.databaseName : directory + "/" + Self.databaseName
        if mkdir(directory, 0o700) != 0, errno != EEXIST {
            throw .unusableDirectory(directory, "cannot create it: \(String(cString: strerror(errno)))")
        }
        // json_each's ->> and the README's unixepoch() need 3.38 (Debian 12 has 3.40).
        guard sqlite3_libversion_number() >= 3_038_000 else {
            throw .failed(self.path, "SQLite \(String(cString: sqlite3_libversion())) is too old; the ledger needs 3.38 or newer")
        }
        self.lock = try DirectoryLock(directory: directory, name: Self.lockName)
        // The journal's records are read before anything opens the database for writing (which
        // would checkpoint its WAL on close), so that a damaged one leaves every file as it was.
        self.journalSequence = try Self.check(self.path)
        self.journalRecords = try LedgerJournal.unfolded(in: directory, after: self.journalSequence)
        do {
            var config = Configuration()
            // The schema's REFERENCES document the tables; checking them would cost every insert.
            config.foreignKeysEnabled = false
            config.prepareDatabase { db in
                // WAL set here rather than through GRDB's `journalMode`, which also lowers
                // `synchronous` to NORMAL: a commit must be fsynced before its 202. Temporary
                // files stay in memory: the root filesystem may be read-only.
                try db.execute(sql: """
                    PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA temp_store = MEMORY;
                    PRAGMA journal_size_limit = 67108864
                    """)
            }
            self.queue = try DatabaseQueue(path: self.path, configuration: config)
            let settings = try self.queue.read { db in
                (try String.fetchOne(db, sql: "PRAGMA journal_mode"), try Int.fetchOne(db, sql: "PRAGMA synchronous"))
            }
            guard settings.0 == "wal", settings.1 == 2 else {
                throw LedgerError.failed(self.path, "SQLite did not take WAL and synchronous FULL (got \(settings))")
            }
            try self.queue.writeWithoutTransaction { db in try Self.migrate(db, path: self.path) }
        } catch {
            throw Self.failure(self.path, error)
        }
    }

    /// Puts the ledger's totals back into `metrics` and its recent request ids into `requestIDs`,
    /// before any callback arrives. `now` is wall-clock seconds.
    @discardableResult
    public func restore(into metrics: UsageMetrics, requestIDs: RequestIDWindow?, now: Int64) throws(LedgerError) -> RestoredCounts {
        self.requestIDWindow = requestIDs?.window ?? 0
        let restored = try self.restoreReadingBack(into: metrics, requestIDs: requestIDs, now: now)
        // Everything the journal held is in the database now (`JournaledLedger` makes new files).
        LedgerJournal(directory: self.directory).remove()
        return restored
    }

    private func restoreReadingBack(into metrics: UsageMetrics, requestIDs: RequestIDWindow?, now: Int64) throws(LedgerError) -> RestoredCounts {
        if let last = self.journalRecords.last {
            try self.write(self.journalRecords.map(\.rows), journalSequence: last.sequence, now: self.journalRecords.map(\.rows.now).max()!, prune: false)
            self.journalSequence = last.sequence
            self.journalRecords = []
        }
        do {
            return try self.queue.writeWithoutTransaction { db in
                var restored = RestoredCounts()
                var maxID = try Int64.fetchOne(db, sql: "SELECT max(id) FROM series") ?? 0
                // `metric.id` of each family and of `usage_tracking_callbacks_total`, and the series
                // id of each outcome.
                var metricIDs: [Int64] = []
                var outcomesMetricID: Int64 = 0
                var outcomeSeries: [CallbackOutcome: Int64] = [:]
                self.seriesIDs.advance(past: maxID)
                try db.inTransaction(.immediate) {
                    metricIDs = try self.families.map { try Self.metricID(db, name: $0.name, labels: $0.labelNames) }
                    outcomesMetricID = try Self.metricID(db, name: UsageMetrics.callbacksName, labels: ["outcome"])
                    return .commit
                }
                for (index, family) in self.families.enumerated() {
                    let reader = LabelsJSON.Reader(names: family.labelNames)
                    let rows = try Row.fetchCursor(db, sql: "SELECT id, labels, total FROM series WHERE metric_id = ?", arguments: [metricIDs[index]])
                    while let row = try rows.next() {
                        let id: Int64 = row[0]
                        let text: String = row[1]
                        let total: Int64 = row[2]
                        guard let labels = reader.decode(text) else {
                            throw LedgerError.damaged(self.path, "series \(id) of \(family.name) has labels that do not read back: \(text.prefix(200))")
                        }
                        guard family.restore(labels, count: UInt64(bitPattern: total), id: id) else {
                            throw LedgerError.damaged(self.path, "series \(id) of \(family.name) repeats the labels of another series: \(text.prefix(200))")
                        }
                        self.stored.insert(id)
                        restored.series += 1
                    }
                }
                let outcomeReader = LabelsJSON.Reader(names: ["outcome"])
                let outcomes = try Row.fetchCursor(db, sql: "SELECT id, labels, total FROM series WHERE metric_id = ?", arguments: [outcomesMetricID])
                while let row = try outcomes.next() {
                    let id: Int64 = row[0]
                    if let labels = outcomeReader.decode(row[1]), let outcome = CallbackOutcome(rawValue: labels[0]) {
                        metrics.restore(outcome, count: UInt64(bitPattern: row[2] as Int64))
                        outcomeSeries[outcome] = id
                        self.stored.insert(id)
                    }
                }
                for outcome in CallbackOutcome.allCases where outcomeSeries[outcome] == nil {
                    maxID += 1
                    self.seriesIDs.advance(past: maxID)
                    outcomeSeries[outcome] = maxID
                }
                self.encoder = LedgerRowsEncoder(
                    labelNames: self.families.map(\.labelNames), metricIDs: metricIDs, outcomesMetricID: outcomesMetricID,
                    outcomeSeries: outcomeSeries
                )
                let current = Set(metricIDs + [outcomesMetricID])
                for row in try Row.fetchAll(db, sql: "SELECT m.id, m.name, m.labels, count(s.id) FROM metric m LEFT JOIN series s ON s.metric_id = m.id GROUP BY m.id") {
                    let id: Int64 = row[0]
                    guard !current.contains(id) else { continue }
                    restored.unexposedSeries += row[3] as Int
                    restored.unexposedMetrics.append("\(row[1] as String)\(row[2] as String)")
                }
                if let requestIDs {
                    // The window keeps the newest `maxIDs`: beyond twice that, the oldest read so
                    // far are dropped, so a ledger holding more ids than that cannot make the
                    // restore hold them all.
                    let cutoff = now - requestIDs.window
                    var ids: [(digest: UInt64, seen: Int64)] = []
                    func keepNewest(_ count: Int) {
                        ids.sort { $0.seen < $1.seen }
                        if ids.count > count { ids.removeFirst(ids.count - count) }
                    }
                    let blocks = try Row.fetchCursor(db, sql: "SELECT rowid, ids FROM request_id_block WHERE last_seen > ? ORDER BY last_seen", arguments: [cutoff])
                    while let row = try blocks.next() {
                        let whole = try row.withUnsafeData(atIndex: 1) { data in
                            (data ?? Data()).withUnsafeBytes { bytes in
                                PackedRequestIDs.forEach(in: bytes) { digest, seen in if seen > cutoff { ids.append((digest, seen)) } }
                            }
                        }
                        guard whole else { throw LedgerError.damaged(self.path, "request id block \(row[0] as Int64) is not a whole number of ids") }
                        if ids.count > 2 * requestIDs.maxIDs { keepNewest(requestIDs.maxIDs) }
                    }
                    keepNewest(requestIDs.maxIDs)
                    for (digest, seen) in ids { requestIDs.restore(digest, at: seen) }
                    restored.requestIDs = ids.count
                }
                return restored
            }
        } catch let error as LedgerError {
            throw error
        } catch {
            throw Self.failure(self.path, error)
        }
    }

    /// Writes `batch` in one transaction and returns once it is on disk; on error nothing of it
    /// is written and the caller keeps it. `now` is wall-clock seconds. Refuses no claim: this
    /// process alone writes here, and its request-id window has decided.
    @discardableResult
    public func commit(_ batch: LedgerBatch, now: Int64) throws(LedgerError) -> Set<UInt64> {
        try self.commit(batch, now: now, journalSequence: nil)
        return []
    }

    /// `commit`, also recording that the journal's records up to `journalSequence` are in.
    func commit(_ batch: LedgerBatch, now: Int64, journalSequence: UInt64?) throws(LedgerError) {
        var batch = batch
        batch.settle(refused: [], at: now)
        let (rows, new) = self.encoder.rows(of: batch, known: self.stored, now: now)
        try self.write([rows], journalSequence: journalSequence, now: now, prune: now - self.lastPrune >= 60)
        for id in new { self.stored.insert(id) }
        if let journalSequence { self.journalSequence = journalSequence }
    }

    /// Series ids that have a row, and what turns batches into rows: for the journal, once restored.
    var storedIDs: IDSet { self.stored }
    var rowsEncoder: LedgerRowsEncoder { self.encoder }

    /// `prune`: deletes hours past the retention and request ids past the window (commits do, at
    /// most once a minute).
    private func write(_ batches: [LedgerRows], journalSequence: UInt64?, now: Int64, prune: Bool) throws(LedgerError) {
        do {
            try self.queue.writeWithoutTransaction { db in
                try db.inTransaction(.immediate) {
                    for rows in batches {
                        // A series is new in one record only: an id that has a row already means a
                        // journal from another history (a build that ignored it ran in between), and
                        // the replay fails rather than add to the wrong series.
                        if !rows.newSeries.isEmpty {
                            try db.cachedStatement(sql: """
                                INSERT INTO series (id, metric_id, labels, total)
                                SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3 FROM json_each(?) AS j
                                """).execute(arguments: [rows.newSeries.closed])
                        }
                        if !rows.additions.isEmpty {
                            try db.cachedStatement(sql: """
                                UPDATE series SET total = total + j.value ->> 1 FROM json_each(?) AS j WHERE series.id = j.value ->> 0
                                """).execute(arguments: [rows.additions.closed])
                        }
                        if !rows.hours.isEmpty {
                            try db.cachedStatement(sql: """
                                INSERT INTO usage_hourly (series_id, hour, amount)
                                SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2 FROM json_each(?) AS j WHERE true
                                ON CONFLICT (series_id, hour) DO UPDATE SET amount = amount + excluded.amount
                                """).execute(arguments: [rows.hours.closed])
                        }
                        if !rows.requestIDs.isEmpty {
                            try Self.insert(rows.requestIDs, db)
                        }
                    }
                    try db.cachedStatement(sql: "UPDATE ledger_state SET value = max(value, ?) WHERE key = 'last_commit'").execute(arguments: [now])
                    if let journalSequence {
                        try db.cachedStatement(sql: """
                            INSERT INTO ledger_state VALUES ('journal_sequence', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value
                            """).execute(arguments: [Int64(bitPattern: journalSequence)])
                    }
                    if prune {
                        try db.execute(sql: "DELETE FROM usage_hourly WHERE hour < ?", arguments: [LedgerBatch.hour(of: now) - self.retention])
                        try db.execute(sql: "DELETE FROM request_id_block WHERE last_seen <= ?", arguments: [now - self.requestIDWindow])
                    }
                    return .commit
                }
            }
        } catch {
            throw Self.failure(self.path, error)
        }
        if prune { self.lastPrune = now }
    }

    /// Checkpoints and truncates the WAL, so the directory holds one file at rest, and releases
    /// the directory.
    public func close() {
        _ = try? self.queue.writeWithoutTransaction { db in try db.checkpoint(.truncate) }
        try? self.queue.close()
        self.lock.release()
    }

    /// Writes a consistent copy of the ledger in `directory` to `file` (which must not exist),
    /// while the service keeps running: a read-only connection reads one snapshot of the WAL
    /// database, so nothing it commits meanwhile tears the copy. Does not take the lock.
    public static func snapshot(directory: String, to file: String) throws(LedgerError) {
        let path = directory.hasSuffix("/") ? directory + Self.databaseName : directory + "/" + Self.databaseName
        try Self.check(path)
        guard access(path, F_OK) == 0 else { throw .unusableDirectory(directory, "holds no ledger (\(Self.databaseName))") }
        // Named here: SQLite's own refusal would name the ledger, not the file asked for.
        guard access(file, F_OK) != 0 else { throw .failed(file, "already exists; the copy goes to a new file") }
        do {
            var config = Configuration()
            config.readonly = true
            let queue = try DatabaseQueue(path: path, configuration: config)
            // Outside a transaction: SQLite runs VACUUM only there.
            try queue.inDatabase { db in try db.execute(sql: "VACUUM INTO ?", arguments: [file]) }
            try queue.close()
        } catch {
            throw Self.failure(path, error)
        }
    }

    // MARK: schema

    private static func migrate(_ db: Database, path: String) throws {
        let version = try Int.fetchOne(db, sql: "PRAGMA user_version") ?? 0
        guard version <= Self.schemaVersion else {
            throw LedgerError.damaged(path, "written by a newer version (schema \(version); this build reads up to \(Self.schemaVersion))")
        }
        guard version < Self.schemaVersion else { return }
        try db.inTransaction(.immediate) {
            try Self.migrate(db, from: version)
            return .commit
        }
    }

    /// Schema 1's request ids move into blocks of this many (1 MiB each).
    static let idsPerMovedBlock = 65_536

    /// Each schema's step from the one before, so a new ledger and an old one take the same path.
    private static func migrate(_ db: Database, from version: Int) throws {
        if version < 1 {
            try db.execute(sql: """
                CREATE TABLE metric (
                    id INTEGER PRIMARY KEY,
                    name TEXT NOT NULL,
                    labels TEXT NOT NULL,               -- JSON array of label names, in order
                    UNIQUE (name, labels)
                );
                CREATE TABLE series (
                    id INTEGER PRIMARY KEY,
                    metric_id INTEGER NOT NULL REFERENCES metric (id),
                    labels TEXT NOT NULL,               -- JSON object, label name to value
                    total INTEGER NOT NULL,             -- the counter as /metrics exposes it
                    UNIQUE (metric_id, labels)
                );
                CREATE TABLE usage_hourly (
                    series_id INTEGER NOT NULL REFERENCES series (id),
                    hour INTEGER NOT NULL,              -- Unix time of the UTC hour's start
                    amount INTEGER NOT NULL,            -- counted in that hour
                    PRIMARY KEY (series_id, hour)
                ) WITHOUT ROWID;
                CREATE INDEX usage_hourly_by_hour ON usage_hourly (hour);
                CREATE TABLE request_id (
                    seen INTEGER NOT NULL,
                    digest INTEGER NOT NULL,
                    PRIMARY KEY (seen, digest)
                ) WITHOUT ROWID;
                CREATE TABLE ledger_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                INSERT INTO ledger_state VALUES ('last_commit', 0);
                PRAGMA user_version = 1;
                """)
        }
        if version < 2 {
            // Looked up only at startup, so a commit's ids need not be rows of their own: one
            // value per commit costs SQLite a tenth of the CPU of a row per id.
            try db.execute(sql: """
                CREATE TABLE request_id_block (
                    last_seen INTEGER NOT NULL,         -- Unix time of the newest id in it
                    ids BLOB NOT NULL                   -- per id: 8-byte digest (first 8 bytes of its SHA-256), Unix time seen; little-endian
                );
                """)
            var ids = PackedRequestIDs()
            let rows = try Row.fetchCursor(db, sql: "SELECT digest, seen FROM request_id ORDER BY seen")
            while let row = try rows.next() {
                ids.append(UInt64(bitPattern: row[0] as Int64), seen: row[1])
                if ids.count == Self.idsPerMovedBlock {
                    try Self.insert(ids, db)
                    ids = PackedRequestIDs()
                }
            }
            if !ids.isEmpty { try Self.insert(ids, db) }
            try db.execute(sql: "DROP TABLE request_id; PRAGMA user_version = 2")
        }
    }

    private static func insert(_ ids: PackedRequestIDs, _ db: Database) throws {
        try db.cachedStatement(sql: "INSERT INTO request_id_block (last_seen, ids) VALUES (?, ?)").execute(arguments: [ids.lastSeen, Data(ids.bytes)])
    }

    private static func metricID(_ db: Database, name: String, labels: [String]) throws -> Int64 {
        let names = JSONText.array(labels.map { .string($0) }).serialized
        if let id = try Int64.fetchOne(db, sql: "SELECT id FROM metric WHERE name = ? AND labels = ?", arguments: [name, names]) { return id }
        try db.execute(sql: "INSERT INTO metric (name, labels) VALUES (?, ?)", arguments: [name, names])
        return db.lastInsertedRowID
    }

    // MARK: checks

    /// Refuses a file that is not a database this build can continue, reading it without
    /// changing it: the header by hand, then SQLite on an immutable, read-only connection.
    /// Returns the last journal record the database holds.
    @discardableResult
    private static func check(_ path: String) throws(LedgerError) -> UInt64 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return 0 }
            throw .unusableDirectory(path, "cannot read it: \(String(cString: strerror(errno)))")
        }
        var header = [UInt8](repeating: 0, count: 16)
        let count = header.withUnsafeMutableBytes { read(fd, $0.baseAddress, 16) }
        Glibc.close(fd)
        // SQLite writes nothing until the first commit: an empty file has never held a count.
        if count == 0 { return 0 }
        guard count == 16, header == Array("SQLite format 3\0".utf8) else {
            throw .damaged(path, "not a SQLite database")
        }
        var connection: OpaquePointer?
        defer { sqlite3_close_v2(connection) }
        // Read-only. Without a WAL, also immutable: SQLite then creates no -wal or -shm beside
        // it. With one (a crash, possibly mid-checkpoint), the WAL is part of the database and is
        // read too; a read-only connection neither checkpoints nor removes it, and changes only
        // -shm, the index of the WAL that SQLite rebuilds from it.
        let hasWAL = access(path + "-wal", F_OK) == 0
        // Every byte but unreserved ASCII percent-encoded (SQLite decodes the path, `/` included).
        let uri = "file:" + HTMLText.queryComponent(path) + (hasWAL ? "?mode=ro" : "?mode=ro&immutable=1")
        guard sqlite3_open_v2(uri, &connection, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nil) == SQLITE_OK else {
            throw .damaged(path, connection.map { String(cString: sqlite3_errmsg($0)) } ?? "cannot be opened")
        }
        func single(_ sql: String) throws(LedgerError) -> String {
            var statement: OpaquePointer?
            defer { sqlite3_finalize(statement) }
            guard sqlite3_prepare_v2(connection, sql, -1, &statement, nil) == SQLITE_OK else {
                throw .damaged(path, String(cString: sqlite3_errmsg(connection)))
            }
            let step = sqlite3_step(statement)
            guard step == SQLITE_ROW else {
                throw .damaged(path, String(cString: sqlite3_errmsg(connection)))
            }
            return sqlite3_column_text(statement, 0).map { String(cString: $0) } ?? ""
        }
        let version = Int(try single("PRAGMA user_version")) ?? 0
        guard version <= Self.schemaVersion else {
            throw .damaged(path, "written by a newer version (schema \(version); this build reads up to \(Self.schemaVersion))")
        }
        let integrity = try single("PRAGMA quick_check(1)")
        guard integrity == "ok" else { throw .damaged(path, "fails SQLite's integrity check: \(integrity)") }
        guard version > 0 else { return 0 }
        return UInt64(try single("SELECT coalesce((SELECT value FROM ledger_state WHERE key = 'journal_sequence'), 0)")) ?? 0
    }

    private static func failure(_ path: String, _ error: any Error) -> LedgerError {
        if let error = error as? LedgerError { return error }
        guard let error = error as? DatabaseError else { return .failed(path, "\(error)") }
        let reason = "\(error.message ?? "\(error.resultCode)") (\(error.extendedResultCode))"
        switch error.resultCode {
        case .SQLITE_CORRUPT, .SQLITE_NOTADB: return .damaged(path, reason)
        default: return .failed(path, reason)
        }
    }
}

/// Why the ledger cannot start or cannot commit. Each names the file or directory.
public enum LedgerError: Error, CustomStringConvertible, Equatable {
    case unusableDirectory(String, String)
    case locked(String, String)
    case damaged(String, String)
    case failed(String, String)
    /// A database server that cannot be reached (or stopped answering): worth retrying.
    case unreachable(String, String)

    public var description: String {
        switch self {
        case .unusableDirectory(let path, let reason): "\(path): \(reason)"
        case .locked(let path, let holder): "\(path) is held by another process (\(holder)); one process per state directory"
        case .damaged(let path, let reason):
            "\(path): \(reason); refusing to start from zero. The files are left as they were: restore a backup, or move them aside to start a new ledger"
        case .failed(let path, let reason): "\(path): \(reason)"
        case .unreachable(let place, let reason): "\(place): not reachable: \(reason)"
        }
    }
}

/// Series ids that are stored, as bits: ids are dense from 1, so a million series take 125 KB.
struct IDSet {
    private var words: [UInt64] = []

    func contains(_ id: Int64) -> Bool {
        let index = Int(id >> 6)
        return id >= 0 && index < self.words.count && self.words[index] & (1 << UInt64(id & 63)) != 0
    }

    mutating func insert(_ id: Int64) {
        precondition(id >= 0)
        let index = Int(id >> 6)
        if index >= self.words.count { self.words += [UInt64](repeating: 0, count: index - self.words.count + 1 + self.words.count / 2) }
        self.words[index] |= 1 << UInt64(id & 63)
    }
}
