import Dispatch
import Logging
import NIOCore
import PostgresNIO
import Synchronization

/// The PostgreSQL ledger engine (`LedgerEngine`, whose contract it keeps): every replica of the
/// service writes its counts into one database, so a month's usage per user is one query
/// across all of them, and a request id counts once whichever replica it reaches.
///
/// Storage contract:
/// - Tables (README, "One ledger for many replicas"): `usage_tracking_schema` (the version),
///   `metric` (name and label names, shared), `replica` (one row per `--instance`: commits so
///   far and the last one's time), `series` (per replica: labels as JSON text, the running
///   total `/metrics` exposes, and the `user` label on its own for lookups), `usage_hourly`
///   (per replica, series and UTC hour), `request_id` (digests within the dedupe window, shared).
/// - Replicas: each restores only its own series (Prometheus sums over `instance`), and every
///   query that sums usage reads all of them. Two replicas with the same `--instance` would
///   restore each other's totals, so a replica's connection holds an advisory lock on its name
///   for as long as it lives: a second one with the name stops at startup, and a replica that
///   meets the lock on reconnecting refuses commits until it is free. The server is asked to
///   probe a silent peer after 10 s, so a replica whose host vanished usually frees its name
///   within about 30 s. A session lock needs a connection of its own: PgBouncer in transaction or
///   statement mode would hand it to other clients.
/// - Exactly once across replicas: a claim's request id is inserted in the commit's own
///   transaction; an id already there within the window is refused (another replica counted
///   it), and its counts are not written. Two replicas inserting the same id at once are
///   ordered by the id's unique index: the second waits for the first's commit and refuses.
///   Ids are inserted in ascending order, so two batches never wait on each other in a cycle.
/// - Durability: a commit returns once PostgreSQL has committed (its `synchronous_commit`
///   decides what that means on the server; the default waits for the WAL flush).
/// - Bounds: each statement runs under `statement_timeout` (`commitTimeout`), and the whole
///   commit under a client-side timeout as well, so a stalled server turns into a refused
///   commit (503) rather than callbacks waiting without end.
/// - In doubt: a commit whose connection broke after COMMIT was sent may have landed. The
///   replica's commit counter tells at the next commit; a batch that landed although it was
///   reported failed is logged (its callbacks were answered 503 but are in the ledger; this
///   replica's `/metrics` shows them after its next restart).
/// - Schema: versioned in `usage_tracking_schema`, created under an advisory lock so replicas
///   starting together do not race; a newer version is refused and left untouched.
/// - Concurrency: one thread at a time (the server's writer), over one connection of its own.
public final class PostgresLedger: LedgerEngine {
    /// The schema this build writes; a database with a higher version is refused.
    public static let schemaVersion = 1
    /// The longest a statement of a commit may run (server side) before the commit is refused.
    public static let commitTimeout: Duration = .seconds(2)
    /// `commitTimeout` as the session's `statement_timeout`, a literal PostgreSQL reads.
    private static let statementTimeout = "'\(commitTimeout.components.seconds * 1000)ms'"

    public let address: PostgresAddress
    public let instance: String
    public var location: (key: String, value: String) { ("ledger", "\(self.address)") }
    private let password: String
    private let families: [CounterFamily]
    private let seriesIDs: SeriesIDs
    private let retention: Int64
    private let logger: Logger
    private var connection: PostgresConnection?
    private var metricIDs: [Int32] = []
    private var outcomesMetricID: Int32 = 0
    private var outcomeSeries: [CallbackOutcome: Int64] = [:]
    /// The index of each family's `user` label, nil where it has none.
    private let userLabels: [Int?]
    private var stored = IDSet()
    private var lastPrune: Int64 = 0
    private var requestIDWindow: Int64 = 0
    /// This replica's commit counter as its last successful commit left it.
    private var commits: Int64 = 0
    /// Commits reported failed since the last success, for the in-doubt check.
    private var failedCommits = 0

