import Synchronization

/// A latency histogram with fixed buckets, exact under concurrent observation.
/// The sum is kept in whole nanoseconds so that it never loses precision.
public final class DurationHistogram: Sendable {
    /// Upper bounds in seconds: fine below a millisecond, where `/track` lives, up to the
    /// 200 ms auth budget and beyond for `/metrics` at high cardinality.
    public static let bounds: [Double] = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
    ]
    static let boundLabels = bounds.map { ExpositionWriter.format($0) } + ["+Inf"]

    private struct State {
        var buckets = [UInt64](repeating: 0, count: DurationHistogram.bounds.count + 1)
        var count: UInt64 = 0
        var sumNanoseconds: UInt64 = 0
    }

    private let state = Mutex(State())

    public init() {}

    public func observe(nanoseconds: UInt64) {
        let seconds = Double(nanoseconds) / 1e9
        let bucket = Self.bounds.firstIndex { seconds <= $0 } ?? Self.bounds.count
        self.state.withLock { state in
            state.buckets[bucket] &+= 1
            state.count &+= 1
            state.sumNanoseconds &+= nanoseconds
        }
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples; `labels`/`values` come before `le`.
    public func write(_ name: String, labels: [String], values: [String], to writer: inout ExpositionWriter) {
        let state = self.state.withLock { $0 }
        var cumulative: UInt64 = 0
        for (index, count) in state.buckets.enumerated() {
            cumulative += count
            writer.sample(name + "_bucket", labels: labels + ["le"], values: values + [Self.boundLabels[index]], value: cumulative)
        }
        writer.sample(name + "_sum", labels: labels, values: values, value: Double(state.sumNanoseconds) / 1e9)
        writer.sample(name + "_count", labels: labels, values: values, value: state.count)
    }
}
