import Synchronization

/// A bound on requests whose replies cost much to make or to hold, taken when the request is
/// routed. `/metrics` expositions (18 MB as text at the built-in budgets) keep their slot until
/// the socket has taken the last byte or the connection is gone: a scraper that never reads holds
/// one, and a few such scrapers cannot hold a copy each until the pod runs out of memory. Status
/// page and `/debug` requests keep theirs until rendered, so that no number of them queues on the
/// render thread ahead of a scrape.
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
