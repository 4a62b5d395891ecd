import Synchronization

/// Every metric the service exposes, and the one place that renders them.
public final class UsageMetrics: Sendable {
    public static let version = "0.1.0"

    /// The usage being accounted: one series per user, groups and path.
    public let requests = CounterFamily(
        name: "llm_requests_total",
        help: "Successful LLM requests labelled by user, group and path.",
        labelNames: ["user", "groups", "path"]
    )

    /// What happened to each callback, indexed like `CallbackOutcome.allCases`. A fixed set, so
    /// plain atomics: recording an outcome costs no lock, hash or allocation.
    private let outcomes = CallbackOutcome.allCases.map { _ in OutcomeCounter() }
    private final class OutcomeCounter: Sendable {
        let value = Atomic<UInt64>(0)
    }

    public static let durationName = "usage_tracking_http_request_duration_seconds"
    public static let routes = ["track", "metrics", "healthz", "readyz", "debug", "status", "other"]
    /// One histogram per route, indexed like `routes`.
    private let durations: [DurationHistogram] = UsageMetrics.routes.map { _ in DurationHistogram() }

    /// Families whose series count is reported in `usage_tracking_series`.
    public var countedFamilies: [CounterFamily] { [self.requests] }

    /// Log lines dropped because the log reader fell behind; the log writer lives in the server.
    private let droppedLogLines: @Sendable () -> UInt64

    public init(droppedLogLines: @escaping @Sendable () -> UInt64 = { 0 }) {
        self.droppedLogLines = droppedLogLines
    }

    public func record(_ outcome: CallbackOutcome) {
        self.outcomes[outcome.index].value.wrappingAdd(1, ordering: .relaxed)
    }

    public func count(of outcome: CallbackOutcome) -> UInt64 {
        self.outcomes[outcome.index].value.load(ordering: .relaxed)
    }

    /// Every outcome with its count, in name order (all present from the start, at 0).
    public var outcomeCounts: [(outcome: CallbackOutcome, count: UInt64)] {
        CallbackOutcome.allCases.sorted { $0.rawValue < $1.rawValue }.map { ($0, self.count(of: $0)) }
    }

    public func observe(route: Int, nanoseconds: UInt64) {
        self.durations[route].observe(nanoseconds: nanoseconds)
    }

    public func render() -> [UInt8] {
        let usage = self.requests.snapshot()
        var writer = ExpositionWriter(capacity: 4096 + usage.count * 96)
        Self.write(self.requests, usage, to: &writer)
        let callbacks = "usage_tracking_callbacks_total"
        writer.family(callbacks, help: "Callbacks received on /track, by outcome: accepted, or the reason they were not counted.", type: .counter)
        for (outcome, count) in self.outcomeCounts {
            writer.sample(callbacks, labels: ["outcome"], values: [outcome.rawValue], value: count)
        }

        writer.family(Self.durationName, help: "Time from a request's head arriving to its reply being written, by route.", type: .histogram)
        for (index, route) in Self.routes.enumerated() {
            self.durations[index].write(Self.durationName, labels: ["route"], values: [route], to: &writer)
        }

        writer.family("usage_tracking_series", help: "Series currently held, by metric.", type: .gauge)
        for family in self.countedFamilies {
            writer.sample("usage_tracking_series", labels: ["metric"], values: [family.name], value: UInt64(family.seriesCount))
        }

        writer.family("usage_tracking_log_dropped_total", help: "Log lines dropped because standard output was not read fast enough.", type: .counter)
        writer.sample("usage_tracking_log_dropped_total", value: self.droppedLogLines())

        writer.family("usage_tracking_build_info", help: "Build information; the value is always 1.", type: .gauge)
        writer.sample("usage_tracking_build_info", labels: ["version", "swift"], values: [Self.version, Self.swiftVersion], value: UInt64(1))

        ProcessMetrics.read().write(to: &writer)
        return writer.bytes
    }

    private static func write(_ family: CounterFamily, _ series: [(labels: LabelValues, value: UInt64)], to writer: inout ExpositionWriter) {
        writer.family(family.name, help: family.help, type: .counter)
        for (labels, value) in series {
            writer.sample(family.name, labels: family.labelNames, values: labels, value: value)
        }
    }

    static var swiftVersion: String {
        #if compiler(>=6.3)
        "6.3"
        #elseif compiler(>=6.2)
        "6.2"
        #elseif compiler(>=6.1)
        "6.1"
        #else
        "6.0"
        #endif
    }
}
