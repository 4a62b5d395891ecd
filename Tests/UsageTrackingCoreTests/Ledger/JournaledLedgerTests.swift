import Glibc
import Testing

@testable import UsageTrackingCore

private let now: Int64 = 1_795_471_072  // 2026-11-23T21:57:52Z

/// A journaled ledger in `directory` whose fold runs only when asked (at `close`, or when the
/// journal is full), so that what a test commits stays in the journal.
private func journaled(_ directory: ScratchDirectory, _ metrics: UsageMetrics, folding: Duration = .seconds(3600)) throws -> JournaledLedger {
    let database = try UsageLedger(directory: directory.path, families: metrics.families, seriesIDs: metrics.seriesIDs, retentionDays: 400)
    return JournaledLedger(database, directory: directory.path, maxRequestIDs: 1_000, foldInterval: folding)
}

/// One callback per user, each with a request id, committed one batch per user.
private func commit(_ users: [String], to ledger: JournaledLedger, _ metrics: UsageMetrics, firstID: UInt64 = 1) throws {
    for (index, user) in users.enumerated() {
        var batch = LedgerBatch()
        let callback = Callback(user: user, groups: "g", path: "/v1/completions")
        batch.claim(firstID + UInt64(index), isCallback: true, series: [metrics.resolve(callback)], amounts: [callback.amounts])
        #expect(try ledger.commit(batch, now: now) == [])
    }
}

/// The files as a crash leaves them, while `ledger` runs: copied into a new directory.
private func crashImage(of directory: ScratchDirectory) -> ScratchDirectory {
    let image = ScratchDirectory()
    for name in [UsageLedger.databaseName, UsageLedger.databaseName + "-wal"] + LedgerJournal.names {
        if let bytes = directory.bytes(name) { image.write(name, bytes) }
    }
    return image
}

private func users(_ metrics: UsageMetrics) -> [String: UInt64] {
    var counts: [String: UInt64] = [:]
    for (labels, count) in metrics.requests.snapshot() where count > 0 { counts[labels[0]] = count }
    return counts
}

@Suite struct JournaledLedgerTests {
    /// Commits that returned are in the journal, not yet in the database; a crash image restores
    /// them all, with their request ids, and the restore writes them into the database.
    @Test func acknowledgedCommitsComeBackFromTheJournalAfterACrash() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        let ledger = try journaled(directory, metrics)
        _ = try ledger.restore(into: metrics, requestIDs: metrics.requestIDs, now: now)
        try commit(["alice", "bob", "alice"], to: ledger, metrics)
        let image = crashImage(of: directory)
        ledger.close()
        #expect(image.sql("SELECT count(*) FROM series;") == "0\n")

