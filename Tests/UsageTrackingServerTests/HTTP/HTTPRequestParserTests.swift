import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing
import TestSupport
import UsageTrackingCore

@testable import UsageTrackingServer

/// What a parser made of a stream: each request's head and whole body, and the error that
/// stopped it, if any.
struct ParsedStream: Equatable {
    struct Request: Equatable {
        var method: String
        var uri: String
        var version: String
        var fields: [String]
        var keepAlive: Bool
        var body: [UInt8]
    }

    var requests: [Request] = []
    var failure: HTTPRequestParser.Failure?

    /// Runs `chunks` through a new `HTTPRequestParser`, in that order.
    static func parse(_ chunks: [[UInt8]], maxHeadBytes: Int = 16384) -> ParsedStream {
        var parser = HTTPRequestParser(maxHeadBytes: maxHeadBytes)
        var stream = ParsedStream()
        var open: Request?
        for chunk in chunks {
            parser.append(ByteBuffer(bytes: chunk))
            do {
                while let part = try parser.next() {
                    switch part {
                    case .head(let head):
                        let fields = head.bytes.withUnsafeReadableBytes { bytes in
                            head.fields.map { "\(String(decoding: bytes[$0.name], as: UTF8.self)): \(String(decoding: bytes[$0.value], as: UTF8.self))" }
                        }
                        open = Request(
                            method: head.method.rawValue, uri: head.uri, version: "\(head.version)", fields: fields, keepAlive: head.isKeepAlive,
                            body: []
                        )
                    case .body(let piece):
                        open?.body += piece.readableBytesView
                    case .end:
                        stream.requests.append(open!)
                        open = nil
                    }
                }
            } catch {
                stream.failure = error
                return stream
            }
        }
        return stream
    }

    static func parse(_ text: String, maxHeadBytes: Int = 16384) -> ParsedStream {
        Self.parse([Array(text.utf8)], maxHeadBytes: maxHeadBytes)
    }
}

extension Route {
    /// The route of a request target given as text.
    init(uri: String) {
        var uri = uri
        self = uri.withUTF8 { Route(target: UnsafeRawBufferPointer($0)) }
    }
}

@Suite struct HTTPRequestParserTests {
    static let callback = "POST /track HTTP/1.1\r\nHost: usage-tracking:8080\r\nContent-Type: application/json\r\nX-Request-ID: 5f0c7c1e\r\nContent-Length: 12\r\n\r\n{\"user\":\"a\"}"

    @Test func authorinosCallbackIsParsed() throws {
        var parser = HTTPRequestParser(maxHeadBytes: 16384)
        parser.append(ByteBuffer(string: Self.callback))
        guard case .head(let head)? = try parser.next() else {
            Issue.record("no head")
            return
        }
        #expect(head.method == .POST)
        #expect(head.uri == "/track")
        #expect(head.route == .track)
        #expect(head.version == .http1_1)
        #expect(head.isKeepAlive)
        #expect(head.contentLength == 12)
        #expect(!head.isChunked && !head.upgrades)
        #expect(head.first(name: "content-type") == "application/json")
        #expect(head.first(name: "X-REQUEST-ID") == "5f0c7c1e", "names compare in any letter case")
        #expect(head.first(name: "x-request-i") == nil)
        #expect(head.first(name: "host") != nil && head.first(name: "expect") == nil)
        guard case .body(let body)? = try parser.next() else {
            Issue.record("no body")
            return
        }
        #expect(String(buffer: body) == #"{"user":"a"}"#)
        guard case .end? = try parser.next() else {
            Issue.record("no end")
            return
        }
        #expect(try parser.next() == nil)
    }

    struct NoHead: Error {}

    /// The head of the first request in `text`.
    static func head(_ text: String) throws -> RequestHead {
        var parser = HTTPRequestParser(maxHeadBytes: 16384)
        parser.append(ByteBuffer(string: text))
        guard case .head(let head)? = try parser.next() else { throw NoHead() }
        return head
    }

    @Test func valuesAreTrimmedAndListsGathered() throws {
        let head = try Self.head("GET /metrics HTTP/1.1\r\nHost: h\r\nAccept-Encoding: \t br , gzip;q=1 \r\nX-Empty:\r\naccept-encoding: ,deflate\r\n\r\n")
        #expect(head.first(name: "accept-encoding") == "br , gzip;q=1")
        #expect(head.listItems(name: "Accept-Encoding") == ["br", "gzip;q=1", "deflate"])
        #expect(head.first(name: "x-empty") == "")
        #expect(head.listItems(name: "absent") == [])
    }

