import Glibc
import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// One connection's stream of HTTP/1.1 requests, parsed from the bytes as they arrive: a head,
/// its body in pieces, its end, then the next request.
///
/// Written here rather than taken from NIO's `HTTPRequestDecoder` because the callback path is
/// short: a head's end is looked for as its bytes arrive, then the head is parsed once and keeps
/// its bytes, with the place of each field, so no header becomes a `String` unless an endpoint
/// asks for it, and no part crosses a handler boundary. Profiled under load, NIO's decoder and its
/// hand-over cost about a tenth of the server's CPU per callback; this costs about 4 %.
///
/// Strict where leniency lets two parsers read one stream two ways (RFC 9112): lines end in
/// CRLF; a field name is a token followed at once by a colon; no line folding; no control
/// characters in values; one Content-Length, digits only, and never beside Transfer-Encoding,
/// which must be `chunked` alone. The first error stops the stream: nothing after it can be
/// trusted, so the connection answers it and closes.
///
/// Bounds: a head (request line and fields) of at most `maxHeadBytes` and `maxFields` fields; a
/// chunk-size line of `maxChunkSizeLine`; a trailer section as a head. Bytes not yet parsed are
/// kept (a head's, or one read's while the connection holds back parsing), the rest let go;
/// body bytes are handed on as they arrive, never gathered here. Looking for a line's end resumes
/// at the byte where the last read left off, so a line trickled in a byte at a time costs linear
/// time. A head keeps an array of its fields' places of its own size, never a shared one.
struct HTTPRequestParser {
    enum Part {
        case head(RequestHead)
        case body(ByteBuffer)
        case end
    }

    /// Why the stream cannot be read on: the reply's status and its one problem.
    struct Failure: Error, Equatable {
        var status: HTTPResponseStatus
        var problem: String
    }

    /// `scanned`: bytes from the start of what the state reads (a head, a line) known to hold no
    /// line end that ends it.
    private enum State {
        case head(scanned: Int)
        case fixedBody(remaining: Int)
        case chunkSize(scanned: Int)
        case chunkData(remaining: Int)
        /// The CRLF after a chunk's data.
        case chunkEnd
        /// After the last chunk: trailer fields (checked, then dropped) up to a blank line;
        /// `taken` bytes of them so far.
        case trailers(taken: Int, scanned: Int)
        /// After an error: nothing more is read.
        case stopped
    }

    static let maxChunkSizeLine = 1024
    /// Header fields one head may have: a head of short lines would otherwise be indexed by an
    /// array several times its size.
    static let maxFields = 256

    let maxHeadBytes: Int
    private var buffer = Self.empty
    private var state = State.head(scanned: 0)

    init(maxHeadBytes: Int) {
        self.maxHeadBytes = maxHeadBytes
    }

    private static let empty = ByteBuffer()

    /// Adds bytes read from the connection.
    mutating func append(_ bytes: ByteBuffer) {
        if self.buffer.readableBytes == 0 {
            self.buffer = bytes
        } else {
            // What was parsed already goes first, so that the buffer holds only what is not.
            self.buffer.discardReadBytes()
            var bytes = bytes
            self.buffer.writeBuffer(&bytes)
        }
    }

    /// Bytes received and not parsed yet.
    var unparsedBytes: Int { self.buffer.readableBytes }

    /// The size of the buffer those bytes are kept in.
    var heldCapacity: Int { self.buffer.capacity }

    /// The next part the bytes so far make; nil until more arrive.
    mutating func next() throws(Failure) -> Part? {
        do {
            let part = try self.parseNext()
            // Read to the end: let go of the read's buffer, so that the channel reuses it for the
            // next read and an idle connection holds none.
            if part == nil, self.buffer.readableBytes == 0 { self.buffer = Self.empty }
            return part
        } catch {
            self.state = .stopped
            self.buffer = Self.empty
            throw error
        }
    }

