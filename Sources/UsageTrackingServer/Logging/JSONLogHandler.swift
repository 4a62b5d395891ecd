import Glibc
import Logging
import UsageTrackingCore

/// Formats one JSON object per line for standard output (through `LogLineWriter`): `time`, `level`, `msg`, then metadata.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    private let output: @Sendable (String) -> Void

    public init(level: Logger.Level, output: @escaping @Sendable (String) -> Void = LogLineWriter.standardOutput.write) {
        self.logLevel = level
        self.output = output
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var members: [(String, JSONText)] = [
            ("time", .string(Self.timestamp())),
            ("level", .string(event.level.rawValue)),
            ("msg", .string(event.message.description)),
        ]
        let merged = self.metadata.merging(event.metadata ?? [:]) { $1 }
        for key in merged.keys.sorted() {
            members.append((key, Self.json(merged[key]!)))
        }
        self.output(JSONText.object(members).serialized)
    }

    private static func json(_ value: Logger.Metadata.Value) -> JSONText {
        switch value {
        case .string(let text): .string(text)
        case .stringConvertible(let value): .string(value.description)
        case .array(let items): .array(items.map(json))
        case .dictionary(let entries): .object(entries.keys.sorted().map { ($0, json(entries[$0]!)) })
        }
    }

    /// RFC 3339 UTC with milliseconds; also used for the debug view's times.
    static func timestamp(unixSeconds: Double = wallClock()) -> String {
        let seconds = unixSeconds.rounded(.down)
        return rfc3339(unixSeconds: Int64(seconds), milliseconds: Int32((unixSeconds - seconds) * 1000))
    }
}

/// Seconds since the Unix epoch, for timestamps people read.
func wallClock() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}
