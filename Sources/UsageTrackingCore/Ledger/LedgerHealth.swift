import Synchronization

/// What `/metrics` and `/readyz` report of the ledger; the server's writer updates it.
public final class LedgerHealth: Sendable {
    private let failures = Atomic<UInt64>(0)
    private let lastCommitSeconds = Atomic<UInt64>(0)
    private let failing = Atomic<Bool>(false)
    private let successes = Atomic<UInt64>(0)
    private let open: Atomic<Bool>

    /// `open`: restored already (a ledger restored before the listener opens).
    public init(open: Bool = true) {
        self.open = Atomic(open)
    }

    /// True once the ledger's counts are restored; until then nothing may be counted.
    public var isOpen: Bool { self.open.load(ordering: .acquiring) }

    public func opened() {
        self.open.store(true, ordering: .releasing)
        self.failing.store(false, ordering: .relaxed)
    }

    public var errors: UInt64 { self.failures.load(ordering: .relaxed) }
    /// Successful commits; callbacks per commit is the group commit's batch size.
    public var commits: UInt64 { self.successes.load(ordering: .relaxed) }
    /// Unix time of the last successful commit, 0 before the first.
    public var lastCommit: UInt64 { self.lastCommitSeconds.load(ordering: .relaxed) }
    /// True from a failed commit (or connection) until the next one succeeds.
    public var isFailing: Bool { self.failing.load(ordering: .relaxed) }

    public func committed(at time: Int64) {
        self.lastCommitSeconds.store(UInt64(max(0, time)), ordering: .relaxed)
        self.successes.wrappingAdd(1, ordering: .relaxed)
        self.failing.store(false, ordering: .relaxed)
    }

    public func failed() {
        self.failures.wrappingAdd(1, ordering: .relaxed)
        self.failing.store(true, ordering: .relaxed)
    }
}
