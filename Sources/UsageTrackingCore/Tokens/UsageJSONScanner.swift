/// A streaming JSON reader that checks a document's syntax (RFC 8259) as bytes arrive, in pieces
/// split anywhere, and keeps only the members `UsageMembers` names into `document`.
///
/// Memory is fixed: a stack of one byte per open array or object (at most `maxDepth`, deeper is
/// refused) and the one string being kept (member names inside kept objects, model names,
/// `type`), cut off at its bound. Every other string is passed over byte by byte, unkept, and
/// its UTF-8 is not checked; kept strings are decoded (escapes included) and checked.
struct UsageJSONScanner {
    private enum State: UInt8 {
        case value, firstValue, firstKey, key, colon, afterValue
        case string, escape, unicode, number, literal, done
    }
    private enum StringRole: UInt8 { case skipped, key, model, type }
    private enum NumberPart: UInt8 { case minus, zero, integer, dot, fraction, exponent, exponentSign, exponentDigits }

    private static let maxKeyBytes = 32

    private let limits: AnswerLimits
    private var state = State.value
    private var stack: [UInt8] = []
    /// The member whose value comes next (`UsageMembers.none` if nobody keeps it).
    private var pending = UsageMembers.none
    private var role = StringRole.skipped
    private var text: [UInt8] = []
    private var textLimit = 0
    private var textOverflow = false
    /// A `\u` escape did not form a Unicode scalar (lone surrogate).
    private var textInvalid = false
    private var unicodeValue: UInt32 = 0
    private var unicodeDigits = 0
    private var highSurrogate: UInt32 = 0
    /// The member whose string, number or literal is being read.
    private var valueMember = UsageMembers.none
    private var numberPart = NumberPart.integer
    private var number: UInt64 = 0
    private var literal: StaticString = "null"
    private var literalIndex = 0

    private(set) var document: DocumentUsage
    private(set) var failure: String?
    /// `failure != nil`, kept apart as it is checked for every byte.
    private var failed = false

    init(limits: AnswerLimits) {
        self.limits = limits
        self.document = DocumentUsage(maxModelBytes: limits.maxModelBytes)
        self.stack.reserveCapacity(limits.maxDepth)
        self.text.reserveCapacity(max(limits.maxModelBytes, Self.maxKeyBytes) + 4)
    }

    /// The document's top-level object has closed.
    var isComplete: Bool { self.state == .done }

    /// Starts a fresh document, keeping the storage.
    mutating func reset() {
        self.state = .value
        self.stack.removeAll(keepingCapacity: true)
        self.pending = UsageMembers.none
        self.document.reset()
    }

    mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        let count = bytes.count
        var i = 0
        while i < count, !self.failed {
            switch self.state {
            case .string:
                // A run of plain bytes at once: the bulk of an answer is text nobody keeps.
                let start = i
                while i < count {
                    let byte = bytes[i]
                    if byte == ASCII.quote || byte == ASCII.backslash || byte < 0x20 { break }
                    i += 1
                }
                if self.role != .skipped, i > start { self.keep(UnsafeRawBufferPointer(rebasing: bytes[start..<i])) }
                if i == count { return }
                let byte = bytes[i]
                i += 1
                if byte == ASCII.quote {
                    self.endString()
                } else if byte == ASCII.backslash {
                    self.state = .escape
                } else {
                    self.fail("invalid JSON: a control character inside a string")
                }
            case .escape:
                let byte = bytes[i]
                i += 1
                self.state = .string
                switch byte {
                case ASCII.quote, ASCII.backslash, UInt8(ascii: "/"): self.keep(byte)
                case UInt8(ascii: "b"): self.keep(0x08)
                case UInt8(ascii: "f"): self.keep(0x0C)
                case UInt8(ascii: "n"): self.keep(0x0A)
                case UInt8(ascii: "r"): self.keep(0x0D)
                case UInt8(ascii: "t"): self.keep(0x09)
                case UInt8(ascii: "u"):
                    self.state = .unicode
                    self.unicodeValue = 0
                    self.unicodeDigits = 0
                default: self.fail("invalid JSON: an invalid escape in a string")
                }
            case .unicode:
                guard let digit = ASCII.hexValue(bytes[i]) else {
                    self.fail("invalid JSON: an invalid \\u escape")
                    break
                }
                i += 1
                self.unicodeValue = self.unicodeValue << 4 | digit
                self.unicodeDigits += 1
                if self.unicodeDigits == 4 {
                    self.state = .string
                    if self.role != .skipped { self.keepCodeUnit(self.unicodeValue) }
                }
            case .number:
                // Not consuming the byte that ends a number: it belongs to what follows.
                if self.readNumber(bytes[i]) { i += 1 }
            case .literal:
                guard bytes[i] == self.literal.utf8Start[self.literalIndex] else {
                    self.fail("invalid JSON: expected a value")
                    break
                }
                i += 1
                self.literalIndex += 1
                if self.literalIndex == self.literal.utf8CodeUnitCount { self.state = .afterValue }
            default:
                let byte = bytes[i]
                i += 1
                if !ASCII.isWhitespace(byte) { self.structural(byte) }
            }
        }
    }

    // MARK: structure

    private mutating func structural(_ byte: UInt8) {
        switch self.state {
        case .value, .firstValue:
            if self.state == .firstValue, byte == UInt8(ascii: "]") {
                self.close()
            } else {
                self.startValue(byte)
            }
        case .firstKey, .key:
            if self.state == .firstKey, byte == UInt8(ascii: "}") {
                self.close()
            } else if byte == ASCII.quote {
                // Names are compared only inside objects that hold kept members.
                let kept = self.stack[self.stack.count - 1] != UsageMembers.otherObjectContext
                self.startString(kept ? .key : .skipped, limit: Self.maxKeyBytes)
                self.isKey = true
            } else {
                self.fail("invalid JSON: expected a member name")
            }
        case .colon:
            if byte == UInt8(ascii: ":") {
                self.state = .value
            } else {
                self.fail("invalid JSON: expected ':' after a member name")
            }
        case .afterValue:
            let inArray = self.stack[self.stack.count - 1] == UsageMembers.arrayContext
            if byte == UInt8(ascii: ",") {
                self.state = inArray ? .value : .key
            } else if byte == (inArray ? UInt8(ascii: "]") : UInt8(ascii: "}")) {
                self.close()
            } else {
                self.fail(inArray ? "invalid JSON: expected ',' or ']' in an array" : "invalid JSON: expected ',' or '}' after a member")
            }
        case .done:
            self.fail("invalid JSON: data after the end of the document")
        default:
            preconditionFailure("structural byte in state \(self.state)")
        }
    }

    /// Set while the string being read is a member name.
    private var isKey = false

    private mutating func startValue(_ byte: UInt8) {
        let member = self.pending
        self.pending = UsageMembers.none
        if self.stack.isEmpty, byte != UInt8(ascii: "{") {
            self.fail("the JSON body is not an object")
            return
        }
        let kind = member == UsageMembers.none ? nil : UsageMembers.kind(member)
        switch byte {
        case UInt8(ascii: "{"):
            if kind == .usageObject || kind == .containerObject {
                self.push(UsageMembers.context(ofObjectIn: member))
            } else if kind == nil || kind == .type {
                self.push(self.stack.isEmpty ? UsageMembers.rootContext : UsageMembers.otherObjectContext)
            } else {
                self.refuse(member, kind!, holding: "an object")
                return
            }
            if self.failure == nil { self.state = .firstKey }
        case UInt8(ascii: "["):
            if let kind, kind != .type, kind != .containerObject {
                self.refuse(member, kind, holding: "an array")
                return
            }
            self.push(UsageMembers.arrayContext)
            if self.failure == nil { self.state = .firstValue }
        case ASCII.quote:
            self.isKey = false
            self.valueMember = member
            switch kind {
            case .model: self.startString(.model, limit: self.limits.maxModelBytes)
            case .type: self.startString(.type, limit: DocumentUsage.maxTypeBytes)
            case .count, .usageObject: self.refuse(member, kind!, holding: "a string")
            case .containerObject, nil: self.startString(.skipped, limit: 0)
            }
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            if kind == .count {
                if byte == UInt8(ascii: "-") {
                    self.fail("\(UsageMembers.path(member)) is negative")
                    return
                }
                self.valueMember = member
            } else if kind == .model || kind == .usageObject {
                self.refuse(member, kind!, holding: "a number")
                return
            } else {
                self.valueMember = UsageMembers.none
            }
            self.number = byte == UInt8(ascii: "-") ? 0 : UInt64(byte - UInt8(ascii: "0"))
            self.numberPart = byte == UInt8(ascii: "-") ? .minus : byte == UInt8(ascii: "0") ? .zero : .integer
            self.state = .number
        case UInt8(ascii: "t"), UInt8(ascii: "f"):
            if let kind, kind == .count || kind == .model || kind == .usageObject {
                self.refuse(member, kind, holding: "a boolean")
                return
            }
            self.startLiteral(byte == UInt8(ascii: "t") ? "true" : "false")
        case UInt8(ascii: "n"):
            // null is "not given": allowed for objects and names; for counts the reading decides.
            if member != UsageMembers.none { self.document.nulls |= 1 << UInt64(member) }
            self.startLiteral("null")
        default:
            self.fail("invalid JSON: expected a value")
        }
    }

    private mutating func refuse(_ member: UInt8, _ kind: UsageMembers.Kind, holding what: String) {
        let wanted = switch kind {
        case .count: "a count"
        case .model, .type: "a string"
        case .usageObject, .containerObject: "an object"
        }
        self.fail("\(UsageMembers.path(member)) is \(what), not \(wanted)")
    }

    private mutating func startLiteral(_ literal: StaticString) {
        self.literal = literal
        self.literalIndex = 1
        self.state = .literal
    }

    private mutating func push(_ context: UInt8) {
        guard self.stack.count < self.limits.maxDepth else {
            self.fail("JSON nests deeper than \(self.limits.maxDepth) levels")
            return
        }
        self.stack.append(context)
    }

    private mutating func close() {
        self.stack.removeLast()
        self.state = self.stack.isEmpty ? .done : .afterValue
    }

    // MARK: numbers

    /// Takes one byte of a number; false when the byte ends the number instead.
    private mutating func readNumber(_ byte: UInt8) -> Bool {
        let isDigit = byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")
        let isFractionOrExponent = byte == UInt8(ascii: ".") || byte == UInt8(ascii: "e") || byte == UInt8(ascii: "E")
        switch self.numberPart {
        case .minus:
            guard isDigit else { return self.invalidNumber() }
            self.numberPart = byte == UInt8(ascii: "0") ? .zero : .integer
        case .zero, .integer:
            if isDigit {
                guard self.numberPart == .integer else { return self.invalidNumber() }
                if self.valueMember != UsageMembers.none { self.addDigit(byte) }
            } else if isFractionOrExponent {
                if self.valueMember != UsageMembers.none {
                    self.fail("\(UsageMembers.path(self.valueMember)) is not a whole number")
                    return true
                }
                self.numberPart = byte == UInt8(ascii: ".") ? .dot : .exponent
            } else {
                return self.endNumber()
            }
        case .dot:
            guard isDigit else { return self.invalidNumber() }
            self.numberPart = .fraction
        case .fraction:
            if byte == UInt8(ascii: "e") || byte == UInt8(ascii: "E") {
                self.numberPart = .exponent
            } else if !isDigit {
                return self.endNumber()
            }
        case .exponent:
            if byte == UInt8(ascii: "+") || byte == UInt8(ascii: "-") {
                self.numberPart = .exponentSign
            } else if isDigit {
                self.numberPart = .exponentDigits
            } else {
                return self.invalidNumber()
            }
        case .exponentSign:
            guard isDigit else { return self.invalidNumber() }
            self.numberPart = .exponentDigits
        case .exponentDigits:
            if !isDigit { return self.endNumber() }
        }
        return true
    }

    private mutating func addDigit(_ byte: UInt8) {
        let (tens, overflow) = self.number.multipliedReportingOverflow(by: 10)
        let value = tens &+ UInt64(byte - UInt8(ascii: "0"))
        guard !overflow, value >= tens, value <= self.limits.maxTokenCount else {
            self.fail("\(UsageMembers.path(self.valueMember)) exceeds \(self.limits.maxTokenCount)")
            return
        }
        self.number = value
    }

    private mutating func invalidNumber() -> Bool {
        self.fail("invalid JSON: an invalid number")
        return true
    }

    private mutating func endNumber() -> Bool {
        if self.valueMember != UsageMembers.none { self.document.counts[Int(self.valueMember)] = self.number }
        self.state = .afterValue
        return false
    }

    // MARK: strings

    private mutating func startString(_ role: StringRole, limit: Int) {
        self.role = role
        self.state = .string
        guard role != .skipped else { return }
        self.text.removeAll(keepingCapacity: true)
        self.textLimit = limit
        self.textOverflow = false
        self.textInvalid = false
        self.highSurrogate = 0
    }

    /// Decoded bytes of a kept string (passed-over strings keep nothing).
    private mutating func keep(_ bytes: UnsafeRawBufferPointer) {
        guard self.role != .skipped else { return }
        if self.highSurrogate != 0 {
            // A high surrogate escape not followed by a low one.
            self.textInvalid = true
            self.highSurrogate = 0
        }
        let room = self.textLimit - self.text.count
        if bytes.count > room { self.textOverflow = true }
        self.text.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes.prefix(room)))
    }

    private mutating func keep(_ byte: UInt8) {
        withUnsafeBytes(of: byte) { self.keep($0) }
    }

    private mutating func keepCodeUnit(_ unit: UInt32) {
        if self.highSurrogate != 0 {
            let high = self.highSurrogate
            self.highSurrogate = 0
            guard (0xDC00...0xDFFF).contains(unit) else {
                self.textInvalid = true
                return
            }
            self.keepScalar(0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00))
        } else if (0xD800...0xDBFF).contains(unit) {
            self.highSurrogate = unit
        } else if (0xDC00...0xDFFF).contains(unit) {
            self.textInvalid = true
        } else {
            self.keepScalar(unit)
        }
    }

    private mutating func keepScalar(_ value: UInt32) {
        for byte in UTF8.encode(Unicode.Scalar(value)!)! { self.keep(byte) }
    }

    private mutating func endString() {
        if self.highSurrogate != 0 { self.textInvalid = true }
        self.state = self.isKey ? .colon : .afterValue
        if self.isKey {
            self.isKey = false
            guard self.role == .key, !self.textOverflow, !self.textInvalid else { return }
            let context = self.stack[self.stack.count - 1]
            guard let member = self.text.withUnsafeBufferPointer({ UsageMembers.member(named: $0, in: context) }) else { return }
            guard !self.document.has(member) else {
                self.fail("\(UsageMembers.path(member)) appears twice")
                return
            }
            self.document.seen |= 1 << UInt64(member)
            self.pending = member
            return
        }
        switch self.role {
        case .skipped, .key: break
        case .type:
            if !self.textOverflow { self.document.type.append(contentsOf: self.text) }
        case .model:
            let path = UsageMembers.path(self.valueMember)
            if self.textOverflow {
                self.fail("\(path) is longer than \(self.limits.maxModelBytes) bytes")
            } else if let problem = self.textInvalid ? "is not valid UTF-8" : Self.problem(inName: self.text) {
                self.fail("\(path) \(problem)")
            } else {
                let group = Int(self.valueMember / UsageMembers.perGroup)
                let start = group * self.limits.maxModelBytes
                for index in 0..<self.text.count { self.document.models[start + index] = self.text[index] }
                self.document.modelLengths[group] = self.text.count
            }
        }
    }

    /// Why bytes cannot be a model name: not UTF-8, or holding a control character.
    private static func problem(inName bytes: [UInt8]) -> String? {
        var iterator = bytes.makeIterator()
        var decoder = UTF8()
        while true {
            switch decoder.decode(&iterator) {
            case .scalarValue(let scalar):
                if scalar.value < 0x20 || scalar.value == 0x7F { return "holds a control character" }
            case .emptyInput: return nil
            case .error: return "is not valid UTF-8"
            }
        }
    }

    private mutating func fail(_ reason: String) {
        if self.failure == nil { self.failure = reason }
        self.failed = true
    }
}

enum ASCII {
    static let quote = UInt8(ascii: "\""), backslash = UInt8(ascii: "\\")
    static let cr = UInt8(ascii: "\r"), lf = UInt8(ascii: "\n")

    @inline(__always)
    static func isWhitespace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09
    }

    static func hexValue(_ byte: UInt8) -> UInt32? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): UInt32(byte - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): UInt32(byte - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): UInt32(byte - UInt8(ascii: "A") + 10)
        default: nil
        }
    }
}
