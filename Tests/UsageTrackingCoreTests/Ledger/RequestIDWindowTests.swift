import Testing

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
}
