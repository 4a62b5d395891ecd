import CZlib
import Glibc

/// The journal in front of the SQLite ledger in `--fsync always` mode: each commit's rows
/// (`LedgerRows`) appended to a file and fdatasynced, which costs one small write and one sync,
/// where a SQLite commit writes a dozen pages. `JournaledLedger` folds what it holds into the
/// database behind it.
///
/// Storage contract:
/// - Files: `usage.journal-0` and `usage.journal-1` in the state directory, each preallocated to
///   `capacity` with zeros, so that an append changes no file size and its fdatasync writes the
///   data alone (about half the cost of a sync that also writes the inode).
/// - Records, from the start of a file, each on a 512-byte boundary: magic, payload length,
///   sequence (one more than the record before it, across both files), CRC-32 of the length, the
///   sequence and the payload, then the payload. The magic names the payload's form: request ids
///   packed (written), or as JSON rows (read, for records an earlier build left at a crash). An
///   append that fails uses up its sequence, and `JournaledLedger` has the database record it as
///   held before appending again, so that a record whose sync failed is never read back as
///   acknowledged.
/// - Reuse: a file whose records the database holds (sequence ≤ the one it recorded) is written
///   again from its start. Records left behind from earlier rounds have older sequences, so a
///   reader stops at them, as at zeros or a torn record.
/// - Damage: an intact record beyond the run, newer than any in it, or sequences that do not
///   continue the database's, are refused (`LedgerError.damaged`), and nothing is changed.
/// - Concurrency: not thread-safe; one committer appends.
final class LedgerJournal {
    static let names = ["usage.journal-0", "usage.journal-1"]
    static let capacity = 4 << 20
    static let headerSize = 24
    /// Records start on a sector boundary, so that a torn write of one cannot reach the sectors
    /// of the acknowledged record before it.
    static let alignment = 512
    private static let magic: UInt32 = 0x324A_FEFF
    /// Records whose request ids are JSON rows, as builds before the packed form wrote them.
    static let jsonRequestIDsMagic: UInt32 = 0x314A_FEFF

    struct Record {
        var sequence: UInt64
        var rows: LedgerRows
    }

    let paths: [String]
    let directory: String
    private var descriptors: [Int32] = [-1, -1]
    private var current = 0
    private var offset = 0
    /// The highest sequence written to each file since it was last started from the top.
    private var highest: [UInt64] = [0, 0]
    private(set) var nextSequence: UInt64 = 1
    private var directorySynced = false

    init(directory: String) {
        self.directory = directory
        self.paths = Self.names.map { directory.hasSuffix("/") ? directory + $0 : directory + "/" + $0 }
    }

    deinit { self.close() }

    /// Numbers the next record after `folded`, the last the database holds: every record in the
    /// files is then one it holds, and either file may be written from its start.
    func start(after folded: UInt64) {
        self.nextSequence = folded + 1
        self.highest = [0, 0]
        self.offset = 0
    }

    /// Bytes written into the file being appended to, for the fold's trigger.
    var used: Int { self.offset }

    // MARK: appending

