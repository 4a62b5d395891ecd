import Glibc
import Testing

@testable import UsageTrackingCore

/// A fresh directory under /tmp, removed with everything in it when the test ends.
final class ScratchDirectory {
    let path: String

    init() {
        var template = Array("/tmp/usage-ledger-test-XXXXXX".utf8CString)
        self.path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }

    deinit {
        _ = system("rm -rf '\(self.path)'")
    }

    var database: String { self.path + "/" + UsageLedger.databaseName }

    func bytes(_ name: String) -> [UInt8]? {
        try? readFileBytes(self.path + "/" + name, limit: 1 << 26).get()
    }

    func write(_ name: String, _ bytes: [UInt8], at offset: Int = 0) {
        let fd = open(self.path + "/" + name, O_WRONLY | O_CREAT, 0o600)
        precondition(fd >= 0)
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        close(fd)
    }

    func sql(_ statement: String) -> String {
        let output = "\(self.path)/.sql-output"
        _ = system("sqlite3 '\(self.database)' \"\(statement)\" > '\(output)' 2>&1")
        return String(decoding: (try? readFileBytes(output, limit: 1 << 20).get()) ?? [], as: UTF8.self)
    }
}

private let now: Int64 = 1_795_471_072  // 2026-11-23T21:57:52Z
private let hour: Int64 = 1_795_467_600  // its hour

private func ledger(_ directory: ScratchDirectory, _ metrics: UsageMetrics, retentionDays: Int = 400) throws -> UsageLedger {
    try UsageLedger(directory: directory.path, families: metrics.families, seriesIDs: metrics.seriesIDs, retentionDays: retentionDays)
}

/// A closed ledger holding one callback of `llm_requests_total{user="a",groups="g",path="/p"}`.
private func ledgerWithOneSeries() throws -> ScratchDirectory {
    let directory = ScratchDirectory()
    let metrics = UsageMetrics()
    let store = try ledger(directory, metrics)
    try store.restore(into: metrics, requestIDs: nil, now: now)
    var batch = LedgerBatch()
    batch.add(metrics.countReturningSeries(Callback(user: "a", groups: "g", path: "/p")), amounts: [], at: now)
    try store.commit(batch, now: now)
    store.close()
    return directory
}

