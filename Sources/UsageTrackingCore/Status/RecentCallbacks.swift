import Synchronization

/// The last accepted and rejected callbacks, kept for the debug view. Bounded: each list holds at
/// most `capacity` entries and the oldest is dropped first. Holds no secrets and no bodies.
public final class RecentCallbacks: Sendable {
    public struct Accepted: Sendable, Equatable {
        public var time: Double
        public var callback: Callback
        /// Kept in place: an accepted callback is recorded on `/track`'s path.
        public var echoedRequestID: EchoedText?
        /// The address the callback came from (`ip:port`), when known.
        public var sender: String?

        public var requestID: String? { self.echoedRequestID?.description }

        public init(time: Double, callback: Callback, requestID: EchoedText?, sender: String? = nil) {
            self.time = time
            self.callback = callback
            self.echoedRequestID = requestID
            self.sender = sender
        }
    }

    public struct Rejected: Sendable, Equatable {
        public var time: Double
        public var status: Int
        public var rejection: CallbackRejection
        public var requestID: String?
        /// The address the callback came from (`ip:port`), when known.
        public var sender: String?

        public init(time: Double, status: Int, rejection: CallbackRejection, requestID: String?, sender: String? = nil) {
            self.time = time
            self.status = status
            self.rejection = rejection
            self.requestID = requestID
            self.sender = sender
        }
    }

    public let capacity: Int
    private let accepted: Mutex<Ring<Accepted>>
    private let rejected: Mutex<Ring<Rejected>>

    public init(capacity: Int = 100) {
        self.capacity = capacity
        self.accepted = Mutex(Ring(capacity: capacity))
        self.rejected = Mutex(Ring(capacity: capacity))
    }

    public func record(_ entry: Accepted) { self.accepted.withLock { $0.append(entry) } }
    public func record(_ entry: Rejected) { self.rejected.withLock { $0.append(entry) } }

    /// Newest first.
    public var acceptedEntries: [Accepted] { self.accepted.withLock { $0.newestFirst } }
    public var rejectedEntries: [Rejected] { self.rejected.withLock { $0.newestFirst } }
}

struct Ring<Element> {
    private var items: [Element] = []
    private var next = 0
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        self.items.reserveCapacity(capacity)
    }

    mutating func append(_ item: Element) {
        guard self.capacity > 0 else { return }
        if self.items.count < self.capacity {
            self.items.append(item)
        } else {
            self.items[self.next] = item
        }
        self.next = (self.next + 1) % self.capacity
    }

    var newestFirst: [Element] {
        guard self.items.count == self.capacity else { return Array(self.items.reversed()) }
        return Array((self.items[self.next...] + self.items[..<self.next]).reversed())
    }
}
