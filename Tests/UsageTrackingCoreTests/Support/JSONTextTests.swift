import Testing

@testable import UsageTrackingCore

@Suite struct JSONTextTests {
    @Test func escapesStrings() {
        let document: JSONText = .object([("a", "q\"\\\n\u{01}é"), ("b", .array([1, true, .null, .number(0.5)]))])
        #expect(document.serialized == #"{"a":"q\"\\\n\u0001é","b":[1,true,null,0.5]}"#)
    }
}
