import Foundation
import Testing

/// The binary against the real consumers: Prometheus scraping it, promtool linting it.
/// Serialized: each test starts processes, and the machine has two cores.
@Suite(.serialized) struct PrometheusEndToEndTests {
    /// The original README's loop: 15 callbacks for freeuser1, 15 for premiumuser1, read back
    /// through Prometheus's HTTP API. Bad callbacks sent alongside must not count.
    @Test func originalLoopReadBackThroughPrometheus() throws {
        let service = try ServiceUnderTest()
        defer { service.process.stop() }
        let prometheus = try PrometheusServer(scraping: service.port)
        defer { prometheus.stop() }

        let hostile = "evil\"user\\with\nnewline-}{,=é"
        let hostileBody = #"{"groups":"free","path":"/v1/completions","user":"evil\"user\\with\nnewline-}{,=é"}"#
        for (user, group) in [("freeuser1", "free"), ("premiumuser1", "premium")] {
            for _ in 0..<15 {
                let body = #"{"groups":"\#(group)","host":"localhost:8000","method":"POST","path":"/v1/completions","user":"\#(user)"}"#
                #expect(try service.track(body).status == 202)
                #expect(try service.track(#"{"groups":"\#(group)"}"#).status == 422)
            }
        }
        #expect(try service.track(hostileBody).status == 202)

        let result = try prometheus.waitFor("llm_requests_total") { result in
            result.count == 3 && result.allSatisfy { (($0["value"] as? [Any])?[1] as? String) != nil }
        }
        var counts: [String: String] = [:]
        for series in result {
            let labels = try #require(series["metric"] as? [String: String])
            #expect(labels["path"] == "/v1/completions")
            #expect(labels["job"] == "usage-tracking")
            counts[labels["user"]! + "/" + labels["groups"]!] = (series["value"] as? [Any])?[1] as? String
        }
        #expect(counts == ["freeuser1/free": "15", "premiumuser1/premium": "15", "\(hostile)/free": "1"])

        let rejected = try prometheus.query(#"usage_tracking_callbacks_total{outcome="invalid"}"#)
        #expect((rejected.first?["value"] as? [Any])?[1] as? String == "30")
        let up = try prometheus.query(#"up{job="usage-tracking"}"#)
        #expect((up.first?["value"] as? [Any])?[1] as? String == "1")
    }

    @Test func promtoolAcceptsTheExpositionWithHostileLabels() throws {
        let service = try ServiceUnderTest()
        defer { service.process.stop() }
        for user in [#"quo\"te"#, #"back\\slash"#, #"new\nline"#, "tab\\there", "ünïcødé-用户", "}{,=", #"\u0001ctl"#] {
            #expect(try service.track(#"{"user":"\#(user)","groups":["b","a"],"path":"/v1/x?key=1"}"#).status == 202)
        }
        let metrics = try service.send(RawHTTP.get("/metrics"))
        #expect(metrics.status == 200)
        #expect(metrics.text.contains(#"llm_requests_total{user="new\nline",groups="a,b",path="/v1/x"} 1"#))
        #expect(metrics.text.contains(#"llm_requests_total{user="back\\slash",groups="a,b",path="/v1/x"} 1"#))
        #expect(metrics.text.contains(#"llm_requests_total{user="quo\"te",groups="a,b",path="/v1/x"} 1"#))
        let check = try run("/usr/bin/promtool", ["check", "metrics"], input: metrics.body)
        #expect(check.status == 0, "\(check.output)")
        #expect(check.output.isEmpty, "promtool lint: \(check.output)")

        // The gzipped scrape carries the same families.
        let gzipped = try service.send(RawHTTP.get("/metrics", headers: ["Accept-Encoding: gzip"]))
        #expect(gzipped.header("content-encoding") == "gzip")
        let unzipped = try run("/bin/gzip", ["-dc"], input: gzipped.body)
        #expect(unzipped.status == 0)
        let families = { (text: String) in text.split(separator: "\n").filter { $0.hasPrefix("# TYPE") } }
        #expect(families(unzipped.output) == families(metrics.text))
    }
}
