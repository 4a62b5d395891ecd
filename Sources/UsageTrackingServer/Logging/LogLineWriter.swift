import Dispatch
import Glibc
import Synchronization

/// Writes log lines to a file descriptor from a thread of its own, so a slow or stalled reader of
/// the logs (a full pipe) never blocks the thread that logs, which is often an event loop.
///
/// Lines wait in a buffer of at most `capacityBytes`; a line that does not fit is dropped and
/// counted (`usage_tracking_log_dropped_total`). Lines are written whole and in order, several per
/// write(2) when they queue up.
public final class LogLineWriter: Sendable {
    /// Standard output, where the service writes its logs.
    public static let standardOutput = LogLineWriter(descriptor: STDOUT_FILENO, capacityBytes: 1 << 20)

    private struct Pending {
        var lines: [[UInt8]] = []
        var bytes = 0
        var dropped: UInt64 = 0
        /// True while the writer thread holds lines it took but has not written yet.
        var writing = false
    }

    private let descriptor: Int32
    private let capacityBytes: Int
    private let pending = Mutex(Pending())
    private let wakeup = DispatchSemaphore(value: 0)

    public init(descriptor: Int32, capacityBytes: Int) {
        self.descriptor = descriptor
        self.capacityBytes = capacityBytes
        // A thread of its own that sleeps until lines arrive; it lives as long as the process.
        DispatchQueue(label: "usage-tracking.log-writer").async { [self] in
            while true { self.writePending() }
        }
    }

    public func write(_ line: String) {
        var bytes = Array(line.utf8)
        bytes.append(UInt8(ascii: "\n"))
        let queued = self.pending.withLock { pending in
            guard pending.bytes + bytes.count <= self.capacityBytes else {
                pending.dropped += 1
                return false
            }
            pending.bytes += bytes.count
            pending.lines.append(bytes)
            return true
        }
        if queued { self.wakeup.signal() }
    }

    /// Lines dropped because the buffer was full.
    public var dropped: UInt64 { self.pending.withLock { $0.dropped } }

    /// Waits until every queued line is written, or `timeout` passes (the reader may be gone);
    /// returns whether everything was written. Called before the process exits.
    @discardableResult
    public func flush(timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if self.pending.withLock({ $0.lines.isEmpty && !$0.writing }) { return true }
            usleep(5_000)
        }
        return false
    }

    private func writePending() {
        self.wakeup.wait()
        let lines = self.pending.withLock { pending in
            defer {
                pending.lines = []
                pending.bytes = 0
                pending.writing = true
            }
            return pending.lines
        }
        defer { self.pending.withLock { $0.writing = false } }
        guard !lines.isEmpty else { return }
        let chunk = lines.count == 1 ? lines[0] : Array(lines.joined())
        chunk.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let written = Glibc.write(self.descriptor, buffer.baseAddress! + offset, buffer.count - offset)
                if written < 0 && errno == EINTR { continue }
                // The reader is gone (EPIPE) or the descriptor is bad: nothing more can be done.
                guard written > 0 else { return }
                offset += written
            }
        }
    }
}
