/// A settled batch as the rows the SQLite ledger writes: one JSON array per table, which SQLite
/// unpacks itself (`json_each`), so a commit binds and steps a handful of statements whatever its
/// size; the request ids, one per callback, go in packed as one value. The journal
/// (`LedgerJournal`) keeps batches in this same form, so what it replays at startup goes through
/// the statements every commit uses.
struct LedgerRows: Equatable {
    /// Series without a row yet: `[id, metric id, labels as JSON object text, amount]`.
    var newSeries = JSONRows()
    /// Series with a row: `[id, amount]`.
    var additions = JSONRows()
    /// `[series id, hour, amount]`.
    var hours = JSONRows()
    var requestIDs = PackedRequestIDs()
    /// When the batch was committed (`ledger_state.last_commit`).
    var now: Int64

    init(now: Int64) {
        self.now = now
    }

    /// Bytes for the journal: `now`, then each array and the packed request ids, each after its
    /// length, little-endian.
    var encoded: [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(8 + 16 + self.newSeries.utf8Count + self.additions.utf8Count + self.hours.utf8Count + self.requestIDs.bytes.count)
        bytes.appendLittleEndian(self.now)
        for rows in [self.newSeries, self.additions, self.hours] {
            let text = rows.closed
            bytes.appendLittleEndian(UInt32(text.utf8.count))
            bytes += text.utf8
        }
        bytes.appendLittleEndian(UInt32(self.requestIDs.bytes.count))
        bytes += self.requestIDs.bytes
        return bytes
    }

    /// The rows `encoded` gave; nil for bytes it cannot have written. `jsonRequestIDs`: the
    /// request ids as JSON rows `[[digest,seen],…]`, as builds before the packed form wrote them.
    init?(encoded bytes: ArraySlice<UInt8>, jsonRequestIDs: Bool = false) {
        var rest = bytes
        func take(_ count: Int) -> ArraySlice<UInt8>? {
            guard count >= 0, rest.count >= count else { return nil }
            defer { rest = rest.dropFirst(count) }
            return rest.prefix(count)
        }
        func integer<T: FixedWidthInteger>(_: T.Type) -> T? {
            take(MemoryLayout<T>.size).map { $0.littleEndian() }
        }
        func rows() -> JSONRows? {
            guard let count = integer(UInt32.self), let text = take(Int(count)), let rows = JSONRows(closed: text) else { return nil }
            return rows
        }
        func requestIDs() -> PackedRequestIDs? {
            guard let count = integer(UInt32.self), let bytes = take(Int(count)) else { return nil }
            return jsonRequestIDs ? PackedRequestIDs(jsonRows: bytes) : PackedRequestIDs(bytes)
        }
        guard let now = integer(Int64.self), let newSeries = rows(), let additions = rows(), let hours = rows(),
            let requestIDs = requestIDs(), rest.isEmpty
        else { return nil }
        self.now = now
        (self.newSeries, self.additions, self.hours, self.requestIDs) = (newSeries, additions, hours, requestIDs)
    }
}

/// What turns a batch into `LedgerRows`: the ids the ledger gave each family and outcome,
/// fixed once the ledger is restored, so the journal's thread and the fold's can share it.
struct LedgerRowsEncoder: Sendable {
    let labelNames: [[String]]
    let metricIDs: [Int64]
    let outcomesMetricID: Int64
    let outcomeSeries: [CallbackOutcome: Int64]

    /// The rows of a settled `batch` (no claims left): series `known` to have a row get an
    /// addition, the others a new row with their labels, whose ids are returned for the caller
    /// to add to `known` once the rows are durable.
    func rows(of batch: LedgerBatch, known: IDSet, now: Int64) -> (rows: LedgerRows, new: [Int64]) {
        var rows = LedgerRows(now: now)
        var new: [Int64] = []
        func add(_ amount: UInt64, to id: Int64, metric: Int64, labels: @autoclosure () -> String) {
            if known.contains(id) {
                rows.additions.append(id, Int64(bitPattern: amount))
            } else {
                rows.newSeries.append(id, metric, labels(), Int64(bitPattern: amount))
                new.append(id)
            }
        }
        for (id, total) in batch.totals {
            add(total.amount, to: id, metric: self.metricIDs[total.family], labels: LabelsJSON.encode(total.series.labels, names: self.labelNames[total.family]))
        }
        var outcomeTotals: [CallbackOutcome: UInt64] = [:]
        for (key, amount) in batch.hourly { rows.hours.append(key.id, key.hour, Int64(bitPattern: amount)) }
        for (key, count) in batch.outcomes {
            outcomeTotals[key.outcome, default: 0] &+= count
            rows.hours.append(self.outcomeSeries[key.outcome]!, key.hour, Int64(bitPattern: count))
        }
        for (outcome, count) in outcomeTotals {
            add(count, to: self.outcomeSeries[outcome]!, metric: self.outcomesMetricID, labels: LabelsJSON.encode([outcome.rawValue], names: ["outcome"]))
        }
        for (digest, seen) in batch.requestIDs { rows.requestIDs.append(digest, seen: seen) }
        return (rows, new)
    }
}

