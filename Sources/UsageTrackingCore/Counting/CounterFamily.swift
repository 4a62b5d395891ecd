import Glibc
import Synchronization

/// The label values of one series, in the order of its family's label names.
public typealias LabelValues = [String]

/// The counters of one metric family, keyed by label values, within its budgets.
///
/// Contract:
/// - Concurrency: `increment` may be called from any thread at any time. Every increment that
///   returns is counted exactly once; none is lost or doubled under contention.
/// - Cost: insert and increment are O(1) amortised. Series are spread over independently locked
///   stripes by hash, so concurrent callbacks for different series rarely wait on each other, and
///   a lock is only ever held for one dictionary operation. An existing series takes its stripe's
///   lock only; only a series not seen before takes the family's budget lock.
/// - Budgets: each label keeps at most `maxValues[i]` distinct values (values in `freeValues[i]`,
///   the known route templates, are not counted); a new value beyond it is counted under
///   `__other__` on that label alone. At most `maxSeries` series are created from callbacks; a
///   new one beyond it is counted in the series whose every label is `__other__` (which may be
///   the one series over the cap). Nothing is ever evicted, so the sum over the family is
///   always the sum of what was counted.
/// - Hold: a series is exposed by `snapshot` as 0 until it is `newSeriesHold` nanoseconds old,
///   so every scraper sees it start from 0 and `increase()` counts its first increments.
/// - Reading: `snapshot` copies one stripe at a time, so exposition never holds a lock across the
///   whole store and never blocks increments for longer than one stripe's copy. A snapshot is
///   exact per series; increments that land during it may or may not be included.
/// - Identity: label values are compared by their UTF-8 bytes, as Prometheus compares them, not
///   by `String`'s canonical equivalence: `K` and the Kelvin sign, or NFC and NFD `café`, are
///   distinct series, each exposed with exactly the bytes it was counted under.
/// - Ordering: `snapshot` returns series sorted by the bytes of their label values, so exposition
///   is stable and agrees with identity.
/// - Ids: each series gets an id from `ids` when created (or restored), shared by every family,
///   so the ledger can name a series by one integer (see `UsageLedger`).
/// - Counts only grow. Series are never removed while the process runs.
public final class CounterFamily: Sendable {
    public let name: String
    public let help: String
    public let labelNames: [String]
    public let maxSeries: Int
    /// Per label; `Int.max` where unbounded.
    public let maxValues: [Int]
    private let freeValues: [Set<ExactString>]
    private let newSeriesHold: UInt64
    private let clock: @Sendable () -> UInt64
    private let stripes: [Stripe]
    private let budget: Mutex<Budget>
    private let overflowKey: SeriesKey
    private let ids: SeriesIDs

    private struct Series {
        var count: UInt64
        /// The clock's reading when it was created (0 when no hold is set, and for restored
        /// series, which Prometheus has seen before).
        let created: UInt64
        let id: Int64
        /// False for a series `reserve` created that nothing has been added to yet: it is not
        /// exposed, so a callback the ledger then fails to commit leaves no trace.
        var exposed = true
    }

    private final class Stripe: Sendable {
        let series = Mutex<[SeriesKey: Series]>([:])
    }

    private struct Budget {
        var values: [Set<ExactString>]
        /// Series created within `maxSeries` (the overflow series is outside it).
        var series = 0
        var labelOverflows: [UInt64]
        var seriesOverflows: UInt64 = 0
    }

    /// Label values with their hash computed once: it picks the stripe and keys the dictionary.
    /// Hash and equality both use the UTF-8 bytes (see Identity above).
    struct SeriesKey: Hashable, Sendable {
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
        /// What the stripe's dictionary buckets by: `hash` is a finished SipHash already, so it is
        /// not hashed a second time. Rotated, so that the buckets take bits the stripe did not.
        func _rawHashValue(seed: Int) -> Int {
            let bits = UInt(bitPattern: self.hash)
            return Int(bitPattern: bits >> 32 | bits << 32) ^ seed
        }
    }

    private func stripe(for key: SeriesKey) -> Stripe {
        self.stripes[Int(UInt(bitPattern: key.hash) % UInt(self.stripes.count))]
    }

    public init(
        name: String, help: String, labelNames: [String], stripes: Int = 16, maxSeries: Int = .max, maxValues: [Int]? = nil,
        freeValues: [Set<String>]? = nil, newSeriesHoldNanoseconds: UInt64 = 0,
        clock: @escaping @Sendable () -> UInt64 = monotonicNanoseconds, ids: SeriesIDs = SeriesIDs()
    ) {
        precondition(stripes > 0)
        self.name = name
        self.help = help
        self.labelNames = labelNames
        self.maxSeries = maxSeries
        self.maxValues = maxValues ?? labelNames.map { _ in .max }
        precondition(self.maxValues.count == labelNames.count)
        self.freeValues = (freeValues ?? labelNames.map { _ in [] }).map { Set($0.map(ExactString.init)) }
        self.newSeriesHold = newSeriesHoldNanoseconds
        self.clock = clock
        self.stripes = (0..<stripes).map { _ in Stripe() }
        self.budget = Mutex(Budget(values: labelNames.map { _ in [] }, labelOverflows: labelNames.map { _ in 0 }))
        self.overflowKey = SeriesKey(labelNames.map { _ in MeteringSchema.overflowValue })
        self.ids = ids
    }