    public init(
        address: PostgresAddress, password: String, instance: String, families: [CounterFamily], seriesIDs: SeriesIDs,
        retentionDays: Int, logger: Logger
    ) {
        self.address = address
        self.password = password
        self.instance = instance
        self.families = families
        self.seriesIDs = seriesIDs
        self.retention = Int64(retentionDays) * 86_400
        self.logger = logger
        self.userLabels = families.map { $0.labelNames.firstIndex(of: "user") }
    }

    // MARK: LedgerEngine

    public func restore(into metrics: UsageMetrics, requestIDs: RequestIDWindow?, now: Int64) throws(LedgerError) -> RestoredCounts {
        try self.restore(into: metrics, requestIDs: requestIDs, now: now, deadline: .seconds(300))
    }

    /// `restore` within `deadline` (startup tries briefly, then leaves it to the writer).
    public func restore(into metrics: UsageMetrics, requestIDs: RequestIDWindow?, now: Int64, deadline: Duration) throws(LedgerError) -> RestoredCounts {
        self.requestIDWindow = requestIDs?.window ?? 0
        let connection = try self.connect()
        let instance = self.instance
        let families = self.families
        let seriesIDs = self.seriesIDs
        let place = "\(self.address)"
        let logger = self.logger
        let window = requestIDs?.window
        let timeout = Self.statementTimeout
        // Nothing read is applied until all of it has been: a restore cut short (the connection
        // lost, the deadline passed) leaves the metrics as they were, so the next try starts clean.
        let result = try self.run(timeout: deadline) { () async throws -> RestoreResult in
            // Reading a million series takes longer than a commit may; waiting for another
            // replica's schema lock does not.
            try await connection.query("SET statement_timeout = 0", logger: logger)
            try await connection.query("SET lock_timeout = '10s'", logger: logger)
            try await Self.migrate(connection, place: place, logger: logger)
            var result = RestoreResult()
            for family in families {
                result.metricIDs.append(try await Self.metricID(connection, name: family.name, labels: family.labelNames, logger: logger))
            }
            result.outcomesMetricID = try await Self.metricID(connection, name: UsageMetrics.callbacksName, labels: ["outcome"], logger: logger)
            try await connection.query("INSERT INTO replica (instance) VALUES (\(instance)) ON CONFLICT DO NOTHING", logger: logger)
            for try await commits in try await connection.query("SELECT commits FROM replica WHERE instance = \(instance)", logger: logger).decode(Int64.self) {
                result.commits = commits
            }
            var maxID: Int64 = 0
            for try await id in try await connection.query("SELECT coalesce(max(id), 0)::int8 FROM series WHERE instance = \(instance)", logger: logger).decode(Int64.self) {
                maxID = id
            }
            for (index, family) in families.enumerated() {
                let reader = LabelsJSON.Reader(names: family.labelNames)
                let rows = try await connection.query(
                    "SELECT id, labels, total FROM series WHERE instance = \(instance) AND metric_id = \(result.metricIDs[index])", logger: logger
                )
                for try await (id, text, total) in rows.decode((Int64, String, Int64).self) {
                    guard let labels = reader.decode(text) else {
                        throw LedgerError.damaged(place, "series \(id) of \(family.name) has labels that do not read back: \(text.prefix(200))")
                    }
                    result.series.append((index, labels, UInt64(bitPattern: total), id, text))
                    result.stored.append(id)
                    result.counts.series += 1
                }
            }
            let outcomeReader = LabelsJSON.Reader(names: ["outcome"])
            let outcomes = try await connection.query(
                "SELECT id, labels, total FROM series WHERE instance = \(instance) AND metric_id = \(result.outcomesMetricID)", logger: logger
            )
            for try await (id, text, total) in outcomes.decode((Int64, String, Int64).self) {
                if let labels = outcomeReader.decode(text), let outcome = CallbackOutcome(rawValue: labels[0]) {
                    result.outcomeTotals.append((outcome, UInt64(bitPattern: total)))
                    result.outcomeSeries[outcome] = id
                    result.stored.append(id)
                }
            }
            for outcome in CallbackOutcome.allCases where result.outcomeSeries[outcome] == nil {
                maxID += 1
                result.outcomeSeries[outcome] = maxID
            }
            result.maxID = maxID
            let current = Set(result.metricIDs + [result.outcomesMetricID])
            let others = try await connection.query(
                """
                SELECT m.id, m.name, m.labels, count(*) FROM metric m JOIN series s ON s.metric_id = m.id
                WHERE s.instance = \(instance) GROUP BY m.id
                """, logger: logger
            )
            for try await (id, name, labels, count) in others.decode((Int32, String, String, Int64).self) where !current.contains(id) {
                result.counts.unexposedSeries += Int(count)
                result.counts.unexposedMetrics.append(name + labels)
            }
            if let window {
                let ids = try await connection.query("SELECT digest, seen FROM request_id WHERE seen > \(now - window) ORDER BY seen", logger: logger)
                for try await (digest, seen) in ids.decode((Int64, Int64).self) {
                    result.requestIDs.append((UInt64(bitPattern: digest), seen))
                }
            }
            try await connection.query(PostgresQuery(unsafeSQL: "SET statement_timeout = \(timeout)"), logger: logger)
            return result
        }
        for (family, labels, total, id, text) in result.series {
            guard families[family].restore(labels, count: total, id: id) else {
                throw .damaged(place, "series \(id) of \(families[family].name) repeats the labels of another series: \(text.prefix(200))")
            }
        }
        for (outcome, total) in result.outcomeTotals { metrics.restore(outcome, count: total) }
        for (digest, seen) in result.requestIDs { requestIDs?.restore(digest, at: seen) }
        var counts = result.counts
        counts.requestIDs = result.requestIDs.count
        seriesIDs.advance(past: result.maxID)
        self.metricIDs = result.metricIDs
        self.outcomesMetricID = result.outcomesMetricID
        self.outcomeSeries = result.outcomeSeries
        self.commits = result.commits
        self.stored = IDSet()
        for id in result.stored { self.stored.insert(id) }
        return counts
    }