    private mutating func parseNext() throws(Failure) -> Part? {
        switch self.state {
        case .head(let scanned):
            return try self.parseHead(scanned: scanned)
        case .fixedBody(0):
            self.state = .head(scanned: 0)
            return .end
        case .fixedBody(let remaining):
            guard self.buffer.readableBytes > 0 else { return nil }
            let count = min(remaining, self.buffer.readableBytes)
            self.state = .fixedBody(remaining: remaining - count)
            return .body(self.buffer.readSlice(length: count)!)
        case .chunkSize(let scanned):
            switch try self.readLine(scanned: scanned, limit: Self.maxChunkSizeLine, tooLong: "a chunk-size line exceeds \(Self.maxChunkSizeLine) bytes") {
            case .incomplete(let scanned):
                self.state = .chunkSize(scanned: scanned)
                return nil
            case .line(let line):
                let size = try Self.chunkSize(line)
                self.state = size == 0 ? .trailers(taken: 0, scanned: 0) : .chunkData(remaining: size)
                return try self.parseNext()
            }
        case .chunkData(let remaining):
            guard self.buffer.readableBytes > 0 else { return nil }
            let count = min(remaining, self.buffer.readableBytes)
            self.state = count == remaining ? .chunkEnd : .chunkData(remaining: remaining - count)
            return .body(self.buffer.readSlice(length: count)!)
        case .chunkEnd:
            guard self.buffer.readableBytes >= 2 else { return nil }
            guard self.buffer.readInteger(as: UInt16.self) == 0x0D0A else {
                throw Failure(status: .badRequest, problem: "a chunk's data is not followed by CRLF")
            }
            self.state = .chunkSize(scanned: 0)
            return try self.parseNext()
        case .trailers(var taken, var scanned):
            let limit = self.maxHeadBytes
            while true {
                switch try self.readLine(scanned: scanned, limit: limit - taken, tooLong: "the trailer section exceeds \(limit) bytes") {
                case .incomplete(let through):
                    self.state = .trailers(taken: taken, scanned: through)
                    return nil
                case .line(let line) where line.readableBytes == 0:
                    self.state = .head(scanned: 0)
                    return .end
                case .line(let line):
                    // Checked like a header field (nothing here uses trailers), so no proxy reads
                    // them differently.
                    _ = try line.withUnsafeReadableBytes { bytes throws(Failure) in try Self.field(bytes, 0..<bytes.count) }
                    taken += line.readableBytes + 2
                    scanned = 0
                }
            }
        case .stopped:
            return nil
        }
    }

    // MARK: the head

    private mutating func parseHead(scanned: Int) throws(Failure) -> Part? {
        var scanned = scanned
        // Empty lines before a request line are skipped (RFC 9112 2.2): some clients send a CRLF
        // after a body.
        while self.buffer.readableBytes >= 2, self.buffer.getInteger(at: self.buffer.readerIndex, as: UInt16.self) == 0x0D0A {
            self.buffer.moveReaderIndex(forwardBy: 2)
            scanned = 0
        }
        let limit = self.maxHeadBytes
        let found = try self.buffer.withUnsafeReadableBytes { bytes throws(Failure) in try Self.headEnd(bytes, from: scanned, limit: limit) }
        guard let length = found else {
            if self.buffer.readableBytes > limit { throw Self.headTooLarge(limit) }
            self.state = .head(scanned: self.buffer.readableBytes)
            return nil
        }
        guard length <= limit else { throw Self.headTooLarge(limit) }
        let bytes = self.buffer.readSlice(length: length)!
        var head = try bytes.withUnsafeReadableBytes { raw throws(Failure) in try Self.parse(raw) }
        head.bytes = bytes
        self.state = head.isChunked ? .chunkSize(scanned: 0) : .fixedBody(remaining: head.contentLength)
        return .head(head)
    }

    private static func headTooLarge(_ limit: Int) -> Failure {
        Failure(status: .requestHeaderFieldsTooLarge, problem: "request head exceeds \(limit) bytes")
    }

