import Glibc
import Synchronization

/// Callbacks per second over the last five minutes, accepted and refused apart: what the status
/// page's rates and chart show.
///
/// Recording is on `/track`'s path, so it costs one clock read and one or two relaxed atomic
/// operations: no lock, no allocation, O(1) whatever the traffic. Each slot of a ring holds one
/// second's count packed with the second it belongs to (`second << 32 | count`). A callback in
/// the slot's current second adds 1; the first callback of a new second claims the slot with a
/// compare-and-exchange, which also discards the count five minutes old that the slot held. A
/// reader takes a slot's count only when its second is the one asked for, so a slot not written
/// for a while reads as 0 rather than as a stale count.
///
/// Relaxed ordering is enough: each slot is one atomic word, and readers want a recent value,
/// not an ordering with other memory.
public final class CallbackRates: Sendable {
    public enum Kind: Int, Sendable, CaseIterable {
        case accepted, refused
    }

    /// Seconds shown, and over which the longer rate is taken.
    public static let window = 300
    /// One slot more than the window, so the second being counted now never overwrites the
    /// oldest complete second still in the window.
    static let slots = window + 1

    private let rings: [Ring]
    /// The monotonic second this instance started in; seconds are counted from it so they fit
    /// in the 32 bits of a slot (136 years).
    private let origin: Int

    /// `Atomic` cannot be copied into an array, so each slot is a small object holding one.
    private final class Slot: Sendable {
        let value = Atomic<UInt64>(0)
    }

    private final class Ring: Sendable {
        let slots = (0..<CallbackRates.slots).map { _ in Slot() }
    }

    public init() {
        self.rings = Kind.allCases.map { _ in Ring() }
        self.origin = Self.monotonicSeconds() - 1
    }

    /// Seconds on the monotonic coarse clock: a vDSO read of a value the kernel updates every
    /// tick, cheaper than the precise clock, and seconds need no more.
    static func monotonicSeconds() -> Int {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &now)
        return now.tv_sec
    }

    /// The second (since this instance started, from 1) that `record` counts in now.
    public var currentSecond: Int { Self.monotonicSeconds() - self.origin }

    public func record(_ kind: Kind) {
        self.record(kind, atSecond: self.currentSecond)
    }

    /// Counts one callback in `second`; tests pass seconds directly.
    public func record(_ kind: Kind, atSecond second: Int) {
        // Seconds start at 1; anything earlier is before this instance and has no slot.
        guard second > 0 else { return }
        let slot = self.rings[kind.rawValue].slots[second % Self.slots]
        let stamp = UInt64(truncatingIfNeeded: second) << 32
        var current = slot.value.load(ordering: .relaxed)
        while true {
            if current & ~0xFFFF_FFFF == stamp {
                // Same second: a plain add. The slot can only be claimed by a second one whole
                // ring later, which cannot arrive between this load and this add.
                slot.value.wrappingAdd(1, ordering: .relaxed)
                return
            }
            if current >> 32 > UInt64(truncatingIfNeeded: second) {
                // The slot already holds a later second: this caller is a ring late. Dropped.
                return
            }
            let (exchanged, original) = slot.value.compareExchange(expected: current, desired: stamp | 1, ordering: .relaxed)
            if exchanged { return }
            current = original
        }
    }

    /// Counts in the `seconds` complete seconds before `second`, oldest first. `seconds` is at
    /// most `window`.
    public func perSecond(_ kind: Kind, last seconds: Int = CallbackRates.window, before second: Int) -> [UInt64] {
        precondition(seconds <= Self.window)
        let ring = self.rings[kind.rawValue]
        return (second - seconds..<second).map { wanted in
            guard wanted > 0 else { return 0 }
            let value = ring.slots[wanted % Self.slots].value.load(ordering: .relaxed)
            return value >> 32 == UInt64(truncatingIfNeeded: wanted) ? value & 0xFFFF_FFFF : 0
        }
    }

    /// Callbacks per second over the last `seconds` complete seconds before `second`, or over
    /// the time since start when that is shorter, so a young process does not read low.
    public static func rate(_ counts: [UInt64], last seconds: Int, elapsed: Int) -> Double {
        let span = max(1, min(seconds, elapsed, counts.count))
        let total = counts.suffix(span).reduce(0, +)
        return Double(total) / Double(span)
    }
}