    public func commit(_ batch: LedgerBatch, now: Int64) throws(LedgerError) -> Set<UInt64> {
        let connection = try self.connect()
        let rows = self.rows(of: batch)
        let instance = self.instance
        let logger = self.logger
        let expired = now - self.requestIDWindow
        let prune = now - self.lastPrune >= 60
        let retentionCut = LedgerBatch.hour(of: now) - self.retention
        let outcomeSeries = self.outcomeSeries
        let outcomesMetricID = self.outcomesMetricID
        let metricIDs = self.metricIDs
        let stored = self.stored
        let reloadStored = self.failedCommits > 0
        let result: CommitResult
        do {
            // Past every statement's own bound: the client giving up first is what leaves a
            // commit in doubt.
            result = try self.run(timeout: Self.commitTimeout * 5) { () async throws -> CommitResult in
                try await connection.query("BEGIN", logger: logger)
                // A batch far larger than a commit's usual few rows (a backlog kept through an
                // outage in interval mode) may take longer than one statement usually may.
                if batch.rowCount > 10_000 {
                    try await connection.query("SET LOCAL statement_timeout = '60s'", logger: logger)
                }
                // After a failure this replica's series may be stored already (a commit in doubt
                // that landed): read which are, rather than insert them twice.
                var stored = stored
                if reloadStored {
                    stored = IDSet()
                    for try await id in try await connection.query("SELECT id FROM series WHERE instance = \(instance)", logger: logger).decode(Int64.self) {
                        stored.insert(id)
                    }
                }
                do {
                    var batch = batch
                    var refused = Set<UInt64>()
                    let digests = batch.claimedDigests.map { Int64(bitPattern: $0) }.sorted()
                    if !digests.isEmpty {
                        // New ids, and ids whose last count fell out of the window, are this batch's.
                        let claimed = try await connection.execute(Claims(digests: digests, now: now, expired: expired), logger: logger)
                        var won = Set<UInt64>()
                        for try await digest in claimed { won.insert(UInt64(bitPattern: digest)) }
                        refused = Set(digests.map { UInt64(bitPattern: $0) }).subtracting(won)
                    }
                    batch.settle(refused: refused, at: now)
                    // The ids above are already in; only the ones recorded in interval mode remain.
                    let plain = Self.plainRequestIDs(batch, excluding: Set(digests))
                    let rows = Self.rows(
                        of: batch, stored: stored, metricIDs: metricIDs, outcomeSeries: outcomeSeries, outcomesMetricID: outcomesMetricID, base: rows
                    )
                    var commits: Int64 = 0
                    let counter = try await connection.execute(Writes(instance: instance, rows: rows, plain: plain, now: now), logger: logger)
                    for try await value in counter { commits = value }
                    try await connection.query("COMMIT", logger: logger)
                    return CommitResult(refused: refused, commits: commits, inserted: rows.newIDs, stored: reloadStored ? stored : nil)
                } catch {
                    _ = try? await connection.query("ROLLBACK", logger: logger)
                    throw error
                }
            }
        } catch {
            self.failedCommits += 1
            throw error
        }
        if result.commits > self.commits + 1 {
            self.logger.critical(
                "a ledger commit reported as failed had been written: its callbacks were answered 503 but are in the ledger; this replica's /metrics shows them after its next restart",
                metadata: ["commits_landed": "\(result.commits - self.commits - 1)", "failed_commits": "\(self.failedCommits)"]
            )
        }
        self.failedCommits = 0
        self.commits = result.commits
        if let reloaded = result.stored { self.stored = reloaded }
        for id in result.inserted { self.stored.insert(id) }
        if prune {
            self.lastPrune = now
            self.prune(connection, retentionCut: retentionCut, expired: self.requestIDWindow > 0 ? expired : nil)
        }
        return result.refused
    }

