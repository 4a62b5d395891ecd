/// A strict, allocation-light reader for the one shape of JSON a callback has: a single
/// top-level object. Known members are decoded; every other value is checked for syntax and
/// skipped, so a body is either fully valid JSON (RFC 8259) or rejected with the byte offset.
struct JSONObjectScanner {
    struct SyntaxError: Error, Equatable {
        var message: String
    }

    /// Unknown members may nest; this bounds the recursion that skipping them needs.
    static let maximumDepth = 32

    private let bytes: UnsafeRawBufferPointer
    private var index = 0

    private init(_ bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
    }

    /// Reads the object, keeping the fields `table` asks for (descending into nested objects
    /// where it has children) and checking the syntax of everything else.
    static func scan(_ bytes: UnsafeRawBufferPointer, table: FieldTable, into fields: inout ScannedFields) throws(SyntaxError) {
        var scanner = JSONObjectScanner(bytes)
        scanner.skipWhitespace()
        guard scanner.peek() == UInt8(ascii: "{") else {
            throw scanner.error(scanner.atEnd ? "body is empty" : "body must be a JSON object")
        }
        try scanner.readMembers(of: table, depth: 1, topLevel: true, into: &fields)
        scanner.skipWhitespace()
        guard scanner.atEnd else { throw scanner.error("unexpected data after the JSON object") }
    }

    private mutating func readMembers(of table: FieldTable, depth: Int, topLevel: Bool, into fields: inout ScannedFields) throws(SyntaxError) {
        try self.readObject { (scanner, name) throws(SyntaxError) in
            guard let index = name.entry(in: table) else {
                try scanner.skipValue(depth: depth)
                if topLevel { fields.addUnknown(name.string ?? "(not UTF-8)") }
                return
            }
            // The entry's parts read one by one: a copy of the whole entry retains its name too.
            let wanted = table.entries[index].field
            if let children = table.entries[index].children, scanner.peek() == UInt8(ascii: "{") {
                guard depth < Self.maximumDepth else { throw scanner.error("nested deeper than \(Self.maximumDepth) levels") }
                if topLevel { fields.enter(branch: index) }
                if let field = wanted { fields.add(field, .other("object")) }
                try scanner.readMembers(of: children, depth: depth + 1, topLevel: false, into: &fields)
            } else if let field = wanted {
                fields.add(field, try scanner.readFieldValue())
            } else {
                // A name on the way to a wanted field, holding something other than an object:
                // the field is missing, which validation reports if it matters.
                if topLevel { fields.enter(branch: index) }
                try scanner.skipValue(depth: depth)
            }
        }
    }

    // MARK: values

    private mutating func readFieldValue() throws(SyntaxError) -> FieldValue {
        switch self.peek() ?? 0 {
        case UInt8(ascii: "\""):
            return .text(try self.readString())
        case UInt8(ascii: "["):
            // Keep the strings of an all-string array; anything else only needs its type named.
            var items: [String?] = []
            var allStrings = true
            try self.readArray { (scanner) throws(SyntaxError) in
                if allStrings, scanner.peek() == UInt8(ascii: "\"") {
                    items.append(try scanner.readString())
                } else {
                    allStrings = false
                    try scanner.skipValue(depth: 2)
                }
            }
            return allStrings ? .list(items) : .other("an array that holds non-strings")
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            let start = self.index
            try self.skipNumber()
            return .number(NumberReading(json: UnsafeRawBufferPointer(rebasing: self.bytes[start..<self.index])))
        default:
            let kind = self.kindOfValue()
            try self.skipValue(depth: 1)
            return .other(kind)
        }
    }

    private func kindOfValue() -> String {
        switch self.peek() {
        case UInt8(ascii: "{"): "object"
        case UInt8(ascii: "t"), UInt8(ascii: "f"): "boolean"
        case UInt8(ascii: "n"): "null"
        default: "number"
        }
    }

