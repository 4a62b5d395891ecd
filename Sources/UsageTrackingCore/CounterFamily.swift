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
/// - Ordering: `snapshot` returns series sorted by label values, so exposition is stable.
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
    private struct SeriesKey: Hashable {
        let labels: LabelValues
        let hash: Int

        init(_ labels: LabelValues) {
            self.labels = labels
            self.hash = labels.hashValue
        }

        static func == (a: SeriesKey, b: SeriesKey) -> Bool { a.hash == b.hash && a.labels == b.labels }
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

    public func snapshot() -> [(labels: LabelValues, value: UInt64)] {
        var all: [(labels: LabelValues, value: UInt64)] = []
        for stripe in self.stripes {
            stripe.series.withLock { series in
                all.reserveCapacity(all.count + series.count)
                for (key, value) in series { all.append((key.labels, value)) }
            }
        }
        all.sort { $0.labels.lexicographicallyPrecedes($1.labels) }
        return all
    }
}
