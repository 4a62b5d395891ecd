import Testing

@testable import UsageTrackingCore

@Suite struct ClientTextTests {
    @Test func textWithinTheBoundIsKeptWhole() {
        let id = "5f0c7d2e-9b1a-4c3d-8e6f-100000000001"
        #expect(id.truncated(toUTF8Bytes: 64) == id)
        #expect(id[...].truncated(toUTF8Bytes: 64) == id)
        #expect(String(repeating: "a", count: 64).truncated(toUTF8Bytes: 64).utf8.count == 64)
    }

    /// Cut to at most the bound, "…" included, and never inside a character's bytes.
    @Test func longerTextIsCutAtAScalarBoundary() {
        #expect(String(repeating: "a", count: 65).truncated(toUTF8Bytes: 64) == String(repeating: "a", count: 61) + "…")
        let accented = String(repeating: "é", count: 40)  // 2 bytes each
        let cut = accented.truncated(toUTF8Bytes: 64)
        #expect(cut == String(repeating: "é", count: 30) + "…")
        #expect(cut.utf8.count == 63)
        #expect(accented[...].truncated(toUTF8Bytes: 64) == cut, "a substring is cut the same way")
    }
}
