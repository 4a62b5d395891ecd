// Times the core's hot path and exposition in a release build, with Foundation's JSONDecoder
// measured in the same run as the reference. Prints figures; asserts nothing.
//
//   swift run -c release usage-tracking-core-benchmark [--only NAME] [--scale N] [--iterations N]
//
// `--only track` runs just the hot path, for `valgrind --tool=callgrind`; `--only
// track-with-request-id` adds what /track does for an `x-request-id` (its digest and the window's
// claim); `--only request-id-memory` measures a full window's memory. `--iterations` sets the
// callback count of the first two, so that two runs differenced give the instructions per
// callback without the startup:
//
//   valgrind --tool=callgrind --toggle-collect='*7measure_10operations*' \
//       .build/release/usage-tracking-core-benchmark --only track --iterations 100000
import Foundation
import UsageTrackingCore

let arguments = CommandLine.arguments
let only = arguments.firstIndex(of: "--only").map { arguments[$0 + 1] }
let scale = arguments.firstIndex(of: "--scale").flatMap { Int(arguments[$0 + 1]) } ?? 1
let iterationsGiven = arguments.firstIndex(of: "--iterations").flatMap { Int(arguments[$0 + 1]) }

// Not inlined, so that callgrind can count only what runs inside it (`--toggle-collect`).
@inline(never)
func measure(_ name: String, operations: Int, _ body: () -> Void) -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    body()
    let nanoseconds = Double(DispatchTime.now().uptimeNanoseconds - start)
    let perOperation = nanoseconds / Double(operations)
    print("\(name.padding(toLength: 52, withPad: " ", startingAt: 0)) \(String(format: "%12.1f", perOperation)) ns/op  (\(operations) ops)")
    return perOperation
}

