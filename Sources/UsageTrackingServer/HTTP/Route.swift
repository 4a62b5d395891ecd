/// The endpoints the server knows; the raw values index `UsageMetrics.routes`.
enum Route: Int {
    case track, metrics, healthz, readyz, debug, status, usage, other

    init(uri: String) {
        // The usual target, a bare path (its own `path(of:)`), is compared as the String it is:
        // no slicing, and none of Substring's generic comparison, on every request.
        let isBarePath = uri.hasPrefix("/") && !uri.utf8.contains(UInt8(ascii: "?"))
        self = Self.named(isBarePath ? uri : String(Self.path(of: uri)))
    }

    private static func named(_ path: String) -> Route {
        switch path {
        case "/track": .track
        case "/metrics": .metrics
        case "/healthz": .healthz
        case "/readyz": .readyz
        case "/debug": .debug
        case "/": .status
        case "/usage": .usage
        default: .other
        }
    }

    /// The path of a request target: the query dropped, and the scheme and authority of an
    /// absolute-form target (`POST http://host/track`, as proxies send) too.
    static func path(of uri: String) -> Substring {
        var target = Substring(uri)
        // String's `hasPrefix`, not Substring's generic one: same answer, a fraction of the cost.
        if !uri.hasPrefix("/"), let scheme = target.firstRange(of: "://") {
            let afterAuthority = target[scheme.upperBound...].firstIndex(of: "/") ?? target.endIndex
            target = target[afterAuthority...]
            if target.isEmpty { return "/" }
        }
        return target.utf8.firstIndex(of: UInt8(ascii: "?")).map { target[..<$0] } ?? target
    }
}
