import NIOCore
import UsageTrackingCore

/// `GET /debug`: a JSON page for `kubectl port-forward`, showing what the service is doing.
/// Secrets appear only as set/unset; rejected callbacks show field names, never bodies.
enum DebugEndpoint {
    static func reply(state: ServerState) -> HTTPResponse {
        guard let recent = state.recent else {
            return .error(.notFound, "not found", ["/debug is turned off (--no-debug)"])
        }
        let config = state.configuration
        let uptime = Double((NIODeadline.now() - state.startedAt).nanoseconds) / 1e9
        let document: JSONText = .object([
            ("version", .string(UsageMetrics.version)),
            ("uptime_seconds", .number((uptime * 1000).rounded() / 1000)),
            (
                "configuration",
                .object([
                    ("host", .string(config.host)),
                    ("port", .integer(Int64(config.port))),
                    ("max_body_bytes", .integer(Int64(config.maxBodyBytes))),
                    ("max_label_bytes", .integer(Int64(config.maxLabelBytes))),
                    ("max_header_bytes", .integer(Int64(config.maxHeaderBytes))),
                    ("idle_timeout_seconds", .integer(config.idleTimeout.nanoseconds / 1_000_000_000)),
                    ("drain_delay_seconds", .integer(config.drainDelay.nanoseconds / 1_000_000_000)),
                    ("shutdown_timeout_seconds", .integer(config.shutdownTimeout.nanoseconds / 1_000_000_000)),
                    ("event_loop_threads", .integer(Int64(config.eventLoopThreads))),
                    ("callback_secret_header", .string(config.callbackSecretHeader)),
                    ("callback_secret", .string(config.callbackSecret == nil ? "unset" : "set")),
                    ("callback_secret_file", config.callbackSecretFile.map(JSONText.string) ?? .null),
                    ("callback_secrets_loaded", .integer(Int64(state.secrets.count))),
                    ("authentication", .string(state.secrets.isRequired ? "required" : "off")),
                    ("config_file", config.schemaFile.map(JSONText.string) ?? .null),
                    ("metrics", .array(state.metrics.families.map { JSONText.string($0.name) })),
                    ("new_series_hold_seconds", .integer(config.newSeriesHold.nanoseconds / 1_000_000_000)),
                    ("label_hmac_key", .string(config.labelHMACKey == nil ? "unset" : "set")),
                    ("label_hmac_key_file", config.labelHMACKeyFile.map(JSONText.string) ?? .null),
                ])
            ),
            ("series", .object(state.metrics.countedFamilies.map { ($0.name, .integer(Int64($0.seriesCount))) })),
            ("callbacks", .object(state.metrics.outcomeCounts.map { ($0.outcome.rawValue, .integer(Int64($0.count))) })),
            ("recent_rejected", .array(recent.rejectedEntries.map(Self.json))),
            ("recent_accepted", .array(recent.acceptedEntries.map(Self.json))),
        ])
        return .json(.ok, document)
    }

    private static func json(_ entry: RecentCallbacks.Rejected) -> JSONText {
        .object([
            ("time", .string(JSONLogHandler.timestamp(unixSeconds: entry.time))),
            ("status", .integer(Int64(entry.status))),
            ("outcome", .string(entry.rejection.outcome.rawValue)),
            ("problems", .array(entry.rejection.problems.map(JSONText.string))),
            ("request_id", entry.requestID.map(JSONText.string) ?? .null),
            ("fields", .array(entry.rejection.fieldNames.map(JSONText.string))),
        ])
    }

    private static func json(_ entry: RecentCallbacks.Accepted) -> JSONText {
        .object([
            ("time", .string(JSONLogHandler.timestamp(unixSeconds: entry.time))),
            ("user", .string(entry.callback.user)),
            ("groups", .string(entry.callback.groups)),
            ("path", .string(entry.callback.path)),
            ("method", .string(entry.callback.method)),
            ("host", .string(entry.callback.host)),
            ("request_id", entry.requestID.map(JSONText.string) ?? .null),
        ])
    }
}
