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
    private let extProc: ExtProcListener?
    /// Background work that ends with the server: the secret file watcher and the memory releaser.
    private let housekeeping: [Task<Void, Never>]
    private enum ShutdownPhase {
        case running, draining(Task<Void, Never>), stopping
    }
    private let phase = Mutex(ShutdownPhase.running)

    private init(
        state: ServerState, group: MultiThreadedEventLoopGroup, renderPool: NIOThreadPool, listener: Channel,
        connections: OpenConnections, extProc: ExtProcListener?, housekeeping: [Task<Void, Never>]
    ) {
        self.state = state
        self.group = group
        self.renderPool = renderPool
        self.listener = listener
        self.localAddress = listener.localAddress!
        self.connections = connections
        self.extProc = extProc
        self.housekeeping = housekeeping
    }

    public static func start(
        configuration: ServerConfiguration, logger: Logger
    ) async throws -> UsageTrackingServer {
        let secrets = try CallbackSecrets(value: configuration.callbackSecret, filePath: configuration.callbackSecretFile)
        if configuration.schema.needsHMACKey, configuration.labelHMACKey?.isEmpty ?? true {
            throw ConfigurationError.missingHMACKey
        }
        let requestIDs = configuration.dedupeHeader.map { _ in
            RequestIDWindow(window: configuration.dedupeWindow.nanoseconds / 1_000_000_000, maxIDs: configuration.dedupeMaxIDs)
        }
        let metrics = UsageMetrics(
            schema: configuration.schema, newSeriesHoldNanoseconds: UInt64(max(0, configuration.newSeriesHold.nanoseconds)),
            droppedLogLines: { LogLineWriter.standardOutput.dropped },
            requestIDs: requestIDs,
            ledger: configuration.stateDirectory != nil || configuration.ledgerURL != nil ? LedgerHealth(open: configuration.ledgerURL == nil) : nil,
            extProc: configuration.extProc.map { _ in ExtProcCounters() }
        )
        // Counts come back from the ledger before the listener opens, so no scrape sees a reset
        // (a database not reachable yet: /metrics is not served until they are back).
        var writer: LedgerWriter?
        var usageReader: PostgresUsageReader?
        if let directory = configuration.stateDirectory {
            writer = try LedgerWriter.open(directory, configuration: configuration, metrics: metrics, logger: logger)
        } else if let address = configuration.ledgerURL {
            let password = configuration.ledgerPassword ?? ""
            writer = try await LedgerWriter.open(address, password: password, configuration: configuration, metrics: metrics, logger: logger)
            usageReader = PostgresUsageReader(address: address, password: password, logger: logger)
        }
        let renderPool = NIOThreadPool(numberOfThreads: 1)
        renderPool.start()
        let state = ServerState(
            configuration: configuration, logger: logger, metrics: metrics, secrets: secrets, ledgerWriter: writer, usageReader: usageReader,
            runOffLoop: { eventLoop, work in renderPool.runIfActive(eventLoop: eventLoop, work) }
        )
        state.logAuthentication()

        let group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.eventLoopThreads)
        func abandon() async {
            await writer?.stop()
            await usageReader?.shutdown()
            try? await group.shutdownGracefully()
            try? await renderPool.shutdownGracefully()
        }
        let connections = OpenConnections()
        let listener: Channel
        do {
            listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .limitingConnections(to: configuration.maxConnections, logger: logger)
                .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                // Bounds what one read cycle can bring in while replies are held back (4 x 64 KiB).
                .childChannelOption(.maxMessagesPerRead, value: 4)
                .childChannelInitializer { channel in
                    connections.add(channel)
                    return channel.eventLoop.makeCompletedFuture { try HTTPPipeline.configure(channel, state: state) }
                }
                .bind(host: configuration.host, port: configuration.port)
                .get()
        } catch {
            await abandon()
            throw ListenError(host: configuration.host, port: configuration.port, underlying: error)
        }
        let extProc: ExtProcListener?
        do {
            extProc = try await ExtProcListener.start(state, group: group) { report in
                if let decoder = state.tokenDecoder { TokenCounting.count(report, state: state, decoder: decoder, on: group.next()) }
            }
        } catch {
            try? await listener.close()
            await abandon()
            throw error
        }

        let watcher = state.watchSecretFile()

        // glibc keeps freed memory for reuse and seldom returns pages from the middle of its heaps:
        // without this, the peak of a burst (a large scrape, a flood of connections) stays resident.
        let memoryReleaser = Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(10))
                _ = releaseFreeMemory(0)
            }
        }
        let server = UsageTrackingServer(
            state: state, group: group, renderPool: renderPool, listener: listener, connections: connections, extProc: extProc,
            housekeeping: [watcher, memoryReleaser].compactMap { $0 }
        )
        state.ready.store(true, ordering: .relaxed)
        let address = "\(server.localAddress.ipAddress ?? configuration.host):\(server.localAddress.port ?? configuration.port)"
        logger.info("listening", metadata: ["address": "\(address)", "version": "\(UsageMetrics.version)"])
        return server
    }

    /// Re-reads the secret file now (SIGHUP), as the watcher does when the file changes.
    public func reloadSecrets() {
        self.state.reloadSecrets(force: true)
    }

    /// Reports not-ready and keeps serving for the drain delay, replying `connection: close` so
    /// keep-alive callers move to another replica; then stops accepting, lets every connection
    /// finish the request it is in (up to the shutdown timeout), closes what is left and stops the
    /// event loops. A second call during the drain ends the drain early (a second SIGTERM).
    public func shutdown() async {
        let delay = self.state.configuration.drainDelay
        let first = self.phase.withLock { phase -> Bool in
            guard case .running = phase else {
                if case .draining(let drain) = phase { drain.cancel() }
                return false
            }
            phase = delay > .zero ? .draining(Task { try? await Task.sleep(for: .nanoseconds(delay.nanoseconds)) }) : .stopping
            return true
        }
        guard first else { return }
        self.state.stopping.store(true, ordering: .relaxed)
        self.state.ready.store(false, ordering: .relaxed)
        self.housekeeping.forEach { $0.cancel() }
        if case .draining(let drain) = self.phase.withLock({ $0 }) {
            self.state.logger.info("draining: /readyz reports 503, replies close their connections", metadata: ["seconds": "\(Double(delay.nanoseconds) / 1e9)"])
            await drain.value
            if drain.isCancelled { self.state.logger.info("drain ended early by a second signal") }
            self.phase.withLock { $0 = .stopping }
        }
        self.state.logger.info("shutting down", metadata: ["connections": "\(self.connections.all.count)"])
        try? await self.listener.close()
        self.extProc?.beginGracefulShutdown()
        for channel in self.connections.all {
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        let deadline = NIODeadline.now() + self.state.configuration.shutdownTimeout
        while NIODeadline.now() < deadline, !self.connections.all.isEmpty || self.state.metrics.extProc?.streamsOpen ?? 0 > 0 {
            try? await Task.sleep(for: .milliseconds(20))
        }
        for channel in self.connections.all {
            try? await channel.close()
        }
        await self.extProc?.stop()
        // After the last callback, before the event loops that its futures complete on stop.
        await self.state.ledgerWriter?.stop()
        await self.state.usage?.reader.shutdown()
        try? await self.group.shutdownGracefully()
        try? await self.renderPool.shutdownGracefully()
        self.state.logger.info("stopped")
    }
}

/// Why the listener could not open, naming the address (a busy port, an address not on this host).
struct ListenError: Error, CustomStringConvertible {
    var host: String
    var port: Int
    var underlying: Error

    var description: String { "cannot listen on \(self.host):\(self.port): \(self.underlying)" }
}

/// The connections currently open, so shutdown can ask each to finish and wait for them.
final class OpenConnections: Sendable {
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

/// glibc's `malloc_trim`, which Swift's Glibc module does not export (it lives in malloc.h).
@_silgen_name("malloc_trim")
private func releaseFreeMemory(_ pad: Int) -> Int32
