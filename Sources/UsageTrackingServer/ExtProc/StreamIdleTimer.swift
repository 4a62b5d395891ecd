import Synchronization
import UsageTrackingCore

/// Ends a stream that receives nothing for `timeout`: `touch` on every message, and `wait`
/// returns once the stream has been silent that long (setting `expired`), or when cancelled.
final class StreamIdleTimer: Sendable {
    private let timeout: UInt64
    private let lastMessage = Atomic<UInt64>(monotonicNanoseconds())
    private let expiredFlag = Atomic<Bool>(false)

    init(timeout: Duration) {
        self.timeout = UInt64(timeout.components.seconds) * 1_000_000_000 + UInt64(timeout.components.attoseconds / 1_000_000_000)
    }

    func touch() {
        self.lastMessage.store(monotonicNanoseconds(), ordering: .relaxed)
    }

    var expired: Bool { self.expiredFlag.load(ordering: .relaxed) }

    func wait() async {
        while true {
            let silent = monotonicNanoseconds() &- self.lastMessage.load(ordering: .relaxed)
            guard silent < self.timeout else {
                self.expiredFlag.store(true, ordering: .relaxed)
                return
            }
            do {
                try await Task.sleep(for: .nanoseconds(Int64(self.timeout - silent)))
            } catch {
                return
            }
        }
    }
}
