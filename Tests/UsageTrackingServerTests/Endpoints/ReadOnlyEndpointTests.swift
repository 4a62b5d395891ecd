import NIOCore
import NIOEmbedded
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

@Suite struct ReadOnlyEndpointTests {
    @Test func metricsServeTheTextFormat() throws {
        let harness = try PipelineHarness()
        _ = try harness.send(PipelineHarness.post(#"{"user":"a\"b","groups":"g","path":"/p"}"#))
        let response = try harness.send(PipelineHarness.get("/metrics"))[0]
        #expect(response.status == 200)
        #expect(response.header("content-type") == "text/plain; version=0.0.4; charset=utf-8")
        #expect(response.header("content-encoding") == nil)
        #expect(response.text.contains(#"llm_requests_total{user="a\"b",groups="g",path="/p"} 1"#))
        #expect(response.text.contains(#"usage_tracking_http_request_duration_seconds_count{route="track"} 1"#))
    }

    @Test(arguments: [("gzip", true), ("deflate, gzip;q=0.5", true), ("gzip;q=0", false), ("br", false)])
    func metricsAreGzippedWhenAccepted(acceptEncoding: String, gzipped: Bool) throws {
        let harness = try PipelineHarness()
        let response = try harness.send(PipelineHarness.get("/metrics", headers: ["Accept-Encoding: \(acceptEncoding)"]))[0]
        #expect(response.header("content-encoding") == (gzipped ? "gzip" : nil))
        #expect(response.header("vary") == "accept-encoding")
        #expect((Array(response.body.prefix(2)) == [0x1F, 0x8B]) == gzipped)
    }

    @Test func healthAndReadiness() throws {
        let harness = try PipelineHarness(ready: false)
        let before = try harness.send(PipelineHarness.get("/healthz") + PipelineHarness.get("/readyz"))
        #expect(before.map(\.status) == [200, 503])
        #expect(before.map(\.text) == ["ok\n", "not ready\n"])
        harness.state.ready.store(true, ordering: .relaxed)
        let after = try harness.send(PipelineHarness.get("/readyz"))
        #expect(after.map(\.status) == [200])
        #expect(after[0].text == "ready\n")
    }

    @Test func debugViewReportsConfigurationAndCounts() throws {
        let harness = try PipelineHarness()
        _ = try harness.send(PipelineHarness.post(#"{"user":"u","groups":"g"}"#))
        let response = try harness.send(PipelineHarness.get("/debug"))[0]
        #expect(response.status == 200)
        #expect(response.header("content-type") == "application/json")
        for fragment in [
            #"{"version":"\#(UsageMetrics.version)","uptime_seconds":"#, #""max_body_bytes":65536"#, #""callback_secret":"unset""#,
            #""authentication":"off""#, #""series":{"llm_requests_total":1}"#, #""callbacks":{"accepted":1,"#,
        ] {
            #expect(response.text.contains(fragment))
        }
    }

    @Test func debugCanBeTurnedOff() throws {
        let harness = try PipelineHarness { $0.debugEnabled = false }
        let response = try harness.send(PipelineHarness.get("/debug"))[0]
        #expect(response.status == 404)
        #expect(response.text == #"{"error":"not found","problems":["/debug is turned off (--no-debug)"]}"# + "\n")
    }

    @Test func unknownPathIs404() throws {
        let harness = try PipelineHarness()
        let response = try harness.send(PipelineHarness.get("/nope?x=1"))[0]
        #expect(response.status == 404)
        #expect(response.text == #"{"error":"not found","problems":["no route for /nope"]}"# + "\n")
    }

    @Test func wrongMethodOnReadOnlyEndpointIs405() throws {
        let harness = try PipelineHarness()
        let response = try harness.send(PipelineHarness.post("", path: "/metrics"))[0]
        #expect(response.status == 405)
        #expect(response.header("allow") == "GET, HEAD")
        #expect(response.text == #"{"error":"method not allowed","problems":["POST /metrics is not allowed; use GET"]}"# + "\n")
    }

    @Test func headHasHeadersButNoBody() throws {
        let harness = try PipelineHarness()
        try harness.channel.writeInbound(ByteBuffer(string: PipelineHarness.get("/healthz", method: "HEAD")))
        let raw = try #require(try harness.channel.readOutbound(as: ByteBuffer.self))
        #expect(String(buffer: raw) == "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 3\r\n\r\n")
    }
}
