import Logging
import NIOCore
import NIOEmbedded
import Synchronization
import UsageTrackingCore

@testable import UsageTrackingServer

final class LogLines: Sendable {
    let lines = Mutex<[String]>([])
    var all: [String] { self.lines.withLock { $0 } }
}

/// A parsed HTTP/1.1 response read back from the channel's outbound bytes.
struct ParsedResponse {
    var status: Int
    var headers: [(String, String)]
    var body: [UInt8]

    var text: String { String(decoding: self.body, as: UTF8.self) }
    func header(_ name: String) -> String? { self.headers.first { $0.0 == name.lowercased() }?.1 }
}

/// The server's real pipeline on an `EmbeddedChannel`: bytes in, bytes out, no sockets.
final class PipelineHarness {
    let channel = EmbeddedChannel()
    let state: ServerState
    let logs = LogLines()

    init(_ configure: (inout ServerConfiguration) -> Void = { _ in }, logLevel: Logger.Level = .info, ready: Bool = true) throws {
        var configuration = ServerConfiguration()
        configure(&configuration)
        let logs = self.logs
        let logger = Logger(label: "test") { _ in
            JSONLogHandler(level: logLevel) { line in logs.lines.withLock { $0.append(line) } }
        }
        let secrets = try CallbackSecrets(value: configuration.callbackSecret, filePath: configuration.callbackSecretFile)
        self.state = ServerState(configuration: configuration, logger: logger, metrics: UsageMetrics(), secrets: secrets)
        self.state.ready.store(ready, ordering: .relaxed)
        try UsageTrackingServer.configurePipeline(self.channel, state: self.state)
        try self.channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9999)).wait()
    }

    deinit {
        _ = try? self.channel.finish()
    }

    /// Writes raw bytes in and returns every response written back so far.
    func send(_ raw: String) throws -> [ParsedResponse] {
        try self.send(Array(raw.utf8))
    }

    func send(_ raw: [UInt8]) throws -> [ParsedResponse] {
        try self.channel.writeInbound(ByteBuffer(bytes: raw))
        return try self.responses()
    }

    func responses() throws -> [ParsedResponse] {
        var bytes: [UInt8] = []
        while let buffer = try self.channel.readOutbound(as: ByteBuffer.self) {
            bytes += buffer.readableBytesView
        }
        return Self.parse(bytes)
    }

    static func post(_ body: String, path: String = "/track", headers: [String] = ["Content-Type: application/json"]) -> String {
        "POST \(path) HTTP/1.1\r\nHost: t\r\n" + headers.map { $0 + "\r\n" }.joined() + "Content-Length: \(body.utf8.count)\r\n\r\n" + body
    }

    static func get(_ path: String, method: String = "GET", headers: [String] = []) -> String {
        "\(method) \(path) HTTP/1.1\r\nHost: t\r\n" + headers.map { $0 + "\r\n" }.joined() + "\r\n"
    }

    private static func parse(_ bytes: [UInt8]) -> [ParsedResponse] {
        var responses: [ParsedResponse] = []
        var rest = bytes[...]
        let separator: [UInt8] = Array("\r\n\r\n".utf8)
        while let headEnd = rest.firstRange(of: separator) {
            let lines = String(decoding: rest[rest.startIndex..<headEnd.lowerBound], as: UTF8.self).components(separatedBy: "\r\n")
            let status = Int(lines[0].split(separator: " ")[1])!
            let headers = lines.dropFirst().map { line -> (String, String) in
                let colon = line.firstIndex(of: ":")!
                return (line[..<colon].lowercased(), String(line[line.index(after: colon)...].drop { $0 == " " }))
            }
            let length = Int(headers.first { $0.0 == "content-length" }!.1)!
            let bodyStart = headEnd.upperBound
            let hasBody = rest[bodyStart...].count >= length
            let body = hasBody ? Array(rest[bodyStart..<bodyStart + length]) : []
            responses.append(ParsedResponse(status: status, headers: headers, body: body))
            rest = rest[(hasBody ? bodyStart + length : bodyStart)...]
        }
        return responses
    }
}

extension String {
    func components(separatedBy separator: String) -> [String] {
        self.split(separator: separator, omittingEmptySubsequences: false).map(String.init)
    }
}
