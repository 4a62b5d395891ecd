import Testing

@testable import UsageTrackingCore

extension Tokens {
    /// Large bodies, gzip bombs and broken gzip: bounded work, exact outcomes.
    @Suite struct AnswerSizeTests {
        static let gzipJSON = AnswerHeaders(contentType: "application/json", contentEncoding: "gzip")

        /// One SSE data line of 10 MB (a long content string) still reads, fed in 64 KiB chunks.
        @Test func aTenMegabyteDataLineReads() {
            let head = Array(#"data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":""#.utf8)
            let tail = Array(#""}}],"usage":{"prompt_tokens":7,"completion_tokens":3000000}}"#.utf8) + Array("\n\ndata: [DONE]\n\n".utf8)
            let pattern = Array(#"lorem ipsum \"dolor\" sit \u00e9 amet, "#.utf8)
            // Whole patterns only, so no escape is cut in two by the tail.
            let total = head.count + (10 << 20) / pattern.count * pattern.count + tail.count
            let result = readingOfLargeBody(head: head, pattern: pattern, tail: tail, total: total, headers: .sse)
            #expect(result == usage("gpt-4o", input: 7, output: 3_000_000))
        }

        /// A 100 MB stream of ordinary chunks, the usage in the last event.
        @Test func aHundredMegabyteStreamReads() {
            let event = Array(
                #"data: {"id":"chatcmpl-L","object":"chat.completion.chunk","created":1754321020,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"some words of the answer, and more words"},"finish_reason":null}],"usage":null}"#
                    .utf8) + Array("\n\n".utf8)
            let tail = Array(#"data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":900,"completion_tokens":25000000}}"#.utf8)
                + Array("\n\ndata: [DONE]\n\n".utf8)
            let total = 100_000_000 / event.count * event.count + tail.count
            let result = readingOfLargeBody(head: [], pattern: event, tail: tail, total: total, headers: .sse)
            #expect(result == usage("gpt-4o", input: 900, output: 25_000_000))
        }

        /// Spaces inflate about a thousandfold: refused once past the first MiB.
        @Test func aGzipBombIsRefusedByItsRatio() {
            let bomb = Gzip.compress(Array("{\"a\":\"".utf8) + [UInt8](repeating: 0x20, count: 8 << 20) + Array("\"}".utf8), level: 9)
            let result = reading(bomb, headers: Self.gzipJSON, cuts: stride(from: 4096, to: bomb.count, by: 4096))
            #expect(result == .unreadable("gzip body inflates to more than 200 times its compressed size"))
        }

        @Test func inflatedSizeIsBounded() {
            // Ordinary JSON of about 120 KiB: below the ratio bound, over a 64 KiB size bound.
            var body = Array(#"{"model":"m","items":["#.utf8)
            for index in 0..<6000 { body += Array("\"item \(index * 7919 % 100_003)\",".utf8) }
            body += Array(#""end"],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#.utf8)
            let compressed = Gzip.compress(body)
            let limits = AnswerLimits(maxInflatedBytes: 64 << 10)
            #expect(reading(compressed, headers: Self.gzipJSON, limits: limits) == .unreadable("gzip body inflates to more than 65536 bytes"))
            #expect(reading(compressed, headers: Self.gzipJSON) == usage("m", input: 1, output: 1))
        }

        @Test func brokenGzipIsUnreadable() {
            #expect(reading(Array("{\"plain\":1}".utf8), headers: Self.gzipJSON) == .unreadable("bad gzip: incorrect header check"))
            var compressed = Gzip.compress(Array(SampleAnswers.openAIChat.body.utf8))
            compressed[compressed.count - 6] ^= 0xFF  // inside the CRC-32 trailer
            #expect(reading(compressed, headers: Self.gzipJSON) == .unreadable("bad gzip: incorrect data check"))
        }

        /// RFC 1952 allows several members one after another; they read as one body.
        @Test func concatenatedGzipMembersRead() {
            let body = Array(SampleAnswers.anthropicStream.body.utf8)
            let half = body.count / 2
            let compressed = Gzip.compress(Array(body[..<half])) + Gzip.compress(Array(body[half...]))
            let headers = AnswerHeaders(contentType: "text/event-stream", contentEncoding: "gzip")
            #expect(readingAtEverySplit(compressed, headers: headers) == SampleAnswers.anthropicStream.expected)
        }

        /// A truncated gzip body is simply "so far": whatever usage came before the cut.
        @Test func truncatedGzipReadsWhatArrived() {
            let compressed = Gzip.compress(Array(SampleAnswers.openAIChatStream.body.utf8))
            let headers = AnswerHeaders(contentType: "text/event-stream", contentEncoding: "gzip")
            #expect(reading(Array(compressed.prefix(20)), headers: headers) == .noUsage)
        }
    }
}
