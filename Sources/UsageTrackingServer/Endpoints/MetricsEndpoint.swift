import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// `GET /metrics`: the Prometheus text format, gzipped when the scraper accepts it.
enum MetricsEndpoint {
    /// Replies held at once, from the request until its socket has taken the reply: a Prometheus
    /// pair and a person with `curl` need three; more are scrapers that do not read.
    static let maxHeldReplies = 4

    /// The answer when all `maxHeldReplies` are held.
    static let busy = HTTPResponse.error(
        .serviceUnavailable, "too many /metrics replies are in progress",
        ["at most \(maxHeldReplies) are held, from the request until its scraper has read the reply; retry once one has"],
        headers: [("retry-after", "1")]
    )

    /// `slot` is the request's place among `maxHeldReplies`; `from` is the scraper's address,
    /// which the status page shows with the render's duration.
    static func reply(_ head: RequestHead, from: String? = nil, slot: ReplySlots.Slot, state: ServerState) -> HTTPResponse {
        let started = NIODeadline.now()
        let text = state.metrics.render()
        let renderSeconds = Double((NIODeadline.now() - started).nanoseconds) / 1e9
        state.status?.events.recordScrape(.init(time: wallClock(), from: from, renderSeconds: renderSeconds))
        let gzip = Self.acceptsGzip(head)
        var reply = HTTPResponse(
            status: .ok, contentType: ExpositionWriter.contentType,
            headers: (gzip ? [("content-encoding", "gzip")] : []) + [("vary", "accept-encoding")], body: gzip ? Gzip.compress(text) : text
        )
        reply.slot = slot
        return reply
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
