import NIOCore
import UsageTrackingCore

/// A request as the connection holds it from its head until it is answered.
struct ReceivedRequest {
    var head: RequestHead
    var route: Route
    var startNanoseconds: UInt64
    var body: ByteBuffer?
    /// A refusal decided before the request is answered (from the head, or an oversize body).
    var rejection: CallbackRejection?
    /// Answer, then close: nothing after this request on the stream is read.
    var closeAfter = false
    /// A reply decided before the request could be routed (timeout, unparsable request).
    var reply: HTTPResponse?
}
