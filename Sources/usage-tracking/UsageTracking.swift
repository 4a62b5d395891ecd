import ArgumentParser
import Dispatch
import Glibc
import Logging
import NIOCore
import UsageTrackingCore
import UsageTrackingServer

/// Parses flags (each with an environment variable) into a `ServerConfiguration` and runs the
/// server until SIGTERM or SIGINT.
@main
struct UsageTracking: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "usage-tracking",
        abstract: "Counts Authorino callbacks per user, group and path and serves them to Prometheus.",
        discussion: """
            Endpoints: POST /track (the callback), GET /metrics, GET /healthz, GET /readyz, GET /debug.
            Every option can also be set by the environment variable named in its help; a flag wins \
            over the variable. USAGE_TRACKING_CALLBACK_SECRET sets one callback secret (there is no \
            flag for it, so it never shows in a process list).
            """,
        version: UsageMetrics.version
    )

    @Option(help: "Address to listen on. (env: HOST; default: 0.0.0.0)")
    var host: String?

    @Option(help: "Port to listen on. (env: PORT; default: 8080)")
    var port: Int?

    @Option(help: "Lowest log level written: trace, debug, info, notice, warning, error, critical. (env: LOG_LEVEL; default: info)")
    var logLevel: String?

    @Option(help: "File with one callback secret per line, re-read when it changes. (env: USAGE_TRACKING_CALLBACK_SECRET_FILE; default: none)")
    var callbackSecretFile: String?

    @Option(help: "Header that carries the callback secret; Authorization expects 'Bearer <secret>', any other header the bare secret. (env: USAGE_TRACKING_CALLBACK_SECRET_HEADER; default: Authorization)")
    var callbackSecretHeader: String?

    @Option(help: "Largest /track body in bytes. (env: USAGE_TRACKING_MAX_BODY_BYTES; default: 65536)")
    var maxBodyBytes: Int?

    @Option(help: "Longest accepted user, groups, path, method or host value in bytes. (env: USAGE_TRACKING_MAX_LABEL_BYTES; default: 256)")
    var maxLabelBytes: Int?

    @Option(help: "Largest request head (all headers) in bytes. (env: USAGE_TRACKING_MAX_HEADER_BYTES; default: 16384)")
    var maxHeaderBytes: Int?

    @Option(help: "Seconds a connection may stay silent before it is closed. (env: USAGE_TRACKING_IDLE_TIMEOUT; default: 60)")
    var idleTimeout: Int?

    @Option(help: "Seconds to keep serving after SIGTERM while /readyz reports 503, before the listener closes. (env: USAGE_TRACKING_DRAIN_DELAY; default: 0)")
    var drainDelay: Int?

    @Option(help: "Seconds shutdown waits for in-flight requests. (env: USAGE_TRACKING_SHUTDOWN_TIMEOUT; default: 20)")
    var shutdownTimeout: Int?

    @Option(help: "Event loop threads. (env: USAGE_TRACKING_EVENT_LOOP_THREADS; default: one per core)")
    var eventLoopThreads: Int?

    @Flag(help: "Turn off GET /debug and the recent-callback lists it keeps. (env: USAGE_TRACKING_NO_DEBUG=true)")
    var noDebug = false

    func run() async throws {
        let env = Environment()
        var config = ServerConfiguration()
        config.host = self.host ?? env.string("HOST") ?? config.host
        config.port = try self.port ?? env.integer("PORT") ?? config.port
        config.callbackSecretFile = self.callbackSecretFile ?? env.string("USAGE_TRACKING_CALLBACK_SECRET_FILE")
        config.callbackSecret = env.string("USAGE_TRACKING_CALLBACK_SECRET")
        config.callbackSecretHeader = self.callbackSecretHeader ?? env.string("USAGE_TRACKING_CALLBACK_SECRET_HEADER") ?? config.callbackSecretHeader
        config.maxBodyBytes = try self.maxBodyBytes ?? env.integer("USAGE_TRACKING_MAX_BODY_BYTES") ?? config.maxBodyBytes
        config.maxLabelBytes = try self.maxLabelBytes ?? env.integer("USAGE_TRACKING_MAX_LABEL_BYTES") ?? config.maxLabelBytes
        config.maxHeaderBytes = try self.maxHeaderBytes ?? env.integer("USAGE_TRACKING_MAX_HEADER_BYTES") ?? config.maxHeaderBytes
        if let seconds = try self.idleTimeout ?? env.integer("USAGE_TRACKING_IDLE_TIMEOUT") { config.idleTimeout = .seconds(Int64(seconds)) }
        if let seconds = try self.drainDelay ?? env.integer("USAGE_TRACKING_DRAIN_DELAY") { config.drainDelay = .seconds(Int64(seconds)) }
        if let seconds = try self.shutdownTimeout ?? env.integer("USAGE_TRACKING_SHUTDOWN_TIMEOUT") { config.shutdownTimeout = .seconds(Int64(seconds)) }
        config.eventLoopThreads = try self.eventLoopThreads ?? env.integer("USAGE_TRACKING_EVENT_LOOP_THREADS") ?? config.eventLoopThreads
        config.debugEnabled = !(try self.noDebug || env.boolean("USAGE_TRACKING_NO_DEBUG"))
        let levelName = self.logLevel ?? env.string("LOG_LEVEL") ?? "info"
        guard let level = Logger.Level(rawValue: levelName.lowercased()) else {
            throw ValidationError("log level '\(levelName)' is not one of trace, debug, info, notice, warning, error, critical")
        }
        for (name, value) in [("port", config.port), ("max-body-bytes", config.maxBodyBytes), ("max-label-bytes", config.maxLabelBytes), ("max-header-bytes", config.maxHeaderBytes)]
        where value < (name == "port" ? 0 : 1) {
            throw ValidationError("\(name) must be positive, got \(value)")
        }

        LoggingSystem.bootstrap { _ in JSONLogHandler(level: level) }
        let logger = Logger(label: "usage-tracking")
        let server: UsageTrackingServer
        do {
            server = try await UsageTrackingServer.start(configuration: config, logger: logger)
        } catch {
            logger.critical("cannot start", metadata: ["error": "\(error)"])
            throw ExitCode.failure
        }
        let signal = await Self.waitForTermination()
        logger.info("signal received", metadata: ["signal": "\(signal)"])
        await server.shutdown()
    }

    /// Suspends until SIGTERM (Kubernetes) or SIGINT (Ctrl-C) arrives and returns its name.
    private static func waitForTermination() async -> String {
        let (names, continuation) = AsyncStream.makeStream(of: String.self)
        var sources: [DispatchSourceSignal] = []
        for (number, name) in [(SIGTERM, "SIGTERM"), (SIGINT, "SIGINT")] {
            // Dispatch delivers the signal only once its default action is turned off.
            Glibc.signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { continuation.yield(name) }
            source.resume()
            sources.append(source)
        }
        var iterator = names.makeAsyncIterator()
        let name = await iterator.next() ?? "end of signal stream"
        sources.forEach { $0.cancel() }
        return name
    }
}

/// Reads settings from environment variables; a set but unparsable value is an error, not a default.
struct Environment {
    func string(_ name: String) -> String? {
        guard let value = getenv(name) else { return nil }
        let text = String(cString: value)
        return text.isEmpty ? nil : text
    }

    func integer(_ name: String) throws -> Int? {
        guard let text = self.string(name) else { return nil }
        guard let value = Int(text) else { throw ValidationError("\(name) must be a whole number, got '\(text)'") }
        return value
    }

    func boolean(_ name: String) throws -> Bool {
        switch self.string(name)?.lowercased() {
        case nil, "false", "0", "no": return false
        case "true", "1", "yes": return true
        case let other?: throw ValidationError("\(name) must be true or false, got '\(other)'")
        }
    }
}