    /// Deletes hours past the retention and request ids past the window, a bounded slice at a
    /// time and outside the commit: a large backlog of deletions (the retention just lowered)
    /// must never make commits fail. Errors are logged; the next minute tries again.
    private func prune(_ connection: PostgresConnection, retentionCut: Int64, expired: Int64?) {
        let logger = self.logger
        do {
            _ = try self.run(timeout: .seconds(10)) { () async throws -> Void in
                for _ in 0..<10 {
                    var deleted: Int64 = 0
                    for try await count in try await connection.query(
                        """
                        WITH gone AS (DELETE FROM usage_hourly WHERE ctid IN (
                            SELECT ctid FROM usage_hourly WHERE hour < to_timestamp(\(retentionCut)) LIMIT 10000) RETURNING 1)
                        SELECT count(*)::int8 FROM gone
                        """, logger: logger
                    ).decode(Int64.self) { deleted = count }
                    if deleted < 10_000 { break }
                }
                // Without a window (no dedupe on this replica) another replica's ids are not ours to judge.
                if let expired {
                    try await connection.query("DELETE FROM request_id WHERE seen <= \(expired)", logger: logger)
                }
            }
        } catch {
            logger.warning("ledger pruning failed; it is tried again in a minute", metadata: ["error": "\(error)"])
        }
    }

    public func close() {
        guard let connection = self.connection else { return }
        self.connection = nil
        _ = try? self.run(timeout: .seconds(3)) { try await connection.close() }
    }

    // MARK: connecting

