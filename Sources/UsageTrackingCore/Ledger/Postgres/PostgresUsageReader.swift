import Logging
import PostgresNIO

/// Reads what one user used from the shared ledger, across every replica, for `GET /usage`:
/// a small pool of its own (`PostgresClient`, run until `shutdown`), so reads never wait
/// behind the writer's commits nor hold its connection.
public final class PostgresUsageReader: Sendable {
    private let client: PostgresClient
    private let running: Task<Void, Never>
    private let logger: Logger

    public init(address: PostgresAddress, password: String, logger: Logger) {
        let client = PostgresClient(configuration: address.clientConfiguration(password: password), backgroundLogger: logger)
        self.client = client
        self.logger = logger
        self.running = Task { await client.run() }
    }

    /// A question not answered within this fails (503): a quota check must not wait on a
    /// database that is down, and the pool would wait for one to connect.
    public static let timeout: Duration = .seconds(2)

    /// The rows of `families` whose `user` label is `users[i]` (nil: the family has none),
    /// summed per series over `query`'s span; at most `timeout`.
    public func rows(
        _ query: UsageQuery, families: [CounterFamily], users: [String?], typeLabels: [Int?]
    ) async throws -> [UsageQuery.FamilyRows] {
        try await withThrowingTaskGroup(of: [UsageQuery.FamilyRows].self) { group in
            group.addTask { try await self.read(query, families: families, users: users, typeLabels: typeLabels) }
            group.addTask {
                try await Task.sleep(for: Self.timeout)
                throw UsageReadTimeout()
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }

    private func read(
        _ query: UsageQuery, families: [CounterFamily], users: [String?], typeLabels: [Int?]
    ) async throws -> [UsageQuery.FamilyRows] {
        var names: [String] = []
        var labelLists: [String] = []
        var values: [String] = []
        var asked: [Int] = []
        for (index, family) in families.enumerated() {
            guard let user = users[index], !user.utf8.contains(0) else { continue }
            names.append(family.name)
            labelLists.append(JSONText.array(family.labelNames.map { .string($0) }).serialized)
            values.append(user)
            asked.append(index)
        }
        var byName: [String: [(labels: String, amount: Int64)]] = [:]
        if !names.isEmpty {
            let rows = try await self.client.query(
                """
                SELECT w.name, s.labels, sum(h.amount)::int8
                FROM unnest(\(names)::text[], \(labelLists)::text[], \(values)::text[]) AS w (name, labels, user_label)
                JOIN metric m ON m.name = w.name AND m.labels = w.labels
                JOIN series s ON s.user_label = w.user_label AND s.metric_id = m.id
                JOIN usage_hourly h ON h.instance = s.instance AND h.series_id = s.id
                WHERE h.hour >= to_timestamp(\(query.from)) AND h.hour < to_timestamp(\(query.to))
                GROUP BY w.name, s.labels
                """, logger: self.logger
            )
            for try await (name, labels, amount) in rows.decode((String, String, Int64).self) {
                byName[name, default: []].append((labels, amount))
            }
        }
        return asked.map { index in
            UsageQuery.FamilyRows(family: families[index], typeLabel: typeLabels[index], rows: byName[families[index].name] ?? [])
        }
    }

    public func shutdown() async {
        self.running.cancel()
        await self.running.value
    }
}

/// The shared ledger gave no answer within `PostgresUsageReader.timeout`.
struct UsageReadTimeout: Error, CustomStringConvertible {
    var description: String { "no answer within \(PostgresUsageReader.timeout.components.seconds) s" }
}
