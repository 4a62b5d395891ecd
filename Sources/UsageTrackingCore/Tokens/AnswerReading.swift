/// Token counts of one model answer, by type.
///
/// `cachedInput` and `cacheWrite` are parts of `input`; `reasoning` is part of `output`. So the
/// input that was neither read from nor written to a cache is `input - cachedInput - cacheWrite`.
///
/// Where each comes from (the reader checks the parts never exceed their whole):
///
/// | type        | OpenAI chat/completions, vLLM           | OpenAI Responses                    | Anthropic Messages                                                  |
/// |-------------|------------------------------------------|-------------------------------------|---------------------------------------------------------------------|
/// | input       | `prompt_tokens`                          | `input_tokens`                      | `input_tokens + cache_read_input_tokens + cache_creation_input_tokens` |
/// | cachedInput | `prompt_tokens_details.cached_tokens`    | `input_tokens_details.cached_tokens` | `cache_read_input_tokens`                                          |
/// | cacheWrite  | `prompt_tokens_details.cache_write_tokens` | `input_tokens_details.cache_write_tokens` | `cache_creation_input_tokens`                                 |
/// | output      | `completion_tokens`                      | `output_tokens`                     | `output_tokens`                                                     |
/// | reasoning   | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.reasoning_tokens` | 0 (not reported apart)                                     |
///
/// OpenAI's prompt and input counts already include the cached tokens; Anthropic's `input_tokens`
/// excludes them, hence the sum. `total_tokens` is checked as a count but not used.
public struct TokenCounts: Sendable, Equatable {
    public var input: UInt64
    public var output: UInt64
    public var cachedInput: UInt64
    public var cacheWrite: UInt64
    public var reasoning: UInt64

    public init(input: UInt64, output: UInt64, cachedInput: UInt64 = 0, cacheWrite: UInt64 = 0, reasoning: UInt64 = 0) {
        self.input = input
        self.output = output
        self.cachedInput = cachedInput
        self.cacheWrite = cacheWrite
        self.reasoning = reasoning
    }

    /// Each type under its value of the token families' `type` label.
    public var byType: [(type: String, amount: UInt64)] {
        [("input", self.input), ("output", self.output), ("cached_input", self.cachedInput), ("cache_write", self.cacheWrite), ("reasoning", self.reasoning)]
    }
}

/// The usage an answer reported: the model it names ("" when it named none) and its counts.
public struct AnswerUsage: Sendable, Equatable {
    public var model: String
    public var tokens: TokenCounts

    public init(model: String, tokens: TokenCounts) {
        self.model = model
        self.tokens = tokens
    }
}

/// What an answer says so far. Whether it is complete (count it) or cut short is for the caller
/// to decide, from whether the stream ended.
public enum AnswerReading: Sendable, Equatable {
    /// The latest complete usage the answer reported.
    case usage(AnswerUsage)
    /// A model answer (2xx, JSON or SSE) that has reported no usage yet. Never read as zero.
    case noUsage
    /// Not a model answer at all: non-2xx status, or a body that is neither JSON nor SSE.
    case notModelAnswer(String)
    /// A model answer whose usage cannot be trusted or read: the exact reason.
    case unreadable(String)
}

/// The bounds one reader works within. Memory is fixed whatever they are; they bound the work a
/// hostile answer can cause and the size of the values kept.
public struct AnswerLimits: Sendable {
    /// Most bytes a gzip body may inflate to (outcome: unreadable).
    public var maxInflatedBytes: UInt64
    /// Most a gzip body may grow over its compressed size, once it has inflated past
    /// `inflateRatioGrace` bytes (outcome: unreadable). Text rarely grows past 20 times.
    public var maxInflateRatio: UInt64
    /// Inflated bytes before the ratio is checked, so a small body is never judged by it.
    public var inflateRatioGrace: UInt64
    /// Most UTF-8 bytes of a model name (outcome: unreadable).
    public var maxModelBytes: Int
    /// Deepest nesting of JSON arrays and objects (outcome: unreadable).
    public var maxDepth: Int
    /// Largest token count believed (outcome: unreadable); 2^53 - 1 is exact in every JSON parser.
    public var maxTokenCount: UInt64

    public init(
        maxInflatedBytes: UInt64 = 256 << 20, maxInflateRatio: UInt64 = 200, inflateRatioGrace: UInt64 = 1 << 20,
        maxModelBytes: Int = 256, maxDepth: Int = 64, maxTokenCount: UInt64 = (1 << 53) - 1
    ) {
        self.maxInflatedBytes = maxInflatedBytes
        self.maxInflateRatio = maxInflateRatio
        self.inflateRatioGrace = inflateRatioGrace
        self.maxModelBytes = maxModelBytes
        self.maxDepth = maxDepth
        self.maxTokenCount = maxTokenCount
    }
}
