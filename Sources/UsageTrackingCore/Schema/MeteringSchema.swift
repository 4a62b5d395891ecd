/// What is counted: the metric families, their labels, where each label's value comes from, and
/// the budgets that bound them. Loaded from `--config` (see `MeteringSchema.load`) or the
/// built-in `default`, which is the original `llm_requests_total{user,groups,path}`.
public struct MeteringSchema: Sendable, Equatable {
    /// Families counted per `/track` callback.
    public var metrics: [Metric]
    /// Families counted per model answer read through Envoy's External Processing filter: one
    /// increment per token type the answer reports. Their labels come from the request's headers
    /// (`header:`, `:path` included) and from the answer (`from: model`, `from: type`); each has
    /// exactly one `type` label, since the types overlap (cached input is part of input) and
    /// must never be summed into one series.
    public var tokens: [Metric]
    /// Route templates added to the built-in ones for labels of kind `route`.
    public var routes: [String]

    public init(metrics: [Metric], tokens: [Metric] = MeteringSchema.defaultTokens, routes: [String] = []) {
        self.metrics = metrics
        self.tokens = tokens
        self.routes = routes
    }

    public struct Metric: Sendable, Equatable {
        public var name: String
        public var help: String
        /// Series held at most; a new series beyond it is counted in the all-`__other__` series.
        public var maxSeries: Int
        /// Where the increment comes from; nil adds 1 per callback.
        public var value: ValueSource?
        public var labels: [Label]

        public init(name: String, help: String, maxSeries: Int = MeteringSchema.defaultMaxSeries, value: ValueSource? = nil, labels: [Label]) {
            self.name = name
            self.help = help
            self.maxSeries = maxSeries
            self.value = value
            self.labels = labels
        }
    }

    public struct ValueSource: Sendable, Equatable {
        /// A body field (dotted into nested JSON objects) holding a non-negative integer.
        public var from: String
        /// Without it a callback lacking the field is refused; otherwise this family skips it.
        public var required: Bool

        public init(from: String, required: Bool = false) {
            self.from = from
            self.required = required
        }
    }

    public enum Source: Sendable, Equatable, Hashable {
        /// A body field: a JSON member (dots walk into nested objects) or a form field name.
        case body(String)
        /// A request header, by name (matched case-insensitively).
        case header(String)

        /// How problems name it: the field itself, or `header x-auth-mode`.
        public var problemName: String {
            switch self {
            case .body(let name): name
            case .header(let name): "header \(name)"
            }
        }
    }

    public enum Kind: String, Sendable, Equatable, CaseIterable {
        /// Trimmed of surrounding spaces.
        case string
        /// A string, a comma list or an array; trimmed, de-duplicated, sorted and comma-joined.
        case set
        /// A path: query and fragment dropped, then matched against the route templates.
        case route
    }

    public enum Hash: String, Sendable, Equatable, CaseIterable {
        case hmacSHA256 = "hmac-sha256"
    }

    public struct Label: Sendable, Equatable {
        public var name: String
        public var source: Source
        public var kind: Kind
        public var required: Bool
        /// Used when the value is absent or empty and not required.
        public var defaultValue: String
        /// Distinct values kept for this label across the family; beyond it, `__other__`.
        public var maxValues: Int
        public var hash: Hash?

        public init(
            name: String, source: Source, kind: Kind = .string, required: Bool = false, defaultValue: String = "",
            maxValues: Int = MeteringSchema.defaultMaxValues, hash: Hash? = nil
        ) {
            self.name = name
            self.source = source
            self.kind = kind
            self.required = required
            self.defaultValue = defaultValue
            self.maxValues = maxValues
            self.hash = hash
        }
    }

    /// The value a label takes when its budget is spent, and which no callback may send.
    public static let overflowValue = "__other__"
    public static let defaultMaxSeries = 250_000
    public static let defaultMaxValues = 1_000
    public static let maxSeriesRange = 1...100_000_000
    public static let maxValuesRange = 1...10_000_000
    /// Bounds on the schema itself, so a config cannot make every callback expensive.
    public static let maximumMetrics = 16
    public static let maximumLabels = 16
    public static let maximumRoutes = 1_000

    /// Today's family and normalisation, within the default budgets.
    public static let `default` = MeteringSchema(metrics: [
        Metric(
            name: "llm_requests_total",
            help: "Successful LLM requests labelled by user, group and path.",
            maxSeries: 250_000,
            labels: [
                Label(name: "user", source: .body("user"), required: true, maxValues: 100_000),
                Label(name: "groups", source: .body("groups"), kind: .set, maxValues: 1_000),
                Label(name: "path", source: .body("path"), kind: .route, maxValues: 200),
            ]
        )
    ])

    /// The token families' built-in form: identity from the headers the AuthPolicy sets on
    /// success (Authorino overwrites whatever a client sent in them), the path as `/track`
    /// templates it, the model the answer names.
    public static let defaultTokens = [
        Metric(
            name: "llm_tokens_total",
            help: "Tokens in model answers by user, group, path, model and type (cached_input and cache_write are parts of input, reasoning of output).",
            maxSeries: 250_000,
            labels: [
                Label(name: "user", source: .header("x-usage-user"), required: true, maxValues: 100_000),
                Label(name: "groups", source: .header("x-usage-groups"), kind: .set, maxValues: 1_000),
                Label(name: "path", source: .header(":path"), kind: .route, maxValues: 200),
                Label(name: "model", source: .body(TokenField.model), defaultValue: "unknown", maxValues: 500),
                Label(name: "type", source: .body(TokenField.type), required: true, maxValues: 5),
            ]
        )
    ]

    /// What a token family's `from:` may name: the answer's model and the token type.
    public enum TokenField {
        public static let model = "model"
        public static let type = "type"
    }

    /// Whether any label is hashed, so a key is needed.
    public var needsHMACKey: Bool {
        (self.metrics + self.tokens).contains { $0.labels.contains { $0.hash != nil } }
    }

    /// Metric and label names as Prometheus allows them; `__` is reserved for its own labels.
    static func isValidMetricName(_ name: String) -> Bool {
        guard let first = name.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return false }
        return name.utf8.allSatisfy { isNameByte($0) || $0 == UInt8(ascii: ":") }
    }

    static func isValidLabelName(_ name: String) -> Bool {
        guard let first = name.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return false }
        return !name.hasPrefix("__") && name.utf8.allSatisfy(isNameByte)
    }

    private static func isNameByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"): true
        default: false
        }
    }
}
