import EnvoyExternalProcessing
import NIOCore
import NIOHPACK
import NIOHTTP2
import SwiftProtobuf
import UsageTrackingCore

/// One HTTP/2 stream of the ext_proc listener, that is one `ExternalProcessor/Process` RPC: checks
/// the request head, takes a place among `maxStreams` (refused at once when none is free), cuts
/// the DATA frames into gRPC messages, runs them through an `ExtProcStream` and writes its
/// replies, flushed once per read. The RPC ends with its trailers at the response's end, on a
/// message that breaks the protocol, or after `idleTimeout` without a message; a stream that ends
/// before (reset, closed, or the connection gone) is aborted. Every stream that took a place is
/// handed to `report` exactly once, on the event loop. Replies the client leaves unread stop the
/// reading of its messages, so HTTP/2's flow control holds it back instead of our buffers growing.
final class ExtProcStreamHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    /// The one method served.
    static let processPath = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    /// What the client is told of bytes that are not a ProcessingRequest (the text grpc-swift
    /// sent before, so clients see the same).
    static let undecodableMessage = "Can't deserialize to message of type Envoy_Service_ExtProc_V3_ProcessingRequest."

    private let settings: ExtProcSettings
    private let idleTimeout: TimeAmount
    private let maxValueBytes: Int
    private let counters: ExtProcCounters
    private let report: (TokenStreamReport) -> Void

    private enum Phase {
        /// Before the request head.
        case start
        /// Holding a place; `stream` is set.
        case open
        /// The RPC's trailers are written (or it was refused): nothing more is read or written.
        case ended
    }
    private var phase = Phase.start
    /// The RPC's state, from the place taken until the report.
    private var stream: ExtProcStream?
    /// The part of a gRPC message received so far (prefix included); empty between messages.
    private var partial = ByteBuffer()
    /// What `partial` holds (its capacity), as counted in `counters.messageBytesHeld`.
    private var partialHeld = 0
    /// When the message in `partial` began to arrive.
    private var partialSince: NIODeadline?
    /// Replies of this read, framed, written as one DATA frame at the read's end.
    private var replies = ByteBuffer()
    private var headSent = false
    private var reading = false
    private var flushPending = false
    /// A read asked for while the stream could take no more writes (its replies not read).
    private var readHeld = false
    private var lastMessage = NIODeadline.uptimeNanoseconds(0)
    private var idleCheck: Scheduled<Void>?

    init(settings: ExtProcSettings, maxValueBytes: Int, counters: ExtProcCounters, report: @escaping (TokenStreamReport) -> Void) {
        self.settings = settings
        self.idleTimeout = TimeAmount(settings.idleTimeout)
        self.maxValueBytes = maxValueBytes
        self.counters = counters
        self.report = report
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.reading = true
        switch self.unwrapInboundIn(data) {
        case .headers(let headers):
            switch self.phase {
            case .start:
                self.begin(headers.headers, context: context)
                if headers.endStream { self.peerEnded(context: context) }
            case .open:
                // Request trailers: gRPC has none to read; they end the client's side.
                if headers.endStream { self.peerEnded(context: context) }
            case .ended: break
            }
        case .data(let data):
            guard self.phase == .open, case .byteBuffer(let bytes) = data.data else { break }
            self.receive(bytes, context: context)
            if data.endStream, self.phase == .open { self.peerEnded(context: context) }
        default:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.reading = false
        self.writeReplies(context: context)
        self.flushIfPending(context: context)
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        guard context.channel.isWritable else {
            self.readHeld = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, self.readHeld {
            self.readHeld = false
            context.read()
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Reset by the peer, or its connection closed, before the RPC's end.
        self.finish(.aborted)
        self.dropPartial()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.dropPartial()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A stream error (the frames broke HTTP/2): the stream is over; closing it reports it aborted.
        context.close(promise: nil)
    }

    // MARK: - The request head

    private func begin(_ headers: HPACKHeaders, context: ChannelHandlerContext) {
        self.phase = .ended
        if let (status, grpcStatus, message) = Self.problem(with: headers) {
            self.endWithTrailers(grpcStatus: grpcStatus, message: message, httpStatus: status, context: context)
            return
        }
        guard self.counters.openStream(limit: self.settings.maxStreams) else {
            self.counters.record(.overCapacity)
            self.endWithTrailers(
                grpcStatus: .resourceExhausted, message: "\(self.settings.maxStreams) streams are open, the most --ext-proc-max-streams allows",
                context: context
            )
            return
        }
        self.phase = .open
        self.stream = ExtProcStream(headers: self.settings.headers, maxValueBytes: self.maxValueBytes)
        self.lastMessage = context.eventLoop.now
        self.scheduleIdleCheck(at: self.lastMessage + self.idleTimeout, context: context)
    }

    /// Why a request is not this RPC: the HTTP status, gRPC status and message to answer, as
    /// gRPC servers answer them (grpc-go's choices); what the client sent is echoed cut short.
    private static func problem(with headers: HPACKHeaders) -> (HTTPStatus, GRPCStatus, String)? {
        func value(_ name: String) -> String { (headers.first(name: name) ?? "").truncated(toUTF8Bytes: ClientText.echoedBytes) }
        let method = value(":method")
        guard method == "POST" else { return (.methodNotAllowed, .internalError, "gRPC requires POST, not \(method)") }
        let contentType = value("content-type")
        guard contentType == "application/grpc" || contentType == "application/grpc+proto" else {
            return (.unsupportedMediaType, .internalError, "content-type \(contentType) is not application/grpc")
        }
        let path = value(":path")
        guard path == Self.processPath else { return (.ok, .unimplemented, "no method \(path); this server serves \(Self.processPath)") }
        return nil
    }

    // MARK: - Messages

    /// Cuts `bytes` (one DATA frame's) into gRPC messages: a flag byte, a 4-byte big-endian
    /// length, the message; messages may span frames, and frames hold several.
    private func receive(_ bytes: ByteBuffer, context: ChannelHandlerContext) {
        var bytes = bytes
        let joined = self.partial.readableBytes > 0
        if joined {
            self.partial.writeBuffer(&bytes)
            bytes = self.partial
            self.partial = ByteBuffer()
        }
        while self.phase == .open, let flag = bytes.getInteger(at: bytes.readerIndex, as: UInt8.self) {
            guard flag == 0 else {
                // We offer no grpc-accept-encoding, so nothing may come compressed (flag 1), and no other flag exists.
                return self.refuse(.invalidMessage, flag == 1 ? "a compressed gRPC message; none was offered" : "a gRPC message with flags \(flag)", context: context)
            }
            guard let length = bytes.getInteger(at: bytes.readerIndex + 1, as: UInt32.self) else { break }
            guard length <= ExtProcListener.maxMessageBytes else {
                return self.refuse(.invalidMessage, "a gRPC message over \(ExtProcListener.maxMessageBytes) bytes (\(length) announced)", context: context)
            }
            guard bytes.readableBytes >= 5 + Int(length) else { break }
            bytes.moveReaderIndex(forwardBy: 5)
            let message = bytes.readSlice(length: Int(length))!
            // Whatever follows is the next message, on a clock of its own.
            self.partialSince = nil
            self.receive(message: message, context: context)
        }
        guard self.phase == .open, bytes.readableBytes > 0 else { return self.dropPartial() }
        if joined, bytes.capacity <= 2 * bytes.readableBytes + (64 << 10) {
            // Only what this frame brought past the last whole message moves.
            bytes.discardReadBytes()
            self.partial = bytes
        } else {
            // Copied into a buffer of its own, so that neither the frame's other bytes (and the
            // read buffer under them) nor the buffer of a large message before are held for it.
            self.partial.writeImmutableBuffer(bytes)
        }
        let limit = self.settings.maxMessageBytesHeld
        guard self.counters.holdMessageBytes(from: self.partialHeld, to: self.partial.capacity, limit: limit) else {
            self.dropPartial()
            self.counters.record(.overCapacity)
            let problem = "messages in progress would hold more than \(limit) bytes, the most kept for all streams together"
            self.finish(.protocolError(problem))
            return self.endWithTrailers(grpcStatus: .resourceExhausted, message: problem, context: context)
        }
        self.partialHeld = self.partial.capacity
        if self.partialSince == nil {
            // A message began: its clock starts.
            self.partialSince = context.eventLoop.now
            self.idleCheck?.cancel()
            self.scheduleIdleCheck(at: self.nextCheck, context: context)
        }
    }

    /// Lets go of the message in progress, and of its bytes in `counters.messageBytesHeld`.
    private func dropPartial() {
        self.partial = ByteBuffer()
        self.partialSince = nil
        _ = self.counters.holdMessageBytes(from: self.partialHeld, to: 0, limit: 0)
        self.partialHeld = 0
    }

    private func receive(message: ByteBuffer, context: ChannelHandlerContext) {
        self.lastMessage = context.eventLoop.now
        let request: ExtProcStream.Request
        do {
            request = try ExtProcStream.Request(serializedBytes: MessageBytes(message))
        } catch {
            self.counters.record(.invalidMessage)
            self.finish(.protocolError("a message that is not a ProcessingRequest"))
            return self.endWithTrailers(grpcStatus: .invalidArgument, message: Self.undecodableMessage, context: context)
        }
        switch self.stream!.receive(request) {
        case .reply(let reply):
            self.append(reply)
        case .silent:
            break
        case .refuse(let reason, let problem):
            return self.refuse(reason, problem, context: context)
        }
        // The answer is over: end the RPC with OK now, rather than wait for Envoy to end it.
        if self.stream!.isComplete {
            self.finish(.complete)
            self.endWithTrailers(grpcStatus: .ok, message: nil, context: context)
        }
    }

    private func append(_ reply: ExtProcStream.Response) {
        // An empty CONTINUE of one kind: a few bytes, which cannot fail to serialize.
        let bytes: [UInt8] = (try? reply.serializedBytes()) ?? []
        self.replies.writeInteger(UInt8(0))
        self.replies.writeInteger(UInt32(bytes.count))
        self.replies.writeBytes(bytes)
    }

    /// The client has ended its side.
    private func peerEnded(context: ChannelHandlerContext) {
        guard self.phase == .open else { return }
        if self.partial.readableBytes > 0 {
            return self.refuse(.invalidMessage, "the stream ended inside a gRPC message", context: context)
        }
        self.finish(.aborted)
        self.endWithTrailers(grpcStatus: .ok, message: nil, context: context)
    }

    private func refuse(_ reason: ExtProcCounters.Reason, _ problem: String, context: ChannelHandlerContext) {
        self.counters.record(reason)
        self.finish(.protocolError(problem))
        self.endWithTrailers(grpcStatus: .invalidArgument, message: problem, context: context)
    }

    // MARK: - The idle timeout and the message timeout

    /// One scheduled check per stream at a time; a message only moves `lastMessage`, and the
    /// check reschedules itself until the stream has been silent for the whole timeout, or a
    /// message has taken longer than `messageTimeout` to arrive.
    private func scheduleIdleCheck(at deadline: NIODeadline, context: ChannelHandlerContext) {
        self.idleCheck = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.checkIdle(context: context)
        }
    }

    private var nextCheck: NIODeadline {
        let idle = self.lastMessage + self.idleTimeout
        return self.partialSince.map { min(idle, $0 + TimeAmount(self.settings.messageTimeout)) } ?? idle
    }

    private func checkIdle(context: ChannelHandlerContext) {
        self.idleCheck = nil
        guard self.phase == .open else { return }
        let now = context.eventLoop.now
        if let since = self.partialSince, now >= since + TimeAmount(self.settings.messageTimeout) {
            self.counters.record(.idleTimeout)
            self.finish(.idleTimeout)
            let seconds = self.settings.messageTimeout.components.seconds
            return self.endWithTrailers(
                grpcStatus: .deadlineExceeded, message: "a gRPC message took more than \(seconds) s to arrive whole (--request-timeout)", context: context
            )
        }
        guard now >= self.lastMessage + self.idleTimeout else { return self.scheduleIdleCheck(at: self.nextCheck, context: context) }
        self.counters.record(.idleTimeout)
        self.finish(.idleTimeout)
        let seconds = self.settings.idleTimeout.components.seconds
        self.endWithTrailers(grpcStatus: .deadlineExceeded, message: "no message for \(seconds) s (--ext-proc-idle-timeout)", context: context)
    }

    // MARK: - The RPC's end

    /// Hands over the report and gives back the place, once.
    private func finish(_ end: TokenStreamReport.End) {
        guard let stream = self.stream else { return }
        self.stream = nil
        self.idleCheck?.cancel()
        self.idleCheck = nil
        self.counters.closeStream()
        self.report(stream.report(end: end))
    }

    /// Writes the replies so far and the trailers (trailers-only when nothing was sent), ending
    /// our side of the stream; flushed at the read's end.
    private func endWithTrailers(grpcStatus: GRPCStatus, message: String?, httpStatus: HTTPStatus = .ok, context: ChannelHandlerContext) {
        self.phase = .ended
        self.dropPartial()
        self.writeReplies(context: context)
        var trailers = HPACKHeaders()
        if !self.headSent {
            trailers.add(name: ":status", value: httpStatus.rawValue)
            trailers.add(name: "content-type", value: "application/grpc")
            self.headSent = true
        }
        trailers.add(name: "grpc-status", value: grpcStatus.rawValue)
        if let message { trailers.add(name: "grpc-message", value: Self.percentEncoded(message)) }
        context.write(self.wrapOutboundOut(.headers(.init(headers: trailers, endStream: true))), promise: nil)
        self.flushPending = true
        if !self.reading { self.flushIfPending(context: context) }
    }

    private static let responseHead: HPACKHeaders = [":status": "200", "content-type": "application/grpc"]

    private func writeReplies(context: ChannelHandlerContext) {
        guard self.replies.readableBytes > 0 else { return }
        if !self.headSent {
            self.headSent = true
            context.write(self.wrapOutboundOut(.headers(.init(headers: Self.responseHead))), promise: nil)
        }
        context.write(self.wrapOutboundOut(.data(.init(data: .byteBuffer(self.replies)))), promise: nil)
        self.replies = ByteBuffer()
        self.flushPending = true
    }

    private func flushIfPending(context: ChannelHandlerContext) {
        guard self.flushPending else { return }
        self.flushPending = false
        context.flush()
    }

    /// grpc-message's encoding: bytes outside printable ASCII, and `%`, as %XX.
    static func percentEncoded(_ text: String) -> String {
        var encoded = ""
        for byte in text.utf8 {
            if (0x20...0x7e).contains(byte), byte != UInt8(ascii: "%") {
                encoded.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                let hex = Array("0123456789ABCDEF".utf8)
                encoded += String(decoding: [UInt8(ascii: "%"), hex[Int(byte >> 4)], hex[Int(byte & 0xf)]], as: UTF8.self)
            }
        }
        return encoded
    }

    /// The HTTP statuses answered.
    enum HTTPStatus: String {
        case ok = "200", methodNotAllowed = "405", unsupportedMediaType = "415"
    }

    /// The gRPC statuses answered (their numbers, as grpc-status carries them).
    enum GRPCStatus: String {
        case ok = "0", invalidArgument = "3", deadlineExceeded = "4", resourceExhausted = "8", unimplemented = "12", internalError = "13"
    }
}

/// A message's bytes as SwiftProtobuf reads them, straight from the frame's buffer.
private struct MessageBytes: SwiftProtobufContiguousBytes {
    var buffer: ByteBuffer

    init(_ buffer: ByteBuffer) { self.buffer = buffer }
    init(repeating byte: UInt8, count: Int) { self.buffer = ByteBuffer(repeating: byte, count: count) }
    init<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 { self.buffer = ByteBuffer(bytes: bytes) }

    var count: Int { self.buffer.readableBytes }

    func withUnsafeBytes<Result>(_ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        try self.buffer.withUnsafeReadableBytes(body)
    }

    mutating func withUnsafeMutableBytes<Result>(_ body: (UnsafeMutableRawBufferPointer) throws -> Result) rethrows -> Result {
        try self.buffer.withUnsafeMutableReadableBytes(body)
    }
}
