import EnvoyExternalProcessing
import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP2
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

/// The gRPC layer of the stream handler: the request head it takes, messages however the DATA
/// frames cut them, the frames it writes and flushes, and the trailers of every end.
@Suite struct ExtProcWireTests {
    typealias Head = ExtProcStreamHandlerTests

    static let streamedReplies: [ProcessingResponse.OneOf_Response?] = [
        .requestHeaders(.init()), .responseHeaders(.init()), .responseBody(.init()), .responseBody(.init()), .responseBody(.init()),
    ]

    /// The whole streamed exchange as the bytes of its DATA frames.
    static func streamedBytes() throws -> [UInt8] {
        try Head.streamed.flatMap { try Grpc.framed($0) }
    }

    @Test func messagesSplitAtEveryByteAcrossDataFramesReadTheSame() throws {
        let bytes = try Self.streamedBytes()
        let expected = try ExtProcHarness().exchange(Head.streamed).1
        // Two frames, split at every position.
        for split in 0...bytes.count {
            let harness = ExtProcHarness()
            let stream = try harness.stream()
            try stream.open()
            try stream.data(Array(bytes[..<split]))
            try stream.data(Array(bytes[split...]))
            let answer = try stream.answer()
            #expect(answer.replies == Self.streamedReplies, "split at \(split)")
            #expect(answer.status == 0, "split at \(split)")
            #expect(harness.reports == [expected!], "split at \(split)")
        }
        // One byte per frame.
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        for byte in bytes { try stream.data([byte]) }
        let answer = try stream.answer()
        #expect(answer.replies == Self.streamedReplies)
        #expect(answer.status == 0)
        #expect(harness.reports == [expected!])
    }

