import Logging
import NIOCore
import UsageTrackingCore

/// Counts what one model answer used, once its stream has ended, through the same families,
/// budgets, request-id window and ledger as `/track`:
/// - no identity (a required label's header absent or empty) → `no_identity`, whatever else;
/// - not a model answer, or unreadable → that outcome, nothing counted;
/// - usage read → one callback per token type, counted as one unit (a repeated request id
///   counts none), `counted`, or `aborted` when the stream ended before the answer did: the
///   last usage the answer gave is what it used as far as anyone can know;
/// - no usage → `no_usage`, or `aborted` when the stream ended early.
/// With `--fsync always` the counts show in `/metrics` only once committed, as callbacks do.
enum TokenCounting {
    /// The outcome, once known (after the commit in `always` mode).
    @discardableResult
    static func count(_ stream: TokenStreamReport, state: ServerState, decoder: TokenDecoder, on eventLoop: EventLoop) -> EventLoopFuture<TokenStreamOutcome> {
        let outcome = Self.settle(stream, state: state, decoder: decoder, on: eventLoop)
        return outcome.map { outcome in
            state.metrics.record(outcome)
            Self.log(outcome, stream, state: state)
            return outcome
        }
    }

    private static func settle(_ stream: TokenStreamReport, state: ServerState, decoder: TokenDecoder, on eventLoop: EventLoop) -> EventLoopFuture<TokenStreamOutcome> {
        let identified = stream.identityProblem == nil && stream.headers.indices.allSatisfy { index in
            !decoder.isRequired(header: index) || !(stream.headers[index]?.trimmingASCIISpaces().isEmpty ?? true)
        }
        guard identified else { return eventLoop.makeSucceededFuture(.noIdentity) }
        let usage: AnswerUsage
        switch stream.reading {
        case .notModelAnswer: return eventLoop.makeSucceededFuture(.notModelAnswer)
        case .unreadable: return eventLoop.makeSucceededFuture(.unreadable)
        case .noUsage: return eventLoop.makeSucceededFuture(stream.end == .complete ? .noUsage : .aborted)
        case .usage(let read): usage = read
        }
        let callbacks: [Callback]
        do {
            callbacks = try decoder.decode(model: usage.model, counts: usage.tokens.byType, headers: stream.headers)
        } catch {
            // A label's problem: an identity header over the byte limit, a model name the
            // families refuse. Either way nothing is counted; the log names it.
            state.logger.info("token stream not counted", metadata: ["problems": .array(error.problems.map { .string($0) })])
            return eventLoop.makeSucceededFuture(error.problems.allSatisfy { $0.hasPrefix("header ") } ? .noIdentity : .unreadable)
        }
        let done: TokenStreamOutcome = stream.end == .complete ? .counted : .aborted
        // A shared ledger not reached yet: nothing may be counted before its counts are back.
        if let writer = state.ledgerWriter, !writer.isOpen { return eventLoop.makeSucceededFuture(.unavailable) }
        let digest = state.metrics.requestIDs == nil ? nil : stream.requestIDDigest
        if let writer = state.ledgerWriter, writer.mode == .always {
            return writer.commit(tokens: callbacks, digest: digest, on: eventLoop).map { verdict in
                switch verdict {
                case .counted: done
                case .duplicate: .duplicate
                case .unavailable: .unavailable
                }
            }
        }
        let now = LedgerWriter.now()
        if let digest, let window = state.metrics.requestIDs, !window.claim(digest, at: now) {
            return eventLoop.makeSucceededFuture(.duplicate)
        }
        if let writer = state.ledgerWriter {
            writer.record(tokens: callbacks.map { state.metrics.countReturningSeries($0) }, amounts: callbacks.map(\.amounts), digest: digest, at: now)
        } else {
            for callback in callbacks { state.metrics.count(callback) }
        }
        return eventLoop.makeSucceededFuture(done)
    }

    private static func log(_ outcome: TokenStreamOutcome, _ stream: TokenStreamReport, state: ServerState) {
        var metadata: Logger.Metadata = ["outcome": "\(outcome.rawValue)", "end": "\(stream.end)"]
        metadata["request_id"] = stream.requestID.map { "\($0)" }
        switch stream.reading {
        case .notModelAnswer(let reason), .unreadable(let reason): metadata["reason"] = "\(reason)"
        case .usage, .noUsage: break
        }
        if let problem = stream.identityProblem { metadata["identity_problem"] = "\(problem)" }
        if outcome == .counted {
            state.logger.debug("token stream counted", metadata: metadata)
        } else {
            state.logger.info("token stream outcome", metadata: metadata)
        }
    }
}
