import Testing

@testable import UsageTrackingCore

private func loadError(_ yaml: String) -> String? {
    do {
        _ = try MeteringSchema.parse(yaml, file: "c.yaml")
        return nil
    } catch {
        return error.description
    }
}

private let oneMetric = """
    metrics:
      - name: llm_requests_total
        labels:
          - {name: user, from: user, required: true}

    """

/// The token families in the metering config: built in, configurable, refused when they could
/// sum overlapping types or read what an answer does not have.
@Suite struct TokenFamilySchemaTests {
    @Test func withoutTokensTheBuiltInFamilyIsThereAndReadsBack() throws {
        let schema = try MeteringSchema.parse(oneMetric, file: "c.yaml")
        #expect(schema.tokens == MeteringSchema.defaultTokens)
        #expect(schema.tokens[0].labels.map(\.name) == ["user", "groups", "path", "model", "type"])
        #expect(schema.tokens[0].labels.map(\.source) == [
            .header("x-usage-user"), .header("x-usage-groups"), .header(":path"), .body("model"), .body("type"),
        ])
        let reread = try MeteringSchema.parse(schema.yaml, file: "c.yaml")
        #expect(reread == schema && reread.yaml == schema.yaml)
    }

    @Test func aTrackMetricWithTheBuiltInNameKeepsItAndNoTokenFamilyIsAdded() throws {
        let schema = try MeteringSchema.parse(oneMetric + """
              - name: llm_tokens_total
                value: {from: usage.total_tokens}
                labels:
                  - {name: user, from: user}
            """, file: "c.yaml")
        #expect(schema.metrics.map(\.name) == ["llm_requests_total", "llm_tokens_total"] && schema.tokens.isEmpty)
    }

    @Test func tokensAreConfigurableAndEmptyMeansNone() throws {
        let schema = try MeteringSchema.parse(oneMetric + """
            tokens:
              - name: tokens_by_tier_total
                max_series: 100
                labels:
                  - {name: tier, header: X-Usage-Tier, default: free, max_values: 4}
                  - {name: path, header: ":path", kind: route}
                  - {name: type, from: type, required: true, max_values: 5}
            """, file: "c.yaml")
        #expect(schema.tokens.map(\.name) == ["tokens_by_tier_total"])
        #expect(schema.tokens[0].labels[0].source == .header("x-usage-tier"))
        #expect(try MeteringSchema.parse(schema.yaml, file: "c.yaml") == schema)
        #expect(try MeteringSchema.parse(oneMetric + "tokens: []\n", file: "c.yaml").tokens.isEmpty)
    }

    @Test(arguments: [
        ("tokens:\n  - name: t_total\n    labels:\n      - {name: user, header: x-usage-user}\n",
         "c.yaml:8: tokens[0].labels: needs exactly one label from type, got 0: token types overlap (cached_input is part of input), so one series must never add them up"),
        ("tokens:\n  - name: t_total\n    labels:\n      - {name: a, from: type}\n      - {name: b, from: type}\n",
         "c.yaml:8: tokens[0].labels: needs exactly one label from type, got 2: token types overlap (cached_input is part of input), so one series must never add them up"),
        ("tokens:\n  - name: t_total\n    labels:\n      - {name: type, from: type}\n      - {name: u, from: user}\n",
         "c.yaml:9: tokens[0].labels[1].from: a token family reads model or type from the answer (and headers with header:), got 'user'"),
        ("tokens:\n  - name: t_total\n    value: {from: x}\n    labels:\n      - {name: type, from: type}\n",
         "c.yaml:7: tokens[0].value: unknown key; expected one of name, help, max_series, labels"),
        ("tokens:\n  - name: llm_requests_total\n    labels:\n      - {name: type, from: type}\n",
         "c.yaml:6: tokens[0].name: 'llm_requests_total' is already a metric"),
        ("tokens:\n  - name: t_total\n    labels:\n      - {name: type, from: type}\n      - {name: p, header: \":status\"}\n",
         "c.yaml:9: tokens[0].labels[1].header: ':status' is not a header name"),
    ])
    func badTokenFamiliesAreRefusedWithTheirPlace(tail: String, expected: String) {
        #expect(loadError(oneMetric + tail) == expected)
    }

    @Test func pathIsAPseudoHeaderOnlyForTokenFamilies() {
        #expect(loadError("metrics:\n  - name: m\n    labels:\n      - {name: p, header: \":path\"}\n")
            == "c.yaml:4: metrics[0].labels[0].header: ':path' is not a header name")
    }
}

