import Logging
import NIOCore
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

private let twoFamilies = """
    metrics:
      - name: llm_requests_total
        labels:
          - {name: user, from: user, required: true, hash: hmac-sha256}
          - {name: auth_mode, header: x-auth-mode, default: centralized}
          - {name: tier, from: identity.tier, default: free}
      - name: llm_tokens_total
        value: {from: usage.total_tokens, required: true}
        labels:
          - {name: user, from: user, required: true, hash: hmac-sha256}
          - {name: model, from: model, required: true}
    """

private func harness(logLevel: Logger.Level = .info) throws -> PipelineHarness {
    try PipelineHarness({
        $0.schema = try! MeteringSchema.parse(twoFamilies, file: "t.yaml")
        $0.labelHMACKey = Array("a-test-key".utf8)
    }, logLevel: logLevel)
}

private let hashedAnn = LabelHasher(key: Array("a-test-key".utf8)).hash("ann-the-raw-user")

@Suite struct SchemaEndpointTests {
    @Test func oneCallbackCountsInEveryFamily() throws {
        let harness = try harness()
        let body = #"{"user":"ann-the-raw-user","identity":{"tier":"gold"},"model":"granite","usage":{"total_tokens":120}}"#
        let responses = try harness.send(PipelineHarness.post(body, headers: ["Content-Type: application/json", "X-Auth-Mode: byok_bearer"]))
        #expect(responses.map(\.status) == [202])
        let families = harness.state.metrics.families
        #expect(families[0].value([hashedAnn, "byok_bearer", "gold"]) == 1)
        #expect(families[1].value([hashedAnn, "granite"]) == 120)
    }

    @Test func aProblemForOneFamilyCountsNothingAnywhere() throws {
        let harness = try harness()
        let body = #"{"user":"ann-the-raw-user","model":"granite","usage":{"total_tokens":-4}}"#
        let responses = try harness.send(PipelineHarness.post(body))
        #expect(responses.map(\.status) == [422])
        #expect(responses[0].text == #"{"error":"invalid callback","problems":["usage.total_tokens: must be a non-negative integer, got a negative number"]}"# + "\n")
        #expect(harness.state.metrics.families.allSatisfy { $0.seriesCount == 0 })
        #expect(harness.state.metrics.count(of: .invalid) == 1)
    }

    @Test func theRawValueOfAHashedLabelIsNeverShown() throws {
        let harness = try harness(logLevel: .debug)
        let body = #"{"user":"ann-the-raw-user","model":"granite","usage":{"total_tokens":1},"path":"/v1/models"}"#
        #expect(try harness.send(PipelineHarness.post(body)).map(\.status) == [202])
        let bad = #"{"user":"ann-the-raw-user","model":"granite","usage":{"total_tokens":"x"}}"#
        #expect(try harness.send(PipelineHarness.post(bad)).map(\.status) == [422])
        let metrics = try harness.send(PipelineHarness.get("/metrics"))[0].text
        let debug = try harness.send(PipelineHarness.get("/debug"))[0].text
        #expect(metrics.contains(#"llm_requests_total{user="\#(hashedAnn)",auth_mode="centralized",tier="free"} 1"#))
        #expect(debug.contains(#""user":"\#(hashedAnn)""#))
        #expect(debug.contains(#""label_hmac_key":"set""#))
        for (place, text) in [("metrics", metrics), ("debug", debug), ("logs", harness.logs.all.joined(separator: "\n"))] {
            #expect(!text.contains("ann-the-raw-user"), "raw value in \(place)")
        }
        #expect(harness.logs.all.contains { $0.contains(hashedAnn) }, "the accepted callback is logged, hashed")
    }

    /// "Is ann counted?" works with a hashed user label: the page hashes the name it is given.
    @Test func oneUserViewLooksUpAHashedUserByTheHashOfTheName() throws {
        let harness = try harness()
        let body = #"{"user":"ann-the-raw-user","model":"granite","usage":{"total_tokens":1},"path":"/v1/models"}"#
        #expect(try harness.send(PipelineHarness.post(body)).map(\.status) == [202])
        let debug = try harness.send(PipelineHarness.get("/debug?user=ann-the-raw-user"))[0].text
        #expect(debug.contains(#""user":{"name":"\#(hashedAnn)""#))
        #expect(debug.contains(#""total":1"#))
        #expect(!debug.contains("ann-the-raw-user"))
    }

    @Test func pastTheBudgetCallbacksAreCountedUnderOther() throws {
        let harness = try PipelineHarness()
        // The built-in path budget is 200 raw paths; known routes are free.
        for i in 0..<201 {
            _ = try harness.send(PipelineHarness.post(#"{"user":"scanner","path":"/probe/\#(i)"}"#))
        }
        _ = try harness.send(PipelineHarness.post(#"{"user":"scanner","path":"/v1/models/granite-8b"}"#))
        let requests = harness.state.metrics.requests
        #expect(requests.value(["scanner", "", "/probe/199"]) == 1)
        #expect(requests.value(["scanner", "", "/probe/200"]) == 0)
        #expect(requests.value(["scanner", "", "__other__"]) == 1)
        #expect(requests.value(["scanner", "", "/v1/models/{model}"]) == 1)
        #expect(requests.snapshot().reduce(0) { $0 + $1.value } == 202)
        let refused = try harness.send(PipelineHarness.post(#"{"user":"__other__"}"#))
        #expect(refused[0].text == #"{"error":"invalid callback","problems":["user: __other__ is reserved"]}"# + "\n")
        let text = try harness.send(PipelineHarness.get("/metrics"))[0].text
        #expect(text.contains(#"usage_tracking_label_overflow_total{metric="llm_requests_total",label="path"} 1"#))
        #expect(text.contains(#"usage_tracking_label_values{metric="llm_requests_total",label="path"} 200"#))
    }
}
