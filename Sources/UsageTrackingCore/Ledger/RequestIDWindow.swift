import CPrefetch
import Crypto
import Glibc
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
///   Memory: a 16-byte slot per id in a table at most half full, and 16 bytes per claim in the
///   claim order, which may hold twice the live ids: about 70 bytes per id at the bound
///   (`usage-tracking-core-benchmark --only request-id-memory`).
/// - Concurrency: every method may be called from any thread; one lock, held for one table
///   operation and the expiry of what fell out of the window.
/// - Time is wall-clock seconds, supplied by the caller, so ids read back from the ledger after a
///   restart keep their place in the window.
public final class RequestIDWindow: Sendable {
    public let window: Int64
    public let maxIDs: Int
    private let state: Mutex<State>

    private struct State {
        /// Digest to the time it was claimed.
        var seen: DigestTable
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
        self.state = Mutex(State(seen: DigestTable()))
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
            // One probe of the table: it finds the id, or the empty slot where it goes.
            switch state.seen.find(digest) {
            case .found(let slot):
                if now - state.seen.time(at: slot) < self.window { return false }
                state.seen.setTime(now, at: slot)
            case .absent(let slot):
                state.seen.insert(digest, at: now, into: slot)
            }
            self.order(&state, digest, at: now)
            // The next claim evicts or expires the oldest entry: its slot is fetched meanwhile.
            if state.head < state.order.count { state.seen.prefetch(state.order[state.head].digest) }
            return true
        }
    }

    /// Starts fetching the slot `digest` is looked up at, so that its `claim` a moment later
    /// (once the callback is decoded) does not wait for memory: in a window of a million ids
    /// that slot is rarely in any cache.
    public func prefetch(_ digest: UInt64) {
        self.state.withLock { $0.seen.prefetch(digest) }
    }

    /// Forgets a claim whose callback was not counted after all.
    public func release(_ digest: UInt64) {
        self.state.withLock { state in
            if case .found(let slot) = state.seen.find(digest) { state.seen.remove(at: slot) }
        }
    }

    /// Puts back an id read from the ledger at startup (oldest first).
    public func restore(_ digest: UInt64, at time: Int64) {
        self.state.withLock { state in
            switch state.seen.find(digest) {
            case .found(let slot): state.seen.setTime(time, at: slot)
            case .absent(let slot): state.seen.insert(digest, at: time, into: slot)
            }
            self.order(&state, digest, at: time)
        }
    }

    public var count: Int { self.state.withLock { $0.seen.count } }
    public var evictions: UInt64 { self.state.withLock { $0.evictions } }
    /// Entries in the claim order, stale ones included (for the bound's test).
    var orderCount: Int { self.state.withLock { $0.order.count - $0.head } }
    /// The table's slots (for the bound's test).
    var slotCount: Int { self.state.withLock { $0.seen.slotCount } }

    /// Appends a digest just written to `seen` to the claim order, within the bounds.
    private func order(_ state: inout State, _ digest: UInt64, at time: Int64) {
        state.order.append((digest, time))
        while state.seen.count > self.maxIDs, let oldest = self.popOldest(&state) {
            state.seen.remove(at: oldest)
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
            state.order = state.seen.entries.sorted { $0.time < $1.time }
            state.head = 0
        }
    }

    private func expire(_ state: inout State, now: Int64) {
        while state.head < state.order.count, now - state.order[state.head].time >= self.window {
            let entry = state.order[state.head]
            state.head += 1
            if let slot = state.seen.slot(of: entry) { state.seen.remove(at: slot) }
        }
    }

    /// The slot of the oldest live entry, taken off the order.
    private func popOldest(_ state: inout State) -> Int? {
        while state.head < state.order.count {
            let entry = state.order[state.head]
            state.head += 1
            if let slot = state.seen.slot(of: entry) { return slot }
        }
        return nil
    }
}

/// Digests and the times they were claimed, in one open-addressed array: a digest and its time
/// share a slot, so finding, adding or removing an id touches one place in memory (a dictionary
/// keeps keys, values and occupancy apart, three cache misses in a window of a million ids).
///
/// Linear probing, at most half full (and one), with backward-shift removal (no tombstones). A
/// digest's home slot is the top bits of the digest times a random odd number chosen per table:
/// the ids, and so their digests, come from callers, and without the secret factor a caller could
/// grind ids whose digests share a home and make every probe walk a long run.
struct DigestTable {
    /// `time == DigestTable.empty` marks a free slot (every digest value is a possible id).
    private var slots: [(digest: UInt64, time: Int64)]
    private var shift: UInt64
    private let factor: UInt64
    private(set) var count = 0
    private static let empty = Int64.min

