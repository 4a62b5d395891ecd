import Glibc

/// Path templates such as `/v1/models/{model}`: a path that matches one is counted under the
/// template, so ids in paths collapse to one value and known routes never spend a label budget.
///
/// Matching walks a tree of segments: a literal segment is compared by bytes with the few
/// literals at that depth (lengths first), a `{name}` segment matches any one segment, and
/// literals win over parameters. Empty segments (a doubled
/// or trailing slash) are ignored, so `/v1/models/` matches `/v1/models`.
public struct RouteTemplates: Sendable {
    /// OpenAI- and Anthropic-compatible APIs, and the extra routes vLLM serves beside them.
    public static let builtIn: [String] = [
        "/v1/chat/completions", "/v1/chat/completions/{completion_id}", "/v1/chat/completions/{completion_id}/messages",
        "/v1/completions", "/v1/embeddings",
        "/v1/responses", "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
        "/v1/responses/{response_id}/input_items",
        "/v1/models", "/v1/models/{model}", "/v1/moderations",
        "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations",
        "/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
        "/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content",
        "/v1/uploads", "/v1/uploads/{upload_id}/parts", "/v1/uploads/{upload_id}/complete", "/v1/uploads/{upload_id}/cancel",
        "/v1/batches", "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel",
        "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
        "/v1/vector_stores", "/v1/vector_stores/{vector_store_id}",
        "/v1/messages", "/v1/messages/count_tokens", "/v1/messages/batches", "/v1/messages/batches/{message_batch_id}",
        "/v1/messages/batches/{message_batch_id}/cancel", "/v1/messages/batches/{message_batch_id}/results",
        "/v1/complete",
        "/v1/rerank", "/v1/score", "/tokenize", "/detokenize",
    ]

    private final class Node: Sendable {
        /// Few per node (about 20 under `/v1`), so a scan by bytes beats hashing the segment.
        let literals: [(name: [UInt8], node: Node)]
        let parameter: Node?
        /// The template a path ending here is counted under.
        let template: String?

        init(literals: [(name: [UInt8], node: Node)], parameter: Node?, template: String?) {
            self.literals = literals
            self.parameter = parameter
            self.template = template
        }
    }

    private let root: Node
    /// Every template, to tell a known route from a raw path when budgets are spent.
    public let templates: Set<String>

    public init(_ templates: [String]) {
        self.templates = Set(templates.map(Self.canonical))
        self.root = Self.build(self.templates.map { ($0, Self.segments($0)[...]) })
    }

    /// The template `path` matches, or nil. Walks the path's bytes in place: no allocation.
    public func match(_ path: String) -> String? {
        var path = path
        return path.withUTF8 { Self.match($0, from: 0, self.root, depth: 0) }
    }

    /// Paths deeper than this cannot match any sensible template; a hostile one stops early.
    static let maximumDepth = 16

    private static func match(_ path: UnsafeBufferPointer<UInt8>, from: Int, _ node: Node, depth: Int) -> String? {
        let slash = UInt8(ascii: "/")
        var start = from
        while start < path.count, path[start] == slash { start += 1 }
        guard start < path.count else { return node.template }
        guard depth < Self.maximumDepth else { return nil }
        var end = start
        while end < path.count, path[end] != slash { end += 1 }
        let segment = UnsafeBufferPointer(rebasing: path[start..<end])
        // memcmp: the generic `elementsEqual` costs several instructions a byte.
        for (name, literal) in node.literals
        where name.count == segment.count && name.withUnsafeBytes({ memcmp($0.baseAddress!, segment.baseAddress!, segment.count) == 0 }) {
            if let found = match(path, from: end, literal, depth: depth + 1) { return found }
            break
        }
        if let parameter = node.parameter { return match(path, from: end, parameter, depth: depth + 1) }
        return nil
    }

    static func isParameter(_ segment: Substring) -> Bool {
        segment.count > 2 && segment.first == "{" && segment.last == "}"
    }

    static func segments(_ template: String) -> [Substring] {
        template.split(separator: "/", omittingEmptySubsequences: true)
    }

    /// `/v1//models/` and `/v1/models` are one template.
    static func canonical(_ template: String) -> String {
        "/" + segments(template).joined(separator: "/")
    }

    private static func build(_ entries: [(template: String, rest: ArraySlice<Substring>)]) -> Node {
        let here = entries.first { $0.rest.isEmpty }?.template
        var literal: [Substring: [(String, ArraySlice<Substring>)]] = [:]
        var parameter: [(String, ArraySlice<Substring>)] = []
        for (template, rest) in entries {
            guard let first = rest.first else { continue }
            if isParameter(first) {
                parameter.append((template, rest.dropFirst()))
            } else {
                literal[first, default: []].append((template, rest.dropFirst()))
            }
        }
        return Node(
            literals: literal.sorted { $0.key < $1.key }.map { (Array($0.key.utf8), build($0.value)) },
            parameter: parameter.isEmpty ? nil : build(parameter),
            template: here
        )
    }
}
