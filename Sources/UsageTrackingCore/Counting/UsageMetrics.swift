import Synchronization

/// Every metric the service exposes, and the one place that renders them.
public final class UsageMetrics: Sendable {
    public static let version = "0.1.0"

    /// The usage being accounted, one family per metric of the schema, in its order.
    public let families: [CounterFamily]
    public let schema: MeteringSchema

    /// The first family: `llm_requests_total{user,groups,path}` under the built-in schema.
    public var requests: CounterFamily { self.families[0] }
    /// The token families (`schema.tokens`), after the `/track` ones in `families`; empty unless
    /// the service reads model answers (`--ext-proc-port`).
    public var tokenFamilies: ArraySlice<CounterFamily> { self.families[self.schema.metrics.count...] }
    /// Model answers' streams by outcome, indexed like `TokenStreamOutcome.allCases`; empty
    /// unless the service reads model answers.
    private let tokenStreams: [OutcomeCounter]

    /// What happened to each callback, indexed like `CallbackOutcome.allCases`. A fixed set, so
    /// plain atomics: recording an outcome costs no lock, hash or allocation.
    private let outcomes = CallbackOutcome.allCases.map { _ in OutcomeCounter() }
    final class OutcomeCounter: Sendable {
        let value = Atomic<UInt64>(0)
    }

    public static let durationName = "usage_tracking_http_request_duration_seconds"
    public static let routes = ["track", "metrics", "healthz", "readyz", "debug", "status", "usage", "other"]
    /// One histogram per route, indexed like `routes`.
    private let durations: [DurationHistogram] = UsageMetrics.routes.map { _ in DurationHistogram() }

    /// Families whose series count is reported in `usage_tracking_series`.
    public var countedFamilies: [CounterFamily] { self.families }

    /// Log lines dropped because the log reader fell behind; the log writer lives in the server.
    private let droppedLogLines: @Sendable () -> UInt64
    /// Ids for the series of every family (see `CounterFamily`, Ids).
    public let seriesIDs = SeriesIDs()
    /// The recent request ids, when callbacks are deduplicated.
    public let requestIDs: RequestIDWindow?
    /// The ledger's health, when there is a ledger (`--state-dir`).
    public let ledger: LedgerHealth?
    /// The Envoy ext_proc listener's streams and errors, when it is on (`--ext-proc-port`).
    public let extProc: ExtProcCounters?

    /// `newSeriesHoldNanoseconds`: see `CounterFamily` (Hold); `clock` is for tests.
    public init(
        schema: MeteringSchema = .default, newSeriesHoldNanoseconds: UInt64 = 0,
        clock: @escaping @Sendable () -> UInt64 = monotonicNanoseconds,
        droppedLogLines: @escaping @Sendable () -> UInt64 = { 0 },
        requestIDs: RequestIDWindow? = nil, ledger: LedgerHealth? = nil, extProc: ExtProcCounters? = nil
    ) {
        self.schema = schema
        self.extProc = extProc
        self.requestIDs = requestIDs
        self.ledger = ledger
        let templates = RouteTemplates(RouteTemplates.builtIn + schema.routes).templates
        let ids = self.seriesIDs
        self.families = (schema.metrics + (extProc == nil ? [] : schema.tokens)).map { metric in
            CounterFamily(
                name: metric.name, help: metric.help, labelNames: metric.labels.map(\.name),
                maxSeries: metric.maxSeries, maxValues: metric.labels.map(\.maxValues),
                // Known routes never spend a budget, so a scanner cannot push real traffic out.
                freeValues: metric.labels.map { $0.kind == .route ? templates : [] },
                newSeriesHoldNanoseconds: newSeriesHoldNanoseconds, clock: clock, ids: ids
            )
        }
        self.droppedLogLines = droppedLogLines
        self.tokenStreams = extProc != nil ? TokenStreamOutcome.allCases.map { _ in OutcomeCounter() } : []
    }

    /// Counts an accepted callback in every family (a family whose value field was absent skips
    /// it). The callback is fully validated before this, so either all families count it or,
    /// when it was refused, none does.
    public func count(_ callback: Callback) {
        // A callback's families are the `/track` ones; a token count's cover them all.
        for index in callback.families.indices {
            if let amount = callback.amount(forFamily: index) { self.families[index].increment(callback.labels(ofFamily: index), by: amount) }
        }
    }

