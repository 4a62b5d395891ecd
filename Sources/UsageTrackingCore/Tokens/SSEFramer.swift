/// Splits a `text/event-stream` body into events (the WHATWG "server-sent events" parsing rules)
/// without keeping lines: each event's `data` bytes go straight into the JSON scanner as they
/// arrive, data lines joined by "\n". Lines end in CR, LF or CRLF, split anywhere; `:` lines are
/// comments; `id`, `retry` and unknown fields are passed over. An event's data must be one JSON
/// object, or `[DONE]` (OpenAI's end marker, which carries nothing).
struct SSEFramer {
    private enum Line: UInt8 { case start, name, valueStart, data, event, skip }
    private enum Field: UInt8 { case data, event, other }
    private enum Payload: UInt8 { case none, json, doneMarker }

    private static let doneMarker: StaticString = "[DONE]"
    private static let maxEventNameBytes = 32

    private var line = Line.start
    private var field = Field.other
    private var afterCR = false
    /// The field name's first 8 bytes, packed, and its length.
    private var name: UInt64 = 0
    private var nameLength = 0
    private var dataLines = 0
    private var payload = Payload.none
    private var doneMatched = 0
    /// The current event's `event` field, when it is short.
    private(set) var eventName: [UInt8] = []
    /// The body was taken for SSE by its first byte, not by its content type: its first line must
    /// then look like SSE, or it is no model answer.
    private var mustCheckFirstLine: Bool
    private(set) var failure: AnswerReading? {
        didSet { self.failed = true }
    }
    /// `failure != nil`, kept apart as it is checked for every byte.
    private var failed = false

    init(sniffed: Bool) {
        self.mustCheckFirstLine = sniffed
        self.eventName.reserveCapacity(Self.maxEventNameBytes)
    }

    /// Reads until an event with JSON data ends (true: `scanner.document` holds it, read it and
    /// call `nextEvent`) or the bytes run out. `consumed` says how far it read.
    mutating func feed(_ bytes: UnsafeRawBufferPointer, consumed: inout Int, into scanner: inout UsageJSONScanner) -> Bool {
        let count = bytes.count
        var i = consumed
        defer { consumed = i }
        while i < count, !self.failed {
            let byte = bytes[i]
            if byte == ASCII.lf, self.afterCR {
                self.afterCR = false
                i += 1
                continue
            }
            self.afterCR = false
            if byte == ASCII.cr || byte == ASCII.lf {
                self.afterCR = byte == ASCII.cr
                i += 1
                if self.endLine(&scanner) { return true }
                continue
            }
            switch self.line {
            case .start:
                if byte == UInt8(ascii: ":") {
                    self.checkFirstLine(isSSE: true)
                    self.line = .skip
                    i += 1
                } else {
                    self.line = .name
                    self.name = 0
                    self.nameLength = 0
                }
            case .name:
                i += 1
                if byte == UInt8(ascii: ":") {
                    self.endName(&scanner)
                    self.line = .valueStart
                } else {
                    if self.nameLength < 8 { self.name |= UInt64(byte) << UInt64(8 * self.nameLength) }
                    self.nameLength += 1
                    if self.mustCheckFirstLine, !self.mayBeSSEFieldName() { self.checkFirstLine(isSSE: false) }
                }
            case .valueStart:
                if byte == UInt8(ascii: " ") { i += 1 }
                self.line = switch self.field {
                case .data: .data
                case .event: .event
                case .other: .skip
                }
            case .data:
                let start = i
                while i < count, bytes[i] != ASCII.cr, bytes[i] != ASCII.lf { i += 1 }
                self.feedPayload(UnsafeRawBufferPointer(rebasing: bytes[start..<i]), into: &scanner)
            case .event:
                if self.eventName.count < Self.maxEventNameBytes {
                    self.eventName.append(byte)
                } else {
                    self.eventName.removeAll(keepingCapacity: true)
                    self.line = .skip  // a name this long is none the reader knows
                }
                i += 1
            case .skip:
                while i < count, bytes[i] != ASCII.cr, bytes[i] != ASCII.lf { i += 1 }
            }
        }
        return false
    }

