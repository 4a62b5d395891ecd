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
        var seconds = Int(unixSeconds.rounded(.down))
        let milliseconds = Int32((unixSeconds - Double(seconds)) * 1000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int) -> String {
            let digits = String(value)
            return String(repeating: "0", count: max(0, width - digits.count)) + digits
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(milliseconds, 3))Z"
    }
}

/// Seconds since the Unix epoch, for timestamps people read.
func wallClock() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}
