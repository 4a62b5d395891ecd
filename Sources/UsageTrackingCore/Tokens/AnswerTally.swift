/// The usage an answer has reported so far, updated document by document (one JSON answer, or
/// each SSE event). Every report REPLACES the previous one, as vLLM's per-chunk usage and
/// Anthropic's `message_delta` are cumulative; an Anthropic report replaces only the fields it
/// gives, keeping the others (input and cache counts from `message_start`).
///
/// Which format a usage object is in follows from its member names: `prompt_tokens` and
/// `completion_tokens` are OpenAI chat/completions (and vLLM); `input_tokens` and `output_tokens`
/// are Anthropic when under `message`, in a `message*` event, or beside `cache_*_input_tokens`,
/// and OpenAI Responses otherwise (the two map alike when neither has cache fields). A Responses
/// stream reports usage only in its final event (`response.completed`, `.incomplete` or
/// `.failed`); the usage of other events (null in `response.created`) is not read.
struct AnswerTally {
    private(set) var model = ""
    private(set) var tokens: TokenCounts?
    /// Anthropic's counts so far, each kept until a report gives it again.
    private var anthropic: (input: UInt64?, output: UInt64?, cacheCreation: UInt64?, cacheRead: UInt64?)?

    /// Where the model name is taken from when a document has several: message, response, top level.
    private static let modelPreference = [1, 2, 0]
    private static let anthropicTypes = ["message", "message_start", "message_delta"].map { Array($0.utf8) }
    private static let finalResponseTypes = ["response.completed", "response.incomplete", "response.failed"].map { Array($0.utf8) }

    /// Takes in one document; returns why its usage cannot be read, if it cannot.
    mutating func add(_ document: borrowing DocumentUsage, eventName: [UInt8]) -> String? {
        for group in Self.modelPreference where document.modelLengths[group] > 0 {
            let name = document.model(group: group)
            if !self.model.utf8.elementsEqual(name) { self.model = String(decoding: name, as: UTF8.self) }
            break
        }
        let type = document.has(UsageMembers.type) && !document.type.isEmpty ? document.type : eventName
        let isAnthropicEvent = Self.anthropicTypes.contains(type)
        if let failure = self.read(document, group: 0, anthropic: isAnthropicEvent) { return failure }
        if let failure = self.read(document, group: 1, anthropic: true) { return failure }
        if Self.finalResponseTypes.contains(type), let failure = self.read(document, group: 2, anthropic: false) { return failure }
        return nil
    }

    private mutating func read(_ document: borrowing DocumentUsage, group: Int, anthropic isAnthropic: Bool) -> String? {
        let base = UInt8(group) * UsageMembers.perGroup
        func member(_ local: UInt8) -> UInt8 { base + local }
        func has(_ local: UInt8) -> Bool { document.has(member(local)) }
        func optional(_ local: UInt8) -> UInt64 { document.count(member(local)) ?? 0 }
        /// A count that must be given as a number; the error when it is not.
        func required(_ local: UInt8) -> Result<UInt64, Failure> {
            if let value = document.count(member(local)) { return .success(value) }
            let path = UsageMembers.path(member(local))
            return .failure(Failure(reason: has(local) ? "\(path) is null, not a count" : "\(path) is missing"))
        }

        let openAIChat = has(UsageMembers.promptTokens) || has(UsageMembers.completionTokens)
        let inputOutput = has(UsageMembers.inputTokens) || has(UsageMembers.outputTokens)
        let anthropicCache = has(UsageMembers.cacheCreationInputTokens) || has(UsageMembers.cacheReadInputTokens)
        if openAIChat, inputOutput || anthropicCache {
            return "\(UsageMembers.groupPrefixes[group])usage mixes prompt_tokens and input_tokens fields"
        }
        // OpenAI's two spellings share one shape: (input, output, cached, cache write, reasoning).
        let openAI: (UInt8, UInt8, UInt8, UInt8, UInt8, input: String, output: String)?
        if openAIChat {
            openAI = (
                UsageMembers.promptTokens, UsageMembers.completionTokens, UsageMembers.promptCached,
                UsageMembers.promptCacheWrite, UsageMembers.completionReasoning, "prompt_tokens", "completion_tokens"
            )
        } else if inputOutput, !isAnthropic, !anthropicCache {
            openAI = (
                UsageMembers.inputTokens, UsageMembers.outputTokens, UsageMembers.inputCached,
                UsageMembers.inputCacheWrite, UsageMembers.outputReasoning, "input_tokens", "output_tokens"
            )
        } else {
            openAI = nil
        }
        do throws(Failure) {
            if let (input, output, cached, cacheWrite, reasoning, inputName, outputName) = openAI {
                if has(UsageMembers.totalTokens) { _ = try required(UsageMembers.totalTokens).get() }
                let counts = TokenCounts(
                    input: try required(input).get(), output: try required(output).get(),
                    cachedInput: optional(cached), cacheWrite: optional(cacheWrite), reasoning: optional(reasoning))
                try Self.checkParts(counts, group: group, input: inputName, output: outputName)
                self.tokens = counts
                self.anthropic = nil
            } else if inputOutput || anthropicCache {
                // null is "not given" here: message_delta's input and cache fields are optional.
                var fields = self.anthropic ?? (nil, nil, nil, nil)
                fields.input = document.count(member(UsageMembers.inputTokens)) ?? fields.input
                fields.output = document.count(member(UsageMembers.outputTokens)) ?? fields.output
                fields.cacheCreation = document.count(member(UsageMembers.cacheCreationInputTokens)) ?? fields.cacheCreation
                fields.cacheRead = document.count(member(UsageMembers.cacheReadInputTokens)) ?? fields.cacheRead
                self.anthropic = fields
                if let input = fields.input, let output = fields.output {
                    let cacheRead = fields.cacheRead ?? 0, cacheCreation = fields.cacheCreation ?? 0
                    self.tokens = TokenCounts(
                        input: input + cacheRead + cacheCreation, output: output, cachedInput: cacheRead, cacheWrite: cacheCreation)
                }
            }
        } catch {
            return error.reason
        }
        return nil
    }

    private struct Failure: Error { var reason: String }

    /// Parts must not exceed their whole: a count that does is not believed.
    private static func checkParts(_ counts: TokenCounts, group: Int, input: String, output: String) throws(Failure) {
        let prefix = UsageMembers.groupPrefixes[group] + "usage."
        if counts.cachedInput > counts.input || counts.cacheWrite > counts.input - counts.cachedInput {
            throw Failure(reason: "cached and cache-write tokens exceed \(prefix)\(input)")
        }
        if counts.reasoning > counts.output {
            throw Failure(reason: "reasoning tokens exceed \(prefix)\(output)")
        }
    }
}
