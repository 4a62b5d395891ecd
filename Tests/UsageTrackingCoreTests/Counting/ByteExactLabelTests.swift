import Testing

@testable import UsageTrackingCore

/// Label values that `String` calls equal (canonical equivalence) but Prometheus, comparing
/// bytes, treats as different: each pair must be two series, each kept with its own bytes.
private let equivalentPairs: [(String, String)] = [
    ("Kevin", "\u{212A}evin"),  // ASCII K and the Kelvin sign
    ("caf\u{E9}", "cafe\u{301}"),  // NFC and NFD
    ("a;b", "a\u{37E}b"),  // semicolon and the Greek question mark
]

private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

@Suite struct ByteExactLabelTests {
    @Test(arguments: equivalentPairs)
    func equivalentValuesAreDistinctSeries(first: String, second: String) {
        #expect(first == second, "the pair must be canonically equivalent, or this test proves nothing")
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user", "path"], stripes: 4)
        family.increment([first, "/p"])
        family.increment([second, "/p"], by: 2)
        #expect(family.seriesCount == 2)
        #expect(family.value([first, "/p"]) == 1)
        #expect(family.value([second, "/p"]) == 2)
        let snapshot = family.snapshot().map { ($0.labels.map(bytes), $0.value) }
        let expected = [([bytes(first), bytes("/p")], UInt64(1)), ([bytes(second), bytes("/p")], UInt64(2))]
            .sorted { $0.0[0].lexicographicallyPrecedes($1.0[0]) }
        #expect(snapshot.map(\.0) == expected.map(\.0))
        #expect(snapshot.map(\.1) == expected.map(\.1))
    }

    @Test(arguments: equivalentPairs)
    func expositionCarriesEachValuesOwnBytes(first: String, second: String) {
        let metrics = UsageMetrics()
        metrics.requests.increment([first, "g", "/p"])
        metrics.requests.increment([second, "g", "/p"])
        metrics.requests.increment([second, "g", "/p"])
        // Compared as bytes: `String` comparison would match either spelling.
        let lines = metrics.render().split(separator: UInt8(ascii: "\n")).map(Array.init)
        let expected = [
            bytes(#"llm_requests_total{user="\#(first)",groups="g",path="/p"} 1"#),
            bytes(#"llm_requests_total{user="\#(second)",groups="g",path="/p"} 2"#),
        ].sorted { $0.lexicographicallyPrecedes($1) }
        #expect(lines.filter { $0.starts(with: bytes("llm_requests_total{")) } == expected)
        #expect(lines.filter { $0.starts(with: bytes("usage_tracking_series{")) } == [bytes(#"usage_tracking_series{metric="llm_requests_total"} 2"#)])
    }

    /// By bytes `Z` (0x5A) sorts before the Kelvin sign (0xE2…); by `String` the Kelvin sign is
    /// `K` and comes first.
    @Test func snapshotIsSortedByBytes() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user"], stripes: 4)
        for user in ["\u{212A}", "Z", "cafe\u{301}", "caf\u{E9}", "cafe", "K"] { family.increment([user]) }
        #expect(family.snapshot().map { bytes($0.labels[0]) } == ["K", "Z", "cafe", "cafe\u{301}", "caf\u{E9}", "\u{212A}"].map(bytes))
    }

    /// ASCII and non-ASCII series are sorted apart and merged; the result is one byte order.
    @Test func mixedSeriesMergeIntoOneByteOrder() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user", "path"], stripes: 3)
        let pieces = ["a", "K", "\u{212A}", "e\u{301}", "\u{E9}", "z", ";", "\u{37E}", "", "~"]
        var all: [[String]] = []
        for x in pieces { for y in pieces { all.append([x + y, y]) } }
        for labels in all.reversed() { family.increment(labels) }
        let expected = all.map { $0.map(bytes) }.sorted { $0.lexicographicallyPrecedes($1) { $0.lexicographicallyPrecedes($1) } }
        #expect(family.snapshot().map { $0.labels.map(bytes) } == expected)
    }

    @Test func labelBoundariesArePartOfTheIdentity() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["a", "b"])
        family.increment(["ab", ""])
        family.increment(["a", "b"])
        #expect(family.seriesCount == 2)
    }
}

@Suite struct ByteExactGroupsTests {
    private let decoder = CallbackDecoder()

    private func groups(_ json: String) throws -> [UInt8] {
        bytes(try decoder.decode(Array(#"{"user":"u","groups":\#(json)}"#.utf8), contentType: "application/json").groups)
    }

    @Test func equivalentGroupNamesStayTwoGroupsSortedByBytes() throws {
        // NFD `e` + U+0301 (0x65…) sorts before NFC `é` (0xC3…).
        #expect(try groups(#"["\u00e9","e\u0301"]"#) == bytes("e\u{301},\u{E9}"))
        #expect(try groups(#""\u212a, K""#) == bytes("K,\u{212A}"))
        #expect(try groups(#"["\u00e9","\u00e9"]"#) == bytes("\u{E9}"))
    }

    @Test func repeatedFormGroupsAreDeDuplicatedByBytes() throws {
        let callback = try decoder.decode(
            Array("user=u&groups=caf%C3%A9&groups=cafe%CC%81&groups=caf%C3%A9".utf8), contentType: "application/x-www-form-urlencoded")
        #expect(bytes(callback.groups) == bytes("cafe\u{301},caf\u{E9}"))
    }

    /// A comma followed by a combining mark is one `Character`, but still the separator byte.
    @Test func aCommaBeforeACombiningMarkStillSeparates() throws {
        #expect(try groups(#""a,\u0301x,\u0301x""#) == bytes("a,\u{301}x"))
        #expect(try groups(#""\u0301b,\u0301a""#) == bytes("\u{301}a,\u{301}b"))
    }

    @Test func usersKeepTheirBytesAndCallbacksCompareByBytes() throws {
        let callback = try decoder.decode(Array(#"{"user":"\u212aevin"}"#.utf8), contentType: "application/json")
        #expect(bytes(callback.user) == bytes("\u{212A}evin"))
        #expect(callback != Callback(user: "Kevin", groups: "", path: ""))
        #expect(callback == Callback(user: "\u{212A}evin", groups: "", path: ""))
    }
}
