import Testing
import TestSupport

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

    /// EchoedText gives what the received bytes, decoded and cut, give: for ids within the bound
    /// and past it, ASCII, multi-byte characters and bytes that are not UTF-8.
    @Test func echoedTextIsTheReceivedBytesDecodedAndCut() {
        let pieces: [[UInt8]] = [Array("a".utf8), Array("é".utf8), Array("😀".utf8), [0xFF], [0xE2, 0x82], [0x80]]
        var generator = SeededGenerator(seed: 64)
        for _ in 0..<5_000 {
            var received: [UInt8] = []
            let length = Int.random(in: 0...90, using: &generator)
            while received.count < length { received += pieces.randomElement(using: &generator)! }
            let expected = String(decoding: received, as: UTF8.self).truncated(toUTF8Bytes: ClientText.echoedBytes)
            let echoed = received.withUnsafeBytes { EchoedText($0) }
            #expect(echoed.description == expected, "\(received)")
        }
        func echoed(_ text: String) -> EchoedText { Array(text.utf8).withUnsafeBytes { EchoedText($0) } }
        #expect(echoed("5f0c7c1e").description == "5f0c7c1e")
        #expect(echoed(String(repeating: "a", count: 65)).description == String(repeating: "a", count: 61) + "…")
        #expect(echoed("a") != echoed("b"))
        #expect(echoed("a") != echoed("ab"))
        #expect(echoed(String(repeating: "a", count: 65)) == echoed(String(repeating: "a", count: 61) + "…"))
    }
}
