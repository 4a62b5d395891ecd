import Synchronization

/// A bound on replies too big to hold many of, `/metrics` expositions (18 MB as text at the
/// built-in budgets): each takes a slot from its render until the socket has taken its last byte
/// or its connection is gone. A scraper that never reads holds one slot, and a few such scrapers
/// cannot hold a copy each until the pod runs out of memory.
///
/// Contract: `take` may be called from any thread; a slot is given back when the last reference
/// to it goes, so a reply dropped unwritten (its connection closed first) gives its slot back too.
final class ReplySlots: Sendable {
    let limit: Int
    private let used = Atomic<Int>(0)

    init(limit: Int) {
        precondition(limit > 0)
        self.limit = limit
    }

    /// A slot, or nil when all `limit` are held.
    func take() -> Slot? {
        var current = self.used.load(ordering: .relaxed)
        while current < self.limit {
            let (exchanged, original) = self.used.compareExchange(expected: current, desired: current + 1, ordering: .acquiringAndReleasing)
            if exchanged { return Slot(self) }
            current = original
        }
        return nil
    }

    var held: Int { self.used.load(ordering: .relaxed) }

    final class Slot: Sendable {
        private let slots: ReplySlots

        fileprivate init(_ slots: ReplySlots) {
            self.slots = slots
        }

        deinit {
            self.slots.used.subtract(1, ordering: .acquiringAndReleasing)
        }
    }
}