    /// `count`, returning the series counted, per family (nil where skipped), for the ledger.
    /// Apart from `count` because collecting them costs an allocation per callback.
    public func countReturningSeries(_ callback: Callback) -> [SeriesHandle?] {
        callback.families.indices.map { index in
            callback.amount(forFamily: index).map { self.families[index].increment(callback.labels(ofFamily: index), by: $0) }
        }
    }

    /// The series `callback` would count in, without counting it (see `CounterFamily.reserve`):
    /// the ledger's `always` mode counts only once the increment is committed (`add`).
    public func resolve(_ callback: Callback) -> [SeriesHandle?] {
        callback.families.indices.map { index in
            callback.amount(forFamily: index).map { _ in self.families[index].reserve(callback.labels(ofFamily: index)) }
        }
    }

    /// Counts a resolved callback.
    public func add(_ series: [SeriesHandle?], amounts: [UInt64?]) {
        for (index, handle) in series.enumerated() {
            if let handle, let amount = amounts.isEmpty ? 1 : amounts[index] { self.families[index].add(amount, to: handle) }
        }
    }

    public func record(_ outcome: CallbackOutcome, count: UInt64 = 1) {
        self.outcomes[outcome.index].value.wrappingAdd(count, ordering: .relaxed)
    }

    /// An outcome's count read back from the ledger. Added, not set: a ledger reached only after
    /// the listener opened restores on top of the refusals counted meanwhile (which its next
    /// commit writes).
    public func restore(_ outcome: CallbackOutcome, count: UInt64) {
        self.outcomes[outcome.index].value.wrappingAdd(count, ordering: .relaxed)
    }

    public static let callbacksName = "usage_tracking_callbacks_total"

    /// Per family, the index of the token type label (token families only, else nil).
    public var tokenTypeLabels: [Int?] {
        self.families.indices.map { index in
            index < self.schema.metrics.count ? nil
                : self.schema.tokens[index - self.schema.metrics.count].labels.firstIndex { $0.source == .body(MeteringSchema.TokenField.type) }
        }
    }

    /// Every token stream outcome with its count, in name order; empty without ext_proc.
    public var tokenStreamCounts: [(outcome: TokenStreamOutcome, count: UInt64)] {
        self.tokenStreams.isEmpty ? [] : TokenStreamOutcome.allCases.sorted { $0.rawValue < $1.rawValue }.map { ($0, self.count(of: $0)) }
    }

    public func record(_ outcome: TokenStreamOutcome) {
        self.tokenStreams[TokenStreamOutcome.allCases.firstIndex(of: outcome)!].value.wrappingAdd(1, ordering: .relaxed)
    }

