/// A series' labels as the ledger stores them: a JSON object of label name to value, in the
/// family's label order, so `sqlite3` can read them with `json_extract(labels, '$.user')`.
/// The same labels always give the same text (the `series` table's key), and `decode` reads back
/// exactly what `encode` wrote, byte for byte.
enum LabelsJSON {
    static func encode(_ values: LabelValues, names: [String]) -> String {
        JSONText.object(zip(names, values).map { ($0, JSONText.string($1)) }).serialized
    }

    /// The values of `names`, in order; nil when the text holds other names, another order, or
    /// is not such an object.
    static func decode(_ text: String, names: [String]) -> LabelValues? {
        var reader = Reader(bytes: Array(text.utf8))
        guard reader.take(UInt8(ascii: "{")) else { return nil }
        var values: LabelValues = []
        for (index, name) in names.enumerated() {
            if index > 0, !reader.take(UInt8(ascii: ",")) { return nil }
            guard reader.string() == name, reader.take(UInt8(ascii: ":")), let value = reader.string() else { return nil }
            values.append(value)
        }
        guard reader.take(UInt8(ascii: "}")), reader.atEnd else { return nil }
        return values
    }

    private struct Reader {
        let bytes: [UInt8]
        var index = 0

        var atEnd: Bool { self.index == self.bytes.count }

        mutating func take(_ byte: UInt8) -> Bool {
            guard self.index < self.bytes.count, self.bytes[self.index] == byte else { return false }
            self.index += 1
            return true
        }

        /// A JSON string, with the escapes `JSONText.quote` writes and the others JSON allows.
        mutating func string() -> String? {
            guard self.take(UInt8(ascii: "\"")) else { return nil }
            var out: [UInt8] = []
            while self.index < self.bytes.count {
                let byte = self.bytes[self.index]
                self.index += 1
                switch byte {
                case UInt8(ascii: "\""): return String(validating: out, as: UTF8.self)
                case UInt8(ascii: "\\"):
                    guard self.index < self.bytes.count else { return nil }
                    let escape = self.bytes[self.index]
                    self.index += 1
                    switch escape {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(escape)
                    case UInt8(ascii: "n"): out.append(0x0A)
                    case UInt8(ascii: "r"): out.append(0x0D)
                    case UInt8(ascii: "t"): out.append(0x09)
                    case UInt8(ascii: "b"): out.append(0x08)
                    case UInt8(ascii: "f"): out.append(0x0C)
                    case UInt8(ascii: "u"):
                        guard let unit = self.hex4() else { return nil }
                        var scalar = UInt32(unit)
                        if (0xD800..<0xDC00).contains(unit) {
                            guard self.take(UInt8(ascii: "\\")), self.take(UInt8(ascii: "u")), let low = self.hex4(), (0xDC00..<0xE000).contains(low) else { return nil }
                            scalar = 0x10000 + ((UInt32(unit) - 0xD800) << 10) + (UInt32(low) - 0xDC00)
                        }
                        guard let decoded = Unicode.Scalar(scalar) else { return nil }
                        out.append(contentsOf: Array(String(decoded).utf8))
                    default: return nil
                    }
                default: out.append(byte)
                }
            }
            return nil
        }

        private mutating func hex4() -> UInt16? {
            guard self.index + 4 <= self.bytes.count, let value = UInt16(String(decoding: self.bytes[self.index..<self.index + 4], as: UTF8.self), radix: 16) else { return nil }
            self.index += 4
            return value
        }
    }
}
