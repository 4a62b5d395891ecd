import Testing

@testable import UsageTrackingCore

@Suite struct HTMLTextTests {
    @Test func hostileNameBecomesText() {
        #expect(HTMLText.escaped("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;")
        #expect(HTMLText.escaped(#"a"b'c&d"#) == "a&quot;b&#39;c&amp;d")
        #expect(HTMLText.escaped("&amp;") == "&amp;amp;")
    }

    @Test func otherTextIsUnchanged() {
        for text in ["", "alice", "café / 東京 / 🙂", "/v1/chat?x=1", "K\u{212A}"] {
            #expect(HTMLText.escaped(text) == text)
            #expect(HTMLText.escaped(text).utf8.elementsEqual(text.utf8))
        }
    }

    @Test func appendsToWhatIsThere() {
        var out = "<p>"
        HTMLText.append("1 < 2", to: &out)
        #expect(out == "<p>1 &lt; 2")
    }

    @Test func queryComponentEncodesEveryReservedByte() {
        #expect(HTMLText.queryComponent("a b&c=d/é<") == "a%20b%26c%3Dd%2F%C3%A9%3C")
        #expect(HTMLText.queryComponent("Az09-._~") == "Az09-._~")
    }

    @Test(arguments: [
        ("user=alice", "alice"), ("x=1&user=a%20b", "a b"), ("user=a+b", "a b"), ("user=", ""), ("user", ""),
        ("user=%3Cimg%3E", "<img>"), ("users=x&user=y", "y"), ("user=%C3%A9", "é"),
    ])
    func queryValueIsDecoded(query: String, expected: String) {
        #expect(HTMLText.queryValue("user", in: Substring(query)) == expected)
    }

    @Test(arguments: ["", "x=1", "user=%", "user=%4", "user=%zz", "user=%FF"])
    func queryValueAbsentOrInvalidIsNil(query: String) {
        #expect(HTMLText.queryValue("user", in: Substring(query)) == nil)
    }

    @Test func queryComponentRoundTrips() {
        for name in ["<img src=x onerror=alert(1)>", "a+b c", "東京&=?#"] {
            #expect(HTMLText.queryValue("user", in: Substring("user=" + HTMLText.queryComponent(name))) == name)
        }
    }
}

@Suite struct CallbackRatesTests {
    @Test func countsLandInTheirSecondOldestFirst() {
        let rates = CallbackRates()
        for _ in 0..<3 { rates.record(.accepted, atSecond: 10) }
        rates.record(.accepted, atSecond: 12)
        rates.record(.refused, atSecond: 12)
        #expect(rates.perSecond(.accepted, last: 5, before: 13) == [0, 0, 3, 0, 1])
        #expect(rates.perSecond(.refused, last: 5, before: 13) == [0, 0, 0, 0, 1])
        // The second being counted is not complete, so it is not shown.
        #expect(rates.perSecond(.accepted, last: 2, before: 12) == [3, 0])
        #expect(rates.perSecond(.accepted, before: 13).count == CallbackRates.window)
    }

    @Test func aSlotFromARingAgoReadsZeroAndIsReclaimed() {
        let rates = CallbackRates()
        rates.record(.accepted, atSecond: 5)
        let later = 5 + CallbackRates.slots
        // Same slot, one ring later: the old count is not this second's.
        #expect(rates.perSecond(.accepted, last: 1, before: later + 1) == [0])
        rates.record(.accepted, atSecond: later)
        rates.record(.accepted, atSecond: later)
        #expect(rates.perSecond(.accepted, last: 1, before: later + 1) == [2])
        // A caller a whole ring late is dropped rather than counted in the wrong second.
        rates.record(.accepted, atSecond: 5)
        #expect(rates.perSecond(.accepted, last: 1, before: later + 1) == [2])
    }

    @Test func theWholeWindowIsKept() {
        let rates = CallbackRates()
        for second in 1...CallbackRates.window { rates.record(.refused, atSecond: second) }
        let counts = rates.perSecond(.refused, before: CallbackRates.window + 1)
        #expect(counts == Array(repeating: 1, count: CallbackRates.window))
        // Counting second 301 must not overwrite second 1 while second 1 is still in a window
        // that ends before 301.
        rates.record(.refused, atSecond: CallbackRates.window + 1)
        #expect(rates.perSecond(.refused, before: CallbackRates.window + 1).first == 1)
    }

