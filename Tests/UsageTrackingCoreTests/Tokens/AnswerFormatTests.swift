import Foundation
import Testing

@testable import UsageTrackingCore

extension Tokens {
    /// A model answer as a provider sends it, and what the reader must make of it.
    struct SampleAnswer: Sendable, CustomTestStringConvertible {
        var name: String
        var body: String
        var headers: AnswerHeaders
        var expected: AnswerReading
        var testDescription: String { self.name }
    }

    enum SampleAnswers {
        static let openAIChat = SampleAnswer(
            name: "OpenAI chat JSON",
            body: """
                {
                  "id": "chatcmpl-B9x4TqL2",
                  "object": "chat.completion",
                  "created": 1754321000,
                  "model": "gpt-4o-mini-2024-07-18",
                  "choices": [
                    {
                      "index": 0,
                      "message": {"role": "assistant", "model": "not this one", "usage": "nor this",
                                  "content": "Lyon, \\"la capitale des Gaules\\" \\u2014 caf\\u00e9 \u{1F950} ok\\n", "refusal": null},
                      "logprobs": null,
                      "finish_reason": "stop"
                    }
                  ],
                  "usage": {
                    "prompt_tokens": 1234,
                    "completion_tokens": 56,
                    "total_tokens": 1290,
                    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 20, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                                  "rejected_prediction_tokens": 0}
                  },
                  "service_tier": "default",
                  "system_fingerprint": "fp_51e0a1c7"
                }
                """,
            headers: .json, expected: usage("gpt-4o-mini-2024-07-18", input: 1234, output: 56, cached: 1024, reasoning: 20))

        static let openAICompletions = SampleAnswer(
            name: "OpenAI completions JSON",
            body: """
                {"id":"cmpl-7a2","object":"text_completion","created":1754321010,"model":"gpt-3.5-turbo-instruct",\
                "choices":[{"text":"\\n\\nOnce upon a time","index":0,"logprobs":null,"finish_reason":"length"}],\
                "usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}
                """,
            headers: AnswerHeaders(contentType: "application/json; charset=utf-8"), expected: usage("gpt-3.5-turbo-instruct", input: 5, output: 7))

        static let openAIChatStream = SampleAnswer(
            name: "OpenAI chat SSE with include_usage",
            body: """
                data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1754321020,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_9","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

                data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1754321020,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_9","choices":[{"index":0,"delta":{"content":"Sure: {\\"a\\": [1, 2]}"},"logprobs":null,"finish_reason":null}],"usage":null}

                data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1754321020,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_9","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

                data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1754321020,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_9","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

                data: [DONE]


                """,
            headers: .sse, expected: usage("gpt-4o-2024-08-06", input: 19, output: 10))

        static let openAIChatStreamWithoutUsage = SampleAnswer(
            name: "OpenAI chat SSE without include_usage",
            body: """
                data: {"id":"chatcmpl-C2","object":"chat.completion.chunk","created":1754321030,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}

                data: {"id":"chatcmpl-C2","object":"chat.completion.chunk","created":1754321030,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}

                data: [DONE]


                """,
            headers: .sse, expected: .noUsage)

        /// vLLM with continuous usage stats: every chunk holds the usage so far.
        static let vLLMContinuousUsage = SampleAnswer(
            name: "vLLM SSE with cumulative usage in every chunk",
            body: """
                data: {"id":"cmpl-4f1","object":"chat.completion.chunk","created":1754321040,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":12,"completion_tokens":0}}

                data: {"id":"cmpl-4f1","object":"chat.completion.chunk","created":1754321040,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":13,"completion_tokens":1}}

                data: {"id":"cmpl-4f1","object":"chat.completion.chunk","created":1754321040,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":14,"completion_tokens":2}}

                data: {"id":"cmpl-4f1","object":"chat.completion.chunk","created":1754321040,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[],"usage":{"prompt_tokens":12,"total_tokens":14,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":8}}}

                data: [DONE]


                """,
            headers: .sse, expected: usage("meta-llama/Llama-3.1-8B-Instruct", input: 12, output: 2, cached: 8))

