/// Text a client chose (request ids, header values, paths, field names) that the service echoes
/// in logs, replies and the debug view. Cut short, so a client cannot choose how much of it the
/// service stores or writes.
public enum ClientText {
    /// The most bytes of one client-chosen value that are echoed.
    public static let echoedBytes = 64
}

extension String {
    /// At most `maxBytes` of UTF-8, cut at a scalar boundary and marked with "…" when cut. A
    /// string within the bound (a request id, on every callback that has one) is returned as it is.
    public func truncated(toUTF8Bytes maxBytes: Int) -> String {
        self.utf8.count > maxBytes ? self[...].truncated(toUTF8Bytes: maxBytes) : self
    }
}

extension StringProtocol {
    /// At most `maxBytes` of UTF-8, cut at a scalar boundary and marked with "…" when cut.
    public func truncated(toUTF8Bytes maxBytes: Int) -> String {
        guard self.utf8.count > maxBytes else { return String(self) }
        var kept = String.UnicodeScalarView()
        var bytes = 0
        for scalar in self.unicodeScalars {
            bytes += UTF8.width(scalar)
            guard bytes <= maxBytes - 3 else { break }
            kept.append(scalar)
        }
        return String(kept) + "…"
    }
}

/// Client text as it is echoed (`truncated(toUTF8Bytes: ClientText.echoedBytes)`), kept in place
/// rather than in a `String`'s buffer: recording it costs no allocation, which matters for what
/// is kept from every callback (its request id, among the recent ones `/debug` shows).
public struct EchoedText: Sendable, Equatable, CustomStringConvertible {
    /// `ClientText.echoedBytes` of them.
    private var bytes = InlineArray<64, UInt8>(repeating: 0)
    private var count = 0

    /// The bytes as received, which may be any length and need not be UTF-8.
    public init(_ received: UnsafeRawBufferPointer) {
        guard received.count <= ClientText.echoedBytes else {
            // Cut now: at most 64 bytes of UTF-8, which the text below gives back unchanged.
            var cut = String(decoding: received, as: UTF8.self).truncated(toUTF8Bytes: ClientText.echoedBytes)
            self = cut.withUTF8 { Self(UnsafeRawBufferPointer($0)) }
            return
        }
        for (index, byte) in received.enumerated() { self.bytes[index] = byte }
        self.count = received.count
    }

    /// The text echoed, cut as `String.truncated(toUTF8Bytes:)` cuts (bytes that are not UTF-8
    /// become U+FFFD, which may take it past the bound again).
    public var description: String {
        self.bytes.span.withUnsafeBufferPointer { String(decoding: $0[..<self.count], as: UTF8.self) }
            .truncated(toUTF8Bytes: ClientText.echoedBytes)
    }

    public static func == (left: Self, right: Self) -> Bool {
        left.count == right.count && (0..<left.count).allSatisfy { left.bytes[$0] == right.bytes[$0] }
    }
}