/// Rows of integers (and, for new series, one string) as a JSON array of arrays,
/// `[[1,2],[3,4]]`, for `json_each`.
struct JSONRows: Equatable {
    private var text = "["
    var isEmpty: Bool { self.text.utf8.count == 1 }
    var utf8Count: Int { self.text.utf8.count + 1 }

    init() {}

    /// Rows as `closed` wrote them.
    init?(closed bytes: ArraySlice<UInt8>) {
        guard bytes.first == UInt8(ascii: "["), bytes.last == UInt8(ascii: "]"), let text = String(validating: bytes.dropLast(), as: UTF8.self) else {
            return nil
        }
        self.text = text
    }

    mutating func append(_ values: Int64...) {
        self.open()
        for (index, value) in values.enumerated() {
            if index > 0 { self.text += "," }
            self.text += String(value)
        }
        self.text += "]"
    }

    /// A new series' row: its labels go in as a JSON string, which `->>` gives back as it was.
    mutating func append(_ id: Int64, _ metric: Int64, _ labels: String, _ amount: Int64) {
        self.open()
        self.text += "\(id),\(metric),"
        JSONText.quote(labels, to: &self.text)
        self.text += ",\(amount)]"
    }

    private mutating func open() {
        if !self.isEmpty { self.text += "," }
        self.text += "["
    }

    var closed: String { self.text + "]" }
}

/// Request ids as the ledger stores them: 16 bytes each, the digest then the time it was seen,
/// little-endian, all of a commit's in one value. A row per id cost SQLite about ten times the
/// CPU, once per callback (README, "The ledger's cost").
struct PackedRequestIDs: Equatable {
    static let entrySize = 16
    private(set) var bytes: [UInt8] = []
    /// The latest time among them, which decides when all of them have left the window.
    private(set) var lastSeen: Int64 = .min

    var isEmpty: Bool { self.bytes.isEmpty }
    var count: Int { self.bytes.count / Self.entrySize }

    init() {}

    /// Ids as `bytes` holds them; nil unless whole entries.
    init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count % Self.entrySize == 0 else { return nil }
        self.bytes = Array(bytes)
        self.forEach { _, seen in self.lastSeen = max(self.lastSeen, seen) }
    }

    /// Ids from JSON rows of two integers, `[[digest,seen],…]` (the journal's earlier form, which
    /// wrote no spaces); nil for anything else.
    init?(jsonRows bytes: ArraySlice<UInt8>) {
        var rest = bytes
        func skip(_ ascii: Unicode.Scalar) -> Bool {
            guard rest.first == UInt8(ascii: ascii) else { return false }
            rest.removeFirst()
            return true
        }
        func integer() -> Int64? {
            let negative = skip("-")
            var value: Int64 = 0
            var digits = 0
            while let byte = rest.first, byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") {
                let digit = Int64(byte - UInt8(ascii: "0"))
                let (shifted, overflow) = value.multipliedReportingOverflow(by: 10)
                let (next, carry) = negative ? shifted.subtractingReportingOverflow(digit) : shifted.addingReportingOverflow(digit)
                guard !overflow, !carry else { return nil }
                (value, digits) = (next, digits + 1)
                rest.removeFirst()
            }
            return digits > 0 ? value : nil
        }
        guard skip("[") else { return nil }
        if !skip("]") {
            repeat {
                guard skip("["), let digest = integer(), skip(","), let seen = integer(), skip("]") else { return nil }
                self.append(UInt64(bitPattern: digest), seen: seen)
            } while skip(",")
            guard skip("]") else { return nil }
        }
        guard rest.isEmpty else { return nil }
    }

    mutating func append(_ digest: UInt64, seen: Int64) {
        self.bytes.appendLittleEndian(digest)
        self.bytes.appendLittleEndian(seen)
        self.lastSeen = max(self.lastSeen, seen)
    }

    func forEach(_ body: (_ digest: UInt64, _ seen: Int64) -> Void) {
        _ = self.bytes.withUnsafeBytes { Self.forEach(in: $0, body) }
    }

    /// Each id in packed `bytes`, read in place; false (and none read) unless whole entries.
    static func forEach(in bytes: UnsafeRawBufferPointer, _ body: (_ digest: UInt64, _ seen: Int64) -> Void) -> Bool {
        guard bytes.count % Self.entrySize == 0 else { return false }
        for offset in stride(from: 0, to: bytes.count, by: Self.entrySize) {
            body(
                UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self)),
                Int64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset + 8, as: Int64.self))
            )
        }
        return true
    }
}

/// The journal's byte order, for its records' headers and `LedgerRows.encoded`.
extension [UInt8] {
    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { self += $0 }
    }
}

extension ArraySlice<UInt8> {
    /// The integer in the first bytes, little-endian (the slice holds at least its size).
    func littleEndian<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        self.prefix(MemoryLayout<T>.size).reversed().reduce(T.zero) { $0 << 8 | T($1) }
    }
}
