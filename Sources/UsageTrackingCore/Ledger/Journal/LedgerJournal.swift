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
/// - Records, back to back from the start of a file: magic, payload length, sequence (one more
///   than the record before it, across both files), CRC-32 of the length, the sequence and the
///   payload, then the payload. An append that fails leaves the next record to overwrite it.
/// - Reuse: a file whose records the database holds (sequence ≤ the one it recorded) is written
///   again from its start. Records left behind from earlier rounds have older sequences, so a
///   reader stops at them, as at zeros or a torn record.
/// - Damage: a whole record beyond one that fails its checksum, newer than any before, or
///   sequences that do not continue the database's, are refused (`LedgerError.damaged`), and
///   nothing is changed.
/// - Concurrency: not thread-safe; one committer appends.
final class LedgerJournal {
    static let names = ["usage.journal-0", "usage.journal-1"]
    static let capacity = 4 << 20
    static let headerSize = 24
    /// Bytes FF FE 4A 31: not UTF-8, so no label value in a payload can look like a record's start.
    private static let magic: UInt32 = 0x314A_FEFF

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
        guard self.descriptors.contains(-1) else { return }
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
                throw .failed(path, reason)
            }
            self.descriptors[index] = fd
        }
        try Self.syncDirectory(self.directory)
    }

    /// Appends `rows` as the next record and returns its sequence once it is on disk; nil when
    /// it does not fit (no file with room whose records are all `folded`): the caller then
    /// commits straight to the database. Throws if it cannot be written, leaving nothing that
    /// counts.
    func append(_ rows: LedgerRows, folded: UInt64) throws(LedgerError) -> UInt64? {
        try self.prepare()
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
        Self.append(Self.magic, to: &record)
        Self.append(UInt32(payload.count), to: &record)
        Self.append(sequence, to: &record)
        Self.append(Self.checksum(record[4..<16], payload[...]), to: &record)
        Self.append(UInt32(0), to: &record)
        record += payload
        let fd = self.descriptors[self.current]
        var written = 0
        while written < record.count {
            let count = record.withUnsafeBytes { pwrite(fd, $0.baseAddress! + written, $0.count - written, off_t(self.offset + written)) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { throw .failed(self.paths[self.current], "cannot write the journal: \(String(cString: strerror(errno)))") }
            written += count
        }
        guard fdatasync(fd) == 0 else {
            let reason = String(cString: strerror(errno))
            // Best effort: a record whose sync failed must not be read back if it reached the disk.
            _ = [UInt8](repeating: 0, count: Self.headerSize).withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(self.offset)) }
            throw .failed(self.paths[self.current], "cannot sync the journal: \(reason)")
        }
        self.offset += size
        self.highest[self.current] = sequence
        self.nextSequence += 1
        return sequence
    }

    /// Closes the files and removes them: called once the database holds every record.
    func remove() {
        self.close()
        for path in self.paths { unlink(path) }
        try? Self.syncDirectory(self.directory)
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
            guard count > 0 else { throw .unusableDirectory(path, "cannot read it: \(String(cString: strerror(errno)))") }
            filled += count
        }
        var records: [Record] = []
        var offset = 0
        while let (sequence, payload) = Self.record(in: bytes, at: offset) {
            if let last = records.last?.sequence, sequence != last + 1 { break }
            guard let rows = LedgerRows(encoded: payload) else {
                throw .damaged(path, "journal record \(sequence) at byte \(offset) does not read back")
            }
            records.append(Record(sequence: sequence, rows: rows))
            offset += Self.headerSize + payload.count
        }
        let newest = max(records.last?.sequence ?? 0, folded)
        // The magic's first byte (0xFF) occurs in no payload (UTF-8 text and small integers).
        var scan = offset + 1
        while scan < bytes.count, let found = bytes[scan...].firstIndex(of: 0xFF) {
            if let (sequence, _) = Self.record(in: bytes, at: found), sequence > newest {
                throw .damaged(path, "journal record \(sequence) at byte \(found) follows one that fails its checksum at byte \(offset)")
            }
            scan = found + 1
        }
        return records
    }

    /// The sequence and payload of the whole, intact record at `offset`, if there is one.
    private static func record(in bytes: [UInt8], at offset: Int) -> (sequence: UInt64, payload: ArraySlice<UInt8>)? {
        guard offset + Self.headerSize <= bytes.count, Self.integer(bytes, at: offset) == Self.magic else { return nil }
        let length = Int(Self.integer(bytes, at: offset + 4) as UInt32)
        let start = offset + Self.headerSize
        guard length <= bytes.count - start else { return nil }
        let payload = bytes[start..<(start + length)]
        guard Self.checksum(bytes[(offset + 4)..<(offset + 16)], payload) == Self.integer(bytes, at: offset + 16) else { return nil }
        return (Self.integer(bytes, at: offset + 8), payload)
    }

    // MARK: bytes

    static func checksum(_ header: ArraySlice<UInt8>, _ payload: ArraySlice<UInt8>) -> UInt32 {
        let crc = header.withUnsafeBufferPointer { czlib_crc32(0, $0.baseAddress, $0.count) }
        return payload.withUnsafeBufferPointer { czlib_crc32(crc, $0.baseAddress, $0.count) }
    }

    private static func append<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
    }

    private static func integer<T: FixedWidthInteger>(_ bytes: [UInt8], at offset: Int) -> T {
        bytes[offset..<(offset + MemoryLayout<T>.size)].reversed().reduce(T.zero) { $0 << 8 | T($1) }
    }

    private static func syncDirectory(_ directory: String) throws(LedgerError) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .failed(directory, String(cString: strerror(errno))) }
        defer { Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw .failed(directory, "cannot sync the directory: \(String(cString: strerror(errno)))") }
    }
}
