/// The endpoints the server knows; the raw values index `UsageMetrics.routes`.
enum Route: Int {
    case track, metrics, healthz, readyz, debug, status, usage, other

    init(uri: String) {
        switch Self.path(of: uri) {
        case "/track": self = .track
        case "/metrics": self = .metrics
        case "/healthz": self = .healthz
        case "/readyz": self = .readyz
        case "/debug": self = .debug
        case "/": self = .status
        case "/usage": self = .usage
        default: self = .other
        }
    }

    /// The path of a request target: the query dropped, and the scheme and authority of an
    /// absolute-form target (`POST http://host/track`, as proxies send) too.
    static func path(of uri: String) -> Substring {
        var target = Substring(uri)
        if !target.hasPrefix("/"), let scheme = target.firstRange(of: "://") {
            let afterAuthority = target[scheme.upperBound...].firstIndex(of: "/") ?? target.endIndex
            target = target[afterAuthority...]
            if target.isEmpty { return "/" }
        }
        return target.utf8.firstIndex(of: UInt8(ascii: "?")).map { target[..<$0] } ?? target
    }
}
