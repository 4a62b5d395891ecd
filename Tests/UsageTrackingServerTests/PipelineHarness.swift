import Logging
import NIOCore
import NIOEmbedded
import Synchronization
import TestSupport
import UsageTrackingCore

@testable import UsageTrackingServer

final class LogLines: Sendable {
    let lines = Mutex<[String]>([])
    var all: [String] { self.lines.withLock { $0 } }
}

/// The server's real pipeline on an `EmbeddedChannel`: bytes in, bytes out, no sockets.
final class PipelineHarness {
    let channel = EmbeddedChannel()
    let state: ServerState
    let logs = LogLines()

    /// Off-loop work runs inline by default, so replies are written before `send` returns; a test
    /// of the ordering around slow replies passes its own runner.
    convenience init(
        _ configure: (inout ServerConfiguration) -> Void = { _ in }, logLevel: Logger.Level = .info, ready: Bool = true,
        runOffLoop: @escaping ServerState.OffLoopRunner = { eventLoop, work in eventLoop.makeSucceededFuture(work()) }
    ) throws {
        var configuration = ServerConfiguration()
        configure(&configuration)
        try self.init(configuration, logLevel: logLevel, ready: ready, runOffLoop: runOffLoop, requestIDs: nil)
    }

    /// `requestIDs`: the dedupe window, which the tests of repeated ids give themselves.
    init(
        _ configuration: ServerConfiguration, logLevel: Logger.Level = .info, ready: Bool = true,
        runOffLoop: @escaping ServerState.OffLoopRunner = { eventLoop, work in eventLoop.makeSucceededFuture(work()) },
        requestIDs: RequestIDWindow?
    ) throws {
        let logs = self.logs
        let logger = Logger(label: "test") { _ in
            JSONLogHandler(level: logLevel) { line in logs.lines.withLock { $0.append(line) } }
        }
        let secrets = try CallbackSecrets(value: configuration.callbackSecret, filePath: configuration.callbackSecretFile)
        self.state = ServerState(
            configuration: configuration, logger: logger,
            metrics: UsageMetrics(
                schema: configuration.schema, requestIDs: requestIDs,
                extProc: configuration.extProc.map { _ in ExtProcCounters() }
            ),
            secrets: secrets, runOffLoop: runOffLoop
        )
        self.state.ready.store(ready, ordering: .relaxed)
        try HTTPPipeline.configure(self.channel, state: self.state)
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
        try Self.responses(of: self.channel)
    }

    static func responses(of channel: EmbeddedChannel) throws -> [ParsedResponse] {
        var bytes: [UInt8] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) {
            bytes += buffer.readableBytesView
        }
        return ParsedResponse.parseAll(bytes)
    }

    /// Another connection to the same server state, on its own embedded loop.
    func connection() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try HTTPPipeline.configure(channel, state: self.state)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9998)).wait()
        return channel
    }

    static func post(_ body: String, path: String = "/track", headers: [String] = ["Content-Type: application/json"]) -> String {
        "POST \(path) HTTP/1.1\r\nHost: t\r\n" + headers.map { $0 + "\r\n" }.joined() + "Content-Length: \(body.utf8.count)\r\n\r\n" + body
    }

    static func get(_ path: String, method: String = "GET", headers: [String] = []) -> String {
        "\(method) \(path) HTTP/1.1\r\nHost: t\r\n" + headers.map { $0 + "\r\n" }.joined() + "\r\n"
    }
}
