import NIOCore
import NIOEmbedded
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

@Suite struct ConnectionTests {
    @Test func pipelinedRequestsAreAnsweredInOrder() throws {
        let harness = try PipelineHarness()
        let batch = PipelineHarness.post(#"{"user":"a"}"#) + PipelineHarness.get("/healthz") + PipelineHarness.post(#"{"user":5}"#)
            + PipelineHarness.post(#"{"user":"b"}"#)
        let responses = try harness.send(batch)
        #expect(responses.map(\.status) == [202, 200, 422, 202])
        #expect(harness.state.metrics.requests.seriesCount == 2)
    }

    @Test func requestSplitIntoSingleBytesIsReassembled() throws {
        let harness = try PipelineHarness()
        for byte in PipelineHarness.post(#"{"user":"slow","groups":["b","a"]}"#).utf8 {
            try harness.channel.writeInbound(ByteBuffer(bytes: [byte]))
        }
        #expect(try harness.responses().map(\.status) == [202])
        #expect(harness.state.metrics.requests.value(["slow", "a,b", ""]) == 1)
    }

    @Test func http10ClosesAfterTheReply() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send("POST /track HTTP/1.0\r\nContent-Length: 12\r\n\r\n{\"user\":\"a\"}")
        #expect(responses.map(\.status) == [202])
        #expect(responses[0].header("connection") == "close")
        #expect(!harness.channel.isActive)
    }

    @Test func quiesceClosesAnIdleConnectionAtOnce() throws {
        let harness = try PipelineHarness()
        harness.channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        #expect(!harness.channel.isActive)
    }

    @Test func quiesceLetsTheRequestInFlightFinish() throws {
        let harness = try PipelineHarness()
        let request = PipelineHarness.post(#"{"user":"late"}"#)
        let split = request.index(request.endIndex, offsetBy: -5)
        #expect(try harness.send(String(request[..<split])).isEmpty)
        harness.channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        #expect(harness.channel.isActive)
        let responses = try harness.send(String(request[split...]))
        #expect(responses.map(\.status) == [202])
        #expect(responses[0].header("connection") == "close")
        #expect(!harness.channel.isActive)
        #expect(harness.state.metrics.requests.value(["late", "", ""]) == 1)
    }

    @Test func malformedHTTPGets400AndIsClosed() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send("BREW /pot HTCPCP\r\n\r\n")
        #expect(responses.map(\.status) == [400])
        #expect(responses[0].text == #"{"error":"malformed HTTP request","problems":["the request line does not end in an HTTP version"]}"# + "\n")
        #expect(!harness.channel.isActive)
        #expect(harness.logs.all.contains { $0.contains(#""msg":"bad HTTP request""#) && $0.contains(#""status":"400""#) })
    }

    /// A request the parser refuses is answered after the replies owed before it, with the
    /// parser's status and problem, and nothing after it is read.
    @Test(arguments: [
        ("GET / HTTP/2.0\r\n\r\n", 505, #"{"error":"HTTP version not supported","problems":["HTTP/2.0 is not supported; send HTTP/1.1"]}"#),
        (
            "POST /track HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
            #"{"error":"not implemented","problems":["Transfer-Encoding other than chunked is not supported; send chunked or a Content-Length"]}"#
        ),
        (
            "POST /track HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
            #"{"error":"malformed HTTP request","problems":["both Content-Length and Transfer-Encoding are given; send one"]}"#
        ),
    ])
    func refusedStreamIsAnsweredInOrderAndClosed(request: String, status: Int, body: String) throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(PipelineHarness.post(#"{"user":"before"}"#) + request + PipelineHarness.post(#"{"user":"after"}"#))
        #expect(responses.map(\.status) == [202, status])
        #expect(responses[1].text == body + "\n")
        #expect(responses[1].header("connection") == "close")
        #expect(harness.state.metrics.requests.value(["before", "", ""]) == 1)
        #expect(harness.state.metrics.requests.value(["after", "", ""]) == 0)
        #expect(!harness.channel.isActive)
    }

    /// Any token is a method; the reply and the log name it cut, like other text the client chose.
    @Test func aLongMethodIsEchoedCut() throws {
        let method = String(repeating: "M", count: 1000)
        let cut = String(repeating: "M", count: 61) + "…"
        for (path, allowed) in [("/track", "POST"), ("/healthz", "GET")] {
            let harness = try PipelineHarness()
            let responses = try harness.send(PipelineHarness.get(path, method: method))
            #expect(responses.map(\.status) == [405])
            #expect(responses[0].text == #"{"error":"method not allowed","problems":[""# + cut + " \(path) is not allowed; use \(allowed)" + #""]}"# + "\n")
            #expect(!harness.logs.all.contains { $0.contains(String(repeating: "M", count: 100)) })
        }
    }

    /// An absolute-form target's authority ends at its path or its query: `http://h?/track` is
    /// a request for `/`, as a proxy would route it.
    @Test func anAbsoluteTargetsQueryIsNotItsPath() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(PipelineHarness.post(#"{"user":"q"}"#, path: "http://h?/track"))
        #expect(responses.map(\.status) == [405])
        #expect(harness.state.metrics.requests.value(["q", "", ""]) == 0)
    }

    @Test func http10GetsNoInterimReply() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send("POST /track HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 12\r\n\r\n{\"user\":\"a\"}")
        #expect(responses.map(\.status) == [202])
    }

    @Test func chunkedCallbackIsCounted() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(
            "POST /track HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + "6\r\n{\"user\r\n9;ext=1\r\n\":\"chunk\"\r\n1\r\n}\r\n0\r\n\r\n" + PipelineHarness.get("/healthz")
        )
        #expect(responses.map(\.status) == [202, 200])
        #expect(harness.state.metrics.requests.value(["chunk", "", ""]) == 1)
    }

    @Test func oversizeHeadGets431() throws {
        let harness = try PipelineHarness { $0.maxHeaderBytes = 1024 }
        let responses = try harness.send("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: \(String(repeating: "a", count: 2000))\r\n\r\n")
        #expect(responses.map(\.status) == [431])
        #expect(responses[0].text == #"{"error":"request header too large","problems":["request head exceeds 1024 bytes"]}"# + "\n")
        #expect(!harness.channel.isActive)
    }

    @Test func idleConnectionIsClosed() throws {
        let harness = try PipelineHarness { $0.idleTimeout = .seconds(5) }
        let loop = harness.channel.embeddedEventLoop
        loop.advanceTime(by: .seconds(3))
        _ = try harness.send(PipelineHarness.get("/healthz"))
        loop.advanceTime(by: .seconds(3))
        #expect(harness.channel.isActive, "activity 3 s ago must keep it open")
        loop.advanceTime(by: .seconds(3))
        #expect(!harness.channel.isActive)
    }
}

/// `/metrics` is rendered off the event loop; requests behind it on the same connection wait
/// and are answered in order once it is written.
@Suite struct OffLoopReplyTests {
    /// Holds off-loop work until the test releases it (on the embedded loop's thread).
    final class HeldWork: @unchecked Sendable {
        private var held: [(EventLoopPromise<HTTPResponse>, @Sendable () -> HTTPResponse)] = []

        func runner() -> ServerState.OffLoopRunner {
            { eventLoop, work in
                let promise = eventLoop.makePromise(of: HTTPResponse.self)
                self.held.append((promise, work))
                return promise.futureResult
            }
        }

        var count: Int { self.held.count }

        func release() {
            let held = self.held
            self.held = []
            for (promise, work) in held { promise.succeed(work()) }
        }
    }

    @Test func pipelinedRequestsWaitBehindARenderingScrape() throws {
        let work = HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        let batch = PipelineHarness.get("/metrics") + PipelineHarness.post(#"{"user":"after"}"#) + PipelineHarness.get("/healthz")
        #expect(try harness.send(batch).isEmpty)
        #expect(work.count == 1)
        #expect(harness.state.metrics.requests.value(["after", "", ""]) == 0, "queued, not yet handled")
        work.release()
        let responses = try harness.responses()
        #expect(responses.map(\.status) == [200, 202, 200])
        #expect(!responses[0].text.contains("after"), "the scrape was rendered before the callback behind it")
        #expect(harness.state.metrics.requests.value(["after", "", ""]) == 1)
    }

    @Test func quiesceDuringARenderClosesAfterTheReply() throws {
        let work = HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        #expect(try harness.send(PipelineHarness.get("/metrics")).isEmpty)
        harness.channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        #expect(harness.channel.isActive)
        work.release()
        let responses = try harness.responses()
        #expect(responses.map(\.status) == [200])
        #expect(responses[0].header("connection") == "close")
        #expect(!harness.channel.isActive)
    }
}

@Suite struct RouteTests {
    /// `Route` (server) indexes the per-route histograms named in `UsageMetrics.routes` (core).
    @Test func routesAndHistogramLabelsAgree() {
        for (index, name) in UsageMetrics.routes.enumerated() where name != "other" {
            // The status page is the root; every other route is its name.
            let path = name == "status" ? "/" : "/\(name)"
            #expect(Route(uri: "\(path)?x=1").rawValue == index, "\(name)")
        }
        #expect(Route(uri: "/elsewhere") == .other)
        #expect(UsageMetrics.routes[Route.other.rawValue] == "other")
    }
}

@Suite struct StoppingTests {
    struct RendererStopped: Error {}

    /// Once the render thread has stopped (shutdown), a scrape still gets a clear reply.
    @Test func scrapeDuringShutdownGets503() throws {
        let harness = try PipelineHarness(runOffLoop: { eventLoop, _ in eventLoop.makeFailedFuture(RendererStopped()) })
        let responses = try harness.send(PipelineHarness.get("/metrics"))
        #expect(responses.map(\.status) == [503])
        #expect(responses[0].text == #"{"error":"shutting down","problems":["the server is stopping"]}"# + "\n")
    }
}
