/// Reads `application/x-www-form-urlencoded` bodies, which is what Authorino sends by default
/// when a policy uses `bodyParameters`.
enum FormScanner {
    struct SyntaxError: Error, Equatable {
        var message: String
    }

    /// Fields are matched by their full (possibly dotted) names against the flat `table`.
    static func scan(_ bytes: UnsafeRawBufferPointer, table: FieldTable, into fields: inout ScannedFields) throws(SyntaxError) {
        var start = 0
        while start <= bytes.count {
            var end = start
            while end < bytes.count, bytes[end] != UInt8(ascii: "&") { end += 1 }
            let pair = UnsafeRawBufferPointer(rebasing: bytes[start..<end])
            if !pair.isEmpty {
                let equals = pair.firstIndex(of: UInt8(ascii: "=")) ?? pair.count
                let name = try decode(pair[0..<equals], at: start)
                if let index = table.find(name), let field = table.entries[index].field {
                    let value = equals < pair.count ? try decode(pair[(equals + 1)...], at: start + equals + 1) : []
                    fields.add(field, .text(String(validating: value, as: UTF8.self)))
                } else {
                    fields.addUnknown(String(validating: name, as: UTF8.self) ?? "(not UTF-8)")
                }
            }
            start = end + 1
        }
        guard !fields.isEmpty else { throw SyntaxError(message: "body is empty") }
    }

    private static func decode(_ raw: Slice<UnsafeRawBufferPointer>, at offset: Int) throws(SyntaxError) -> [UInt8] {
        switch Self.percentDecoded(raw) {
        case .success(let bytes): return bytes
        case .failure(let bad): throw SyntaxError(message: "invalid percent-escape at byte \(offset + bad.offset)")
        }
    }

    struct BadPercentEscape: Error {
        /// Where the escape starts, counted from the start of the decoded bytes.
        var offset: Int
    }

    /// Percent-decodes one form name or value, or a query string's (`+` stands for a space).
    static func percentDecoded(_ raw: some Collection<UInt8>) -> Result<[UInt8], BadPercentEscape> {
        var out: [UInt8] = []
        out.reserveCapacity(raw.count)
        var iterator = raw.makeIterator()
        var offset = 0
        while let byte = iterator.next() {
            switch byte {
            case UInt8(ascii: "+"):
                out.append(UInt8(ascii: " "))
            case UInt8(ascii: "%"):
                guard let high = iterator.next().flatMap(hexValue), let low = iterator.next().flatMap(hexValue) else {
                    return .failure(BadPercentEscape(offset: offset))
                }
                out.append(high << 4 | low)
                offset += 2
            default:
                out.append(byte)
            }
            offset += 1
        }
        return .success(out)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
