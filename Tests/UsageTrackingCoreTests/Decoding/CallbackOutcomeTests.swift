import Testing

@testable import UsageTrackingCore

@Suite struct CallbackOutcomeTests {
    /// `UsageMetrics` keeps one counter per outcome, found by `index`.
    @Test func indexIsThePositionInAllCases() {
        #expect(CallbackOutcome.allCases.map(\.index) == Array(CallbackOutcome.allCases.indices))
    }
}