    /// The writer's connection, opened anew after a failure.
    private func connect() throws(LedgerError) -> PostgresConnection {
        if let connection = self.connection, !connection.isClosed { return connection }
        self.connection = nil
        let configuration: PostgresConnection.Configuration
        do {
            configuration = try self.address.connectionConfiguration(password: self.password)
        } catch {
            throw .failed("\(self.address)", "TLS: \(error)")
        }
        let logger = self.logger
        let timeout = Self.statementTimeout
        let (place, instance) = ("\(self.address)", self.instance)
        let connection = try self.run(timeout: .seconds(5), abandoned: { connection in Task { try? await connection.close() } }) {
            let connection = try await PostgresConnection.connect(configuration: configuration, id: 1, logger: logger)
            try await connection.query(PostgresQuery(unsafeSQL: "SET statement_timeout = \(timeout)"), logger: logger)
            let lock = "usage-tracking instance \(instance)"
            let rows = try await connection.query(
                """
                SELECT set_config('tcp_keepalives_idle', '10', false), set_config('tcp_keepalives_interval', '5', false),
                    set_config('tcp_keepalives_count', '3', false), pg_try_advisory_lock(7372417, hashtext(\(lock)))
                """,
                logger: logger
            )
            var held = false
            for try await (_, _, _, locked) in rows.decode((String, String, String, Bool).self) { held = locked }
            guard held else {
                try? await connection.close()
                throw LedgerError.failed(
                    place, "--instance \(instance) is in use by another replica's connection; each replica needs a name of its own (the pod name)"
                )
            }
            return connection
        }
        self.connection = connection
        return connection
    }

    /// Runs `work` on the concurrency pool and waits for it here, on the writer's own thread
    /// (never an event loop), at most `timeout`; errors become `LedgerError`s naming the ledger.
    /// `abandoned` gets a result that arrives after the deadline (a connection to close).
    private func run<Result: Sendable>(
        timeout: Duration, abandoned: (@Sendable (Result) -> Void)? = nil, _ work: @escaping @Sendable () async throws -> Result
    ) throws(LedgerError) -> Result {
        // The result, or `.late` once the caller has stopped waiting.
        let outcome = Mutex<(result: Swift.Result<Result, any Error>?, late: Bool)>((nil, false))
        let done = DispatchSemaphore(value: 0)
        let task = Task {
            let result: Swift.Result<Result, any Error>
            do {
                result = .success(try await work())
            } catch {
                result = .failure(error)
            }
            let late = outcome.withLock { state in
                state.result = result
                return state.late
            }
            if late, case .success(let value) = result { abandoned?(value) }
            done.signal()
        }
        let nanoseconds = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
        let answered = done.wait(timeout: .now() + .nanoseconds(Int(nanoseconds))) == .success
        let finished = outcome.withLock { state -> Swift.Result<Result, any Error>? in
            if !answered { state.late = true }
            return state.result
        }
        guard answered || finished != nil else {
            task.cancel()
            // The connection is in an unknown state: the next call opens another.
            if let connection = self.connection { Task { try? await connection.close() } }
            self.connection = nil
            throw .unreachable("\(self.address)", "no answer within \(timeout.components.seconds) s")
        }
        switch finished! {
        case .success(let value): return value
        case .failure(let error):
            if let connection = self.connection, connection.isClosed { self.connection = nil }
            throw Self.failure("\(self.address)", error, user: self.address.user, database: self.address.database)
        }
    }

    /// Whether the server can be reached at all is the only thing worth waiting for; a refused
    /// password or a missing database is not going to change by itself.
    static func failure(_ place: String, _ error: any Error, user: String, database: String) -> LedgerError {
        if let error = error as? LedgerError { return error }
        guard let error = error as? PSQLError else { return .unreachable(place, "\(error)") }
        if error.code == .server, let state = error.serverInfo?[.sqlState] {
            let message = error.serverInfo?[.message] ?? "error \(state)"
            switch state {
            case "28P01", "28000": return .failed(place, "the server refused user \(user): \(message) (check --ledger-password-file)")
            case "3D000": return .failed(place, "database \(database) does not exist on the server: \(message)")
            case "57P01", "57P02", "57P03", "53300": return .unreachable(place, message)
            default: return .failed(place, "\(message) (SQLSTATE \(state))")
            }
        }
        switch error.code {
        case .authMechanismRequiresPassword: return .failed(place, "the server asks for a password and none was given (--ledger-password-file)")
        case .unsupportedAuthMechanism, .saslError: return .failed(place, "the server's authentication cannot be used: \(error.code)")
        default:
            let underlying = error.underlying.map { "\($0)" } ?? "\(error.code)"
            return .unreachable(place, underlying)
        }
    }

    // MARK: schema

