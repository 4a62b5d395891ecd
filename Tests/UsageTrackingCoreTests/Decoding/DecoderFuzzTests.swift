import Foundation
import Testing
import TestSupport

@testable import UsageTrackingCore

/// Differential fuzzing: for bodies made by mutating valid callbacks, the scanner must agree with
/// Foundation's JSON parser on what is well-formed, and on the decoded `user` when it is.
@Suite struct DecoderFuzzTests {

    static let seeds: [String] = [
        #"{"groups":"premium","host":"localhost:8000","method":"POST","path":"/v1/completions","user":"premiumuser1"}"#,
        #"{"user":"a\"b\\c\u00e9\ud83d\ude00","groups":["x","y"],"n":[1,-2.5e+3,true,false,null,{"k":{}}]}"#,
        #" { "user" : "spaced" , "extra" : [ ] } "#,
    ]
    static let alphabet = Array(#"{}[]":,\/"0123456789.eE+-tfnrulasbu ûé"#.utf8) + [0x00, 0x1F, 0x7F, 0xC3, 0xFF]

    @Test func scannerAgreesWithFoundation() throws {
        var random = SeededGenerator(seed: 42)
        var checked = 0
        for _ in 0..<20_000 {
            var body = Array(Self.seeds.randomElement(using: &random)!.utf8)
            for _ in 0..<Int.random(in: 1...3, using: &random) {
                let position = Int.random(in: 0..<body.count, using: &random)
                switch Int.random(in: 0..<3, using: &random) {
                case 0: body.remove(at: position)
                case 1: body.insert(Self.alphabet.randomElement(using: &random)!, at: position)
                default: body[position] = Self.alphabet.randomElement(using: &random)!
                }
                if body.isEmpty { body = [UInt8(ascii: "{")] }
            }
            // Foundation differs from RFC 8259 only on input that is not UTF-8, which the
            // scanner reports per field instead; compare on valid UTF-8 input.
            guard String(validating: body, as: UTF8.self) != nil else { continue }
            let foundation = try? JSONSerialization.jsonObject(with: Data(body), options: [])
            let ours = Result { () throws(CallbackRejection) in try CallbackDecoder().decode(body, contentType: "application/json") }
            let text = String(decoding: body, as: UTF8.self)
            switch (foundation as? [String: Any], ours) {
            case (nil, .failure(let rejection)):
                // Foundation refuses lone surrogate escapes; the scanner names the field instead
                // (or skips the value, in a member it does not read).
                let loneSurrogate = try rejection.outcome == .invalid && text.contains(Regex(#"\\u[dD][89a-fA-F]"#))
                #expect(rejection.outcome == .malformed || loneSurrogate, "\(text)")
            case (nil, .success):
                Issue.record("accepted what Foundation rejects: \(text)")
            case (let object?, .success(let callback)):
                #expect((object["user"] as? String).map { $0.trimmingASCIISpaces() } == callback.user, "\(text)")
            case (_?, .failure(let rejection)):
                // Foundation also accepts trailing commas, which RFC 8259 does not allow.
                let trailingComma = text.contains(try Regex(#",\s*[}\]]"#))
                #expect(rejection.outcome != .malformed || trailingComma, "rejected valid JSON: \(text) \(rejection)")
            }
            checked += 1
        }
        #expect(checked > 10_000)
    }
}
