import Testing

@testable import UsageTrackingCore

@Suite struct CounterFamilyTests {
    @Test func concurrentIncrementsOfOverlappingSeriesSumExactly() async {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user", "path"])
        let tasks = 8
        let perTask = 50_000
        await withTaskGroup(of: Void.self) { group in
            for task in 0..<tasks {
                group.addTask {
                    for i in 0..<perTask {
                        // Every task hits the same 100 series, in a different order.
                        family.increment(["user\((i * (task + 1)) % 100)", "/p"])
                    }
                }
            }
        }
        let snapshot = family.snapshot()
        #expect(snapshot.count == 100)
        #expect(snapshot.reduce(0) { $0 + $1.value } == UInt64(tasks * perTask))
        #expect(family.seriesCount == 100)
    }

    @Test func snapshotIsSortedByLabelValues() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["a", "b"], stripes: 4)
        for labels in [["b", "1"], ["a", "2"], ["a", "10"], ["c", ""], ["a", "1"]] { family.increment(labels) }
        family.increment(["a", "1"], by: 4)
        #expect(family.snapshot().map(\.labels) == [["a", "1"], ["a", "10"], ["a", "2"], ["b", "1"], ["c", ""]])
        #expect(family.value(["a", "1"]) == 5)
        #expect(family.value(["zz", "0"]) == 0)
    }

    @Test func manyDistinctSeries() {
        let family = CounterFamily(name: "t_total", help: "t", labelNames: ["user"])
        for i in 0..<100_000 { family.increment(["user\(i)"]) }
        #expect(family.seriesCount == 100_000)
        #expect(family.snapshot().allSatisfy { $0.value == 1 })
    }
}
