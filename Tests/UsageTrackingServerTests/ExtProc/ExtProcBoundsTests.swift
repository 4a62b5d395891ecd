import EnvoyExternalProcessing
import Foundation
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

/// Every bound of the ext_proc listener, and what breaking it costs: the outcome, the status
/// Envoy sees and the counter.
@Suite struct ExtProcBoundsTests {
    typealias Head = ExtProcStreamHandlerTests

    @Test func aStreamOverTheCapIsRefusedAtOnceAndCounted() throws {
        let harness = ExtProcHarness()
        harness.settings.maxStreams = 1
        let first = try harness.stream()
        try first.open()
        try first.send(Envoy.requestHeaders(Head.identity))
        #expect(harness.counters.streamsOpen == 1)
        let second = try harness.stream()
        try second.open()
        let refused = try second.answer()
        #expect(refused.head == nil, "a trailers-only answer")
        #expect(refused.trailers?.first(name: ":status") == "200")
        #expect(refused.trailers?.first(name: "content-type") == "application/grpc")
        #expect(refused.replies.isEmpty)
        #expect(refused.status == 8)
        #expect(refused.message == "1 streams are open, the most --ext-proc-max-streams allows")
        #expect(harness.counters.count(of: .overCapacity) == 1)
        // The refused stream's messages are not read: it holds nothing.
        try second.send(Envoy.requestHeaders(Head.identity))
        try second.end()
        #expect(try second.written().isEmpty)
        try first.end()
        #expect(try first.answer().status == 0)
        #expect(harness.counters.streamsOpen == 0)
        #expect(harness.reports.count == 1, "only the stream that was served is reported")
        // The place given back is free again.
        #expect(try harness.exchange([Envoy.requestHeaders(Head.identity)]).0.status == 0)
    }

