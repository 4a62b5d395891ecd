import Testing

@testable import UsageTrackingCore

/// The parts of the shared ledger that need no server: its address, the claims a commit
/// settles, and `/usage`'s question and answer. The engine itself runs against a real
/// PostgreSQL in Tests/Integration/test_shared_ledger.py.
@Suite struct PostgresAddressTests {
    @Test func readsEveryPart() throws {
        let address = try PostgresAddress(url: "postgres://usage@db.example:6432/usage?sslmode=verify-full")
        #expect(address == PostgresAddress(user: "usage", host: "db.example", port: 6432, database: "usage", tls: .verifyFull))
        #expect("\(address)" == "postgres://usage@db.example:6432/usage?sslmode=verify-full")
        let defaults = try PostgresAddress(url: "postgresql://u@[::1]/d")
        #expect(defaults == PostgresAddress(user: "u", host: "::1", port: 5432, database: "d", tls: .prefer))
        #expect("\(defaults)" == "postgres://u@[::1]:5432/d")
    }

    @Test(arguments: [
        ("mysql://u@h/d", "must start with postgres://"),
        ("postgres://h:5432/d", "names no user (postgres://USER@HOST:PORT/DATABASE)"),
        ("postgres://u:secret@h/d", "holds a password; give it in --ledger-password-file (USAGE_TRACKING_LEDGER_PASSWORD_FILE) instead"),
        ("postgres://u@h", "names no database (postgres://USER@HOST:PORT/DATABASE)"),
        ("postgres://u@h/", "names no database (postgres://USER@HOST:PORT/DATABASE)"),
        ("postgres://u@h:0/d", "has a port that is not a number from 1 to 65535"),
        ("postgres://u@h:x/d", "has a port that is not a number from 1 to 65535"),
        ("postgres://u@:5432/d", "names no host"),
        ("postgres://u@h/d?sslmode=maybe", "sslmode must be one of disable, prefer, require, verify-full, got 'maybe'"),
        ("postgres://u@h/d?password=x", "has a parameter other than sslmode: password"),
    ])
    func refusesWithTheReason(url: String, reason: String) {
        #expect(throws: AddressError(reason)) { try PostgresAddress(url: url) }
    }

    @Test func theReasonNeverRepeatsAPassword() {
        do {
            _ = try PostgresAddress(url: "postgres://u:hunter2@h/d")
            Issue.record("accepted a password")
        } catch {
            #expect(!error.description.contains("hunter2"))
        }
    }
}

@Suite struct LedgerClaimTests {
    @Test func refusedClaimsCountAsDuplicatesAndAddNothing() {
        let metrics = UsageMetrics()
        let alice = metrics.resolve(Callback(user: "alice", groups: "g", path: "/p"))
        let bob = metrics.resolve(Callback(user: "bob", groups: "g", path: "/p"))
        var batch = LedgerBatch()
        batch.claim(1, isCallback: true, series: [alice], amounts: [[]])
        batch.claim(2, isCallback: true, series: [bob], amounts: [[]])
        batch.claim(3, isCallback: false, series: [alice, alice], amounts: [[7], [5]])
        #expect(Set(batch.claimedDigests) == [1, 2, 3])
        batch.settle(refused: [2], at: 3600)
        #expect(batch.claims.isEmpty)
        #expect(batch.totals[alice[0]!.id]?.amount == 13)
        #expect(batch.totals[bob[0]!.id] == nil)
        #expect(batch.outcomes[.init(outcome: .accepted, hour: 3600)] == 1)
        #expect(batch.outcomes[.init(outcome: .duplicate, hour: 3600)] == 1)
        #expect(batch.requestIDs.map(\.digest).sorted() == [1, 3])
    }
}

@Suite struct UsageQueryTests {
    private let labels: Set<String> = ["user", "groups", "path", "model", "type"]
    private let now: Int64 = 1_796_300_000  // 2026-12-03T11:33:20Z

    private func parse(_ query: String) -> Result<UsageQuery, UsageQueryProblems> {
        UsageQuery.parse(Substring(query), labelNames: self.labels, maxUserBytes: 256, now: self.now)
    }

    @Test func defaultsToTheCurrentUTCMonth() throws {
        let query = try self.parse("user=alice").get()
        #expect(rfc3339(unixSeconds: query.from) == "2026-12-01T00:00:00Z")
        #expect(rfc3339(unixSeconds: query.to) == "2027-01-01T00:00:00Z")
        #expect(query.by == [])
    }