@Suite struct UsageLedgerTests {
    /// What one process committed, a second process on the same directory exposes exactly, and the
    /// ledger's own tables say the same (totals, hourly buckets, request ids).
    @Test func committedCountsAreRestoredExactly() throws {
        let directory = ScratchDirectory()
        let first = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        let store = try ledger(directory, first)
        try store.restore(into: first, requestIDs: first.requestIDs, now: now)
        var batch = LedgerBatch()
        for (user, times) in [("alice", 3), ("bob", 1), ("k\u{212A}", 2)] {
            for _ in 0..<times {
                let callback = Callback(user: user, groups: "premium", path: "/v1/completions")
                batch.add(first.countReturningSeries(callback), amounts: callback.amounts, at: now)
                batch.add(.accepted, at: now)
            }
        }
        batch.add(.invalid, count: 2, at: now)
        batch.add(requestID: 42, seen: now)
        try store.commit(batch, now: now)
        store.close()

        let second = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        let reopened = try ledger(directory, second)
        let restored = try reopened.restore(into: second, requestIDs: second.requestIDs, now: now + 10)
        #expect(restored.series == 3)
        #expect(restored.requestIDs == 1)
        #expect(second.requests.snapshot().map(\.value) == first.requests.snapshot().map(\.value))
        #expect(second.requests.snapshot().map(\.labels) == first.requests.snapshot().map(\.labels))
        #expect(second.requests.value(["k\u{212A}", "premium", "/v1/completions"]) == 2)
        #expect(second.count(of: .accepted) == 6)
        #expect(second.count(of: .invalid) == 2)
        #expect(second.requestIDs?.claim(42, at: now + 10) == false)
        // New series continue after the ledger's ids.
        let restoredIDs = ["alice", "bob", "k\u{212A}"].map { first.requests.increment([$0, "premium", "/v1/completions"], by: 0).id }
        #expect(second.requests.increment(["carol", "free", "/v1/models"]).id > restoredIDs.max()!)
        reopened.close()

        #expect(directory.sql("SELECT series.labels, total FROM series JOIN metric ON metric.id = metric_id WHERE name = 'llm_requests_total' ORDER BY total DESC").split(separator: "\n") == [
            #"{"user":"alice","groups":"premium","path":"/v1/completions"}|3"#,
            #"{"user":"k\#u{212A}","groups":"premium","path":"/v1/completions"}|2"#,
            #"{"user":"bob","groups":"premium","path":"/v1/completions"}|1"#,
        ])
        #expect(directory.sql("SELECT hour, sum(amount) FROM usage_hourly JOIN series ON series.id = series_id WHERE metric_id = 1 GROUP BY hour") == "\(hour)|6\n")
        #expect(directory.sql("SELECT json_extract(labels, '$.outcome'), total FROM series WHERE metric_id = 2 ORDER BY 1") == "accepted|6\ninvalid|2\n")
        #expect(directory.sql("SELECT value FROM ledger_state WHERE key = 'last_commit'") == "\(now)\n")
    }

    @Test func hourlyBucketsOlderThanTheRetentionAreDeleted() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let store = try ledger(directory, metrics, retentionDays: 2)
        try store.restore(into: metrics, requestIDs: nil, now: now)
        let series = metrics.countReturningSeries(Callback(user: "a", groups: "g", path: "/p"))
        for day in [5, 2, 1, 0] {
            var batch = LedgerBatch()
            batch.add(series, amounts: [], at: now - Int64(day) * 86_400)
            try store.commit(batch, now: now - Int64(day) * 86_400)
        }
        store.close()
        #expect(directory.sql("SELECT (\(hour) - hour) / 86400 FROM usage_hourly WHERE series_id = \(series[0]!.id) ORDER BY hour") == "2\n1\n0\n")
        #expect(directory.sql("SELECT total FROM series WHERE id = \(series[0]!.id)") == "4\n")
    }

    /// A count is booked in the UTC hour it was acknowledged in, not the hour of its commit: the
    /// last second of a month, of a year and of a leap day, committed a second after midnight
    /// (as `interval` mode does), stay in the hour before midnight; the next callback is in the
    /// new day. Pinned times, so this holds on any date.
    @Test(arguments: [
        (Int64(1_796_083_199), Int64(1_796_079_600)),  // 2026-11-30T23:59:59Z, its hour 23:00
        (Int64(1_830_297_599), Int64(1_830_294_000)),  // 2027-12-31T23:59:59Z
        (Int64(1_835_481_599), Int64(1_835_478_000)),  // 2028-02-29T23:59:59Z
    ])
    func countsStayInTheHourTheyWereAcknowledgedIn(lastSecond: Int64, itsHour: Int64) throws {
        #expect(LedgerBatch.hour(of: lastSecond) == itsHour && LedgerBatch.hour(of: lastSecond + 1) == lastSecond + 1)
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let store = try ledger(directory, metrics)
        try store.restore(into: metrics, requestIDs: nil, now: lastSecond)
        var batch = LedgerBatch()
        batch.add(metrics.countReturningSeries(Callback(user: "a", groups: "g", path: "/p")), amounts: [], at: lastSecond)
        batch.add(metrics.countReturningSeries(Callback(user: "b", groups: "g", path: "/p")), amounts: [], at: lastSecond + 1)
        try store.commit(batch, now: lastSecond + 1)
        store.close()
        #expect(directory.sql("SELECT json_extract(labels, '$.user'), hour FROM usage_hourly JOIN series ON series.id = series_id WHERE metric_id = 1 ORDER BY 1")
            == "a|\(itsHour)\nb|\(lastSecond + 1)\n")
    }

    /// Labels go in and out of the ledger byte for byte, whatever a caller put in them.
    @Test(arguments: ["plain", "quote\"back\\slash", "line\nbreak\ttab\u{1}", "caf\u{E9}", "cafe\u{301}", "\u{1F600}", "/v1/x?y=1&z", ""])
    func labelsRoundTrip(value: String) {
        let text = LabelsJSON.encode([value, "g"], names: ["user", "groups"])
        let back = LabelsJSON.Reader(names: ["user", "groups"]).decode(text)
        #expect(back?.count == 2)
        #expect(back.map { Array($0[0].utf8) } == Array(value.utf8))
    }

    @Test func labelsOfAnotherShapeDoNotReadBack() {
        let reader = LabelsJSON.Reader(names: ["user", "groups"])
        #expect(reader.decode(#"{"user":"a"}"#) == nil)
        #expect(reader.decode(#"{"user":"a","groups":5}"#) == nil)
        #expect(reader.decode(#"{"user":"a","user":"b","groups":"g"}"#) == nil)
        #expect(reader.decode(#"["a","g"]"#) == nil)
        #expect(reader.decode(#"{"user":"\ud800","groups":"g"}"#) == nil)
        // Order and escapes are JSON's business; the values are what count.
        #expect(reader.decode(#"{"groups":"g","user":"\u00e9"}"#) == ["\u{E9}", "g"])
    }

    /// Two rows with the same labels would restore as one series and lose a count: refused.
    @Test func twoRowsWithTheSameLabelsAreRefused() throws {
        let directory = try ledgerWithOneSeries()
        _ = directory.sql("INSERT INTO series (id, metric_id, labels, total) VALUES (999, 1, json_object('groups', 'g', 'user', 'a', 'path', '/p'), 5)")
        let reopened = UsageMetrics()
        #expect {
            _ = try ledger(directory, reopened).restore(into: reopened, requestIDs: nil, now: now)
        } throws: { error in
            guard case .damaged(_, let reason) = error as? LedgerError else { return false }
            return reason.contains("repeats the labels of another series")
        }
    }

    /// Request ids are kept one block per commit; a block goes once its newest id has left the
    /// window, and a restore brings back only the ids still inside it, oldest first.
    @Test func requestIDBlocksLeaveWithTheirNewestID() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        let store = try ledger(directory, metrics)
        try store.restore(into: metrics, requestIDs: metrics.requestIDs, now: now)
        // (commit time, [(id, time seen)]), as offsets from `now`.
        let commits: [(Int64, [(UInt64, Int64)])] = [(0, [(1, 0), (2, 0)]), (150, [(3, 150)]), (700, [(4, 690), (5, 700), (6, 700)])]
        for (time, ids) in commits {
            var batch = LedgerBatch()
            for (id, seen) in ids { batch.add(requestID: id, seen: now + seen) }
            try store.commit(batch, now: now + time)
        }
        store.close()
        // The commit at 700 deleted the first block (all ids older than 100) and kept the second.
        #expect(directory.sql("SELECT last_seen - \(now), length(ids) FROM request_id_block ORDER BY rowid") == "150|16\n700|48\n")

        let window = RequestIDWindow(window: 600, maxIDs: 100)
        let reopened = UsageMetrics(requestIDs: window)
        let restored = try ledger(directory, reopened).restore(into: reopened, requestIDs: window, now: now + 1290)
        // At 1290 the window starts after 690: id 4 is out of it, though its block is read.
        #expect(restored.requestIDs == 2)
        #expect([3, 4, 5, 6].map { window.claim($0, at: now + 1290) } == [true, true, false, false])
    }

    /// A ledger of schema 1, as builds before the packed request ids left it (a row per id):
    /// opened, its ids move into one block in the transaction that sets schema 2, the ones in the
    /// window still catch repeats, and its counts are as they were.
    @Test func aSchemaOneLedgerKeepsItsRequestIDs() throws {
        let directory = Self.schemaOneLedger("""
            INSERT INTO metric VALUES (1, 'llm_requests_total', json_array('user', 'groups', 'path'));
            INSERT INTO series VALUES (1, 1, json_object('user', 'a', 'groups', 'g', 'path', '/p'), 5);
            INSERT INTO usage_hourly VALUES (1, \(hour), 5);
            INSERT INTO request_id VALUES (\(now - 700), 7), (\(now - 5), -8), (\(now - 1), 9);
            """)
        let window = RequestIDWindow(window: 600, maxIDs: 100)
        let metrics = UsageMetrics(requestIDs: window)
        let store = try ledger(directory, metrics)
        let restored = try store.restore(into: metrics, requestIDs: window, now: now)
        store.close()
        #expect(restored.series == 1 && restored.requestIDs == 2)
        #expect(metrics.requests.value(["a", "g", "/p"]) == 5)
        #expect([7, UInt64(bitPattern: -8), 9].map { window.claim($0, at: now) } == [true, false, false])
        #expect(directory.sql("PRAGMA user_version") == "2\n")
        #expect(directory.sql("SELECT name FROM sqlite_schema WHERE name LIKE 'request_id%'") == "request_id_block\n")
        #expect(directory.sql("SELECT last_seen - \(now), length(ids) FROM request_id_block") == "-1|48\n")
        #expect(directory.sql("SELECT amount FROM usage_hourly") == "5\n")
    }

    /// Schema 1's ids move in blocks of `idsPerMovedBlock`, each with its own newest time, so no
    /// single value grows with the table.
    @Test func schemaOneIDsMoveInBoundedBlocks() throws {
        let count = UsageLedger.idsPerMovedBlock + 10
        let directory = Self.schemaOneLedger("""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < \(count))
            INSERT INTO request_id SELECT \(now - Int64(count)) + i, i FROM n;
            """)
        let window = RequestIDWindow(window: 86_400, maxIDs: 1_000_000)
        let metrics = UsageMetrics(requestIDs: window)
        let store = try ledger(directory, metrics)
        #expect(try store.restore(into: metrics, requestIDs: window, now: now).requestIDs == count)
        store.close()
        #expect(directory.sql("SELECT length(ids) / 16, last_seen - \(now) FROM request_id_block ORDER BY rowid") == "\(UsageLedger.idsPerMovedBlock)|-10\n10|0\n")
    }

    /// A ledger may hold more ids than the window keeps (a smaller `--dedupe-max-ids` after a
    /// restart): the newest are restored, whatever order their blocks were written in, and the
    /// restore holds no more than twice the window's ids at a time.
    @Test func theNewestIDsAreRestoredWhenTheLedgerHoldsMore() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        let store = try ledger(directory, metrics)
        try store.restore(into: metrics, requestIDs: metrics.requestIDs, now: now)
        for ids in [[(1, 10), (2, 11), (3, 12)], [(4, 1), (5, 2), (6, 3)]] as [[(UInt64, Int64)]] {
            var batch = LedgerBatch()
            for (id, seen) in ids { batch.add(requestID: id, seen: now + seen) }
            try store.commit(batch, now: now + 12)
        }
        store.close()
        let window = RequestIDWindow(window: 600, maxIDs: 2)
        let reopened = UsageMetrics(requestIDs: window)
        #expect(try ledger(directory, reopened).restore(into: reopened, requestIDs: window, now: now + 20).requestIDs == 2)
        // Claims of the restored first: a new id fills the window of two and pushes the oldest out.
        #expect(window.count == 2)
        #expect([3, 2, 1].map { window.claim($0, at: now + 20) } == [false, false, true])
    }

    /// An empty ledger of schema 1, as the build before wrote it, with `rows` added.
    private static func schemaOneLedger(_ rows: String) -> ScratchDirectory {
        let directory = ScratchDirectory()
        _ = directory.sql("""
            CREATE TABLE metric (id INTEGER PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL, UNIQUE (name, labels));
            CREATE TABLE series (id INTEGER PRIMARY KEY, metric_id INTEGER NOT NULL REFERENCES metric (id), labels TEXT NOT NULL,
                total INTEGER NOT NULL, UNIQUE (metric_id, labels));
            CREATE TABLE usage_hourly (series_id INTEGER NOT NULL REFERENCES series (id), hour INTEGER NOT NULL, amount INTEGER NOT NULL,
                PRIMARY KEY (series_id, hour)) WITHOUT ROWID;
            CREATE INDEX usage_hourly_by_hour ON usage_hourly (hour);
            CREATE TABLE request_id (seen INTEGER NOT NULL, digest INTEGER NOT NULL, PRIMARY KEY (seen, digest)) WITHOUT ROWID;
            CREATE TABLE ledger_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT INTO ledger_state VALUES ('last_commit', \(now - 1));
            \(rows)
            PRAGMA user_version = 1;
            """)
        return directory
    }

    /// A block whose length is not a whole number of ids cannot have been written here.
    @Test func aTornRequestIDBlockIsRefused() throws {
        let directory = try ledgerWithOneSeries()
        _ = directory.sql("INSERT INTO request_id_block VALUES (\(now), zeroblob(15))")
        let metrics = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        #expect(throws: LedgerError.damaged(directory.database, "request id block 1 is not a whole number of ids")) {
            try ledger(directory, metrics).restore(into: metrics, requestIDs: metrics.requestIDs, now: now)
        }
    }

    // MARK: startup refusals

    private static func expectRefusal(_ directory: ScratchDirectory, _ expected: LedgerError) {
        let before = directory.bytes(UsageLedger.databaseName)
        #expect(throws: expected) { _ = try ledger(directory, UsageMetrics()) }
        #expect(directory.bytes(UsageLedger.databaseName) == before, "the file must be left as it was")
        #expect(directory.bytes(UsageLedger.databaseName + "-wal") == nil)
    }

    @Test func aFileThatIsNotADatabaseIsRefusedAndLeftAlone() throws {
        let directory = ScratchDirectory()
        directory.write(UsageLedger.databaseName, Array("counts: 12\n".utf8))
        Self.expectRefusal(directory, .damaged(directory.database, "not a SQLite database"))
    }

    @Test func aMalformedPageIsRefusedAndLeftAlone() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let store = try ledger(directory, metrics)
        try store.restore(into: metrics, requestIDs: nil, now: now)
        store.close()
        directory.write(UsageLedger.databaseName, [0x07, 0xFF, 0xFF], at: 4096)
        let before = directory.bytes(UsageLedger.databaseName)
        #expect {
            _ = try ledger(directory, UsageMetrics())
        } throws: { error in
            guard case .damaged(let path, let reason) = error as? LedgerError else { return false }
            return path == directory.database && reason.hasPrefix("fails SQLite's integrity check: ") && reason.contains("Page 2")
        }
        #expect(directory.bytes(UsageLedger.databaseName) == before)
    }

    @Test func aLedgerFromANewerVersionIsRefused() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        try ledger(directory, metrics).close()
        _ = directory.sql("PRAGMA user_version = 3")
        Self.expectRefusal(directory, .damaged(directory.database, "written by a newer version (schema 3; this build reads up to 2)"))
        #expect(LedgerError.damaged(directory.database, "x").description.hasSuffix(
            "; refusing to start from zero. The files are left as they were: restore a backup, or move them aside to start a new ledger"))
    }

    @Test func aSecondLedgerOnTheSameDirectoryIsRefusedAndNamesTheHolder() throws {
        let directory = ScratchDirectory()
        let store = try ledger(directory, UsageMetrics())
        #expect {
            _ = try ledger(directory, UsageMetrics())
        } throws: { error in
            guard case .locked(let path, let holder) = error as? LedgerError else { return false }
            return path == directory.path && holder.hasPrefix("pid \(getpid()) on ") && holder.contains(" since 20")
        }
        store.close()
        // Released on close: the next one takes it.
        try ledger(directory, UsageMetrics()).close()
    }

    @Test func aDirectoryThatCannotBeCreatedIsRefused() {
        let directory = ScratchDirectory()
        directory.write("file", [1])
        #expect(throws: LedgerError.unusableDirectory(directory.path + "/file/state", "cannot create it: Not a directory")) {
            _ = try UsageLedger(directory: directory.path + "/file/state", families: [], seriesIDs: SeriesIDs(), retentionDays: 1)
        }
    }

    /// Series of a metric the config no longer has stay in the ledger and are reported, not exposed.
    @Test func seriesOfARemovedMetricAreKeptAndReported() throws {
        let directory = try ledgerWithOneSeries()
        let schema = try MeteringSchema.parse(
            """
            metrics:
              - name: llm_tokens_total
                labels:
                  - name: user
                    from: user
            """, file: "tokens.yaml")
        let other = UsageMetrics(schema: schema)
        let restored = try ledger(directory, other).restore(into: other, requestIDs: nil, now: now)
        #expect(restored.series == 0)
        #expect(restored.unexposedSeries == 1)
        #expect(restored.unexposedMetrics == [#"llm_requests_total["user","groups","path"]"#])
    }
}

