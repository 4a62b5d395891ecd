/// Turns a `/track` body (and the headers the schema reads) into a `Callback`: the label values
/// of every family, normalised, templated and hashed, or a rejection that names every problem.
///
/// Authorino sends JSON (`contentType: application/json`) or a form (its default), and labels
/// JSON as a form when a policy sets a JSON `body` but keeps the default content type. So the
/// body's first byte decides between the two, and `Content-Type` only rules out media that
/// cannot be a callback (multipart, XML, ...).
///
/// The body is read in one pass; only the fields the schema names are kept (see `FieldTable`).
public struct CallbackDecoder: Sendable {
    /// Longest accepted value of any field, in UTF-8 bytes, after normalisation.
    public var maximumValueBytes: Int
    /// Only a reference and a number, so that capturing the decoder retains one object.
    let plan: DecodingPlan
    public var schema: MeteringSchema { self.plan.schema }

    /// The built-in schema, as before the metering schema existed.
    public init(maximumValueBytes: Int = 256) {
        self.init(schema: .default, maximumValueBytes: maximumValueBytes)
    }

    /// `hasher` must be given when a label is hashed.
    public init(schema: MeteringSchema, maximumValueBytes: Int = 256, hasher: LabelHasher? = nil) {
        precondition(!schema.needsHMACKey || hasher != nil, "a hashed label needs a key")
        self.maximumValueBytes = maximumValueBytes
        self.plan = DecodingPlan(schema, hasher: hasher)
    }

    /// Headers the schema reads; `decode` takes their values in this order.
    public var headerNames: [String] { self.plan.headerNames }

    public func decode(_ body: UnsafeRawBufferPointer, contentType: String?, headers: [String?] = []) throws(CallbackRejection) -> Callback {
        let encoding = try Self.encoding(of: contentType)
        let firstByte = body.first { !($0 == 0x20 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D) }
        let isJSON = encoding == .json || firstByte == UInt8(ascii: "{") || firstByte == nil
        return try ScannedFields.withEmpty(fieldCount: self.plan.fields.count, listFields: self.plan.listFields, mergesRepeats: !isJSON) {
            (fields) throws(CallbackRejection) in
            try self.scan(body, isJSON: isJSON, into: &fields)
            return try self.validate(fields, headers: headers)
        }
    }

