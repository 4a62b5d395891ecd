/// What became of one model answer's stream. Each case is one `outcome` label of
/// `usage_tracking_token_streams_total`, so the names are part of the metrics contract.
public enum TokenStreamOutcome: String, Sendable, CaseIterable {
    /// Its usage was counted.
    case counted
    /// A model answer that carried no usage (a stream without `include_usage`): nothing counted,
    /// never a 0 that hides the loss.
    case noUsage = "no_usage"
    /// The request had none of the identity headers the token families need.
    case noIdentity = "no_identity"
    /// The answer or its usage could not be read (bad gzip, an encoding not handled, a usage
    /// field that is not a whole number, a label value over its limit).
    case unreadable
    /// The stream ended before the answer did (client gone, upstream reset): what its last
    /// usage said, if any, was counted.
    case aborted
    /// A request id already counted within the dedupe window: not counted again.
    case duplicate
    /// Not an answer to bill: a status other than 2xx, or neither JSON nor an event stream.
    case notModelAnswer = "not_model_answer"
    /// The ledger could not commit (`--fsync always`): not counted.
    case unavailable

    public static let metricName = "usage_tracking_token_streams_total"
}