    @Test func concurrentRecordsInOneSecondSumExactly() async {
        let rates = CallbackRates()
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<8 {
                group.addTask { for _ in 0..<20_000 { rates.record(.accepted, atSecond: 7) } }
            }
        }
        #expect(rates.perSecond(.accepted, last: 1, before: 8) == [160_000])
    }

    @Test func concurrentRecordsAcrossANewSecondLoseNothing() async {
        let rates = CallbackRates()
        rates.record(.accepted, atSecond: 3)
        // Every task claims the slot of second 3 + slots at once: one compare-and-exchange wins,
        // the others must still count.
        let second = 3 + CallbackRates.slots
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<8 {
                group.addTask { for _ in 0..<5_000 { rates.record(.accepted, atSecond: second) } }
            }
        }
        #expect(rates.perSecond(.accepted, last: 1, before: second + 1) == [40_000])
    }

    @Test func secondsBeforeTheStartAreIgnored() {
        let rates = CallbackRates()
        rates.record(.accepted, atSecond: 0)
        rates.record(.accepted, atSecond: -5)
        #expect(rates.perSecond(.accepted, last: 3, before: 1) == [0, 0, 0])
    }

    @Test func ratesUseTheTimeSinceStartWhenShorter() {
        let counts: [UInt64] = Array(repeating: 0, count: 290) + Array(repeating: 6, count: 10)
        #expect(CallbackRates.rate(counts, last: 60, elapsed: 1000) == 1)
        #expect(CallbackRates.rate(counts, last: 300, elapsed: 1000) == 0.2)
        #expect(CallbackRates.rate(counts, last: 60, elapsed: 10) == 6)
        #expect(CallbackRates.rate(counts, last: 60, elapsed: 0) == 6)
    }

    @Test func theClockAdvancesFromOne() {
        let rates = CallbackRates()
        #expect((1...2).contains(rates.currentSecond))
        rates.record(.accepted)
        // The clock may tick between the two calls, so both seconds are read.
        #expect(rates.perSecond(.accepted, last: 2, before: rates.currentSecond + 1).reduce(0, +) == 1)
    }
}

@Suite struct LabelRankingTests {
    @Test func ranksEachLabelByItsSum() {
        let series: [(labels: LabelValues, value: UInt64)] = [
            (["alice", "free", "/a"], 5), (["alice", "free", "/b"], 4), (["bob", "premium", "/a"], 7),
            (["carol", "free", "/c"], 1), (["dave", "free", "/c"], 1),
        ]
        let rankings = LabelRanking.rank(series, labelNames: ["user", "groups", "path"], top: 3)
        #expect(rankings.map(\.labelName) == ["user", "groups", "path"])
        #expect(rankings.map(\.distinctValues) == [4, 2, 3])
        // Ties go in byte order of the value: carol before dave, and dave is cut at 3.
        #expect(rankings[0].top == [.init(value: "alice", count: 9), .init(value: "bob", count: 7), .init(value: "carol", count: 1)])
        #expect(rankings[1].top == [.init(value: "free", count: 11), .init(value: "premium", count: 7)])
        #expect(rankings[2].top == [.init(value: "/a", count: 12), .init(value: "/b", count: 4), .init(value: "/c", count: 2)])
    }

    @Test func valuesAreDistinctByBytes() {
        let nfc = "caf\u{E9}", nfd = "cafe\u{301}"
        let rankings = LabelRanking.rank([([nfc], 2), ([nfd], 1)], labelNames: ["user"], top: 5)
        #expect(rankings[0].distinctValues == 2)
        #expect(rankings[0].top.map { Array($0.value.utf8) } == [Array(nfc.utf8), Array(nfd.utf8)])
    }

