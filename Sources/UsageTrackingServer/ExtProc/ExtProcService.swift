import EnvoyExternalProcessing
import GRPCCore
import UsageTrackingCore

/// Envoy's `ExternalProcessor/Process`: one stream per HTTP request, observed and never changed.
/// Each stream takes a place among `maxStreams` (refused at once when none is free), runs its
/// messages through an `ExtProcStream`, ends after `idleTimeout` without a message, and hands
/// one `TokenStreamReport` to `report` as it ends (refused streams have none).
struct ExtProcService: Envoy_Service_ExtProc_V3_ExternalProcessor.SimpleServiceProtocol {
    let settings: ExtProcSettings
    /// The bound of every identity value (`--max-label-bytes`).
    let maxValueBytes: Int
    let counters: ExtProcCounters
    let report: @Sendable (TokenStreamReport) -> Void

    func process(
        request: RPCAsyncSequence<ExtProcStream.Request, any Error>, response: RPCWriter<ExtProcStream.Response>,
        context: ServerContext
    ) async throws {
        guard self.counters.openStream(limit: self.settings.maxStreams) else {
            self.counters.record(.overCapacity)
            throw RPCError(code: .resourceExhausted, message: "\(self.settings.maxStreams) streams are open, the most --ext-proc-max-streams allows")
        }
        defer { self.counters.closeStream() }
        let timer = StreamIdleTimer(timeout: self.settings.idleTimeout)
        // The messages are read in a task of their own so that the timer can cancel the read.
        let (report, error) = await withTaskGroup(of: (TokenStreamReport, RPCError?)?.self) { group in
            group.addTask { await self.serve(request, response, timer) }
            group.addTask {
                await timer.wait()
                return nil
            }
            var ended: (TokenStreamReport, RPCError?)?
            while let result = await group.next() {
                group.cancelAll()
                if let result { ended = result }
            }
            return ended!
        }
        self.report(report)
        if let error { throw error }
    }

    /// Reads and answers messages until the stream ends, Envoy breaks the protocol, or the timer
    /// cancels the read; returns the report and the error that ends the RPC, if any.
    private func serve(
        _ request: RPCAsyncSequence<ExtProcStream.Request, any Error>, _ response: RPCWriter<ExtProcStream.Response>,
        _ timer: StreamIdleTimer
    ) async -> (TokenStreamReport, RPCError?) {
        var stream = ExtProcStream(headers: self.settings.headers, maxValueBytes: self.maxValueBytes)
        do {
            for try await message in request {
                timer.touch()
                switch stream.receive(message) {
                case .reply(let reply): try await response.write(reply)
                case .silent: break
                case .refuse(let reason, let problem):
                    self.counters.record(reason)
                    return (stream.report(end: .protocolError(problem)), RPCError(code: .invalidArgument, message: problem))
                }
                // The answer is over: end the RPC with OK now. Envoy otherwise resets each
                // finished stream itself, and HTTP/2's guard against rapid resets (200 in 30 s
                // per connection) then closes the connection under ordinary traffic.
                if stream.isComplete { return (stream.report(end: .complete), nil) }
            }
        } catch {
            // Bytes that are not a ProcessingRequest (invalidArgument, from the deserializer), or a
            // gRPC message the transport could not take: over the size bound or badly framed
            // (internalError; it resets the stream).
            if !timer.expired, let error = error as? RPCError, [.invalidArgument, .internalError].contains(error.code) {
                self.counters.record(.invalidMessage)
                let problem = error.code == .invalidArgument
                    ? "a message that is not a ProcessingRequest"
                    : "a gRPC message over \(ExtProcListener.maxMessageBytes) bytes or badly framed (\(error.message))"
                return (stream.report(end: .protocolError(problem)), error)
            }
        }
        guard !timer.expired || stream.isComplete else {
            self.counters.record(.idleTimeout)
            let seconds = self.settings.idleTimeout.components.seconds
            return (stream.report(end: .idleTimeout), RPCError(code: .deadlineExceeded, message: "no message for \(seconds) s (--ext-proc-idle-timeout)"))
        }
        return (stream.report(end: stream.isComplete ? .complete : .aborted), nil)
    }
}
