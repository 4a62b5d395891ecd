import NIOCore

/// One timer per connection enforces both time limits without a schedule per request: the
/// idle timeout (no bytes for that long, whether or not replies wait to be read) and the
/// request timeout (a request still arriving that long after its head, however steadily it
/// trickles). It fires at the earlier deadline, and at least once per request timeout, so a
/// request that starts after it was set is seen in time to be cut off at its own deadline.
/// Lives on the connection's event loop.
struct ConnectionTimer {
    let idleTimeout: TimeAmount
    let requestTimeout: TimeAmount
    /// On the event loop's clock (`EventLoop.now`), which tests can advance.
    private(set) var lastActivity = NIODeadline.uptimeNanoseconds(0)
    private var scheduled: Scheduled<Void>?

    init(_ configuration: ServerConfiguration) {
        self.idleTimeout = configuration.idleTimeout
        self.requestTimeout = configuration.requestTimeout
    }

    /// Bytes arrived at `now`.
    mutating func touch(_ now: NIODeadline) {
        self.lastActivity = now
    }

    /// Which limit has passed at `now`, if any. `receivingSince` is the start of the request
    /// still arriving; `producing` says a reply is on its way, which is not idleness.
    func expired(at now: NIODeadline, receivingSince: UInt64?, producing: Bool) -> Expiry? {
        if let start = receivingSince {
            return now >= .uptimeNanoseconds(start) + self.requestTimeout ? .request : nil
        }
        return !producing && now >= self.lastActivity + self.idleTimeout ? .idle : nil
    }

    enum Expiry {
        /// The request being received has taken too long to arrive.
        case request
        /// No bytes for the idle timeout: silent, or not reading the replies.
        case idle
    }

    /// Sets the timer unless it is set; `fire` runs on `eventLoop` at the deadline.
    mutating func schedule(on eventLoop: EventLoop, receivingSince: UInt64?, _ fire: @escaping () -> Void) {
        guard self.scheduled == nil else { return }
        let now = eventLoop.now
        var deadline = min(self.lastActivity + self.idleTimeout, now + self.requestTimeout)
        if let start = receivingSince {
            deadline = min(deadline, .uptimeNanoseconds(start) + self.requestTimeout)
        }
        self.scheduled = eventLoop.assumeIsolated().scheduleTask(deadline: deadline, fire)
    }

    /// The timer went off: it is no longer set.
    mutating func fired() {
        self.scheduled = nil
    }

    mutating func cancel() {
        self.scheduled?.cancel()
        self.scheduled = nil
    }
}
