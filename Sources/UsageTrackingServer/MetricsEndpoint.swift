import NIOHTTP1
import UsageTrackingCore

/// `GET /metrics`: the Prometheus text format, gzipped when the scraper accepts it.
enum MetricsEndpoint {
    static func reply(_ head: HTTPRequestHead, state: ServerState) -> HTTPResponse {
        let text = state.metrics.render()
        guard Self.acceptsGzip(head.headers) else {
            return HTTPResponse(status: .ok, contentType: ExpositionWriter.contentType, headers: [("vary", "accept-encoding")], body: text)
        }
        return HTTPResponse(
            status: .ok, contentType: ExpositionWriter.contentType,
            headers: [("content-encoding", "gzip"), ("vary", "accept-encoding")], body: Gzip.compress(text)
        )
    }

    /// True when `gzip` is listed without `q=0`.
    static func acceptsGzip(_ headers: HTTPHeaders) -> Bool {
        headers[canonicalForm: "accept-encoding"].contains { coding in
            let parts = coding.split(separator: ";").map { $0.trimmingASCIISpaces().lowercased() }
            guard parts.first == "gzip" else { return false }
            return !parts.dropFirst().contains { $0.hasPrefix("q=") && Double($0.dropFirst(2)) == 0 }
        }
    }
}