    /// Adds `amount` to the series of `labelValues` (or the one the budgets fold it into) and
    /// returns that series.
    @discardableResult
    public func increment(_ labelValues: LabelValues, by amount: UInt64 = 1) -> SeriesHandle {
        precondition(labelValues.count == self.labelNames.count, "\(self.name): wrong number of label values")
        let key = SeriesKey(labelValues)
        if let id = Self.add(amount, to: key, in: self.stripe(for: key)) { return SeriesHandle(id: id, key: key) }
        return self.insert(labelValues, amount, exposed: true)
    }

    /// The series `labelValues` would be counted in, created (unexposed, at 0) where new, with no
    /// count added: the ledger's `always` mode counts a callback with `add` once it is committed.
    public func reserve(_ labelValues: LabelValues) -> SeriesHandle {
        precondition(labelValues.count == self.labelNames.count, "\(self.name): wrong number of label values")
        let key = SeriesKey(labelValues)
        if let id = Self.add(0, to: key, in: self.stripe(for: key), exposing: false) { return SeriesHandle(id: id, key: key) }
        return self.insert(labelValues, 0, exposed: false)
    }

    /// Adds to a series returned by `increment` or `reserve`, exposing it.
    public func add(_ amount: UInt64, to series: SeriesHandle) {
        let added = Self.add(amount, to: series.key, in: self.stripe(for: series.key))
        precondition(added != nil, "\(self.name): a series handle from another family")
    }

    /// Adds to an existing series and returns its id; nil when there is none.
    private static func add(_ amount: UInt64, to key: SeriesKey, in stripe: Stripe, exposing: Bool = true) -> Int64? {
        stripe.series.withLock { series in
            guard let index = series.index(forKey: key) else { return nil }
            return Self.add(amount, to: &series.values[index], exposing: exposing)
        }
    }

    /// One access to the stored series for the count, the exposure and the id.
    private static func add(_ amount: UInt64, to series: inout Series, exposing: Bool) -> Int64 {
        series.count &+= amount
        if exposing { series.exposed = true }
        return series.id
    }

    /// Puts back a series read from the ledger at startup, with its id and count, before any
    /// callback arrives. Its values count against the budgets, but it is never folded (it
    /// exists already), and it is not held at 0 (Prometheus has seen it before). False, and
    /// nothing changed, when the family holds these labels already.
    @discardableResult
    public func restore(_ labelValues: LabelValues, count: UInt64, id: Int64) -> Bool {
        precondition(labelValues.count == self.labelNames.count, "\(self.name): wrong number of label values")
        let key = SeriesKey(labelValues)
        return self.budget.withLock { budget in
            guard self.stripe(for: key).series.withLock({ $0[key] == nil }) else { return false }
            if key != self.overflowKey { budget.series += 1 }
            for index in labelValues.indices where self.maxValues[index] < .max {
                let value = ExactString(labelValues[index])
                if value.value != MeteringSchema.overflowValue, !self.freeValues[index].contains(value) { budget.values[index].insert(value) }
            }
            self.stripe(for: key).series.withLock { $0[key] = Series(count: count, created: 0, id: id) }
            return true
        }
    }

    /// A series not seen before: spends the budgets, or folds into `__other__`. Serialised by the
    /// budget lock, so two callbacks creating the same series cannot both create it.
    private func insert(_ labelValues: LabelValues, _ amount: UInt64, exposed: Bool) -> SeriesHandle {
        self.budget.withLock { budget in
            var labels = labelValues
            var newValues: [(label: Int, value: ExactString)] = []
            for index in labels.indices where self.maxValues[index] < .max {
                let value = ExactString(labels[index])
                if self.freeValues[index].contains(value) || budget.values[index].contains(value) { continue }
                if budget.values[index].count + newValues.count(where: { $0.label == index }) < self.maxValues[index] {
                    newValues.append((index, value))
                } else {
                    labels[index] = MeteringSchema.overflowValue
                    budget.labelOverflows[index] &+= 1
                }
            }
            var key = SeriesKey(labels)
            // Folding may have led to a series that exists; so may a callback that raced this one.
            if let id = Self.add(amount, to: key, in: self.stripe(for: key), exposing: exposed) { return SeriesHandle(id: id, key: key) }
            if budget.series >= self.maxSeries {
                budget.seriesOverflows &+= 1
                key = self.overflowKey
                if let id = Self.add(amount, to: key, in: self.stripe(for: key), exposing: exposed) { return SeriesHandle(id: id, key: key) }
            } else {
                budget.series += 1
                for (index, value) in newValues { budget.values[index].insert(value) }
            }
            let created = self.newSeriesHold > 0 ? self.clock() : 0
            let id = self.ids.next()
            self.stripe(for: key).series.withLock { $0[key] = Series(count: amount, created: created, id: id, exposed: exposed) }
            return SeriesHandle(id: id, key: key)
        }
    }

