import EnvoyExternalProcessing
import Foundation
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

/// What Envoy sees in reply, and what the counting layer is handed, for each processing mode.
@Suite struct ExtProcStreamHandlerTests {
    static let identity = [
        (":method", "POST"), (":path", "/v1/chat/completions?api-version=1"), ("x-usage-user", "alice"),
        ("x-usage-groups", "premium"), ("x-request-id", "7f1c2a"), ("content-type", "application/json"),
    ]
    static let answerHead = [(":status", "200"), ("content-type", "application/json"), ("content-encoding", "identity")]
    static let answer = [#"{"model":"m","usage":{"prompt_tokens":3,"#, #""completion_tokens":5,"total_tokens":8}}"#]

    /// What the core reader makes of the same head and body, read directly.
    static func reading(status: Int? = 200, contentType: String? = "application/json", encoding: String? = "identity", _ chunks: [String] = answer) -> AnswerReading {
        let reader = AnswerUsageReader()
        if let status { reader.responseHeaders(status: status, contentType: contentType, contentEncoding: encoding) }
        for chunk in chunks { Array(chunk.utf8).withUnsafeBytes { reader.body($0) } }
        return reader.reading
    }

    static let labelHeaders = ExtProcHeaderNames().labels

    static func expectedReport(reading: AnswerReading = Self.reading(), end: TokenStreamReport.End = .complete) -> TokenStreamReport {
        TokenStreamReport(
            headerNames: Self.labelHeaders, headers: ["alice", "premium", "/v1/chat/completions"], requestID: "7f1c2a",
            requestIDDigest: TokenStreamReport.digest(requestID: Array("7f1c2a".utf8)), identityProblem: nil, reading: reading, end: end
        )
    }

    /// Request headers SEND, response headers SEND, response body STREAMED: the mode the README asks for.
    static let streamed = [
        Envoy.requestHeaders(identity), Envoy.responseHeaders(answerHead),
        Envoy.responseBody(answer[0], endOfStream: false), Envoy.responseBody(answer[1], endOfStream: false),
        Envoy.responseBody("", endOfStream: true),
    ]

    @Test func streamedBodyIsAnsweredPhaseByPhase() throws {
        let (exchange, report) = try ExtProcHarness().exchange(Self.streamed)
        #expect(exchange.status == 0)
        #expect(exchange.replies == [.requestHeaders(.init()), .responseHeaders(.init()), .responseBody(.init()), .responseBody(.init()), .responseBody(.init())])
        #expect(report == Self.expectedReport(reading: Self.reading([Self.answer[0], Self.answer[1], ""])))
    }

    @Test func bufferedBodiesAreOneChunkEach() throws {
        let messages = [
            Envoy.requestHeaders(Self.identity), Envoy.requestBody(#"{"model":"m"}"#, endOfStream: true),
            Envoy.responseHeaders(Self.answerHead), Envoy.responseBody(Self.answer.joined(), endOfStream: true),
        ]
        let (exchange, report) = try ExtProcHarness().exchange(messages)
        #expect(exchange.status == 0)
        #expect(exchange.replies == [.requestHeaders(.init()), .requestBody(.init()), .responseHeaders(.init()), .responseBody(.init())])
        #expect(report == Self.expectedReport(reading: Self.reading([Self.answer.joined()])))
    }

    @Test func trailersAreAnsweredAndEndTheResponse() throws {
        let messages = [
            Envoy.requestHeaders(Self.identity), Envoy.requestBody("{}", endOfStream: false), Envoy.requestTrailers,
            Envoy.responseHeaders(Self.answerHead), Envoy.responseBody(Self.answer.joined(), endOfStream: false), Envoy.responseTrailers,
        ]
        let (exchange, report) = try ExtProcHarness().exchange(messages)
        #expect(exchange.status == 0)
        #expect(exchange.replies == [
            .requestHeaders(.init()), .requestBody(.init()), .requestTrailers(.init()), .responseHeaders(.init()), .responseBody(.init()),
            .responseTrailers(.init()),
        ])
        #expect(report?.end == .complete)
    }

    @Test func withoutResponseHeadersTheReaderSniffsTheBody() throws {
        let messages = [Envoy.requestHeaders(Self.identity), Envoy.responseBody(Self.answer.joined(), endOfStream: true)]
        let (exchange, report) = try ExtProcHarness().exchange(messages)
        #expect(exchange.replies == [.requestHeaders(.init()), .responseBody(.init())])
        #expect(report == Self.expectedReport(reading: Self.reading(status: nil, [Self.answer.joined()])))
    }

    @Test func withoutRequestHeadersThereIsNoIdentity() throws {
        let messages = [Envoy.responseHeaders(Self.answerHead), Envoy.responseBody(Self.answer.joined(), endOfStream: true)]
        let (exchange, report) = try ExtProcHarness().exchange(messages)
        #expect(exchange.replies == [.responseHeaders(.init()), .responseBody(.init())])
        #expect(report == TokenStreamReport(
            headerNames: Self.labelHeaders, headers: [nil, nil, nil], requestID: nil, identityProblem: nil, reading: Self.reading([Self.answer.joined()]),
            end: .complete
        ))
    }

    @Test func aResponseWithoutBodyEndsWithItsHeaders() throws {
        let messages = [Envoy.requestHeaders(Self.identity), Envoy.responseHeaders([(":status", "204")], endOfStream: true)]
        let (exchange, report) = try ExtProcHarness().exchange(messages)
        #expect(exchange.replies == [.requestHeaders(.init()), .responseHeaders(.init())])
        #expect(report == Self.expectedReport(reading: Self.reading(status: 204, contentType: nil, encoding: nil, []), end: .complete))
    }

    @Test func observabilityModeIsNeverAnswered() throws {
        let (exchange, report) = try ExtProcHarness().exchange(Envoy.observing(Self.streamed))
        #expect(exchange.status == 0)
        #expect(exchange.replies.isEmpty)
        #expect(report == Self.expectedReport(reading: Self.reading([Self.answer[0], Self.answer[1], ""])))
    }

    @Test func aStreamClosedBeforeTheResponseEndIsAborted() throws {
        let messages = [Envoy.requestHeaders(Self.identity), Envoy.responseHeaders(Self.answerHead), Envoy.responseBody(Self.answer[0], endOfStream: false)]
        let (exchange, report) = try ExtProcHarness().exchange(messages)
        #expect(exchange.status == 0)
        #expect(exchange.replies.count == 3)
        #expect(report == Self.expectedReport(reading: Self.reading([Self.answer[0]]), end: .aborted))
    }

    @Test func headerValuesComeFromRawValueOrElseValue() throws {
        var headers = Envoy.requestHeaders([(":path", "/v1/completions")])
        headers.requestHeaders.headers.headers.append(.with { $0.key = "x-usage-user"; $0.value = "bob" })
        headers.requestHeaders.headers.headers.append(.with { $0.key = "x-usage-groups"; $0.value = "ignored"; $0.rawValue = Data("free".utf8) })
        let (_, report) = try ExtProcHarness().exchange([headers, Envoy.responseHeaders([(":status", "200")], endOfStream: true)])
        #expect(report?[header: "x-usage-user"] == "bob")
        #expect(report?[header: "x-usage-groups"] == "free")
        #expect(report?[header: ":path"] == "/v1/completions")
        #expect(report?.requestID == nil)
        #expect(report?.identityProblem == nil)
    }
}
