/// The label values of one label that count the most, summed over every series that has them:
/// "top users", "top paths". Generic over a family's `labelNames`, so it ranks whatever labels a
/// family has.
public struct LabelRanking: Sendable {
    public struct Entry: Sendable, Equatable {
        public var value: String
        public var count: UInt64
    }

    public var labelName: String
    /// How many different values the label has.
    public var distinctValues: Int
    /// The values with the highest counts, highest first; ties in byte order of the value.
    public var top: [Entry]

    /// One ranking per label of `labelNames`, in that order, from one pass over `series`.
    ///
    /// Cost: one dictionary update per series and label, O(series × labels), then O(values × k)
    /// at worst to keep the top `k` (usually O(values), since most values fall below the k-th
    /// at once). Meant to run off the event loops, on a snapshot taken without holding any lock.
    public static func rank(
        _ series: [(labels: LabelValues, value: UInt64)], labelNames: [String], top k: Int
    ) -> [LabelRanking] {
        labelNames.indices.map { index in
            var sums: [ByteExactKey: UInt64] = [:]
            sums.reserveCapacity(min(series.count, 1 << 16))
            for entry in series where index < entry.labels.count {
                sums[ByteExactKey(entry.labels[index]), default: 0] &+= entry.value
            }
            var top = TopK(k)
            for (key, count) in sums { top.offer(Entry(value: key.text, count: count)) }
            return LabelRanking(labelName: labelNames[index], distinctValues: sums.count, top: top.entries)
        }
    }
}

/// A `String` hashed and compared by its UTF-8 bytes, as label values are (see `ByteExact`):
/// two values that differ only by Unicode normalisation are two users.
struct ByteExactKey: Hashable {
    let text: String

    init(_ text: String) { self.text = text }

    static func == (a: ByteExactKey, b: ByteExactKey) -> Bool { a.text.hasSameBytes(as: b.text) }
    func hash(into hasher: inout Hasher) { self.text.hashBytes(into: &hasher) }
}

/// The `k` highest entries seen, kept sorted (highest first). An entry below the current k-th is
/// rejected with one comparison, so offering n entries costs O(n) plus O(k) per entry that enters.
struct TopK {
    let k: Int
    private(set) var entries: [LabelRanking.Entry] = []

    init(_ k: Int) {
        self.k = k
        self.entries.reserveCapacity(k + 1)
    }

    static func precedes(_ a: LabelRanking.Entry, _ b: LabelRanking.Entry) -> Bool {
        a.count != b.count ? a.count > b.count : a.value.compareBytes(b.value) < 0
    }

    mutating func offer(_ entry: LabelRanking.Entry) {
        guard self.k > 0 else { return }
        if self.entries.count == self.k, let last = self.entries.last, !Self.precedes(entry, last) { return }
        let position = self.entries.firstIndex { Self.precedes(entry, $0) } ?? self.entries.endIndex
        self.entries.insert(entry, at: position)
        if self.entries.count > self.k { self.entries.removeLast() }
    }
}
