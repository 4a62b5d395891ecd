import Glibc
import NIOCore
import UsageTrackingCore

/// Everything the server needs to run; `main` builds one from flags and environment, tests build
/// one directly, and both hand it to `UsageTrackingServer.start`.
public struct ServerConfiguration: Sendable {
    public var host = "0.0.0.0"
    public var port = 8080
    /// Largest `/track` body accepted; larger ones get 413 and the connection is closed.
    public var maxBodyBytes = 64 * 1024
    /// Longest accepted field value (user, groups, path, method, host) in UTF-8 bytes.
    public var maxLabelBytes = 256
    /// Largest request head: the request line and every header line, their line ends included.
    public var maxHeaderBytes = 16 * 1024
    /// A connection with no bytes arriving for this long is closed.
    public var idleTimeout: TimeAmount = .seconds(60)
    /// A request still arriving this long after its head gets 408 and the connection is closed,
    /// so a body trickled a byte at a time cannot hold a connection forever.
    public var requestTimeout: TimeAmount = .seconds(10)
    /// Connections held open at once; beyond it the listener stops accepting (new connections
    /// wait in the kernel's backlog) until one closes.
    public var maxConnections = 4096
    /// After SIGTERM, how long to keep accepting while `/readyz` reports 503, so Kubernetes can
    /// take the pod out of the Service before the listener closes and no callback is refused.
    public var drainDelay: TimeAmount = .zero
    /// How long shutdown waits for in-flight requests before closing connections anyway.
    public var shutdownTimeout: TimeAmount = .seconds(20)
    /// The header carrying the caller's secret. `Authorization` expects `Bearer <secret>`;
    /// any other header carries the secret itself (Authorino's `customHeader` credentials).
    public var callbackSecretHeader = "Authorization"
    /// One secret, typically from the environment.
    public var callbackSecret: String? = nil
    /// A file with one secret per line, re-read when it changes.
    public var callbackSecretFile: String? = nil
    /// How often the secret file is checked for changes.
    public var secretReloadInterval: Duration = .seconds(2)
    /// Serve `/debug` and keep the recent-callback lists it shows.
    public var debugEnabled = true
    /// What is counted: families, labels, budgets (`--config`; the built-in schema by default).
    public var schema: MeteringSchema = .default
    /// Where `schema` was read from, for the debug view; nil for the built-in one.
    public var schemaFile: String? = nil
    /// The key for labels marked `hash: hmac-sha256`; required when any is.
    public var labelHMACKey: [UInt8]? = nil
    public var labelHMACKeyFile: String? = nil
    /// A new series is exposed as 0 until it is this old, so `increase()` sees its first count.
    public var newSeriesHold: TimeAmount = .zero
    /// Event loop threads; the default is one per core.
    public var eventLoopThreads = System.coreCount

    public init() {}
    /// Where the usage ledger lives (`--state-dir`); nil keeps counts in memory only.
    public var stateDirectory: String? = nil
    /// The shared ledger (`--ledger-url`), exclusive with `stateDirectory`, and its password
    /// (read from `--ledger-password-file`; never logged or shown).
    public var ledgerURL: PostgresAddress? = nil
    public var ledgerPassword: String? = nil
    /// This replica's name in the shared ledger (`--instance`): unique among the replicas.
    public var instance = ServerConfiguration.hostName()
    /// When a counted callback is acknowledged: after its commit (`always`) or at once, with
    /// commits every `fsyncInterval` (`interval`).
    public var fsync: FsyncMode = .always
    public var fsyncInterval: TimeAmount = .seconds(1)
    /// Hourly buckets older than this are deleted from the ledger.
    public var ledgerRetentionDays = 400
    /// The header whose value identifies a callback for deduplication; nil turns it off.
    public var dedupeHeader: String? = "x-request-id"
    /// A repeated request id is caught for this long after it was counted.
    public var dedupeWindow: TimeAmount = .seconds(600)
    /// Request ids remembered at most; the oldest are forgotten first.
    public var dedupeMaxIDs = 1_000_000
    /// The Envoy ext_proc gRPC listener (plaintext HTTP/2 on `host`); nil: off. See `ExtProcListener`.
    public var extProc: ExtProcSettings? = nil
}

extension ServerConfiguration {
    /// The host name (a pod's name in Kubernetes), or `usage-tracking` when there is none.
    public static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "usage-tracking" }
        let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return name.isEmpty ? "usage-tracking" : name
    }
}

public enum FsyncMode: String, Sendable, CaseIterable {
    case always, interval
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