    @Test func topIsBoundedWhateverTheNumberOfValues() {
        let series = (0..<10_000).map { (labels: ["user\($0)"] as LabelValues, value: UInt64($0 % 97)) }
        let ranking = LabelRanking.rank(series, labelNames: ["user"], top: 20)[0]
        #expect(ranking.distinctValues == 10_000)
        #expect(ranking.top.count == 20)
        #expect(ranking.top.allSatisfy { $0.count == 96 })
        let expected = series.filter { $0.value == 96 }.map { $0.labels[0] }.sorted { $0.compareBytes($1) < 0 }.prefix(20)
        #expect(ranking.top.map(\.value) == Array(expected))
    }

    @Test func sumsGrowFromTheSmallestTableWithoutLosingAValue() {
        var sums = ValueSums(capacity: 1)
        for round in 1...3 {
            for index in 0..<1_000 { sums.add("v\(index)", UInt64(round)) }
        }
        sums.add("caf\u{E9}", 1)
        sums.add("cafe\u{301}", 2)
        // Keyed by bytes: a `String`-keyed Dictionary would merge the two spellings of café.
        var seen: [[UInt8]: UInt64] = [:]
        sums.forEach { text, sum in seen[Array(text.utf8)] = sum }
        #expect(sums.count == 1_002)
        #expect(seen.count == 1_002)
        #expect((0..<1_000).allSatisfy { seen[Array("v\($0)".utf8)] == 6 })
        #expect(seen[Array("caf\u{E9}".utf8)] == 1)
        #expect(seen[Array("cafe\u{301}".utf8)] == 2)
    }

    @Test func rankingAFamilyStripeByStripeEqualsRankingItsSnapshot() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user", "path"], stripes: 8)
        for index in 0..<5_000 { family.increment(["u\(index % 700)", "/p\(index % 13)"], by: UInt64(index % 5 + 1)) }
        let fromFamily = LabelRanking.rank(family, top: 20)
        let fromSnapshot = LabelRanking.rank(family.snapshot(), labelNames: family.labelNames, top: 20)
        #expect(fromFamily.map(\.top) == fromSnapshot.map(\.top))
        #expect(fromFamily.map(\.distinctValues) == [700, 13])
    }

    @Test func seriesWhereFiltersUnderTheStripeLocks() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user", "path"], stripes: 4)
        for (user, path) in [("a", "/1"), ("b", "/1"), ("a", "/2"), ("a", "/2")] { family.increment([user, path]) }
        let alice = family.series { $0[0] == "a" }.sorted { $0.labels.lexicographicallyPrecedes($1.labels) }
        #expect(alice.map(\.labels) == [["a", "/1"], ["a", "/2"]])
        #expect(alice.map(\.value) == [1, 2])
        #expect(family.series().count == 3)
    }
}

@Suite struct StatusEventsTests {
    @Test func nothingRecordedReadsNil() {
        let events = StatusEvents()
        #expect(events.lastScrape == nil)
        #expect(events.lastReload == nil)
        #expect(events.lastSecretMatch == nil)
    }

    @Test func theLastOfEachIsKept() {
        let events = StatusEvents()
        events.recordSecretMatch(position: 0, time: 10)
        events.recordSecretMatch(position: 2, time: 11.5)
        #expect(events.lastSecretMatch == StatusEvents.SecretMatch(position: 2, time: 11.5))
        events.recordScrape(.init(time: 1, from: "10.0.0.1:5", renderSeconds: 0.25))
        events.recordScrape(.init(time: 2, from: nil, renderSeconds: 0.5))
        #expect(events.lastScrape == .init(time: 2, from: nil, renderSeconds: 0.5))
        events.recordReload(.init(time: 3, result: "reloaded"))
        #expect(events.lastReload == .init(time: 3, result: "reloaded"))
    }

    @Test func aMatchRecordedNowHasTodaysTime() {
        let events = StatusEvents()
        events.recordSecretMatch(position: 1)
        let match = events.lastSecretMatch
        #expect(match?.position == 1)
        // After 2026-01-01 and before 2100: the wall clock, not a monotonic one.
        #expect((1_767_225_600.0..<4_102_444_800.0).contains(match?.time ?? 0))
    }
}
