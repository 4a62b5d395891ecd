import Glibc
import Synchronization

/// The last time something happened that the status page reports: a `/metrics` scrape, a reload
/// of the secret file, a callback whose secret matched. Each is a few words written rarely or
/// (the secret match) with relaxed atomics, so recording never waits on a reader.
public final class StatusEvents: Sendable {
    public struct Scrape: Sendable, Equatable {
        /// Unix seconds when the render finished.
        public var time: Double
        /// The scraper's address (`ip:port`), when the connection has one.
        public var from: String?
        public var renderSeconds: Double

        public init(time: Double, from: String?, renderSeconds: Double) {
            self.time = time
            self.from = from
            self.renderSeconds = renderSeconds
        }
    }

    public struct SecretReload: Sendable, Equatable {
        public var time: Double
        /// What happened, in words ("loaded 2 secrets at startup", "file emptied", the error).
        public var result: String

        public init(time: Double, result: String) {
            self.time = time
            self.result = result
        }
    }

    public struct SecretMatch: Sendable, Equatable {
        /// 0-based, as `CallbackSecrets.matchingSecret` counts: the value's secret first, then
        /// the file's lines. Never the secret.
        public var position: Int
        public var time: Double
    }

    private let scrape = Mutex<Scrape?>(nil)
    private let reload = Mutex<SecretReload?>(nil)
    /// Position + 1 (0: none yet) and the time as the bits of a Double; two relaxed stores per
    /// authenticated callback. A reader may pair a position with the time of the next match,
    /// which is at most one callback apart.
    private let matchedPosition = Atomic<Int>(0)
    private let matchedTime = Atomic<UInt64>(0)

    public init() {}

    public func recordScrape(_ scrape: Scrape) { self.scrape.withLock { $0 = scrape } }
    public var lastScrape: Scrape? { self.scrape.withLock { $0 } }

    public func recordReload(_ reload: SecretReload) { self.reload.withLock { $0 = reload } }
    public var lastReload: SecretReload? { self.reload.withLock { $0 } }

    /// Called on `/track`'s path: the coarse wall clock (a vDSO read of a value the kernel
    /// updates every tick) is precise enough for "when", and cheaper than the precise one.
    public func recordSecretMatch(position: Int) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &now)
        self.recordSecretMatch(position: position, time: Double(now.tv_sec) + Double(now.tv_nsec) / 1e9)
    }

    public func recordSecretMatch(position: Int, time: Double) {
        self.matchedPosition.store(position + 1, ordering: .relaxed)
        self.matchedTime.store(time.bitPattern, ordering: .relaxed)
    }

    public var lastSecretMatch: SecretMatch? {
        let position = self.matchedPosition.load(ordering: .relaxed)
        guard position > 0 else { return nil }
        return SecretMatch(position: position - 1, time: Double(bitPattern: self.matchedTime.load(ordering: .relaxed)))
    }
}
