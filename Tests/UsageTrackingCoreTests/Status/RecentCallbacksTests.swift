import Testing

@testable import UsageTrackingCore

@Suite struct RecentCallbacksTests {
    @Test func keepsTheNewestUpToCapacity() {
        let recent = RecentCallbacks(capacity: 3)
        for i in 0..<5 {
            recent.record(.init(time: Double(i), callback: Callback(user: "u\(i)", groups: "", path: ""), requestID: nil))
        }
        #expect(recent.acceptedEntries.map(\.callback.user) == ["u4", "u3", "u2"])
        recent.record(.init(time: 0, status: 422, rejection: CallbackRejection(.invalid, ["x"]), requestID: "r"))
        #expect(recent.rejectedEntries.map(\.requestID) == ["r"])
    }
}
