import Logging
import NIOCore
import NIOHTTP2
import NIOPosix
import UsageTrackingCore

/// The Envoy ext_proc listener: gRPC's `ExternalProcessor/Process` over plaintext HTTP/2 (h2c
/// with prior knowledge, as Envoy's gRPC client speaks it to a cluster without TLS), on the HTTP
/// server's event loops, one `ExtProcStreamHandler` per stream.
final class ExtProcListener: Sendable {
    /// The largest ProcessingRequest taken (gRPC's usual 4 MiB). Envoy sends at most its buffer
    /// limit of body per message (1 MiB per connection unless configured), and a header map far
    /// smaller; a larger message ends its stream as `invalid_message`.
    static let maxMessageBytes = 4 << 20

    private let listener: Channel
    private let connections: OpenConnections

    private init(listener: Channel, connections: OpenConnections) {
        self.listener = listener
        self.connections = connections
    }

    /// Starts the listener `configuration.extProc` asks for (nil when it is off); `report`
    /// receives every stream's report, on the stream's event loop.
    static func start(
        _ state: ServerState, group: MultiThreadedEventLoopGroup, report: @escaping @Sendable (TokenStreamReport) -> Void
    ) async throws -> ExtProcListener? {
        let configuration = state.configuration
        guard var settings = configuration.extProc, let counters = state.metrics.extProc, let decoder = state.tokenDecoder else { return nil }
        // A stream keeps the headers the token families read, and the request id they dedupe on.
        settings.headers.labels = decoder.headerNames
        if let header = configuration.dedupeHeader { settings.headers.requestID = header.lowercased() }
        settings.messageTimeout = .nanoseconds(configuration.requestTimeout.nanoseconds)
        let streamSettings = settings
        let connections = OpenConnections()
        let (connection, stream) = Self.http2Configuration(maxStreams: settings.maxStreams)
        let maxValueBytes = configuration.maxLabelBytes
        let listener: Channel
        do {
            listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                // Each connection holds its HTTP/2 state (about 160 KB with the limits above), so
                // they are capped as the HTTP listener's are (--max-connections).
                .limitingConnections(to: configuration.maxConnections, logger: state.logger)
                .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { channel in
                    connections.add(channel)
                    return channel.eventLoop.makeCompletedFuture {
                        let sync = channel.pipeline.syncOperations
                        _ = try sync.configureHTTP2Pipeline(mode: .server, connectionConfiguration: connection, streamConfiguration: stream) { stream in
                            stream.eventLoop.makeCompletedFuture {
                                try stream.pipeline.syncOperations.addHandler(
                                    ExtProcStreamHandler(settings: streamSettings, maxValueBytes: maxValueBytes, counters: counters, report: report)
                                )
                            }
                        }
                        // GOAWAY and then close once the streams are done, on ChannelShouldQuiesceEvent.
                        try sync.addHandler(
                            NIOHTTP2ServerConnectionManagementHandler(
                                eventLoop: channel.eventLoop, configuration: .init(maxIdleTime: nil, maxAge: nil, maxGraceTime: nil, keepalive: nil)
                            )
                        )
                    }
                }
                .bind(host: configuration.host, port: settings.port)
                .get()
        } catch {
            throw ListenError(host: configuration.host, port: settings.port, underlying: error)
        }
        // With port 0, the port the OS chose: the log is where tests and operators read it.
        let bound = listener.localAddress
        let address = "\(bound?.ipAddress ?? configuration.host):\(bound?.port ?? settings.port)"
        state.logger.info("listening ext_proc", metadata: ["address": "\(address)"])
        return ExtProcListener(listener: listener, connections: connections)
    }

    /// HTTP/2's settings and flood guards, set for Envoy: few connections (one per worker), each
    /// carrying many streams, many of which Envoy resets.
    static func http2Configuration(maxStreams: Int) -> (NIOHTTP2Handler.ConnectionConfiguration, NIOHTTP2Handler.StreamConfiguration) {
        var connection = NIOHTTP2Handler.ConnectionConfiguration()
        connection.initialSettings = [
            // Envoy multiplexes many ext_proc streams over few connections: HTTP/2's own default of
            // 100 per connection would refuse streams long before our cap; one more than the cap, so
            // a client at the cap on one connection meets our refusal, not a wait.
            HTTP2Setting(parameter: .maxConcurrentStreams, value: maxStreams + 1),
            // Request headers from Envoy are a few hundred bytes (the identity is in the messages).
            HTTP2Setting(parameter: .maxHeaderListSize, value: 16 << 10),
            // Body chunks come in messages of up to Envoy's buffer limit (1 MiB): fewer, larger frames.
            HTTP2Setting(parameter: .maxFrameSize, value: 64 << 10),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
        ]
        // Room for many streams' chunks in flight; what a stream holds is bounded by the message bound.
        connection.targetWindowSize = 8 << 20
        // swift-nio-http2 closes a connection (GOAWAY ENHANCE_YOUR_CALM) after 200 RST_STREAMs or
        // stream errors in 30 s, and after 200 stream errors in its whole life ("glitches"). Envoy
        // resets ext_proc streams in ordinary traffic (client cancels, upstream resets, a filter
        // done with a stream), so at a few streams a second those guards closed connections and
        // lost the counts of every stream on them (3 in 1,000 under load). A reset costs us a
        // stream's open and close, and `maxStreams` bounds what open streams hold, so allow
        // 10,000 in 10 s (1,000 a second, or a full default cap at once) per connection; the
        // limiter keeps a timestamp per event, 80 KB each at this figure. The lifetime glitch
        // count is the windowed error limit's job already.
        var stream = NIOHTTP2Handler.StreamConfiguration()
        stream.targetWindowSize = 1 << 20
        stream.streamResetFrameRateLimit.maximumCount = 10_000
        stream.streamResetFrameRateLimit.windowLength = .seconds(10)
        stream.streamErrorRateLimit.maximumCount = 10_000
        stream.streamErrorRateLimit.windowLength = .seconds(10)
        connection.maximumConnectionGlitches = Int(Int32.max)
        return (connection, stream)
    }

    /// Stops accepting connections and asks each open one to stop taking streams (GOAWAY); the
    /// streams open go on until they end or `stop`.
    func beginGracefulShutdown() {
        self.listener.close(promise: nil)
        for channel in self.connections.all {
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
    }

    /// Closes every connection, so each stream still open is reported as aborted, and waits for
    /// them to close.
    func stop() async {
        try? await self.listener.close()
        for channel in self.connections.all {
            try? await channel.close()
        }
    }
}