    private static func migrate(_ connection: PostgresConnection, place: String, logger: Logger) async throws {
        try await connection.query("BEGIN", logger: logger)
        do {
            // One replica at a time creates or checks the schema (the key is arbitrary, fixed).
            try await connection.query("SELECT pg_advisory_xact_lock(7372417463)", logger: logger)
            var version = 0
            for try await exists in try await connection.query("SELECT to_regclass('usage_tracking_schema') IS NOT NULL", logger: logger).decode(Bool.self) where exists {
                for try await found in try await connection.query("SELECT max(version) FROM usage_tracking_schema", logger: logger).decode(Int32?.self) {
                    version = Int(found ?? 0)
                }
            }
            guard version <= Self.schemaVersion else {
                throw LedgerError.failed(
                    place, "written by a newer version (schema \(version); this build reads up to \(Self.schemaVersion)); left as it is"
                )
            }
            if version < Self.schemaVersion {
                // One statement per query: the extended protocol takes no lists of statements.
                for statement in Self.schema.split(separator: ";\n") {
                    try await connection.query(PostgresQuery(unsafeSQL: String(statement)), logger: logger)
                }
                logger.notice("ledger schema created", metadata: ["ledger": "\(place)", "schema": "\(Self.schemaVersion)"])
            }
            try await connection.query("COMMIT", logger: logger)
        } catch {
            _ = try? await connection.query("ROLLBACK", logger: logger)
            throw error
        }
    }

    /// Version 1 of the schema.
    private static let schema = """
                    CREATE TABLE usage_tracking_schema (version integer NOT NULL);
                    INSERT INTO usage_tracking_schema VALUES (1);
                    CREATE TABLE metric (
                        id serial PRIMARY KEY,
                        name text NOT NULL,
                        labels text NOT NULL,               -- JSON array of label names, in order
                        UNIQUE (name, labels)
                    );
                    CREATE TABLE replica (
                        instance text PRIMARY KEY,          -- --instance (the pod name)
                        commits bigint NOT NULL DEFAULT 0,
                        last_commit timestamptz
                    );
                    CREATE TABLE series (
                        instance text NOT NULL REFERENCES replica,
                        id bigint NOT NULL,                 -- unique within the replica
                        metric_id integer NOT NULL REFERENCES metric,
                        labels text NOT NULL,               -- JSON object, label name to value
                        user_label text,                    -- the `user` label's value, for lookups
                        total bigint NOT NULL,              -- the counter as /metrics exposes it
                        PRIMARY KEY (instance, id)
                    );
                    -- By digest: labels can be longer than a btree entry may be.
                    CREATE UNIQUE INDEX series_labels ON series (instance, metric_id, md5(labels));
                    CREATE INDEX series_by_user ON series (user_label, metric_id);
                    CREATE TABLE usage_hourly (
                        instance text NOT NULL,
                        series_id bigint NOT NULL,
                        hour timestamptz NOT NULL,          -- the UTC hour's start
                        amount bigint NOT NULL,             -- counted in that hour
                        PRIMARY KEY (instance, series_id, hour)
                    );
                    CREATE INDEX usage_hourly_by_hour ON usage_hourly (hour);
                    CREATE TABLE request_id (
                        digest bigint PRIMARY KEY,          -- first 8 bytes of the id's SHA-256
                        seen bigint NOT NULL                -- Unix time it was counted
                    );
                    CREATE INDEX request_id_by_seen ON request_id (seen);
        """

    private static func metricID(_ connection: PostgresConnection, name: String, labels: [String], logger: Logger) async throws -> Int32 {
        let names = JSONText.array(labels.map { .string($0) }).serialized
        try await connection.query("INSERT INTO metric (name, labels) VALUES (\(name), \(names)) ON CONFLICT DO NOTHING", logger: logger)
        for try await id in try await connection.query("SELECT id FROM metric WHERE name = \(name) AND labels = \(names)", logger: logger).decode(Int32.self) {
            return id
        }
        throw LedgerError.failed("metric", "\(name) has no row after its insert")
    }

    // MARK: rows