    @Test func pipelinedRequestsAndLeadingEmptyLines() {
        let stream = ParsedStream.parse("\r\n\r\n" + Self.callback + "\r\nGET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        #expect(stream.failure == nil)
        #expect(stream.requests.map(\.uri) == ["/track", "/healthz"])
        #expect(stream.requests.map(\.body.count) == [12, 0])
    }

    @Test(arguments: [
        ("GET / HTTP/1.1\r\nHost: h\r\n\r\n", true),
        ("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", false),
        ("GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", false),
        ("GET / HTTP/1.0\r\n\r\n", false),
        ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
        ("GET / HTTP/1.0\r\nconnection: TE, Keep-Alive\r\n\r\n", true),
    ])
    func keepAlive(request: String, keepAlive: Bool) {
        #expect(ParsedStream.parse(request).requests.map(\.keepAlive) == [keepAlive])
    }

    @Test func chunkedBodyWithExtensionsAndTrailers() {
        let stream = ParsedStream.parse(
            "POST /track HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n5;name=value\r\n{\"use\r\nA ; a = \"q\" ;b\r\nr\":\"chunk\"\r\n1\r\n}\r\n0\r\nTrailer: x\r\nOther: y\r\n\r\n"
                + "GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        #expect(stream.failure == nil)
        #expect(stream.requests.map(\.uri) == ["/track", "/healthz"])
        #expect(String(decoding: stream.requests[0].body, as: UTF8.self) == #"{"user":"chunk"}"#)
    }

    @Test func upgradeAndExpectAreNoted() throws {
        #expect(try Self.head("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").upgrades)
        #expect(try Self.head("POST /track HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\n\r\n").expectsContinue)
        #expect(try !Self.head("POST /track HTTP/1.1\r\nHost: h\r\nExpect: something-else\r\n\r\n").expectsContinue)
        #expect(try !Self.head(Self.callback).upgrades)
    }

    @Test func absoluteFormTargetsRoute() {
        #expect(Route(uri: "http://usage-tracking:8080/track?x=1") == .track)
        #expect(Route(uri: "http://usage-tracking:8080") == .status)
        #expect(Route(uri: "http://usage-tracking:8080?/track") == .status)
        #expect(Route(uri: "/track?x") == .track)
        #expect(Route(uri: "/trackx") == .other)
        #expect(Route(uri: "*") == .other)
    }

    /// Every place a stream can be cut gives the same requests as the whole stream.
    @Test func splitAtEveryByteGivesTheSameRequests() {
        let text = Self.callback + "POST /track HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: t\r\n\r\n" + "GET /metrics HTTP/1.0\r\n\r\n"
        let bytes = Array(text.utf8)
        let whole = ParsedStream.parse([bytes])
        #expect(whole.requests.count == 3 && whole.failure == nil)
        for cut in 1..<bytes.count {
            #expect(ParsedStream.parse([Array(bytes[..<cut]), Array(bytes[cut...])]) == whole, "cut at \(cut)")
        }
        #expect(ParsedStream.parse(bytes.map { [$0] }) == whole, "a byte at a time")
    }

    /// Every way a stream is refused, with its status and the problem the reply names.
    @Test(arguments: [
        ("GET / HTTP/1.1\nHost: a\n\n", 400, "a line ends in a bare LF; lines end in CRLF"),
        ("GET / HTTP/1.1\r\nHost: a\n\r\n", 400, "a line ends in a bare LF; lines end in CRLF"),
        ("GET /\r\n\r\n", 400, "the request line is not METHOD TARGET HTTP/1.1"),
        ("GET/ HTTP/1.1\r\n\r\n", 400, "the request line is not METHOD TARGET HTTP/1.1"),
        ("G(T / HTTP/1.1\r\n\r\n", 400, "the method is not a token"),
        (" GET / HTTP/1.1\r\n\r\n", 400, "the method is not a token"),
        ("GET /a b HTTP/1.1\r\n\r\n", 400, "the request target holds a space, a #, a control character or a byte beyond ASCII"),
        ("GET /a\u{7F} HTTP/1.1\r\n\r\n", 400, "the request target holds a space, a #, a control character or a byte beyond ASCII"),
        ("GET /é HTTP/1.1\r\n\r\n", 400, "the request target holds a space, a #, a control character or a byte beyond ASCII"),
        ("GET http://h#/track HTTP/1.1\r\n\r\n", 400, "the request target holds a space, a #, a control character or a byte beyond ASCII"),
        ("GET  HTTP/1.1\r\n\r\n", 400, "the request target is not a path, an http:// or https:// URL, or *"),
        ("GET track HTTP/1.1\r\n\r\n", 400, "the request target is not a path, an http:// or https:// URL, or *"),
        ("CONNECT usage-tracking:8080 HTTP/1.1\r\n\r\n", 400, "the request target is not a path, an http:// or https:// URL, or *"),
        ("GET ftp://h/track HTTP/1.1\r\n\r\n", 400, "the request target is not a path, an http:// or https:// URL, or *"),
        ("GET / HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not supported; send HTTP/1.1"),
        ("BREW /pot HTCPCP/1.0\r\n\r\n", 400, "the request line does not end in an HTTP version"),
        ("GET / http/1.1\r\n\r\n", 400, "the request line does not end in an HTTP version"),
        ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400, "a header line starts with a space or tab (line folding is not accepted)"),
        ("GET / HTTP/1.1\r\n\tHost: a\r\n\r\n", 400, "a header line starts with a space or tab (line folding is not accepted)"),
        ("GET / HTTP/1.1\r\nHost a\r\n\r\n", 400, "a header line is not NAME: VALUE"),
        ("GET / HTTP/1.1\r\n: a\r\n\r\n", 400, "a header line is not NAME: VALUE"),
        ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "a header name holds a character not allowed in a token"),
        ("GET / HTTP/1.1\r\nX(Y): a\r\n\r\n", 400, "a header name holds a character not allowed in a token"),
        ("GET / HTTP/1.1\r\nX: a\u{01}b\r\n\r\n", 400, "a header value holds a control character"),
        ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400, "a header value holds a control character"),
        ("GET / HTTP/1.1\r\nX: a\u{7F}\r\n\r\n", 400, "a header value holds a control character"),
        ("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab", 400, "Content-Length is given more than once"),
        ("POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\na", 400, "Content-Length is not a number of bytes"),
        ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length is not a number of bytes"),
        ("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\na", 400, "Content-Length is not a number of bytes"),
        ("POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400, "Content-Length is not a number of bytes"),
        ("POST / HTTP/1.1\r\nContent-Length: 1234567890123456\r\n\r\n", 400, "Content-Length is not a number of bytes"),
        ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "Transfer-Encoding other than chunked is not supported; send chunked or a Content-Length"),
        ("POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 501, "Transfer-Encoding other than chunked is not supported; send chunked or a Content-Length"),
        ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "Transfer-Encoding is given more than once"),
        ("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "both Content-Length and Transfer-Encoding are given; send one"),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "Transfer-Encoding is not allowed in HTTP/1.0"),
        ("GET / HTTP/1.1\r\n\r\n", 400, "an HTTP/1.1 request must have a Host field"),
        ("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400, "Host is given more than once"),
        ("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400, "Host is given more than once"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\ne \r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /smuggled HTTP/1.1\r\n\r\n", 400, "a header line is not NAME: VALUE"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: a\r\n folded\r\n\r\n", 400, "a header line starts with a space or tab (line folding is not accepted)"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: a\u{01}\r\n\r\n", 400, "a header value holds a control character"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0;\r\n\r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0 x\r\n\r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0;a\u{01}\r\n\r\n", 400, "a chunk-size line is not a hexadecimal size and extensions"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\n", 400, "a line ends in a bare LF; lines end in CRLF"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", 400, "a chunk's data is not followed by CRLF"),
        ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;\(String(repeating: "x", count: 1030))\r\n", 400, "a chunk-size line exceeds 1024 bytes"),
    ])
    func refusal(request: String, status: Int, problem: String) {
        let stream = ParsedStream.parse(request)
        #expect(stream.failure == HTTPRequestParser.Failure(status: HTTPResponseStatus(statusCode: status), problem: problem))
        #expect(stream.requests.isEmpty)
    }

    /// Values are checked eight bytes at a time: every byte value at every place of a value
    /// longer than two words, against the byte-by-byte rule.
    @Test func fieldValueBytesAtEveryPlace() {
        let filler = Array("0123456789abcdef-xyz".utf8)
        for place in filler.indices {
            for byte in UInt8.min...UInt8.max {
                var value = filler
                value[place] = byte
                let allowed = byte >= 0x20 ? byte != 0x7F : byte == 0x09
                let checked = value.withUnsafeBytes { HTTPRequestParser.isFieldValue($0) }
                #expect(checked == allowed, "byte \(byte) at \(place)")
            }
        }
        // Through the parser, a control byte in the third word of a request id.
        let id = "5f0c7c1e-9b1a-4c3d-\u{01}e6f-000000000001"
        #expect(
            ParsedStream.parse("GET / HTTP/1.1\r\nHost: h\r\nx-request-id: \(id)\r\n\r\n").failure
                == HTTPRequestParser.Failure(status: .badRequest, problem: "a header value holds a control character")
        )
    }

    @Test func headLimitCountsTheWholeHead() {
        let line = "GET / HTTP/1.0\r\n"
        let exactly = line + "X: " + String(repeating: "a", count: 1024 - line.utf8.count - 7) + "\r\n\r\n"
        #expect(exactly.utf8.count == 1024)
        #expect(ParsedStream.parse(exactly, maxHeadBytes: 1024).requests.count == 1)
        let over = ParsedStream.parse(line + "X: " + String(repeating: "a", count: 1024 - line.utf8.count - 6) + "\r\n\r\n", maxHeadBytes: 1024)
        #expect(over.failure == HTTPRequestParser.Failure(status: .requestHeaderFieldsTooLarge, problem: "request head exceeds 1024 bytes"))
        // Refused as soon as more than the limit has arrived with no end in sight.
        let endless = ParsedStream.parse([Array((line + "X: ").utf8), Array(repeating: UInt8(ascii: "a"), count: 1100)], maxHeadBytes: 1024)
        #expect(endless.failure?.status == .requestHeaderFieldsTooLarge)
    }

    @Test func fieldCountIsBounded() {
        let fields = { (count: Int) in "GET / HTTP/1.0\r\n" + String(repeating: "a: b\r\n", count: count) + "\r\n" }
        #expect(ParsedStream.parse(fields(HTTPRequestParser.maxFields)).requests.count == 1)
        #expect(
            ParsedStream.parse(fields(HTTPRequestParser.maxFields + 1)).failure
                == HTTPRequestParser.Failure(status: .requestHeaderFieldsTooLarge, problem: "request head has more than 256 header fields")
        )
    }

