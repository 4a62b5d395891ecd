import Synchronization
import Testing

@testable import UsageTrackingCore

private let key = Array("k3y-for-tests".utf8)

private func decoder(_ yaml: String, maximumValueBytes: Int = 256) throws -> CallbackDecoder {
    let schema = try MeteringSchema.parse(yaml, file: "t.yaml")
    return CallbackDecoder(schema: schema, maximumValueBytes: maximumValueBytes, hasher: schema.needsHMACKey ? LabelHasher(key: key) : nil)
}

private func problems(_ decoder: CallbackDecoder, _ body: String, _ contentType: String = "application/json", headers: [String?] = []) -> [String]? {
    do {
        _ = try decoder.decode(Array(body.utf8), contentType: contentType, headers: headers)
        return nil
    } catch {
        #expect(error.outcome == .invalid)
        return error.problems
    }
}

private func hmac(_ value: String) -> String { LabelHasher(key: key).hash(value) }

@Suite struct SchemaDecodingTests {
    @Test func nestedFieldsHeadersDefaultsHashesAndValues() throws {
        let decoder = try decoder(everyKeyConfig)
        #expect(decoder.headerNames == ["x-auth-mode"])
        let body = #"{"user":" ann ","identity":{"tier":"gold","x":[1]},"path":"/v1/models/granite-8b?x=1","groups":["b","a"],"usage":{"prompt_tokens":3,"total_tokens":42}}"#
        let callback = try decoder.decode(Array(body.utf8), contentType: "application/json", headers: ["byok_bearer"])
        #expect(callback.series == [["ann", "gold", "byok_bearer", "/v1/models/{model}"], [hmac("ann"), "a,b"]])
        #expect(callback.amount(forFamily: 0) == 1)
        #expect(callback.amount(forFamily: 1) == 42)
        #expect(callback.user == "ann", "the first family's user")
    }

