import Logging
import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// `POST /track`: the callback Authorino makes after each authorized request.
/// Runs synchronously on the connection's event loop: decode, validate, count, reply.
enum TrackEndpoint {
    /// Checks that can be made from the head alone, before any body byte is buffered.
    /// Returns the rejection, if any.
    static func check(_ head: RequestHead, state: ServerState) -> CallbackRejection? {
        guard head.method == .POST else {
            return CallbackRejection(.methodNotAllowed, ["\(head.echoedMethod) /track is not allowed; use POST"])
        }
        if state.secrets.isRequired, let problem = Self.credentialProblem(head, state: state) {
            return CallbackRejection(.unauthorized, [problem])
        }
        // Which of two media types the body is would be a guess.
        if head.count(name: "content-type") > 1 {
            return CallbackRejection(.unsupportedMediaType, ["Content-Type given more than once; send one"])
        }
        // A compressed body would decode as garbage; say so instead.
        if let coding = head.joinedValues(name: "content-encoding"), coding.trimmingASCIISpaces().lowercased() != "identity" {
            let name = coding.truncated(toUTF8Bytes: ClientText.echoedBytes)
            return CallbackRejection(.unsupportedMediaType, ["Content-Encoding \(name) is not supported; send the body uncompressed"])
        }
        if head.contentLength > state.configuration.maxBodyBytes {
            return Self.tooLarge(state)
        }
        return nil
    }

    static func tooLarge(_ state: ServerState) -> CallbackRejection {
        CallbackRejection(.tooLarge, ["body exceeds the limit of \(state.configuration.maxBodyBytes) bytes"])
    }

    static func credentialProblem(_ head: RequestHead, state: ServerState) -> String? {
        let name = state.configuration.callbackSecretHeader
        guard let value = head.first(name: name) else { return "missing credentials in \(name)" }
        var secret = Substring(value)
        if name.lowercased() == "authorization" {
            guard value.count > 7, value.prefix(7).lowercased() == "bearer " else {
                return "\(name) must use the Bearer scheme"
            }
            secret = value.dropFirst(7)
        }
        guard let position = state.secrets.matchingSecret(secret.trimmingASCIISpaces().utf8) else { return "invalid credentials in \(name)" }
        state.status?.events.recordSecretMatch(position: position)
        return nil
    }

    static func challenge(_ state: ServerState) -> [(String, String)] {
        let name = state.configuration.callbackSecretHeader
        return name.lowercased() == "authorization"
            ? [("www-authenticate", "Bearer realm=\"usage-tracking\"")]
            : [("www-authenticate", "Secret realm=\"usage-tracking\", header=\"\(name)\"")]
    }

    /// What became of a callback that decoded and validated.
    enum Result {
        /// Counted, or a repeat of a request id already counted: the prebuilt 202.
        case accepted
        case rejected(CallbackRejection)
        /// `--fsync always`: the reply waits for the ledger's commit (see `committed`).
        case committing(EventLoopFuture<LedgerWriter.Verdict>, Callback)
    }

    /// Decodes one callback and counts it, or hands it to the ledger to be counted once committed.
    /// `sender` is the peer's address, shown in the status page.
    static func handle(_ head: RequestHead, body: ByteBuffer?, sender: String? = nil, state: ServerState, on eventLoop: EventLoop) -> Result {
        // The id's slot in the window is fetched while the body is decoded.
        let digest = Self.requestIDDigest(head, state: state)
        if let digest { state.metrics.requestIDs?.prefetch(digest) }
        let contentType = head.first(name: "content-type")
        // Headers the schema takes labels from (none in the built-in schema: no allocation).
        let headers = state.decoder.headerNames.map { head.first(name: $0) }
        let decoded = (body ?? ByteBuffer()).withUnsafeReadableBytes { bytes in
            Swift.Result { () throws(CallbackRejection) in try state.decoder.decode(bytes, contentType: contentType, headers: headers) }
        }
        let callback: Callback
        switch decoded {
        case .success(let decoded): callback = decoded
        case .failure(let rejection): return .rejected(rejection)
        }
        let writer = state.ledgerWriter
        if let writer {
            guard writer.isOpen else {
                return .rejected(CallbackRejection(.unavailable, ["the usage ledger is not reachable yet (see the service's log); this callback was not counted"]))
            }
            if writer.mode == .always { return .committing(writer.commit(callback, digest: digest, on: eventLoop), callback) }
        }
        let now = LedgerWriter.now()
        if let digest, let window = state.metrics.requestIDs, !window.claim(digest, at: now) {
            state.record(.duplicate)
            Self.noteDuplicate(head, sender: sender, state: state)
            return .accepted
        }
        // Only a ledger needs the series counted (collecting them costs an allocation).
        if let writer {
            writer.record(state.metrics.countReturningSeries(callback), amounts: callback.amounts, digest: digest, at: now)
        } else {
            state.metrics.count(callback)
        }
        state.metrics.record(.accepted)
        Self.noteAccepted(callback, head, sender: sender, state: state)
        return .accepted
    }

