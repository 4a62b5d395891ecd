import EnvoyExternalProcessing
import Foundation
import GRPCCore
import GRPCInProcessTransport
import GRPCProtobuf
import Synchronization
import UsageTrackingCore

@testable import UsageTrackingServer

typealias ProcessingRequest = Envoy_Service_ExtProc_V3_ProcessingRequest
typealias ProcessingResponse = Envoy_Service_ExtProc_V3_ProcessingResponse

/// `ExtProcService` behind grpc-swift's in-process transport, driven as Envoy drives it: one
/// `Process` stream per exchange, messages sent as bytes (so a test can send bytes that are not
/// a ProcessingRequest), replies and the final status collected.
struct ExtProcHarness {
    var settings = ExtProcSettings(port: 0)
    var maxValueBytes = 256
    let counters = ExtProcCounters()
    let reports = Reports()

    /// What the client saw of one stream: the replies, then the error status (nil: OK).
    struct Exchange {
        var replies: [ProcessingResponse.OneOf_Response?]
        var error: RPCError?
    }

    /// Runs `body` with a client of a running service; the service stops when it returns.
    func run<Result: Sendable>(_ body: (Client) async throws -> Result) async throws -> Result {
        let transport = InProcessTransport()
        let service = ExtProcService(
            settings: self.settings, maxValueBytes: self.maxValueBytes, counters: self.counters,
            report: { [reports] in reports.append($0) }
        )
        return try await withGRPCServer(transport: transport.server, services: [service]) { _ in
            try await withGRPCClient(transport: transport.client) { client in
                try await body(Client(client: client))
            }
        }
    }

    /// One stream and its report.
    func exchange(_ messages: [ProcessingRequest]) async throws -> (Exchange, TokenStreamReport?) {
        let exchange = try await self.run { try await $0.exchange(messages.map { try $0.serializedBytes() }) }
        return (exchange, self.reports.all.last)
    }

    struct Client: Sendable {
        let client: GRPCClient<InProcessTransport.Client>

        /// Sends `messages`; with `holdOpen`, keeps the stream open after them until that gate
        /// opens, which it does when the server ends the stream. `onReply` sees the number of
        /// replies so far after each one.
        func exchange(_ messages: [[UInt8]], holdOpen: Gate? = nil, onReply: @escaping @Sendable (Int) -> Void = { _ in }) async throws -> Exchange {
            let request = StreamingClientRequest(of: [UInt8].self) { writer in
                try await writer.write(contentsOf: messages)
                await holdOpen?.wait()
            }
            return try await self.client.bidirectionalStreaming(
                request: request, descriptor: Envoy_Service_ExtProc_V3_ExternalProcessor.Method.Process.descriptor,
                serializer: BytesSerializer(), deserializer: ProtobufDeserializer<ProcessingResponse>(), options: .defaults
            ) { response in
                defer { holdOpen?.open() }
                var exchange = Exchange(replies: [], error: nil)
                do {
                    for try await reply in response.messages {
                        exchange.replies.append(reply.response)
                        onReply(exchange.replies.count)
                    }
                } catch let error as RPCError {
                    exchange.error = error
                }
                return exchange
            }
        }
    }
}

/// The reports the service handed over, in order.
final class Reports: Sendable {
    private let reports = Mutex<[TokenStreamReport]>([])
    func append(_ report: TokenStreamReport) { self.reports.withLock { $0.append(report) } }
    var all: [TokenStreamReport] { self.reports.withLock { $0 } }
}

/// Opened once; every `wait` returns then.
final class Gate: Sendable {
    private let stream: AsyncStream<Void>
    private let continuation: AsyncStream<Void>.Continuation

    init() {
        (self.stream, self.continuation) = AsyncStream.makeStream()
    }

    func open() { self.continuation.finish() }
    func wait() async { for await _ in self.stream {} }
}

/// Sends bytes as they are: serialized ProcessingRequests, or anything else.
struct BytesSerializer: MessageSerializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
}

/// ProcessingRequests as Envoy builds them.
enum Envoy {
    static func headerMap(_ headers: [(String, String)]) -> Envoy_Config_Core_V3_HeaderMap {
        .with { map in
            map.headers = headers.map { name, value in .with { $0.key = name; $0.rawValue = Data(value.utf8) } }
        }
    }

    static func requestHeaders(_ headers: [(String, String)], endOfStream: Bool = false) -> ProcessingRequest {
        .with { $0.requestHeaders = .with { $0.headers = headerMap(headers); $0.endOfStream = endOfStream } }
    }

    static func responseHeaders(_ headers: [(String, String)], endOfStream: Bool = false) -> ProcessingRequest {
        .with { $0.responseHeaders = .with { $0.headers = headerMap(headers); $0.endOfStream = endOfStream } }
    }

    static func requestBody(_ text: String, endOfStream: Bool) -> ProcessingRequest {
        .with { $0.requestBody = .with { $0.body = Data(text.utf8); $0.endOfStream = endOfStream } }
    }

    static func responseBody(_ text: String, endOfStream: Bool) -> ProcessingRequest {
        .with { $0.responseBody = .with { $0.body = Data(text.utf8); $0.endOfStream = endOfStream } }
    }

    static let requestTrailers = ProcessingRequest.with { $0.requestTrailers = .init() }
    static let responseTrailers = ProcessingRequest.with { $0.responseTrailers = .init() }

    /// The same messages as Envoy sends them in observability mode.
    static func observing(_ messages: [ProcessingRequest]) -> [ProcessingRequest] {
        messages.map { message in
            var message = message
            message.observabilityMode = true
            return message
        }
    }
}
