import Foundation
import Testing

@testable import UsageTrackingCore

@Suite struct ExpositionTests {
    @Test func familyAndSamplesFollowTheTextFormat() {
        var writer = ExpositionWriter()
        writer.family("x_total", help: "Help with \\ and\nnewline \"kept\".", type: .counter)
        writer.sample("x_total", labels: ["a", "b"], values: [#"q"uote"#, "back\\slash\nline"], value: UInt64(12_345_678_901))
        writer.sample("x_total", value: UInt64(0))
        writer.family("g", help: "g", type: .gauge)
        writer.sample("g", value: 0.25)
        writer.sample("g", value: 3.0)
        writer.sample("g", value: Double.infinity)
        let expected = #"""
            # HELP x_total Help with \\ and\nnewline "kept".
            # TYPE x_total counter
            x_total{a="q\"uote",b="back\\slash\nline"} 12345678901
            x_total 0
            # HELP g g
            # TYPE g gauge
            g 0.25
            g 3
            g +Inf

            """#
        #expect(String(decoding: writer.bytes, as: UTF8.self) == expected)
    }

    @Test func renderHasEveryFamilyOnceInAStableOrder() {
        let metrics = UsageMetrics()
        metrics.requests.increment(["bob", "free", "/v1/chat"])
        metrics.requests.increment(["alice", "premium", "/v1/completions"])
        metrics.requests.increment(["alice", "premium", "/v1/completions"])
        metrics.record(.accepted)
        metrics.observe(route: 0, nanoseconds: 300_000)
        let text = String(decoding: metrics.render(), as: UTF8.self)
        let types = text.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { $0.split(separator: " ")[2] }
        #expect(Set(types).count == types.count)
        #expect(
            types == [
                "llm_requests_total", "usage_tracking_callbacks_total", "usage_tracking_http_request_duration_seconds",
                "usage_tracking_series", "usage_tracking_series_limit", "usage_tracking_label_overflow_total",
                "usage_tracking_series_overflow_total", "usage_tracking_label_values", "usage_tracking_label_values_limit",
                "usage_tracking_log_dropped_total", "usage_tracking_build_info", "process_cpu_seconds_total", "process_max_fds",
                "process_open_fds", "process_resident_memory_bytes", "process_start_time_seconds", "process_virtual_memory_bytes",
            ])
        #expect(
            text.contains(
                """
                llm_requests_total{user="alice",groups="premium",path="/v1/completions"} 2
                llm_requests_total{user="bob",groups="free",path="/v1/chat"} 1

                """))
        #expect(text.contains(#"usage_tracking_callbacks_total{outcome="unauthorized"} 0"#))
        #expect(text.contains(#"usage_tracking_http_request_duration_seconds_bucket{route="track",le="0.00025"} 0"#))
        #expect(text.contains(#"usage_tracking_http_request_duration_seconds_bucket{route="track",le="0.0005"} 1"#))
        #expect(text.contains(#"usage_tracking_http_request_duration_seconds_bucket{route="track",le="+Inf"} 1"#))
        #expect(text.contains(#"usage_tracking_http_request_duration_seconds_sum{route="track"} 0.0003"#))
        #expect(text.contains(#"usage_tracking_series{metric="llm_requests_total"} 2"#))
        #expect(text.contains(#"usage_tracking_build_info{version="\#(UsageMetrics.version)",swift="#))
    }

    @Test func gzipRoundTripsThroughTheGzipTool() throws {
        let metrics = UsageMetrics()
        for i in 0..<2000 { metrics.requests.increment(["user\(i)", "g", "/p"]) }
        let text = metrics.render()
        let compressed = Gzip.compress(text)
        #expect(compressed.count * 5 < text.count)
        #expect(Array(compressed.prefix(2)) == [0x1F, 0x8B])
        let gunzip = Process()
        gunzip.executableURL = URL(fileURLWithPath: "/bin/sh")
        gunzip.arguments = ["-c", "gzip -dc"]
        let input = Pipe()
        let output = Pipe()
        gunzip.standardInput = input
        gunzip.standardOutput = output
        try gunzip.run()
        input.fileHandleForWriting.write(Data(compressed))
        try input.fileHandleForWriting.close()
        let decompressed = output.fileHandleForReading.readDataToEndOfFile()
        gunzip.waitUntilExit()
        #expect(gunzip.terminationStatus == 0)
        #expect(Array(decompressed) == text)
    }

    @Test func processMetricsAreRead() throws {
        let process = ProcessMetrics.read()
        let rss = try #require(process.residentMemoryBytes)
        #expect(rss > 1_000_000)
        #expect(try #require(process.virtualMemoryBytes) >= rss)
        #expect(try #require(process.openFileDescriptors) >= 3)
        #expect(try #require(process.maximumFileDescriptors) >= process.openFileDescriptors!)
        let start = try #require(process.startTimeSeconds)
        #expect(abs(start - Date().timeIntervalSince1970) < 3600)
        #expect(try #require(process.cpuSeconds) >= 0)
    }
}
