/// Turns a `/track` body into a `Callback`, or a rejection that names every problem at once.
///
/// Authorino sends JSON (`contentType: application/json`) or a form (its default), and labels
/// JSON as a form when a policy sets a JSON `body` but keeps the default content type. So the
/// body's first byte decides between the two, and `Content-Type` only rules out media that
/// cannot be a callback (multipart, XML, ...).
public struct CallbackDecoder: Sendable {
    /// Longest accepted value of any field, in UTF-8 bytes, after normalisation.
    public var maximumValueBytes: Int

    public init(maximumValueBytes: Int = 256) {
        self.maximumValueBytes = maximumValueBytes
    }

    public func decode(_ body: UnsafeRawBufferPointer, contentType: String?) throws(CallbackRejection) -> Callback {
        let fields = try Self.scan(body, contentType: contentType)
        return try self.validate(fields)
    }

    public func decode(_ body: [UInt8], contentType: String?) throws(CallbackRejection) -> Callback {
        let result = body.withUnsafeBytes { bytes in
            Result { () throws(CallbackRejection) in try self.decode(bytes, contentType: contentType) }
        }
        return try result.get()
    }

    // MARK: encodings

    private enum Encoding {
        case json, sniffed
    }

    private static func encoding(of contentType: String?) throws(CallbackRejection) -> Encoding {
        guard let contentType else { return .sniffed }
        // What Authorino sends, matched on bytes before any string work.
        if Self.hasMediaType(contentType, "application/json") { return .json }
        if Self.hasMediaType(contentType, "application/x-www-form-urlencoded") { return .sniffed }
        let mediaType = contentType.prefix { $0 != ";" }.trimmingASCIISpaces().lowercased()
        switch mediaType {
        case "", "text/plain", "application/x-www-form-urlencoded": return .sniffed
        case "application/json": return .json
        case _ where mediaType.hasPrefix("application/") && mediaType.hasSuffix("+json"): return .json
        default:
            throw CallbackRejection(
                .unsupportedMediaType,
                ["Content-Type \(mediaType.truncated(toUTF8Bytes: ClientText.echoedBytes)) is not supported; send application/json or application/x-www-form-urlencoded"]
            )
        }
    }

    /// Whether `contentType` is `expected` (lower-case) in any letter case, alone or before parameters.
    private static func hasMediaType(_ contentType: String, _ expected: StaticString) -> Bool {
        let expected = UnsafeRawBufferPointer(start: expected.utf8Start, count: expected.utf8CodeUnitCount)
        var utf8 = contentType.utf8.makeIterator()
        for byte in expected {
            guard let next = utf8.next(), next | 0x20 == byte || next == byte else { return false }
        }
        let after = utf8.next()
        return after == nil || after == UInt8(ascii: ";") || after == UInt8(ascii: " ")
    }

    private static func scan(_ body: UnsafeRawBufferPointer, contentType: String?) throws(CallbackRejection) -> CallbackFields {
        let encoding = try Self.encoding(of: contentType)
        let firstByte = body.first { !($0 == 0x20 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D) }
        if encoding == .json || firstByte == UInt8(ascii: "{") || firstByte == nil {
            do {
                return try JSONObjectScanner.scan(body)
            } catch {
                throw CallbackRejection(.malformed, ["JSON: \(error.message)"])
            }
        }
        do {
            return try FormScanner.scan(body)
        } catch {
            throw CallbackRejection(.malformed, ["form: \(error.message)"])
        }
    }

    // MARK: validation