    @Test func trailerSectionIsBoundedAcrossReads() {
        let head = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        let trailers = (0..<40).map { _ in Array("T: \(String(repeating: "t", count: 40))\r\n".utf8) }
        let stream = ParsedStream.parse([Array(head.utf8)] + trailers, maxHeadBytes: 1024)
        #expect(stream.failure == HTTPRequestParser.Failure(status: .badRequest, problem: "the trailer section exceeds 1024 bytes"))
    }

    /// Once its bytes are parsed, a read's buffer is let go: the channel's pool reuses it for the
    /// next read rather than allocating another, and an idle connection holds none.
    @Test func aReadParsedToTheEndIsLetGo() throws {
        var pool = NIOPooledRecvBufferAllocator(capacity: 1, recvAllocator: FixedSizeRecvByteBufferAllocator(capacity: 4096))
        func read() -> ByteBuffer {
            pool.buffer(allocator: ByteBufferAllocator()) { buffer in
                buffer.clear()
                buffer.writeString(Self.callback)
            }.0
        }
        func address(_ buffer: ByteBuffer) -> UInt { buffer.withVeryUnsafeBytes { UInt(bitPattern: $0.baseAddress) } }
        var parser = HTTPRequestParser(maxHeadBytes: 16384)
        let first: UInt
        do {
            let bytes = read()
            first = address(bytes)
            parser.append(bytes)
        }
        var parts = 0
        while try parser.next() != nil { parts += 1 }
        #expect(parts == 3)
        #expect(address(read()) == first)
    }

