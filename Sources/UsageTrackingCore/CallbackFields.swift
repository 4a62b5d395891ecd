/// The fields of a callback body as sent, before validation. Both body encodings
/// (JSON and form) decode into this, so validation has one implementation.
struct CallbackFields {
    /// A field's value as it arrived. Text is `nil` where the bytes were not valid UTF-8,
    /// so that validation can name the field instead of failing the whole body.
    enum Value {
        case text(String?)
        case list([String?])
        /// Any other JSON type, named for the error message ("number", "object", ...).
        case other(String)
    }

    static let known = ["user", "groups", "path", "method", "host"]

    /// Forms send several values by repeating a name; in JSON a repeat is ambiguous.
    let repeatedGroupsAreLists: Bool
    private(set) var values: [String: Value] = [:]
    private(set) var repeated: [String] = []
    private(set) var names: [String] = []

    init(repeatedGroupsAreLists: Bool) {
        self.repeatedGroupsAreLists = repeatedGroupsAreLists
    }

    /// Records one top-level member; unknown names are kept only as names.
    mutating func add(name: String, value new: Value) {
        self.names.append(name)
        guard Self.known.contains(name) else { return }
        guard let old = self.values[name] else {
            self.values[name] = new
            return
        }
        // A form may repeat `groups` to send several; any other repeat is ambiguous.
        if self.repeatedGroupsAreLists, name == "groups", let merged = Self.merge(old, new) {
            self.values[name] = merged
        } else if !self.repeated.contains(name) {
            self.repeated.append(name)
        }
    }

    private static func merge(_ a: Value, _ b: Value) -> Value? {
        switch (a, b) {
        case (.text(let x), .text(let y)): .list([x, y])
        case (.list(let xs), .text(let y)): .list(xs + [y])
        default: nil
        }
    }
}
