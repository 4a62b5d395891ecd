import Glibc

/// One `GET /usage` question: a user, a span of whole UTC hours, and the labels to break the
/// totals down by; and the answer's JSON, built from the ledger's rows.
///
/// The user is matched against each family's `user` label (hashed first where the family
/// hashes it, so a hashed user is asked for by name). Families without a `user` label are not
/// in the answer. A token family's types overlap (cached input is part of input), so it is
/// answered per type, never as one sum.
public struct UsageQuery: Sendable, Hashable {
    public var user: String
    /// Unix seconds, each the start of a UTC hour: buckets from `from` up to, not including, `to`.
    public var from: Int64
    public var to: Int64
    public var by: [String]

    /// The longest span one question may cover.
    public static let maxSpanSeconds: Int64 = 366 * 86_400

    /// Reads the query string (without `?`); `now` picks the default span, the current UTC
    /// month. Every problem is named.
    public static func parse(_ query: Substring, labelNames: Set<String>, maxUserBytes: Int, now: Int64) -> Result<UsageQuery, UsageQueryProblems> {
        var problems: [String] = []
        var seen: Set<String> = []
        var repeated: Set<String> = []
        for pair in query.split(separator: "&") {
            let name = pair.split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
            if !["user", "from", "to", "by"].contains(name) {
                problems.append("unknown parameter '\(name.truncated(toUTF8Bytes: ClientText.echoedBytes))'; use user, from, to, by")
            } else if !seen.insert(name).inserted, repeated.insert(name).inserted {
                // Which one counts would be a guess: `user=alice&user=bob` answers neither.
                problems.append("\(name): given more than once")
            }
        }
        let user = HTMLText.queryValue("user", in: query) ?? ""
        if user.isEmpty { problems.append("user is required: /usage?user=NAME") }
        if user.utf8.count > maxUserBytes { problems.append("user: \(user.utf8.count) bytes; the limit is \(maxUserBytes)") }
        let month = Self.monthStart(containing: now)
        var from = month.start
        var to = month.end
        if let text = HTMLText.queryValue("from", in: query) {
            if let time = Self.parseTime(text) { from = LedgerBatch.hour(of: time) } else { problems.append("from: not an RFC 3339 time such as 2026-12-01T00:00:00Z") }
        }
        if let text = HTMLText.queryValue("to", in: query) {
            if let time = Self.parseTime(text) { to = LedgerBatch.hour(of: time) } else { problems.append("to: not an RFC 3339 time such as 2027-01-01T00:00:00Z") }
        }
        if from >= to { problems.append("from must be before to (both are rounded down to the hour)") }
        if to - from > Self.maxSpanSeconds { problems.append("from and to may be at most 366 days apart") }
        var by: [String] = []
        if let text = HTMLText.queryValue("by", in: query), !text.isEmpty {
            for name in text.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
                if !labelNames.contains(name) {
                    problems.append("by: '\(name.truncated(toUTF8Bytes: ClientText.echoedBytes))' is not a label of any family; labels: \(labelNames.sorted().joined(separator: ", "))")
                } else if !by.contains(name) {
                    by.append(name)
                }
            }
        }
        guard problems.isEmpty else { return .failure(UsageQueryProblems(problems: problems)) }
        return .success(UsageQuery(user: user, from: from, to: to, by: by))
    }

    /// One family's rows for this user: each series' labels (the ledger's JSON text) and what
    /// it counted within the span.
    public struct FamilyRows: Sendable {
        public var family: CounterFamily
        /// The index of the family's token type label; nil for a request family.
        public var typeLabel: Int?
        public var rows: [(labels: String, amount: Int64)]

        public init(family: CounterFamily, typeLabel: Int?, rows: [(labels: String, amount: Int64)]) {
            self.family = family
            self.typeLabel = typeLabel
            self.rows = rows
        }
    }

    /// The answer: `{"user","from","to","families":{NAME:{"total"|"types", "by":[…]}}}`.
    public func answer(_ families: [FamilyRows]) -> JSONText {
        var members: [(String, JSONText)] = []
        for family in families {
            let names = family.family.labelNames
            let reader = LabelsJSON.Reader(names: names)
            let by = self.by.compactMap { names.firstIndex(of: $0) }
            var total: Int64 = 0
            var types: [String: Int64] = [:]
            var groups: [[String]: Int64] = [:]
            for row in family.rows {
                guard let values = reader.decode(row.labels) else { continue }
                var key = by.map { values[$0] }
                if let type = family.typeLabel {
                    types[values[type], default: 0] &+= row.amount
                    // Breakdowns of token counts stay per type: summing types double counts.
                    if !by.contains(type) { key.append(values[type]) }
                } else {
                    total &+= row.amount
                }
                groups[key, default: 0] &+= row.amount
            }
            var labels = by.map { names[$0] }
            if let type = family.typeLabel, !by.contains(type) { labels.append(names[type]) }
            var entry: [(String, JSONText)] = family.typeLabel == nil
                ? [("total", .integer(total))]
                : [("types", .object(types.keys.sorted().map { ($0, .integer(types[$0]!)) }))]
            if !self.by.isEmpty {
                let rows = groups.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key.lexicographicallyPrecedes($1.key) }
                entry.append(("by", .array(rows.map { key, amount in
                    .object([("labels", .object(zip(labels, key).map { ($0, .string($1)) })), ("total", .integer(amount))])
                })))
            }
            members.append((family.family.name, .object(entry)))
        }
        return .object([
            ("user", .string(self.user)), ("from", .string(rfc3339(unixSeconds: self.from))), ("to", .string(rfc3339(unixSeconds: self.to))),
            ("families", .object(members)),
        ])
    }

    // MARK: time

    /// The UTC month holding `time`: its first second and the next month's.
    static func monthStart(containing time: Int64) -> (start: Int64, end: Int64) {
        var seconds = time_t(time)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        parts.tm_mday = 1
        parts.tm_hour = 0
        parts.tm_min = 0
        parts.tm_sec = 0
        let start = Int64(timegm(&parts))
        parts.tm_mon += 1
        return (start, Int64(timegm(&parts)))
    }

    /// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, as Unix seconds (the fraction dropped).
    static func parseTime(_ text: String) -> Int64? {
        let bytes = Array(text.utf8)
        func number(_ start: Int, _ count: Int) -> Int32? {
            guard start + count <= bytes.count else { return nil }
            var value: Int32 = 0
            for byte in bytes[start..<start + count] {
                guard (0x30...0x39).contains(byte) else { return nil }
                value = value * 10 + Int32(byte - 0x30)
            }
            return value
        }
        guard bytes.count >= 20, bytes[4] == 0x2D, bytes[7] == 0x2D, [0x54, 0x74, 0x20].contains(bytes[10]), bytes[13] == 0x3A, bytes[16] == 0x3A,
            let year = number(0, 4), let month = number(5, 2), let day = number(8, 2),
            let hour = number(11, 2), let minute = number(14, 2), let second = number(17, 2),
            (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61
        else { return nil }
        var index = 19
        if bytes[index] == 0x2E {
            index += 1
            let digits = index
            while index < bytes.count, (0x30...0x39).contains(bytes[index]) { index += 1 }
            guard index > digits else { return nil }
        }
        guard index < bytes.count else { return nil }
        var offset: Int64 = 0
        switch bytes[index] {
        case 0x5A, 0x7A: guard index + 1 == bytes.count else { return nil }
        case 0x2B, 0x2D:
            guard index + 6 == bytes.count, bytes[index + 3] == 0x3A, let hours = number(index + 1, 2), let minutes = number(index + 4, 2),
                hours < 24, minutes < 60
            else { return nil }
            offset = Int64(hours) * 3600 + Int64(minutes) * 60
            if bytes[index] == 0x2D { offset = -offset }
        default: return nil
        }
        var parts = tm()
        parts.tm_year = year - 1900
        parts.tm_mon = month - 1
        parts.tm_mday = day
        parts.tm_hour = hour
        parts.tm_min = minute
        parts.tm_sec = min(second, 59)
        let seconds = Int64(timegm(&parts))
        // timegm normalises 31 April to 1 May: a date that changed was not a date.
        var check = time_t(seconds)
        var back = tm()
        gmtime_r(&check, &back)
        guard back.tm_mday == day, back.tm_mon == month - 1 else { return nil }
        return seconds - offset
    }

}

/// Why a `/usage` question cannot be answered, every reason at once.
public struct UsageQueryProblems: Error, Equatable {
    public var problems: [String]
}
