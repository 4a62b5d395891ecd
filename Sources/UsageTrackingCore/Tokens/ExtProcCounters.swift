import Synchronization

/// The Envoy ext_proc listener's own health: the streams open now, and the streams a bound or a
/// bad message ended, by reason. `UsageMetrics` renders them when the listener is on.
public final class ExtProcCounters: Sendable {
    public enum Reason: String, CaseIterable, Sendable {
        /// Refused at once: `--ext-proc-max-streams` streams were open; or ended: its message in
        /// progress would have taken the bytes held for all streams' messages past their bound.
        case overCapacity = "over_capacity"
        /// No message for `--ext-proc-idle-timeout` seconds, or one that took longer than
        /// `--request-timeout` to arrive whole.
        case idleTimeout = "idle_timeout"
        /// Not a ProcessingRequest (undecodable, over the size bound, or with no phase set).
        case invalidMessage = "invalid_message"
        /// A phase where it cannot come: request headers twice or after the response began, a
        /// second response head, a response head after the body. (Nothing after the response's
        /// end is read: the RPC ends there.)
        case outOfOrder = "out_of_order"

        var index: Int { Self.allCases.firstIndex(of: self)! }
    }

    private let errors = Reason.allCases.map { _ in UsageMetrics.OutcomeCounter() }
    private let streams = Atomic<Int>(0)
    private let messageBytes = Atomic<Int>(0)

    public init() {}

    /// Takes one of `limit` stream places; false (and nothing taken) when all are in use.
    public func openStream(limit: Int) -> Bool {
        guard self.streams.wrappingAdd(1, ordering: .relaxed).newValue <= limit else {
            self.streams.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    public func closeStream() {
        self.streams.wrappingSubtract(1, ordering: .relaxed)
    }

    public var streamsOpen: Int { self.streams.load(ordering: .relaxed) }

    /// Moves what one stream holds of a message in progress from `old` bytes to `new`; false,
    /// with nothing changed, when growing it would take all streams together past `limit`.
    public func holdMessageBytes(from old: Int, to new: Int, limit: Int) -> Bool {
        let total = self.messageBytes.wrappingAdd(new - old, ordering: .relaxed).newValue
        guard new <= old || total <= limit else {
            self.messageBytes.wrappingSubtract(new - old, ordering: .relaxed)
            return false
        }
        return true
    }

    /// Bytes held in messages in progress, all streams together.
    public var messageBytesHeld: Int { self.messageBytes.load(ordering: .relaxed) }

    public func record(_ reason: Reason) {
        self.errors[reason.index].value.wrappingAdd(1, ordering: .relaxed)
    }

    public func count(of reason: Reason) -> UInt64 {
        self.errors[reason.index].value.load(ordering: .relaxed)
    }
}