/// An answer's usage becomes the token families' callbacks through the `/track` decoder.
@Suite struct TokenDecoderTests {
    private let decoder = TokenDecoder(schema: .default, maximumValueBytes: 32, hasher: nil)
    // x-usage-user, x-usage-groups, :path, as `headerNames` orders them.
    private let headers: [String?] = ["alice", "ml, research,ml", "/v1/chat/completions?stream=1"]

    @Test func oneCallbackPerTypeWithTokensIndexedAfterTheTrackFamilies() throws {
        #expect(self.decoder.headerNames == ["x-usage-user", "x-usage-groups", ":path"])
        #expect(self.decoder.familyOffset == 1)
        let counts = TokenCounts(input: 120, output: 30, cachedInput: 100, reasoning: 10)
        let callbacks = try self.decoder.decode(model: "gpt-x", counts: counts.byType, headers: self.headers)
        #expect(callbacks.map(\.series) == [
            [[], ["alice", "ml,research", "/v1/chat/completions", "gpt-x", "input"]],
            [[], ["alice", "ml,research", "/v1/chat/completions", "gpt-x", "output"]],
            [[], ["alice", "ml,research", "/v1/chat/completions", "gpt-x", "cached_input"]],
            [[], ["alice", "ml,research", "/v1/chat/completions", "gpt-x", "reasoning"]],
        ])
        #expect(callbacks.map(\.amounts) == [[nil, 120], [nil, 30], [nil, 100], [nil, 10]])
    }

    @Test func noModelIsCountedUnderUnknown() throws {
        let callbacks = try self.decoder.decode(model: "", counts: [("output", 5)], headers: self.headers)
        #expect(callbacks.map { $0.series[1][3] } == ["unknown"])
    }

    @Test func labelProblemsAreTheTrackDecodersOwn() {
        func problems(_ model: String, _ headers: [String?]) -> [String] {
            do {
                _ = try self.decoder.decode(model: model, counts: [("input", 1)], headers: headers)
                return []
            } catch {
                return error.outcome == .invalid ? error.problems : ["outcome \(error.outcome)"]
            }
        }
        #expect(problems("m", [nil, "g", "/p"]) == ["header x-usage-user: required"])
        #expect(problems("__other__", [String(repeating: "u", count: 33), "g", "/p"])
            == ["header x-usage-user: 33 bytes; the limit is 32", "model: __other__ is reserved"])
    }

    @Test func theRequiredHeaderIsTheIdentity() {
        #expect((0..<3).map { self.decoder.isRequired(header: $0) } == [true, false, false])
    }

    @Test func countsGoToTheTokenFamilyAndShowInMetrics() throws {
        let metrics = UsageMetrics(extProc: ExtProcCounters())
        #expect(metrics.families.map(\.name) == ["llm_requests_total", "llm_tokens_total"])
        for callback in try self.decoder.decode(model: "m", counts: TokenCounts(input: 7, output: 2).byType, headers: self.headers) {
            metrics.count(callback)
        }
        metrics.record(.counted)
        let text = String(decoding: metrics.render(), as: UTF8.self)
        #expect(text.contains("llm_tokens_total{user=\"alice\",groups=\"ml,research\",path=\"/v1/chat/completions\",model=\"m\",type=\"input\"} 7\n"))
        #expect(text.contains("llm_tokens_total{user=\"alice\",groups=\"ml,research\",path=\"/v1/chat/completions\",model=\"m\",type=\"output\"} 2\n"))
        #expect(!text.contains("type=\"cached_input\""))
        #expect(text.contains("usage_tracking_token_streams_total{outcome=\"counted\"} 1\n"))
        #expect(text.contains("usage_tracking_token_streams_total{outcome=\"no_usage\"} 0\n"))
        #expect(metrics.requests.seriesCount == 0)
    }

    @Test func withoutTokensNothingOfThemIsExposed() {
        let text = String(decoding: UsageMetrics().render(), as: UTF8.self)
        #expect(!text.contains("llm_tokens_total") && !text.contains("usage_tracking_token_streams_total"))
    }
}