    /// Forgets the event just read.
    mutating func nextEvent() {
        self.payload = .none
        self.dataLines = 0
        self.eventName.removeAll(keepingCapacity: true)
    }

    /// True when the line was the blank one that ends an event with JSON data.
    private mutating func endLine(_ scanner: inout UsageJSONScanner) -> Bool {
        defer { self.line = .start }
        switch self.line {
        case .start:
            switch self.payload {
            case .none:
                self.nextEvent()
                return false
            case .json:
                guard scanner.isComplete else {
                    self.failure = .unreadable("an SSE event ends inside its JSON data")
                    return false
                }
                return true
            case .doneMarker:
                guard self.doneMatched == Self.doneMarker.utf8CodeUnitCount else {
                    self.failure = .unreadable("SSE data is neither a JSON object nor [DONE]")
                    return false
                }
                self.nextEvent()
                return false
            }
        case .name:
            self.endName(&scanner)  // a field with no colon: its value is empty
        default:
            break
        }
        return false
    }

    private mutating func endName(_ scanner: inout UsageJSONScanner) {
        let known = self.nameLength <= 8 ? self.name : 0
        self.field = switch known {
        case Self.pack("data"): .data
        case Self.pack("event"): .event
        default: .other
        }
        self.checkFirstLine(isSSE: Self.fieldNames.contains { Self.pack($0) == known })
        switch self.field {
        case .data:
            if self.dataLines > 0 { self.feedPayload(UnsafeRawBufferPointer(start: Self.newline, count: 1), into: &scanner) }
            self.dataLines += 1
        case .event:
            self.eventName.removeAll(keepingCapacity: true)
        case .other:
            break
        }
    }

    private static let fieldNames: [StaticString] = ["data", "event", "id", "retry"]

    /// Whether the name read so far begins one of the SSE field names.
    private func mayBeSSEFieldName() -> Bool {
        guard self.nameLength <= 5 else { return false }
        let mask: UInt64 = (1 << UInt64(8 * self.nameLength)) - 1
        return Self.fieldNames.contains { $0.utf8CodeUnitCount >= self.nameLength && Self.pack($0) & mask == self.name }
    }

    private mutating func checkFirstLine(isSSE: Bool) {
        guard self.mustCheckFirstLine else { return }
        self.mustCheckFirstLine = false
        if !isSSE { self.failure = .notModelAnswer("body is neither JSON nor SSE") }
    }

    private mutating func feedPayload(_ bytes: UnsafeRawBufferPointer, into scanner: inout UsageJSONScanner) {
        var i = 0
        if self.payload == .none {
            while i < bytes.count, ASCII.isWhitespace(bytes[i]) { i += 1 }
            guard i < bytes.count else { return }
            switch bytes[i] {
            case UInt8(ascii: "{"):
                self.payload = .json
                scanner.reset()
            case UInt8(ascii: "["):
                self.payload = .doneMarker
                self.doneMatched = 0
            default:
                self.failure = .unreadable("SSE data is neither a JSON object nor [DONE]")
                return
            }
        }
        switch self.payload {
        case .json:
            scanner.feed(UnsafeRawBufferPointer(rebasing: bytes[i...]))
            if let failure = scanner.failure { self.failure = .unreadable(failure) }
        case .doneMarker:
            let marker = Self.doneMarker.utf8Start
            while i < bytes.count {
                let byte = bytes[i]
                i += 1
                if self.doneMatched < Self.doneMarker.utf8CodeUnitCount, byte == marker[self.doneMatched] {
                    self.doneMatched += 1
                } else if self.doneMatched < Self.doneMarker.utf8CodeUnitCount || !ASCII.isWhitespace(byte) {
                    self.failure = .unreadable("SSE data is neither a JSON object nor [DONE]")
                    return
                }
            }
        case .none:
            break
        }
    }

    private static var newline: UnsafeRawPointer { UnsafeRawPointer(("\n" as StaticString).utf8Start) }

    private static func pack(_ name: StaticString) -> UInt64 {
        var packed: UInt64 = 0
        for index in 0..<name.utf8CodeUnitCount { packed |= UInt64(name.utf8Start[index]) << UInt64(8 * index) }
        return packed
    }
}