@Suite struct RestoredSeriesTests {
    /// Restored series were seen by Prometheus before the restart: no hold at 0, their values
    /// spend the budgets, and later series get new ids.
    @Test func restoredSeriesAreExposedAtOnceAndSpendTheBudget() {
        let ids = SeriesIDs()
        let family = CounterFamily(
            name: "t_total", help: "t", labelNames: ["user"], maxSeries: 2, maxValues: [2],
            newSeriesHoldNanoseconds: 30_000_000_000, clock: { 1_000_000_000_000 }, ids: ids
        )
        family.restore(["a"], count: 5, id: 7)
        family.restore(["b"], count: 1, id: 9)
        ids.advance(past: 9)
        #expect(family.snapshot().map(\.value) == [5, 1])
        #expect(family.budgetUse().values == [2])
        let third = family.increment(["c"])
        #expect(third.labels == ["__other__"])
        #expect(third.id == 10)
        #expect(family.increment(["a"]).id == 7)
        #expect(family.value(["a"]) == 6)
    }
}

@Suite struct ReservedSeriesTests {
    /// `always` mode reserves a series before its commit: until something is added it is not
    /// exposed anywhere, so a commit that fails leaves no series at 0 behind.
    @Test func aReservedSeriesIsHiddenUntilCounted() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user"])
        family.increment(["a"])
        let reserved = family.reserve(["b"])
        #expect(family.snapshot().map(\.labels) == [["a"]])
        #expect(family.series().map(\.labels) == [["a"]])
        #expect(family.seriesCount == 1)
        #expect(family.reserve(["b"]).id == reserved.id)
        family.add(2, to: reserved)
        #expect(family.snapshot().map(\.labels) == [["a"], ["b"]])
        #expect(family.value(["b"]) == 2)
        #expect(family.seriesCount == 2)
        // Reserving an exposed series does not hide it.
        _ = family.reserve(["a"])
        #expect(family.seriesCount == 2)
    }
}
