/// A settled batch as the rows the SQLite ledger writes: one JSON array per table, which SQLite
/// unpacks itself (`json_each`), so a commit binds and steps a handful of statements whatever its
/// size. The journal (`LedgerJournal`) keeps batches in this same form, so what it replays at
/// startup goes through the statements every commit uses.
struct LedgerRows: Equatable {
    /// Series without a row yet: `[id, metric id, labels as JSON object text, amount]`.
    var newSeries = JSONRows()
    /// Series with a row: `[id, amount]`.
    var additions = JSONRows()
    /// `[series id, hour, amount]`.
    var hours = JSONRows()
    /// `[digest, seen]`.
    var requestIDs = JSONRows()
    /// When the batch was committed (`ledger_state.last_commit`).
    var now: Int64

    init(now: Int64) {
        self.now = now
    }

    /// Bytes for the journal: `now`, then each array with its length, little-endian.
    var encoded: [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(8 + 16 + self.newSeries.utf8Count + self.additions.utf8Count + self.hours.utf8Count + self.requestIDs.utf8Count)
        bytes.appendLittleEndian(self.now)
        for rows in [self.newSeries, self.additions, self.hours, self.requestIDs] {
            let text = rows.closed
            bytes.appendLittleEndian(UInt32(text.utf8.count))
            bytes += text.utf8
        }
        return bytes
    }

    /// The rows `encoded` gave; nil for bytes it cannot have written.
    init?(encoded bytes: ArraySlice<UInt8>) {
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
        guard let now = integer(Int64.self), let newSeries = rows(), let additions = rows(), let hours = rows(),
            let requestIDs = rows(), rest.isEmpty
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
        for (digest, seen) in batch.requestIDs { rows.requestIDs.append(Int64(bitPattern: digest), seen) }
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
