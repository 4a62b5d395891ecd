import Testing

@testable import UsageTrackingCore

extension Tokens {
    /// An answer the reader must refuse, and the exact reason it must give.
    struct RefusedAnswer: Sendable, CustomTestStringConvertible {
        var body: String
        var reason: String
        var headers = AnswerHeaders.json
        var testDescription: String { self.reason }
    }

    @Suite struct AnswerRefusalTests {
        static func openAI(_ usageMembers: String) -> String {
            #"{"model":"gpt-4o","usage":{"# + usageMembers + "}}"
        }

        static let hostileValues: [RefusedAnswer] = [
            RefusedAnswer(body: openAI(#""prompt_tokens":-5,"completion_tokens":1"#), reason: "usage.prompt_tokens is negative"),
            RefusedAnswer(body: openAI(#""prompt_tokens":-0,"completion_tokens":1"#), reason: "usage.prompt_tokens is negative"),
            RefusedAnswer(body: openAI(#""prompt_tokens":1.5,"completion_tokens":1"#), reason: "usage.prompt_tokens is not a whole number"),
            RefusedAnswer(body: openAI(#""prompt_tokens":10,"completion_tokens":1e3"#), reason: "usage.completion_tokens is not a whole number"),
            RefusedAnswer(body: openAI(#""prompt_tokens":"12","completion_tokens":1"#), reason: "usage.prompt_tokens is a string, not a count"),
            RefusedAnswer(body: openAI(#""prompt_tokens":true,"completion_tokens":1"#), reason: "usage.prompt_tokens is a boolean, not a count"),
            RefusedAnswer(body: openAI(#""prompt_tokens":null,"completion_tokens":1"#), reason: "usage.prompt_tokens is null, not a count"),
            RefusedAnswer(body: openAI(#""prompt_tokens":[1],"completion_tokens":1"#), reason: "usage.prompt_tokens is an array, not a count"),
            RefusedAnswer(body: openAI(#""prompt_tokens":{},"completion_tokens":1"#), reason: "usage.prompt_tokens is an object, not a count"),
            RefusedAnswer(body: openAI(#""prompt_tokens":9007199254740992,"completion_tokens":1"#), reason: "usage.prompt_tokens exceeds 9007199254740991"),
            RefusedAnswer(
                body: openAI(#""prompt_tokens":123456789012345678901234567890,"completion_tokens":1"#),
                reason: "usage.prompt_tokens exceeds 9007199254740991"),
            RefusedAnswer(body: openAI(#""prompt_tokens":1,"completion_tokens":1,"prompt_tokens":2"#), reason: "usage.prompt_tokens appears twice"),
            RefusedAnswer(
                body: openAI(#""prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":1}"#),
                reason: "usage.prompt_tokens_details.cached_tokens appears twice"),
            RefusedAnswer(body: openAI(#""prompt_tokens":5,"total_tokens":null,"completion_tokens":1"#), reason: "usage.total_tokens is null, not a count"),
            RefusedAnswer(body: openAI(#""prompt_tokens":5"#), reason: "usage.completion_tokens is missing"),
            RefusedAnswer(body: openAI(#""prompt_tokens":5,"completion_tokens":1,"input_tokens":5"#), reason: "usage mixes prompt_tokens and input_tokens fields"),
            RefusedAnswer(
                body: openAI(#""prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":6}"#),
                reason: "cached and cache-write tokens exceed usage.prompt_tokens"),
            RefusedAnswer(
                body: openAI(#""prompt_tokens":5,"completion_tokens":1,"completion_tokens_details":{"reasoning_tokens":2}"#),
                reason: "reasoning tokens exceed usage.completion_tokens"),
            RefusedAnswer(body: openAI(#""prompt_tokens" 5"#), reason: "invalid JSON: expected ':' after a member name"),
            RefusedAnswer(body: openAI(#""prompt_tokens":5 "completion_tokens":1"#), reason: "invalid JSON: expected ',' or '}' after a member"),
            RefusedAnswer(body: openAI(#""prompt_tokens":05,"completion_tokens":1"#), reason: "invalid JSON: an invalid number"),
            RefusedAnswer(body: openAI(#""prompt_tokens":5,"completion_tokens":nul"#), reason: "invalid JSON: expected a value"),
            RefusedAnswer(body: #"{"usage":"none"}"#, reason: "usage is a string, not an object"),
            RefusedAnswer(body: #"{"usage":{"prompt_tokens_details":7}}"#, reason: "usage.prompt_tokens_details is a number, not an object"),
            RefusedAnswer(body: #"{"usage":{},"usage":null}"#, reason: "usage appears twice"),
            RefusedAnswer(body: #"{"model":"a","model":"b"}"#, reason: "model appears twice"),
            RefusedAnswer(body: #"{"model":42}"#, reason: "model is a number, not a string"),
            RefusedAnswer(body: #"{"model":"\ud800x"}"#, reason: "model is not valid UTF-8"),
            RefusedAnswer(body: #"{"model":"tab\there"}"#, reason: "model holds a control character"),
            RefusedAnswer(body: "{\"model\":\"" + String(repeating: "m", count: 257) + "\"}", reason: "model is longer than 256 bytes"),
            RefusedAnswer(body: "{\"a\":" + String(repeating: "[", count: 70), reason: "JSON nests deeper than 64 levels"),
            RefusedAnswer(body: "{\"a\":\"line\nbreak\"}", reason: "invalid JSON: a control character inside a string"),
            RefusedAnswer(body: #"{"a":"\x"}"#, reason: "invalid JSON: an invalid escape in a string"),
            RefusedAnswer(body: #"{"a":"\u12G4"}"#, reason: "invalid JSON: an invalid \\u escape"),
            RefusedAnswer(body: #"[{"usage":{}}]"#, reason: "the JSON body is not an object"),
            RefusedAnswer(body: #"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":1}} trailing"#, reason: "invalid JSON: data after the end of the document"),
            RefusedAnswer(
                body: #"{"type":"message","usage":{"input_tokens":-1,"output_tokens":1}}"#, reason: "usage.input_tokens is negative"),
            // Streams name the path where the value was.
            RefusedAnswer(
                body: "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":\"3\"}}}\n\n",
                reason: "message.usage.input_tokens is a string, not a count", headers: .sse),
            RefusedAnswer(
                body: "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":2.0}}}\n\n",
                reason: "response.usage.output_tokens is not a whole number", headers: .sse),
            RefusedAnswer(
                body: "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3}}}\n\n",
                reason: "response.usage.output_tokens is missing", headers: .sse),
            RefusedAnswer(body: "data: {\"model\":\"m\",\n\n", reason: "an SSE event ends inside its JSON data", headers: .sse),
            RefusedAnswer(body: "data: hello\n\n", reason: "SSE data is neither a JSON object nor [DONE]", headers: .sse),
            RefusedAnswer(body: "data: [DONE] x\n\n", reason: "SSE data is neither a JSON object nor [DONE]", headers: .sse),
            RefusedAnswer(body: "data: [DON\n\n", reason: "SSE data is neither a JSON object nor [DONE]", headers: .sse),
            RefusedAnswer(body: "data: {}\ndata: {}\n\n", reason: "invalid JSON: data after the end of the document", headers: .sse),
        ]

        @Test(arguments: hostileValues)
        func refusesWithTheExactReason(answer: RefusedAnswer) {
            #expect(readingAtEverySplit(Array(answer.body.utf8), headers: answer.headers) == .unreadable(answer.reason))
        }

        @Test func invalidUTF8InTheModelIsRefused() {
            let body = Array(#"{"model":"gpt"#.utf8) + [0xC3, 0x28] + Array(#""}"#.utf8)
            #expect(readingAtEverySplit(body, headers: .json) == .unreadable("model is not valid UTF-8"))
        }

        @Test func boundsCanBeSetLower() {
            let limits = AnswerLimits(maxModelBytes: 4, maxDepth: 3, maxTokenCount: 1000)
            #expect(reading(Array(#"{"model":"abcde"}"#.utf8), headers: .json, limits: limits) == .unreadable("model is longer than 4 bytes"))
            #expect(reading(Array(#"{"model":"abcd"}"#.utf8), headers: .json, limits: limits) == .noUsage)
            #expect(reading(Array(#"{"a":{"b":{"c":{}}}}"#.utf8), headers: .json, limits: limits) == .unreadable("JSON nests deeper than 3 levels"))
            #expect(reading(Array(#"{"a":{"b":[1]}}"#.utf8), headers: .json, limits: limits) == .noUsage)
            let big = #"{"usage":{"prompt_tokens":1001,"completion_tokens":1}}"#
            #expect(reading(Array(big.utf8), headers: .json, limits: limits) == .unreadable("usage.prompt_tokens exceeds 1000"))
            let fits = #"{"usage":{"prompt_tokens":1000,"completion_tokens":1}}"#
            #expect(reading(Array(fits.utf8), headers: .json, limits: limits) == usage("", input: 1000, output: 1))
        }

        /// A JSON answer that ends before its document closes was cut short: its usage, even
        /// one read already, is not trusted. An event stream that ends is read as far as it went.
        @Test func anAnswerEndingInsideItsJSONIsUnreadable() {
            let whole = Array(SampleAnswers.openAIChat.body.utf8)
            for length in [1, whole.count / 2, whole.count - 1] {
                let reader = AnswerUsageReader()
                reader.responseHeaders(status: 200, contentType: "application/json", contentEncoding: nil)
                whole.prefix(length).withUnsafeBytes { reader.body($0) }
                #expect(reader.reading == .noUsage)
                reader.end()
                #expect(reader.reading == .unreadable("the answer ends inside its JSON document"))
            }
            let reader = AnswerUsageReader()
            whole.withUnsafeBytes { reader.body($0) }
            reader.end()
            #expect(reader.reading == reading(whole, headers: .json))
            let stream = AnswerUsageReader()
            Array("data: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: {\"mod".utf8).withUnsafeBytes { stream.body($0) }
            stream.end()
            #expect(stream.reading == usage("m", input: 1, output: 2))
        }

        /// Optional Anthropic fields given as null are "not given", not a refusal.
        @Test func anthropicNullCacheFieldsAreNotGiven() {
            let body = #"{"type":"message","model":"c","usage":{"input_tokens":5,"cache_read_input_tokens":null,"output_tokens":2}}"#
            #expect(reading(Array(body.utf8), headers: .json) == usage("c", input: 5, output: 2))
        }
    }
    @Suite struct AnswerHeaderTests {
        @Test(arguments: [(404, "status 404"), (500, "status 500"), (199, "status 199"), (302, "status 302")])
        func nonSuccessIsNotAModelAnswer(status: Int, reason: String) {
            let body = Array(SampleAnswers.openAIChat.body.utf8)
            #expect(reading(body, headers: AnswerHeaders(status: status, contentType: "application/json")) == .notModelAnswer(reason))
        }

        @Test(arguments: [
            ("text/html; charset=utf-8", "content-type text/html"),
            ("TEXT/PLAIN", "content-type text/plain"),
            ("application/x-ndjson", "content-type application/x-ndjson"),
        ])
        func otherContentTypesAreNotModelAnswers(contentType: String, reason: String) {
            let headers = AnswerHeaders(contentType: contentType, contentEncoding: "br")
            #expect(reading(Array("<html></html>".utf8), headers: headers) == .notModelAnswer(reason))
        }

        @Test(arguments: [("br", "br"), ("deflate", "deflate"), (" ZSTD ", "zstd"), ("gzip, br", "gzip, br")])
        func otherEncodingsAreUnreadable(encoding: String, named: String) {
            let headers = AnswerHeaders(contentType: "application/json", contentEncoding: encoding)
            #expect(reading(Array("{}".utf8), headers: headers) == .unreadable("Content-Encoding \(named) is not supported"))
        }

        @Test(arguments: ["application/json", "application/vnd.example+json; charset=utf-8", "", nil] as [String?])
        func jsonTypesAndNoTypeAreRead(contentType: String?) {
            let answer = SampleAnswers.responses
            #expect(reading(Array(answer.body.utf8), headers: AnswerHeaders(contentType: contentType)) == answer.expected)
        }

        @Test func identityAndGzipSpellingsAreAccepted() {
            let body = Array(SampleAnswers.anthropic.body.utf8)
            for encoding in ["identity", "", " Identity "] {
                #expect(reading(body, headers: AnswerHeaders(contentType: "application/json", contentEncoding: encoding)) == SampleAnswers.anthropic.expected)
            }
            for encoding in ["GZIP", "x-gzip"] {
                let headers = AnswerHeaders(contentType: "application/json", contentEncoding: encoding)
                #expect(reading(Gzip.compress(body), headers: headers) == SampleAnswers.anthropic.expected)
            }
        }

        @Test func unknownStatusIsReadAsSuccess() {
            let answer = SampleAnswers.openAIChatStream
            #expect(reading(Array(answer.body.utf8), headers: AnswerHeaders(status: nil, contentType: "text/event-stream")) == answer.expected)
        }

        /// Without headers, a body that is neither JSON nor SSE is no model answer.
        @Test(arguments: ["<!doctype html><html>", "Internal error\n", "dog: cat\n\n"])
        func sniffingRefusesOtherBodies(body: String) {
            #expect(readingAtEverySplit(Array(body.utf8), headers: nil) == .notModelAnswer("body is neither JSON nor SSE"))
        }

        /// With the SSE content type, unknown fields are passed over, as the SSE rules say.
        @Test func declaredSSEPassesOverUnknownFields() {
            let body = "dog: cat\n\n" + SampleAnswers.openAIChatStream.body
            #expect(reading(Array(body.utf8), headers: .sse) == SampleAnswers.openAIChatStream.expected)
        }

        @Test func laterHeadersAndChunksChangeNothingOnceDecided() {
            let reader = AnswerUsageReader()
            reader.responseHeaders(status: 503, contentType: "text/html", contentEncoding: nil)
            reader.responseHeaders(status: 200, contentType: "application/json", contentEncoding: nil)
            Array(SampleAnswers.openAIChat.body.utf8).withUnsafeBytes { reader.body($0) }
            #expect(reader.reading == .notModelAnswer("status 503"))

            let refused = AnswerUsageReader()
            Array(#"{"usage":5}"#.utf8).withUnsafeBytes { refused.body($0) }
            Array(SampleAnswers.openAIChat.body.utf8).withUnsafeBytes { refused.body($0) }
            #expect(refused.reading == .unreadable("usage is a number, not an object"))

            // Headers after the body has begun come too late to change how it is read.
            let late = AnswerUsageReader()
            Array(SampleAnswers.openAIChat.body.utf8).withUnsafeBytes { late.body($0) }
            late.responseHeaders(status: 500, contentType: "text/html", contentEncoding: "br")
            #expect(late.reading == SampleAnswers.openAIChat.expected)
        }

        /// Events after the usage (stop events, [DONE], comments) leave it as it was.
        @Test func bodyAfterTheUsageLeavesIt() {
            let body = SampleAnswers.anthropicStream.body + ": bye\n\ndata: [DONE]\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\n"
            #expect(reading(Array(body.utf8), headers: .sse) == SampleAnswers.anthropicStream.expected)
            let json = SampleAnswers.openAIChat.body + "\n\r\n  \t"
            #expect(reading(Array(json.utf8), headers: .json) == SampleAnswers.openAIChat.expected)
        }
    }
}