        static let responses = SampleAnswer(
            name: "OpenAI Responses JSON",
            body: """
                {"id":"resp_68a1f","object":"response","created_at":1754321100,"status":"completed","error":null,\
                "model":"o4-mini-2025-04-16","output":[{"id":"rs_1","type":"reasoning","summary":[]},\
                {"id":"msg_1","type":"message","status":"completed","role":"assistant",\
                "content":[{"type":"output_text","text":"Bonjour !","annotations":[]}]}],\
                "reasoning":{"effort":"medium","summary":null},"temperature":1.0,"top_p":1.0,\
                "usage":{"input_tokens":320,"input_tokens_details":{"cached_tokens":256},"output_tokens":900,\
                "output_tokens_details":{"reasoning_tokens":640},"total_tokens":1220},"user":null,"metadata":{}}
                """,
            headers: .json, expected: usage("o4-mini-2025-04-16", input: 320, output: 900, cached: 256, reasoning: 640))

        static let responsesStream = SampleAnswer(
            name: "OpenAI Responses SSE",
            body: """
                event: response.created
                data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_9","object":"response","created_at":1754321200,"status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

                event: response.in_progress
                data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_9","object":"response","created_at":1754321200,"status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null}}

                event: response.output_text.delta
                data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_9","output_index":0,"content_index":0,"delta":"Salut"}

                event: response.output_text.done
                data: {"type":"response.output_text.done","sequence_number":5,"item_id":"msg_9","output_index":0,"content_index":0,"text":"Salut"}

                event: response.completed
                data: {"response":{"id":"resp_9","object":"response","created_at":1754321200,"status":"completed","model":"gpt-4.1-2025-04-14","output":[{"id":"msg_9","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Salut","annotations":[]}]}],"usage":{"input_tokens":41,"input_tokens_details":{"cached_tokens":32},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}},"sequence_number":9,"type":"response.completed"}


                """,
            headers: .sse, expected: usage("gpt-4.1-2025-04-14", input: 41, output: 7, cached: 32))

        static let anthropic = SampleAnswer(
            name: "Anthropic Messages JSON",
            body: """
                {"id":"msg_01Xb","type":"message","role":"assistant","model":"claude-sonnet-4-20250514",\
                "content":[{"type":"text","text":"Voici"},{"type":"tool_use","id":"toolu_1","name":"lookup","input":{"q":{"deep":[{"usage":1}]}}}],\
                "stop_reason":"tool_use","stop_sequence":null,\
                "usage":{"input_tokens":12,"cache_creation_input_tokens":300,"cache_read_input_tokens":4000,\
                "cache_creation":{"ephemeral_5m_input_tokens":300,"ephemeral_1h_input_tokens":0},"output_tokens":85,"service_tier":"standard"}}
                """,
            headers: .json, expected: usage("claude-sonnet-4-20250514", input: 4312, output: 85, cached: 4000, cacheWrite: 300))

        static let anthropicStream = SampleAnswer(
            name: "Anthropic Messages SSE",
            body: """
                event: message_start
                data: {"type":"message_start","message":{"id":"msg_02","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":2048,"output_tokens":1}}}

                event: content_block_start
                data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

                event: ping
                data: {"type": "ping"}

                event: content_block_delta
                data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}

                event: content_block_stop
                data: {"type":"content_block_stop","index":0}

                event: message_delta
                data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":17}}

                event: message_delta
                data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":42,"cache_read_input_tokens":null}}

                event: message_stop
                data: {"type":"message_stop"}


                """,
            headers: .sse, expected: usage("claude-3-5-haiku-20241022", input: 2073, output: 42, cached: 2048))

        static let all = [
            openAIChat, openAICompletions, openAIChatStream, openAIChatStreamWithoutUsage, vLLMContinuousUsage,
            responses, responsesStream, anthropic, anthropicStream,
        ]
    }
    @Suite struct AnswerFormatTests {
        @Test(arguments: SampleAnswers.all)
        func readsTheSameWhereverTheBodyIsSplit(answer: SampleAnswer) {
            #expect(readingAtEverySplit(Array(answer.body.utf8), headers: answer.headers) == answer.expected)
        }

        @Test(arguments: SampleAnswers.all)
        func readsGzipWhereverTheCompressedBodyIsSplit(answer: SampleAnswer) {
            var headers = answer.headers
            headers.contentEncoding = "gzip"
            #expect(readingAtEverySplit(Gzip.compress(Array(answer.body.utf8), level: 6), headers: headers) == answer.expected)
        }

