import Testing

@testable import UsageTrackingCore

@Suite struct LedgerRowsTests {
    /// A batch's rows come back from their journal bytes as they were, request ids included
    /// (digests over 2⁶³ too).
    @Test func rowsRoundTripThroughTheirBytes() {
        var rows = LedgerRows(now: 1_795_471_072)
        rows.newSeries.append(3, 1, #"{"user":"a\"b"}"#, 2)
        rows.additions.append(4, 7)
        rows.hours.append(3, 1_795_467_600, 2)
        rows.requestIDs.append(UInt64.max, seen: 1_795_471_070)
        rows.requestIDs.append(42, seen: 1_795_471_072)
        let back = LedgerRows(encoded: rows.encoded[...])
        #expect(back == rows)
        var ids: [(UInt64, Int64)] = []
        back?.requestIDs.forEach { ids.append(($0, $1)) }
        #expect(ids.map(\.0) == [UInt64.max, 42] && ids.map(\.1) == [1_795_471_070, 1_795_471_072])
        #expect(back?.requestIDs.lastSeen == 1_795_471_072)
        // Cut anywhere, the bytes are not rows.
        let bytes = rows.encoded
        #expect((0..<bytes.count).allSatisfy { LedgerRows(encoded: bytes[..<$0]) == nil })
    }

    @Test func packedIDsAreWholeEntries() {
        #expect(PackedRequestIDs([UInt8](repeating: 0, count: 32))?.count == 2)
        #expect(PackedRequestIDs([UInt8](repeating: 0, count: 15)) == nil)
        #expect(PackedRequestIDs([UInt8]())?.isEmpty == true)
    }

    /// The request ids of a journal record an earlier build wrote, JSON rows of two integers.
    @Test(arguments: [
        ("[]", [], []),
        ("[[1,2]]", [1], [2]),
        ("[[-9223372036854775808,5],[9223372036854775807,-1]]", [1 << 63, UInt64(Int64.max)], [5, -1]),
    ] as [(String, [UInt64], [Int64])])
    func idsReadFromJSONRows(text: String, digests: [UInt64], seen: [Int64]) {
        var ids: [(UInt64, Int64)] = []
        let packed = PackedRequestIDs(jsonRows: Array(text.utf8)[...])
        packed?.forEach { ids.append(($0, $1)) }
        #expect(packed?.count == digests.count)
        #expect(ids.map(\.0) == digests && ids.map(\.1) == seen)
    }

    @Test(arguments: ["", "[[1,2]", "[[1,2]]x", "[[1,2],]", "[[1,2][3,4]]", "[[1,2],[3]]", "[[1, 2]]", "[[1,-]]", "[[1,--2]]", "[[1-2,3]]", "[[1,2x]]", "[[9223372036854775808,1]]",
                      "[[-9223372036854775809,1]]", "[[1.5,2]]"])
    func malformedJSONRowsAreNotIDs(text: String) {
        #expect(PackedRequestIDs(jsonRows: Array(text.utf8)[...]) == nil)
    }
}
