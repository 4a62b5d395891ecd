import NIOCore

/// The pipeline of one HTTP/1 connection: one handler, which parses its requests itself
/// (`HTTPRequestParser`). The server and the tests (on an `EmbeddedChannel`) build it here, so
/// both run the same.
enum HTTPPipeline {
    static func configure(_ channel: Channel, state: ServerState) throws {
        try channel.pipeline.syncOperations.addHandler(HTTPConnectionHandler(state: state))
    }
}