    enum Place { case found(Int), absent(Int) }

    init() {
        self.slots = Self.emptySlots(16)
        self.shift = 64 - 4
        self.factor = UInt64.random(in: 0...UInt64.max) | 1
    }

    private var mask: Int { self.slots.count - 1 }

    private func home(_ digest: UInt64) -> Int { Int(truncatingIfNeeded: (digest &* self.factor) >> self.shift) }

    func find(_ digest: UInt64) -> Place {
        var slot = self.home(digest)
        while true {
            let entry = self.slots[slot]
            if entry.time == Self.empty { return .absent(slot) }
            if entry.digest == digest { return .found(slot) }
            slot = (slot + 1) & self.mask
        }
    }

    func prefetch(_ digest: UInt64) {
        self.slots.withUnsafeBufferPointer { cprefetch($0.baseAddress! + self.home(digest)) }
    }

    func time(at slot: Int) -> Int64 { self.slots[slot].time }

    /// The slot of a claim-order entry that is still live: its digest is held, claimed at its time.
    func slot(of entry: (digest: UInt64, time: Int64)) -> Int? {
        guard case .found(let slot) = self.find(entry.digest), self.slots[slot].time == entry.time else { return nil }
        return slot
    }
    mutating func setTime(_ time: Int64, at slot: Int) { self.slots[slot].time = time }

    /// Adds a digest at the free slot `find` returned for it.
    mutating func insert(_ digest: UInt64, at time: Int64, into slot: Int) {
        self.slots[slot] = (digest, time)
        self.count += 1
        // One past half is let be: a full window holds one id more until it evicts the oldest,
        // and growing for it would double the table of a power-of-two bound for good.
        if (self.count - 1) * 2 > self.slots.count { self.grow() }
    }

    var slotCount: Int { self.slots.count }

    /// Empties a slot, moving back the entries after it that would no longer be found.
    mutating func remove(at slot: Int) {
        var hole = slot
        var next = slot
        while true {
            next = (next + 1) & self.mask
            let entry = self.slots[next]
            if entry.time == Self.empty { break }
            // The entry may fill the hole unless its home lies after the hole, up to it.
            if (next - self.home(entry.digest)) & self.mask >= (next - hole) & self.mask {
                self.slots[hole] = entry
                hole = next
            }
        }
        self.slots[hole] = (0, Self.empty)
        self.count -= 1
    }

    var entries: [(digest: UInt64, time: Int64)] { self.slots.filter { $0.time != Self.empty } }

    /// The slots a lookup of `digest` reads (for the spreading test).
    func probeLength(_ digest: UInt64) -> Int {
        let place = self.find(digest)
        let end: Int
        switch place { case .found(let slot), .absent(let slot): end = slot }
        return (end - self.home(digest)) & self.mask + 1
    }

    /// `count` free slots. A large table is asked for 2 MiB pages before it is first written:
    /// every lookup lands on a random slot, and with 4 KiB pages each one also missed the TLB (a
    /// page walk, dearer still under a hypervisor). Where the kernel gives none, nothing changes.
    private static func emptySlots(_ count: Int) -> [(digest: UInt64, time: Int64)] {
        Array(unsafeUninitializedCapacity: count) { buffer, initialized in
            let hugePage = 2 << 20
            let start = (Int(bitPattern: buffer.baseAddress) + hugePage - 1) & ~(hugePage - 1)
            let end = (Int(bitPattern: buffer.baseAddress) + count * MemoryLayout<(UInt64, Int64)>.stride) & ~(hugePage - 1)
            if end > start { _ = madvise(UnsafeMutableRawPointer(bitPattern: start), end - start, MADV_HUGEPAGE) }
            buffer.initialize(repeating: (0, Self.empty))
            initialized = count
        }
    }

    private mutating func grow() {
        let old = self.slots
        self.slots = Self.emptySlots(old.count * 2)
        self.shift -= 1
        for entry in old where entry.time != Self.empty {
            guard case .absent(let slot) = self.find(entry.digest) else { continue }
            self.slots[slot] = entry
        }
    }
}
