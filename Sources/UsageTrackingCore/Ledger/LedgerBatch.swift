/// Counts the ledger has not committed yet, summed: per series, per series and UTC hour, per
/// callback outcome and hour, with the request ids that came with them; and, in `always` mode,
/// the claims: counts that carry a request id the ledger itself must accept as new before they
/// are added (a shared ledger, where another replica may have counted the same id).
///
/// A batch is as large as the distinct series and hours in it, not as the callbacks: while
/// commits fail (interval mode keeps retrying), it grows only with new series and new hours,
/// which the families' budgets bound, and with request ids, which are capped at the dedupe
/// window's size.
public struct LedgerBatch: Sendable {
    struct SeriesTotal: Sendable {
        var family: Int
        var series: SeriesHandle
        var amount: UInt64
    }
    struct SeriesHour: Hashable, Sendable {
        var id: Int64
        var hour: Int64
    }
    struct OutcomeHour: Hashable, Sendable {
        var outcome: CallbackOutcome
        var hour: Int64
    }

    var totals: [Int64: SeriesTotal] = [:]
    var hourly: [SeriesHour: UInt64] = [:]
    var outcomes: [OutcomeHour: UInt64] = [:]
    var requestIDs: [(digest: UInt64, seen: Int64)] = []
    var claims: [Claim] = []

    /// One callback's or model answer's counts, added only if its request id is new to the
    /// ledger (`settle`).
    struct Claim: Sendable {
        var digest: UInt64
        /// A `/track` callback, counted in `usage_tracking_callbacks_total` as accepted or
        /// duplicate; a model answer's counts are not.
        var isCallback: Bool
        var counts: [(family: Int, series: SeriesHandle, amount: UInt64)]
    }
    /// Request ids kept at most (the dedupe window's size): an id beyond it would have been
    /// forgotten by the window anyway.
    public let maxRequestIDs: Int

    public init(maxRequestIDs: Int = 1_000_000) {
        self.maxRequestIDs = maxRequestIDs
    }

    public var isEmpty: Bool { self.totals.isEmpty && self.outcomes.isEmpty && self.requestIDs.isEmpty && self.claims.isEmpty }

    /// The start of the UTC hour holding `time` (Unix seconds).
    public static func hour(of time: Int64) -> Int64 { time - ((time % 3600) + 3600) % 3600 }

    public mutating func add(_ amount: UInt64, to series: SeriesHandle, family: Int, at time: Int64) {
        self.totals[series.id, default: SeriesTotal(family: family, series: series, amount: 0)].amount &+= amount
        self.hourly[SeriesHour(id: series.id, hour: Self.hour(of: time)), default: 0] &+= amount
    }

    public mutating func add(_ outcome: CallbackOutcome, count: UInt64 = 1, at time: Int64) {
        self.outcomes[OutcomeHour(outcome: outcome, hour: Self.hour(of: time)), default: 0] &+= count
    }

    public mutating func add(requestID digest: UInt64, seen: Int64) {
        self.requestIDs.append((digest, seen))
        if self.requestIDs.count > 2 * self.maxRequestIDs { self.requestIDs.removeFirst(self.requestIDs.count - self.maxRequestIDs) }
    }

    /// A callback of every family at once, as `UsageMetrics.count` returned its series.
    public mutating func add(_ series: [SeriesHandle?], amounts: [UInt64?], at time: Int64) {
        for (family, handle) in series.enumerated() {
            if let handle, let amount = amounts.isEmpty ? 1 : amounts[family] { self.add(amount, to: handle, family: family, at: time) }
        }
    }

    /// Adds counts whose request id the ledger decides on (`settle`). `series` and `amounts`
    /// are one entry per callback (a model answer has one per token type).
    public mutating func claim(_ digest: UInt64, isCallback: Bool, series: [[SeriesHandle?]], amounts: [[UInt64?]]) {
        var claim = Claim(digest: digest, isCallback: isCallback, counts: [])
        for (series, amounts) in zip(series, amounts) {
            for (family, handle) in series.enumerated() {
                if let handle, let amount = amounts.isEmpty ? 1 : amounts[family] { claim.counts.append((family, handle, amount)) }
            }
        }
        self.claims.append(claim)
    }

    /// The request ids of the claims, each once.
    public var claimedDigests: [UInt64] { Array(Set(self.claims.map(\.digest))) }

    /// Folds the claims in at `time`: those whose digest is in `refused` count as duplicates
    /// (a callback's outcome only), the others are added with their request ids.
    public mutating func settle(refused: Set<UInt64>, at time: Int64) {
        let claims = self.claims
        self.claims = []
        var accepted: UInt64 = 0
        var duplicates: UInt64 = 0
        for claim in claims {
            if refused.contains(claim.digest) {
                if claim.isCallback { duplicates += 1 }
                continue
            }
            if claim.isCallback { accepted += 1 }
            for count in claim.counts { self.add(count.amount, to: count.series, family: count.family, at: time) }
            self.add(requestID: claim.digest, seen: time)
        }
        if accepted > 0 { self.add(.accepted, count: accepted, at: time) }
        if duplicates > 0 { self.add(.duplicate, count: duplicates, at: time) }
    }

    /// Adds what `other` holds: `self` is a failed batch, `other` what arrived since.
    public mutating func merge(_ other: LedgerBatch) {
        for (id, total) in other.totals {
            self.totals[id, default: SeriesTotal(family: total.family, series: total.series, amount: 0)].amount &+= total.amount
        }
        for (key, amount) in other.hourly { self.hourly[key, default: 0] &+= amount }
        for (key, count) in other.outcomes { self.outcomes[key, default: 0] &+= count }
        // `other` is the newer (what arrived after a failed batch): its ids go last, and the
        // oldest are the ones the bound drops.
        self.requestIDs.append(contentsOf: other.requestIDs)
        if self.requestIDs.count > 2 * self.maxRequestIDs { self.requestIDs.removeFirst(self.requestIDs.count - self.maxRequestIDs) }
    }

    /// Rows a commit of this batch writes, about.
    public var rowCount: Int { self.totals.count + self.hourly.count + self.requestIDs.count + self.claims.count }

    /// Callbacks whose outcome is in this batch, for logs.
    public var callbacks: UInt64 { self.outcomes.values.reduce(0, &+) }
}
