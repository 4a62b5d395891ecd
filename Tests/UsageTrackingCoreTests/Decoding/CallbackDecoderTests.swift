import Testing

@testable import UsageTrackingCore

private let decoder = CallbackDecoder(maximumValueBytes: 256)

private func decode(_ body: String, _ contentType: String? = "application/json") throws(CallbackRejection) -> Callback {
    try decoder.decode(Array(body.utf8), contentType: contentType)
}

private func rejection(_ body: [UInt8], _ contentType: String? = "application/json") -> CallbackRejection? {
    do {
        _ = try decoder.decode(body, contentType: contentType)
        return nil
    } catch {
        return error
    }
}

private func rejection(_ body: String, _ contentType: String? = "application/json") -> CallbackRejection? {
    rejection(Array(body.utf8), contentType)
}

@Suite struct AcceptedShapes {
    @Test func authorinoSortedKeyJSON() throws {
        let callback = try decode(#"{"groups":"premium","host":"localhost:8000","method":"POST","path":"/v1/completions","user":"premiumuser1"}"#)
        #expect(callback == Callback(user: "premiumuser1", groups: "premium", path: "/v1/completions", method: "POST", host: "localhost:8000"))
    }

    @Test func formEncodedAsAuthorinoSendsByDefault() throws {
        let callback = try decode("groups=premium&host=localhost%3A8000&method=POST&path=%2Fv1%2Fcompletions&user=premium+user1", "application/x-www-form-urlencoded")
        #expect(callback == Callback(user: "premium user1", groups: "premium", path: "/v1/completions", method: "POST", host: "localhost:8000"))
    }

    @Test(arguments: ["application/x-www-form-urlencoded", "text/plain", nil, "application/json; charset=utf-8", "application/vnd.api+json"])
    func jsonUnderAnyAcceptedLabel(contentType: String?) throws {
        let callback = try decode(#"  {"user":"u1","groups":"g"}"#, contentType)
        #expect(callback.user == "u1")
        #expect(callback.groups == "g")
    }

    @Test(arguments: [
        (#""premium""#, "premium"),
        (#""premium,free""#, "free,premium"),
        (#"" premium , free ,premium,, ""#, "free,premium"),
        (#"["premium","free"]"#, "free,premium"),
        (#"["b", "a,c", "a"]"#, "a,b,c"),
        (#"[]"#, ""),
        (#""""#, ""),
    ])
    func groupsNormalised(raw: String, expected: String) throws {
        #expect(try decode(#"{"user":"u","groups":\#(raw)}"#).groups == expected)
    }

    @Test func repeatedFormGroupsAreAList() throws {
        #expect(try decode("user=u&groups=premium&groups=free", "application/x-www-form-urlencoded").groups == "free,premium")
    }

    @Test func missingOptionalFieldsAreEmpty() throws {
        #expect(try decode(#"{"user":"u"}"#) == Callback(user: "u", groups: "", path: ""))
    }

    @Test(arguments: [("/v1/completions?api-version=2", "/v1/completions"), ("/v1/chat#frag", "/v1/chat"), ("/?x", "/")])
    func queryStringRemovedFromPath(raw: String, expected: String) throws {
        #expect(try decode(#"{"user":"u","path":"\#(raw)"}"#).path == expected)
    }

    @Test func unknownFieldsOfAnyShapeAreIgnored() throws {
        let body = #"{"a":{"b":[1,2.5e-3,{"c":null}],"d":true},"user":"u","z":[[]],"n":-0.0,"f":false}"#
        let callback = try decode(body)
        #expect(callback.user == "u")
    }

    @Test func escapesAreDecoded() throws {
        let callback = try decode(#"{"user":"a\"b\\c\/d\n\t\u00e9\u20ac\ud83d\ude00","path":"/p"}"#)
        #expect(callback.user == "a\"b\\c/d\n\té€😀")
    }

    @Test func rawUnicodeIsKept() throws {
        #expect(try decode(#"{"user":"Zoë-用户"}"#).user == "Zoë-用户")
    }

    @Test func userIsTrimmed() throws {
        #expect(try decode(#"{"user":"  alice\t"}"#).user == "alice")
    }

    @Test func valueAtTheLimitIsAccepted() throws {
        let user = String(repeating: "x", count: 256)
        #expect(try decode(#"{"user":"\#(user)"}"#).user == user)
    }

    /// The scanner skips plain ASCII in strings eight bytes at a time: every byte that needs a
    /// look must be seen wherever it falls in those eight.
    @Test(arguments: 0..<20)
    func everyByteThatNeedsALookIsSeenAtAnyOffset(offset: Int) throws {
        let before = String(repeating: "a", count: offset), after = String(repeating: "b", count: 19 - offset)
        #expect(try decode(#"{"user":"\#(before)\"\#(after)"}"#).user == before + "\"" + after)
        #expect(try decode(#"{"user":"\#(before)é\#(after)"}"#).user == before + "é" + after)
        #expect(try decode("{\"user\":\"\(before)\u{7F} ~\(after)\"}").user == before + "\u{7F} ~" + after)
        #expect(try decode(#"{"user":"u\#(before)","x":"\#(after)"}"#).user == "u" + before)
        func body(_ byte: UInt8) -> [UInt8] { Array(#"{"user":""#.utf8) + Array(before.utf8) + [byte] + Array(after.utf8) + Array(#""}"#.utf8) }
        #expect(rejection(body(0x1F))?.problems == ["JSON: control character in a string at byte \(9 + offset)"])
        #expect(rejection(body(0x00))?.problems == ["JSON: control character in a string at byte \(9 + offset)"])
        #expect(rejection(body(0xFF))?.problems == ["user: not valid UTF-8"])
    }
}

@Suite struct Rejections {
    @Test(arguments: [
        ("", "JSON: body is empty at byte 0"),
        ("   ", "JSON: body is empty at byte 3"),
        ("[1]", "JSON: body must be a JSON object at byte 0"),
        (#"{"user":"u"} x"#, "JSON: unexpected data after the JSON object at byte 13"),
        (#"{"user":"u""#, "JSON: unexpected end of body at byte 11"),
        (#"{"user":"u}"#, "JSON: unterminated string at byte 11"),
        (#"{"user":"a\qb"}"#, "JSON: invalid escape in a string at byte 11"),
        (#"{"user":"\u12G4"}"#, #"JSON: invalid \u escape at byte 13"#),
        ("{\"user\":\"a\u{01}\"}", "JSON: control character in a string at byte 10"),
        (#"{"n":01,"user":"u"}"#, "JSON: expected ',' or '}' after a member at byte 6"),
        (#"{"n":1.,"user":"u"}"#, "JSON: invalid number at byte 7"),
        (#"{"n":tru,"user":"u"}"#, "JSON: expected a JSON value at byte 5"),
        (#"{"user" "u"}"#, "JSON: expected ':' after a member name at byte 8"),
        (#"{user:"u"}"#, "JSON: expected a member name at byte 1"),
        (#"{"user":"u",}"#, "JSON: expected a member name at byte 12"),
    ])
    func malformedJSON(body: String, problem: String) {
        #expect(rejection(body) == CallbackRejection(.malformed, [problem]))
    }

    @Test func deepNestingIsRefusedNotRecursedInto() {
        let body = #"{"x":"# + String(repeating: "[", count: 100_000) + "}"
        #expect(rejection(body) == CallbackRejection(.malformed, ["JSON: nested deeper than 32 levels at byte 37"]))
    }

    @Test func everyFieldProblemIsNamedAtOnce() {
        let found = rejection(#"{"groups":5,"path":["/a"],"method":null,"host":{"h":1},"extra":1}"#)
        #expect(found?.outcome == .invalid)
        #expect(
            found?.problems == [
                "user: required",
                "groups: must be a string or an array of strings, got number",
                "path: must be a string, got an array",
                "method: must be a string, got null",
                "host: must be a string, got object",
            ])
        #expect(found?.fieldNames == ["groups", "path", "method", "host", "extra"])
    }

    @Test(arguments: [
        (#"{"user":""}"#, "user: must not be empty"),
        (#"{"user":"   "}"#, "user: must not be empty"),
        (#"{"user":7}"#, "user: must be a string, got number"),
        (#"{"user":true}"#, "user: must be a string, got boolean"),
        (#"{"user":"u","groups":[1]}"#, "groups: must be a string or an array of strings, got an array that holds non-strings"),
        (#"{"user":"a","user":"b"}"#, "user: given more than once"),
        (#"{"user":"a","groups":"x","groups":"y"}"#, "groups: given more than once"),
        (#"{"user":"\ud800"}"#, "user: not valid UTF-8"),
        (#"{"user":"u","groups":["a","\udfff"]}"#, "groups: not valid UTF-8"),
    ])
    func invalidField(body: String, problem: String) {
        #expect(rejection(body)?.outcome == .invalid)
        #expect(rejection(body)?.problems == [problem])
    }

    @Test func rawInvalidUTF8IsNamedPerField() {
        let body: [UInt8] = Array(#"{"user":"ok","path":"/a"#.utf8) + [0xFF, 0xFE] + Array(#""}"#.utf8)
        #expect(rejection(body)?.problems == ["path: not valid UTF-8"])
        let form: [UInt8] = Array("user=%FF".utf8)
        #expect(rejection(form, "application/x-www-form-urlencoded")?.problems == ["user: not valid UTF-8"])
    }

    @Test func valuesOverTheLimitAreNamed() {
        let long = String(repeating: "é", count: 200)  // 400 bytes
        let found = rejection(#"{"user":"\#(long)","groups":"\#(long)","path":"/ok"}"#)
        #expect(found?.problems == ["user: 400 bytes; the limit is 256", "groups: 400 bytes; the limit is 256"])
    }

    @Test(arguments: ["multipart/form-data; boundary=x", "application/xml", "image/png"])
    func unsupportedMediaType(contentType: String) {
        let mediaType = String(contentType.prefix { $0 != ";" })
        #expect(
            rejection(#"{"user":"u"}"#, contentType)
                == CallbackRejection(
                    .unsupportedMediaType,
                    ["Content-Type \(mediaType) is not supported; send application/json or application/x-www-form-urlencoded"]
                ))
    }

    @Test func jsonLabelledBodyMustBeJSON() {
        #expect(rejection("user=u", "application/json") == CallbackRejection(.malformed, ["JSON: body must be a JSON object at byte 0"]))
    }

    @Test func malformedForm() {
        #expect(
            rejection("user=a%zzb", "application/x-www-form-urlencoded")
                == CallbackRejection(.malformed, ["form: invalid percent-escape at byte 6"]))
        #expect(
            rejection("user=a%2", "application/x-www-form-urlencoded")
                == CallbackRejection(.malformed, ["form: invalid percent-escape at byte 6"]))
    }

    @Test func formNeedsAUser() {
        #expect(rejection("groups=a&groups=b&note=x", nil)?.problems == ["user: required"])
    }
}
