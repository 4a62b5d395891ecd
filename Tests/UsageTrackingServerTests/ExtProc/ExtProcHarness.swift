import EnvoyExternalProcessing
import Foundation
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import SwiftProtobuf
import UsageTrackingCore

@testable import UsageTrackingServer

typealias ProcessingRequest = Envoy_Service_ExtProc_V3_ProcessingRequest
typealias ProcessingResponse = Envoy_Service_ExtProc_V3_ProcessingResponse

/// `ExtProcStreamHandler`s, each in an `EmbeddedChannel` standing for one HTTP/2 stream, driven
/// with the frame payloads nio-http2's multiplexer hands a stream: the request head, DATA frames
/// carrying gRPC-framed messages (or any bytes), the client's end of stream. All streams share
/// the counters and the reports, as the streams of one listener do.
final class ExtProcHarness {
    var settings = ExtProcSettings(port: 0)
    var maxValueBytes = 256
    let counters = ExtProcCounters()
    private(set) var reports: [TokenStreamReport] = []

    static let requestHead: HPACKHeaders = [
        ":method": "POST", ":scheme": "http", ":path": ExtProcStreamHandler.processPath, ":authority": "ext-proc",
        "content-type": "application/grpc", "te": "trailers",
    ]

    /// A new stream, its head not yet sent.
    func stream() throws -> Stream {
        let channel = EmbeddedChannel()
        let handler = ExtProcStreamHandler(settings: self.settings, maxValueBytes: self.maxValueBytes, counters: self.counters) {
            self.reports.append($0)
        }
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return Stream(channel: channel)
    }

    /// One whole stream as a gRPC client makes it: the head, each message in a DATA frame of its
    /// own (one read each), then the client's end of stream; what it was answered, and its report.
    func exchange(_ messages: [ProcessingRequest]) throws -> (Answer, TokenStreamReport?) {
        let stream = try self.stream()
        try stream.open()
        for message in messages { try stream.send(message) }
        try stream.end()
        return (try stream.answer(), self.reports.last)
    }

    struct Stream {
        let channel: EmbeddedChannel

        func open(_ head: HPACKHeaders = ExtProcHarness.requestHead, endStream: Bool = false) throws {
            try self.channel.writeInbound(HTTP2Frame.FramePayload.headers(.init(headers: head, endStream: endStream)))
        }

        func send(_ message: ProcessingRequest) throws {
            try self.data(Grpc.framed(message))
        }

        /// One DATA frame, in a read of its own.
        func data(_ bytes: [UInt8], endStream: Bool = false) throws {
            try self.channel.writeInbound(Self.frame(bytes, endStream: endStream))
        }

        static func frame(_ bytes: [UInt8], endStream: Bool = false) -> HTTP2Frame.FramePayload {
            .data(.init(data: .byteBuffer(ByteBuffer(bytes: bytes)), endStream: endStream))
        }

        /// The client's end of stream, as an empty DATA frame.
        func end() throws {
            try self.data([], endStream: true)
        }

        /// Every frame payload written and flushed since the last call.
        func written() throws -> [HTTP2Frame.FramePayload] {
            var frames: [HTTP2Frame.FramePayload] = []
            while let frame = try self.channel.readOutbound(as: HTTP2Frame.FramePayload.self) { frames.append(frame) }
            return frames
        }

        /// What has been written so far, read as a gRPC client reads it.
        func answer() throws -> Answer {
            try Answer(try self.written())
        }
    }
}

/// A stream's answer as a gRPC client sees it: the response head (or trailers-only answer),
/// the replies, and the trailers.
struct Answer {
    var head: HPACKHeaders?
    var replies: [ProcessingResponse.OneOf_Response?] = []
    var trailers: HPACKHeaders?
    /// DATA frames written, each holding one or more replies.
    var dataFrames = 0

    init(_ frames: [HTTP2Frame.FramePayload]) throws {
        var bytes: [UInt8] = []
        for frame in frames {
            switch frame {
            case .headers(let headers) where self.head == nil && !headers.endStream:
                self.head = headers.headers
            case .headers(let headers) where self.trailers == nil && headers.endStream:
                self.trailers = headers.headers
            case .data(let data) where self.head != nil && self.trailers == nil:
                guard case .byteBuffer(let buffer) = data.data, !data.endStream else { throw AnswerError.unexpected("\(frame)") }
                bytes += buffer.readableBytesView
                self.dataFrames += 1
            default:
                throw AnswerError.unexpected("\(frame)")
            }
        }
        self.replies = try Grpc.unframed(bytes).map { try ProcessingResponse(serializedBytes: $0).response }
    }

    /// grpc-status, as a number; nil before the trailers.
    var status: Int? { self.trailers?.first(name: "grpc-status").flatMap { Int($0) } }
    /// grpc-message, percent-decoded.
    var message: String? { self.trailers?.first(name: "grpc-message").map { $0.removingPercentEncoding ?? "not percent-encoded: \($0)" } }

    enum AnswerError: Error {
        case unexpected(String)
    }
}

/// gRPC's length-prefixed messages: a flag byte (1: compressed), a 4-byte big-endian length.
enum Grpc {
    static func prefix(length: Int, flag: UInt8 = 0) -> [UInt8] {
        [flag, UInt8(length >> 24 & 0xff), UInt8(length >> 16 & 0xff), UInt8(length >> 8 & 0xff), UInt8(length & 0xff)]
    }

    static func framed(_ message: ProcessingRequest) throws -> [UInt8] {
        let bytes: [UInt8] = try message.serializedBytes()
        return Self.prefix(length: bytes.count) + bytes
    }

    static func unframed(_ bytes: [UInt8]) throws -> [[UInt8]] {
        var messages: [[UInt8]] = []
        var rest = bytes[...]
        while !rest.isEmpty {
            guard rest.count >= 5, rest.first == 0 else { throw Answer.AnswerError.unexpected("bad prefix \(Array(rest.prefix(5)))") }
            let length = rest.dropFirst().prefix(4).reduce(0) { $0 << 8 | Int($1) }
            guard rest.count >= 5 + length else { throw Answer.AnswerError.unexpected("short message") }
            messages.append(Array(rest.dropFirst(5).prefix(length)))
            rest = rest.dropFirst(5 + length)
        }
        return messages
    }
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
