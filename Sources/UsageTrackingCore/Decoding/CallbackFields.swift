import Glibc

/// The body fields a schema reads, compiled so that scanners match member names by their bytes:
/// a name that is not wanted never becomes a `String` unless it is kept for the debug view.
///
/// A dotted field (`usage.total_tokens`) is a path into nested JSON objects: the top level has
/// an entry `usage` whose `children` table has `total_tokens`. In a form the dotted name is the
/// field name itself, so `formEntries` lists every field by its full name.
final class FieldTable: Sendable {
    struct Entry: Sendable {
        let name: [UInt8]
        /// The field id when a value at this name is wanted.
        let field: Int?
        /// Wanted fields below this name.
        let children: FieldTable?
    }

    let entries: [Entry]

    private init(entries: [Entry]) {
        self.entries = entries
    }

    /// `fields` are dotted names; a field's id is its index.
    convenience init(fields: [String]) {
        self.init(paths: fields.enumerated().map { ($0.element.split(separator: ".", omittingEmptySubsequences: false)[...], $0.offset) })
    }

    private convenience init(paths: [(ArraySlice<Substring>, Int)]) {
        var order: [Substring] = []
        var leaves: [Substring: Int] = [:]
        var below: [Substring: [(ArraySlice<Substring>, Int)]] = [:]
        for (segments, field) in paths {
            guard let first = segments.first else { continue }
            if !order.contains(first) { order.append(first) }
            if segments.count == 1 {
                if leaves[first] == nil { leaves[first] = field }
            } else {
                below[first, default: []].append((segments.dropFirst(), field))
            }
        }
        self.init(entries: order.map { name in
            Entry(name: Array(name.utf8), field: leaves[name], children: below[name].map { FieldTable(paths: $0) })
        })
    }

    /// A flat table of full names, for forms.
    static func flat(_ fields: [String]) -> FieldTable {
        FieldTable(entries: fields.enumerated().map { Entry(name: Array($0.element.utf8), field: $0.offset, children: nil) })
    }

    /// The entry whose name has exactly these bytes: lengths and first bytes first, so that most
    /// misses cost two compares and no call.
    func find(_ name: UnsafeRawBufferPointer) -> Int? {
        for index in self.entries.indices where self.entries[index].name.count == name.count && self.entries[index].name.first == name.first {
            // memcmp: the generic `elementsEqual` costs several instructions a byte.
            let same = self.entries[index].name.withUnsafeBytes { name.isEmpty || memcmp($0.baseAddress!, name.baseAddress!, name.count) == 0 }
            if same { return index }
        }
        return nil
    }

    func find(_ name: [UInt8]) -> Int? {
        name.withUnsafeBytes { self.find($0) }
    }
}

/// A field's value as it arrived, before validation. Text is `nil` where the bytes were not
/// valid UTF-8, so that validation can name the field instead of failing the whole body.
enum FieldValue {
    case text(String?)
    case list([String?])
    case number(NumberReading)
    /// Any other JSON type, named for the error message ("object", "boolean", ...).
    case other(String)
}

/// A JSON number, or a form value read as one, as far as a `value` field cares.
enum NumberReading: Equatable {
    case whole(UInt64)
    case negative
    case fraction
    case tooLarge

    /// Reads JSON number syntax, already checked by the scanner.
    init(json bytes: UnsafeRawBufferPointer) {
        if bytes.first == UInt8(ascii: "-") {
            self = .negative
            return
        }
        var value: UInt64 = 0
        for byte in bytes {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else {
                self = .fraction
                return
            }
            let (times10, overflow1) = value.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = times10.addingReportingOverflow(UInt64(byte - UInt8(ascii: "0")))
            guard !overflow1, !overflow2 else {
                // Keep reading: `1e999...` is a fraction-or-exponent, not merely too large.
                self = bytes.contains { $0 == UInt8(ascii: ".") || $0 | 0x20 == UInt8(ascii: "e") } ? .fraction : .tooLarge
                return
            }
            value = sum
        }
        self = .whole(value)
    }
}

/// The wanted fields of one body, by field id, plus what the error reply and debug view need.
struct ScannedFields {
    /// On the stack, for as long as `withEmpty`'s body runs.
    let values: UnsafeMutableBufferPointer<FieldValue?>
    /// Field ids given more than once (a form's list fields excepted), in the order seen.
    private(set) var repeated: [Int] = []
    /// Names of members nobody asked for, for the debug view of refused callbacks.
    private(set) var unknownNames: [String] = []
    /// Top-level entries that led into nested objects; leaves are seen through `values`.
    private(set) var enteredBranches: [Int] = []
    /// Whether a repeated name adds to a list (forms, for fields read as sets).
    let listFields: [Bool]
    let mergesRepeats: Bool

    private init(values: UnsafeMutableBufferPointer<FieldValue?>, listFields: [Bool], mergesRepeats: Bool) {
        self.values = values
        self.listFields = listFields
        self.mergesRepeats = mergesRepeats
    }

    /// Calls `body` with no field found yet. The values live on the stack: an array of them
    /// costs an allocation per body, and its destruction runs unspecialised in the runtime.
    static func withEmpty<Result, Failure: Error>(
        fieldCount: Int, listFields: [Bool], mergesRepeats: Bool, _ body: (inout ScannedFields) throws(Failure) -> Result
    ) throws(Failure) -> Result {
        try withUnsafeTemporaryAllocation(of: FieldValue?.self, capacity: fieldCount) { (values) throws(Failure) in
            values.initialize(repeating: nil)
            // One by one, which is specialised: `deinitialize()` destroys through the runtime.
            defer { for index in values.indices { _ = values.moveElement(from: index) } }
            var fields = ScannedFields(values: values, listFields: listFields, mergesRepeats: mergesRepeats)
            return try body(&fields)
        }
    }

    var isEmpty: Bool {
        self.unknownNames.isEmpty && self.enteredBranches.isEmpty && !self.values.contains { $0 != nil }
    }

    /// `new` is consumed, so that the common case moves it into place instead of copying it.
    mutating func add(_ field: Int, _ new: consuming FieldValue) {
        guard let old = self.values[field] else {
            self.values[field] = new
            return
        }
        if self.mergesRepeats, self.listFields[field], let merged = Self.merge(old, new) {
            self.values[field] = merged
        } else if !self.repeated.contains(field) {
            self.repeated.append(field)
        }
    }

    mutating func addUnknown(_ name: String) {
        self.unknownNames.append(name)
    }

    mutating func enter(branch: Int) {
        if !self.enteredBranches.contains(branch) { self.enteredBranches.append(branch) }
    }

    private static func merge(_ a: FieldValue, _ b: FieldValue) -> FieldValue? {
        switch (a, b) {
        case (.text(let x), .text(let y)): .list([x, y])
        case (.list(let xs), .text(let y)): .list(xs + [y])
        default: nil
        }
    }
}
