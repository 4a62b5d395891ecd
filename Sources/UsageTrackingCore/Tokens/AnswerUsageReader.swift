import CZlib

/// Reads the token usage out of one model answer as its body streams past, keeping none of it.
///
/// Feed it the response headers (if they come) and every body chunk, in order, split anywhere;
/// ask `reading` at any time. Memory is fixed whatever the body's size: no line, event or
/// document is buffered (see `UsageJSONScanner` and `SSEFramer`), and a gzip body is inflated
/// through one 16 KiB buffer. Once the answer is found unreadable or not a model answer, later
/// chunks are ignored. Formats and the meaning of each count: `TokenCounts`, `AnswerTally`.
///
/// Not thread-safe: one reader per answer, used from one task at a time.
public final class AnswerUsageReader {
    private enum Format { case unknown, json, sse }

    private static let inflateBufferBytes = 16 << 10

    private let limits: AnswerLimits
    private var headersSeen = false
    private var bodySeen = false
    private var format = Format.unknown
    private var scanner: UsageJSONScanner
    private var framer = SSEFramer(sniffed: false)
    private var tally = AnswerTally()
    private var jsonRead = false
    private var outcome: AnswerReading?
    private var gunzip: OpaquePointer?
    private var inflated: UnsafeMutableRawBufferPointer?
    private var compressedBytes: UInt64 = 0
    private var inflatedBytes: UInt64 = 0

    public init(limits: AnswerLimits = AnswerLimits()) {
        self.limits = limits
        self.scanner = UsageJSONScanner(limits: limits)
    }

    deinit {
        czlib_gunzip_end(self.gunzip)
        self.inflated?.deallocate()
    }

    /// What the answer says so far; the caller decides whether it is complete.
    public var reading: AnswerReading {
        if let outcome { return outcome }
        guard let tokens = self.tally.tokens else { return .noUsage }
        return .usage(AnswerUsage(model: self.tally.model, tokens: tokens))
    }

