import NIOCore
import NIOEmbedded
import Testing
import UsageTrackingCore

@testable import UsageTrackingServer

/// Counts the `read` calls that get past the connection handler to the socket.
final class ReadCounter: ChannelOutboundHandler, @unchecked Sendable {
    typealias OutboundIn = Never
    var reads = 0

    func read(context: ChannelHandlerContext) {
        self.reads += 1
        context.read()
    }
}

/// A socket whose outbound bytes are never taken: closing its output never completes.
final class StalledHalfClose: ChannelOutboundHandler, @unchecked Sendable {
    typealias OutboundIn = Never
    var held: [EventLoopPromise<Void>] = []

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .output else {
            context.close(mode: mode, promise: promise)
            return
        }
        if let promise { self.held.append(promise) }
    }
}

extension PipelineHarness {
    /// Puts a `ReadCounter` in front of the pipeline, where the socket would be.
    func countReads() throws -> ReadCounter {
        let counter = ReadCounter()
        try self.channel.pipeline.syncOperations.addHandler(counter, position: .first)
        return counter
    }

    var handler: HTTPConnectionHandler {
        get throws { try self.channel.pipeline.syncOperations.handler(type: HTTPConnectionHandler.self) }
    }

    /// Puts an `UntakenWrites` in front of the pipeline, where the socket would be.
    func untakenWrites() throws -> UntakenWrites {
        let socket = UntakenWrites()
        try self.channel.pipeline.syncOperations.addHandler(socket, position: .first)
        return socket
    }

    func setWritable(_ writable: Bool) {
        self.channel.isWritable = writable
        self.channel.pipeline.fireChannelWritabilityChanged()
    }
}

/// What one connection can make the server hold: reading stops while replies are owed.
@Suite struct BackpressureTests {
    typealias HeldWork = OffLoopReplyTests.HeldWork

    @Test func readingWaitsWhileAReplyRenders() throws {
        let work = HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        let reads = try harness.countReads()
        harness.channel.read()
        #expect(reads.reads == 1, "an idle connection reads")
        #expect(try harness.send(PipelineHarness.get("/metrics")).isEmpty)
        harness.channel.read()
        #expect(reads.reads == 1, "no read while /metrics renders")
        work.release()
        #expect(try harness.responses().map(\.status) == [200])
        #expect(reads.reads == 2, "the held read is issued once the reply is written")
    }

