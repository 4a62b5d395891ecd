/// The endpoints the server knows; the raw values index `UsageMetrics.routes`.
enum Route: Int {
    case track, metrics, healthz, readyz, debug, status, usage, other

    /// The route of a request target's bytes. The usual target, a bare path, is matched as it
    /// is: no `String` is made on a callback's path.
    init(target: UnsafeRawBufferPointer) {
        guard target.first == UInt8(ascii: "/") else {
            var path = String(Self.path(of: String(decoding: target, as: UTF8.self)))
            self = path.withUTF8 { Self.named(UnsafeRawBufferPointer($0)) }
            return
        }
        let end = target.firstIndex(of: UInt8(ascii: "?")) ?? target.count
        self = Self.named(UnsafeRawBufferPointer(rebasing: target[..<end]))
    }

    private static func named(_ path: UnsafeRawBufferPointer) -> Route {
        for (name, route) in Self.paths where HTTPRequestParser.equals(path, name) { return route }
        return .other
    }

    /// `/track` first: it is asked for most.
    private static let paths: [(StaticString, Route)] = [
        ("/track", .track), ("/metrics", .metrics), ("/healthz", .healthz), ("/readyz", .readyz), ("/debug", .debug), ("/", .status),
        ("/usage", .usage),
    ]

    /// The path of a request target: the query dropped, and the scheme and authority of an
    /// absolute-form target (`POST http://host/track`, as proxies send) too.
    static func path(of uri: String) -> Substring {
        var target = Substring(uri)
        // String's `hasPrefix`, not Substring's generic one: same answer, a fraction of the cost.
        if !uri.hasPrefix("/"), let scheme = target.firstRange(of: "://") {
            // The authority ends at the path, or at the query when there is no path.
            let afterAuthority = target[scheme.upperBound...].firstIndex { $0 == "/" || $0 == "?" } ?? target.endIndex
            target = target[afterAuthority...]
            if target.isEmpty || target.first == "?" { return "/" }
        }
        return target.utf8.firstIndex(of: UInt8(ascii: "?")).map { target[..<$0] } ?? target
    }
}
