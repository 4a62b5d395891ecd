import EnvoyExternalProcessing
import Foundation
import GRPCCore
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

/// Every bound of the ext_proc listener, and what breaking it costs: the outcome, the status
/// Envoy sees and the counter.
@Suite struct ExtProcBoundsTests {
    typealias Head = ExtProcServiceTests

    @Test func aStreamOverTheCapIsRefusedAtOnceAndCounted() async throws {
        var harness = ExtProcHarness()
        harness.settings.maxStreams = 1
        let counters = harness.counters
        let refused = try await harness.run { client in
            let firstIsOpen = Gate()
            let release = Gate()
            async let first = client.exchange([try Envoy.requestHeaders(Head.identity).serializedBytes()], holdOpen: release) { _ in firstIsOpen.open() }
            await firstIsOpen.wait()
            #expect(counters.streamsOpen == 1)
            let second = try await client.exchange([try Envoy.requestHeaders(Head.identity).serializedBytes()])
            release.open()
            #expect(try await first.error == nil)
            return second
        }
        #expect(refused.replies.isEmpty)
        #expect(refused.error?.code == .resourceExhausted)
        #expect(refused.error?.message == "1 streams are open, the most --ext-proc-max-streams allows")
        #expect(counters.count(of: .overCapacity) == 1)
        #expect(counters.streamsOpen == 0)
        #expect(harness.reports.all.count == 1, "only the stream that was served is reported")
    }

    @Test func aSilentStreamEndsAfterTheIdleTimeout() async throws {
        var harness = ExtProcHarness()
        harness.settings.idleTimeout = .milliseconds(200)
        let exchange = try await harness.run { client in
            try await client.exchange([try Envoy.requestHeaders(Head.identity).serializedBytes()], holdOpen: Gate())
        }
        #expect(exchange.replies == [.requestHeaders(.init())])
        #expect(exchange.error?.code == .deadlineExceeded)
        #expect(harness.reports.all.map(\.end) == [.idleTimeout])
        #expect(harness.reports.all.first?[header: "x-usage-user"] == "alice")
        #expect(harness.counters.count(of: .idleTimeout) == 1)
        #expect(harness.counters.streamsOpen == 0)
    }

    @Test func aStreamSilentAfterTheResponseEndIsStillComplete() async throws {
        var harness = ExtProcHarness()
        harness.settings.idleTimeout = .milliseconds(200)
        let messages = [Envoy.requestHeaders(Head.identity), Envoy.responseHeaders(Head.answerHead, endOfStream: true)]
        let exchange = try await harness.run { client in
            try await client.exchange(try messages.map { try $0.serializedBytes() }, holdOpen: Gate())
        }
        #expect(exchange.error == nil)
        #expect(harness.reports.all.map(\.end) == [.complete])
        #expect(harness.counters.count(of: .idleTimeout) == 0)
    }

    /// At the response's end the RPC ends with OK and the stream is reported complete: what Envoy
    /// might send after it is never read, so it can neither be counted nor hold anything.
    @Test(arguments: [
        [Envoy.requestHeaders(Head.identity), Envoy.responseBody("{}", endOfStream: true), Envoy.responseBody("{}", endOfStream: true)],
        [Envoy.requestHeaders(Head.identity), Envoy.responseHeaders(Head.answerHead, endOfStream: true), Envoy.requestBody("", endOfStream: true)],
    ])
    func theRPCEndsAtTheResponsesEnd(messages: [ProcessingRequest]) async throws {
        let harness = ExtProcHarness()
        let (exchange, report) = try await harness.exchange(messages)
        #expect(exchange.error == nil)
        #expect(exchange.replies.count == 2)
        #expect(report?.end == .complete)
        #expect(harness.reports.all.count == 1)
        #expect(harness.counters.count(of: .outOfOrder) == 0)
    }

    @Test(arguments: [
        ([Envoy.requestHeaders(Head.identity), Envoy.requestHeaders(Head.identity)], "request_headers after another phase", 1),
        ([Envoy.responseHeaders(Head.answerHead), Envoy.responseHeaders(Head.answerHead)], "response_headers given twice", 1),
        ([Envoy.responseBody("{", endOfStream: false), Envoy.responseHeaders(Head.answerHead)], "response_headers after the response body", 1),
    ])
    func aPhaseOutOfOrderEndsTheStream(messages: [ProcessingRequest], problem: String, answered: Int) async throws {
        let harness = ExtProcHarness()
        let (exchange, report) = try await harness.exchange(messages)
        #expect(exchange.replies.count == answered, "every message before it is answered")
        #expect(exchange.error?.code == .invalidArgument)
        #expect(exchange.error?.message == problem)
        #expect(report?.end == .protocolError(problem))
        #expect(harness.counters.count(of: .outOfOrder) == 1)
    }

