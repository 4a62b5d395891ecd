import Synchronization

/// The label values of one series, in the order of its family's label names.
public typealias LabelValues = [String]

/// The counters of one metric family, keyed by label values.
///
/// Contract:
/// - Concurrency: `increment` may be called from any thread at any time. Every increment that
///   returns is counted exactly once; none is lost or doubled under contention.
/// - Cost: insert and increment are O(1) amortised. Series are spread over independently locked
///   stripes by hash, so concurrent callbacks for different series rarely wait on each other, and
///   a lock is only ever held for one dictionary operation.
/// - Reading: `snapshot` copies one stripe at a time, so exposition never holds a lock across the
///   whole store and never blocks increments for longer than one stripe's copy. A snapshot is
///   exact per series; increments that land during it may or may not be included.
/// - Identity: label values are compared by their UTF-8 bytes, as Prometheus compares them, not
///   by `String`'s canonical equivalence: `K` and the Kelvin sign, or NFC and NFD `café`, are
///   distinct series, each exposed with exactly the bytes it was counted under.
/// - Ordering: `snapshot` returns series sorted by the bytes of their label values, so exposition
///   is stable and agrees with identity.
/// - Counts only grow. Series are never removed while the process runs.
public final class CounterFamily: Sendable {
    public let name: String
    public let help: String
    public let labelNames: [String]
    private let stripes: [Stripe]

    private final class Stripe: Sendable {
        let series = Mutex<[SeriesKey: UInt64]>([:])
    }

    /// Label values with their hash computed once: it picks the stripe and keys the dictionary.
    /// Hash and equality both use the UTF-8 bytes (see Identity above).
    private struct SeriesKey: Hashable {
        let labels: LabelValues
        let hash: Int

        init(_ labels: LabelValues) {
            self.labels = labels
            var hasher = Hasher()
            for label in labels { label.hashBytes(into: &hasher) }
            self.hash = hasher.finalize()
        }

        static func == (a: SeriesKey, b: SeriesKey) -> Bool {
            guard a.hash == b.hash, a.labels.count == b.labels.count else { return false }
            for index in a.labels.indices where !a.labels[index].hasSameBytes(as: b.labels[index]) { return false }
            return true
        }
        func hash(into hasher: inout Hasher) { hasher.combine(self.hash) }
    }

    private func stripe(for key: SeriesKey) -> Stripe {
        self.stripes[Int(UInt(bitPattern: key.hash) % UInt(self.stripes.count))]
    }

    public init(name: String, help: String, labelNames: [String], stripes: Int = 16) {
        precondition(stripes > 0)
        self.name = name
        self.help = help
        self.labelNames = labelNames
        self.stripes = (0..<stripes).map { _ in Stripe() }
    }

    public func increment(_ labelValues: LabelValues, by amount: UInt64 = 1) {
        precondition(labelValues.count == self.labelNames.count, "\(self.name): wrong number of label values")
        let key = SeriesKey(labelValues)
        self.stripe(for: key).series.withLock { $0[key, default: 0] &+= amount }
    }

    /// The current value of one series (0 when it was never incremented).
    public func value(_ labelValues: LabelValues) -> UInt64 {
        let key = SeriesKey(labelValues)
        return self.stripe(for: key).series.withLock { $0[key] ?? 0 }
    }

    public var seriesCount: Int {
        self.stripes.reduce(0) { count, stripe in count + stripe.series.withLock { $0.count } }
    }

    /// The series for which `isIncluded` holds, in no particular order, copied one stripe at a
    /// time like `snapshot`. `isIncluded` runs under a stripe's lock, so it must be cheap (a
    /// comparison of one label), and it must not touch this family.
    public func series(where isIncluded: (LabelValues) -> Bool = { _ in true }) -> [(labels: LabelValues, value: UInt64)] {
        var all: [(labels: LabelValues, value: UInt64)] = []
        for stripe in self.stripes {
            stripe.series.withLock { series in
                all.reserveCapacity(all.count + series.count)
                for (key, value) in series where isIncluded(key.labels) { all.append((key.labels, value)) }
            }
        }
        return all
    }

    /// Hands `body` the series of one stripe at a time (in no particular order), each copied
    /// under its stripe's lock and handed over after the lock is released, so `body` may take
    /// its time. Memory: one stripe's copy at a time, reused.
    public func forEachStripe(_ body: ([(labels: LabelValues, value: UInt64)]) -> Void) {
        var chunk: [(labels: LabelValues, value: UInt64)] = []
        for stripe in self.stripes {
            chunk.removeAll(keepingCapacity: true)
            stripe.series.withLock { series in
                chunk.reserveCapacity(series.count)
                for (key, value) in series { chunk.append((key.labels, value)) }
            }
            body(chunk)
        }
    }

    public func snapshot() -> [(labels: LabelValues, value: UInt64)] {
        var all = self.series()
        // Sorted by bytes, outside the locks. Where every value is ASCII, `String`'s `<` is byte
        // order and far cheaper (small strings compare without touching memory), so those series
        // are sorted with it, the rest by bytes, and the two runs merged.
        let firstNonASCII = all.partition { !$0.labels.allSatisfy(\.isASCII) }
        all[..<firstNonASCII].sort { $0.labels.lexicographicallyPrecedes($1.labels) }
        guard firstNonASCII < all.endIndex else { return all }
        all[firstNonASCII...].sort { labelValuesPrecede($0.labels, $1.labels) }
        var merged: [(labels: LabelValues, value: UInt64)] = []
        merged.reserveCapacity(all.count)
        var left = all.startIndex, right = firstNonASCII
        while left < firstNonASCII, right < all.endIndex {
            if labelValuesPrecede(all[right].labels, all[left].labels) {
                merged.append(all[right])
                right += 1
            } else {
                merged.append(all[left])
                left += 1
            }
        }
        merged.append(contentsOf: all[left..<firstNonASCII])
        merged.append(contentsOf: all[right...])
        return merged
    }
}