    /// The length of the head, through the blank line that ends it; nil while it has not
    /// arrived. Looks from byte `scanned` on, and no further than `limit`.
    private static func headEnd(_ bytes: UnsafeRawBufferPointer, from scanned: Int, limit: Int) throws(Failure) -> Int? {
        var position = scanned
        let end = min(bytes.count, limit + 2)
        while position < end, let lineFeed = Self.lineFeed(in: bytes, from: position, to: end) {
            guard lineFeed > 0, bytes[lineFeed - 1] == 0x0D else { throw Self.bareLineFeed }
            // CR LF right after the previous line's LF: the blank line.
            if lineFeed >= 2, bytes[lineFeed - 2] == 0x0A { return lineFeed + 1 }
            position = lineFeed + 1
        }
        return nil
    }

    private static let bareLineFeed = Failure(status: .badRequest, problem: "a line ends in a bare LF; lines end in CRLF")

    /// Parses a whole head (it ends in a blank line, every line in CRLF) and places its fields.
    private static func parse(_ bytes: UnsafeRawBufferPointer) throws(Failure) -> RequestHead {
        var position = 0
        // Every line ends in CRLF: `headEnd` saw to it.
        func line() -> Range<Int> {
            let lineFeed = Self.lineFeed(in: bytes, from: position, to: bytes.count)!
            defer { position = lineFeed + 1 }
            return position..<(lineFeed - 1)
        }
        var head = try Self.requestLine(bytes, line())
        head.fields.reserveCapacity(8)
        var connection: (close: Bool, keepAlive: Bool) = (false, false)
        var contentLengthSeen = false
        var transferEncodingSeen = false
        var hosts = 0
        while true {
            let range = line()
            if range.isEmpty { break }
            let field = try Self.field(bytes, range)
            guard head.fields.count < Self.maxFields else {
                throw Failure(status: .requestHeaderFieldsTooLarge, problem: "request head has more than \(Self.maxFields) header fields")
            }
            head.fields.append(field)
            let name = UnsafeRawBufferPointer(rebasing: bytes[field.name])
            let value = UnsafeRawBufferPointer(rebasing: bytes[field.value])
            if Self.equalsIgnoringCase(name, "content-length") {
                guard !contentLengthSeen else { throw Failure(status: .badRequest, problem: "Content-Length is given more than once") }
                contentLengthSeen = true
                guard let length = Self.decimal(value) else {
                    throw Failure(status: .badRequest, problem: "Content-Length is not a number of bytes")
                }
                head.contentLength = length
            } else if Self.equalsIgnoringCase(name, "transfer-encoding") {
                guard !transferEncodingSeen else { throw Failure(status: .badRequest, problem: "Transfer-Encoding is given more than once") }
                guard Self.equalsIgnoringCase(value, "chunked") else {
                    throw Failure(status: .notImplemented, problem: "Transfer-Encoding other than chunked is not supported; send chunked or a Content-Length")
                }
                transferEncodingSeen = true
                head.isChunked = true
            } else if Self.equalsIgnoringCase(name, "connection") {
                for token in value.split(separator: UInt8(ascii: ",")) {
                    let token = UnsafeRawBufferPointer(rebasing: value[Self.trimmed(value, token.startIndex..<token.endIndex)])
                    if Self.equalsIgnoringCase(token, "close") { connection.close = true }
                    if Self.equalsIgnoringCase(token, "keep-alive") { connection.keepAlive = true }
                }
            } else if Self.equalsIgnoringCase(name, "upgrade") {
                head.upgrades = true
            } else if Self.equalsIgnoringCase(name, "expect") {
                head.expectsContinue = Self.equalsIgnoringCase(value, "100-continue")
            } else if Self.equalsIgnoringCase(name, "host") {
                hosts += 1
            }
        }
        if contentLengthSeen, transferEncodingSeen {
            throw Failure(status: .badRequest, problem: "both Content-Length and Transfer-Encoding are given; send one")
        }
        if transferEncodingSeen, head.version == .http1_0 {
            throw Failure(status: .badRequest, problem: "Transfer-Encoding is not allowed in HTTP/1.0")
        }
        // RFC 9112 3.2: a proxy and this service must agree on which host a request is for.
        if hosts > 1 { throw Failure(status: .badRequest, problem: "Host is given more than once") }
        if hosts == 0, head.version == .http1_1 { throw Failure(status: .badRequest, problem: "an HTTP/1.1 request must have a Host field") }
        head.isKeepAlive = head.version == .http1_1 ? !connection.close : connection.keepAlive && !connection.close
        return head
    }