    public func decode(_ body: [UInt8], contentType: String?, headers: [String?] = []) throws(CallbackRejection) -> Callback {
        let result = body.withUnsafeBytes { bytes in
            Result { () throws(CallbackRejection) in try self.decode(bytes, contentType: contentType, headers: headers) }
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
        // Over the contiguous bytes (every native string has them): the UTF-8 view's iterator
        // costs several times as much per byte.
        var contentType = contentType
        return contentType.withUTF8 { given in
            guard given.count >= expected.count else { return false }
            for (next, byte) in zip(given, expected) where !(next | 0x20 == byte || next == byte) { return false }
            guard given.count > expected.count else { return true }
            let after = given[expected.count]
            return after == UInt8(ascii: ";") || after == UInt8(ascii: " ")
        }
    }

    private func scan(_ body: UnsafeRawBufferPointer, isJSON: Bool, into fields: inout ScannedFields) throws(CallbackRejection) {
        if isJSON {
            do {
                try JSONObjectScanner.scan(body, table: self.plan.jsonTable, into: &fields)
            } catch {
                throw CallbackRejection(.malformed, ["JSON: \(error.message)"])
            }
            return
        }
        do {
            try FormScanner.scan(body, table: self.plan.formTable, into: &fields)
        } catch {
            throw CallbackRejection(.malformed, ["form: \(error.message)"])
        }
    }

    // MARK: validation

    func validate(_ fields: ScannedFields, headers: [String?]) throws(CallbackRejection) -> Callback {
        let plan = self.plan
        var problems = Problems()
        for field in fields.repeated {
            problems.add(plan.bodySourceRank[field], "\(plan.fields[field]): given more than once")
        }
        // Each distinct (source, kind) is read once, however many labels share it.
        var resolved: [String] = []
        resolved.reserveCapacity(plan.labels.count)
        for label in plan.labels {
            if let earlier = label.sameAs {
                resolved.append(resolved[earlier])
                continue
            }
            resolved.append(self.resolve(label, fields, headers, &problems))
        }
        var amounts: [UInt64?] = []
        if plan.hasValues {
            amounts.reserveCapacity(plan.values.count)
            for value in plan.values { amounts.append(value.map { self.amount($0, fields, &problems) } ?? 1) }
        }
        let method = self.debugText(plan.methodField, fields, &problems)
        let host = self.debugText(plan.hostField, fields, &problems)
        guard problems.isEmpty else {
            throw CallbackRejection(.invalid, problems.ordered, fieldNames: plan.fieldNames(fields))
        }
        return Callback(
            labels: resolved, families: plan.metricLabelRanges, amounts: amounts, method: method, host: host,
            user: plan.userLabel.map { resolved[$0] } ?? "", groups: plan.groupsLabel.map { resolved[$0] } ?? "",
            path: plan.pathLabel.map { resolved[$0] } ?? ""
        )
    }

    /// One label's exposed value: read, normalised, checked, defaulted, templated, hashed.
    private func resolve(_ label: DecodingPlan.Label, _ fields: ScannedFields, _ headers: [String?], _ problems: inout Problems) -> String {
        let name = label.problemName
        let before = problems.added
        var value: String
        switch label.kind {
        case .string:
            value = self.text(label, fields, headers, &problems).trimmingASCIISpaces()
        case .set:
            value = self.set(label, fields, headers, &problems)
        case .route:
            value = self.text(label, fields, headers, &problems)
            // Over the contiguous bytes: the UTF-8 view's `firstIndex` costs several times as much.
            let end = value.withUTF8 { $0.firstIndex { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") } }
            if let end { value = String(decoding: value.utf8.prefix(end), as: UTF8.self) }
        }
        guard problems.added == before else { return "" }
        if value.isEmpty {
            if label.required {
                problems.add(label.rank, label.isPresent(fields, headers) ? "\(name): must not be empty" : "\(name): required")
                return ""
            }
            value = label.defaultValue
        }
        let count = value.utf8.count
        if count > self.maximumValueBytes {
            problems.add(label.rank, "\(name): \(count) bytes; the limit is \(self.maximumValueBytes)")
            return ""
        }
        if value.hasSameBytes(as: MeteringSchema.overflowValue) {
            problems.add(label.rank, "\(name): \(MeteringSchema.overflowValue) is reserved")
            return ""
        }
        if label.kind == .route, !value.isEmpty, let template = self.plan.routes.match(value) { value = template }
        if let hasher = label.hasher, !value.isEmpty { value = hasher.hash(value) }
        return value
    }

    private func text(_ label: DecodingPlan.Label, _ fields: ScannedFields, _ headers: [String?], _ problems: inout Problems) -> String {
        switch label.input {
        case .header(let index):
            return headers.indices.contains(index) ? headers[index] ?? "" : ""
        case .body(let field):
            return self.text(fields.values[field], name: label.problemName, rank: label.rank, required: label.required, &problems)
        }
    }

    private func text(_ found: FieldValue?, name: String, rank: Int, required: Bool, _ problems: inout Problems) -> String {
        switch found {
        case nil:
            if required { problems.add(rank, "\(name): required") }
            return ""
        case .text(let value?):
            return value
        case .text(nil):
            problems.add(rank, "\(name): not valid UTF-8")
        case .list:
            problems.add(rank, "\(name): must be a string, got an array")
        case .number:
            problems.add(rank, "\(name): must be a string, got number")
        case .other(let kind):
            problems.add(rank, "\(name): must be a string, got \(kind)")
        }
        return ""
    }

    private func debugText(_ field: Int, _ fields: ScannedFields, _ problems: inout Problems) -> String {
        let name = self.plan.fields[field]
        let rank = self.plan.bodySourceRank[field]
        let value = self.text(fields.values[field], name: name, rank: rank, required: false, &problems)
        let count = value.utf8.count
        if count > self.maximumValueBytes {
            problems.add(rank, "\(name): \(count) bytes; the limit is \(self.maximumValueBytes)")
        }
        return value
    }

    /// The largest increment one callback may carry.
    static let maxAmount: UInt64 = (1 << 53) - 1

    /// A family's increment; nil when it is optional and absent, so the family skips the callback.
    private func amount(_ value: DecodingPlan.Value, _ fields: ScannedFields, _ problems: inout Problems) -> UInt64? {
        let name = self.plan.fields[value.field]
        let rank = self.plan.bodySourceRank[value.field]
        let expectation = "\(name): must be a non-negative integer"
        let reading: NumberReading
        switch fields.values[value.field] {
        case nil:
            if value.required { problems.add(rank, "\(name): required") }
            return nil
        case .number(let number):
            reading = number
        case .text(let text?):
            // A form sends digits as text; JSON has numbers for that.
            guard fields.mergesRepeats else {
                problems.add(rank, "\(expectation), got string")
                return nil
            }
            guard let number = NumberReading(text: text) else {
                problems.add(rank, "\(expectation), got text")
                return nil
            }
            reading = number
        case .text(nil):
            problems.add(rank, "\(name): not valid UTF-8")
            return nil
        case .list:
            problems.add(rank, "\(expectation), got an array")
            return nil
        case .other(let kind):
            problems.add(rank, "\(expectation), got \(kind)")
            return nil
        }
        switch reading {
        // 2^53 - 1, as for a model answer's counts: exact in every JSON parser, and a ledger's
        // 64-bit totals cannot be pushed over their range by a few callbacks.
        case .whole(let amount) where amount <= Self.maxAmount: return amount
        case .negative: problems.add(rank, "\(expectation), got a negative number")
        case .fraction: problems.add(rank, "\(expectation), got a fraction or an exponent")
        case .whole, .tooLarge: problems.add(rank, "\(expectation) up to 2^53 - 1")
        }
        return nil
    }

    /// One label value for any way a set arrives: "a", "b, a" or ["a","b"] all become "a,b".
    private func set(_ label: DecodingPlan.Label, _ fields: ScannedFields, _ headers: [String?], _ problems: inout Problems) -> String {
        // The common case, one plain name, needs no array, splitting or sorting.
        if case .body(let field) = label.input, case .text(let only?)? = fields.values[field], Self.isPlainName(only) { return only }
        let name = label.problemName
        let items: [String?]
        switch label.input {
        case .header(let index):
            items = [headers.indices.contains(index) ? headers[index] ?? "" : ""]
        case .body(let field):
            switch fields.values[field] {
            case nil:
                if label.required { problems.add(label.rank, "\(name): required") }
                return ""
            case .text(let value): items = [value]
            case .list(let values): items = values
            case .number:
                problems.add(label.rank, "\(name): must be a string or an array of strings, got number")
                return ""
            case .other(let kind):
                problems.add(label.rank, "\(name): must be a string or an array of strings, got \(kind)")
                return ""
            }
        }
        if items.count == 1, let only = items[0], Self.isPlainName(only) { return only }
        guard items.allSatisfy({ $0 != nil }) else {
            problems.add(label.rank, "\(name): not valid UTF-8")
            return ""
        }
        // Split, de-duplicate and sort by bytes, not by `Character` or canonical equivalence: a
        // comma followed by a combining mark is still a comma, and NFC and NFD spellings of one
        // name stay two members, as they are two label values to Prometheus.
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

extension CallbackDecoder {
    /// A set's value that is already one member as it would be exposed: no comma, nothing to trim.
    fileprivate static func isPlainName(_ value: String) -> Bool {
        var value = value
        return value.withUTF8 { bytes in
            bytes.isEmpty || (bytes[0] > 0x20 && bytes[bytes.count - 1] > 0x20 && !bytes.contains(UInt8(ascii: ",")))
        }
    }
}

/// Problems with their rank (the source's place in the schema), listed in rank order and, within
/// a rank, in the order found; a problem two labels share is listed once.
struct Problems {
    private var items: [(rank: Int, text: String)] = []
    /// Every problem added, repeats included, so a caller can tell whether a step found any.
    private(set) var added = 0

    var isEmpty: Bool { self.added == 0 }

    mutating func add(_ rank: Int, _ text: String) {
        self.added += 1
        if !self.items.contains(where: { $0.text == text }) { self.items.append((rank, text)) }
    }

    var ordered: [String] {
        self.items.enumerated()
            .sorted { ($0.element.rank, $0.offset) < ($1.element.rank, $1.offset) }
            .map(\.element.text)
    }
}

extension NumberReading {
    /// Digits, as a form sends a number; nil for anything that is not a number at all.
    init?(text: String) {
        var utf8 = Array(text.utf8)
        guard !utf8.isEmpty else { return nil }
        let negative = utf8.first == UInt8(ascii: "-")
        if negative { utf8.removeFirst() }
        guard let first = utf8.first, first >= UInt8(ascii: "0"), first <= UInt8(ascii: "9") else { return nil }
        let numeric = utf8.allSatisfy { ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: ".") || $0 | 0x20 == UInt8(ascii: "e") || $0 == UInt8(ascii: "+") || $0 == UInt8(ascii: "-") }
        guard numeric else { return nil }
        if negative {
            self = .negative
            return
        }
        self = utf8.withUnsafeBytes { NumberReading(json: $0) }
    }
}

extension String {
    /// Drops surrounding spaces, tabs and line breaks. A string without them (almost every
    /// label value) is returned as it is, with no new string made.
    public func trimmingASCIISpaces() -> String {
        let isSpace = { (byte: UInt8) in byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D }
        var copy = self
        let trimmed = copy.withUTF8 { $0.isEmpty || !(isSpace($0[0]) || isSpace($0[$0.count - 1])) }
        return trimmed ? self : self[...].trimmingASCIISpaces()
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
