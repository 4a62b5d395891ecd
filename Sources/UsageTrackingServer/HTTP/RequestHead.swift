import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// A request's head as `HTTPRequestParser` read it: its bytes, kept as they arrived, and where
/// the target and each field are in them. Nothing becomes a `String` until it is asked for.
struct RequestHead {
    /// Where one field's name and value (without surrounding spaces) are in `bytes`; 32-bit
    /// offsets, as a head is at most 1 MiB (`--max-header-bytes`).
    struct Field {
        var nameStart: UInt32
        var nameEnd: UInt32
        var valueStart: UInt32
        var valueEnd: UInt32

        var name: Range<Int> { Int(self.nameStart)..<Int(self.nameEnd) }
        var value: Range<Int> { Int(self.valueStart)..<Int(self.valueEnd) }
    }

    var method: HTTPMethod
    var version: HTTPVersion
    /// The request target's place in `bytes`.
    var target: Range<Int>
    /// The head, request line to blank line.
    var bytes = ByteBuffer()
    var fields: [Field] = []
    /// 0 when the request has no Content-Length.
    var contentLength = 0
    var isChunked = false
    var isKeepAlive = true
    /// The request asks to switch protocols: it is answered, then the connection closes.
    var upgrades = false
    /// `Expect: 100-continue`: the client waits for an interim reply before it sends the body.
    var expectsContinue = false

    init(method: HTTPMethod, version: HTTPVersion, target: Range<Int>) {
        self.method = method
        self.version = version
        self.target = target
    }

    /// Stands for a request that could not be parsed, in the reply to it.
    static let unparsed = RequestHead(method: .GET, version: .http1_1, target: 0..<0)

    /// The request target as sent (`/track`, `/usage?user=a`, or an absolute URL).
    var uri: String {
        self.bytes.withUnsafeReadableBytes { String(decoding: UnsafeRawBufferPointer(rebasing: $0[self.target]), as: UTF8.self) }
    }

    /// The endpoint the target names.
    var route: Route {
        self.bytes.withUnsafeReadableBytes { Route(target: UnsafeRawBufferPointer(rebasing: $0[self.target])) }
    }

    /// The method as replies and logs name it: any token is a method, so it is cut like other
    /// text the client chose.
    var echoedMethod: String { self.method.rawValue.truncated(toUTF8Bytes: ClientText.echoedBytes) }

    /// GET or HEAD: what the read-only routes answer.
    var isRead: Bool { self.method == .GET || self.method == .HEAD }

    /// The value of the first field called `name` (any letter case).
    func first(name: String) -> String? {
        self.withFirst(name: name) { String(decoding: $0, as: UTF8.self) }
    }

    /// The values of every field called `name`, joined with ", " as HTTP reads a field given on
    /// several lines; nil without one. For a list read whole (`Content-Encoding`): a second line
    /// cannot slip past a check of the first.
    func joinedValues(name: String) -> String? {
        var joined: String?
        self.forEachValue(name: name) { value in
            let value = String(decoding: value, as: UTF8.self)
            joined = joined.map { $0 + ", " + value } ?? value
        }
        return joined
    }

    /// How many fields are called `name`: a field that must come once (`Content-Type`) is
    /// refused when given on more lines, whatever the first says.
    func count(name: String) -> Int {
        var count = 0
        self.forEachValue(name: name) { _ in count += 1 }
        return count
    }

    private func forEachValue(name: String, _ body: (UnsafeRawBufferPointer) -> Void) {
        var name = name
        name.withUTF8 { wanted in
            self.bytes.withUnsafeReadableBytes { bytes in
                for field in self.fields where HTTPRequestParser.equalsIgnoringCase(UnsafeRawBufferPointer(rebasing: bytes[field.name]), UnsafeRawBufferPointer(wanted)) {
                    body(UnsafeRawBufferPointer(rebasing: bytes[field.value]))
                }
            }
        }
    }

    /// `body` with the bytes of the first field called `name`; nil without one.
    func withFirst<Result>(name: String, _ body: (UnsafeRawBufferPointer) -> Result) -> Result? {
        var name = name
        return name.withUTF8 { wanted in
            self.bytes.withUnsafeReadableBytes { bytes in
                for field in self.fields where HTTPRequestParser.equalsIgnoringCase(UnsafeRawBufferPointer(rebasing: bytes[field.name]), UnsafeRawBufferPointer(wanted)) {
                    return body(UnsafeRawBufferPointer(rebasing: bytes[field.value]))
                }
                return nil
            }
        }
    }

    /// Every item of the comma-separated lists in the fields called `name`, as `Accept` and
    /// `Accept-Encoding` are sent: trimmed, empty ones dropped.
    func listItems(name: String) -> [String] {
        (self.joinedValues(name: name) ?? "").split(separator: ",").map { $0.trimmingASCIISpaces() }.filter { !$0.isEmpty }
    }
}