    @Test func readingAndAnsweringWaitWhileTheSocketIsFull() throws {
        let harness = try PipelineHarness()
        let reads = try harness.countReads()
        harness.setWritable(false)
        let batch = String(repeating: PipelineHarness.get("/healthz"), count: 50) + PipelineHarness.post(#"{"user":"later"}"#)
        #expect(try harness.send(batch).isEmpty, "nothing is written to a socket that takes no more")
        harness.channel.read()
        #expect(reads.reads == 0)
        #expect(harness.state.metrics.requests.value(["later", "", ""]) == 0, "answered in order, so not yet counted")
        harness.setWritable(true)
        let responses = try harness.responses()
        #expect(responses.map(\.status) == Array(repeating: 200, count: 50) + [202])
        #expect(reads.reads == 1)
        #expect(harness.state.metrics.requests.value(["later", "", ""]) == 1)
    }

    /// Requests behind a render wait in a deque; many of them are answered in order.
    @Test func manyPipelinedRequestsBehindARenderAreAnsweredInOrder() throws {
        let work = HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        let count = 20_000
        var batch = PipelineHarness.get("/metrics")
        for index in 0..<count { batch += PipelineHarness.get(index == count - 1 ? "/nowhere" : "/healthz") }
        #expect(try harness.send(batch).isEmpty)
        work.release()
        let statuses = try harness.responses().map(\.status)
        #expect(statuses.count == count + 1)
        #expect(statuses.first == 200 && statuses.last == 404)
    }

    /// However small the requests a client pipelines, at most `AnswerQueue.maxWaiting` of them
    /// wait as requests; the rest of what was read stays bytes until they are answered.
    @Test func waitingRequestsAreCapped() throws {
        let work = HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        let reads = try harness.countReads()
        let tiny = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        #expect(try harness.send(PipelineHarness.get("/metrics") + String(repeating: tiny, count: 200)).isEmpty)
        #expect(try harness.handler.waitingRequests == AnswerQueue.maxWaiting)
        #expect(try harness.handler.unparsedBytes == (200 - AnswerQueue.maxWaiting) * tiny.utf8.count)
        harness.channel.read()
        #expect(reads.reads == 0, "nothing more is read while requests wait")
        work.release()
        #expect(try harness.responses().map(\.status) == Array(repeating: 200, count: 201))
        #expect(try harness.handler.waitingRequests == 0 && harness.handler.unparsedBytes == 0)
        #expect(reads.reads == 1, "reading resumes once every request is answered")
    }

    /// Requests past the cap still count as received: shutdown answers every one of them, and
    /// closes after the last.
    @Test func quiescingAnswersEveryRequestReceivedPastTheCap() throws {
        let work = HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        #expect(try harness.send(PipelineHarness.get("/metrics") + String(repeating: PipelineHarness.get("/healthz"), count: 100)).isEmpty)
        harness.channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        work.release()
        let responses = try harness.responses()
        #expect(responses.map(\.status) == Array(repeating: 200, count: 101))
        #expect(responses.map { $0.header("connection") } == Array(repeating: nil, count: 100) + ["close"])
        #expect(!harness.channel.isActive)
    }

    /// Nothing after a request that closes the connection is parsed, let alone held, even while
    /// that request waits its turn.
    @Test func nothingAfterARequestThatClosesIsParsed() throws {
        let work = HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        let rest = PipelineHarness.post(#"{"user":"after"}"#)
        #expect(try harness.send(PipelineHarness.get("/metrics") + PipelineHarness.get("/healthz", headers: ["Connection: close"]) + rest).isEmpty)
        #expect(try harness.handler.waitingRequests == 1)
        #expect(try harness.handler.unparsedBytes == rest.utf8.count)
        work.release()
        #expect(try harness.responses().map(\.status) == [200, 200])
        #expect(harness.state.metrics.requests.value(["after", "", ""]) == 0)
    }

    /// A chunked body behind a render is held only up to the limit, then refused in its turn.
    @Test func bodyLimitHoldsWhileRequestsWait() throws {
        let work = HeldWork()
        let harness = try PipelineHarness({ $0.maxBodyBytes = 1024 }, runOffLoop: work.runner())
        let head = "POST /track HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        #expect(try harness.send(PipelineHarness.get("/metrics") + head).isEmpty)
        let chunk = "100\r\n" + String(repeating: "x", count: 256) + "\r\n"
        for _ in 0..<64 {
            _ = try harness.send(chunk)
            #expect(try harness.handler.heldBodyBytes <= 1024)
        }
        work.release()
        let responses = try harness.responses()
        #expect(responses.map(\.status) == [200, 413])
        #expect(responses[1].text == #"{"error":"body too large","problems":["body exceeds the limit of 1024 bytes"]}"# + "\n")
        #expect(!harness.channel.isActive)
    }
}

@Suite struct TimeLimitTests {
    /// A body trickled a byte at a time keeps the connection active, but not past the request timeout.
    @Test func trickledBodyIsCutOffAtTheRequestTimeout() throws {
        let harness = try PipelineHarness {
            $0.idleTimeout = .seconds(60)
            $0.requestTimeout = .seconds(10)
        }
        let loop = harness.channel.embeddedEventLoop
        // The head arrives between two firings of the connection's timer (at 30 s and 40 s).
        loop.advanceTime(by: .seconds(35))
        #expect(try harness.send("POST /track HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n").isEmpty)
        for _ in 0..<3 {
            loop.advanceTime(by: .seconds(3))
            #expect(try harness.send("x").isEmpty, "a byte every 3 s keeps it from being idle")
        }
        #expect(harness.channel.isActive)
        loop.advanceTime(by: .seconds(1))
        let timedOut = try harness.responses()
        #expect(timedOut.map(\.status) == [408])
        #expect(timedOut.first?.text == #"{"error":"request timeout","problems":["the request did not arrive in full within 10 s"]}"# + "\n")
        #expect(timedOut.first?.header("connection") == "close")
        #expect(!harness.channel.isActive)
    }

    /// A 408 that waits behind replies the client does not read still ends the connection at
    /// the idle timeout.
    @Test func aTimedOutRequestBehindUnreadRepliesIsClosedWhenIdle() throws {
        let harness = try PipelineHarness {
            $0.idleTimeout = .seconds(60)
            $0.requestTimeout = .seconds(10)
        }
        harness.setWritable(false)
        #expect(try harness.send(PipelineHarness.get("/healthz") + "POST /track HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n").isEmpty)
        let loop = harness.channel.embeddedEventLoop
        loop.advanceTime(by: .seconds(10))
        #expect(harness.channel.isActive, "the 408 waits behind the unread reply")
        loop.advanceTime(by: .seconds(49))
        #expect(harness.channel.isActive)
        loop.advanceTime(by: .seconds(1))
        #expect(!harness.channel.isActive)
    }

    /// The reply that closes a connection waits to be read at most the idle timeout: a client
    /// that never reads it cannot keep the connection (its socket's send buffer full, the half
    /// close never done).
    @Test func aClosingConnectionWhoseLastReplyGoesUnreadIsClosedWhenIdle() throws {
        let harness = try PipelineHarness { $0.idleTimeout = .seconds(5) }
        try harness.channel.pipeline.syncOperations.addHandler(StalledHalfClose(), position: .first)
        let responses = try harness.send(PipelineHarness.get("/healthz", headers: ["Connection: close"]))
        #expect(responses.map(\.status) == [200])
        let loop = harness.channel.embeddedEventLoop
        loop.advanceTime(by: .seconds(4))
        #expect(harness.channel.isActive)
        loop.advanceTime(by: .seconds(1))
        #expect(!harness.channel.isActive)
    }

    @Test func requestsThatArriveInTimeAreUntouched() throws {
        let harness = try PipelineHarness { $0.requestTimeout = .seconds(10) }
        let loop = harness.channel.embeddedEventLoop
        for _ in 0..<5 {
            loop.advanceTime(by: .seconds(9))
            #expect(try harness.send(PipelineHarness.post(#"{"user":"steady"}"#)).map(\.status) == [202])
        }
        #expect(harness.channel.isActive)
        #expect(harness.state.metrics.requests.value(["steady", "", ""]) == 5)
    }
}

/// Refusals decided from the head are answered at once; the body is never read.
@Suite struct EarlyRefusalTests {
    @Test(arguments: [
        ("POST /track HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000000\r\n\r\n", 401),
        ("POST /track HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000000\r\nExpect: 100-continue\r\n\r\n", 401),
        ("PUT /track HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s\r\nContent-Length: 2000000000\r\n\r\n", 405),
        ("POST /track HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s\r\nContent-Length: 2000000000\r\n\r\n", 413),
        ("POST /track HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s\r\nContent-Encoding: gzip\r\nContent-Length: 20\r\n\r\n", 415),
    ])
    func refusedFromTheHead(head: String, status: Int) throws {
        let harness = try PipelineHarness { $0.callbackSecret = "s" }
        let responses = try harness.send(head)
        #expect(responses.map(\.status) == [status], "the final reply, and no 100 Continue")
        #expect(responses.first?.header("connection") == "close")
        #expect(!harness.channel.isActive)
    }

    @Test func contentEncodingIsNamed() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(PipelineHarness.post(#"{"user":"a"}"#, headers: ["Content-Encoding: br"]))
        #expect(responses.map(\.status) == [415])
        #expect(responses[0].text == #"{"error":"unsupported media type","problems":["Content-Encoding br is not supported; send the body uncompressed"]}"# + "\n")
        #expect(harness.state.metrics.count(of: .unsupportedMediaType) == 1)
        let identity = try PipelineHarness()
        #expect(try identity.send(PipelineHarness.post(#"{"user":"a"}"#, headers: ["Content-Encoding: identity"])).map(\.status) == [202])
    }

    /// A field given on two lines is read whole: `identity` on the first line does not let
    /// `gzip` on the second through, and a media type must come once, whatever the first says.
    @Test(arguments: [
        (["Content-Encoding: identity", "Content-Encoding: gzip"], "Content-Encoding identity, gzip is not supported; send the body uncompressed"),
        (["Content-Type: application/x-www-form-urlencoded", "Content-Type: multipart/form-data"], "Content-Type given more than once; send one"),
        (["Content-Type: application/json; charset=utf-8", "Content-Type: text/plain"], "Content-Type given more than once; send one"),
        (["Content-Type: application/json", "Content-Type: application/json"], "Content-Type given more than once; send one"),
    ])
    func aFieldRepeatedOnSeveralLinesIsReadWhole(lines: [String], problem: String) throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(PipelineHarness.post(#"{"user":"a"}"#, headers: lines))
        #expect(responses.map(\.status) == [415])
        #expect(responses.first?.text == #"{"error":"unsupported media type","problems":["\#(problem)"]}"# + "\n")
        #expect(harness.state.metrics.count(of: .unsupportedMediaType) == 1)
        #expect(harness.state.metrics.requests.value(["a", "", ""]) == 0)
    }
}

@Suite struct ProtocolEdgeTests {
    /// NIO's decoder parses nothing after a request that asks to upgrade: answer it and close,
    /// rather than leave the client waiting on a silent connection.
    @Test func upgradeRequestIsAnsweredThenClosed() throws {
        let harness = try PipelineHarness()
        let upgrade = "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        let responses = try harness.send(upgrade + PipelineHarness.get("/healthz"))
        #expect(responses.map(\.status) == [200])
        #expect(responses[0].header("connection") == "close")
        #expect(!harness.channel.isActive)
    }

    @Test(arguments: ["http://usage-tracking.llm-d.svc/track", "http://10.0.0.1:8080/track?x=1", "HTTPS://Host/track"])
    func absoluteFormTargetsAreRoutedByTheirPath(target: String) throws {
        let harness = try PipelineHarness()
        let body = #"{"user":"proxied"}"#
        let request = "POST \(target) HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        #expect(try harness.send(request).map(\.status) == [202])
        #expect(harness.state.metrics.requests.value(["proxied", "", ""]) == 1)
    }

    @Test func routePathsDropSchemeAuthorityAndQuery() {
        #expect(Route.path(of: "/track?x=1") == "/track")
        #expect(Route.path(of: "http://h:1/metrics?a") == "/metrics")
        #expect(Route.path(of: "http://h") == "/")
        #expect(Route(uri: "http://h/healthz") == .healthz)
    }

    @Test func mediaTypeWithATabBeforeItsParametersIsJSON() throws {
        let harness = try PipelineHarness()
        let responses = try harness.send(PipelineHarness.post(#"{"user":"tab"}"#, headers: ["Content-Type: application/json\t;charset=utf-8"]))
        #expect(responses.map(\.status) == [202])
    }

    /// Client-chosen text is echoed cut to 64 bytes, in the log, the debug view and replies.
    @Test func requestIDsAndPathsAreTruncatedWhereEchoed() throws {
        let harness = try PipelineHarness()
        let longID = String(repeating: "r", count: 2000)
        _ = try harness.send(PipelineHarness.post(#"{"groups":1}"#, headers: ["Content-Type: application/json", "x-request-id: \(longID)"]))
        let expected = String(repeating: "r", count: 61) + "…"
        let log = harness.logs.all.first { $0.contains("callback rejected") } ?? ""
        #expect(log.contains(#""request_id":"\#(expected)""#))
        #expect(!log.contains(String(repeating: "r", count: 62)))
        let debug = try harness.send(PipelineHarness.get("/debug"))[0].text
        #expect(debug.contains(#""request_id":"\#(expected)""#))
        let notFound = try harness.send(PipelineHarness.get("/" + String(repeating: "p", count: 500)))[0].text
        #expect(notFound == #"{"error":"not found","problems":["no route for /\#(String(repeating: "p", count: 60))…"]}"# + "\n")
    }
}

/// From SIGTERM on, replies close their connections, so keep-alive callers move on.
@Suite struct StoppingConnectionTests {
    @Test func repliesCloseOnceStopping() throws {
        let harness = try PipelineHarness()
        #expect(try harness.send(PipelineHarness.post(#"{"user":"before"}"#))[0].header("connection") == nil)
        harness.state.stopping.store(true, ordering: .relaxed)
        let responses = try harness.send(PipelineHarness.post(#"{"user":"during"}"#))
        #expect(responses.map(\.status) == [202])
        #expect(responses[0].header("connection") == "close")
        #expect(!harness.channel.isActive)
        #expect(harness.state.metrics.requests.value(["during", "", ""]) == 1)
    }

    /// Requests already received in full are all answered; only the last reply closes. (A request
    /// pipelined after the reply that closes is, by HTTP's rules, known to the client as not
    /// processed.)
    @Test func requestsWaitingWhenStoppingAreAllAnswered() throws {
        let work = OffLoopReplyTests.HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        let batch = PipelineHarness.get("/metrics") + PipelineHarness.post(#"{"user":"one"}"#) + PipelineHarness.post(#"{"user":"two"}"#)
        #expect(try harness.send(batch).isEmpty)
        harness.state.stopping.store(true, ordering: .relaxed)
        work.release()
        let responses = try harness.responses()
        #expect(responses.map(\.status) == [200, 202, 202])
        #expect(responses.map { $0.header("connection") } == [nil, nil, "close"])
        #expect(harness.state.metrics.requests.value(["two", "", ""]) == 1)
        #expect(!harness.channel.isActive)
    }
}

@Suite struct UnreadRepliesTests {
    /// A client that stops reading cannot keep its queued requests, and the connection, forever.
    @Test func connectionWhoseRepliesGoUnreadIsClosedAtTheIdleTimeout() throws {
        let harness = try PipelineHarness { $0.idleTimeout = .seconds(5) }
        harness.setWritable(false)
        #expect(try harness.send(PipelineHarness.get("/healthz")).isEmpty)
        harness.channel.embeddedEventLoop.advanceTime(by: .seconds(4))
        #expect(harness.channel.isActive)
        harness.channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(!harness.channel.isActive)
    }
}

/// A socket that has not taken its writes yet: the bytes pass on (so the test reads them), the
/// promises are kept until the test says the socket took them, or failed them.
final class UntakenWrites: ChannelOutboundHandler, @unchecked Sendable {
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    var held: [EventLoopPromise<Void>] = []

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if let promise { self.held.append(promise) }
        context.write(data, promise: nil)
    }

    func take(_ result: Result<Void, any Error>) {
        let first = self.held.removeFirst()
        first.completeWith(result)
    }
}

/// `/metrics` replies are held at most `MetricsEndpoint.maxHeldReplies` at once, from their
/// render until their sockets take them: scrapers that do not read cannot hold a copy each.
@Suite struct MetricsReplyBoundTests {
    @Test func aScrapeBeyondTheHeldRepliesIsRefusedUntilOneIsTaken() throws {
        let harness = try PipelineHarness()
        let socket = try harness.untakenWrites()
        let limit = MetricsEndpoint.maxHeldReplies
        let responses = try harness.send(String(repeating: PipelineHarness.get("/metrics"), count: limit + 1))
        #expect(responses.map(\.status) == Array(repeating: 200, count: limit) + [503])
        #expect(responses.last?.header("retry-after") == "1")
        #expect(responses.last?.text == #"{"error":"too many /metrics replies are in progress","problems":["at most 4 are held, from the request until its scraper has read the reply; retry once one has"]}"# + "\n")
        #expect(harness.state.metricsReplies.held == limit)
        #expect(socket.held.count == limit, "only the replies holding a slot wait for the socket")

        socket.take(.success(()))
        #expect(harness.state.metricsReplies.held == limit - 1)
        #expect(try harness.send(PipelineHarness.get("/metrics")).map(\.status) == [200])
        // A write that fails (the connection went) gives its slot back too.
        socket.take(.failure(ChannelError.ioOnClosedChannel))
        #expect(harness.state.metricsReplies.held == limit - 1)
        while !socket.held.isEmpty { socket.take(.success(())) }
        #expect(harness.state.metricsReplies.held == 0)
    }

    /// A reply that closes its connection, and a reply to HEAD, keep their slots until the socket
    /// has taken them too.
    @Test(arguments: [PipelineHarness.get("/metrics", headers: ["Connection: close"]), PipelineHarness.get("/metrics", method: "HEAD")])
    func closingAndHeadRepliesKeepTheirSlotsUntilTaken(request: String) throws {
        let harness = try PipelineHarness()
        let socket = try harness.untakenWrites()
        #expect(try harness.send(request).map(\.status) == [200])
        #expect(harness.state.metricsReplies.held == 1)
        socket.take(.success(()))
        #expect(harness.state.metricsReplies.held == 0)
    }

    /// A render whose connection closed before its reply was written gives its slot back.
    @Test func aRenderWhoseConnectionClosedGivesItsSlotBack() throws {
        let work = OffLoopReplyTests.HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        #expect(try harness.send(PipelineHarness.get("/metrics")).isEmpty)
        #expect(work.count == 1)
        _ = try harness.channel.finish()
        work.release()
        #expect(harness.state.metricsReplies.held == 0)
    }

    /// Scrapes and pages share one render thread: how many of either may wait for it is bounded,
    /// so a scrape waits behind at most `Router.maxPageRenders` page renders, not any number.
    @Test(arguments: [("/metrics", MetricsEndpoint.maxHeldReplies), ("/debug?user=x", Router.maxPageRenders), ("/", Router.maxPageRenders)])
    func requestsWaitingForTheRenderThreadAreBounded(path: String, limit: Int) throws {
        let work = OffLoopReplyTests.HeldWork()
        let harness = try PipelineHarness(runOffLoop: work.runner())
        // One connection each, as pipelined requests on one wait for the reply before them.
        let connections = try (0...limit).map { _ in try harness.connection() }
        for connection in connections.dropLast() {
            try connection.writeInbound(ByteBuffer(string: PipelineHarness.get(path)))
        }
        #expect(work.count == limit)
        try connections[limit].writeInbound(ByteBuffer(string: PipelineHarness.get(path)))
        let refused = try PipelineHarness.responses(of: connections[limit])
        #expect(refused.map(\.status) == [503])
        #expect(refused.first?.header("retry-after") == "1")
        #expect(work.count == limit, "the refused request is not queued")
        let expected = path == "/metrics"
            ? #"{"error":"too many /metrics replies are in progress","problems":["at most 4 are held, from the request until its scraper has read the reply; retry once one has"]}"#
            : #"{"error":"too many status page and /debug requests are in progress","problems":["at most 4 are rendered or wait to be at once, so that scrapes do not wait behind them; retry once one is answered"]}"#
        #expect(refused.first?.text == expected + "\n")
        // The other kind still has its own places.
        let other = try harness.connection()
        try other.writeInbound(ByteBuffer(string: PipelineHarness.get(path == "/metrics" ? "/debug" : "/metrics")))
        #expect(work.count == limit + 1)
        work.release()
        #expect(try connections.dropLast().map { try PipelineHarness.responses(of: $0).map(\.status) } == Array(repeating: [200], count: limit))
        #expect(harness.state.pageRenders.held == 0, "a page's place is given back once it is rendered")
        try connections[limit].writeInbound(ByteBuffer(string: PipelineHarness.get(path)))
        #expect(work.count == 1, "a place is free again")
    }

    @Test func slotsAreTakenUpToTheLimitAndGivenBackWhenFreed() {
        let slots = ReplySlots(limit: 2)
        var first = slots.take()
        let second = slots.take()
        #expect(first != nil && second != nil && slots.take() == nil && slots.held == 2)
        first = nil
        #expect(slots.held == 1 && slots.take() != nil, "a slot freed is a slot to take")
        _ = (first, second)
    }
}