    @Test func aSilentStreamEndsAfterTheIdleTimeout() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        #expect(try stream.answer().replies == [.requestHeaders(.init())])
        stream.channel.embeddedEventLoop.advanceTime(by: .seconds(200))
        try stream.send(Envoy.requestBody("{}", endOfStream: true))
        // 300 s after the head, but only 100 s after the last message: still open.
        stream.channel.embeddedEventLoop.advanceTime(by: .seconds(100))
        #expect(harness.reports.isEmpty)
        #expect(try stream.written().count == 1, "the request body's reply, no trailers")
        stream.channel.embeddedEventLoop.advanceTime(by: .seconds(199))
        #expect(harness.reports.isEmpty)
        stream.channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        let answer = try stream.answer()
        #expect(answer.replies.isEmpty)
        #expect(answer.status == 4)
        #expect(answer.message == "no message for 300 s (--ext-proc-idle-timeout)")
        #expect(harness.reports.map(\.end) == [.idleTimeout])
        #expect(harness.reports.first?[header: "x-usage-user"] == "alice")
        #expect(harness.counters.count(of: .idleTimeout) == 1)
        #expect(harness.counters.streamsOpen == 0)
        // What comes after is not read.
        try stream.send(Envoy.responseHeaders(Head.answerHead))
        #expect(try stream.written().isEmpty)
        #expect(harness.reports.count == 1)
    }

    @Test func aStreamSilentAfterTheResponseEndIsStillComplete() throws {
        let harness = ExtProcHarness()
        harness.settings.idleTimeout = .seconds(1)
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        try stream.send(Envoy.responseHeaders(Head.answerHead, endOfStream: true))
        stream.channel.embeddedEventLoop.advanceTime(by: .seconds(10))
        let answer = try stream.answer()
        #expect(answer.status == 0)
        #expect(answer.message == nil)
        #expect(harness.reports.map(\.end) == [.complete])
        #expect(harness.counters.count(of: .idleTimeout) == 0)
        #expect(harness.counters.streamsOpen == 0)
    }

    /// At the response's end the RPC ends with OK and the stream is reported complete: what Envoy
    /// might send after it is never read, so it can neither be counted nor hold anything.
    @Test(arguments: [
        [Envoy.requestHeaders(Head.identity), Envoy.responseBody("{}", endOfStream: true), Envoy.responseBody("{}", endOfStream: true)],
        [Envoy.requestHeaders(Head.identity), Envoy.responseHeaders(Head.answerHead, endOfStream: true), Envoy.requestBody("", endOfStream: true)],
    ])
    func theRPCEndsAtTheResponsesEnd(messages: [ProcessingRequest]) throws {
        let harness = ExtProcHarness()
        let (exchange, report) = try harness.exchange(messages)
        #expect(exchange.status == 0)
        #expect(exchange.replies.count == 2)
        #expect(report?.end == .complete)
        #expect(harness.reports.count == 1)
        #expect(harness.counters.count(of: .outOfOrder) == 0)
    }

    @Test(arguments: [
        ([Envoy.requestHeaders(Head.identity), Envoy.requestHeaders(Head.identity)], "request_headers after another phase", 1),
        ([Envoy.responseHeaders(Head.answerHead), Envoy.responseHeaders(Head.answerHead)], "response_headers given twice", 1),
        ([Envoy.responseBody("{", endOfStream: false), Envoy.responseHeaders(Head.answerHead)], "response_headers after the response body", 1),
    ])
    func aPhaseOutOfOrderEndsTheStream(messages: [ProcessingRequest], problem: String, answered: Int) throws {
        let harness = ExtProcHarness()
        let (exchange, report) = try harness.exchange(messages)
        #expect(exchange.replies.count == answered, "every message before it is answered")
        #expect(exchange.status == 3)
        #expect(exchange.message == problem)
        #expect(report?.end == .protocolError(problem))
        #expect(harness.counters.count(of: .outOfOrder) == 1)
    }

    @Test func bytesThatAreNotAProcessingRequestEndTheStream() throws {
        let harness = ExtProcHarness()
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        // A length-delimited field whose length runs past the end of the message.
        try stream.data(Grpc.prefix(length: 3) + [0x12, 0x7f, 0x01])
        let exchange = try stream.answer()
        #expect(exchange.replies == [.requestHeaders(.init())])
        #expect(exchange.status == 3)
        #expect(exchange.message == "Can't deserialize to message of type Envoy_Service_ExtProc_V3_ProcessingRequest.")
        #expect(harness.reports.map(\.end) == [.protocolError("a message that is not a ProcessingRequest")])
        #expect(harness.reports.first?[header: "x-usage-user"] == "alice", "what was read before is kept")
        #expect(harness.counters.count(of: .invalidMessage) == 1)
    }

    @Test func messagesInProgressAreBoundedForAllStreamsTogether() throws {
        let harness = ExtProcHarness()
        harness.settings.maxMessageBytesHeld = 50_000
        let message = try Grpc.framed(Envoy.requestBody(String(repeating: "x", count: 40_000), endOfStream: false))
        let (first, rest) = (Array(message[..<30_000]), Array(message[30_000...]))
        func started() throws -> ExtProcHarness.Stream {
            let stream = try harness.stream()
            try stream.open()
            try stream.send(Envoy.requestHeaders(Head.identity))
            #expect(try stream.answer().replies == [.requestHeaders(.init())])
            try stream.data(first)
            return stream
        }
        let holding = try started()
        let held = harness.counters.messageBytesHeld
        #expect((30_000...50_000).contains(held))
        // A second message in progress would take the two past the bound: its stream ends.
        let refused = try started()
        let answer = try refused.answer()
        let problem = "messages in progress would hold more than 50000 bytes, the most kept for all streams together"
        #expect(answer.replies.isEmpty)
        #expect(answer.status == 8)
        #expect(answer.message == problem)
        #expect(harness.reports.map(\.end) == [.protocolError(problem)])
        #expect(harness.counters.count(of: .overCapacity) == 1)
        #expect(harness.counters.messageBytesHeld == held, "the refused stream holds nothing")
        // The first message arrives whole: it is read, and its bytes are let go.
        try holding.data(rest)
        #expect(try holding.written().count == 1, "the request body's reply")
        #expect(harness.counters.messageBytesHeld == 0)
        // Room again; a stream reset with a message in progress lets go of it too.
        let reset = try started()
        #expect(harness.counters.messageBytesHeld == held)
        #expect(try reset.written().isEmpty)
        try reset.channel.close().wait()
        #expect(harness.counters.messageBytesHeld == 0)
        #expect(harness.counters.count(of: .overCapacity) == 1)
    }

    /// What a stream holds of a message is counted through every way it grows, shrinks or ends.
    @Test func theBytesHeldFollowAMessageToItsEnd() throws {
        let harness = ExtProcHarness()
        harness.settings.maxMessageBytesHeld = 100_000
        let message = try Grpc.framed(Envoy.requestBody(String(repeating: "x", count: 30_000), endOfStream: false))
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        _ = try stream.written()
        // Across three frames, the last also bringing 10 bytes of the next message.
        try stream.data(Array(message[..<10_000]))
        try stream.data(Array(message[10_000..<20_000]))
        #expect((20_000...100_000).contains(harness.counters.messageBytesHeld))
        try stream.data(Array(message[20_000...]) + Array(message[..<10]))
        #expect(try stream.written().count == 1, "the whole message was read")
        #expect((10...(64 << 10)).contains(harness.counters.messageBytesHeld), "10 bytes held, in a buffer of their own")
        try stream.data(Array(message[10...]))
        #expect(try stream.written().count == 1)
        #expect(harness.counters.messageBytesHeld == 0)
        // A message growing past the bound while it arrives ends the stream and lets go of it.
        try stream.data(Grpc.prefix(length: 500_000) + Array(repeating: 0, count: 50_000))
        #expect((50_000...100_000).contains(harness.counters.messageBytesHeld))
        try stream.data(Array(repeating: 0, count: 60_000))
        #expect(try stream.answer().status == 8)
        #expect(harness.counters.messageBytesHeld == 0)
        // A client that ends its side inside a message lets go of it too.
        let ended = try harness.stream()
        try ended.open()
        try ended.send(Envoy.requestHeaders(Head.identity))
        try ended.data(Array(message[..<10_000]))
        #expect(harness.counters.messageBytesHeld > 0)
        try ended.end()
        #expect(try ended.answer().status == 3)
        #expect(harness.counters.messageBytesHeld == 0)
    }

    /// A message must arrive whole within `--request-timeout` of its first byte, so that nothing
    /// holds its part of the bound for as long as the idle timeout.
    @Test func aMessageArrivingTooSlowlyEndsItsStream() throws {
        let harness = ExtProcHarness()
        harness.settings.messageTimeout = .seconds(10)
        let message = try Grpc.framed(Envoy.requestBody(String(repeating: "x", count: 1_000), endOfStream: false))
        let stream = try harness.stream()
        try stream.open()
        try stream.send(Envoy.requestHeaders(Head.identity))
        _ = try stream.written()
        let loop = stream.channel.embeddedEventLoop
        // A message taking 9 s is read, and the next one's clock starts with its first byte.
        try stream.data(Array(message[..<500]))
        loop.advanceTime(by: .seconds(9))
        try stream.data(Array(message[500...]) + Array(message[..<500]))
        #expect(try stream.written().count == 1)
        loop.advanceTime(by: .seconds(9))
        #expect(harness.reports.isEmpty, "18 s after the first byte of the first message, 9 s into the second")
        loop.advanceTime(by: .seconds(1))
        let answer = try stream.answer()
        #expect(answer.status == 4)
        #expect(answer.message == "a gRPC message took more than 10 s to arrive whole (--request-timeout)")
        #expect(harness.reports.map(\.end) == [.idleTimeout])
        #expect(harness.counters.count(of: .idleTimeout) == 1)
        #expect(harness.counters.messageBytesHeld == 0)
        #expect(harness.counters.streamsOpen == 0)
    }

    @Test func aMessageWithNoPhaseEndsTheStream() throws {
        let harness = ExtProcHarness()
        let (exchange, report) = try harness.exchange([ProcessingRequest.with { $0.observabilityMode = true }])
        #expect(exchange.status == 3)
        #expect(exchange.message == "a ProcessingRequest with no phase set")
        #expect(report?.end == .protocolError("a ProcessingRequest with no phase set"))
        #expect(harness.counters.count(of: .invalidMessage) == 1)
    }

    @Test func identityValuesAreBoundedByTheLabelLimit() throws {
        let harness = ExtProcHarness()
        harness.maxValueBytes = 8
        let end = Envoy.responseHeaders([(":status", "200")], endOfStream: true)
        func identity(_ headers: [(String, String)]) throws -> TokenStreamReport? {
            try harness.exchange([Envoy.requestHeaders(headers), end]).1
        }
        let atTheLimit = try identity([("x-usage-user", "12345678"), (":path", "/v1/chat?a-long-query-is-not-kept")])
        #expect(atTheLimit?[header: "x-usage-user"] == "12345678")
        #expect(atTheLimit?[header: ":path"] == "/v1/chat")
        #expect(atTheLimit?.identityProblem == nil)
        let over = try identity([("x-usage-user", "123456789")])
        #expect(over?.identityProblem == "x-usage-user: 9 bytes; the limit is 8")
        #expect(over?[header: "x-usage-user"] == nil)
        #expect(try identity([(":path", "/v1/chats")])?.identityProblem == ":path: 9 bytes; the limit is 8")
        #expect(try identity([("x-usage-groups", "a"), ("x-usage-groups", "b")])?.identityProblem == "x-usage-groups: given more than once")
        var notUTF8 = Envoy.requestHeaders([])
        notUTF8.requestHeaders.headers.headers = [.with { $0.key = "x-usage-user"; $0.rawValue = Data([0x61, 0xff]) }]
        #expect(try harness.exchange([notUTF8, end]).1?.identityProblem == "x-usage-user: not valid UTF-8")
    }

    /// A request id is not a label: as `/track` does, a stream takes the first one given, of any
    /// length and any bytes, and keeps its digest over all of them and its first 64 bytes to log.
    @Test func aRequestIDOfAnyLengthOrBytesIsTakenAsTrackTakesIt() throws {
        let harness = ExtProcHarness()
        harness.maxValueBytes = 8
        let end = Envoy.responseHeaders([(":status", "200")], endOfStream: true)
        func report(_ ids: [[UInt8]]) throws -> TokenStreamReport? {
            var head = Envoy.requestHeaders([("x-usage-user", "alice")])
            head.requestHeaders.headers.headers += ids.map { id in .with { $0.key = "x-request-id"; $0.rawValue = Data(id) } }
            return try harness.exchange([head, end]).1
        }
        let long = [UInt8](repeating: UInt8(ascii: "r"), count: 300)
        let longer = try report([long])
        #expect(longer?.identityProblem == nil)
        #expect(longer?.requestID == String(repeating: "r", count: 61) + "…")
        #expect(longer?.requestIDDigest == TokenStreamReport.digest(requestID: long))
        // Ids alike in their first 299 bytes are different ids.
        #expect(try report([long.dropLast() + [UInt8(ascii: "s")]])?.requestIDDigest != longer?.requestIDDigest)
        let twice = try report([Array("first".utf8), Array("second".utf8)])
        #expect(twice?.identityProblem == nil)
        #expect(twice?.requestID == "first")
        #expect(twice?.requestIDDigest == TokenStreamReport.digest(requestID: Array("first".utf8)))
        let notUTF8 = try report([[0x61, 0xff, 0xfe]])
        #expect(notUTF8?.identityProblem == nil)
        #expect(notUTF8?.requestID == "a\u{FFFD}\u{FFFD}")
        #expect(notUTF8?.requestIDDigest == TokenStreamReport.digest(requestID: [0x61, 0xff, 0xfe]))
        // A blank id is no id, as on /track.
        #expect(try report([Array(" \t ".utf8)])?.requestIDDigest == nil)
        #expect(try report([])?.requestID == nil)
        // The digest of an id in UTF-8 is the one earlier builds stored in ledgers.
        #expect(TokenStreamReport.digest(requestID: Array("req-é".utf8)) == 6_118_284_021_900_867_729, "SHA-256 of \"tokens\\0req-é\", its first 8 bytes")
    }

    @Test func anUnusableResponseHeadMakesTheAnswerUnreadable() throws {
        let long = String(repeating: "x", count: ExtProcStream.maxResponseHeaderBytes + 1)
        for (head, problem) in [
            ([(":status", "200"), ("content-type", long)], "content-type: 257 bytes; the limit is 256"),
            ([(":status", "2xx")], ":status: not a status code"),
            ([(":status", "200"), ("content-encoding", "gzip"), ("content-encoding", "br")], "content-encoding: given more than once"),
        ] {
            let messages = [Envoy.requestHeaders(Head.identity), Envoy.responseHeaders(head), Envoy.responseBody(Head.answer.joined(), endOfStream: true)]
            let (exchange, report) = try ExtProcHarness().exchange(messages)
            #expect(exchange.status == 0, "Envoy is answered as ever")
            #expect(report?.reading == .unreadable(problem))
            #expect(report?.end == .complete)
        }
    }

    @Test func theMetricsShowTheListenerOnlyWhenItIsOn() {
        let counters = ExtProcCounters()
        #expect(counters.openStream(limit: 2))
        counters.record(.outOfOrder)
        counters.record(.outOfOrder)
        let text = String(decoding: UsageMetrics(extProc: counters).render(), as: UTF8.self)
        #expect(text.contains("\nusage_tracking_ext_proc_streams_open 1\n"))
        for (reason, count) in [("over_capacity", 0), ("idle_timeout", 0), ("invalid_message", 0), ("out_of_order", 2)] {
            #expect(text.contains("\nusage_tracking_ext_proc_errors_total{reason=\"\(reason)\"} \(count)\n"))
        }
        #expect(!String(decoding: UsageMetrics().render(), as: UTF8.self).contains("usage_tracking_ext_proc"))
    }

    @Test func aStreamPlaceIsTakenOnlyWhileOneIsFree() {
        let counters = ExtProcCounters()
        #expect(counters.openStream(limit: 2))
        #expect(counters.openStream(limit: 2))
        #expect(!counters.openStream(limit: 2))
        #expect(counters.streamsOpen == 2, "a refused stream takes no place")
        counters.closeStream()
        #expect(counters.openStream(limit: 2))
    }
}
