import UsageTrackingCore

/// What one ext_proc stream saw of an HTTP exchange, handed to the counting layer once the
/// stream has ended. Values are as the headers carried them (the path without its query), each
/// at most `--max-label-bytes`.
public struct TokenStreamReport: Sendable, Equatable {
    public enum End: Sendable, Equatable {
        /// The response's end of stream was seen (its headers, last body chunk, or trailers).
        case complete
        /// The stream ended before that: Envoy reset it, or closed it early.
        case aborted
        /// No message for the idle timeout.
        case idleTimeout
        /// A message that cannot come where it came, or one that is not a ProcessingRequest;
        /// the text says which.
        case protocolError(String)
    }

    /// A request id's digest, in a space of its own: Authorino's callback for the same request
    /// carries the same id, and both must count.
    static func digest(requestID bytes: [UInt8]) -> UInt64? {
        // Blank as `trimmingASCIISpaces` finds it (an id of spaces is no id, as on `/track`).
        guard bytes.contains(where: { ![0x20, 0x09, 0x0A, 0x0D].contains($0) }) else { return nil }
        return (Array("tokens\u{0}".utf8) + bytes).withUnsafeBytes { RequestIDWindow.digest($0) }
    }

    /// The token families' label headers (`ExtProcHeaderNames.labels`) and their values, nil
    /// where absent or when no request headers were sent.
    public var headerNames: [String]
    public var headers: [String?]
    /// The request id as logs show it: the first given, cut to 64 bytes.
    public var requestID: String?
    /// Its digest over all of its bytes, whatever their length or encoding, as `/track` takes
    /// any id; nil when absent or blank.
    public var requestIDDigest: UInt64?
    /// Why the identity above cannot be used (a header given twice, over the bound, not UTF-8),
    /// naming the header; nil when it can.
    public var identityProblem: String?
    public var reading: AnswerReading
    public var end: End

    /// A label header's value by name.
    public subscript(header name: String) -> String? {
        self.headerNames.firstIndex(of: name).flatMap { self.headers[$0] }
    }
}
