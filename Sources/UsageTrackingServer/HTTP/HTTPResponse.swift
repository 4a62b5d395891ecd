import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// A complete reply, serialised by hand: every route answers synchronously with a whole body, so
/// there is no streaming to support and no reason for a response encoder in the pipeline.
struct HTTPResponse: Sendable {
    var status: HTTPResponseStatus
    var headers: [(String, String)] = []
    var body: [UInt8] = []
    /// Held until the socket has taken the whole reply (see `ReplySlots`); nil for most replies.
    var slot: ReplySlots.Slot?

    init(status: HTTPResponseStatus, contentType: String? = nil, headers: [(String, String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        if let contentType { self.headers.insert(("content-type", contentType), at: 0) }
        self.body = body
    }

    static func text(_ status: HTTPResponseStatus, _ text: String) -> HTTPResponse {
        HTTPResponse(status: status, contentType: "text/plain; charset=utf-8", body: Array(text.utf8))
    }

    static func json(_ status: HTTPResponseStatus, _ document: JSONText, headers: [(String, String)] = []) -> HTTPResponse {
        HTTPResponse(status: status, contentType: "application/json", headers: headers, body: Array((document.serialized + "\n").utf8))
    }

    /// The `{"error": ..., "problems": [...]}` body every failed request gets.
    static func error(_ status: HTTPResponseStatus, _ summary: String, _ problems: [String], headers: [(String, String)] = []) -> HTTPResponse {
        .json(status, .object([("error", .string(summary)), ("problems", .array(problems.map(JSONText.string)))]), headers: headers)
    }

    /// `omitBody` is for HEAD: same headers, including the length the body would have had.
    func serialized(allocator: ByteBufferAllocator, omitBody: Bool, close: Bool) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 128 + self.body.count)
        buffer.writeString("HTTP/1.1 \(self.status.code) \(self.status.reasonPhrase)\r\n")
        for (name, value) in self.headers {
            buffer.writeString("\(name): \(value)\r\n")
        }
        buffer.writeString("content-length: \(self.body.count)\r\n")
        if close { buffer.writeString("connection: close\r\n") }
        buffer.writeString("\r\n")
        if !omitBody { buffer.writeBytes(self.body) }
        return buffer
    }

    /// The interim reply to `Expect: 100-continue`.
    static let continueBytes = ByteBuffer(string: "HTTP/1.1 100 Continue\r\n\r\n")

    /// The reply to an accepted callback, built once: 202 with no body, which Authorino treats
    /// as success whatever it expects (it JSON-decodes only replies labelled JSON).
    static let acceptedBytes = HTTPResponse(status: .accepted).serialized(allocator: ByteBufferAllocator(), omitBody: false, close: false)
}