    /// Creates and preallocates the files if they are not yet (fsyncing the directory), so the
    /// first append does not wait for it.
    func prepare() throws(LedgerError) {
        guard self.descriptors.contains(-1) || !self.directorySynced else { return }
        for (index, path) in self.paths.enumerated() where self.descriptors[index] < 0 {
            let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw .failed(path, "cannot open it: \(String(cString: strerror(errno)))") }
            var status = stat()
            guard fstat(fd, &status) == 0 else {
                Glibc.close(fd)
                throw .failed(path, String(cString: strerror(errno)))
            }
            var size = Int(status.st_size)
            let zeros = [UInt8](repeating: 0, count: 64 << 10)
            while size < Self.capacity {
                let count = zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, min($0.count, Self.capacity - size), off_t(size)) }
                guard count > 0 else {
                    let reason = String(cString: strerror(errno))
                    Glibc.close(fd)
                    throw .failed(path, "cannot preallocate the journal: \(reason)")
                }
                size += count
            }
            guard fsync(fd) == 0 else {
                let reason = String(cString: strerror(errno))
                Glibc.close(fd)
                throw .failed(path, "cannot sync the journal: \(reason)")
            }
            self.descriptors[index] = fd
            self.directorySynced = false
        }
        // Until the directory is synced, the files themselves may not survive a power cut.
        try Self.syncDirectory(self.directory)
        self.directorySynced = true
    }

    /// Appends `rows` as the next record and returns its sequence once it is on disk; nil when
    /// it does not fit (no file with room whose records are all `folded`) or the files cannot be
    /// made (a full disk at start): the caller then commits straight to the database. Throws
    /// `AppendFailure` if the record cannot be written or synced: its sequence is then used up,
    /// and the caller must have the database record it as held before the next append, since a
    /// record whose sync failed may still be read back.
    func append(_ rows: LedgerRows, folded: UInt64) throws(AppendFailure) -> UInt64? {
        do {
            try self.prepare()
        } catch {
            return nil
        }
        let payload = rows.encoded
        let size = Self.headerSize + payload.count
        if self.highest[self.current] <= folded {
            self.offset = 0
        } else if self.offset + size > Self.capacity, self.highest[1 - self.current] <= folded {
            self.current = 1 - self.current
            self.offset = 0
        }
        guard self.offset + size <= Self.capacity else { return nil }
        let sequence = self.nextSequence
        var record = [UInt8]()
        record.reserveCapacity(size)
        record.appendLittleEndian(Self.magic)
        record.appendLittleEndian(UInt32(payload.count))
        record.appendLittleEndian(sequence)
        record.appendLittleEndian(Self.checksum(record[4..<16], payload[...]))
        record.appendLittleEndian(UInt32(0))
        record += payload
        let fd = self.descriptors[self.current]
        var written = 0
        while written < record.count {
            let count = record.withUnsafeBytes { pwrite(fd, $0.baseAddress! + written, $0.count - written, off_t(self.offset + written)) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else {
                self.nextSequence += 1
                throw AppendFailure(sequence: sequence, error: .failed(self.paths[self.current], "cannot write the journal: \(String(cString: strerror(errno)))"))
            }
            written += count
        }
        guard fdatasync(fd) == 0 else {
            self.nextSequence += 1
            throw AppendFailure(sequence: sequence, error: .failed(self.paths[self.current], "cannot sync the journal: \(String(cString: strerror(errno)))"))
        }
        self.offset = Self.aligned(self.offset + size)
        self.highest[self.current] = sequence
        self.nextSequence += 1
        return sequence
    }

    /// An append that failed, and the sequence it used up.
    struct AppendFailure: Error {
        var sequence: UInt64
        var error: LedgerError
    }

    private static func aligned(_ offset: Int) -> Int { (offset + Self.alignment - 1) / Self.alignment * Self.alignment }

    /// Closes the files and removes them: called once the database holds every record.
    func remove() {
        self.close()
        let removed = self.paths.filter { unlink($0) == 0 }
        if !removed.isEmpty { try? Self.syncDirectory(self.directory) }
    }

    func close() {
        for fd in self.descriptors where fd >= 0 { Glibc.close(fd) }
        self.descriptors = [-1, -1]
    }

    // MARK: reading

    /// The records in `directory`'s journal that come after `folded` (the last the database
    /// holds), in order, read without changing anything. Throws `damaged` when one is missing.
    static func unfolded(in directory: String, after folded: UInt64) throws(LedgerError) -> [Record] {
        let journal = LedgerJournal(directory: directory)
        var records: [(Record, path: String)] = []
        for path in journal.paths {
            records += try Self.read(path, folded: folded).filter { $0.sequence > folded }.map { ($0, path) }
        }
        records.sort { $0.0.sequence < $1.0.sequence }
        for (index, (record, path)) in records.enumerated() where record.sequence != folded + 1 + UInt64(index) {
            throw .damaged(
                path,
                "journal record \(folded + 1 + UInt64(index)) is missing (found \(record.sequence); the database holds records up to \(folded)): the journal does not continue this database"
            )
        }
        return records.map(\.0)
    }

    /// Every record of one file that continues the one before it, from the start. What follows
    /// the last is zeros, a torn write, or records the database holds (`folded`); a whole record
    /// with a later sequence there means one before it was damaged.
    private static func read(_ path: String, folded: UInt64) throws(LedgerError) -> [Record] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return [] }
            throw .unusableDirectory(path, "cannot read it: \(String(cString: strerror(errno)))")
        }
        defer { Glibc.close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0 else { throw .unusableDirectory(path, String(cString: strerror(errno))) }
        var bytes = [UInt8](repeating: 0, count: Int(status.st_size))
        var filled = 0
        while filled < bytes.count {
            let count = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + filled, $0.count - filled) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { throw .unusableDirectory(path, count == 0 ? "cannot read it: it ended early" : "cannot read it: \(String(cString: strerror(errno)))") }
            filled += count
        }
        var records: [Record] = []
        var offset = 0
        while let (sequence, payload, magic) = Self.record(in: bytes, at: offset) {
            if let last = records.last?.sequence, sequence != last + 1 { break }
            guard let rows = LedgerRows(encoded: payload, jsonRequestIDs: magic == Self.jsonRequestIDsMagic) else {
                throw .damaged(path, "journal record \(sequence) at byte \(offset) does not read back")
            }
            records.append(Record(sequence: sequence, rows: rows))
            offset = Self.aligned(offset + Self.headerSize + payload.count)
        }
        // Beyond the last record that continues the run: zeros, a torn write, or older rounds.
        let newest = max(records.last?.sequence ?? 0, folded)
        var scan = offset + Self.alignment
        while scan + Self.headerSize <= bytes.count {
            if let (sequence, _, _) = Self.record(in: bytes, at: scan), sequence > newest {
                throw .damaged(path, "journal record \(sequence) at byte \(scan) is intact, but the record before it at byte \(offset) is not")
            }
            scan += Self.alignment
        }
        return records
    }

    /// The sequence, payload and magic of the whole, intact record at `offset`, if there is one.
    private static func record(in bytes: [UInt8], at offset: Int) -> (sequence: UInt64, payload: ArraySlice<UInt8>, magic: UInt32)? {
        guard offset + Self.headerSize <= bytes.count else { return nil }
        let magic: UInt32 = Self.integer(bytes, at: offset)
        guard magic == Self.magic || magic == Self.jsonRequestIDsMagic else { return nil }
        let length = Int(Self.integer(bytes, at: offset + 4) as UInt32)
        let start = offset + Self.headerSize
        guard length <= bytes.count - start else { return nil }
        let payload = bytes[start..<(start + length)]
        guard Self.checksum(bytes[(offset + 4)..<(offset + 16)], payload) == Self.integer(bytes, at: offset + 16) else { return nil }
        return (Self.integer(bytes, at: offset + 8), payload, magic)
    }

    // MARK: bytes

    static func checksum(_ header: ArraySlice<UInt8>, _ payload: ArraySlice<UInt8>) -> UInt32 {
        let crc = header.withUnsafeBufferPointer { czlib_crc32(0, $0.baseAddress, $0.count) }
        return payload.withUnsafeBufferPointer { czlib_crc32(crc, $0.baseAddress, $0.count) }
    }

    private static func integer<T: FixedWidthInteger>(_ bytes: [UInt8], at offset: Int) -> T {
        bytes[offset...].littleEndian()
    }

    private static func syncDirectory(_ directory: String) throws(LedgerError) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .failed(directory, String(cString: strerror(errno))) }
        defer { Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw .failed(directory, "cannot sync the directory: \(String(cString: strerror(errno)))") }
    }
}
