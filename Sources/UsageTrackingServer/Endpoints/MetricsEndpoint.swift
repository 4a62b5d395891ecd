import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// `GET /metrics`: the Prometheus text format, gzipped when the scraper accepts it.
enum MetricsEndpoint {
    /// `from` is the scraper's address, which the status page shows with the render's duration.
    static func reply(_ head: RequestHead, from: String? = nil, state: ServerState) -> HTTPResponse {
        let started = NIODeadline.now()
        let text = state.metrics.render()
        let renderSeconds = Double((NIODeadline.now() - started).nanoseconds) / 1e9
        state.status?.events.recordScrape(.init(time: wallClock(), from: from, renderSeconds: renderSeconds))
        guard Self.acceptsGzip(head) else {
            return HTTPResponse(status: .ok, contentType: ExpositionWriter.contentType, headers: [("vary", "accept-encoding")], body: text)
        }
        return HTTPResponse(
            status: .ok, contentType: ExpositionWriter.contentType,
            headers: [("content-encoding", "gzip"), ("vary", "accept-encoding")], body: Gzip.compress(text)
        )
    }

    /// True when `gzip` is listed without `q=0`.
    static func acceptsGzip(_ head: RequestHead) -> Bool {
        head.listItems(name: "accept-encoding").contains { coding in
            let parts = coding.split(separator: ";").map { $0.trimmingASCIISpaces().lowercased() }
            guard parts.first == "gzip" else { return false }
            return !parts.dropFirst().contains { $0.hasPrefix("q=") && Double($0.dropFirst(2)) == 0 }
        }
    }
}
