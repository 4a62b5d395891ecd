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
        if configuration.schema.needsHMACKey, configuration.labelHMACKey?.isEmpty ?? true {
            throw ConfigurationError.missingHMACKey
        }
        let requestIDs = configuration.dedupeHeader.map { _ in
            RequestIDWindow(window: configuration.dedupeWindow.nanoseconds / 1_000_000_000, maxIDs: configuration.dedupeMaxIDs)
        }
        let metrics = UsageMetrics(
            schema: configuration.schema, newSeriesHoldNanoseconds: UInt64(max(0, configuration.newSeriesHold.nanoseconds)),
            droppedLogLines: { LogLineWriter.standardOutput.dropped },
            requestIDs: requestIDs, ledger: configuration.stateDirectory.map { _ in LedgerHealth() },
            extProc: configuration.extProc.map { _ in ExtProcCounters() }
        )
        // Counts come back from the ledger before the listener opens, so no scrape sees a reset.
        let writer = try configuration.stateDirectory.map { directory in
            try Self.openLedger(directory, configuration: configuration, metrics: metrics, logger: logger)
        }
        let renderPool = NIOThreadPool(numberOfThreads: 1)
        renderPool.start()
        let state = ServerState(
            configuration: configuration, logger: logger, metrics: metrics, secrets: secrets, ledgerWriter: writer,
            runOffLoop: { eventLoop, work in renderPool.runIfActive(eventLoop: eventLoop, work) }
        )
        Self.logAuthentication(state)
        if secrets.isRequired {
            state.status?.events.recordReload(.init(time: wallClock(), result: "loaded at startup: \(secrets.count) secrets"))
        }

        let group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.eventLoopThreads)
        func abandon() async {
            await writer?.stop()
            try? await group.shutdownGracefully()
            try? await renderPool.shutdownGracefully()
        }
        let connections = OpenConnections()
        let listener: Channel
        do {
            listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .serverChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            ConnectionLimiter(maxConnections: configuration.maxConnections, logger: logger)
                        )
                    }
                }
                .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                // Bounds what one read cycle can bring in while replies are held back (4 x 64 KiB).
                .childChannelOption(.maxMessagesPerRead, value: 4)
                .childChannelInitializer { channel in
                    connections.add(channel)
                    return channel.eventLoop.makeCompletedFuture { try Self.configurePipeline(channel, state: state) }
                }
                .bind(host: configuration.host, port: configuration.port)
                .get()
        } catch {
            await abandon()
            throw ListenError(host: configuration.host, port: configuration.port, underlying: error)
        }
        let extProc: ExtProcListener?
        do {
            extProc = try await ExtProcListener.start(configuration, counters: metrics.extProc, group: group, logger: logger) { report in
                logger.debug("ext_proc stream ended", metadata: report.logMetadata)
            }
        } catch {
            try? await listener.close()
            await abandon()
            throw error
        }

        let watcher: Task<Void, Never>? = secrets.filePath == nil ? nil : Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: configuration.secretReloadInterval)
                Self.reloadSecrets(state, force: false)
            }
        }

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

    private static func openLedger(
        _ directory: String, configuration: ServerConfiguration, metrics: UsageMetrics, logger: Logger
    ) throws -> LedgerWriter {
        let started = monotonicNanoseconds()
        let ledger: UsageLedger
        let restored: UsageLedger.Restored
        do {
            ledger = try UsageLedger(
                directory: directory, families: metrics.families, seriesIDs: metrics.seriesIDs, retentionDays: configuration.ledgerRetentionDays
            )
            restored = try ledger.restore(into: metrics, requestIDs: metrics.requestIDs, now: LedgerWriter.now())
        } catch {
            throw StateDirectoryError(underlying: error)
        }
        logger.info(
            "ledger restored",
            metadata: [
                "file": "\(ledger.path)", "series": "\(restored.series)", "request_ids": "\(restored.requestIDs)",
                "seconds": "\(Double(monotonicNanoseconds() - started) / 1e9)", "fsync": "\(configuration.fsync.rawValue)",
            ]
        )
        if restored.unexposedSeries > 0 {
            logger.notice(
                "the ledger holds series of metrics the config no longer has: kept in the ledger, not exposed",
                metadata: ["series": "\(restored.unexposedSeries)", "metrics": .array(restored.unexposedMetrics.map { .string($0) })]
            )
        }
        let writer = LedgerWriter(
            ledger: ledger, mode: configuration.fsync, interval: configuration.fsyncInterval, metrics: metrics,
            health: metrics.ledger!, logger: logger
        )
        writer.start()
        return writer
    }

    /// Re-reads the secret file now (SIGHUP), as the watcher does when the file changes.
    public func reloadSecrets() {
        Self.reloadSecrets(self.state, force: true)
    }

    private static func reloadSecrets(_ state: ServerState, force: Bool) {
        let result = state.secrets.reloadIfChanged(force: force)
        if let summary = Self.statusSummary(result) {
            state.status?.events.recordReload(.init(time: wallClock(), result: summary))
        }
        switch result {
        case .unchanged: break
        case .reloaded(let count):
            state.logger.info("callback secrets reloaded", metadata: ["secrets": "\(count)"])
        case .emptied:
            state.logger.warning(
                "callback secret file holds no secret; callbacks without another configured secret are refused",
                metadata: ["file": "\(state.secrets.filePath ?? "")", "secrets": "\(state.secrets.count)"]
            )
        case .failed(let reason):
            state.logger.error("callback secrets not reloaded; keeping the previous ones", metadata: ["reason": "\(reason)"])
        }
    }

    /// How the status page words a reload; nil when nothing changed (checked every 2 s).
    static func statusSummary(_ result: CallbackSecrets.Reload) -> String? {
        switch result {
        case .unchanged: nil
        case .reloaded(let count): "reloaded: \(count) secrets in the file"
        case .emptied: "the file holds no secret; only the environment's secret (if any) is accepted"
        case .failed(let reason): "failed, previous secrets kept: \(reason)"
        }
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

/// Why the listener could not open, naming the address (a busy port, an address not on this host).
struct ListenError: Error, CustomStringConvertible {
    var host: String
    var port: Int
    var underlying: Error

    var description: String { "cannot listen on \(self.host):\(self.port): \(self.underlying)" }
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

/// The state directory cannot be used; says which flag set it.
struct StateDirectoryError: Error, CustomStringConvertible {
    var underlying: any Error
    var description: String { "--state-dir (USAGE_TRACKING_STATE_DIR): \(self.underlying)" }
}

/// A configuration the server cannot run with.
public enum ConfigurationError: Error, CustomStringConvertible {
    case missingHMACKey

    public var description: String {
        switch self {
        case .missingHMACKey: "a label is hashed (hash: hmac-sha256) but no key was given (--label-hmac-key-file, USAGE_TRACKING_LABEL_HMAC_KEY_FILE)"
        }
    }
}

/// glibc's `malloc_trim`, which Swift's Glibc module does not export (it lives in malloc.h).
@_silgen_name("malloc_trim")
private func releaseFreeMemory(_ pad: Int) -> Int32