    private mutating func skipValue(depth: Int) throws(SyntaxError) {
        guard depth <= Self.maximumDepth else { throw self.error("nested deeper than \(Self.maximumDepth) levels") }
        switch self.peek() ?? 0 {
        case UInt8(ascii: "\""):
            _ = try self.readString()
        case UInt8(ascii: "{"):
            try self.readObject { (scanner, _) throws(SyntaxError) in try scanner.skipValue(depth: depth + 1) }
        case UInt8(ascii: "["):
            try self.readArray { (scanner) throws(SyntaxError) in try scanner.skipValue(depth: depth + 1) }
        case UInt8(ascii: "t"): try self.expectLiteral("true")
        case UInt8(ascii: "f"): try self.expectLiteral("false")
        case UInt8(ascii: "n"): try self.expectLiteral("null")
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): try self.skipNumber()
        default:
            throw self.error(self.atEnd ? "unexpected end of body" : "expected a JSON value")
        }
    }

    /// Reads an object from its `{`, handing each member's name to `member` with the cursor on
    /// the member's value, which `member` must consume.
    private mutating func readObject(
        _ member: (inout JSONObjectScanner, RawString) throws(SyntaxError) -> Void
    ) throws(SyntaxError) {
        self.index += 1
        self.skipWhitespace()
        if self.peek() == UInt8(ascii: "}") {
            self.index += 1
            return
        }
        while true {
            self.skipWhitespace()
            guard self.peek() == UInt8(ascii: "\"") else { throw self.error("expected a member name") }
            let name = try self.readRawString()
            self.skipWhitespace()
            try self.expect(UInt8(ascii: ":"), "expected ':' after a member name")
            self.skipWhitespace()
            try member(&self, name)
            self.skipWhitespace()
            if self.peek() == UInt8(ascii: ",") {
                self.index += 1
                continue
            }
            try self.expect(UInt8(ascii: "}"), "expected ',' or '}' after a member")
            return
        }
    }

    /// Reads an array from its `[`, calling `element` with the cursor on each element.
    private mutating func readArray(_ element: (inout JSONObjectScanner) throws(SyntaxError) -> Void) throws(SyntaxError) {
        self.index += 1
        self.skipWhitespace()
        if self.peek() == UInt8(ascii: "]") {
            self.index += 1
            return
        }
        while true {
            self.skipWhitespace()
            try element(&self)
            self.skipWhitespace()
            if self.peek() == UInt8(ascii: ",") {
                self.index += 1
                continue
            }
            try self.expect(UInt8(ascii: "]"), "expected ',' or ']' in an array")
            return
        }
    }

    private mutating func skipNumber() throws(SyntaxError) {
        if self.peek() == UInt8(ascii: "-") { self.index += 1 }
        if self.peek() == UInt8(ascii: "0") {
            self.index += 1
        } else {
            guard self.skipDigits() else { throw self.error("invalid number") }
        }
        if self.peek() == UInt8(ascii: ".") {
            self.index += 1
            guard self.skipDigits() else { throw self.error("invalid number") }
        }
        if self.peek() == UInt8(ascii: "e") || self.peek() == UInt8(ascii: "E") {
            self.index += 1
            if self.peek() == UInt8(ascii: "+") || self.peek() == UInt8(ascii: "-") { self.index += 1 }
            guard self.skipDigits() else { throw self.error("invalid number") }
        }
    }

    /// Returns whether at least one digit was skipped.
    private mutating func skipDigits() -> Bool {
        let start = self.index
        while let byte = self.peek(), byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") { self.index += 1 }
        return self.index > start
    }

    private mutating func expectLiteral(_ literal: StaticString) throws(SyntaxError) {
        let expected = UnsafeRawBufferPointer(start: literal.utf8Start, count: literal.utf8CodeUnitCount)
        guard self.index + expected.count <= self.bytes.count,
            self.bytes[self.index..<self.index + expected.count].elementsEqual(expected)
        else { throw self.error("expected a JSON value") }
        self.index += expected.count
    }

    // MARK: strings

    /// A string's content: the bytes between the quotes when it has no escapes, else decoded.
    private enum RawString {
        /// `ascii`: every byte is below 0x80, so the string needs no UTF-8 validation.
        case verbatim(UnsafeRawBufferPointer, ascii: Bool)
        case decoded([UInt8])

        func entry(in table: FieldTable) -> Int? {
            switch self {
            case .verbatim(let bytes, _): table.find(bytes)
            case .decoded(let bytes): table.find(bytes)
            }
        }

        /// nil when the bytes, or a lone surrogate escape, are not valid UTF-8.
        var string: String? {
            switch self {
            case .verbatim(let bytes, let ascii): ascii ? asciiString(bytes) : validatedString(bytes)
            case .decoded(let bytes): bytes.withUnsafeBytes { validatedString($0) }
            }
        }
    }

    /// Reads a string starting at its opening quote; structural errors throw.
    private mutating func readString() throws(SyntaxError) -> String? {
        try self.readRawString().string
    }

    private mutating func readRawString() throws(SyntaxError) -> RawString {
        self.index += 1
        let start = self.index
        // Skips plain ASCII eight bytes at a time to the first byte that needs a look (see
        // `stops`), while eight remain; the byte loop below then starts on that byte.
        while self.index + 8 <= self.bytes.count {
            let stops = Self.stops(in: UInt64(littleEndian: self.bytes.loadUnaligned(fromByteOffset: self.index, as: UInt64.self)))
            if stops != 0 {
                self.index += stops.trailingZeroBitCount >> 3
                break
            }
            self.index += 8
        }
        // Fast path: no escapes, so the string is the bytes between the quotes.
        var combined: UInt8 = 0
        while let byte = self.peek() {
            if byte == UInt8(ascii: "\"") {
                let raw = UnsafeRawBufferPointer(rebasing: self.bytes[start..<self.index])
                self.index += 1
                return .verbatim(raw, ascii: combined < 0x80)
            }
            combined |= byte
            if byte == UInt8(ascii: "\\") { break }
            guard byte >= 0x20 else { throw self.error("control character in a string") }
            self.index += 1
        }
        guard !self.atEnd else { throw self.error("unterminated string") }
        var decoded = Array(self.bytes[start..<self.index])
        while let byte = self.peek() {
            self.index += 1
            switch byte {
            case UInt8(ascii: "\""):
                return .decoded(decoded)
            case UInt8(ascii: "\\"):
                try self.readEscape(into: &decoded)
            case 0..<0x20:
                self.index -= 1
                throw self.error("control character in a string")
            default:
                decoded.append(byte)
            }
        }
        throw self.error("unterminated string")
    }

    /// The high bit of each byte of `word` (first byte lowest) that the byte loop must see: a
    /// quote, a backslash, a control character or a byte of a non-ASCII character. `x - 0x01`
    /// borrows out of a zero byte and `x - 0x20` out of one below 0x20, and a borrow only starts
    /// at such a byte, so the lowest bit set is exact (bytes above it may be flagged wrongly;
    /// they are read one by one).
    private static func stops(in word: UInt64) -> UInt64 {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let quotes = word ^ (ones &* 0x22), backslashes = word ^ (ones &* 0x5C)
        let zeroQuote = (quotes &- ones) & ~quotes
        let zeroBackslash = (backslashes &- ones) & ~backslashes
        let control = (word &- ones &* 0x20) & ~word
        return (zeroQuote | zeroBackslash | control | word) & (ones &* 0x80)
    }

    private mutating func readEscape(into decoded: inout [UInt8]) throws(SyntaxError) {
        guard let byte = self.peek() else { throw self.error("unterminated string") }
        self.index += 1
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): decoded.append(byte)
        case UInt8(ascii: "b"): decoded.append(0x08)
        case UInt8(ascii: "f"): decoded.append(0x0C)
        case UInt8(ascii: "n"): decoded.append(0x0A)
        case UInt8(ascii: "r"): decoded.append(0x0D)
        case UInt8(ascii: "t"): decoded.append(0x09)
        case UInt8(ascii: "u"):
            var scalar = UInt32(try self.readHex4())
            if (0xD800..<0xDC00).contains(scalar), self.peek() == UInt8(ascii: "\\"),
                self.index + 1 < self.bytes.count, self.bytes[self.index + 1] == UInt8(ascii: "u")
            {
                let mark = self.index
                self.index += 2
                let low = UInt32(try self.readHex4())
                if (0xDC00..<0xE000).contains(low) {
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    self.index = mark
                }
            }
            Self.appendUTF8(scalar, to: &decoded)
        default:
            self.index -= 1
            throw self.error("invalid escape in a string")
        }
    }

    private mutating func readHex4() throws(SyntaxError) -> UInt16 {
        var value: UInt16 = 0
        for _ in 0..<4 {
            guard let byte = self.peek() else { throw self.error("unterminated \\u escape") }
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw self.error("invalid \\u escape")
            }
            value = value << 4 | UInt16(digit)
            self.index += 1
        }
        return value
    }

    /// Encodes a scalar as UTF-8. A lone surrogate is encoded the same way, which yields bytes
    /// that are not valid UTF-8, so the field is reported as such rather than altered.
    private static func appendUTF8(_ scalar: UInt32, to out: inout [UInt8]) {
        switch scalar {
        case 0..<0x80:
            out.append(UInt8(scalar))
        case 0x80..<0x800:
            out.append(UInt8(0xC0 | scalar >> 6))
            out.append(UInt8(0x80 | scalar & 0x3F))
        case 0x800..<0x10000:
            out.append(UInt8(0xE0 | scalar >> 12))
            out.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            out.append(UInt8(0x80 | scalar & 0x3F))
        default:
            out.append(UInt8(0xF0 | scalar >> 18))
            out.append(UInt8(0x80 | scalar >> 12 & 0x3F))
            out.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            out.append(UInt8(0x80 | scalar & 0x3F))
        }
    }

    // MARK: cursor

    private var atEnd: Bool { self.index >= self.bytes.count }

    private func peek() -> UInt8? {
        self.index < self.bytes.count ? self.bytes[self.index] : nil
    }

    private mutating func skipWhitespace() {
        while let byte = self.peek(),
            byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\n") || byte == UInt8(ascii: "\t")
                || byte == UInt8(ascii: "\r")
        {
            self.index += 1
        }
    }

    private mutating func expect(_ byte: UInt8, _ message: String) throws(SyntaxError) {
        guard self.peek() == byte else {
            throw self.error(self.atEnd ? "unexpected end of body" : message)
        }
        self.index += 1
    }

    private func error(_ message: String) -> SyntaxError {
        SyntaxError(message: "\(message) at byte \(self.index)")
    }
}

/// A string from UTF-8 bytes, or nil when they are not valid UTF-8. ASCII, which almost every
/// callback is, takes a quick check instead of full validation.
func validatedString(_ bytes: UnsafeRawBufferPointer) -> String? {
    var combined: UInt8 = 0
    for byte in bytes { combined |= byte }
    return combined < 0x80 ? asciiString(bytes) : String(validating: bytes, as: UTF8.self)
}

/// A string from bytes known to be ASCII. Written into the new string's storage: a short one
/// (most values) then skips the UTF-8 validation that `String(decoding:as:)` repeats.
func asciiString(_ bytes: UnsafeRawBufferPointer) -> String {
    String(unsafeUninitializedCapacity: bytes.count) { storage in
        UnsafeMutableRawBufferPointer(storage).copyMemory(from: bytes)
        return bytes.count
    }
}
