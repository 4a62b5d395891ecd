import NIOCore
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

private let authorinoBody = #"{"groups":"premium","host":"localhost:8000","method":"POST","path":"/v1/completions","user":"premiumuser1"}"#

@Suite struct TrackEndpointTests {
    @Test func acceptedCallbackIsCountedAndGets202WithNoBody() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(PipelineHarness.post(authorinoBody))
        #expect(responses.count == 1)
        #expect(responses[0].status == 202)
        #expect(responses[0].body.isEmpty)
        #expect(responses[0].header("content-length") == "0")
        #expect(responses[0].header("content-type") == nil)
        #expect(harness.state.metrics.requests.value(["premiumuser1", "premium", "/v1/completions"]) == 1)
        #expect(harness.state.metrics.count(of: .accepted) == 1)
    }

    @Test func formEncodedCallbackIsCounted() throws {
        let harness = try PipelineHarness()
        let body = "groups=free&path=%2Fv1%2Fchat%3Fx%3D1&user=freeuser1"
        let responses = try harness.send(PipelineHarness.post(body, headers: ["Content-Type: application/x-www-form-urlencoded"]))
        #expect(responses.map(\.status) == [202])
        #expect(harness.state.metrics.requests.value(["freeuser1", "free", "/v1/chat"]) == 1)
    }

    /// Each rejection: exact status, exact body, its outcome counted, nothing counted as usage.
    @Test(arguments: [
        (
            PipelineHarness.post("{\"user\":"), 400, "malformed",
            #"{"error":"malformed body","problems":["JSON: unexpected end of body at byte 8"]}"#
        ),
        (
            PipelineHarness.post(#"{"groups":5}"#), 422, "invalid",
            #"{"error":"invalid callback","problems":["user: required","groups: must be a string or an array of strings, got number"]}"#
        ),
        (
            PipelineHarness.post(#"{"user":"\#(String(repeating: "u", count: 300))"}"#), 422, "invalid",
            #"{"error":"invalid callback","problems":["user: 300 bytes; the limit is 256"]}"#
        ),
        (
            PipelineHarness.post("--x\r\n", headers: ["Content-Type: multipart/form-data; boundary=x"]), 415, "unsupported_media_type",
            #"{"error":"unsupported media type","problems":["Content-Type multipart/form-data is not supported; send application/json or application/x-www-form-urlencoded"]}"#
        ),
        (
            PipelineHarness.get("/track"), 405, "method_not_allowed",
            #"{"error":"method not allowed","problems":["GET /track is not allowed; use POST"]}"#
        ),
    ])
    func rejection(request: String, status: Int, outcome: String, body: String) throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(request)
        #expect(responses.count == 1)
        #expect(responses[0].status == status)
        #expect(responses[0].header("content-type") == "application/json")
        #expect(responses[0].text == body + "\n")
        #expect(harness.state.metrics.count(of: CallbackOutcome(rawValue: outcome)!) == 1)
        #expect(harness.state.metrics.requests.seriesCount == 0)
        if status == 405 { #expect(responses[0].header("allow") == "POST") }
        // Refused from the head alone: answered at once and closed, so no body is read.
        #expect(harness.channel.isActive == (status != 405))
        #expect(responses[0].header("connection") == (status == 405 ? "close" : nil))
    }

    @Test func announcedOversizeBodyIsRefusedBeforeReadingIt() throws {
        let harness = try PipelineHarness { $0.maxBodyBytes = 100 }
        let head = "POST /track HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 101\r\n\r\n"
        let responses = try harness.send(head)
        #expect(responses.map(\.status) == [413])
        #expect(responses[0].text == #"{"error":"body too large","problems":["body exceeds the limit of 100 bytes"]}"# + "\n")
        #expect(responses[0].header("connection") == "close")
        #expect(!harness.channel.isActive)
        #expect(harness.state.metrics.count(of: .tooLarge) == 1)
    }

    @Test func chunkedBodyOverTheLimitIsRefused() throws {
        let harness = try PipelineHarness { $0.maxBodyBytes = 16 }
        let head = "POST /track HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        #expect(try harness.send(head + "a\r\n{\"user\":\"a\r\n").isEmpty)
        let responses = try harness.send("a\r\nbcdefghij\r\n")
        #expect(responses.map(\.status) == [413])
        #expect(!harness.channel.isActive)
        #expect(harness.state.metrics.requests.seriesCount == 0)
    }

    @Test func expectContinueGetsAnInterimReplyBeforeTheBody() throws {
        let harness = try PipelineHarness()
        let body = #"{"user":"patient"}"#
        let head = "POST /track HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: \(body.utf8.count)\r\n\r\n"
        let interim = try harness.send(head)
        #expect(interim.map(\.status) == [100])
        #expect(try harness.send(body).map(\.status) == [202])
        #expect(harness.state.metrics.requests.value(["patient", "", ""]) == 1)
    }

    @Test func expectContinueIsNotSentWhenTheHeadIsAlreadyRefused() throws {
        let harness = try PipelineHarness { $0.callbackSecret = "s" }
        let responses = try harness.send("POST /track HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}")
        #expect(responses.map(\.status) == [401])
    }

    @Test func chunkedBodyWithinTheLimitIsCounted() throws {
        let harness = try PipelineHarness()
        let head = "POST /track HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        let responses = try harness.send(head + "6\r\n{\"user\r\n7\r\n\":\"ann\"\r\n1\r\n}\r\n0\r\n\r\n")
        #expect(responses.map(\.status) == [202])
        #expect(harness.state.metrics.requests.value(["ann", "", ""]) == 1)
    }

    @Test func requestIDIsLoggedAndShownInTheDebugView() throws {
        let harness = try PipelineHarness(logLevel: .debug)
        _ = try harness.send(PipelineHarness.post(authorinoBody, headers: ["Content-Type: application/json", "x-request-id: req-42"]))
        _ = try harness.send(PipelineHarness.post(#"{"user":1,"secretish":"value-not-shown"}"#, headers: ["x-request-id: req-43"]))
        let logs = harness.logs.all
        #expect(logs.contains { $0.contains(#""msg":"callback accepted""#) && $0.contains(#""request_id":"req-42""#) && $0.contains(#""user":"premiumuser1""#) })
        #expect(logs.contains { $0.contains(#""msg":"callback rejected""#) && $0.contains(#""request_id":"req-43""#) && $0.contains(#""status":"422""#) })
        let debug = try harness.send(PipelineHarness.get("/debug"))[0].text
        #expect(debug.contains(try Regex(#"\{"time":"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z","user":"premiumuser1""#)))
        #expect(debug.contains(#""user":"premiumuser1","groups":"premium","path":"/v1/completions","method":"POST","host":"localhost:8000","request_id":"req-42","sender":"127.0.0.1:9999"}"#))
        #expect(debug.contains(#""status":422,"outcome":"invalid","problems":["user: must be a string, got number"],"request_id":"req-43","fields":["user","secretish"],"sender":"127.0.0.1:9999"}"#))
        #expect(!debug.contains("value-not-shown"))
    }
}

@Suite struct AuthenticationTests {
    static let secret = "s3cr3t-value"

    @Test(arguments: [
        ([], "missing credentials in Authorization"),
        (["Authorization: Bearer wrong"], "invalid credentials in Authorization"),
        (["Authorization: Basic czNjcjN0LXZhbHVl"], "Authorization must use the Bearer scheme"),
        (["Authorization: Bearer s3cr3t-valu"], "invalid credentials in Authorization"),
    ])
    func rejectedWithoutTheSecret(headers: [String], problem: String) throws {
        let harness = try PipelineHarness { $0.callbackSecret = Self.secret }
        let responses = try harness.send(PipelineHarness.post(authorinoBody, headers: ["Content-Type: application/json"] + headers))
        #expect(responses.map(\.status) == [401])
        #expect(responses[0].header("www-authenticate") == #"Bearer realm="usage-tracking""#)
        #expect(responses[0].text == #"{"error":"unauthorized","problems":["\#(problem)"]}"# + "\n")
        #expect(harness.state.metrics.requests.seriesCount == 0)
        #expect(harness.state.metrics.count(of: .unauthorized) == 1)
        #expect(!harness.logs.all.joined().contains(Self.secret))
    }

    @Test func bearerSecretIsAccepted() throws {
        let harness = try PipelineHarness { $0.callbackSecret = Self.secret }
        let responses = try harness.send(PipelineHarness.post(authorinoBody, headers: ["authorization: bearer \(Self.secret)"]))
        #expect(responses.map(\.status) == [202])
    }

    @Test func customHeaderCarriesTheBareSecret() throws {
        let harness = try PipelineHarness {
            $0.callbackSecret = Self.secret
            $0.callbackSecretHeader = "X-Callback-Secret"
        }
        #expect(try harness.send(PipelineHarness.post(authorinoBody, headers: ["X-Callback-Secret: \(Self.secret)"])).map(\.status) == [202])
        let refused = try harness.send(PipelineHarness.post(authorinoBody, headers: ["Authorization: Bearer \(Self.secret)"]))
        #expect(refused.map(\.status) == [401])
        #expect(refused[0].header("www-authenticate") == #"Secret realm="usage-tracking", header="X-Callback-Secret""#)
        #expect(refused[0].text == #"{"error":"unauthorized","problems":["missing credentials in X-Callback-Secret"]}"# + "\n")
    }

    @Test func debugShowsOnlyWhetherASecretIsSet() throws {
        let harness = try PipelineHarness { $0.callbackSecret = Self.secret }
        let debug = try harness.send(PipelineHarness.get("/debug"))[0].text
        #expect(debug.contains(#""callback_secret":"set""#))
        #expect(debug.contains(#""authentication":"required""#))
        #expect(!debug.contains(Self.secret))
    }
}
