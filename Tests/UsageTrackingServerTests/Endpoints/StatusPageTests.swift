import Glibc
import NIOCore
import NIOHTTP1
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

@Suite struct StatusPageTests {
    static let browserAccept = "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
    static let hostile = "<img src=x onerror=alert(1)>"

    static func track(_ harness: PipelineHarness, user: String, path: String = "/v1/chat", requestID: String? = nil) throws {
        let body = #"{"user":"\#(user)","groups":"free","path":"\#(path)"}"#
        let headers = ["Content-Type: application/json"] + (requestID.map { ["x-request-id: \($0)"] } ?? [])
        #expect(try harness.send(PipelineHarness.post(body, headers: headers)).map(\.status) == [202])
    }

    @Test func rootServesTheHTMLPageWithAPolicyThatAllowsOnlyItsOwnScriptAndStyle() throws {
        let harness = try PipelineHarness()
        let response = try harness.send(PipelineHarness.get("/"))[0]
        #expect(response.status == 200)
        #expect(response.header("content-type") == "text/html; charset=utf-8")
        #expect(response.header("x-content-type-options") == "nosniff")
        #expect(response.header("cache-control") == "no-store")
        let policy = try #require(response.header("content-security-policy"))
        let nonce = try #require(policy.firstMatch(of: #/script-src 'nonce-([0-9a-f]{32})'/#)?.1)
        #expect(
            policy
                == "default-src 'none'; script-src 'nonce-\(nonce)'; style-src 'nonce-\(nonce)'; img-src data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        )
        let page = response.text
        #expect(page.hasPrefix("<!doctype html>\n"))
        // Exactly one script and one style, both carrying this reply's nonce; nothing loaded.
        #expect(page.matches(of: #/<script/#).count == 1)
        #expect(page.contains("<script nonce=\"\(nonce)\">"))
        #expect(page.matches(of: #/<style/#).count == 1)
        #expect(page.contains("<style nonce=\"\(nonce)\">"))
        for loader in ["src=", "<link", "<img", "@import", "url(", "http://", "https://"] {
            #expect(!page.contains(loader), "\(loader)")
        }
        // A new nonce every reply.
        let again = try harness.send(PipelineHarness.get("/"))[0]
        #expect(again.header("content-security-policy") != policy)
    }