    private static func requestLine(_ bytes: UnsafeRawBufferPointer, _ line: Range<Int>) throws(Failure) -> RequestHead {
        let text = bytes[line]
        guard let firstSpace = text.firstIndex(of: 0x20), let lastSpace = text.lastIndex(of: 0x20), firstSpace < lastSpace else {
            throw Failure(status: .badRequest, problem: "the request line is not METHOD TARGET HTTP/1.1")
        }
        let method = UnsafeRawBufferPointer(rebasing: bytes[line.lowerBound..<firstSpace])
        let target = (firstSpace + 1)..<lastSpace
        let version = UnsafeRawBufferPointer(rebasing: bytes[(lastSpace + 1)..<line.upperBound])
        guard !method.isEmpty, Self.areTokenBytes(method) else {
            throw Failure(status: .badRequest, problem: "the method is not a token")
        }
        guard bytes[target].allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "#") }) else {
            throw Failure(status: .badRequest, problem: "the request target holds a space, a #, a control character or a byte beyond ASCII")
        }
        guard Self.isTargetForm(UnsafeRawBufferPointer(rebasing: bytes[target])) else {
            throw Failure(status: .badRequest, problem: "the request target is not a path, an http:// or https:// URL, or *")
        }
        let parsedVersion: HTTPVersion
        if Self.equals(version, "HTTP/1.1") {
            parsedVersion = .http1_1
        } else if Self.equals(version, "HTTP/1.0") {
            parsedVersion = .http1_0
        } else if version.count == 8, Self.equals(UnsafeRawBufferPointer(rebasing: version[0..<5]), "HTTP/"), version[6] == UInt8(ascii: "."),
            Self.isDigit(version[5]), Self.isDigit(version[7])
        {
            throw Failure(status: .httpVersionNotSupported, problem: "\(String(decoding: version, as: UTF8.self)) is not supported; send HTTP/1.1")
        } else {
            throw Failure(status: .badRequest, problem: "the request line does not end in an HTTP version")
        }
        return RequestHead(method: Self.method(method), version: parsedVersion, target: target)
    }

    /// Origin form (`/track`), absolute form (`http://host/track`, as proxies send), or `*`.
    /// Authority form is for CONNECT, which nothing here serves.
    private static func isTargetForm(_ target: UnsafeRawBufferPointer) -> Bool {
        if target.first == UInt8(ascii: "/") || Self.equals(target, "*") { return true }
        for scheme: StaticString in ["http://", "https://"] where target.count >= scheme.utf8CodeUnitCount {
            if Self.equalsIgnoringCase(UnsafeRawBufferPointer(rebasing: target[..<scheme.utf8CodeUnitCount]), scheme) { return true }
        }
        return false
    }

    private static func field(_ bytes: UnsafeRawBufferPointer, _ line: Range<Int>) throws(Failure) -> RequestHead.Field {
        guard bytes[line.lowerBound] != 0x20, bytes[line.lowerBound] != 0x09 else {
            throw Failure(status: .badRequest, problem: "a header line starts with a space or tab (line folding is not accepted)")
        }
        guard let found = memchr(bytes.baseAddress! + line.lowerBound, Int32(UInt8(ascii: ":")), line.count),
            case let colon = UnsafeRawPointer(found) - bytes.baseAddress!, colon > line.lowerBound
        else {
            throw Failure(status: .badRequest, problem: "a header line is not NAME: VALUE")
        }
        guard Self.areTokenBytes(UnsafeRawBufferPointer(rebasing: bytes[line.lowerBound..<colon])) else {
            throw Failure(status: .badRequest, problem: "a header name holds a character not allowed in a token")
        }
        let value = Self.trimmed(bytes, (colon + 1)..<line.upperBound)
        guard Self.isFieldValue(UnsafeRawBufferPointer(rebasing: bytes[value])) else {
            throw Failure(status: .badRequest, problem: "a header value holds a control character")
        }
        return RequestHead.Field(
            nameStart: UInt32(line.lowerBound), nameEnd: UInt32(colon), valueStart: UInt32(value.lowerBound), valueEnd: UInt32(value.upperBound)
        )
    }

    // MARK: chunks

    private enum Line {
        /// No line end yet; bytes up to `scanned` hold none.
        case incomplete(scanned: Int)
        /// A whole line, without its CRLF, taken off the buffer.
        case line(ByteBuffer)
    }

    /// The next line if it has arrived, looking for its end from byte `scanned` on. It may be
    /// at most `limit` bytes before its CRLF.
    private mutating func readLine(scanned: Int, limit: Int, tooLong: @autoclosure () -> String) throws(Failure) -> Line {
        let limit = max(0, limit)
        let found = self.buffer.withUnsafeReadableBytes { bytes in Self.lineFeed(in: bytes, from: scanned, to: min(bytes.count, limit + 2)) }
        guard let lineFeed = found else {
            if self.buffer.readableBytes > limit + 1 { throw Failure(status: .badRequest, problem: tooLong()) }
            return .incomplete(scanned: self.buffer.readableBytes)
        }
        guard lineFeed > 0, self.buffer.getInteger(at: self.buffer.readerIndex + lineFeed - 1, as: UInt8.self) == 0x0D else {
            throw Self.bareLineFeed
        }
        let line = self.buffer.readSlice(length: lineFeed - 1)!
        self.buffer.moveReaderIndex(forwardBy: 2)
        return .line(line)
    }

    /// A chunk-size line's size: hexadecimal digits, then any chunk extensions (read past).
    private static func chunkSize(_ line: ByteBuffer) throws(Failure) -> Int {
        let size = line.withUnsafeReadableBytes { bytes -> Int? in
            var size = 0
            for (digits, byte) in bytes.enumerated() {
                let digit: Int
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = Int(byte - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = Int(byte - UInt8(ascii: "a")) + 10
                case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = Int(byte - UInt8(ascii: "A")) + 10
                default:
                    guard digits > 0, Self.areChunkExtensions(UnsafeRawBufferPointer(rebasing: bytes[digits...])) else { return nil }
                    return size
                }
                // 15 hex digits: more than any body this service takes, and no overflow.
                guard digits < 15 else { return nil }
                size = size << 4 | digit
            }
            return bytes.isEmpty ? nil : size
        }
        guard let size else { throw Failure(status: .badRequest, problem: "a chunk-size line is not a hexadecimal size and extensions") }
        return size
    }

    /// `;name` or `;name=value`, any number, spaces and tabs before each `;` (RFC 9112 7.1.1):
    /// each `;` starts a token; what follows it up to the next `;` is visible ASCII or spaces.
    private static func areChunkExtensions(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var index = 0
        while index < bytes.count, bytes[index] == 0x20 || bytes[index] == 0x09 { index += 1 }
        guard index < bytes.count else { return false }
        while index < bytes.count {
            guard bytes[index] == UInt8(ascii: ";") else { return false }
            index += 1
            while index < bytes.count, bytes[index] == 0x20 || bytes[index] == 0x09 { index += 1 }
            guard index < bytes.count, Self.tokenBytes[Int(bytes[index])] else { return false }
            while index < bytes.count, bytes[index] != UInt8(ascii: ";") {
                guard bytes[index] >= 0x20 && bytes[index] < 0x7F || bytes[index] == 0x09 else { return false }
                index += 1
            }
        }
        return true
    }

    // MARK: bytes

    /// tchar (RFC 9110 5.6.2), what methods and field names are made of, as a table: every
    /// field name goes through it, byte by byte.
    private static let tokenBytes: [Bool] = (0...255).map { isHeaderNameByte(UInt8($0)) }

    /// Visible ASCII, spaces, tabs and bytes beyond ASCII (obs-text); no control characters.
    /// Eight bytes at a time while none is below 0x20 or 0x7F (a request id is 36 bytes); from
    /// the first word that has one, byte by byte, where a tab is allowed.
    static func isFieldValue(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let ones: UInt64 = 0x0101_0101_0101_0101, highs: UInt64 = 0x8080_8080_8080_8080
        var index = 0
        while index + 8 <= bytes.count {
            let word = bytes.loadUnaligned(fromByteOffset: index, as: UInt64.self)
            // A byte below 0x20 leaves its high bit set in the first term; a 0x7F, in the second.
            let deleted = word ^ (ones &* 0x7F)
            if ((word &- ones &* 0x20) | (deleted &- ones)) & ~word & highs != 0 { break }
            index += 8
        }
        return bytes[index...].allSatisfy { $0 >= 0x20 ? $0 != 0x7F : $0 == 0x09 }
    }

    private static func areTokenBytes(_ bytes: UnsafeRawBufferPointer) -> Bool {
        Self.tokenBytes.withUnsafeBufferPointer { table in bytes.allSatisfy { table[Int($0)] } }
    }

    /// The first line feed in `bytes[from..<to]` (memchr: a head's lines are searched as they arrive).
    private static func lineFeed(in bytes: UnsafeRawBufferPointer, from: Int, to: Int) -> Int? {
        guard from < to, let found = memchr(bytes.baseAddress! + from, 0x0A, to - from) else { return nil }
        return UnsafeRawPointer(found) - bytes.baseAddress!
    }

    private static func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

    /// Digits only, at most 15 of them (no sign, no spaces, no list).
    private static func decimal(_ bytes: UnsafeRawBufferPointer) -> Int? {
        guard !bytes.isEmpty, bytes.count <= 15, bytes.allSatisfy(Self.isDigit) else { return nil }
        return bytes.reduce(0) { $0 * 10 + Int($1 - UInt8(ascii: "0")) }
    }

    /// `range` of `bytes` without the spaces and tabs around it.
    private static func trimmed(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Range<Int> {
        var start = range.lowerBound
        var end = range.upperBound
        while start < end, bytes[start] == 0x20 || bytes[start] == 0x09 { start += 1 }
        while end > start, bytes[end - 1] == 0x20 || bytes[end - 1] == 0x09 { end -= 1 }
        return start..<end
    }

    static func equals(_ bytes: UnsafeRawBufferPointer, _ expected: StaticString) -> Bool {
        bytes.count == expected.utf8CodeUnitCount && memcmp(bytes.baseAddress!, expected.utf8Start, bytes.count) == 0
    }

    /// Whether `bytes` are `expected` in any letter case (ASCII letters only are folded).
    static func equalsIgnoringCase(_ bytes: UnsafeRawBufferPointer, _ expected: StaticString) -> Bool {
        Self.equalsIgnoringCase(bytes, UnsafeRawBufferPointer(start: expected.utf8Start, count: expected.utf8CodeUnitCount))
    }

    static func equalsIgnoringCase(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
        guard a.count == b.count else { return false }
        for index in 0..<a.count where a[index] != b[index] {
            let folded = a[index] | 0x20
            guard folded == b[index] | 0x20, folded >= UInt8(ascii: "a"), folded <= UInt8(ascii: "z") else { return false }
        }
        return true
    }

    private static func method(_ bytes: UnsafeRawBufferPointer) -> HTTPMethod {
        if Self.equals(bytes, "POST") { return .POST }
        if Self.equals(bytes, "GET") { return .GET }
        if Self.equals(bytes, "HEAD") { return .HEAD }
        return HTTPMethod(rawValue: String(decoding: bytes, as: UTF8.self))
    }
}