    /// Each head's fields are placed in an array of its own size: a head of many fields leaves
    /// no large array behind for the heads after it, which may wait in a queue.
    @Test func everyHeadHasItsOwnFieldArray() throws {
        var parser = HTTPRequestParser(maxHeadBytes: 16384)
        parser.append(ByteBuffer(string: "GET / HTTP/1.0\r\n" + String(repeating: "a: b\r\n", count: 256) + "\r\nGET / HTTP/1.0\r\nX: y\r\n\r\n"))
        var heads: [RequestHead] = []
        while let part = try parser.next() {
            if case .head(let head) = part { heads.append(head) }
        }
        #expect(heads.map(\.fields.count) == [256, 1])
        #expect(heads[1].fields.capacity <= 8)
    }

    /// Reads that each end inside a request do not pile up: the parser keeps only what is not
    /// parsed yet.
    @Test func bytesParsedAreLetGoBetweenReads() throws {
        var parser = HTTPRequestParser(maxHeadBytes: 16384)
        let request = Array(("GET /healthz HTTP/1.1\r\nHost: h\r\nX: " + String(repeating: "a", count: 1500) + "\r\n\r\n").utf8)
        let half = request.count / 2
        parser.append(ByteBuffer(bytes: request[..<half]))
        var heads = 0
        for _ in 0..<1000 {
            parser.append(ByteBuffer(bytes: request[half...] + request[..<half]))
            while let part = try parser.next() {
                if case .head = part { heads += 1 }
            }
            #expect(parser.unparsedBytes == half)
        }
        #expect(heads == 1000)
        #expect(parser.heldCapacity < 4 * request.count)
    }

