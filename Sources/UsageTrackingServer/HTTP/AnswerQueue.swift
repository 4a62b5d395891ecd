import NIOCore

/// The requests of one connection that are received and not yet answered, answered in the order
/// they arrived, and the backpressure that bounds them. Lives on the connection's event loop.
///
/// A request is answered at once unless a reply is still being produced off the loop (`/metrics`
/// rendering, a callback's ledger commit) or the socket is not taking writes; then it waits here.
///
/// Backpressure: while anything waits, while a reply is produced (a ledger commit excepted, see
/// `mayRead`), or while the channel is not writable, the connection holds back `read`, so the
/// socket is not read again until the replies drain. At most `maxWaiting` requests wait; what
/// else the last read brought stays unparsed bytes. What one connection can make the server hold
/// is therefore one socket read cycle of bytes, `maxWaiting` requests (each body within
/// `--max-body-bytes`), the outbound buffer up to its high water mark, and one reply.
struct AnswerQueue {
    /// Requests received in full and not yet answered, in order.
    private var waiting = CircularBuffer<ReceivedRequest>(initialCapacity: 4)
    /// True while a reply is being produced off the loop (a render, a ledger commit).
    private(set) var producing = false
    /// The reply being produced is a ledger commit's: reading goes on meanwhile (see `mayRead`).
    private var committing = false
    /// Mirrors the channel's writability (kept here so the hot path reads a stored Bool).
    var writable = true
    /// A `read` asked for while reading had to wait; issued once the replies drain.
    private var readHeld = false
    /// Set once nothing more is to be read: a refusal that closes, or shutdown.
    var inputDone = false
    /// Set once a reply that closes the connection was written; later input is discarded.
    var closing = false

    /// Requests that may wait at once: a client that pipelines more is not read further (its
    /// bytes stay unparsed, and reading waits) until they are answered. Few clients pipeline at
    /// all; this bounds what one connection's smallest requests can make the server hold.
    static let maxWaiting = 64

    /// No request waits for its answer.
    var isEmpty: Bool { self.waiting.isEmpty }

    var count: Int { self.waiting.count }

    var isFull: Bool { self.waiting.count >= Self.maxWaiting }

    /// Nothing is ahead of a request received now: it can be answered at once.
    var isClear: Bool { self.writable && !self.producing && self.waiting.isEmpty }

    /// Request body bytes waiting here.
    var heldBodyBytes: Int { self.waiting.reduce(0) { $0 + ($1.body?.readableBytes ?? 0) } }

    /// Reading waits while replies are owed; once the connection is closing, what arrives is
    /// read only to be discarded. A callback waiting for its commit does not stop reading: it
    /// takes about a millisecond, what arrives meanwhile waits in `waiting` (which does stop
    /// reading), and pausing and resuming the socket's read interest for every callback would
    /// cost two system calls each.
    var mayRead: Bool {
        self.closing || (self.writable && (!self.producing || self.committing) && self.waiting.isEmpty && !self.inputDone)
    }

    mutating func append(_ request: ReceivedRequest) {
        self.waiting.append(request)
    }

    /// A reply is being produced off the loop; `commit` when it is a ledger commit's.
    mutating func startProducing(commit: Bool) {
        self.producing = true
        self.committing = commit
    }

    mutating func finishProducing() {
        self.producing = false
        self.committing = false
    }

    /// The next request to answer, while nothing blocks it.
    mutating func next() -> ReceivedRequest? {
        guard self.writable, !self.producing, !self.closing else { return nil }
        return self.waiting.popFirst()
    }

    /// Whether a `read` the channel asks for may go ahead now; if not, it is held until
    /// `resumeHeldRead`.
    mutating func allowRead() -> Bool {
        if self.mayRead { return true }
        self.readHeld = true
        return false
    }

    /// Whether a held `read` is to be issued now that replies have drained.
    mutating func resumeHeldRead() -> Bool {
        guard self.readHeld, self.mayRead else { return false }
        self.readHeld = false
        return true
    }
}
