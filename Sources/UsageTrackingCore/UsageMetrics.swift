/// Every metric the service exposes, and the one place that renders them.
public final class UsageMetrics: Sendable {
    public static let version = "0.1.0"

    /// The usage being accounted: one series per user, groups and path.
    public let requests = CounterFamily(
        name: "llm_requests_total",
        help: "Successful LLM requests labelled by user, group and path.",
        labelNames: ["user", "groups", "path"]
    )

    /// What happened to each callback; every outcome is present from the start, at 0.
    public let callbacks = CounterFamily(
        name: "usage_tracking_callbacks_total",
        help: "Callbacks received on /track, by outcome: accepted, or the reason they were not counted.",
        labelNames: ["outcome"],
        stripes: 1
    )

    public static let durationName = "usage_tracking_http_request_duration_seconds"
    public static let routes = ["track", "metrics", "healthz", "readyz", "debug", "other"]
    /// One histogram per route, indexed like `routes`.
    private let durations: [DurationHistogram] = UsageMetrics.routes.map { _ in DurationHistogram() }

    /// Families whose series count is reported in `usage_tracking_series`.
    public var countedFamilies: [CounterFamily] { [self.requests] }

    public init() {
        for outcome in CallbackOutcome.allCases { self.callbacks.increment([outcome.rawValue], by: 0) }
    }

    public func record(_ outcome: CallbackOutcome) {
        self.callbacks.increment([outcome.rawValue])
    }

    public func observe(route: Int, nanoseconds: UInt64) {
        self.durations[route].observe(nanoseconds: nanoseconds)
    }

    public func render() -> [UInt8] {
        let usage = self.requests.snapshot()
        var writer = ExpositionWriter(capacity: 4096 + usage.count * 96)
        Self.write(self.requests, usage, to: &writer)
        Self.write(self.callbacks, self.callbacks.snapshot(), to: &writer)

        writer.family(Self.durationName, help: "Time from a request's head arriving to its reply being written, by route.", type: .histogram)
        for (index, route) in Self.routes.enumerated() {
            self.durations[index].write(Self.durationName, labels: ["route"], values: [route], to: &writer)
        }

        writer.family("usage_tracking_series", help: "Series currently held, by metric.", type: .gauge)
        for family in self.countedFamilies {
            writer.sample("usage_tracking_series", labels: ["metric"], values: [family.name], value: UInt64(family.seriesCount))
        }

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
