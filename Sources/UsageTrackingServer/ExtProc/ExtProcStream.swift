import EnvoyExternalProcessing
import UsageTrackingCore

/// One ext_proc stream, that is one HTTP exchange: the phase it is in, the identity from the
/// request headers, and the answer reader that the response head and body go through. `receive`
/// takes each message in turn and says what to answer; nothing of a message is kept beyond the
/// values below (body chunks go straight to the reader). Used on one event loop.
struct ExtProcStream {
    typealias Request = Envoy_Service_ExtProc_V3_ProcessingRequest
    typealias Response = Envoy_Service_ExtProc_V3_ProcessingResponse

    enum Step: Equatable {
        /// Answer with this: CONTINUE for the phase received, nothing changed.
        case reply(Response)
        /// Answer nothing: Envoy does not wait (observability mode).
        case silent
        /// End the stream: the message breaks the protocol.
        case refuse(ExtProcCounters.Reason, String)
    }

    /// Response header values longer than this make the answer unreadable (a media type with its
    /// parameters, an encoding list, a status code are far shorter).
    static let maxResponseHeaderBytes = 256

    private enum Phase {
        case start, request, responseHead, responseBody, ended
    }
    private var phase = Phase.start
    private let headers: ExtProcHeaderNames
    private let maxValueBytes: Int
    /// The label headers' values.
    private var identity: [String?]
    private var identityProblem: String?
    private var requestID: (shown: String, digest: UInt64?)?
    private let reader = AnswerUsageReader()
    /// Set when the response head cannot be used; the body is then not read.
    private var responseProblem: String?

    init(headers: ExtProcHeaderNames, maxValueBytes: Int) {
        self.headers = headers
        self.maxValueBytes = maxValueBytes
        self.identity = Array(repeating: nil, count: headers.labels.count)
    }

    /// True once the response's end of stream has been seen: the caller ends the RPC then and
    /// passes nothing more to `receive`.
    var isComplete: Bool { self.phase == .ended }

    mutating func receive(_ message: Request) -> Step {
        guard let kind = message.request else { return .refuse(.invalidMessage, "a ProcessingRequest with no phase set") }
        var reply = Response()
        switch kind {
        case .requestHeaders(let request):
            guard self.phase == .start else { return .refuse(.outOfOrder, "request_headers after another phase") }
            self.phase = .request
            self.readIdentity(request.headers)
            reply.requestHeaders = .init()
        case .requestBody:
            if self.phase == .start { self.phase = .request }
            reply.requestBody = .init()
        case .requestTrailers:
            if self.phase == .start { self.phase = .request }
            reply.requestTrailers = .init()
        case .responseHeaders(let response):
            switch self.phase {
            case .start, .request: break
            case .responseHead: return .refuse(.outOfOrder, "response_headers given twice")
            case .responseBody, .ended: return .refuse(.outOfOrder, "response_headers after the response body")
            }
            self.phase = response.endOfStream ? .ended : .responseHead
            self.readResponseHead(response.headers)
            reply.responseHeaders = .init()
        case .responseBody(let body):
            self.phase = body.endOfStream ? .ended : .responseBody
            if self.responseProblem == nil {
                body.body.withUnsafeBytes { self.reader.body($0) }
                if body.endOfStream { self.reader.end() }
            }
            reply.responseBody = .init()
        case .responseTrailers:
            self.phase = .ended
            self.reader.end()
            reply.responseTrailers = .init()
        }
        return message.observabilityMode ? .silent : .reply(reply)
    }

    /// What the stream saw, ended as `end`.
    func report(end: TokenStreamReport.End) -> TokenStreamReport {
        TokenStreamReport(
            headerNames: self.headers.labels, headers: self.identity, requestID: self.requestID?.shown,
            requestIDDigest: self.requestID?.digest, identityProblem: self.identityProblem,
            reading: self.responseProblem.map { .unreadable($0) } ?? self.reader.reading, end: end
        )
    }

    private mutating func readIdentity(_ map: Envoy_Config_Core_V3_HeaderMap) {
        (self.identity, self.identityProblem) = map.values(of: self.headers.labels, maxBytes: self.maxValueBytes)
        // Not a label: taken as `/track` takes it (the first given, any length, any bytes), and
        // only its digest and the start shown in logs are kept.
        self.requestID = map.firstValue(of: self.headers.requestID).map { bytes in
            (String(decoding: bytes.prefix(4 * ClientText.echoedBytes), as: UTF8.self).truncated(toUTF8Bytes: ClientText.echoedBytes),
             TokenStreamReport.digest(requestID: bytes))
        }
    }

    private mutating func readResponseHead(_ map: Envoy_Config_Core_V3_HeaderMap) {
        let (values, problem) = map.values(of: [":status", "content-type", "content-encoding"], maxBytes: Self.maxResponseHeaderBytes)
        if let problem {
            self.responseProblem = problem
            return
        }
        var status: Int?
        if let text = values[0] {
            guard let code = Int(text), (100...999).contains(code) else {
                self.responseProblem = ":status: not a status code"
                return
            }
            status = code
        }
        self.reader.responseHeaders(status: status, contentType: values[1], contentEncoding: values[2])
    }
}

extension Envoy_Service_ExtProc_V3_ProcessingRequest.OneOf_Request {
    /// The field's name in the protocol, for messages.
    var name: String {
        switch self {
        case .requestHeaders: "request_headers"
        case .responseHeaders: "response_headers"
        case .requestBody: "request_body"
        case .responseBody: "response_body"
        case .requestTrailers: "request_trailers"
        case .responseTrailers: "response_trailers"
        }
    }
}
