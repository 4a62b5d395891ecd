/// One authorized request as Authorino reports it, after validation and normalisation.
public struct Callback: Sendable, Equatable {
    /// The identity being charged; never empty.
    public var user: String
    /// Groups trimmed, de-duplicated, sorted and comma-joined ("" when none were sent).
    public var groups: String
    /// The request path without its query string ("" when none was sent).
    public var path: String
    /// The gateway request's method and host: logged and shown in the debug view, not counted.
    public var method: String
    public var host: String

    public init(user: String, groups: String, path: String, method: String = "", host: String = "") {
        self.user = user
        self.groups = groups
        self.path = path
        self.method = method
        self.host = host
    }

    /// Equal when every field holds the same bytes: these become label values, which Prometheus
    /// compares by bytes, so `String`'s canonical equivalence would call different series equal.
    public static func == (a: Callback, b: Callback) -> Bool {
        a.user.hasSameBytes(as: b.user) && a.groups.hasSameBytes(as: b.groups) && a.path.hasSameBytes(as: b.path)
            && a.method.hasSameBytes(as: b.method) && a.host.hasSameBytes(as: b.host)
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
        }
    }
}