    @Test func takesOffsetsAndRoundsDownToTheHour() throws {
        let query = try self.parse("user=al%20ice&from=2026-11-30T23:30:00.5-01:00&to=2026-12-02T10:59:59Z&by=path,model,path").get()
        #expect(query.user == "al ice")
        #expect(rfc3339(unixSeconds: query.from) == "2026-12-01T00:00:00Z")
        #expect(rfc3339(unixSeconds: query.to) == "2026-12-02T10:00:00Z")
        #expect(query.by == ["path", "model"])
    }

    @Test func namesEveryProblem() {
        let problems = self.parse("from=2026-02-30T00:00:00Z&to=yesterday&by=user,colour&limit=3").failure
        #expect(problems?.problems == [
            "unknown parameter 'limit'; use user, from, to, by",
            "user is required: /usage?user=NAME",
            "from: not an RFC 3339 time such as 2026-12-01T00:00:00Z",
            "to: not an RFC 3339 time such as 2027-01-01T00:00:00Z",
            "by: 'colour' is not a label of any family; labels: groups, model, path, type, user",
        ])
    }

    @Test func aParameterGivenTwiceIsRefusedNotGuessed() {
        #expect(self.parse("user=alice&user=bob").failure?.problems == ["user: given more than once"])
        #expect(self.parse("user=alice&by=path&by=model&by=user&from=2026-12-01T00:00:00Z&from=2026-12-02T00:00:00Z").failure?.problems == [
            "by: given more than once", "from: given more than once",
        ])
    }

    @Test func boundsTheSpanAndItsOrder() {
        #expect(self.parse("user=a&from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z").failure?.problems == [
            "from must be before to (both are rounded down to the hour)",
        ])
        #expect(self.parse("user=a&from=2025-01-01T00:00:00Z&to=2026-12-01T00:00:00Z").failure?.problems == [
            "from and to may be at most 366 days apart",
        ])
        #expect(self.parse("user=" + String(repeating: "x", count: 257)).failure?.problems == ["user: 257 bytes; the limit is 256"])
    }

    @Test func answersRequestsAsATotalAndTokensPerType() throws {
        let metrics = UsageMetrics(extProc: ExtProcCounters())
        let query = try self.parse("user=alice&by=path").get()
        let requests = metrics.families[0]
        let tokens = metrics.families[1]
        func row(_ names: [String], _ values: [String], _ amount: Int64) -> (labels: String, amount: Int64) {
            (LabelsJSON.encode(values, names: names), amount)
        }
        let answer = query.answer([
            .init(family: requests, typeLabel: nil, rows: [
                row(requests.labelNames, ["alice", "g", "/a"], 3), row(requests.labelNames, ["alice", "h", "/a"], 2),
                row(requests.labelNames, ["alice", "g", "/b"], 1),
            ]),
            .init(family: tokens, typeLabel: 4, rows: [
                row(tokens.labelNames, ["alice", "g", "/a", "m", "input"], 100), row(tokens.labelNames, ["alice", "g", "/a", "m", "cached_input"], 40),
            ]),
        ])
        #expect(answer.serialized == """
            {"user":"alice","from":"2026-12-01T00:00:00Z","to":"2027-01-01T00:00:00Z","families":{\
            "llm_requests_total":{"total":6,"by":[{"labels":{"path":"/a"},"total":5},{"labels":{"path":"/b"},"total":1}]},\
            "llm_tokens_total":{"types":{"cached_input":40,"input":100},"by":[{"labels":{"path":"/a","type":"input"},"total":100},\
            {"labels":{"path":"/a","type":"cached_input"},"total":40}]}}}
            """)
    }

    @Test(arguments: [
        ("2026-12-01T00:00:00Z", 1_796_083_200), ("2024-02-29T12:00:00+05:30", 1_709_188_200), ("2026-12-01 00:00:00z", 1_796_083_200),
    ])
    func readsRFC3339(text: String, seconds: Int64) {
        #expect(UsageQuery.parseTime(text) == seconds)
    }

    @Test(arguments: ["2026-12-01", "2026-13-01T00:00:00Z", "2026-12-01T00:00:00", "2026-12-01T00:00:00+0100", "2026-04-31T00:00:00Z", "2026-12-01T00:00:00.Z"])
    func refusesWhatIsNotRFC3339(text: String) {
        #expect(UsageQuery.parseTime(text) == nil)
    }
}

extension Result {
    fileprivate var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