    @Test func bytesThatAreNotAProcessingRequestEndTheStream() async throws {
        let harness = ExtProcHarness()
        let headers = try Envoy.requestHeaders(Head.identity).serializedBytes() as [UInt8]
        // A length-delimited field whose length runs past the end of the message.
        let exchange = try await harness.run { try await $0.exchange([headers, [0x12, 0x7f, 0x01]]) }
        #expect(exchange.replies == [.requestHeaders(.init())])
        #expect(exchange.error?.code == .invalidArgument)
        #expect(harness.reports.all.map(\.end) == [.protocolError("a message that is not a ProcessingRequest")])
        #expect(harness.reports.all.first?[header: "x-usage-user"] == "alice", "what was read before is kept")
        #expect(harness.counters.count(of: .invalidMessage) == 1)
    }

    @Test func aMessageWithNoPhaseEndsTheStream() async throws {
        let harness = ExtProcHarness()
        let (exchange, report) = try await harness.exchange([ProcessingRequest.with { $0.observabilityMode = true }])
        #expect(exchange.error?.message == "a ProcessingRequest with no phase set")
        #expect(report?.end == .protocolError("a ProcessingRequest with no phase set"))
        #expect(harness.counters.count(of: .invalidMessage) == 1)
    }

    @Test func identityValuesAreBoundedByTheLabelLimit() async throws {
        var harness = ExtProcHarness()
        harness.maxValueBytes = 8
        let end = Envoy.responseHeaders([(":status", "200")], endOfStream: true)
        func identity(_ headers: [(String, String)]) async throws -> TokenStreamReport? {
            try await harness.exchange([Envoy.requestHeaders(headers), end]).1
        }
        let atTheLimit = try await identity([("x-usage-user", "12345678"), (":path", "/v1/chat?a-long-query-is-not-kept")])
        #expect(atTheLimit?[header: "x-usage-user"] == "12345678")
        #expect(atTheLimit?[header: ":path"] == "/v1/chat")
        #expect(atTheLimit?.identityProblem == nil)
        let over = try await identity([("x-usage-user", "123456789")])
        #expect(over?.identityProblem == "x-usage-user: 9 bytes; the limit is 8")
        #expect(over?[header: "x-usage-user"] == nil)
        #expect(try await identity([("x-request-id", String(repeating: "r", count: 9))])?.identityProblem == "x-request-id: 9 bytes; the limit is 8")
        #expect(try await identity([(":path", "/v1/chats")])?.identityProblem == ":path: 9 bytes; the limit is 8")
        #expect(try await identity([("x-usage-groups", "a"), ("x-usage-groups", "b")])?.identityProblem == "x-usage-groups: given more than once")
        var notUTF8 = Envoy.requestHeaders([])
        notUTF8.requestHeaders.headers.headers = [.with { $0.key = "x-usage-user"; $0.rawValue = Data([0x61, 0xff]) }]
        #expect(try await harness.exchange([notUTF8, end]).1?.identityProblem == "x-usage-user: not valid UTF-8")
    }

    @Test func anUnusableResponseHeadMakesTheAnswerUnreadable() async throws {
        let long = String(repeating: "x", count: ExtProcStream.maxResponseHeaderBytes + 1)
        for (head, problem) in [
            ([(":status", "200"), ("content-type", long)], "content-type: 257 bytes; the limit is 256"),
            ([(":status", "2xx")], ":status: not a status code"),
            ([(":status", "200"), ("content-encoding", "gzip"), ("content-encoding", "br")], "content-encoding: given more than once"),
        ] {
            let messages = [Envoy.requestHeaders(Head.identity), Envoy.responseHeaders(head), Envoy.responseBody(Head.answer.joined(), endOfStream: true)]
            let (exchange, report) = try await ExtProcHarness().exchange(messages)
            #expect(exchange.error == nil, "Envoy is answered as ever")
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
