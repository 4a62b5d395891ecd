import Testing
import TestSupport

@testable import UsageTrackingCore

@Suite struct RequestIDWindowTests {
    @Test func digestIsTheFirstEightBytesOfSHA256() {
        // Python: struct.unpack('<Q', hashlib.sha256(b'abc').digest()[:8])[0]
        #expect(RequestIDWindow.digest("abc") == 16_919_744_041_952_114_874)
        #expect(RequestIDWindow.digest("r1") == 10_190_481_117_701_337_986)
    }

    @Test func aRepeatWithinTheWindowIsADuplicateAndOneAfterItIsNot() {
        let window = RequestIDWindow(window: 600, maxIDs: 10)
        #expect(window.claim(1, at: 1000))
        #expect(!window.claim(1, at: 1000))
        #expect(!window.claim(1, at: 1599))
        #expect(window.claim(1, at: 1600))
        #expect(!window.claim(1, at: 1601))
        #expect(window.count == 1)
    }

    @Test func expiredIdsAreForgotten() {
        let window = RequestIDWindow(window: 10, maxIDs: 100)
        for id in 0..<50 { #expect(window.claim(UInt64(id), at: Int64(id))) }
        // At 55, ids claimed at 45 or before have left the window: 46...49 and 999 remain.
        #expect(window.claim(999, at: 55))
        #expect(window.count == 5)
        #expect(!window.claim(46, at: 55))
        #expect(window.claim(45, at: 55))
        #expect(window.evictions == 0)
    }

    @Test func pastMaxIDsTheOldestIsEvictedAndCounted() {
        let window = RequestIDWindow(window: 600, maxIDs: 3)
        for id in 1...4 { #expect(window.claim(UInt64(id), at: 100)) }
        #expect(window.count == 3)
        #expect(window.evictions == 1)
        // The oldest was forgotten early, so it counts again; the others are still caught.
        #expect(window.claim(1, at: 101))
        #expect(!window.claim(4, at: 101))
        #expect(window.evictions == 2)
    }

    @Test func aReleasedIdCanBeClaimedAgain() {
        let window = RequestIDWindow(window: 600, maxIDs: 10)
        #expect(window.claim(7, at: 1))
        window.release(7)
        #expect(window.claim(7, at: 2))
        #expect(!window.claim(7, at: 3))
    }

    @Test func restoredIdsAreCaughtUntilTheirWindowEnds() {
        let window = RequestIDWindow(window: 600, maxIDs: 10)
        window.restore(5, at: 1000)
        #expect(!window.claim(5, at: 1500))
        #expect(window.claim(5, at: 1600))
    }

    /// Released ids leave entries in the claim order; they must not pile up without bound.
    @Test func claimsAndReleasesStayBounded() {
        let window = RequestIDWindow(window: 1_000_000, maxIDs: 100)
        for id in 0..<50_000 {
            #expect(window.claim(UInt64(id), at: 1))
            window.release(UInt64(id))
        }
        #expect(window.count == 0)
        #expect(window.orderCount <= 2 * 100 + 1024 + 1)
    }

    /// A full window holds its bound in a table at most half full: for a power-of-two bound too,
    /// though it holds one id more while it evicts the oldest.
    @Test func aFullWindowsTableIsTwiceItsBound() {
        for maxIDs in [1000, 1024] {
            let window = RequestIDWindow(window: 600, maxIDs: maxIDs)
            for id in 0..<5_000 { #expect(window.claim(UInt64(id), at: 1)) }
            #expect(window.count == maxIDs)
            #expect(window.slotCount == 2048, "a bound of \(maxIDs)")
        }
    }

    /// The table against a dictionary, through growth, removals that shift runs back (also
    /// across the array's end) and re-insertions.
    @Test func digestTableAgreesWithADictionary() {
        var table = DigestTable()
        var model: [UInt64: Int64] = [:]
        var generator = SeededGenerator(seed: 18)
        // A few hundred digests, so that removals meet long runs and ids come back.
        let digests = (0..<300).map { _ in UInt64.random(in: 0...UInt64.max, using: &generator) } + [0, 1, .max]
        for step in 0..<20_000 {
            let digest = digests.randomElement(using: &generator)!
            switch (table.find(digest), model[digest]) {
            case (.found(let slot), let time?):
                #expect(table.time(at: slot) == time)
                if Bool.random(using: &generator) {
                    table.remove(at: slot)
                    model[digest] = nil
                } else {
                    table.setTime(Int64(step), at: slot)
                    model[digest] = Int64(step)
                }
            case (.absent(let slot), nil):
                table.insert(digest, at: Int64(step), into: slot)
                model[digest] = Int64(step)
            default:
                Issue.record("the table and the dictionary disagree about \(digest) at step \(step)")
                return
            }
            #expect(table.count == model.count)
        }
        #expect(Dictionary(uniqueKeysWithValues: table.entries.map { ($0.digest, $0.time) }) == model)
    }

    /// Digests that differ only in their low or only in their high bits (as a caller grinding ids
    /// might choose) still spread over the table: a lookup reads a few slots, not a run of all.
    @Test func digestsAlikeInSomeBitsSpreadOverTheTable() {
        for shift in [0, 24, 44] {
            var table = DigestTable()
            let digests = (0..<UInt64(20_000)).map { $0 << shift }
            for digest in digests {
                guard case .absent(let slot) = table.find(digest) else { Issue.record("\(digest) found before it was added"); return }
                table.insert(digest, at: 1, into: slot)
            }
            let longest = digests.map { table.probeLength($0) }.max()!
            #expect(longest < 64, "digests shifted by \(shift) bits: a lookup read \(longest) slots")
        }
    }
}