let bodies: [[UInt8]] = (0..<100).map {
    Array(#"{"groups":"premium","host":"localhost:8000","method":"POST","path":"/v1/completions","user":"premiumuser\#($0)"}"#.utf8)
}

if only == nil || only == "track" {
    let decoder = CallbackDecoder()
    let metrics = UsageMetrics()
    let iterations = iterationsGiven ?? 1_000_000 * scale / (only == nil ? 1 : 10)
    let ours = measure("decode + validate + increment (CallbackDecoder)", operations: iterations) {
        for i in 0..<iterations {
            let callback = try! decoder.decode(bodies[i % 100], contentType: "application/json")
            metrics.count(callback)
        }
    }
    if only == nil {
        struct Body: Decodable { var user: String; var groups: String; var path: String; var method: String; var host: String }
        let reference = JSONDecoder()
        let datas = bodies.map { Data($0) }
        let foundation = measure("reference: JSONDecoder + increment", operations: iterations / 10) {
            for i in 0..<iterations / 10 {
                let body = try! reference.decode(Body.self, from: datas[i % 100])
                metrics.requests.increment([body.user, body.groups, body.path])
            }
        }
        print("ratio: CallbackDecoder path takes \(String(format: "%.2f", ours / foundation))x the time of the JSONDecoder path")
    }
}

// The same callbacks, each with a unique request id, as /track handles one (memory only): the
// id's digest, then its claim in a window at its steady state (600 s at 1,000 callbacks a second,
// the defaults' window, already full when timing starts). The ids are made before timing, as
// the server gets them from the request's headers.
if only == nil || only == "track-with-request-id" {
    let decoder = CallbackDecoder()
    let metrics = UsageMetrics()
    let iterations = iterationsGiven ?? 1_000_000 * scale / (only == nil ? 1 : 10)
    let perSecond = 1_000, window: Int64 = 600, start: Int64 = 1_700_000_000
    let requestIDs = RequestIDWindow(window: window, maxIDs: 1_000_000)
    for i in 0..<Int(window) * perSecond {
        requestIDs.restore(RequestIDWindow.digest("earlier-\(i)"), at: start - window + Int64(i / perSecond))
    }
    // Shaped like the UUIDs gateways send.
    let ids = (0..<iterations).map { "5f0c7d2e-9b1a-4c3d-8e6f-\(String(100_000_000_000 + $0))" }
    let withID = measure("decode + validate + request id + increment", operations: iterations) {
        for i in 0..<iterations {
            let callback = try! decoder.decode(bodies[i % 100], contentType: "application/json")
            guard requestIDs.claim(RequestIDWindow.digest(ids[i]), at: start + Int64(i / perSecond)) else { fatalError("a unique id was a duplicate") }
            metrics.count(callback)
        }
    }
    print("request ids remembered: \(requestIDs.count), evicted: \(requestIDs.evictions) (\(String(format: "%.0f", withID)) ns/op)")
    // The id's two costs apart: its digest, then its claim in the same (now fuller) window.
    var digests = [UInt64](repeating: 0, count: iterations)
    let digest = measure("request id: digest alone (SHA-256)", operations: iterations) {
        for i in 0..<iterations { digests[i] = RequestIDWindow.digest(ids[i]) }
    }
    let later = start + Int64(iterations / perSecond) + 1
    let claim = measure("request id: claim alone", operations: iterations) {
        for i in 0..<iterations {
            guard requestIDs.claim(digests[i] &+ 1, at: later + Int64(i / perSecond)) else { fatalError("a unique id was a duplicate") }
        }
    }
    print("request id: digest \(String(format: "%.0f", digest)) ns + claim \(String(format: "%.0f", claim)) ns")
}

// What a full window of request ids holds in memory: a million ids, then two million more that
// evict the oldest, as a busy gateway's do, so that the claim order reaches its largest (the
// process's resident memory before and after).
if only == nil || only == "request-id-memory" {
    func residentBytes() -> Int {
        Int(try! String(contentsOfFile: "/proc/self/statm", encoding: .utf8).split(separator: " ")[1])! * 4096
    }
    let before = residentBytes()
    let requestIDs = RequestIDWindow(window: 600, maxIDs: 1_000_000)
    for i in 0..<3_000_000 {
        _ = requestIDs.claim(RequestIDWindow.digest("5f0c7d2e-9b1a-4c3d-8e6f-\(100_000_000_000 + i)"), at: 1_700_000_000 + Int64(i / 10_000))
    }
    let grown = residentBytes() - before
    print("request ids: \(requestIDs.count) remembered, \(requestIDs.evictions) evicted; resident memory grew \(grown / 1_000_000) MB (\(grown / requestIDs.count) bytes an id)")
}

if only == nil || only == "exposition" {
    let metrics = UsageMetrics()
    let series = 100_000 * scale
    var chunkTimes: [Double] = []
    for chunk in 0..<10 {
        chunkTimes.append(
            measure("insert distinct users \(chunk * series / 10)..<\((chunk + 1) * series / 10)", operations: series / 10) {
                for i in chunk * series / 10..<(chunk + 1) * series / 10 {
                    metrics.requests.increment(["distinct\(i)", "bench", "/v1/completions"])
                }
            })
    }
    // Halves rather than single tenths: a tenth that happens to contain a table resize is slower.
    let firstHalf = chunkTimes[..<5].reduce(0, +), secondHalf = chunkTimes[5...].reduce(0, +)
    print("ratio: second half of the inserts took \(String(format: "%.2f", secondHalf / firstHalf))x the time of the first half (1.0 = linear)")
    var text: [UInt8] = []
    let render = measure("render \(series) series", operations: 1) { text = metrics.render() }
    var compressed: [UInt8] = []
    let zip = measure("gzip the rendering", operations: 1) { compressed = Gzip.compress(text) }
    print("rendering: \(text.count) bytes, gzip \(compressed.count) bytes; render \(String(format: "%.1f", render / 1e6)) ms, gzip \(String(format: "%.1f", zip / 1e6)) ms")
}

// The status page's costs: recording a callback in the per-second rings (on /track's path), and
// ranking label values over every series (off the loops), split into the copy and each label.
if only == nil || only == "status" {
    let rates = CallbackRates()
    let records = 10_000_000
    _ = measure("CallbackRates.record (clock + atomic add)", operations: records) {
        for _ in 0..<records { rates.record(.accepted) }
    }
    let family = CounterFamily(name: "llm_requests_total", help: "h", labelNames: ["user", "groups", "path"])
    let series = 100_000 * scale
    for i in 0..<series { family.increment(["distinct\(i)", "group\(i % 10)", "/v1/path\(i % 100)"]) }
    var copied: [(labels: LabelValues, value: UInt64)] = []
    let copy = measure("copy \(series) series (unsorted)", operations: 1) { copied = family.series() }
    for (index, name) in family.labelNames.enumerated() {
        let alone = copied.map { (labels: [$0.labels[index]], value: $0.value) }
        _ = measure("rank by \(name) alone", operations: 1) { _ = LabelRanking.rank(alone, labelNames: [name], top: 20) }
    }
    _ = measure("rank all three labels from the copy", operations: 1) { _ = LabelRanking.rank(copied, labelNames: family.labelNames, top: 20) }
    copied = []
    let rank = measure("rank all three labels stripe by stripe (as served)", operations: 1) { _ = LabelRanking.rank(family, top: 20) }
    let lookup = measure("one user's series (scan under the stripe locks)", operations: 1) {
        _ = family.series { $0[0].hasSameBytes(as: "distinct12345") }
    }
    print("status at \(series) series: ranking as served \(String(format: "%.0f", rank / 1e6)) ms (a full copy alone takes \(String(format: "%.0f", copy / 1e6)) ms); user lookup \(String(format: "%.0f", lookup / 1e6)) ms")
}

// Reading token usage out of a streamed answer (ext_proc's per-chunk cost): an 8 MB OpenAI SSE
// stream fed in 16 KiB chunks, plain and gzip.
if only == nil || only == "tokens" {
    // Each event carries different words, as a real stream does (gzip would shrink copies a thousandfold).
    var stream: [UInt8] = []
    var word = 0
    while stream.count < 8 << 20 {
        word = (word &* 1_103_515_245 &+ 12345) & 0x7fff_ffff
        stream += Array(
            #"data: {"id":"chatcmpl-B","object":"chat.completion.chunk","created":1754321020,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":" w\#(word % 50_000)"},"finish_reason":null}],"usage":null}"#
                .utf8) + Array("\n\n".utf8)
    }
    stream += Array("data: {\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n".utf8)
    for (name, body, encoding) in [("SSE", stream, nil), ("SSE gzip", Gzip.compress(stream, level: 6), "gzip")] {
        let rounds = 5 * scale
        var outcome = AnswerReading.noUsage
        let perRound = measure("read usage of \(stream.count >> 20) MiB \(name) in 16 KiB chunks", operations: rounds) {
            for _ in 0..<rounds {
                let reader = AnswerUsageReader()
                reader.responseHeaders(status: 200, contentType: "text/event-stream", contentEncoding: encoding)
                body.withUnsafeBytes { all in
                    for start in stride(from: 0, to: all.count, by: 16 << 10) {
                        reader.body(UnsafeRawBufferPointer(rebasing: all[start..<min(start + (16 << 10), all.count)]))
                    }
                }
                outcome = reader.reading
            }
        }
        print("tokens: \(name) \(String(format: "%.2f", perRound / 1e6 / Double(stream.count) * 1_048_576)) ms per MiB of answer, \(body.count) bytes on the wire (\(outcome))")
    }
}