    /// A settled batch as the column arrays the statements bind.
    struct Rows: Sendable {
        var newIDs: [Int64] = [], newMetrics: [Int32] = [], newLabels: [String] = [], newUsers: [String] = [], newTotals: [Int64] = []
        var addIDs: [Int64] = [], addAmounts: [Int64] = []
        var hourIDs: [Int64] = [], hours: [Int64] = [], hourAmounts: [Int64] = []
        /// Labels text and user value per family series id, computed before the transaction.
        var labels: [Int64: (text: String, user: String)] = [:]
    }

    /// The labels of every series the batch may insert, encoded once outside the transaction.
    private func rows(of batch: LedgerBatch) -> Rows {
        var rows = Rows()
        func note(_ family: Int, _ series: SeriesHandle) {
            guard !self.stored.contains(series.id), rows.labels[series.id] == nil else { return }
            let values = series.labels
            let user = self.userLabels[family].map { values[$0] } ?? ""
            rows.labels[series.id] = (LabelsJSON.encode(values, names: self.families[family].labelNames), user.utf8.contains(0) ? "" : user)
        }
        for (_, total) in batch.totals { note(total.family, total.series) }
        for claim in batch.claims {
            for count in claim.counts { note(count.family, count.series) }
        }
        return rows
    }

    private static func rows(
        of batch: LedgerBatch, stored: IDSet, metricIDs: [Int32], outcomeSeries: [CallbackOutcome: Int64], outcomesMetricID: Int32, base: Rows
    ) -> Rows {
        var rows = base
        func add(_ amount: UInt64, to id: Int64, metric: Int32, labels: @autoclosure () -> (text: String, user: String)) {
            if stored.contains(id) {
                rows.addIDs.append(id)
                rows.addAmounts.append(Int64(bitPattern: amount))
            } else {
                let (text, user) = labels()
                rows.newIDs.append(id)
                rows.newMetrics.append(metric)
                rows.newLabels.append(text)
                rows.newUsers.append(user)
                rows.newTotals.append(Int64(bitPattern: amount))
            }
        }
        for (id, total) in batch.totals {
            add(total.amount, to: id, metric: metricIDs[total.family], labels: base.labels[id]!)
        }
        for (key, amount) in batch.hourly {
            rows.hourIDs.append(key.id)
            rows.hours.append(key.hour)
            rows.hourAmounts.append(Int64(bitPattern: amount))
        }
        var outcomeTotals: [CallbackOutcome: UInt64] = [:]
        for (key, count) in batch.outcomes {
            outcomeTotals[key.outcome, default: 0] &+= count
            rows.hourIDs.append(outcomeSeries[key.outcome]!)
            rows.hours.append(key.hour)
            rows.hourAmounts.append(Int64(bitPattern: count))
        }
        for (outcome, count) in outcomeTotals {
            add(count, to: outcomeSeries[outcome]!, metric: outcomesMetricID, labels: (LabelsJSON.encode([outcome.rawValue], names: ["outcome"]), ""))
        }
        return rows
    }

    private static func plainRequestIDs(_ batch: LedgerBatch, excluding claimed: Set<Int64>) -> (digests: [Int64], seen: [Int64]) {
        var latest: [Int64: Int64] = [:]
        for (digest, seen) in batch.requestIDs {
            let key = Int64(bitPattern: digest)
            guard !claimed.contains(key) else { continue }
            latest[key] = max(latest[key] ?? seen, seen)
        }
        return (Array(latest.keys), Array(latest.values))
    }
}

/// The claims' request ids: new ids, and ids whose last count fell out of the window, are this
/// batch's (returned); the others were counted within the window, here or by another replica.
/// Prepared once per connection, as `Writes` is: each commit would otherwise plan them anew.
private struct Claims: PostgresPreparedStatement {
    static let sql = """
        INSERT INTO request_id (digest, seen) SELECT d, $2 FROM unnest($1::int8[]) AS d ORDER BY d
        ON CONFLICT (digest) DO UPDATE SET seen = excluded.seen WHERE request_id.seen <= $3
        RETURNING digest
        """
    typealias Row = Int64
    var digests: [Int64]
    var now: Int64
    var expired: Int64

