import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// `GET /debug`: the status page's facts as JSON for `kubectl port-forward` and `jq`, or the
/// page itself (`StatusPageEndpoint`) for a client that prefers `text/html`, a browser.
/// Secrets appear only as set/unset and by position; rejected callbacks show field names, never
/// bodies. `?user=NAME` adds that user's series and recent callbacks.
enum DebugEndpoint {
    static func reply(_ head: RequestHead, state: ServerState) -> HTTPResponse {
        if StatusPageEndpoint.prefersHTML(head) {
            var reply = StatusPageEndpoint.reply(head, state: state)
            reply.headers.append(("vary", "accept"))
            return reply
        }
        guard let report = StatusReport.gather(state: state, user: StatusReport.requestedUser(head.uri)) else {
            return .error(.notFound, "not found", ["/debug is turned off (--no-debug)"])
        }
        return .json(.ok, Self.json(report), headers: [("vary", "accept"), ("cache-control", "no-store")])
    }

    static func json(_ report: StatusReport) -> JSONText {
        var members: [(String, JSONText)] = [
            ("version", .string(UsageMetrics.version)),
            ("uptime_seconds", .number((report.uptimeSeconds * 1000).rounded() / 1000)),
            ("configuration", .object(report.configuration)),
            ("series", .object(report.series.map { ($0.name, .integer(Int64($0.count))) })),
            ("callbacks", .object(report.outcomes.map { ($0.outcome.rawValue, .integer(Int64($0.count))) })),
            ("token_streams", .object(report.tokenStreams.map { ($0.outcome.rawValue, .integer(Int64($0.count))) })),
            ("recent_rejected", .array(report.recentRejected.map(Self.json))),
            ("recent_accepted", .array(report.recentAccepted.map(Self.json))),
            ("host_name", .string(report.hostName)),
            ("started_at", .string(JSONLogHandler.timestamp(unixSeconds: report.startedAt))),
            (
                "rates",
                .object(report.rates.map { rate in
                    (rate.kind.name, .object([("last_1m", .number(Self.rounded(rate.lastMinute))), ("last_5m", .number(Self.rounded(rate.lastFiveMinutes)))]))
                })
            ),
            (
                "per_second",
                .object(
                    [("seconds", .integer(Int64(CallbackRates.window)))]
                        + report.rates.map { ($0.kind.name, .array($0.perSecond.map { .integer(Int64($0)) })) }
                )
            ),
            ("top", Self.json(report.rankings, budgets: report.budgets)),
            ("last_scrape", report.lastScrape.map(Self.json) ?? .null),
            (
                "secrets",
                .object([
                    (
                        "last_reload",
                        report.lastReload.map {
                            .object([("time", .string(JSONLogHandler.timestamp(unixSeconds: $0.time))), ("result", .string($0.result))])
                        } ?? .null
                    ),
                    (
                        "last_match",
                        report.lastSecretMatch.map {
                            .object([("position", .integer(Int64($0.position))), ("time", .string(JSONLogHandler.timestamp(unixSeconds: $0.time)))])
                        } ?? .null
                    ),
                ])
            ),
        ]
        if let user = report.user {
            members.append(("user", Self.json(user, labelNames: report.labelNames)))
        }
        return .object(members)
    }

    private static func rounded(_ value: Double) -> Double { (value * 1000).rounded() / 1000 }

    private static func json(_ rankings: StatusTracking.Rankings, budgets: [String: [(held: Int, limit: Int?)]]) -> JSONText {
        .object(
            [("computed_at", .string(JSONLogHandler.timestamp(unixSeconds: rankings.computedAt)))]
                + rankings.families.map { family in
                    (
                        family.name,
                        .object(family.labels.enumerated().map { index, ranking in
                            var members: [(String, JSONText)] = [
                                ("distinct", .integer(Int64(ranking.distinctValues))),
                                ("top", .array(ranking.top.map { .object([("value", .string($0.value)), ("count", .integer(Int64($0.count)))]) })),
                            ]
                            if let budget = budgets[family.name]?[index], let limit = budget.limit {
                                members.append(("budget", .object([("held", .integer(Int64(budget.held))), ("limit", .integer(Int64(limit)))])))
                            }
                            return (ranking.labelName, .object(members))
                        })
                    )
                }
        )
    }

    private static func json(_ scrape: StatusEvents.Scrape) -> JSONText {
        .object([
            ("time", .string(JSONLogHandler.timestamp(unixSeconds: scrape.time))),
            ("from", scrape.from.map(JSONText.string) ?? .null),
            ("render_seconds", .number((scrape.renderSeconds * 1e6).rounded() / 1e6)),
        ])
    }

    private static func json(_ user: StatusReport.UserView, labelNames: [String]) -> JSONText {
        .object([
            ("name", .string(user.name)),
            ("series_count", .integer(Int64(user.seriesCount))),
            ("total", .integer(Int64(user.total))),
            (
                "series",
                .array(user.series.map { series in
                    .object([
                        ("labels", .object(zip(labelNames, series.labels).map { ($0, .string($1)) })),
                        ("value", .integer(Int64(series.value))),
                    ])
                })
            ),
            ("recent_accepted", .array(user.recentAccepted.map(Self.json))),
        ])
    }

    private static func json(_ entry: RecentCallbacks.Rejected) -> JSONText {
        .object([
            ("time", .string(JSONLogHandler.timestamp(unixSeconds: entry.time))),
            ("status", .integer(Int64(entry.status))),
            ("outcome", .string(entry.rejection.outcome.rawValue)),
            ("problems", .array(entry.rejection.problems.map(JSONText.string))),
            ("request_id", entry.requestID.map(JSONText.string) ?? .null),
            ("fields", .array(entry.rejection.fieldNames.map(JSONText.string))),
            ("sender", entry.sender.map(JSONText.string) ?? .null),
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
            ("sender", entry.sender.map(JSONText.string) ?? .null),
        ])
    }
}

extension CallbackRates.Kind {
    var name: String {
        switch self {
        case .accepted: "accepted"
        case .refused: "refused"
        }
    }
}