        let restored = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        let again = try journaled(image, restored)
        let counts = try again.restore(into: restored, requestIDs: restored.requestIDs, now: now)
        #expect(users(restored) == ["alice": 2, "bob": 1])
        #expect(counts.requestIDs == 3)
        #expect(restored.requestIDs!.claim(2, at: now) == false)
        #expect(image.sql("SELECT value FROM ledger_state WHERE key = 'journal_sequence';") == "3\n")
        #expect(image.sql("SELECT sum(total) FROM series s JOIN metric m ON m.id = s.metric_id WHERE m.name = 'llm_requests_total';") == "3\n")
        again.close()
    }

    /// A record an earlier build left at a crash, its request ids as JSON rows under the earlier
    /// magic, is replayed like one of this build's: its counts and its ids come back.
    @Test func aRecordInTheEarlierFormIsReplayed() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
        let ledger = try journaled(directory, metrics)
        _ = try ledger.restore(into: metrics, requestIDs: metrics.requestIDs, now: now)
        var batch = LedgerBatch()
        for (user, id) in [("olivia", UInt64.max), ("peggy", 5)] {
            let callback = Callback(user: user, groups: "g", path: "/v1/completions")
            batch.claim(id, isCallback: true, series: [metrics.resolve(callback)], amounts: [callback.amounts])
        }
        #expect(try ledger.commit(batch, now: now) == [])
        let image = crashImage(of: directory)
        ledger.close()
        image.write(LedgerJournal.names[0], Self.inEarlierForm(image.bytes(LedgerJournal.names[0])!))

        let window = RequestIDWindow(window: 600, maxIDs: 100)
        let restored = UsageMetrics(requestIDs: window)
        let again = try journaled(image, restored)
        let counts = try again.restore(into: restored, requestIDs: window, now: now)
        again.close()
        #expect(users(restored) == ["olivia": 1, "peggy": 1])
        #expect(counts.requestIDs == 2)
        #expect([UInt64.max, 5, 6].map { window.claim($0, at: now) } == [false, false, true])
    }

    /// `close` folds everything into the database and removes the journal's files.
    @Test func closeFoldsEverythingAndLeavesTheDatabaseAlone() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let ledger = try journaled(directory, metrics)
        _ = try ledger.restore(into: metrics, requestIDs: nil, now: now)
        try commit(["carol", "dave"], to: ledger, metrics)
        #expect(directory.bytes(LedgerJournal.names[0])?.count == LedgerJournal.capacity)
        ledger.close()
        #expect(LedgerJournal.names.allSatisfy { directory.bytes($0) == nil })
        #expect(directory.sql("SELECT json_extract(labels, '$.user'), total FROM series WHERE labels LIKE '%user%' ORDER BY 1;") == "carol|1\ndave|1\n")
    }

    /// The fold thread writes what the journal holds within its interval, with no traffic.
    @Test func theFoldWritesTheJournalIntoTheDatabaseWhileRunning() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let ledger = try journaled(directory, metrics, folding: .milliseconds(50))
        _ = try ledger.restore(into: metrics, requestIDs: nil, now: now)
        let wal = directory.bytes(UsageLedger.databaseName + "-wal")?.count ?? 0
        try commit(["erin"], to: ledger, metrics)
        // Watched through the WAL's size rather than sqlite3: a child process started while another
        // test closes its ledger would inherit, and hold, that test's directory lock for a moment.
        for _ in 0..<100 where (directory.bytes(UsageLedger.databaseName + "-wal")?.count ?? 0) <= wal { usleep(20_000) }
        #expect(directory.sql("SELECT value FROM ledger_state WHERE key = 'journal_sequence';") == "1\n")
        ledger.close()
    }

    /// A record torn by a crash in the middle of its write was never acknowledged: the ones
    /// before it come back and startup goes on.
    @Test func aTornLastRecordIsNotDamage() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let ledger = try journaled(directory, metrics)
        _ = try ledger.restore(into: metrics, requestIDs: nil, now: now)
        try commit(["frank", "grace"], to: ledger, metrics)
        let image = crashImage(of: directory)
        ledger.close()
        let file = image.bytes(LedgerJournal.names[0])!
        let last = Self.offsets(file)[1]
        image.write(LedgerJournal.names[0], [UInt8](repeating: 0, count: 16), at: last + LedgerJournal.headerSize + 8)

        let restored = UsageMetrics()
        let again = try journaled(image, restored)
        _ = try again.restore(into: restored, requestIDs: nil, now: now)
        #expect(users(restored) == ["frank": 1])
        again.close()
    }

    /// A damaged record with an intact one after it is refused, naming the file, and every file
    /// is left as it was.
    @Test func aDamagedRecordBeforeAnIntactOneIsRefusedAndLeftAlone() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let ledger = try journaled(directory, metrics)
        _ = try ledger.restore(into: metrics, requestIDs: nil, now: now)
        try commit(["heidi", "ivan", "judy"], to: ledger, metrics)
        let image = crashImage(of: directory)
        ledger.close()
        let second = Self.offsets(image.bytes(LedgerJournal.names[0])!)[1]
        image.write(LedgerJournal.names[0], [0x00], at: second + LedgerJournal.headerSize + 12)
        let before = Self.fingerprints(image)

        let path = image.path + "/" + LedgerJournal.names[0]
        #expect(throws: LedgerError.damaged(path, "journal record 3 at byte \(second + LedgerJournal.alignment) is intact, but the record before it at byte \(second) is not")) {
            try journaled(image, UsageMetrics()).restore(into: UsageMetrics(), requestIDs: nil, now: now)
        }
        #expect(Self.fingerprints(image) == before)
    }

    /// Records that do not follow on from what the database holds (a database replaced by an
    /// older copy, say) are refused rather than added to it.
    @Test func aJournalThatDoesNotContinueTheDatabaseIsRefused() throws {
        let directory = ScratchDirectory()
        let metrics = UsageMetrics()
        let ledger = try journaled(directory, metrics)
        _ = try ledger.restore(into: metrics, requestIDs: nil, now: now)
        try commit(["mallory"], to: ledger, metrics)
        let image = crashImage(of: directory)
        ledger.close()
        // The second file holding record 3 of an earlier round: 2 is missing.
        var other = image.bytes(LedgerJournal.names[0])!
        other.replaceSubrange(8..<16, with: [3, 0, 0, 0, 0, 0, 0, 0])
        image.write(LedgerJournal.names[1], Self.resealed(other))

        #expect(throws: LedgerError.damaged(
            image.path + "/" + LedgerJournal.names[1],
            "journal record 2 is missing (found 3; the database holds records up to 0): the journal does not continue this database"
        )) {
            try journaled(image, UsageMetrics()).restore(into: UsageMetrics(), requestIDs: nil, now: now)
        }
    }

    /// The journal's files stay at their size, whatever is committed: a batch larger than a file
    /// goes straight to the database, and with both files full of records not yet folded the
    /// commit folds them first.
    @Test func theJournalNeverGrowsPastItsTwoFiles() throws {
        // The fold thread's clock is the real one, which decides which request ids have expired.
        let now = Int64(time(nil))
        let directory = ScratchDirectory()
        let metrics = UsageMetrics(requestIDs: RequestIDWindow(window: 600, maxIDs: 1_000_000))
        let database = try UsageLedger(directory: directory.path, families: metrics.families, seriesIDs: metrics.seriesIDs, retentionDays: 400)
        let ledger = JournaledLedger(database, directory: directory.path, maxRequestIDs: 1_000_000, foldInterval: .seconds(3600))
        _ = try ledger.restore(into: metrics, requestIDs: metrics.requestIDs, now: now)
        // About 1.3 MB of request ids per batch: three fit in a file, and the seventh finds both full.
        for round in 0..<8 {
            var batch = LedgerBatch(maxRequestIDs: 1_000_000)
            for id in 0..<50_000 { batch.add(requestID: UInt64(round * 50_000 + id + 1) << 20, seen: now) }
            _ = try ledger.commit(batch, now: now)
            #expect(LedgerJournal.names.allSatisfy { (directory.bytes($0)?.count ?? 0) == LedgerJournal.capacity })
        }
        #expect(directory.sql("SELECT sum(length(ids)) / 16 > 0 FROM request_id_block;") == "1\n")
        var oversized = LedgerBatch(maxRequestIDs: 1_000_000)
        for id in 0..<200_000 { oversized.add(requestID: UInt64(id + 1) << 40, seen: now) }
        _ = try ledger.commit(oversized, now: now)
        #expect(directory.sql("SELECT sum(length(ids)) / 16 >= 200000 FROM request_id_block;") == "1\n")
        ledger.close()
        #expect(directory.sql("SELECT sum(length(ids)) / 16 FROM request_id_block;") == "600000\n")
    }

    // MARK: helpers

    /// A hash of each file's bytes (nil where there is none), which a failure prints briefly.
    static func fingerprints(_ directory: ScratchDirectory) -> [Int?] {
        (LedgerJournal.names + [UsageLedger.databaseName, UsageLedger.databaseName + "-wal"]).map { directory.bytes($0)?.hashValue }
    }

    /// Where each record of a journal file starts, reading the lengths in its headers.
    static func offsets(_ file: [UInt8]) -> [Int] {
        var offsets: [Int] = []
        var offset = 0
        while offset + LedgerJournal.headerSize <= file.count, file[offset] == 0xFF {
            offsets.append(offset)
            let length = file[(offset + 4)..<(offset + 8)].reversed().reduce(0) { $0 << 8 | Int($1) }
            offset = (offset + LedgerJournal.headerSize + length + LedgerJournal.alignment - 1) / LedgerJournal.alignment * LedgerJournal.alignment
        }
        return offsets
    }

    /// A file whose only record is rewritten as builds before the packed request ids wrote it:
    /// the ids as JSON rows `[[digest,seen],…]` under the earlier magic, sealed again.
    static func inEarlierForm(_ file: [UInt8]) -> [UInt8] {
        func integer(_ bytes: [UInt8], _ offset: Int, _ size: Int) -> UInt64 {
            bytes[offset..<(offset + size)].reversed().reduce(0) { $0 << 8 | UInt64($1) }
        }
        let length = Int(integer(file, 4, 4))
        let payload = Array(file[LedgerJournal.headerSize..<(LedgerJournal.headerSize + length)])
        var offset = 8
        for _ in 0..<3 { offset += 4 + Int(integer(payload, offset, 4)) }
        var rows: [String] = []
        for entry in stride(from: offset + 4, to: payload.count, by: 16) {
            rows.append("[\(Int64(bitPattern: integer(payload, entry, 8))),\(Int64(bitPattern: integer(payload, entry + 8, 8)))]")
        }
        let json = Array("[\(rows.joined(separator: ","))]".utf8)
        var rewritten = Array(payload[..<offset])
        withUnsafeBytes(of: UInt32(json.count).littleEndian) { rewritten += $0 }
        rewritten += json
        var record: [UInt8] = []
        withUnsafeBytes(of: LedgerJournal.jsonRequestIDsMagic.littleEndian) { record += $0 }
        withUnsafeBytes(of: UInt32(rewritten.count).littleEndian) { record += $0 }
        record += file[8..<LedgerJournal.headerSize] + rewritten
        record = Self.resealed(record)
        return record + [UInt8](repeating: 0, count: file.count - record.count)
    }

    /// The file's first record with its checksum made right again for its header as it now is.
    static func resealed(_ file: [UInt8]) -> [UInt8] {
        var file = file
        let length = file[4..<8].reversed().reduce(0) { $0 << 8 | Int($1) }
        let crc = LedgerJournal.checksum(file[4..<16], file[LedgerJournal.headerSize..<(LedgerJournal.headerSize + length)])
        withUnsafeBytes(of: crc.littleEndian) { file.replaceSubrange(16..<20, with: $0) }
        return file
    }
}
