/// How the Envoy ext_proc listener runs (`--ext-proc-*`); see `ExtProcListener`.
public struct ExtProcSettings: Sendable {
    /// 0: a port the OS chooses (logged).
    public var port: Int
    /// Streams open at once; one more is refused at once with RESOURCE_EXHAUSTED.
    public var maxStreams = 10_000
    /// A stream with no message for this long is ended. An answer can be silent for minutes
    /// before its head (a long non-streamed completion), so this is longer than any such wait;
    /// what idle streams hold is bounded by `maxStreams` in any case.
    public var idleTimeout: Duration = .seconds(300)
    public var headers = ExtProcHeaderNames()
    /// Bytes all streams together may hold in messages still arriving: each may be up to
    /// `ExtProcListener.maxMessageBytes`, and a client that never finishes one would otherwise
    /// pin that much per stream until the idle timeout. Envoy sends a message at once, so its
    /// streams hold one only for the moment it takes to arrive.
    public var maxMessageBytesHeld = 32 << 20
    /// How long a message may take to arrive whole from its first byte (`--request-timeout`, as
    /// for an HTTP request's body), so that none holds its part of the bound above for long.
    public var messageTimeout: Duration = .seconds(10)

    public init(port: Int) {
        self.port = port
    }
}

/// The request headers a stream keeps: those the token families' labels read (lower case, in
/// `TokenDecoder.headerNames` order; the identity among them is set by the gateway after it
/// has authenticated the caller, replacing any the client sent), and the request id.
public struct ExtProcHeaderNames: Sendable {
    public var labels = ["x-usage-user", "x-usage-groups", ":path"]
    public var requestID = "x-request-id"

    public init() {}
}