        /// Envoy may skip the response headers: the first byte tells JSON from SSE.
        @Test(arguments: SampleAnswers.all)
        func readsWithoutHeaders(answer: SampleAnswer) {
            #expect(reading(Array(("\r\n " + answer.body).utf8), headers: nil) == answer.expected)
        }

        @Test(arguments: ["\r\n", "\r"])
        func sseLineEndsMayBeCRLFOrCR(lineEnd: String) {
            for answer in [SampleAnswers.openAIChatStream, SampleAnswers.anthropicStream, SampleAnswers.responsesStream] {
                let body = answer.body.replacingOccurrences(of: "\n", with: lineEnd)
                #expect(readingAtEverySplit(Array(body.utf8), headers: answer.headers) == answer.expected, "\(answer.name)")
            }
        }

        @Test func sseCommentsFieldsWithoutSpaceAndMultiLineDataAreRead() {
            let body = """
                : keep-alive comment
                id: 7
                retry: 3000
                event:message_start
                data:{"type":"message_start",
                data: "message":{"model":"claude-opus-4-1","usage":

                """ + "data:\n" + """
                data: {"input_tokens":3,"output_tokens":1}}}

                :another comment

                """
            #expect(readingAtEverySplit(Array(body.utf8), headers: .sse) == usage("claude-opus-4-1", input: 3, output: 1))
        }

        /// The event name stands in for a missing `type` member.
        @Test func theEventNameTellsTheEventWhenTheDataHasNoType() {
            let body = """
                event: response.completed
                data: {"response":{"model":"gpt-4.1","usage":{"input_tokens":4,"output_tokens":2}}}


                """
            #expect(reading(Array(body.utf8), headers: .sse) == usage("gpt-4.1", input: 4, output: 2))
        }

        /// Usage in a Responses event that is not the final one is not read.
        @Test func responsesUsageCountsOnlyInTheFinalEvent() {
            let body = """
                data: {"type":"response.in_progress","response":{"model":"gpt-4.1","usage":{"input_tokens":4,"output_tokens":1}}}


                """
            #expect(reading(Array(body.utf8), headers: .sse) == .noUsage)
            let incomplete = body.replacingOccurrences(of: "response.in_progress", with: "response.incomplete")
            #expect(reading(Array(incomplete.utf8), headers: .sse) == usage("gpt-4.1", input: 4, output: 1))
        }

        /// message_delta is cumulative: the last one replaces what it gives, keeps the rest.
        @Test func anthropicDeltaReplacesOnlyTheFieldsItGives() {
            let body = """
                data: {"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":100,"cache_creation_input_tokens":50,"cache_read_input_tokens":0,"output_tokens":1}}}

                data: {"type":"message_delta","usage":{"output_tokens":30}}

                data: {"type":"message_delta","usage":{"input_tokens":110,"cache_read_input_tokens":20,"output_tokens":31}}


                """
            #expect(reading(Array(body.utf8), headers: .sse) == usage("claude-x", input: 180, output: 31, cached: 20, cacheWrite: 50))
        }

        @Test func modelNamesAreUnescaped() {
            let body = #"{"model":"gpt\u002d4o \ud83d\ude00\/x","usage":{"prompt_tokens":1,"completion_tokens":2}}"#
            #expect(reading(Array(body.utf8), headers: .json) == usage("gpt-4o 😀/x", input: 1, output: 2))
        }

        @Test func openAIPromptCacheWritesAreCountedAsPartOfInput() {
            let body = #"{"model":"m","usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4,"cache_write_tokens":5}}}"#
            #expect(reading(Array(body.utf8), headers: .json) == usage("m", input: 10, output: 2, cached: 4, cacheWrite: 5))
        }

        @Test func nullUsageObjectsAreNoUsageYet() {
            let body = #"{"model":"m","usage":null}"#
            #expect(reading(Array(body.utf8), headers: .json) == .noUsage)
            let details = #"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":null}}"#
            #expect(reading(Array(details.utf8), headers: .json) == usage("m", input: 3, output: 1))
        }

        /// A JSON answer is read once its object closes, not before.
        @Test func aJSONAnswerCountsOnlyWhenComplete() {
            let body = Array(SampleAnswers.openAIChat.body.utf8)
            #expect(reading(Array(body.dropLast()), headers: .json) == .noUsage)
        }
    }
}