    public func count(of outcome: TokenStreamOutcome) -> UInt64 {
        self.tokenStreams.isEmpty ? 0 : self.tokenStreams[TokenStreamOutcome.allCases.firstIndex(of: outcome)!].value.load(ordering: .relaxed)
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
        let usage = self.families.map { $0.snapshot() }
        var writer = ExpositionWriter(capacity: 4096 + usage.reduce(0) { $0 + $1.count } * 96)
        for (family, series) in zip(self.families, usage) { Self.write(family, series, to: &writer) }
        let callbacks = Self.callbacksName
        writer.family(callbacks, help: "Callbacks received on /track, by outcome: accepted, or the reason they were not counted.", type: .counter)
        for (outcome, count) in self.outcomeCounts {
            writer.sample(callbacks, labels: ["outcome"], values: [outcome.rawValue], value: count)
        }

        if !self.tokenStreams.isEmpty {
            let name = TokenStreamOutcome.metricName
            writer.family(name, help: "Model answers read through Envoy's External Processing filter, by outcome: counted, or why not.", type: .counter)
            for (outcome, count) in self.tokenStreamCounts {
                writer.sample(name, labels: ["outcome"], values: [outcome.rawValue], value: count)
            }
        }

        writer.family(Self.durationName, help: "Time from a request's head arriving to its reply being written, by route.", type: .histogram)
        for (index, route) in Self.routes.enumerated() {
            self.durations[index].write(Self.durationName, labels: ["route"], values: [route], to: &writer)
        }

        writer.family("usage_tracking_series", help: "Series currently held, by metric.", type: .gauge)
        for family in self.countedFamilies {
            writer.sample("usage_tracking_series", labels: ["metric"], values: [family.name], value: UInt64(family.seriesCount))
        }

        writer.family("usage_tracking_series_limit", help: "Series a metric may create before new ones are counted in its all-__other__ series.", type: .gauge)
        for family in self.families {
            writer.sample("usage_tracking_series_limit", labels: ["metric"], values: [family.name], value: UInt64(family.maxSeries))
        }
        let budgets = self.families.map { $0.budgetUse() }
        let overflow = "usage_tracking_label_overflow_total"
        writer.family(overflow, help: "Callbacks counted under __other__ on a label because its value budget was spent.", type: .counter)
        for (family, use) in zip(self.families, budgets) {
            for (index, label) in family.labelNames.enumerated() where family.maxValues[index] < .max {
                writer.sample(overflow, labels: ["metric", "label"], values: [family.name, label], value: use.labelOverflows[index])
            }
        }
        let seriesOverflow = "usage_tracking_series_overflow_total"
        writer.family(seriesOverflow, help: "Callbacks counted in the all-__other__ series because the metric's series budget was spent.", type: .counter)
        for (family, use) in zip(self.families, budgets) {
            writer.sample(seriesOverflow, labels: ["metric"], values: [family.name], value: use.seriesOverflows)
        }
        writer.family("usage_tracking_label_values", help: "Distinct values held per label, known routes excepted.", type: .gauge)
        for (family, use) in zip(self.families, budgets) {
            for (index, label) in family.labelNames.enumerated() where family.maxValues[index] < .max {
                writer.sample("usage_tracking_label_values", labels: ["metric", "label"], values: [family.name, label], value: UInt64(use.values[index]))
            }
        }
        writer.family("usage_tracking_label_values_limit", help: "Distinct values a label may hold before new ones are counted as __other__.", type: .gauge)
        for family in self.families {
            for (index, label) in family.labelNames.enumerated() where family.maxValues[index] < .max {
                writer.sample("usage_tracking_label_values_limit", labels: ["metric", "label"], values: [family.name, label], value: UInt64(family.maxValues[index]))
            }
        }

        if let requestIDs = self.requestIDs {
            writer.family("usage_tracking_dedupe_request_ids", help: "Request ids remembered to catch repeated callbacks.", type: .gauge)
            writer.sample("usage_tracking_dedupe_request_ids", value: UInt64(requestIDs.count))
            writer.family("usage_tracking_dedupe_evictions_total", help: "Request ids forgotten before their window ended because --dedupe-max-ids was reached.", type: .counter)
            writer.sample("usage_tracking_dedupe_evictions_total", value: requestIDs.evictions)
        }
        if let ledger = self.ledger {
            writer.family("usage_tracking_ledger_errors_total", help: "Ledger commits that failed (disk full, I/O error); see the log.", type: .counter)
            writer.sample("usage_tracking_ledger_errors_total", value: ledger.errors)
            writer.family("usage_tracking_ledger_commits_total", help: "Ledger commits that succeeded, heartbeats included; callbacks per commit is the batch size.", type: .counter)
            writer.sample("usage_tracking_ledger_commits_total", value: ledger.commits)
            writer.family("usage_tracking_ledger_last_commit_timestamp_seconds", help: "Unix time of the ledger's last successful commit (at least every 30 s while healthy).", type: .gauge)
            writer.sample("usage_tracking_ledger_last_commit_timestamp_seconds", value: ledger.lastCommit)
        }
        if let extProc = self.extProc {
            writer.family("usage_tracking_ext_proc_streams_open", help: "Envoy ext_proc streams open now.", type: .gauge)
            writer.sample("usage_tracking_ext_proc_streams_open", value: UInt64(extProc.streamsOpen))
            let errors = "usage_tracking_ext_proc_errors_total"
            writer.family(errors, help: "Envoy ext_proc streams refused or ended by a bound or a bad message, by reason.", type: .counter)
            for reason in ExtProcCounters.Reason.allCases {
                writer.sample(errors, labels: ["reason"], values: [reason.rawValue], value: extProc.count(of: reason))
            }
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
