import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import UsageTrackingCore

/// The running service. `start` builds everything from a `ServerConfiguration`, so `main` and
/// the tests run exactly the same server.
public final class UsageTrackingServer: Sendable {
    /// Where the server listens; with port 0 in the configuration, the port the OS chose.
    public let localAddress: SocketAddress
    private let state: ServerState
    private let group: MultiThreadedEventLoopGroup
    private let renderPool: NIOThreadPool
    private let listener: Channel
    private let connections: OpenConnections
    private let secretWatcher: Task<Void, Never>?
    private let stopped = Mutex(false)

    private init(
        state: ServerState, group: MultiThreadedEventLoopGroup, renderPool: NIOThreadPool, listener: Channel,
        connections: OpenConnections, secretWatcher: Task<Void, Never>?
    ) {
        self.state = state
        self.group = group
        self.renderPool = renderPool
        self.listener = listener
        self.localAddress = listener.localAddress!
        self.connections = connections
        self.secretWatcher = secretWatcher
    }

    /// The pipeline of one connection: NIO's request decoder with our limits, then our handler.
    /// Tests build the same pipeline on an `EmbeddedChannel`.
    static func configurePipeline(_ channel: Channel, state: ServerState) throws {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = state.configuration.maxHeaderBytes
        limits.maxHeaderFieldSize = state.configuration.maxHeaderBytes
        try channel.pipeline.syncOperations.addHandlers([
            ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, informationalResponseStrategy: .drop, limitConfiguration: limits)),
            HTTPConnectionHandler(state: state),
        ])
    }

    public static func start(
        configuration: ServerConfiguration, logger: Logger
    ) async throws -> UsageTrackingServer {
        let secrets = try CallbackSecrets(value: configuration.callbackSecret, filePath: configuration.callbackSecretFile)
        let renderPool = NIOThreadPool(numberOfThreads: 1)
        renderPool.start()
        let state = ServerState(
            configuration: configuration, logger: logger, metrics: UsageMetrics(), secrets: secrets,
            runOffLoop: { eventLoop, work in renderPool.runIfActive(eventLoop: eventLoop, work) }
        )
        Self.logAuthentication(state)

        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopThreads))
        let connections = OpenConnections()
        let listener: Channel
        do {
            listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                .childChannelOption(.maxMessagesPerRead, value: 16)
                .childChannelInitializer { channel in
                    connections.add(channel)
                    return channel.eventLoop.makeCompletedFuture { try Self.configurePipeline(channel, state: state) }
                }
                .bind(host: configuration.host, port: configuration.port)
                .get()
        } catch {
            try? await group.shutdownGracefully()
            try? await renderPool.shutdownGracefully()
            throw error
        }

        let watcher: Task<Void, Never>? = secrets.filePath == nil ? nil : Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: configuration.secretReloadInterval)
                switch secrets.reloadIfChanged() {
                case .unchanged: break
                case .reloaded(let count): logger.info("callback secrets reloaded", metadata: ["secrets": "\(count)"])
                case .emptied: logger.warning("callback secret file holds no secret; callbacks without another configured secret are refused", metadata: ["secrets": "\(secrets.count)"])
                case .failed(let reason): logger.error("callback secrets not reloaded; keeping the previous ones", metadata: ["reason": "\(reason)"])
                }
            }
        }

        let server = UsageTrackingServer(state: state, group: group, renderPool: renderPool, listener: listener, connections: connections, secretWatcher: watcher)
        state.ready.store(true, ordering: .relaxed)
        let address = "\(server.localAddress.ipAddress ?? configuration.host):\(server.localAddress.port ?? configuration.port)"
        logger.info("listening", metadata: ["address": "\(address)", "version": "\(UsageMetrics.version)"])
        return server
    }

    /// Reports not-ready and keeps serving for the drain delay, then stops accepting, lets every
    /// connection finish the request it is in (up to the shutdown timeout), closes what is left
    /// and stops the event loops. Safe to call twice.
    public func shutdown() async {
        let first = self.stopped.withLock { stopped in
            defer { stopped = true }
            return !stopped
        }
        guard first else { return }
        self.state.ready.store(false, ordering: .relaxed)
        self.secretWatcher?.cancel()
        let drain = self.state.configuration.drainDelay
        if drain > .zero {
            self.state.logger.info("draining: /readyz reports 503", metadata: ["seconds": "\(Double(drain.nanoseconds) / 1e9)"])
            try? await Task.sleep(for: .nanoseconds(drain.nanoseconds))
        }
        self.state.logger.info("shutting down", metadata: ["connections": "\(self.connections.all.count)"])
        try? await self.listener.close()
        for channel in self.connections.all {
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        let deadline = NIODeadline.now() + self.state.configuration.shutdownTimeout
        while NIODeadline.now() < deadline, !self.connections.all.isEmpty {
            try? await Task.sleep(for: .milliseconds(20))
        }
        for channel in self.connections.all {
            try? await channel.close()
        }
        try? await self.group.shutdownGracefully()
        try? await self.renderPool.shutdownGracefully()
        self.state.logger.info("stopped")
    }

    private static func logAuthentication(_ state: ServerState) {
        let config = state.configuration
        guard state.secrets.isRequired else {
            state.logger.warning("no callback secret configured: /track accepts callbacks from anyone who can reach it")
            return
        }
        var sources: [String] = []
        if config.callbackSecret != nil { sources.append("environment") }
        if config.callbackSecretFile != nil { sources.append("file") }
        let mode = config.callbackSecretHeader.lowercased() == "authorization" ? "bearer" : "custom-header"
        state.logger.info(
            "callback authentication required",
            metadata: [
                "mode": "\(mode)", "header": "\(config.callbackSecretHeader)", "sources": "\(sources.joined(separator: ","))",
                "secrets": "\(state.secrets.count)",
            ]
        )
    }
}

/// The connections currently open, so shutdown can ask each to finish and wait for them.
private final class OpenConnections: Sendable {
    private let channels = Mutex<[ObjectIdentifier: Channel]>([:])

    func add(_ channel: Channel) {
        let id = ObjectIdentifier(channel)
        self.channels.withLock { $0[id] = channel }
        channel.closeFuture.whenComplete { _ in
            self.channels.withLock { _ = $0.removeValue(forKey: id) }
        }
    }

    var all: [Channel] { self.channels.withLock { Array($0.values) } }
}
