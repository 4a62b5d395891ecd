import Crypto
import Synchronization

/// The request ids seen recently, so a callback repeated with the same id is counted once.
///
/// Contract:
/// - An id is kept as a 64-bit digest (the first 8 bytes of its SHA-256): the caller chooses ids
///   and their length, so memory and the ledger hold a fixed 8 bytes per id, not the id. Two
///   different ids share a digest with probability about n²/2⁶⁵ (3 in 100 million for a full
///   window of a million ids), which would count one callback as a duplicate.
/// - `claim` is the only way an id enters: true means it was not seen within `window` seconds
///   and is now recorded; false means it is a duplicate. A caller whose count then fails to be
///   committed gives the id back with `release`, so a retry of that callback counts (an id is
///   never claimed for a callback that was not counted).
/// - Bounds: at most `maxIDs` ids. Beyond it the oldest is forgotten before its window ends and
///   counted in `evictions`; an id older than `window` is forgotten whenever ids are claimed.
///   Memory is about 32 bytes per id.
/// - Concurrency: every method may be called from any thread; one lock, held for one dictionary
///   operation and the expiry of what fell out of the window.
/// - Time is wall-clock seconds, supplied by the caller, so ids read back from the ledger after a
///   restart keep their place in the window.
public final class RequestIDWindow: Sendable {
    public let window: Int64
    public let maxIDs: Int
    private let state: Mutex<State>

    private struct State {
        /// Digest to the time it was claimed.
        var seen: [UInt64: Int64] = [:]
        /// Claims in time order, for expiry and eviction. An entry whose digest was released or
        /// claimed again later no longer matches `seen` and is skipped.
        var order: [(digest: UInt64, time: Int64)] = []
        var head = 0
        var evictions: UInt64 = 0
    }

    public init(window: Int64, maxIDs: Int) {
        precondition(window > 0 && maxIDs > 0)
        self.window = window
        self.maxIDs = maxIDs
        self.state = Mutex(State())
    }

    public static func digest(_ id: String) -> UInt64 {
        // Hashed in place: no copy of the id into an array first.
        var id = id
        return id.withUTF8 { Self.digest(UnsafeRawBufferPointer($0)) }
    }

    /// The digest of an id's UTF-8 bytes.
    public static func digest(_ id: UnsafeRawBufferPointer) -> UInt64 {
        var hash = SHA256()
        hash.update(bufferPointer: id)
        return hash.finalize().withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    }

    /// True when `digest` was not seen within the window, and is now recorded as seen at `now`.
    public func claim(_ digest: UInt64, at now: Int64) -> Bool {
        self.state.withLock { state in
            self.expire(&state, now: now)
            // One hash lookup for the common case, a new id: written first, put back if a repeat.
            if let time = state.seen.updateValue(now, forKey: digest), now - time < self.window {
                state.seen[digest] = time
                return false
            }
            self.order(&state, digest, at: now)
            return true
        }
    }

    /// Forgets a claim whose callback was not counted after all.
    public func release(_ digest: UInt64) {
        self.state.withLock { _ = $0.seen.removeValue(forKey: digest) }
    }

    /// Puts back an id read from the ledger at startup (oldest first).
    public func restore(_ digest: UInt64, at time: Int64) {
        self.state.withLock { self.record(&$0, digest, at: time) }
    }

    public var count: Int { self.state.withLock { $0.seen.count } }
    public var evictions: UInt64 { self.state.withLock { $0.evictions } }
    /// Entries in the claim order, stale ones included (for the bound's test).
    var orderCount: Int { self.state.withLock { $0.order.count - $0.head } }

    private func record(_ state: inout State, _ digest: UInt64, at time: Int64) {
        state.seen[digest] = time
        self.order(&state, digest, at: time)
    }

    /// Appends a digest just written to `seen` to the claim order, within the bounds.
    private func order(_ state: inout State, _ digest: UInt64, at time: Int64) {
        state.order.append((digest, time))
        while state.seen.count > self.maxIDs, let oldest = self.popOldest(&state) {
            state.seen.removeValue(forKey: oldest.digest)
            state.evictions += 1
        }
        // Released and re-claimed ids leave stale entries behind; drop the consumed prefix once
        // it is most of the array, so `order` stays within twice the live ids.
        if state.head > 1024, state.head * 2 > state.order.count {
            state.order.removeFirst(state.head)
            state.head = 0
        }
        // Stale entries left mid-array (ids released after a failed commit) are bounded too.
        if state.order.count - state.head > 2 * self.maxIDs + 1024 {
            state.order = state.seen.map { ($0.key, $0.value) }.sorted { $0.time < $1.time }
            state.head = 0
        }
    }

    private func expire(_ state: inout State, now: Int64) {
        while state.head < state.order.count, now - state.order[state.head].time >= self.window {
            let entry = state.order[state.head]
            state.head += 1
            // One hash lookup for both the check and the removal.
            if let index = state.seen.index(forKey: entry.digest), state.seen.values[index] == entry.time { state.seen.remove(at: index) }
        }
    }

    /// The oldest live entry, taken off the order.
    private func popOldest(_ state: inout State) -> (digest: UInt64, time: Int64)? {
        while state.head < state.order.count {
            let entry = state.order[state.head]
            state.head += 1
            if state.seen[entry.digest] == entry.time { return entry }
        }
        return nil
    }
}
