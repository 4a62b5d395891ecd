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
            Endpoints: POST /track (the callback), GET /metrics, GET /healthz, GET /readyz, GET /debug (JSON), \
            GET / (the status page).
            Every option can also be set by the environment variable named in its help; a flag wins \
            over the variable. USAGE_TRACKING_CALLBACK_SECRET sets one callback secret (there is no \
            flag for it, so it never shows in a process list).
            """,
        version: UsageMetrics.version
    )

    @Option(help: "Address to listen on. (env: HOST; default: 0.0.0.0)")
    var host: String?

    @Option(parsing: .unconditional, help: "Port to listen on, 0 to 65535 (0: any free port). (env: PORT; default: 8080)")
    var port: Int?

    @Option(help: "Lowest log level written: trace, debug, info, notice, warning, error, critical. (env: LOG_LEVEL; default: info)")
    var logLevel: String?

    @Option(help: "File with one callback secret per line, re-read when it changes and on SIGHUP. (env: USAGE_TRACKING_CALLBACK_SECRET_FILE; default: none)")
    var callbackSecretFile: String?

    @Option(help: "Header that carries the callback secret; Authorization expects 'Bearer <secret>', any other header the bare secret. (env: USAGE_TRACKING_CALLBACK_SECRET_HEADER; default: Authorization)")
    var callbackSecretHeader: String?

    @Option(parsing: .unconditional, help: "Largest /track body in bytes, 16 to 16777216. (env: USAGE_TRACKING_MAX_BODY_BYTES; default: 65536)")
    var maxBodyBytes: Int?

    @Option(parsing: .unconditional, help: "Longest accepted user, groups, path, method or host value in bytes, 1 to 65536. (env: USAGE_TRACKING_MAX_LABEL_BYTES; default: 256)")
    var maxLabelBytes: Int?

    @Option(parsing: .unconditional, help: "Largest request head (request line and headers) in bytes, 1024 to 1048576. (env: USAGE_TRACKING_MAX_HEADER_BYTES; default: 16384)")
    var maxHeaderBytes: Int?

    @Option(parsing: .unconditional, help: "Seconds a connection may stay silent before it is closed, 1 to 3600. (env: USAGE_TRACKING_IDLE_TIMEOUT; default: 60)")
    var idleTimeout: Int?

    @Option(parsing: .unconditional, help: "Seconds a request may take to arrive in full after its head, 1 to 600; then 408 and the connection is closed. An ext_proc message gets as long from its first byte. (env: USAGE_TRACKING_REQUEST_TIMEOUT; default: 10)")
    var requestTimeout: Int?

    @Option(parsing: .unconditional, help: "Connections open at once, 1 to 1000000; beyond it new ones wait in the listen backlog. (env: USAGE_TRACKING_MAX_CONNECTIONS; default: 4096)")
    var maxConnections: Int?

    @Option(parsing: .unconditional, help: "Seconds to keep serving after SIGTERM while /readyz reports 503 and replies close their connections, 0 to 600. (env: USAGE_TRACKING_DRAIN_DELAY; default: 0)")
    var drainDelay: Int?

    @Option(parsing: .unconditional, help: "Seconds shutdown waits for in-flight requests, 0 to 600. (env: USAGE_TRACKING_SHUTDOWN_TIMEOUT; default: 20)")
    var shutdownTimeout: Int?

    @Option(parsing: .unconditional, help: "Event loop threads, 1 to 256. (env: USAGE_TRACKING_EVENT_LOOP_THREADS; default: one per core)")
    var eventLoopThreads: Int?

    @Flag(help: "Turn off GET /debug, the status page GET / and what they record. (env: USAGE_TRACKING_NO_DEBUG=true)")
    var noDebug = false

    @Option(help: "Metering config (YAML): the metrics, their labels and budgets; see --print-config. (env: USAGE_TRACKING_CONFIG; default: the built-in llm_requests_total{user,groups,path})")
    var config: String?

    @Flag(help: "Print the effective metering config as YAML (the built-in one, or --config's) and exit.")
    var printConfig = false

    @Option(help: "File holding the key for labels with 'hash: hmac-sha256' (a trailing newline is ignored). (env: USAGE_TRACKING_LABEL_HMAC_KEY_FILE; default: none)")
    var labelHmacKeyFile: String?

    @Option(parsing: .unconditional, help: "Seconds a new series is exposed as 0 before its count, 0 to 3600, so increase() sees its first requests; twice the scrape interval. (env: USAGE_TRACKING_NEW_SERIES_HOLD; default: 0)")
    var newSeriesHold: Int?

    @Option(help: "Directory for the usage ledger (SQLite): counts survive restarts and crashes. Unset: memory only, and a restart loses everything not yet scraped. (env: USAGE_TRACKING_STATE_DIR; default: none)")
    var stateDir: String?

    @Option(help: "The ledger all replicas share, in PostgreSQL: postgres://USER@HOST:PORT/DATABASE[?sslmode=disable|prefer|require|verify-full], no password in it; exclusive with --state-dir. Serves GET /usage. (env: USAGE_TRACKING_LEDGER_URL; default: none)")
    var ledgerUrl: String?

    @Option(help: "File holding the --ledger-url user's password (a trailing newline is ignored). (env: USAGE_TRACKING_LEDGER_PASSWORD_FILE; default: none)")
    var ledgerPasswordFile: String?

    @Option(help: "This replica's name in the shared ledger, unique among the replicas (the pod name). (env: USAGE_TRACKING_INSTANCE; default: the host name)")
    var instance: String?

    @Option(help: "always: a callback is acknowledged once its count is committed (on disk, or in the shared ledger); interval: at once, with a commit every --fsync-interval (a crash loses up to that). (env: USAGE_TRACKING_FSYNC; default: always)")
    var fsync: String?

    @Option(parsing: .unconditional, help: "Seconds between commits in --fsync interval mode, 1 to 60. (env: USAGE_TRACKING_FSYNC_INTERVAL; default: 1)")
    var fsyncInterval: Int?

    @Option(parsing: .unconditional, help: "Days of hourly usage the ledger keeps, 1 to 36500. (env: USAGE_TRACKING_LEDGER_RETENTION_DAYS; default: 400)")
    var ledgerRetentionDays: Int?

    @Option(help: "Header whose value identifies a callback: a repeat within --dedupe-window is answered 202 and not counted. (env: USAGE_TRACKING_DEDUPE_HEADER; default: x-request-id)")
    var dedupeHeader: String?

    @Flag(help: "Count every callback, repeated request ids included. (env: USAGE_TRACKING_NO_DEDUPE=true)")
    var noDedupe = false

    @Option(parsing: .unconditional, help: "Seconds a request id is remembered, 1 to 86400. (env: USAGE_TRACKING_DEDUPE_WINDOW; default: 600)")
    var dedupeWindow: Int?

    @Option(parsing: .unconditional, help: "Request ids remembered at most (about 70 bytes each at the bound), 1 to 100000000; beyond it the oldest are forgotten early. (env: USAGE_TRACKING_DEDUPE_MAX_IDS; default: 1000000)")
    var dedupeMaxIds: Int?

    @Option(parsing: .unconditional, help: "Port for Envoy's ext_proc gRPC streams (plaintext HTTP/2 on --host), 0 to 65535 (0: any free port). (env: USAGE_TRACKING_EXT_PROC_PORT; default: off)")
    var extProcPort: Int?

    @Option(parsing: .unconditional, help: "ext_proc streams open at once, 1 to 1000000; one more is refused with RESOURCE_EXHAUSTED. (env: USAGE_TRACKING_EXT_PROC_MAX_STREAMS; default: 10000)")
    var extProcMaxStreams: Int?

    @Option(parsing: .unconditional, help: "Seconds an ext_proc stream may go without a message before it is ended, 1 to 3600. (env: USAGE_TRACKING_EXT_PROC_IDLE_TIMEOUT; default: 300)")
    var extProcIdleTimeout: Int?

    @Option(help: "Write a consistent copy of the ledger in --state-dir to this new file, while the service runs, and exit; read it with sqlite3.")
    var snapshotLedger: String?

    func run() async throws {
        // Logs go to a pipe that may close; a write to it must fail, not kill the process.
        Glibc.signal(SIGPIPE, SIG_IGN)
        defer { LogLineWriter.standardOutput.flush(timeout: .seconds(2)) }
        if self.printConfig {
            print(try self.schema(Environment()).schema.yaml, terminator: "")
            return
        }
        if let file = self.snapshotLedger {
            guard let directory = self.stateDir ?? Environment().string("USAGE_TRACKING_STATE_DIR") else {
                throw ValidationError("--snapshot-ledger needs --state-dir (USAGE_TRACKING_STATE_DIR)")
            }
            do {
                try UsageLedger.snapshot(directory: directory, to: file)
            } catch {
                // Not a usage error: no usage text after it.
                print("error: --snapshot-ledger: \(error)")
                throw ExitCode.failure
            }
            print("ledger copied to \(file)")
            return
        }
        // Caught from the start: one arriving while the server starts waits for it, and never
        // takes a signal's default action (which for most of them ends the process).
        let signals = SignalEvents()
        defer { signals.stop() }
        let config = try self.configuration(Environment())
        let levelName = self.logLevel ?? Environment().string("LOG_LEVEL") ?? "info"
        guard let level = Logger.Level(rawValue: levelName.lowercased()) else {
            throw ValidationError("log level '\(levelName)' is not one of trace, debug, info, notice, warning, error, critical (--log-level, LOG_LEVEL)")
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
        await Self.handleSignals(signals, server: server, logger: logger)
    }

    /// Flags win over environment variables; every number is checked against its range, and an
    /// error names both the flag and the variable.
    private func configuration(_ env: Environment) throws -> ServerConfiguration {
        var config = ServerConfiguration()
        func number(_ flag: Int?, _ name: String, _ variable: String, _ range: ClosedRange<Int>) throws -> Int? {
            guard let value = try flag ?? env.integer(variable) else { return nil }
            guard range.contains(value) else {
                throw ValidationError("--\(name) (\(variable)) must be from \(range.lowerBound) to \(range.upperBound), got \(value)")
            }
            return value
        }
        func seconds(_ flag: Int?, _ name: String, _ variable: String, _ range: ClosedRange<Int>) throws -> TimeAmount? {
            try number(flag, name, variable, range).map { .seconds(Int64($0)) }
        }
        config.host = self.host ?? env.string("HOST") ?? config.host
        guard !config.host.isEmpty else { throw ValidationError("--host (HOST) must not be empty") }
        config.port = try number(self.port, "port", "PORT", 0...65535) ?? config.port
        config.maxBodyBytes = try number(self.maxBodyBytes, "max-body-bytes", "USAGE_TRACKING_MAX_BODY_BYTES", 16...(16 << 20)) ?? config.maxBodyBytes
        config.maxLabelBytes = try number(self.maxLabelBytes, "max-label-bytes", "USAGE_TRACKING_MAX_LABEL_BYTES", 1...65536) ?? config.maxLabelBytes
        config.maxHeaderBytes = try number(self.maxHeaderBytes, "max-header-bytes", "USAGE_TRACKING_MAX_HEADER_BYTES", 1024...(1 << 20)) ?? config.maxHeaderBytes
        config.idleTimeout = try seconds(self.idleTimeout, "idle-timeout", "USAGE_TRACKING_IDLE_TIMEOUT", 1...3600) ?? config.idleTimeout
        config.requestTimeout = try seconds(self.requestTimeout, "request-timeout", "USAGE_TRACKING_REQUEST_TIMEOUT", 1...600) ?? config.requestTimeout
        config.maxConnections = try number(self.maxConnections, "max-connections", "USAGE_TRACKING_MAX_CONNECTIONS", 1...1_000_000) ?? config.maxConnections
        config.drainDelay = try seconds(self.drainDelay, "drain-delay", "USAGE_TRACKING_DRAIN_DELAY", 0...600) ?? config.drainDelay
        config.shutdownTimeout = try seconds(self.shutdownTimeout, "shutdown-timeout", "USAGE_TRACKING_SHUTDOWN_TIMEOUT", 0...600) ?? config.shutdownTimeout
        config.eventLoopThreads = try number(self.eventLoopThreads, "event-loop-threads", "USAGE_TRACKING_EVENT_LOOP_THREADS", 1...256) ?? config.eventLoopThreads
        config.callbackSecretFile = self.callbackSecretFile ?? env.string("USAGE_TRACKING_CALLBACK_SECRET_FILE")
        // Set but blank is passed on (and refused at startup), never read as "no secret".
        config.callbackSecret = env.raw("USAGE_TRACKING_CALLBACK_SECRET")
        config.callbackSecretHeader = self.callbackSecretHeader ?? env.string("USAGE_TRACKING_CALLBACK_SECRET_HEADER") ?? config.callbackSecretHeader
        guard !config.callbackSecretHeader.isEmpty, config.callbackSecretHeader.utf8.allSatisfy(isHeaderNameByte) else {
            throw ValidationError("--callback-secret-header (USAGE_TRACKING_CALLBACK_SECRET_HEADER) must be a header name, got '\(config.callbackSecretHeader)'")
        }
        config.debugEnabled = !(try self.noDebug || env.boolean("USAGE_TRACKING_NO_DEBUG"))
        config.newSeriesHold = try seconds(self.newSeriesHold, "new-series-hold", "USAGE_TRACKING_NEW_SERIES_HOLD", 0...3600) ?? config.newSeriesHold
        (config.schema, config.schemaFile) = try self.schema(env)
        config.labelHMACKeyFile = self.labelHmacKeyFile ?? env.string("USAGE_TRACKING_LABEL_HMAC_KEY_FILE")
        if let path = config.labelHMACKeyFile {
            let flag = "--label-hmac-key-file (USAGE_TRACKING_LABEL_HMAC_KEY_FILE)"
            switch readFileBytes(path, limit: 4096) {
            case .failure(let error): throw ValidationError("\(flag): cannot read \(path): \(error)")
            case .success(let bytes):
                let key = LabelHasher.key(fromFile: bytes)
                guard !key.isEmpty else { throw ValidationError("\(flag): \(path) is empty; a hashed label needs a key") }
                guard key.count <= 4096 else { throw ValidationError("\(flag): \(path) is over 4096 bytes") }
                config.labelHMACKey = key
            }
        }
        config.stateDirectory = self.stateDir ?? env.string("USAGE_TRACKING_STATE_DIR")
        if let url = self.ledgerUrl ?? env.string("USAGE_TRACKING_LEDGER_URL") {
            let flag = "--ledger-url (USAGE_TRACKING_LEDGER_URL)"
            guard config.stateDirectory == nil else {
                throw ValidationError("\(flag) and --state-dir (USAGE_TRACKING_STATE_DIR) are exclusive: one ledger, shared in PostgreSQL or in a directory of this replica's own")
            }
            do {
                config.ledgerURL = try PostgresAddress(url: url)
            } catch {
                // The text is not echoed: it may hold a password after all.
                throw ValidationError("\(flag): the URL \(error)")
            }
        }
        if let path = self.ledgerPasswordFile ?? env.string("USAGE_TRACKING_LEDGER_PASSWORD_FILE") {
            let flag = "--ledger-password-file (USAGE_TRACKING_LEDGER_PASSWORD_FILE)"
            guard config.ledgerURL != nil else { throw ValidationError("\(flag) needs --ledger-url (USAGE_TRACKING_LEDGER_URL)") }
            switch readFileBytes(path, limit: 4096) {
            case .failure(let error): throw ValidationError("\(flag): cannot read \(path): \(error)")
            case .success(let bytes):
                var password = bytes
                while let last = password.last, last == UInt8(ascii: "\n") || last == UInt8(ascii: "\r") { password.removeLast() }
                guard !password.isEmpty else { throw ValidationError("\(flag): \(path) is empty") }
                guard let text = String(validating: password, as: UTF8.self) else { throw ValidationError("\(flag): \(path) is not UTF-8") }
                config.ledgerPassword = text
            }
        }
        if let instance = self.instance ?? env.string("USAGE_TRACKING_INSTANCE") {
            guard instance.utf8.count <= 253, instance.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                throw ValidationError("--instance (USAGE_TRACKING_INSTANCE) must be at most 253 printable ASCII characters without spaces")
            }
            config.instance = instance
        }
        if let mode = self.fsync ?? env.string("USAGE_TRACKING_FSYNC") {
            guard let parsed = FsyncMode(rawValue: mode) else {
                throw ValidationError("--fsync (USAGE_TRACKING_FSYNC) must be always or interval, got '\(mode)'")
            }
            config.fsync = parsed
        }
        config.fsyncInterval = try seconds(self.fsyncInterval, "fsync-interval", "USAGE_TRACKING_FSYNC_INTERVAL", 1...60) ?? config.fsyncInterval
        config.ledgerRetentionDays = try number(self.ledgerRetentionDays, "ledger-retention-days", "USAGE_TRACKING_LEDGER_RETENTION_DAYS", 1...36500) ?? config.ledgerRetentionDays
        if try self.noDedupe || env.boolean("USAGE_TRACKING_NO_DEDUPE") {
            config.dedupeHeader = nil
        } else if let header = self.dedupeHeader ?? env.string("USAGE_TRACKING_DEDUPE_HEADER") {
            guard !header.isEmpty, header.utf8.allSatisfy(isHeaderNameByte) else {
                throw ValidationError("--dedupe-header (USAGE_TRACKING_DEDUPE_HEADER) must be a header name, got '\(header)'")
            }
            config.dedupeHeader = header
        }
        config.dedupeWindow = try seconds(self.dedupeWindow, "dedupe-window", "USAGE_TRACKING_DEDUPE_WINDOW", 1...86400) ?? config.dedupeWindow
        config.dedupeMaxIDs = try number(self.dedupeMaxIds, "dedupe-max-ids", "USAGE_TRACKING_DEDUPE_MAX_IDS", 1...100_000_000) ?? config.dedupeMaxIDs
        let maxStreams = try number(self.extProcMaxStreams, "ext-proc-max-streams", "USAGE_TRACKING_EXT_PROC_MAX_STREAMS", 1...1_000_000)
        let idleTimeout = try number(self.extProcIdleTimeout, "ext-proc-idle-timeout", "USAGE_TRACKING_EXT_PROC_IDLE_TIMEOUT", 1...3600)
        config.extProc = try number(self.extProcPort, "ext-proc-port", "USAGE_TRACKING_EXT_PROC_PORT", 0...65535).map { port in
            var extProc = ExtProcSettings(port: port)
            extProc.maxStreams = maxStreams ?? extProc.maxStreams
            extProc.idleTimeout = idleTimeout.map { .seconds($0) } ?? extProc.idleTimeout
            return extProc
        }
        if config.schema.needsHMACKey, config.labelHMACKey == nil {
            throw ValidationError("\(config.schemaFile ?? "the config"): a label has 'hash: hmac-sha256' but --label-hmac-key-file (USAGE_TRACKING_LABEL_HMAC_KEY_FILE) is not set")
        }
        return config
    }

    /// The schema from --config, or the built-in one; a bad file stops here with its line and key.
    private func schema(_ env: Environment) throws -> (schema: MeteringSchema, file: String?) {
        guard let path = self.config ?? env.string("USAGE_TRACKING_CONFIG") else { return (.default, nil) }
        do {
            return (try MeteringSchema.load(file: path), path)
        } catch {
            throw ValidationError("--config (USAGE_TRACKING_CONFIG): \(error)")
        }
    }

    /// Serves until SIGTERM (Kubernetes) or SIGINT (Ctrl-C) and shuts down; a second one ends the
    /// drain early. SIGHUP re-reads the secret file; SIGUSR1 and SIGUSR2, which would otherwise
    /// kill the process and every count in it, are logged and ignored.
    private static func handleSignals(_ signals: SignalEvents, server: UsageTrackingServer, logger: Logger) async {
        var shutdown: Task<Void, Never>?
        for await number in signals.stream {
            let name = SignalEvents.names[number] ?? "signal \(number)"
            switch number {
            case SIGHUP:
                logger.info("signal received: re-reading the callback secret file", metadata: ["signal": "\(name)"])
                server.reloadSecrets()
            case SIGUSR1, SIGUSR2:
                logger.info("signal ignored", metadata: ["signal": "\(name)"])
            default:
                logger.info("signal received", metadata: ["signal": "\(name)"])
                if shutdown == nil {
                    shutdown = Task { [continuation = signals.continuation] in
                        await server.shutdown()
                        continuation.finish()
                    }
                } else {
                    await server.shutdown()
                }
            }
        }
    }
}

/// The signals the service handles, delivered as a stream instead of by their default actions.
struct SignalEvents {
    static let names = [SIGTERM: "SIGTERM", SIGINT: "SIGINT", SIGHUP: "SIGHUP", SIGUSR1: "SIGUSR1", SIGUSR2: "SIGUSR2"]
    let stream: AsyncStream<Int32>
    let continuation: AsyncStream<Int32>.Continuation
    private let sources: [DispatchSourceSignal]

    init() {
        let (stream, continuation) = AsyncStream.makeStream(of: Int32.self)
        self.stream = stream
        self.continuation = continuation
        self.sources = Self.names.keys.map { number in
            // Dispatch delivers the signal only once its default action is turned off.
            Glibc.signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { continuation.yield(number) }
            source.resume()
            return source
        }
    }

    func stop() { self.sources.forEach { $0.cancel() } }
}
/// Reads settings from environment variables; a set but unparsable value is an error, not a default.
struct Environment {
    /// The value as set, empty included.
    func raw(_ name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }

    /// The value, with an empty one taken as unset.
    func string(_ name: String) -> String? {
        self.raw(name).flatMap { $0.isEmpty ? nil : $0 }
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
        case let other?: throw ValidationError("\(name) must be true or false (or yes, no, 1, 0), got '\(other)'")
        }
    }
}