    @Test func messagesPackedInOneFrameAreAnsweredInOneDataFrame() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.data(try Grpc.framed(Envoy.requestHeaders(Head.identity)) + Grpc.framed(Envoy.responseHeaders(Head.answerHead)))
        let answer = try stream.answer()
        #expect(answer.head?.first(name: ":status") == "200")
        #expect(answer.head?.first(name: "content-type") == "application/grpc")
        #expect(answer.replies == [.requestHeaders(.init()), .responseHeaders(.init())])
        #expect(answer.dataFrames == 1)
        #expect(answer.trailers == nil, "the stream is still open")
    }

    @Test func repliesAreFlushedOncePerRead() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        // Two DATA frames in one read: nothing is flushed before the read's end, then both replies
        // go out in one DATA frame.
        stream.channel.pipeline.fireChannelRead(ExtProcHarness.Stream.frame(try Grpc.framed(Envoy.requestHeaders(Head.identity))))
        stream.channel.pipeline.fireChannelRead(ExtProcHarness.Stream.frame(try Grpc.framed(Envoy.responseHeaders(Head.answerHead))))
        #expect(try stream.written().isEmpty)
        stream.channel.pipeline.fireChannelReadComplete()
        let answer = try stream.answer()
        #expect(answer.replies == [.requestHeaders(.init()), .responseHeaders(.init())])
        #expect(answer.dataFrames == 1)
    }

    @Test func theResponseHeadIsSentOnceThenTheTrailersEndTheStream() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        for message in Head.streamed { try stream.send(message) }
        let frames = try stream.written()
        guard case .headers(let head) = frames.first, case .headers(let trailers) = frames.last else {
            Issue.record("\(frames)")
            return
        }
        #expect(head.headers == [":status": "200", "content-type": "application/grpc"])
        #expect(!head.endStream)
        #expect(frames.dropFirst().dropLast().allSatisfy { if case .data(let data) = $0 { !data.endStream } else { false } })
        #expect(frames.count == 2 + Head.streamed.count, "one DATA frame per read")
        // At the response's end, at once: the client's end of stream is not waited for.
        #expect(trailers.headers == ["grpc-status": "0"])
        #expect(trailers.endStream)
        #expect(harness.reports.map(\.end) == [.complete])
    }

    @Test(arguments: [
        ([":method": "GET"], "405", 13, "gRPC requires POST, not GET"),
        (["content-type": "application/json"], "415", 13, "content-type application/json is not application/grpc"),
        (["content-type": "application/grpc+json"], "415", 13, "content-type application/grpc+json is not application/grpc"),
        ([":path": "/envoy.service.ext_proc.v3.ExternalProcessor/Other"], "200", 12,
         "no method /envoy.service.ext_proc.v3.ExternalProcessor/Other; this server serves /envoy.service.ext_proc.v3.ExternalProcessor/Process"),
        ([":path": "/x%ü"], "200", 12, "no method /x%ü; this server serves /envoy.service.ext_proc.v3.ExternalProcessor/Process"),
    ] as [([String: String], String, Int, String)])
    func aRequestThatIsNotTheProcessMethodIsAnsweredAtOnceAndTakesNoPlace(changed: [String: String], status: String, grpcStatus: Int, message: String) throws {
        let harness = ExtProcHarness()
        var head = ExtProcHarness.requestHead
        for (name, value) in changed { head.replaceOrAdd(name: name, value: value) }
        let stream = try harness.stream()
        try stream.open(head)
        let answer = try stream.answer()
        #expect(answer.head == nil, "a trailers-only answer")
        #expect(answer.trailers?.first(name: ":status") == status)
        #expect(answer.trailers?.first(name: "content-type") == "application/grpc")
        #expect(answer.status == grpcStatus)
        #expect(answer.message == message)
        try stream.send(Envoy.requestHeaders(Head.identity))
        #expect(try stream.written().isEmpty, "nothing more is read")
        #expect(harness.counters.streamsOpen == 0)
        #expect(harness.reports.isEmpty)
        #expect(ExtProcCounters.Reason.allCases.allSatisfy { harness.counters.count(of: $0) == 0 })
    }

    @Test func grpcProtoIsTheSameContentType() throws {
        let harness = ExtProcHarness()
        var head = ExtProcHarness.requestHead
        head.replaceOrAdd(name: "content-type", value: "application/grpc+proto")
        let stream = try harness.stream()
        try stream.open(head)
        try stream.send(Envoy.requestHeaders(Head.identity))
        #expect(try stream.answer().replies == [.requestHeaders(.init())])
    }

    @Test func grpcMessageIsPercentEncoded() {
        #expect(ExtProcStreamHandler.percentEncoded("plain text: 1-2 (ok)") == "plain text: 1-2 (ok)")
        #expect(ExtProcStreamHandler.percentEncoded("100% é\n") == "100%25 %C3%A9%0A")
    }

    /// A refusal after replies: the replies so far, then trailers alone.
    @Test func aRefusalAfterRepliesEndsWithTrailersOnly() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        try stream.send(Envoy.requestHeaders(Head.identity))
        let answer = try stream.answer()
        #expect(answer.head?.first(name: ":status") == "200")
        #expect(answer.replies == [.requestHeaders(.init())])
        #expect(answer.trailers == ["grpc-status": "3", "grpc-message": "request_headers after another phase"])
    }

    @Test func aCompressedMessageIsRefused() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        let message: [UInt8] = try Envoy.requestHeaders(Head.identity).serializedBytes()
        try stream.data(Grpc.prefix(length: message.count, flag: 1) + message)
        let answer = try stream.answer()
        #expect(answer.replies.isEmpty)
        #expect(answer.status == 3)
        #expect(answer.message == "a compressed gRPC message; none was offered")
        #expect(harness.reports.map(\.end) == [.protocolError("a compressed gRPC message; none was offered")])
        #expect(harness.counters.count(of: .invalidMessage) == 1)
        #expect(harness.counters.streamsOpen == 0)
    }

    @Test func aFlagThatIsNotCompressionIsRefused() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.data(Grpc.prefix(length: 0, flag: 0x80))
        #expect(try stream.answer().message == "a gRPC message with flags 128")
        #expect(harness.counters.count(of: .invalidMessage) == 1)
    }

    @Test func aMessageOverTheBoundIsRefusedOnItsPrefixAlone() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        // Only the prefix: the refusal does not wait for (or keep) the message.
        try stream.data(Grpc.prefix(length: ExtProcListener.maxMessageBytes + 1))
        let answer = try stream.answer()
        let problem = "a gRPC message over 4194304 bytes (4194305 announced)"
        #expect(answer.replies == [.requestHeaders(.init())])
        #expect(answer.status == 3)
        #expect(answer.message == problem)
        #expect(harness.reports.map(\.end) == [.protocolError(problem)])
        #expect(harness.counters.count(of: .invalidMessage) == 1)
    }

    @Test func aMessageAtTheBoundIsTaken() throws {
        var body = Envoy.responseBody("", endOfStream: true)
        body.responseBody.body = Data(count: ExtProcListener.maxMessageBytes - 16)
        body.responseBody.body.append(Data(count: ExtProcListener.maxMessageBytes - (try body.serializedBytes() as [UInt8]).count))
        #expect((try body.serializedBytes() as [UInt8]).count == ExtProcListener.maxMessageBytes)
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        // In frames of 16 KiB, as HTTP/2 carries it.
        let bytes = try Grpc.framed(body)
        for start in stride(from: 0, to: bytes.count, by: 16 << 10) { try stream.data(Array(bytes[start..<min(start + (16 << 10), bytes.count)])) }
        let answer = try stream.answer()
        #expect(answer.replies == [.requestHeaders(.init()), .responseBody(.init())])
        #expect(answer.status == 0)
        #expect(harness.reports.map(\.end) == [.complete])
    }

    @Test func theClientEndingInsideAMessageIsRefused() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.data(Array(try Grpc.framed(Envoy.requestHeaders(Head.identity)).dropLast()), endStream: true)
        let answer = try stream.answer()
        #expect(answer.status == 3)
        #expect(answer.message == "the stream ended inside a gRPC message")
        #expect(harness.reports.map(\.end) == [.protocolError("the stream ended inside a gRPC message")])
        #expect(harness.counters.count(of: .invalidMessage) == 1)
    }

    @Test func aStreamResetMidAnswerIsAbortedWithWhatItRead() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        for message in Head.streamed.prefix(3) { try stream.send(message) }
        #expect(harness.counters.streamsOpen == 1)
        // What nio-http2 does on the peer's RST_STREAM: the stream's error, then its close.
        stream.channel.pipeline.fireErrorCaught(NIOHTTP2Errors.streamClosed(streamID: 1, errorCode: .cancel))
        #expect(!stream.channel.isActive)
        #expect(harness.reports == [Head.expectedReport(reading: Head.reading([Head.answer[0]]), end: .aborted)])
        #expect(harness.counters.streamsOpen == 0)
        #expect(ExtProcCounters.Reason.allCases.allSatisfy { harness.counters.count(of: $0) == 0 })
    }

    @Test func aConnectionClosedUnderOpenStreamsReportsEachAborted() throws {
        let harness = ExtProcHarness()
        let streams = try (0..<3).map { _ in try harness.stream() }
        for stream in streams {
            try stream.open()
            try stream.send(Envoy.requestHeaders(Head.identity))
        }
        #expect(harness.counters.streamsOpen == 3)
        for stream in streams { try stream.channel.close().wait() }
        #expect(harness.reports.map(\.end) == [.aborted, .aborted, .aborted])
        #expect(harness.counters.streamsOpen == 0)
    }

    @Test func aHeadEndingTheStreamIsAbortedWithoutIdentity() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open(endStream: true)
        #expect(try stream.answer().trailers == [":status": "200", "content-type": "application/grpc", "grpc-status": "0"])
        #expect(harness.reports.map(\.end) == [.aborted])
        #expect(harness.reports.first?.requestID == nil)
        #expect(harness.counters.streamsOpen == 0)
    }

    /// A client that leaves its replies unread (the stream not writable) is read no further until
    /// it takes them, so its messages wait in HTTP/2's flow control, not here.
    @Test func unreadRepliesStopTheReading() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        let reads = ReadCounter()
        try stream.channel.pipeline.syncOperations.addHandler(reads, position: .first)
        try stream.open()
        stream.channel.read()
        #expect(reads.reads == 1)
        stream.channel.isWritable = false
        stream.channel.pipeline.fireChannelWritabilityChanged()
        stream.channel.read()
        stream.channel.read()
        #expect(reads.reads == 1, "held while the replies are not taken")
        stream.channel.isWritable = true
        stream.channel.pipeline.fireChannelWritabilityChanged()
        #expect(reads.reads == 2, "one read, once writable again")
        stream.channel.read()
        #expect(reads.reads == 3)
    }

    /// The settings the listener runs HTTP/2 with (why each: `ExtProcListener.http2Configuration`).
    @Test func theHTTP2LimitsAreSetForEnvoy() {
        let (connection, stream) = ExtProcListener.http2Configuration(maxStreams: 10_000)
        #expect(connection.initialSettings.first { $0.parameter == .maxConcurrentStreams }?.value == 10_001)
        #expect(connection.initialSettings.first { $0.parameter == .maxHeaderListSize }?.value == 16 << 10)
        #expect(connection.initialSettings.first { $0.parameter == .maxFrameSize }?.value == 64 << 10)
        #expect(stream.streamResetFrameRateLimit.maximumCount == 10_000)
        #expect(stream.streamResetFrameRateLimit.windowLength == .seconds(10))
        #expect(stream.streamErrorRateLimit.maximumCount == 10_000)
        #expect(connection.maximumConnectionGlitches == Int(Int32.max))
    }
}