    @Test func nothingIsReadAfterAFailure() throws {
        var parser = HTTPRequestParser(maxHeadBytes: 16384)
        parser.append(ByteBuffer(string: "GET / HTTP/9.9\r\n\r\n"))
        #expect(throws: HTTPRequestParser.Failure.self) { try parser.next() }
        parser.append(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
        #expect(try parser.next() == nil)
    }
}

/// Where this parser and NIO's llhttp-based decoder both read a stream, they read the same
/// requests (field values aside, whose trailing spaces NIO keeps): a proxy in front built on
/// another mainstream parser cannot see a different request boundary.
/// Random requests (methods, targets, field names in any case, spaces around values, bodies by
/// length or in chunks) and random single-byte mutations of them, from a fixed seed.
@Suite struct HTTPRequestParserAgreementTests {
    /// The requests NIO's decoder reads whole from the same bytes, up to any error, and whether
    /// it refused the stream (rather than wait for more of it).
    static func nio(_ bytes: [UInt8]) -> (requests: [ParsedStream.Request], refused: Bool) {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes)))
        defer { _ = try? channel.finish() }
        let refused = (try? channel.writeInbound(ByteBuffer(bytes: bytes))) == nil
        var requests: [ParsedStream.Request] = []
        var open: ParsedStream.Request?
        while let part = try? channel.readInbound(as: HTTPServerRequestPart.self) {
            switch part {
            case .head(let head):
                open = .init(
                    method: head.method.rawValue, uri: head.uri, version: "\(head.version)",
                    // NIO keeps a value's trailing spaces; a field value has none (RFC 9110 5.5).
                    fields: head.headers.map { "\($0.name): \($0.value.trimmingASCIISpaces())" },
                    keepAlive: head.isKeepAlive, body: []
                )
            case .body(let piece): open?.body += piece.readableBytesView
            case .end: requests.append(open!)
            }
        }
        return (requests, refused)
    }

    /// Ours read as NIO reads them, up to the first request after which either closes the
    /// connection (nothing after it is read). With `whole`, NIO must read every one of them;
    /// without, NIO may instead refuse the stream before it has read them all (llhttp refuses
    /// some things RFC 9112 allows, such as a tab after a Content-Length's digits), but never
    /// wait for more bytes of a request ours has read whole. Whether a request keeps the
    /// connection open is not compared: llhttp misses a `Connection` token followed by spaces,
    /// which RFC 9110 says are not part of the value.
    static func agree(_ ours: [ParsedStream.Request], _ bytes: [UInt8], whole: Bool) -> Bool {
        let (theirs, refused) = Self.nio(bytes)
        let lastOurs = ours.firstIndex { !$0.keepAlive } ?? (ours.count - 1)
        let lastTheirs = theirs.firstIndex { !$0.keepAlive } ?? Int.max
        let compared = min(lastOurs, lastTheirs) + 1
        if theirs.count < compared, whole || !refused { return false }
        return zip(ours.prefix(compared), theirs).allSatisfy { a, b in
            a.method == b.method && a.uri == b.uri && a.version == b.version && a.fields == b.fields && a.body == b.body
        }
    }


    static func randomCase(_ text: String, _ random: inout SeededGenerator) -> String {
        String(text.map { Bool.random(using: &random) ? Character($0.uppercased()) : $0 })
    }

    static let methods = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]

    static func request(_ random: inout SeededGenerator) -> String {
        let method = Self.methods.randomElement(using: &random)!
        let target = ["/track", "/metrics?x=1", "/", "/usage?user=a&from=2026-01-01T00:00:00Z", "http://h:1/track", "/a%20b"].randomElement(using: &random)!
        let version = ["HTTP/1.1", "HTTP/1.0"].randomElement(using: &random)!
        var text = "\(method) \(target) \(version)\r\n"
        let spaces = ["", " ", "  ", "\t", " \t"]
        if version == "HTTP/1.1" || Bool.random(using: &random) {
            text += Self.randomCase("host", &random) + ":" + spaces.randomElement(using: &random)! + "usage-tracking:8080\r\n"
        }
        for _ in 0..<Int.random(in: 0...5, using: &random) {
            let name = ["x-request-id", "content-type", "accept", "connection", "authorization", "x-a"].randomElement(using: &random)!
            let value = ["a", "keep-alive", "close", "application/json", "Bearer s3cr3t", "a, b", "x y", ""].randomElement(using: &random)!
            text += Self.randomCase(name, &random) + ":" + spaces.randomElement(using: &random)! + value + spaces.randomElement(using: &random)! + "\r\n"
        }
        let body = String(repeating: "b", count: Int.random(in: 0...40, using: &random))
        if version == "HTTP/1.1", Bool.random(using: &random) {
            text += Self.randomCase("transfer-encoding", &random) + ": chunked\r\n\r\n"
            var rest = Substring(body)
            while !rest.isEmpty {
                let piece = rest.prefix(Int.random(in: 1...16, using: &random))
                rest = rest.dropFirst(piece.count)
                text += String(piece.count, radix: 16, uppercase: Bool.random(using: &random)) + "\r\n" + piece + "\r\n"
            }
            return text + "0\r\n\r\n"
        }
        return text + Self.randomCase("content-length", &random) + ": \(body.utf8.count)\r\n\r\n" + body
    }

    @Test func wellFormedRequestsReadAlike() {
        var random = SeededGenerator(seed: 1)
        for round in 0..<2_000 {
            let bytes = Array((0..<Int.random(in: 1...3, using: &random)).map { _ in Self.request(&random) }.joined().utf8)
            let ours = ParsedStream.parse([bytes])
            #expect(ours.failure == nil, "round \(round)")
            #expect(Self.agree(ours.requests, bytes, whole: true), "round \(round): \(String(decoding: bytes, as: UTF8.self))")
        }
    }

    @Test func whatItAcceptsOfMutatedRequestsReadsAlike() {
        var random = SeededGenerator(seed: 2)
        let replacements: [UInt8] = [0x00, 0x09, 0x0A, 0x0D, 0x20, 0x2C, 0x3A, 0x3B, 0x7F, 0x80, 0xFF, UInt8(ascii: "0"), UInt8(ascii: "a"), UInt8(ascii: "F")]
        var accepted = 0
        for round in 0..<20_000 {
            var bytes = Array(Self.request(&random).utf8)
            for _ in 0..<Int.random(in: 1...3, using: &random) {
                let index = Int.random(in: 0..<bytes.count, using: &random)
                switch Int.random(in: 0..<3, using: &random) {
                case 0: bytes[index] = replacements.randomElement(using: &random)!
                case 1: bytes.insert(replacements.randomElement(using: &random)!, at: index)
                default: bytes.remove(at: index)
                }
                if bytes.isEmpty { bytes = [0x20] }
            }
            let ours = ParsedStream.parse([bytes])
            // Whole requests only: a stream cut short mid-body is still waiting, not refused. Any
            // token is a method here (an unknown one is answered 405 or 404); llhttp knows a list.
            guard ours.failure == nil, !ours.requests.isEmpty, ours.requests.allSatisfy({ Self.methods.contains($0.method) }) else { continue }
            accepted += 1
            #expect(Self.agree(ours.requests, bytes, whole: false), "round \(round): \(bytes)")
        }
        #expect(accepted > 2_000, "enough mutated requests still parse to compare")
    }
}
