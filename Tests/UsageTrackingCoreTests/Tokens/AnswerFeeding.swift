import Testing

@testable import UsageTrackingCore

/// The answer usage reader's tests (`swift test --filter Tokens`).
@Suite enum Tokens {}

/// The response headers as Envoy would pass them on.
struct AnswerHeaders: Sendable {
    var status: Int? = 200
    var contentType: String?
    var contentEncoding: String?

    static let json = AnswerHeaders(contentType: "application/json")
    static let sse = AnswerHeaders(contentType: "text/event-stream")
}

/// Feeds `body` cut at `cuts` (ascending offsets) to a fresh reader.
func reading(
    _ body: [UInt8], headers: AnswerHeaders?, limits: AnswerLimits = AnswerLimits(), cuts: some Sequence<Int> = []
) -> AnswerReading {
    let reader = AnswerUsageReader(limits: limits)
    if let headers {
        reader.responseHeaders(status: headers.status, contentType: headers.contentType, contentEncoding: headers.contentEncoding)
    }
    body.withUnsafeBytes { all in
        var start = 0
        for cut in cuts {
            reader.body(UnsafeRawBufferPointer(rebasing: all[start..<cut]))
            start = cut
        }
        reader.body(UnsafeRawBufferPointer(rebasing: all[start...]))
    }
    return reader.reading
}

/// The reading of `body` given whole, after checking that every split into two pieces and the
/// byte-by-byte feed give the same.
func readingAtEverySplit(_ body: [UInt8], headers: AnswerHeaders?, limits: AnswerLimits = AnswerLimits()) -> AnswerReading {
    let whole = reading(body, headers: headers, limits: limits)
    for cut in 1..<max(body.count, 1) {
        let split = reading(body, headers: headers, limits: limits, cuts: [cut])
        if split != whole {
            Issue.record("split at byte \(cut) of \(body.count) reads \(split), whole reads \(whole)")
            break
        }
    }
    let byByte = reading(body, headers: headers, limits: limits, cuts: 1..<max(body.count, 1))
    #expect(byByte == whole, "byte by byte")
    return whole
}

func usage(_ model: String, input: UInt64, output: UInt64, cached: UInt64 = 0, cacheWrite: UInt64 = 0, reasoning: UInt64 = 0)
    -> AnswerReading
{
    .usage(AnswerUsage(model: model, tokens: TokenCounts(input: input, output: output, cachedInput: cached, cacheWrite: cacheWrite, reasoning: reasoning)))
}

/// A body of `total` bytes made by repeating `pattern` after `head` and ending in `tail`, fed in
/// `chunkSize` pieces built one at a time (never held whole).
func readingOfLargeBody(
    head: [UInt8], pattern: [UInt8], tail: [UInt8], total: Int, chunkSize: Int = 64 << 10, headers: AnswerHeaders?
) -> AnswerReading {
    let reader = AnswerUsageReader()
    if let headers {
        reader.responseHeaders(status: headers.status, contentType: headers.contentType, contentEncoding: headers.contentEncoding)
    }
    let middle = total - head.count - tail.count
    var chunk = [UInt8]()
    chunk.reserveCapacity(chunkSize)
    var position = 0  // offset in the whole body
    while position < total {
        chunk.removeAll(keepingCapacity: true)
        while chunk.count < chunkSize, position < total {
            let room = chunkSize - chunk.count
            let taken: Int
            if position < head.count {
                taken = min(room, head.count - position)
                chunk += head[position..<position + taken]
            } else if position < head.count + middle {
                let inPattern = (position - head.count) % pattern.count
                taken = min(room, pattern.count - inPattern, head.count + middle - position)
                chunk += pattern[inPattern..<inPattern + taken]
            } else {
                let inTail = position - head.count - middle
                taken = min(room, tail.count - inTail)
                chunk += tail[inTail..<inTail + taken]
            }
            position += taken
        }
        chunk.withUnsafeBytes { reader.body($0) }
    }
    return reader.reading
}