    /// The current value of one series (0 when it was never incremented), whatever the hold.
    public func value(_ labelValues: LabelValues) -> UInt64 {
        let key = SeriesKey(labelValues)
        return self.stripe(for: key).series.withLock { $0[key]?.count ?? 0 }
    }

    public var seriesCount: Int {
        self.stripes.reduce(0) { count, stripe in count + stripe.series.withLock { $0.values.count(where: \.exposed) } }
    }

    /// Budget use, for the self-metrics: distinct values held and callbacks folded, per label,
    /// and new series sent to the overflow series.
    public func budgetUse() -> (values: [Int], labelOverflows: [UInt64], seriesOverflows: UInt64) {
        self.budget.withLock { budget in (budget.values.map(\.count), budget.labelOverflows, budget.seriesOverflows) }
    }

    /// The series for which `isIncluded` holds, with their counts (no hold applied: this is for
    /// people asking what was counted), in no particular order, copied one stripe at a time like
    /// `snapshot`. `isIncluded` runs under a stripe's lock, so it must be cheap (a comparison of
    /// one label), and it must not touch this family.
    public func series(where isIncluded: (LabelValues) -> Bool = { _ in true }) -> [(labels: LabelValues, value: UInt64)] {
        var all: [(labels: LabelValues, value: UInt64)] = []
        for stripe in self.stripes {
            stripe.series.withLock { series in
                for (key, value) in series where value.exposed && isIncluded(key.labels) { all.append((key.labels, value.count)) }
            }
        }
        return all
    }

    /// Hands `body` the series of one stripe at a time (in no particular order, with their counts),
    /// each copied under its stripe's lock and handed over after the lock is released, so `body`
    /// may take its time. Memory: one stripe's copy at a time, reused.
    public func forEachStripe(_ body: ([(labels: LabelValues, value: UInt64)]) -> Void) {
        var chunk: [(labels: LabelValues, value: UInt64)] = []
        for stripe in self.stripes {
            chunk.removeAll(keepingCapacity: true)
            stripe.series.withLock { series in
                chunk.reserveCapacity(series.count)
                for (key, value) in series where value.exposed { chunk.append((key.labels, value.count)) }
            }
            body(chunk)
        }
    }

    public func snapshot() -> [(labels: LabelValues, value: UInt64)] {
        var all: [(labels: LabelValues, value: UInt64)] = []
        let hold = self.newSeriesHold
        let now = hold > 0 ? self.clock() : 0
        for stripe in self.stripes {
            stripe.series.withLock { series in
                all.reserveCapacity(all.count + series.count)
                for (key, value) in series where value.exposed {
                    // Young series read 0: see Hold above.
                    let young = hold > 0 && value.created != 0 && (value.created > now || now - value.created < hold)
                    all.append((key.labels, young ? 0 : value.count))
                }
            }
        }
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

/// One series as counted: its labels after the budgets had their say, and its id.
public struct SeriesHandle: Sendable {
    public let id: Int64
    let key: CounterFamily.SeriesKey
    public var labels: LabelValues { self.key.labels }
}

/// Hands out series ids, unique across every family of a process and, once the ledger has
/// advanced it past what it holds, across restarts.
public final class SeriesIDs: Sendable {
    private let last = Atomic<Int64>(0)

    public init() {}

    func next() -> Int64 { self.last.wrappingAdd(1, ordering: .relaxed).newValue }

    /// Makes every later id greater than `id` (ids read back from the ledger).
    public func advance(past id: Int64) {
        _ = self.last.max(id, ordering: .relaxed)
    }
}

/// A string that hashes and compares by its UTF-8 bytes, for the budgets' value sets.
struct ExactString: Hashable, Sendable {
    let value: String

    init(_ value: String) {
        self.value = value
    }

    static func == (a: ExactString, b: ExactString) -> Bool { a.value.hasSameBytes(as: b.value) }
    func hash(into hasher: inout Hasher) { self.value.hashBytes(into: &hasher) }
}

/// Nanoseconds on the monotonic clock, which wall-clock changes do not move.
public func monotonicNanoseconds() -> UInt64 {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
}