    func makeBindings() throws -> PostgresBindings {
        var bindings = PostgresBindings(capacity: 3)
        bindings.append(self.digests)
        bindings.append(self.now)
        bindings.append(self.expired)
        return bindings
    }

    func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Int64.self) }
}

/// Everything a commit writes besides the claims, in one statement (PostgreSQL runs each part
/// to completion): a round trip per table would cost more than the writes themselves. Returns
/// the replica's commit counter.
private struct Writes: PostgresPreparedStatement {
    static let sql = """
        WITH new_series AS (
            INSERT INTO series (instance, id, metric_id, labels, user_label, total)
            SELECT $1, n.id, n.metric_id, n.labels, nullif(n.user_label, ''), n.total
            FROM unnest($2::int8[], $3::int4[], $4::text[], $5::text[], $6::int8[]) AS n (id, metric_id, labels, user_label, total)
            ON CONFLICT (instance, id) DO UPDATE SET total = least(series.total::numeric + excluded.total, 9223372036854775807)::int8
        ), added AS (
            -- Saturating at bigint's top, where an overflow would fail every commit after it.
            UPDATE series SET total = least(series.total::numeric + a.amount, 9223372036854775807)::int8
            FROM unnest($7::int8[], $8::int8[]) AS a (id, amount)
            WHERE series.instance = $1 AND series.id = a.id
        ), hours AS (
            INSERT INTO usage_hourly (instance, series_id, hour, amount)
            SELECT $1, h.id, to_timestamp(h.hour), h.amount
            FROM unnest($9::int8[], $10::int8[], $11::int8[]) AS h (id, hour, amount)
            ON CONFLICT (instance, series_id, hour) DO UPDATE SET amount = least(usage_hourly.amount::numeric + excluded.amount, 9223372036854775807)::int8
        ), ids AS (
            INSERT INTO request_id (digest, seen) SELECT * FROM unnest($12::int8[], $13::int8[]) ORDER BY 1
            ON CONFLICT (digest) DO UPDATE SET seen = greatest(request_id.seen, excluded.seen)
        )
        UPDATE replica SET commits = commits + 1, last_commit = to_timestamp($14) WHERE instance = $1 RETURNING commits
        """
    typealias Row = Int64
    var instance: String
    var rows: PostgresLedger.Rows
    var plain: (digests: [Int64], seen: [Int64])
    var now: Int64

    func makeBindings() throws -> PostgresBindings {
        var bindings = PostgresBindings(capacity: 14)
        bindings.append(self.instance)
        bindings.append(self.rows.newIDs)
        bindings.append(self.rows.newMetrics)
        bindings.append(self.rows.newLabels)
        bindings.append(self.rows.newUsers)
        bindings.append(self.rows.newTotals)
        bindings.append(self.rows.addIDs)
        bindings.append(self.rows.addAmounts)
        bindings.append(self.rows.hourIDs)
        bindings.append(self.rows.hours)
        bindings.append(self.rows.hourAmounts)
        bindings.append(self.plain.digests)
        bindings.append(self.plain.seen)
        bindings.append(self.now)
        return bindings
    }

    func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Int64.self) }
}

private struct RestoreResult: Sendable {
    var series: [(family: Int, labels: LabelValues, total: UInt64, id: Int64, text: String)] = []
    var outcomeTotals: [(CallbackOutcome, UInt64)] = []
    var requestIDs: [(UInt64, Int64)] = []
    var maxID: Int64 = 0
    var metricIDs: [Int32] = []
    var outcomesMetricID: Int32 = 0
    var outcomeSeries: [CallbackOutcome: Int64] = [:]
    var commits: Int64 = 0
    var stored: [Int64] = []
    var counts = RestoredCounts()
}

private struct CommitResult: Sendable {
    var refused: Set<UInt64>
    var commits: Int64
    var inserted: [Int64]
    /// This replica's stored series as read at the start of the commit, when they were read.
    var stored: IDSet?
}