    @Test func pageShowsCountsUsersAndARefusalWithItsProblemAndSender() throws {
        let harness = try PipelineHarness()
        try Self.track(harness, user: "alice")
        try Self.track(harness, user: "alice", path: "/v1/embed")
        try Self.track(harness, user: "bob")
        _ = try harness.send(PipelineHarness.post(#"{"groups":"free"}"#, headers: ["x-request-id: refused-7"]))
        _ = try harness.send(PipelineHarness.get("/metrics"))
        let page = try harness.send(PipelineHarness.get("/"))[0].text
        #expect(page.contains(#"<tbody id="outcomes"><tr><td>accepted</td><td>3</td></tr><tr><td>duplicate</td><td>0</td></tr><tr><td>invalid</td><td>1</td></tr>"#))
        #expect(
            page.contains(
                #"<tbody id="top-llm_requests_total-user"><tr><td><a href="/?user=alice">alice</a></td><td>2</td></tr><tr><td><a href="/?user=bob">bob</a></td><td>1</td></tr></tbody>"#
            )
        )
        #expect(page.contains(#"<tbody id="top-llm_requests_total-path"><tr><td>/v1/chat</td><td>2</td></tr><tr><td>/v1/embed</td><td>1</td></tr></tbody>"#))
        #expect(page.contains(#"<span id="top-llm_requests_total-user-distinct">2</span> values<span id="top-llm_requests_total-user-budget">; budget 2 of 100000</span>"#))
        #expect(page.contains(try Regex(#"<td>422</td><td>invalid</td><td>user: required</td><td>refused-7</td><td>127\.0\.0\.1:9999</td>"#)))
        #expect(page.contains(try Regex(#"<dd id="last-scrape">20\d\d-[0-9T:.-]+Z from 127\.0\.0\.1:9999, rendered in [0-9.]+ ms</dd>"#)))
        #expect(page.contains(#"<dd id="authentication">off, 0 secrets loaded</dd>"#))
        #expect(page.contains(#"<dd id="last-match">none yet</dd>"#))
    }

    @Test func hostileValuesAreShownAsText() throws {
        let harness = try PipelineHarness()
        let hostilePath = "/\"><script>alert(2)</script>"
        try Self.track(harness, user: Self.hostile, path: #"/\"><script>alert(2)</script>"#, requestID: "<b>id</b>")
        let response = try harness.send(PipelineHarness.get("/?user=" + HTMLText.queryComponent(Self.hostile)))[0]
        let page = response.text
        #expect(!page.contains(Self.hostile))
        #expect(!page.contains(hostilePath))
        #expect(!page.contains("<b>"))
        #expect(page.matches(of: #/<script/#).count == 1)
        #expect(page.contains("<a href=\"/?user=%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E\">&lt;img src=x onerror=alert(1)&gt;</a>"))
        #expect(page.contains("<td>/&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;</td>"))
        #expect(page.contains("<td>&lt;b&gt;id&lt;/b&gt;</td>"))
        #expect(page.contains(#"<h2>User <span id="user-name">&lt;img src=x onerror=alert(1)&gt;</span></h2>"#))
        #expect(page.contains(#"<input name="user" value="&lt;img src=x onerror=alert(1)&gt;">"#))
    }

    @Test func oneUsersViewListsItsSeriesCountsAndRecentCallbacks() throws {
        let harness = try PipelineHarness()
        try Self.track(harness, user: "alice", requestID: "a-1")
        try Self.track(harness, user: "alice", requestID: "a-2")
        try Self.track(harness, user: "alice", path: "/v1/embed", requestID: "a-3")
        try Self.track(harness, user: "bob", requestID: "b-1")
        let page = try harness.send(PipelineHarness.get("/?user=alice"))[0].text
        #expect(page.contains(#"<span id="user-total">3</span> requests counted in <span id="user-series-count">2</span> series"#))
        #expect(page.contains(#"<tbody id="user-series"><tr><td>alice</td><td>free</td><td>/v1/chat</td><td>2</td></tr><tr><td>alice</td><td>free</td><td>/v1/embed</td><td>1</td></tr></tbody>"#))
        let recent = try #require(page.firstMatch(of: #/<tbody id="user-recent">(.*?)</tbody>/#)?.1)
        #expect(recent.matches(of: #/<tr>/#).count == 3)
        #expect(!recent.contains("b-1"))

        let json = try harness.send(PipelineHarness.get("/debug?user=alice"))[0].text
        #expect(
            json.contains(
                #""user":{"name":"alice","series_count":2,"total":3,"series":[{"labels":{"user":"alice","groups":"free","path":"/v1/chat"},"value":2},{"labels":{"user":"alice","groups":"free","path":"/v1/embed"},"value":1}],"recent_accepted":[{"time":"#
            )
        )
        let nobody = try harness.send(PipelineHarness.get("/debug?user=nobody"))[0].text
        #expect(nobody.contains(#""user":{"name":"nobody","series_count":0,"total":0,"series":[],"recent_accepted":[]}"#))
        #expect(!(try harness.send(PipelineHarness.get("/debug"))[0].text.contains(#""user":{"name""#)))
    }

    @Test(arguments: [
        (StatusPageTests.browserAccept, "text/html; charset=utf-8"), ("Accept: */*", "application/json"),
        ("Accept: application/json", "application/json"), ("Accept: application/json, text/html;q=0.5", "application/json"),
        ("Accept: text/html;q=0", "application/json"), ("Accept: TEXT/HTML", "text/html; charset=utf-8"),
        ("X-None: 1", "application/json"),
    ])
    func debugNegotiatesOnAccept(accept: String, contentType: String) throws {
        let harness = try PipelineHarness()
        let response = try harness.send(PipelineHarness.get("/debug", headers: [accept]))[0]
        #expect(response.status == 200)
        #expect(response.header("content-type") == contentType)
        #expect(response.header("vary") == "accept")
    }

    @Test func jsonCarriesTheNewFacts() throws {
        let harness = try PipelineHarness { $0.callbackSecret = "first\nsecond" }
        let rates = try #require(harness.state.status).rates
        let second = rates.currentSecond
        for _ in 0..<3 { rates.record(.accepted, atSecond: second) }
        rates.record(.refused, atSecond: second)
        #expect(try harness.send(PipelineHarness.post(#"{"user":"u"}"#, headers: ["Authorization: Bearer second"])).map(\.status) == [202])
        // Only complete seconds are shown: wait (at most 3 s) for this one to end.
        let deadline = NIODeadline.now() + .seconds(3)
        while rates.currentSecond == second, NIODeadline.now() < deadline { usleep(20_000) }
        _ = try harness.send(PipelineHarness.get("/metrics"))
        let json = try harness.send(PipelineHarness.get("/debug"))[0].text
        #expect(json.contains(#""secrets":{"last_reload":null,"last_match":{"position":1,"time":"20"#))
        #expect(json.contains(try Regex(#""last_scrape":\{"time":"20[^"]+Z","from":"127\.0\.0\.1:9999","render_seconds":[0-9.e-]+\}"#)))
        #expect(json.contains(#""top":{"computed_at":""#))
        // Each label's budget use beside its ranking (the built-in budgets: 100,000 users, 1,000 groups).
        #expect(json.contains(#""llm_requests_total":{"user":{"distinct":1,"top":[{"value":"u","count":1}],"budget":{"held":1,"limit":100000}},"groups":{"distinct":1,"top":[{"value":"","count":1}],"budget":{"held":1,"limit":1000}}"#))
        #expect(json.contains(#""host_name":""#))
        // Three accepted (four with the callback, if it fell in the same second) and one refused.
        let accepted = try #require(json.firstMatch(of: #/"per_second":\{"seconds":300,"accepted":\[([0-9,]+)\],"refused":\[([0-9,]+)\]\}/#))
        let acceptedCounts = accepted.1.split(separator: ",").map { Int($0)! }
        let refusedCounts = accepted.2.split(separator: ",").map { Int($0)! }
        #expect(acceptedCounts.count == 300)
        #expect([3, 4].contains(acceptedCounts.filter { $0 != 0 }.first ?? 0))
        #expect((3...4).contains(acceptedCounts.reduce(0, +)))
        #expect(refusedCounts.reduce(0, +) == 1)
        #expect(json.contains(#""rates":{"accepted":{"last_1m":"#))
    }

    @Test func pageSizeDoesNotGrowWithTheSeries() throws {
        // A page of its own: the ranking of the first request would be reused for two seconds.
        let small = try PipelineHarness().send(PipelineHarness.get("/"))[0].body.count
        let harness = try PipelineHarness()
        for index in 0..<5_000 {
            harness.state.metrics.requests.increment(["user-\(index)", "g-\(index % 50)", "/p/\(index % 400)"], by: UInt64(index % 7 + 1))
        }
        for index in 0..<300 { try Self.track(harness, user: "recent-\(index)", requestID: "r-\(index)") }
        let response = try harness.send(PipelineHarness.get("/"))[0]
        let page = response.text
        let userRows = try #require(page.firstMatch(of: #/<tbody id="top-llm_requests_total-user">(.*?)</tbody>/#)?.1)
        #expect(userRows.matches(of: #/<tr>/#).count == StatusTracking.topCount)
        let accepted = try #require(page.firstMatch(of: #/<tbody id="recent-accepted">(.*?)</tbody>/#)?.1)
        #expect(accepted.matches(of: #/<tr>/#).count == StatusPageEndpoint.recentShown)
        #expect(small < 20_000)
        #expect(response.body.count < 40_000, "\(response.body.count) bytes")
    }

    @Test func theRankingIsReusedForTwoSeconds() throws {
        let status = StatusTracking()
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user"])
        family.increment(["a"])
        let start = NIODeadline.now()
        let first = status.rankings(of: [family], tokenTypes: [nil], now: start)
        family.increment(["b"], by: 5)
        #expect(status.rankings(of: [family], tokenTypes: [nil], now: start + .milliseconds(1900)).families[0].labels[0].top.map(\.value) == ["a"])
        let later = status.rankings(of: [family], tokenTypes: [nil], now: start + .seconds(2))
        #expect(later.families[0].labels[0].top.map(\.value) == ["b", "a"])
        #expect(first.families[0].name == "t_total")
    }

    @Test func turnedOffWithTheDebugView() throws {
        let harness = try PipelineHarness { $0.debugEnabled = false }
        try Self.track(harness, user: "u")
        let responses = try harness.send(PipelineHarness.get("/") + PipelineHarness.get("/debug", headers: [Self.browserAccept]))
        #expect(responses.map(\.status) == [404, 404])
        #expect(responses[0].text == #"{"error":"not found","problems":["the status page is turned off (--no-debug)"]}"# + "\n")
        #expect(harness.state.status == nil)
    }

    @Test func headAndOtherMethods() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(PipelineHarness.get("/", method: "HEAD") + PipelineHarness.post("", path: "/"))
        #expect(responses.map(\.status) == [200, 405])
        #expect(responses[0].body.isEmpty)
        #expect(Int(responses[0].header("content-length") ?? "") ?? 0 > 1000)
        #expect(responses[1].text == #"{"error":"method not allowed","problems":["POST / is not allowed; use GET"]}"# + "\n")
        #expect(responses[1].header("allow") == "GET, HEAD")
    }

