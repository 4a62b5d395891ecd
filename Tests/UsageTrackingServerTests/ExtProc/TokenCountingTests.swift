import NIOCore
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

/// A stream's report counted through the real server state: families, outcomes, the dedupe
/// window, and what `/metrics` and the status page then show.
@Suite struct TokenCountingTests {
    static func harness() throws -> PipelineHarness {
        var configuration = ServerConfiguration()
        configuration.extProc = ExtProcSettings(port: 0)
        return try PipelineHarness(configuration, requestIDs: RequestIDWindow(window: 600, maxIDs: 100))
    }

    static func report(
        user: String? = "alice", requestID: String? = nil, reading: AnswerReading, end: TokenStreamReport.End = .complete,
        identityProblem: String? = nil
    ) -> TokenStreamReport {
        TokenStreamReport(
            headerNames: ExtProcHeaderNames().labels, headers: [user, "ml", "/v1/chat/completions?x=1"], requestID: requestID,
            requestIDDigest: requestID.flatMap { TokenStreamReport.digest(requestID: Array($0.utf8)) }, identityProblem: identityProblem,
            reading: reading, end: end
        )
    }

    static let usage = AnswerReading.usage(AnswerUsage(model: "m1", tokens: TokenCounts(input: 100, output: 20, cachedInput: 60, reasoning: 5)))

    @discardableResult
    static func count(_ report: TokenStreamReport, _ harness: PipelineHarness) throws -> TokenStreamOutcome {
        let state = harness.state
        return try TokenCounting.count(report, state: state, decoder: state.tokenDecoder!, on: harness.channel.eventLoop).wait()
    }

    static func metrics(_ harness: PipelineHarness) throws -> String {
        try harness.send(PipelineHarness.get("/metrics"))[0].text
    }

    @Test func eachOutcomeIsCountedAndOnlyUsageAddsTokens() throws {
        let harness = try Self.harness()
        #expect(try Self.count(Self.report(reading: Self.usage), harness) == .counted)
        #expect(try Self.count(Self.report(reading: .noUsage), harness) == .noUsage)
        #expect(try Self.count(Self.report(reading: .noUsage, end: .aborted), harness) == .aborted)
        #expect(try Self.count(Self.report(user: nil, reading: Self.usage), harness) == .noIdentity)
        #expect(try Self.count(Self.report(user: "  ", reading: Self.usage), harness) == .noIdentity)
        #expect(try Self.count(Self.report(reading: Self.usage, identityProblem: "x-usage-user: given more than once"), harness) == .noIdentity)
        #expect(try Self.count(Self.report(reading: .notModelAnswer("status 500")), harness) == .notModelAnswer)
        #expect(try Self.count(Self.report(reading: .unreadable("bad gzip")), harness) == .unreadable)
        // Aborted with usage: what the answer last said is counted, and said so.
        #expect(try Self.count(Self.report(user: "bob", reading: Self.usage, end: .idleTimeout), harness) == .aborted)
        let text = try Self.metrics(harness)
        let series = #"llm_tokens_total{user="alice",groups="ml",path="/v1/chat/completions",model="m1",type="#
        for (type, amount) in [("input", 100), ("output", 20), ("cached_input", 60), ("reasoning", 5)] {
            #expect(text.contains(series + "\"\(type)\"} \(amount)\n"))
        }
        #expect(!text.contains(#"type="cache_write""#))
        #expect(text.contains(#"llm_tokens_total{user="bob",groups="ml",path="/v1/chat/completions",model="m1",type="input"} 100"#))
        for (outcome, count) in [
            ("aborted", 2), ("counted", 1), ("duplicate", 0), ("no_identity", 3), ("no_usage", 1), ("not_model_answer", 1), ("unavailable", 0),
            ("unreadable", 1),
        ] {
            #expect(text.contains("usage_tracking_token_streams_total{outcome=\"\(outcome)\"} \(count)\n"), "\(outcome)")
        }
        // Token streams are not callbacks.
        #expect(text.contains(#"usage_tracking_callbacks_total{outcome="accepted"} 0"#))
    }

    @Test func aRepeatedRequestIDIsCountedOnceAndApartFromItsCallback() throws {
        let harness = try Self.harness()
        #expect(try Self.count(Self.report(requestID: "r-1", reading: Self.usage), harness) == .counted)
        #expect(try Self.count(Self.report(requestID: "r-1", reading: Self.usage), harness) == .duplicate)
        // Authorino's callback for the same request carries the same id, and counts too.
        let body = #"{"user":"alice","groups":"ml","path":"/v1/chat/completions"}"#
        #expect(try harness.send(PipelineHarness.post(body, headers: ["Content-Type: application/json", "x-request-id: r-1"])).map(\.status) == [202])
        let text = try Self.metrics(harness)
        #expect(text.contains(#"llm_tokens_total{user="alice",groups="ml",path="/v1/chat/completions",model="m1",type="input"} 100"#))
        #expect(text.contains(#"llm_requests_total{user="alice",groups="ml",path="/v1/chat/completions"} 1"#))
        #expect(text.contains(#"usage_tracking_token_streams_total{outcome="duplicate"} 1"#))
        #expect(text.contains(#"usage_tracking_callbacks_total{outcome="duplicate"} 0"#))
    }

    @Test func aLabelTheFamiliesRefuseIsNamedAndNotCounted() throws {
        let harness = try Self.harness()
        let long = String(repeating: "m", count: 300)
        let reading = AnswerReading.usage(AnswerUsage(model: long, tokens: TokenCounts(input: 1, output: 1)))
        #expect(try Self.count(Self.report(reading: reading), harness) == .unreadable)
        #expect(harness.logs.all.contains { $0.contains("token stream not counted") && $0.contains("model: 300 bytes; the limit is 256") })
        #expect(!(try Self.metrics(harness)).contains("llm_tokens_total{"))
    }

    @Test func theStatusPageRanksInputAndOutputAndListsTheOutcomes() throws {
        let harness = try Self.harness()
        try Self.count(Self.report(reading: Self.usage), harness)
        try Self.count(Self.report(user: "bob", reading: .noUsage), harness)
        let page = try harness.send(PipelineHarness.get("/", headers: [StatusPageTests.browserAccept]))[0].text
        // 100 input + 20 output; the cached and reasoning tokens are parts of those.
        #expect(page.contains(#"<tbody id="top-llm_tokens_total-user"><tr><td><a href="/?user=alice">alice</a></td><td>120</td></tr></tbody>"#))
        #expect(page.contains(#"<tbody id="top-llm_tokens_total-model"><tr><td>m1</td><td>120</td></tr></tbody>"#))
        #expect(page.contains(#"<tbody id="token-streams"><tr><td>aborted</td><td>0</td></tr><tr><td>counted</td><td>1</td></tr>"#))
        #expect(page.contains(#"<tr><td>no_usage</td><td>1</td></tr>"#))
        let debug = try harness.send(PipelineHarness.get("/debug"))[0].text
        #expect(debug.contains(#""token_streams":{"aborted":0,"counted":1,"#))
    }

    @Test func withoutExtProcThePageHasNoModelAnswers() throws {
        let page = try PipelineHarness().send(PipelineHarness.get("/", headers: [StatusPageTests.browserAccept]))[0].text
        #expect(!page.contains(#"<tbody id="token-streams">"#) && !page.contains("Model answers"))
    }
}