    @Test func absentOptionalsTakeTheirDefaultsAndAnAbsentOptionalValueSkipsItsFamily() throws {
        let callback = try decoder(everyKeyConfig).decode(Array(#"{"user":"ann"}"#.utf8), contentType: nil, headers: [nil])
        #expect(callback.series == [["ann", "free", "centralized", ""], [hmac("ann"), ""]])
        #expect(callback.amount(forFamily: 1) == nil)
    }

    @Test func aFormNamesNestedFieldsByTheirDottedName() throws {
        let body = "user=ann&identity.tier=gold&usage.total_tokens=7&groups=x&groups=y"
        let callback = try decoder(everyKeyConfig).decode(Array(body.utf8), contentType: "application/x-www-form-urlencoded", headers: [nil])
        #expect(callback.series == [["ann", "gold", "centralized", ""], [hmac("ann"), "x,y"]])
        #expect(callback.amount(forFamily: 1) == 7)
    }

    @Test func everyProblemIsListedOnceInSchemaOrder() throws {
        let body = #"{"path":7,"usage":{"total_tokens":-1},"identity":{"tier":["a"]},"user":"a","user":"b","method":1}"#
        #expect(
            problems(try decoder(everyKeyConfig), body, headers: [nil]) == [
                "user: given more than once",
                "identity.tier: must be a string, got an array",
                "path: must be a string, got number",
                "usage.total_tokens: must be a non-negative integer, got a negative number",
                "method: must be a string, got number",
            ])
    }

    @Test(arguments: [
        (#"{"user":"u","usage":{"total_tokens":1.5}}"#, "usage.total_tokens: must be a non-negative integer, got a fraction or an exponent"),
        (#"{"user":"u","usage":{"total_tokens":1e3}}"#, "usage.total_tokens: must be a non-negative integer, got a fraction or an exponent"),
        (#"{"user":"u","usage":{"total_tokens":"12"}}"#, "usage.total_tokens: must be a non-negative integer, got string"),
        (#"{"user":"u","usage":{"total_tokens":true}}"#, "usage.total_tokens: must be a non-negative integer, got boolean"),
        (#"{"user":"u","usage":{"total_tokens":18446744073709551616}}"#, "usage.total_tokens: must be a non-negative integer up to 2^53 - 1"),
        (#"{"user":"u","usage":{"total_tokens":9007199254740992}}"#, "usage.total_tokens: must be a non-negative integer up to 2^53 - 1"),
        (#"{"user":"u","identity":"gold"}"#, nil),
        (#"{"user":"__other__"}"#, "user: __other__ is reserved"),
        (#"{"user":"u","groups":"__other__"}"#, "groups: __other__ is reserved"),
        (#"{"user":"u","path":"__other__?x"}"#, "path: __other__ is reserved"),
    ])
    func valueAndReservedProblems(body: String, problem: String?) throws {
        let found = problems(try decoder(everyKeyConfig), body, headers: [nil])
        #expect(found == problem.map { [$0] })
    }

    @Test func theLargestWholeNumberIsAccepted() throws {
        let callback = try decoder(everyKeyConfig).decode(Array(#"{"user":"u","usage":{"total_tokens":9007199254740991}}"#.utf8), contentType: nil, headers: [nil])
        #expect(callback.amount(forFamily: 1) == (1 << 53) - 1)
    }

    @Test func formValuesAreDigits() throws {
        let decoder = try decoder(everyKeyConfig)
        #expect(problems(decoder, "user=u&usage.total_tokens=12x", "application/x-www-form-urlencoded", headers: [nil]) == ["usage.total_tokens: must be a non-negative integer, got text"])
        #expect(problems(decoder, "user=u&usage.total_tokens=-3", "application/x-www-form-urlencoded", headers: [nil]) == ["usage.total_tokens: must be a non-negative integer, got a negative number"])
    }

    @Test func requiredValuesAndHeadersAreNamedWhenMissing() throws {
        let yaml = """
            metrics:
              - name: tokens_total
                value: {from: usage.total_tokens, required: true}
                labels:
                  - {name: mode, header: x-auth-mode, required: true}
                  - {name: model, from: model, required: true}
            """
        let decoder = try decoder(yaml)
        #expect(problems(decoder, #"{"usage":{}}"#, headers: [nil]) == ["header x-auth-mode: required", "model: required", "usage.total_tokens: required"])
        #expect(problems(decoder, #"{"model":" ","usage":{"total_tokens":0}}"#, headers: [""]) == ["header x-auth-mode: must not be empty", "model: must not be empty"])
    }

    @Test func tooLongIsMeasuredBeforeHashing() throws {
        let long = String(repeating: "u", count: 300)
        #expect(problems(try decoder(everyKeyConfig), #"{"user":"\#(long)"}"#, headers: [nil]) == ["user: 300 bytes; the limit is 256"])
    }

    @Test func aBranchHoldingANonObjectIsMissingNotMalformed() throws {
        let yaml = "metrics:\n  - name: a_total\n    labels:\n      - {name: tier, from: identity.tier, required: true}\n"
        #expect(problems(try decoder(yaml), #"{"identity":"gold"}"#) == ["identity.tier: required"])
        #expect(problems(try decoder(yaml), #"{"identity":{"tier":{"deep":1}}}"#) == ["identity.tier: must be a string, got object"])
    }

    @Test func rejectedFieldNamesNeverIncludeValues() throws {
        let decoder = try decoder(everyKeyConfig)
        do {
            _ = try decoder.decode(Array(#"{"user":"secret-person","usage":{"total_tokens":"x"},"zz":1}"#.utf8), contentType: nil, headers: [nil])
            Issue.record("accepted")
        } catch {
            #expect(error.fieldNames == ["user", "usage", "zz"])
            #expect(!error.problems.joined().contains("secret-person"))
        }
    }
}

@Suite struct RouteTemplateTests {
    @Test(arguments: [
        ("/v1/models/granite-8b", "/v1/models/{model}"),
        ("/v1/models", "/v1/models"),
        ("/v1/models/", "/v1/models"),
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions/chatcmpl-123", "/v1/chat/completions/{completion_id}"),
        ("/v1/files/file-abc/content", "/v1/files/{file_id}/content"),
        ("/v1/batches/batch_1/cancel", "/v1/batches/{batch_id}/cancel"),
        ("/v1/fine_tuning/jobs/ftjob-1/events", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"),
        ("/v1/messages/count_tokens", "/v1/messages/count_tokens"),
        ("/v1/messages/batches/msgbatch_01", "/v1/messages/batches/{message_batch_id}"),
        ("/v1/audio/transcriptions", "/v1/audio/transcriptions"),
        ("/v1/images/generations", "/v1/images/generations"),
        ("/ns/granite/v1/chat/completions", "/{namespace}/{model}/v1/chat/completions"),
    ])
    func knownRoutesCollapse(path: String, template: String) {
        let routes = RouteTemplates(RouteTemplates.builtIn + ["/{namespace}/{model}/v1/chat/completions"])
        #expect(routes.match(path) == template)
    }

    @Test(arguments: ["/", "/v1", "/v1/models/a/b", "/wp-login.php", "/v1/chat", "/v2/chat/completions", String(repeating: "/a", count: 100)])
    func unknownPathsDoNotMatch(path: String) {
        #expect(RouteTemplates(RouteTemplates.builtIn).match(path) == nil)
    }

    @Test func theDecoderKeepsUnknownPathsRaw() throws {
        let callback = try CallbackDecoder().decode(Array(#"{"user":"u","path":"/wp-login.php?x"}"#.utf8), contentType: nil)
        #expect(callback.path == "/wp-login.php")
        let known = try CallbackDecoder().decode(Array(#"{"user":"u","path":"/v1/models/granite"}"#.utf8), contentType: nil)
        #expect(known.path == "/v1/models/{model}")
    }
}

@Suite struct HMACTests {
    /// RFC 4231, test case 2.
    @Test func rfc4231Vector() {
        let hasher = LabelHasher(key: Array("Jefe".utf8))
        #expect(hasher.fullHex(Array("what do ya want for nothing?".utf8)) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        #expect(hasher.hash("what do ya want for nothing?") == "5bdcc146bf60754e")
    }

    @Test func keyFileLoseOneTrailingLineBreak() {
        #expect(LabelHasher.key(fromFile: Array("key\n".utf8)) == Array("key".utf8))
        #expect(LabelHasher.key(fromFile: Array("key\r\n".utf8)) == Array("key".utf8))
        #expect(LabelHasher.key(fromFile: Array("key\n\n".utf8)) == Array("key\n".utf8))
    }
}

@Suite struct BudgetTests {
    private func family(maxSeries: Int = 100, maxValues: [Int] = [2, 2], free: [Set<String>]? = nil) -> CounterFamily {
        CounterFamily(name: "t_total", help: "t", labelNames: ["user", "path"], stripes: 4, maxSeries: maxSeries, maxValues: maxValues, freeValues: free)
    }

    @Test func exactlyAtTheLimitIsKeptAndOnePastIsOther() {
        let family = family()
        family.increment(["a", "/p"])
        family.increment(["b", "/p"])
        #expect(family.budgetUse().values == [2, 1])
        family.increment(["c", "/p"], by: 5)
        family.increment(["a", "/p"])
        #expect(family.value(["a", "/p"]) == 2)
        #expect(family.value(["c", "/p"]) == 0)
        #expect(family.value(["__other__", "/p"]) == 5, "only the spent label is folded")
        #expect(family.budgetUse().labelOverflows == [1, 0])
        #expect(family.budgetUse().values == [2, 1], "__other__ spends nothing")
    }

    @Test func twoLabelsFoldIndependently() {
        let family = family()
        for (user, path) in [("a", "/1"), ("b", "/2"), ("c", "/3"), ("a", "/4"), ("d", "/1")] { family.increment([user, path]) }
        #expect(family.snapshot().map(\.labels) == [["__other__", "/1"], ["__other__", "__other__"], ["a", "/1"], ["a", "__other__"], ["b", "/2"]])
        #expect(family.budgetUse().labelOverflows == [2, 2])
    }

    @Test func freeValuesNeverSpendTheBudget() {
        let family = family(maxValues: [100, 1], free: [[], ["/v1/chat/completions"]])
        family.increment(["a", "/scan1"])
        family.increment(["a", "/scan2"])
        family.increment(["b", "/v1/chat/completions"])
        #expect(family.value(["b", "/v1/chat/completions"]) == 1, "a known route is kept although the budget is spent")
        #expect(family.value(["a", "__other__"]) == 1)
    }

    @Test func seriesBeyondTheCapGoToTheAllOtherSeriesAndTotalsStayExact() {
        let family = family(maxSeries: 3, maxValues: [.max, .max])
        var counted: UInt64 = 0
        for i in 0..<10 {
            family.increment(["u\(i)", "/p"], by: UInt64(i + 1))
            counted += UInt64(i + 1)
        }
        family.increment(["u0", "/p"])
        counted += 1
        #expect(family.seriesCount == 4)
        #expect(family.value(["u0", "/p"]) == 2, "a counted series is never evicted")
        #expect(family.value(["__other__", "__other__"]) == UInt64((4...10).reduce(0, +)))
        #expect(family.budgetUse().seriesOverflows == 7)
        #expect(family.snapshot().reduce(0) { $0 + $1.value } == counted)
    }

    @Test func aFamilyAtItsSeriesCapKeepsNewValuesOutOfItsLabelSets() {
        let family = family(maxSeries: 1, maxValues: [5, 5])
        family.increment(["a", "/p"])
        family.increment(["b", "/q"])
        #expect(family.budgetUse().values == [1, 1])
    }

    @Test func concurrentNewSeriesAreCreatedOnceAndSumExactly() async {
        let family = family(maxSeries: 500, maxValues: [300, 10])
        await withTaskGroup(of: Void.self) { group in
            for task in 0..<8 {
                group.addTask {
                    for i in 0..<5_000 { family.increment(["u\((i * (task + 1)) % 1000)", "/p\(i % 20)"]) }
                }
            }
        }
        #expect(family.snapshot().reduce(0) { $0 + $1.value } == 40_000)
        #expect(family.seriesCount <= 501)
        #expect(family.budgetUse().values[0] <= 300)
        #expect(family.budgetUse().values[1] == 10)
    }

    @Test func defaultBudgetsAndSelfMetricsAreExposed() {
        let metrics = UsageMetrics()
        metrics.count(Callback(user: "a", groups: "g", path: "/v1/models/{model}"))
        let text = String(decoding: metrics.render(), as: UTF8.self)
        for line in [
            #"usage_tracking_series_limit{metric="llm_requests_total"} 250000"#,
            #"usage_tracking_label_values_limit{metric="llm_requests_total",label="user"} 100000"#,
            #"usage_tracking_label_values_limit{metric="llm_requests_total",label="groups"} 1000"#,
            #"usage_tracking_label_values_limit{metric="llm_requests_total",label="path"} 200"#,
            #"usage_tracking_label_values{metric="llm_requests_total",label="user"} 1"#,
            #"usage_tracking_label_values{metric="llm_requests_total",label="path"} 0"#,
            #"usage_tracking_label_overflow_total{metric="llm_requests_total",label="user"} 0"#,
            #"usage_tracking_series_overflow_total{metric="llm_requests_total"} 0"#,
        ] {
            #expect(text.contains(line + "\n"), "\(line)")
        }
    }
}

@Suite struct NewSeriesHoldTests {
    final class FakeClock: Sendable {
        let now = Mutex<UInt64>(1_000)
        func advance(_ nanoseconds: UInt64) { self.now.withLock { $0 += nanoseconds } }
        var read: @Sendable () -> UInt64 { { self.now.withLock { $0 } } }
    }

    @Test func aNewSeriesReadsZeroUntilItIsHeldLongEnough() {
        let clock = FakeClock()
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user"], newSeriesHoldNanoseconds: 30, clock: clock.read)
        family.increment(["a"], by: 3)
        #expect(family.snapshot().map(\.value) == [0])
        clock.advance(29)
        family.increment(["a"])
        #expect(family.snapshot().map(\.value) == [0])
        #expect(family.value(["a"]) == 4, "counted all along")
        clock.advance(1)
        #expect(family.snapshot().map(\.value) == [4])
        family.increment(["b"])
        #expect(family.snapshot().map(\.value) == [4, 0], "each series is held from its own start")
    }

    @Test func withoutAHoldASeriesShowsAtOnce() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user"])
        family.increment(["a"])
        #expect(family.snapshot().map(\.value) == [1])
    }
}