    @Test func theStatusRouteIsTimedUnderItsOwnLabel() throws {
        let harness = try PipelineHarness()
        _ = try harness.send(PipelineHarness.get("/"))
        let metrics = try harness.send(PipelineHarness.get("/metrics"))[0].text
        #expect(metrics.contains(#"usage_tracking_http_request_duration_seconds_count{route="status"} 1"#))
    }

    @Test func theRenderRunsOffTheLoop() throws {
        // A runner that holds the work: the page is not written until it runs, so it cannot have
        // been rendered on the event loop.
        let held = HeldWork()
        let harness = try PipelineHarness(runOffLoop: { eventLoop, work in
            let promise = eventLoop.makePromise(of: HTTPResponse.self)
            held.add { promise.succeed(work()) }
            return promise.futureResult
        })
        #expect(try harness.send(PipelineHarness.get("/") + PipelineHarness.get("/debug")).isEmpty)
        held.runAll()
        #expect(try harness.responses().isEmpty == false)
        held.runAll()
        #expect(try harness.responses().map(\.status) == [200])
    }
}

/// Work handed to the test's off-loop runner, run when the test says.
final class HeldWork: @unchecked Sendable {
    private var pending: [() -> Void] = []
    func add(_ work: @escaping () -> Void) { self.pending.append(work) }
    func runAll() {
        let work = self.pending
        self.pending = []
        work.forEach { $0() }
    }
}
