// PLACEHOLDER: replaced by branch token-reader at merge.

public struct TokenCounts: Sendable, Equatable {
    public var input, output, cachedInput, cacheWrite, reasoning: UInt64
}

public struct AnswerUsage: Sendable, Equatable {
    public var model: String
    public var tokens: TokenCounts
}

public enum AnswerReading: Sendable, Equatable {
    case usage(AnswerUsage), noUsage, notModelAnswer(String), unreadable(String)
}

public struct AnswerLimits: Sendable {
    public init() {}
}

public final class AnswerUsageReader {
    public init(limits: AnswerLimits = AnswerLimits()) {}
    public func responseHeaders(status: Int?, contentType: String?, contentEncoding: String?) {}
    public func body(_ chunk: UnsafeRawBufferPointer) {}
    public var reading: AnswerReading { .noUsage }
}
