/// The fields of a callback body as sent, before validation. Both body encodings
/// (JSON and form) decode into this, so validation has one implementation.
struct CallbackFields {
    /// The fields a callback may carry. Others are ignored, and only their names are kept.
    enum Field: Int, CaseIterable {
        case user, groups, path, method, host

        var name: String { self.staticName.description }

        private var staticName: StaticString {
            switch self {
            case .user: "user"
            case .groups: "groups"
            case .path: "path"
            case .method: "method"
            case .host: "host"
            }
        }

        /// Matches a name by its bytes, so known names never become `String`s.
        init?(_ name: some Collection<UInt8>) {
            let candidate: Field
            switch (name.count, name.first) {
            case (4, UInt8(ascii: "u")): candidate = .user
            case (6, UInt8(ascii: "g")): candidate = .groups
            case (4, UInt8(ascii: "p")): candidate = .path
            case (6, UInt8(ascii: "m")): candidate = .method
            case (4, UInt8(ascii: "h")): candidate = .host
            default: return nil
            }
            let expected = UnsafeRawBufferPointer(start: candidate.staticName.utf8Start, count: candidate.staticName.utf8CodeUnitCount)
            guard expected.elementsEqual(name) else { return nil }
            self = candidate
        }
    }

    /// A field's value as it arrived. Text is `nil` where the bytes were not valid UTF-8,
    /// so that validation can name the field instead of failing the whole body.
    enum Value {
        case text(String?)
        case list([String?])
        /// Any other JSON type, named for the error message ("number", "object", ...).
        case other(String)
    }

    /// Forms send several values by repeating a name; in JSON a repeat is ambiguous.
    let repeatedGroupsAreLists: Bool
    private var user, groups, path, method, host: Value?
    private(set) var repeated: [Field] = []
    private(set) var unknownNames: [String] = []

    init(repeatedGroupsAreLists: Bool) {
        self.repeatedGroupsAreLists = repeatedGroupsAreLists
    }

    subscript(field: Field) -> Value? {
        get {
            switch field {
            case .user: self.user
            case .groups: self.groups
            case .path: self.path
            case .method: self.method
            case .host: self.host
            }
        }
        set {
            switch field {
            case .user: self.user = newValue
            case .groups: self.groups = newValue
            case .path: self.path = newValue
            case .method: self.method = newValue
            case .host: self.host = newValue
            }
        }
    }

    /// Every name the body used, known ones first, for the debug view of rejected callbacks.
    var names: [String] {
        Field.allCases.filter { self[$0] != nil }.map(\.name) + self.unknownNames
    }

    var isEmpty: Bool { self.names.isEmpty }

    mutating func add(_ field: Field, _ new: Value) {
        guard let old = self[field] else {
            self[field] = new
            return
        }
        if self.repeatedGroupsAreLists, field == .groups, let merged = Self.merge(old, new) {
            self[field] = merged
        } else if !self.repeated.contains(field) {
            self.repeated.append(field)
        }
    }

    mutating func addUnknown(_ name: String) {
        self.unknownNames.append(name)
    }

    private static func merge(_ a: Value, _ b: Value) -> Value? {
        switch (a, b) {
        case (.text(let x), .text(let y)): .list([x, y])
        case (.list(let xs), .text(let y)): .list(xs + [y])
        default: nil
        }
    }
}