    /// The response headers, when they come (before any body; a second call is ignored). A
    /// status of nil is unknown and read as 2xx; a content type of nil leaves the body's first
    /// byte to tell JSON (`{`) from SSE.
    public func responseHeaders(status: Int?, contentType: String?, contentEncoding: String?) {
        guard !self.headersSeen, !self.bodySeen, self.outcome == nil else { return }
        self.headersSeen = true
        if let status, !(200...299).contains(status) {
            self.outcome = .notModelAnswer("status \(status)")
            return
        }
        if let contentType {
            let mediaType = Self.normalized(contentType.split(separator: ";", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
            if mediaType == "text/event-stream" {
                self.format = .sse
            } else if mediaType == "application/json" || mediaType.hasSuffix("+json") {
                self.format = .json
            } else if !mediaType.isEmpty {
                self.outcome = .notModelAnswer("content-type \(mediaType.truncated(toUTF8Bytes: ClientText.echoedBytes))")
                return
            }
        }
        switch Self.normalized(contentEncoding ?? "") {
        case "", "identity":
            break
        case "gzip", "x-gzip":
            self.gunzip = czlib_gunzip_start()
            guard self.gunzip != nil else {
                self.outcome = .unreadable("cannot start gzip decoding: out of memory")
                return
            }
            self.inflated = .allocate(byteCount: Self.inflateBufferBytes, alignment: 1)
        case let other:
            self.outcome = .unreadable("Content-Encoding \(other.truncated(toUTF8Bytes: ClientText.echoedBytes)) is not supported")
        }
    }

    /// One body chunk, as it arrives (any size, split anywhere, or the whole body at once).
    public func body(_ chunk: UnsafeRawBufferPointer) {
        guard self.outcome == nil, chunk.count > 0 else { return }
        self.bodySeen = true
        if let gunzip, let inflated {
            self.inflate(chunk, gunzip, into: inflated)
        } else {
            self.read(chunk)
        }
    }

    private func inflate(_ chunk: UnsafeRawBufferPointer, _ gunzip: OpaquePointer, into buffer: UnsafeMutableRawBufferPointer) {
        var offset = 0
        while true {
            var consumed = 0, produced = 0
            let error = czlib_gunzip(
                gunzip, chunk.baseAddress! + offset, chunk.count - offset, &consumed,
                buffer.baseAddress, buffer.count, &produced)
            if let error {
                self.outcome = .unreadable("bad gzip: \(String(cString: error))")
                return
            }
            offset += consumed
            self.compressedBytes += UInt64(consumed)
            self.inflatedBytes += UInt64(produced)
            if self.inflatedBytes > self.limits.maxInflatedBytes {
                self.outcome = .unreadable("gzip body inflates to more than \(self.limits.maxInflatedBytes) bytes")
                return
            }
            let (allowed, overflow) = self.compressedBytes.multipliedReportingOverflow(by: self.limits.maxInflateRatio)
            if self.inflatedBytes > self.limits.inflateRatioGrace, !overflow, self.inflatedBytes > allowed {
                self.outcome = .unreadable("gzip body inflates to more than \(self.limits.maxInflateRatio) times its compressed size")
                return
            }
            if produced > 0 {
                self.read(UnsafeRawBufferPointer(rebasing: buffer[0..<produced]))
                if self.outcome != nil { return }
            }
            // Done when the chunk is used up and zlib has nothing more to give (its buffer was not filled).
            if (offset == chunk.count && produced < buffer.count) || (consumed == 0 && produced == 0) { return }
        }
    }

    /// The answer's end (Envoy's end of stream): a JSON answer whose document has not closed by
    /// then was cut short, and its usage, if any came, cannot be trusted.
    public func end() {
        guard self.outcome == nil, self.format == .json, !self.scanner.isComplete else { return }
        self.outcome = .unreadable("the answer ends inside its JSON document")
    }

    /// Decoded body bytes.
    private func read(_ bytes: UnsafeRawBufferPointer) {
        var bytes = bytes
        if self.format == .unknown {
            var start = 0
            while start < bytes.count, ASCII.isWhitespace(bytes[start]) { start += 1 }
            guard start < bytes.count else { return }
            bytes = UnsafeRawBufferPointer(rebasing: bytes[start...])
            if bytes[0] == UInt8(ascii: "{") {
                self.format = .json
            } else {
                self.format = .sse
                self.framer = SSEFramer(sniffed: true)
            }
        }
        switch self.format {
        case .json:
            self.scanner.feed(bytes)
            if let failure = self.scanner.failure {
                self.outcome = .unreadable(failure)
            } else if self.scanner.isComplete, !self.jsonRead {
                self.jsonRead = true
                if let failure = self.tally.add(self.scanner.document, eventName: []) { self.outcome = .unreadable(failure) }
            }
        case .sse:
            var consumed = 0
            while consumed < bytes.count {
                let eventEnded = self.framer.feed(bytes, consumed: &consumed, into: &self.scanner)
                if let failure = self.framer.failure {
                    self.outcome = failure
                    return
                }
                guard eventEnded else { return }
                if let failure = self.tally.add(self.scanner.document, eventName: self.framer.eventName) {
                    self.outcome = .unreadable(failure)
                    return
                }
                self.framer.nextEvent()
            }
        case .unknown:
            break
        }
    }

    /// A header value's token: trimmed and in lower case (both names are case-insensitive).
    private static func normalized(_ value: Substring) -> String {
        value.trimmedOfBlanks().lowercased()
    }

    private static func normalized(_ value: String) -> String { Self.normalized(value[...]) }
}

extension Substring {
    fileprivate func trimmedOfBlanks() -> Substring {
        var trimmed = self
        while let first = trimmed.first, first == " " || first == "\t" { trimmed.removeFirst() }
        while let last = trimmed.last, last == " " || last == "\t" { trimmed.removeLast() }
        return trimmed
    }
}