    /// The digest of the callback's request id; nil without one (or without deduplication).
    private static func requestIDDigest(_ head: RequestHead, state: ServerState) -> UInt64? {
        guard state.metrics.requestIDs != nil, let name = state.configuration.dedupeHeader else { return nil }
        // Over the id's bytes in the head (the parser trimmed them): no `String` is made.
        return head.withFirst(name: name) { $0.isEmpty ? nil : RequestIDWindow.digest($0) } ?? nil
    }

    /// After the ledger's commit (`always` mode, which counted the outcome with it): nil when the
    /// 202 is due, or the refusal.
    static func committed(
        _ verdict: LedgerWriter.Verdict, _ callback: Callback, _ head: RequestHead, sender: String?, state: ServerState
    ) -> CallbackRejection? {
        switch verdict {
        case .counted:
            Self.noteAccepted(callback, head, sender: sender, state: state)
            return nil
        case .duplicate:
            Self.noteDuplicate(head, sender: sender, state: state)
            return nil
        case .unavailable:
            return CallbackRejection(.unavailable, ["the usage ledger cannot commit (see the service's log); this callback was not counted"])
        }
    }

    private static func noteAccepted(_ callback: Callback, _ head: RequestHead, sender: String?, state: ServerState) {
        state.status?.rates.record(.accepted)
        // The id is looked up and copied only for what shows it.
        guard state.recent != nil || state.logsDebug else { return }
        let requestID = Self.echoedRequestID(head)
        state.recent?.record(.init(time: wallClock(), callback: callback, requestID: requestID, sender: sender))
        if state.logsDebug {
            state.logger.debug("callback accepted", metadata: Self.metadata(callback, requestID: requestID?.description))
        }
    }

    /// A repeated request id: answered 202 like the first, shown among the refused callbacks.
    private static func noteDuplicate(_ head: RequestHead, sender: String?, state: ServerState) {
        let header = state.configuration.dedupeHeader ?? ""
        let id = head.first(name: header)?.truncated(toUTF8Bytes: ClientText.echoedBytes) ?? ""
        let seconds = state.configuration.dedupeWindow.nanoseconds / 1_000_000_000
        let problem = "\(header) \(id) was counted within the last \(seconds) s; not counted again"
        state.recent?.record(.init(time: wallClock(), status: 202, rejection: CallbackRejection(.duplicate, [problem]), requestID: Self.requestID(head), sender: sender))
        state.logger.info("callback duplicate", metadata: ["outcome": "duplicate", "problems": .array([.string(problem)])])
    }

    /// The caller's request id as logged and shown: truncated, since the caller chooses it.
    private static func echoedRequestID(_ head: RequestHead) -> EchoedText? {
        head.withFirst(name: "x-request-id") { EchoedText($0) }
    }

    private static func requestID(_ head: RequestHead) -> String? { Self.echoedRequestID(head)?.description }

    private static func metadata(_ callback: Callback, requestID: String?) -> Logger.Metadata {
        var metadata: Logger.Metadata = [
            "user": "\(callback.user)", "groups": "\(callback.groups)", "path": "\(callback.path)",
            "method": "\(callback.method)", "host": "\(callback.host)",
        ]
        metadata["request_id"] = requestID.map { "\($0)" }
        return metadata
    }

    /// Counts, records and logs a rejection and builds its reply.
    static func reply(to rejection: CallbackRejection, _ head: RequestHead, sender: String? = nil, state: ServerState) -> HTTPResponse {
        let status = rejection.outcome.status
        state.record(rejection.outcome)
        state.status?.rates.record(.refused)
        let requestID = Self.requestID(head)
        state.recent?.record(.init(time: wallClock(), status: Int(status.code), rejection: rejection, requestID: requestID, sender: sender))
        var metadata: Logger.Metadata = [
            "status": "\(status.code)", "outcome": "\(rejection.outcome.rawValue)",
            "problems": .array(rejection.problems.map { .string($0) }),
        ]
        metadata["request_id"] = requestID.map { "\($0)" }
        state.logger.info("callback rejected", metadata: metadata)
        var headers: [(String, String)] = []
        if rejection.outcome == .methodNotAllowed { headers.append(("allow", "POST")) }
        if rejection.outcome == .unauthorized { headers += Self.challenge(state) }
        return .error(status, rejection.summary, rejection.problems, headers: headers)
    }
}

extension CallbackOutcome {
    var status: HTTPResponseStatus {
        switch self {
        case .accepted: .accepted
        case .malformed: .badRequest
        case .invalid: .unprocessableEntity
        case .tooLarge: .payloadTooLarge
        case .unsupportedMediaType: .unsupportedMediaType
        case .methodNotAllowed: .methodNotAllowed
        case .unauthorized: .unauthorized
        case .duplicate: .accepted
        case .unavailable: .serviceUnavailable
        }
    }
}