    private func validate(_ fields: CallbackFields) throws(CallbackRejection) -> Callback {
        var problems: [String] = fields.repeated.map { "\($0.name): given more than once" }
        let user = self.text(.user, fields, required: true, problems: &problems).trimmingASCIISpaces()
        if fields[.user] != nil, user.isEmpty, !problems.contains(where: { $0.hasPrefix("user:") }) {
            problems.append("user: must not be empty")
        }
        let groups = self.groups(fields, problems: &problems)
        var path = self.text(.path, fields, problems: &problems)
        if let end = path.utf8.firstIndex(where: { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") }) {
            path = String(path[..<end])
        }
        let method = self.text(.method, fields, problems: &problems)
        let host = self.text(.host, fields, problems: &problems)
        self.checkLength("user", user, &problems)
        self.checkLength("groups", groups, &problems)
        self.checkLength("path", path, &problems)
        self.checkLength("method", method, &problems)
        self.checkLength("host", host, &problems)
        guard problems.isEmpty else {
            throw CallbackRejection(.invalid, Self.ordered(problems), fieldNames: fields.names)
        }
        return Callback(user: user, groups: groups, path: path, method: method, host: host)
    }

    private func checkLength(_ name: String, _ value: String, _ problems: inout [String]) {
        let count = value.utf8.count
        if count > self.maximumValueBytes {
            problems.append("\(name): \(count) bytes; the limit is \(self.maximumValueBytes)")
        }
    }

    /// Problems in field order, so replies are stable whatever order the body used.
    private static func ordered(_ problems: [String]) -> [String] {
        let rank = { (problem: String) in
            CallbackFields.Field.allCases.firstIndex { problem.hasPrefix($0.name + ":") } ?? CallbackFields.Field.allCases.count
        }
        return problems.enumerated().sorted { (rank($0.element), $0.offset) < (rank($1.element), $1.offset) }.map(\.element)
    }

    private func text(_ field: CallbackFields.Field, _ fields: CallbackFields, required: Bool = false, problems: inout [String]) -> String {
        let name = field.name
        switch fields[field] {
        case nil:
            if required { problems.append("\(name): required") }
            return ""
        case .text(let value?):
            return value
        case .text(nil):
            problems.append("\(name): not valid UTF-8")
        case .list:
            problems.append("\(name): must be a string, got an array")
        case .other(let kind):
            problems.append("\(name): must be a string, got \(kind)")
        }
        return ""
    }

    /// One label value for any way groups arrive: "a", "b, a" or ["a","b"] all become "a,b".
    private func groups(_ fields: CallbackFields, problems: inout [String]) -> String {
        let items: [String?]
        switch fields[.groups] {
        case nil: return ""
        case .text(let value): items = [value]
        case .list(let values): items = values
        case .other(let kind):
            problems.append("groups: must be a string or an array of strings, got \(kind)")
            return ""
        }
        // The common case, one plain group name, needs no splitting or sorting.
        if items.count == 1, let only = items[0], !only.utf8.contains(UInt8(ascii: ",")),
            only.utf8.first.map({ $0 > 0x20 }) ?? true, only.utf8.last.map({ $0 > 0x20 }) ?? true
        {
            return only
        }
        guard items.allSatisfy({ $0 != nil }) else {
            problems.append("groups: not valid UTF-8")
            return ""
        }
        // Split, de-duplicate and sort by bytes, not by `Character` or canonical equivalence: a
        // comma followed by a combining mark is still a comma, and NFC and NFD spellings of one
        // name stay two groups, as they are two label values to Prometheus.
        var names: [String] = []
        for case let item? in items {
            for piece in item.utf8.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: true) {
                // Split at an ASCII byte, so every piece is valid UTF-8 on its own.
                let name = String(decoding: piece, as: UTF8.self).trimmingASCIISpaces()
                if !name.isEmpty { names.append(name) }
            }
        }
        names.sort { $0.compareBytes($1) < 0 }
        var unique: [String] = []
        unique.reserveCapacity(names.count)
        for name in names where !(unique.last?.hasSameBytes(as: name) ?? false) { unique.append(name) }
        return unique.joined(separator: ",")
    }
}

extension StringProtocol where UTF8View: BidirectionalCollection {
    /// Drops surrounding spaces, tabs and line breaks (no Foundation needed).
    public func trimmingASCIISpaces() -> String {
        let isSpace = { (byte: UInt8) in byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D }
        let utf8 = self.utf8
        guard let first = utf8.firstIndex(where: { !isSpace($0) }) else { return "" }
        let last = utf8.lastIndex(where: { !isSpace($0) })!
        // Spaces are single bytes, so these indices are character boundaries.
        return String(self[first...last])
    }
}
