/// The JSON members a usage reading keeps, each one path in a document and one bit in a mask.
///
/// Usage sits in three places: at the top level (OpenAI chat/completions, OpenAI Responses and
/// Anthropic answers, Anthropic `message_delta`), under `message` (Anthropic `message_start`) and
/// under `response` (OpenAI Responses stream events). Each place is a group holding the same
/// members; a member's raw value is `group * perGroup + local`.
enum UsageMembers {
    static let perGroup: UInt8 = 19
    static let groupPrefixes = ["", "message.", "response."]

    // Local indices inside a group (`paths` below gives each one's path).
    static let model: UInt8 = 0, usage: UInt8 = 1
    static let promptTokens: UInt8 = 2, completionTokens: UInt8 = 3, totalTokens: UInt8 = 4
    static let inputTokens: UInt8 = 5, outputTokens: UInt8 = 6
    static let cacheCreationInputTokens: UInt8 = 7, cacheReadInputTokens: UInt8 = 8
    static let promptDetails: UInt8 = 9, promptCached: UInt8 = 10, promptCacheWrite: UInt8 = 11
    static let completionDetails: UInt8 = 12, completionReasoning: UInt8 = 13
    static let inputDetails: UInt8 = 14, inputCached: UInt8 = 15, inputCacheWrite: UInt8 = 16
    static let outputDetails: UInt8 = 17, outputReasoning: UInt8 = 18

    // Top-level members outside the groups.
    static let type: UInt8 = 57, message: UInt8 = 58, response: UInt8 = 59
    static let count = 60
    /// "No member": a value nobody keeps.
    static let none: UInt8 = 255

    static let paths = [
        "model", "usage", "usage.prompt_tokens", "usage.completion_tokens", "usage.total_tokens",
        "usage.input_tokens", "usage.output_tokens", "usage.cache_creation_input_tokens", "usage.cache_read_input_tokens",
        "usage.prompt_tokens_details", "usage.prompt_tokens_details.cached_tokens", "usage.prompt_tokens_details.cache_write_tokens",
        "usage.completion_tokens_details", "usage.completion_tokens_details.reasoning_tokens",
        "usage.input_tokens_details", "usage.input_tokens_details.cached_tokens", "usage.input_tokens_details.cache_write_tokens",
        "usage.output_tokens_details", "usage.output_tokens_details.reasoning_tokens",
    ]
    /// Each local member's parent object (a local index), or -1 for the group's own object.
    private static let parents: [Int8] = [-1, -1, 1, 1, 1, 1, 1, 1, 1, 1, 9, 9, 1, 12, 1, 14, 14, 1, 17]
    /// Each local member's own name: the last part of its path.
    private static let names: [[UInt8]] = paths.map { Array($0.split(separator: ".").last!.utf8) }
    private static let topLevelNames: [(name: [UInt8], member: UInt8)] = [
        (Array("type".utf8), type), (Array("message".utf8), message), (Array("response".utf8), response),
    ]

    enum Kind { case count, model, type, usageObject, containerObject }

    static func kind(_ member: UInt8) -> Kind {
        switch member {
        case type: return .type
        case message, response: return .containerObject
        default:
            switch member % perGroup {
            case model: return .model
            case usage, promptDetails, completionDetails, inputDetails, outputDetails: return .usageObject
            default: return .count
            }
        }
    }

    static func path(_ member: UInt8) -> String {
        switch member {
        case type: "type"
        case message: "message"
        case response: "response"
        default: groupPrefixes[Int(member / perGroup)] + paths[Int(member % perGroup)]
        }
    }

    // MARK: objects being read

    // The scanner's stack holds one context per open array or object: an array, an object
    // nobody keeps anything from, the top-level object, or the object a member holds.
    static let arrayContext: UInt8 = 0, otherObjectContext: UInt8 = 1, rootContext: UInt8 = 2
    private static let memberContextBase: UInt8 = 3

    static func context(ofObjectIn member: UInt8) -> UInt8 { memberContextBase + member }

    @inline(__always)
    private static func same(_ key: UnsafeBufferPointer<UInt8>, _ name: [UInt8]) -> Bool {
        guard key.count == name.count else { return false }
        for index in 0..<key.count where key[index] != name[index] { return false }
        return true
    }

    /// The member `key` names inside an object of `context`, if any is kept.
    static func member(named key: UnsafeBufferPointer<UInt8>, in context: UInt8) -> UInt8? {
        let group: UInt8, parent: Int8
        switch context {
        case arrayContext, otherObjectContext: return nil
        case rootContext:
            for (name, member) in topLevelNames where same(key, name) { return member }
            (group, parent) = (0, -1)
        case memberContextBase + message: (group, parent) = (1, -1)
        case memberContextBase + response: (group, parent) = (2, -1)
        default:
            let member = context - memberContextBase
            (group, parent) = (member / perGroup, Int8(member % perGroup))
        }
        for local in 0..<Int(perGroup) where parents[local] == parent && same(key, names[local]) {
            return group * perGroup + UInt8(local)
        }
        return nil
    }
}

/// What one JSON document (a whole JSON answer, or one SSE event's data) held of the members.
/// Fixed storage, reused for every document; only values whose bit is in `seen` are meaningful.
struct DocumentUsage {
    /// Members present, whatever their value (a second occurrence is refused).
    var seen: UInt64 = 0
    /// Members present with the value null.
    var nulls: UInt64 = 0
    var counts = [UInt64](repeating: 0, count: UsageMembers.count)
    /// Each group's model name, UTF-8 checked, in slices of `maxModelBytes` (empty: none given).
    var models: [UInt8]
    var modelLengths = [0, 0, 0]
    /// The top-level `type`, when it was a short string.
    var type: [UInt8] = []
    let maxModelBytes: Int

    init(maxModelBytes: Int) {
        self.maxModelBytes = maxModelBytes
        self.models = [UInt8](repeating: 0, count: 3 * maxModelBytes)
        self.type.reserveCapacity(DocumentUsage.maxTypeBytes)
    }

    static let maxTypeBytes = 32

    mutating func reset() {
        self.seen = 0
        self.nulls = 0
        for group in 0..<3 { self.modelLengths[group] = 0 }
        self.type.removeAll(keepingCapacity: true)
    }

    func has(_ member: UInt8) -> Bool { self.seen & (1 << UInt64(member)) != 0 }
    func isNull(_ member: UInt8) -> Bool { self.nulls & (1 << UInt64(member)) != 0 }
    /// The member's count when it was given as a number.
    func count(_ member: UInt8) -> UInt64? { self.has(member) && !self.isNull(member) ? self.counts[Int(member)] : nil }

    func model(group: Int) -> ArraySlice<UInt8> {
        self.models[group * self.maxModelBytes..<group * self.maxModelBytes + self.modelLengths[group]]
    }
}
