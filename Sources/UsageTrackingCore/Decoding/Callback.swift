/// One authorized request as Authorino reports it, after validation and normalisation: the
/// label values it is counted under in every family, already templated and hashed.
public struct Callback: Sendable, Equatable {
    /// Every family's label values, one family after another, in the schema's order of families
    /// and labels: one array for them all, so that decoding a callback allocates once for them.
    public var labels: LabelValues
    /// Where each family's values lie in `labels`.
    public var families: [Range<Int>]
    /// The increment per family (nil: that family skips this callback); empty means 1 for all.
    public var amounts: [UInt64?]
    /// The values of the labels named `user`, `groups` and `path` (the first family that has
    /// them), as exposed, for the debug view and logs; "" when the schema has no such label.
    public var user: String
    public var groups: String
    public var path: String
    /// The gateway request's method and host: logged and shown in the debug view, not counted.
    public var method: String
    public var host: String

    /// A callback of the built-in schema, `llm_requests_total{user,groups,path}`.
    public init(user: String, groups: String, path: String, method: String = "", host: String = "") {
        self.init(labels: [user, groups, path], families: [0..<3], method: method, host: host, user: user, groups: groups, path: path)
    }

    public init(
        labels: LabelValues, families: [Range<Int>], amounts: [UInt64?] = [], method: String = "", host: String = "",
        user: String = "", groups: String = "", path: String = ""
    ) {
        self.labels = labels
        self.families = families
        self.amounts = amounts
        self.method = method
        self.host = host
        self.user = user
        self.groups = groups
        self.path = path
    }

    /// Family `index`'s label values; the array itself when the callback has one family.
    public func labels(ofFamily index: Int) -> LabelValues {
        let range = self.families[index]
        return range.count == self.labels.count ? self.labels : Array(self.labels[range])
    }

    /// Label values per family, in the schema's order: how tests read a callback.
    var series: [LabelValues] {
        self.families.indices.map { self.labels(ofFamily: $0) }
    }

    /// What family `index` adds for this callback, or nil when it skips it.
    public func amount(forFamily index: Int) -> UInt64? {
        self.amounts.isEmpty ? 1 : self.amounts[index]
    }

    /// Equal when every value holds the same bytes: these become label values, which Prometheus
    /// compares by bytes, so `String`'s canonical equivalence would call different series equal.
    public static func == (a: Callback, b: Callback) -> Bool {
        guard a.families.count == b.families.count, a.amount(forFamilies: a.families.count) == b.amount(forFamilies: b.families.count) else { return false }
        for (x, y) in zip(a.families, b.families) {
            guard x.count == y.count, zip(a.labels[x], b.labels[y]).allSatisfy({ $0.hasSameBytes(as: $1) }) else { return false }
        }
        return a.method.hasSameBytes(as: b.method) && a.host.hasSameBytes(as: b.host)
    }

    private func amount(forFamilies count: Int) -> [UInt64?] {
        (0..<count).map { self.amount(forFamily: $0) }
    }
}

/// Why a callback was not counted. Each case is one `outcome` label of
/// `usage_tracking_callbacks_total`, so the names are part of the metrics contract.
public enum CallbackOutcome: String, Sendable, CaseIterable {
    case accepted
    case malformed
    case invalid
    case tooLarge = "too_large"
    case unsupportedMediaType = "unsupported_media_type"
    case methodNotAllowed = "method_not_allowed"
    case unauthorized
    /// A repeat of a request id counted within the dedupe window: answered 202, not counted.
    case duplicate
    /// The ledger could not commit (`always` mode): answered 503, not counted.
    case unavailable

    /// Position in `allCases`, without building that array on every call.
    var index: Int {
        switch self {
        case .accepted: 0
        case .malformed: 1
        case .invalid: 2
        case .tooLarge: 3
        case .unsupportedMediaType: 4
        case .methodNotAllowed: 5
        case .unauthorized: 6
        case .duplicate: 7
        case .unavailable: 8
        }
    }
}

/// A callback that must not be counted, with every problem found in it.
public struct CallbackRejection: Error, Sendable, Equatable {
    public var outcome: CallbackOutcome
    public var problems: [String]
    /// Top-level field names present in the body (never their values), for the debug view.
    public var fieldNames: [String]

    public init(_ outcome: CallbackOutcome, _ problems: [String], fieldNames: [String] = []) {
        self.outcome = outcome
        self.problems = problems
        self.fieldNames = fieldNames
    }

    /// The short summary that goes into the `error` member of the reply.
    public var summary: String {
        switch self.outcome {
        case .accepted: "accepted"
        case .malformed: "malformed body"
        case .invalid: "invalid callback"
        case .tooLarge: "body too large"
        case .unsupportedMediaType: "unsupported media type"
        case .methodNotAllowed: "method not allowed"
        case .unauthorized: "unauthorized"
        case .duplicate: "duplicate"
        case .unavailable: "ledger unavailable"
        }
    }
}
