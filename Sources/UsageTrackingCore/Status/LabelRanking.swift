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
    public static func rank(
        _ series: [(labels: LabelValues, value: UInt64)], labelNames: [String], top k: Int
    ) -> [LabelRanking] {
        var sums = Sums(labelNames: labelNames, expectedSeries: series.count)
        sums.add(series)
        return sums.rankings(top: k)
    }

    /// One ranking per label of `family`, read one stripe at a time: each stripe's series are
    /// summed right after they are copied, while they are still in cache, and the copy is one
    /// stripe's rather than the whole store's.
    /// `include` keeps only some series (a token family ranks input and output, not their parts).
    public static func rank(_ family: CounterFamily, top k: Int, include: ((LabelValues) -> Bool)? = nil) -> [LabelRanking] {
        var sums = Sums(labelNames: family.labelNames, expectedSeries: family.seriesCount)
        family.forEachStripe { stripe in
            if let include { sums.add(stripe.filter { include($0.labels) }) } else { sums.add(stripe) }
        }
        return sums.rankings(top: k)
    }

    /// The sum per value of every label, built up from series handed in in any order.
    ///
    /// Cost: one dictionary update per series and label, O(series × labels), then O(values × k)
    /// at worst to keep the top `k` (usually O(values), since most values fall below the k-th at
    /// once). Meant to run off the event loops. One pass updates every label's sums, so each
    /// series' label array (a heap object of its own, so a likely cache miss) is read once rather
    /// than once per label.
    public struct Sums {
        let labelNames: [String]
        let expectedSeries: Int
        private var sums: [ValueSums]
        private var sized = false

        public init(labelNames: [String], expectedSeries: Int) {
            self.labelNames = labelNames
            self.expectedSeries = expectedSeries
            self.sums = Array(repeating: ValueSums(capacity: 16), count: labelNames.count)
        }

        public mutating func add(_ series: [(labels: LabelValues, value: UInt64)]) {
            let labelCount = self.labelNames.count
            if !self.sized, !series.isEmpty { self.reserve(sampling: series) }
            for entry in series where entry.labels.count == labelCount {
                for index in 0..<labelCount {
                    self.sums[index].add(entry.labels[index], entry.value)
                }
            }
        }

        /// Sizes each table from a sample of the first series, so a label with a value per series
        /// (users) is not rehashed over and over as it grows, and one with a handful (groups)
        /// does not get a huge sparse table.
        private mutating func reserve(sampling series: [(labels: LabelValues, value: UInt64)]) {
            self.sized = true
            let sample = series.prefix(LabelRanking.sampleSize).filter { $0.labels.count == self.labelNames.count }
            guard !sample.isEmpty else { return }
            for index in self.labelNames.indices {
                let distinct = Set(sample.map { ByteExactKey($0.labels[index]) }).count
                self.sums[index] = ValueSums(capacity: max(series.count, self.expectedSeries) * distinct / sample.count + 16)
            }
        }

        public func rankings(top k: Int) -> [LabelRanking] {
            self.labelNames.indices.map { index in
                var top = TopK(k)
                self.sums[index].forEach { text, count in top.offer(Entry(value: text, count: count)) }
                return LabelRanking(labelName: self.labelNames[index], distinctValues: self.sums[index].count, top: top.entries)
            }
        }
    }
}

/// Sums per label value: an open-addressing table keyed by each value's bytes.
///
/// Not a `Dictionary`: that would hash each value twice (its bytes into the key, the key into
/// the table) and again at every growth. Here the bytes are hashed once, with the standard
/// library's per-process seeded hasher (so values a client chose cannot be made to collide on
/// purpose), the hash is stored beside the value, and probing compares hashes before bytes.
struct ValueSums {
    /// Hash, value and sum side by side, so a probe touches one cache line.
    private struct Slot {
        var hash: Int
        var text: String
        var sum: UInt64
    }

    private var slots: [Slot]
    private(set) var count = 0

    /// Room for `capacity` values before the first growth (the table is kept at most half full).
    init(capacity: Int) {
        var size = 16
        while size < capacity * 2 { size <<= 1 }
        self.slots = Array(repeating: Slot(hash: 0, text: "", sum: 0), count: size)
    }

    /// 0 marks an empty slot, so no stored hash is 0.
    private static func hash(_ text: String) -> Int {
        var hasher = Hasher()
        text.hashBytes(into: &hasher)
        let hash = hasher.finalize()
        return hash == 0 ? 1 : hash
    }

    mutating func add(_ text: String, _ value: UInt64) {
        let hash = Self.hash(text)
        let mask = self.slots.count - 1
        var index = hash & mask
        while true {
            let stored = self.slots[index].hash
            if stored == 0 {
                self.slots[index] = Slot(hash: hash, text: text, sum: value)
                self.count += 1
                if self.count * 2 > self.slots.count { self.grow() }
                return
            }
            if stored == hash, self.slots[index].text.hasSameBytes(as: text) {
                self.slots[index].sum &+= value
                return
            }
            index = (index + 1) & mask
        }
    }

    private mutating func grow() {
        let old = self.slots
        self.slots = Array(repeating: Slot(hash: 0, text: "", sum: 0), count: old.count * 2)
        let mask = self.slots.count - 1
        for slot in old where slot.hash != 0 {
            var index = slot.hash & mask
            while self.slots[index].hash != 0 { index = (index + 1) & mask }
            self.slots[index] = slot
        }
    }

    func forEach(_ body: (String, UInt64) -> Void) {
        for slot in self.slots where slot.hash != 0 { body(slot.text, slot.sum) }
    }
}

extension LabelRanking {
    /// Series sampled to estimate how many values each label has.
    static let sampleSize = 4096
}

/// A `String` hashed and compared by its UTF-8 bytes, as label values are (see `ByteExact`):
/// two values that differ only by Unicode normalisation are two users. The bytes are hashed once,
/// when the key is made; a table that grows rehashes the stored hash, not the bytes.
struct ByteExactKey: Hashable {
    let text: String
    let hash: Int

    init(_ text: String) {
        self.text = text
        var hasher = Hasher()
        text.hashBytes(into: &hasher)
        self.hash = hasher.finalize()
    }

    static func == (a: ByteExactKey, b: ByteExactKey) -> Bool { a.hash == b.hash && a.text.hasSameBytes(as: b.text) }
    func hash(into hasher: inout Hasher) { hasher.combine(self.hash) }
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
