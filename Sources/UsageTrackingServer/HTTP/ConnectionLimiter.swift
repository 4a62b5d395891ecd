import Logging
import NIOCore
import NIOPosix

/// On the listening channel: holds accepting while `maxConnections` connections are open and
/// resumes when one closes, so new connections wait in the kernel's backlog instead of costing a
/// descriptor and memory each.
///
/// An accept that fails (the descriptor limit reached) pauses accepting for a second. NIO's
/// `AcceptBackoffHandler` only delays the next `read`, but the listening socket stays registered
/// for readability while its backlog is not empty, so the event loop would spin on failing
/// accepts; turning `autoRead` off unregisters it. Accept errors are logged at most once every
/// ten seconds.
final class ConnectionLimiter: ChannelDuplexHandler {
    typealias InboundIn = Channel
    typealias InboundOut = Channel
    typealias OutboundIn = Channel

    private let maxConnections: Int
    private let logger: Logger
    private var open = 0
    private var readHeld = false
    private var lastErrorLog: NIODeadline?

    init(maxConnections: Int, logger: Logger) {
        self.maxConnections = maxConnections
        self.logger = logger
    }

    func read(context: ChannelHandlerContext) {
        if self.open < self.maxConnections {
            context.read()
        } else {
            self.readHeld = true
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let child = self.unwrapInboundIn(data)
        // One accept cycle can take several connections; past the limit they are closed at once.
        guard self.open < self.maxConnections else {
            child.close(promise: nil)
            return
        }
        self.open += 1
        let loop = context.eventLoop
        child.closeFuture.hop(to: loop).assumeIsolated().whenComplete { _ in
            self.open -= 1
            if self.readHeld, self.open < self.maxConnections {
                self.readHeld = false
                context.read()
            }
        }
        context.fireChannelRead(data)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard error is IOError else {
            context.fireErrorCaught(error)
            return
        }
        let options = context.channel.syncOptions
        try? options?.setOption(.autoRead, value: false)
        context.eventLoop.assumeIsolated().scheduleTask(in: Self.acceptBackoff) {
            try? options?.setOption(.autoRead, value: true)
        }
        let now = NIODeadline.now()
        if self.lastErrorLog.map({ now - $0 >= .seconds(10) }) ?? true {
            self.lastErrorLog = now
            self.logger.error("cannot accept connections; retrying every second", metadata: ["error": "\(error)", "open": "\(self.open)"])
        }
    }

    static let acceptBackoff = TimeAmount.seconds(1)
}

extension ServerBootstrap {
    /// A listener that holds at most `maxConnections` open (`ConnectionLimiter`).
    func limitingConnections(to maxConnections: Int, logger: Logger) -> ServerBootstrap {
        self.serverChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(ConnectionLimiter(maxConnections: maxConnections, logger: logger))
            }
        }
    }
}
