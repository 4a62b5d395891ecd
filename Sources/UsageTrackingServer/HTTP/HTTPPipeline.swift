import NIOCore
import NIOHTTP1

/// The pipeline of one HTTP/1 connection: NIO's request decoder with our limits, then our
/// handler. The server and the tests (on an `EmbeddedChannel`) build it here, so both run the same.
enum HTTPPipeline {
    static func configure(_ channel: Channel, state: ServerState) throws {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = state.configuration.maxHeaderBytes
        limits.maxHeaderFieldSize = state.configuration.maxHeaderBytes
        try channel.pipeline.syncOperations.addHandlers([
            ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, informationalResponseStrategy: .drop, limitConfiguration: limits)),
            HTTPConnectionHandler(state: state),
        ])
    }
}
