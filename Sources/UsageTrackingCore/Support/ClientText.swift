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
