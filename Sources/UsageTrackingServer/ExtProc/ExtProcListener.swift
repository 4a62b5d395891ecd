import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOCore
import NIOPosix
import Synchronization
import UsageTrackingCore

/// The Envoy ext_proc listener: `ExtProcService` over plaintext HTTP/2 (h2c, as Envoy's gRPC
/// client speaks it to a cluster without TLS), on the HTTP server's event loops.
final class ExtProcListener: Sendable {
    /// The largest ProcessingRequest taken (gRPC's usual 4 MiB). Envoy sends at most its buffer
    /// limit of body per message (1 MiB per connection unless configured), and a header map far
    /// smaller; a larger message ends its stream as `invalid_message`.
    static let maxMessageBytes = 4 << 20

    /// The address bound; with port 0, the port the OS chose.
    let address: String
    private let server: GRPCServer<HTTP2ServerTransport.Posix>
    private let serving: Task<Void, Never>

    private init(address: String, server: GRPCServer<HTTP2ServerTransport.Posix>, serving: Task<Void, Never>) {
        self.address = address
        self.server = server
        self.serving = serving
    }

    /// Starts the listener `configuration.extProc` asks for (nil when it is off); `report`
    /// receives every stream's report.
    static func start(
        _ state: ServerState, group: MultiThreadedEventLoopGroup, report: @escaping @Sendable (TokenStreamReport) -> Void
    ) async throws -> ExtProcListener? {
        let configuration = state.configuration
        let logger = state.logger
        guard var settings = configuration.extProc, let counters = state.metrics.extProc, let decoder = state.tokenDecoder else { return nil }
        // A stream keeps the headers the token families read, and the request id they dedupe on.
        settings.headers.labels = decoder.headerNames
        if let header = configuration.dedupeHeader { settings.headers.requestID = header.lowercased() }
        let host = configuration.host
        let service = ExtProcService(settings: settings, maxValueBytes: configuration.maxLabelBytes, counters: counters, report: report)
        let transport: HTTP2ServerTransport.Posix
        do {
            let resolved = try NIOCore.SocketAddress.makeAddressResolvingHost(host, port: settings.port)
            let ip = resolved.ipAddress ?? host
            transport = HTTP2ServerTransport.Posix(
                address: resolved.protocol == .inet6 ? .ipv6(host: ip, port: settings.port) : .ipv4(host: ip, port: settings.port),
                transportSecurity: .plaintext,
                config: .defaults {
                    $0.rpc.maxRequestPayloadSize = Self.maxMessageBytes
                    // Envoy multiplexes many ext_proc streams over few connections: HTTP/2's own
                    // default of 100 per connection would refuse streams long before our cap; one more
                    // than the cap, so a client at the cap on one connection meets our refusal, not a wait.
                    $0.http2.maxConcurrentStreams = settings.maxStreams + 1
                },
                eventLoopGroup: group
            )
        } catch {
            throw ListenError(host: host, port: settings.port, underlying: error)
        }
        let server = GRPCServer(transport: transport, services: [service])
        let failure = ServeFailure()
        let serving = Task {
            do {
                try await server.serve()
            } catch {
                failure.error.withLock { $0 = error }
            }
        }
        do {
            let bound = try await transport.listeningAddress
            let address = bound.ipv4.map { "\($0.host):\($0.port)" } ?? bound.ipv6.map { "\($0.host):\($0.port)" } ?? "\(bound)"
            logger.info("listening ext_proc", metadata: ["address": "\(address)"])
            return ExtProcListener(address: address, server: server, serving: serving)
        } catch {
            await serving.value
            throw ListenError(host: host, port: settings.port, underlying: failure.error.withLock { $0 } ?? error)
        }
    }

    /// Stops accepting streams; those open go on until they end or `stop`.
    func beginGracefulShutdown() {
        self.server.beginGracefulShutdown()
    }

    /// Ends the streams still open (each reported as aborted) and waits for the server to stop.
    func stop() async {
        self.server.beginGracefulShutdown()
        self.serving.cancel()
        await self.serving.value
    }
}

/// Why `serve` stopped, when it failed (a port already in use).
private final class ServeFailure: Sendable {
    let error = Mutex<(any Error)?>(nil)
}
