import PostgresNIO

/// Where the shared ledger is: `postgres://USER@HOST:PORT/DATABASE[?sslmode=MODE]` (`--ledger-url`).
/// The password is never part of it (it comes from `--ledger-password-file`), so the URL can be
/// logged and shown as it is.
public struct PostgresAddress: Sendable, Equatable, CustomStringConvertible {
    /// libpq's names and meanings: `prefer` and `require` encrypt without checking the server's
    /// certificate, `verify-full` checks it against the system's roots and the host name.
    public enum TLSMode: String, Sendable, CaseIterable {
        case disable, prefer, require
        case verifyFull = "verify-full"
    }

    public var user: String
    public var host: String
    public var port: Int
    public var database: String
    public var tls: TLSMode

    init(user: String, host: String, port: Int, database: String, tls: TLSMode) {
        (self.user, self.host, self.port, self.database, self.tls) = (user, host, port, database, tls)
    }

    /// Parses `url`; the error says what is wrong with it without repeating a password.
    public init(url: String) throws(AddressError) {
        let schemes = ["postgres://", "postgresql://"]
        guard let scheme = schemes.first(where: { url.hasPrefix($0) }) else {
            throw AddressError("must start with postgres://")
        }
        var rest = Substring(url.dropFirst(scheme.count))
        var query = Substring()
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        guard let at = rest.lastIndex(of: "@") else { throw AddressError("names no user (postgres://USER@HOST:PORT/DATABASE)") }
        let user = rest[..<at]
        guard !user.contains(":") else {
            throw AddressError("holds a password; give it in --ledger-password-file (USAGE_TRACKING_LEDGER_PASSWORD_FILE) instead")
        }
        guard !user.isEmpty else { throw AddressError("names no user (postgres://USER@HOST:PORT/DATABASE)") }
        let location = rest[rest.index(after: at)...]
        guard let slash = location.firstIndex(of: "/") else { throw AddressError("names no database (postgres://USER@HOST:PORT/DATABASE)") }
        let database = location[location.index(after: slash)...]
        guard !database.isEmpty, !database.contains("/") else { throw AddressError("names no database (postgres://USER@HOST:PORT/DATABASE)") }
        var hostPort = location[..<slash]
        var port = 5432
        if let colon = hostPort.lastIndex(of: ":"), !hostPort.hasSuffix("]") {
            guard let number = Int(hostPort[hostPort.index(after: colon)...]), (1...65535).contains(number) else {
                throw AddressError("has a port that is not a number from 1 to 65535")
            }
            port = number
            hostPort = hostPort[..<colon]
        }
        if hostPort.hasPrefix("["), hostPort.hasSuffix("]") { hostPort = hostPort.dropFirst().dropLast() }
        guard !hostPort.isEmpty else { throw AddressError("names no host") }
        var tls = TLSMode.prefer
        for parameter in query.split(separator: "&") {
            let pair = parameter.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2, pair[0] == "sslmode" else {
                throw AddressError("has a parameter other than sslmode: \(pair[0].prefix(40))")
            }
            guard let mode = TLSMode(rawValue: pair[1]) else {
                throw AddressError("sslmode must be one of \(TLSMode.allCases.map(\.rawValue).joined(separator: ", ")), got '\(pair[1].prefix(40))'")
            }
            tls = mode
        }
        self.user = String(user)
        self.host = String(hostPort)
        self.port = port
        self.database = String(database)
        self.tls = tls
    }

    public var description: String {
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return "postgres://\(self.user)@\(host):\(self.port)/\(self.database)" + (self.tls == .prefer ? "" : "?sslmode=\(self.tls.rawValue)")
    }

    /// The TLS client settings `sslmode` asks for; nil for `disable`.
    private var tlsConfiguration: TLSConfiguration? {
        guard self.tls != .disable else { return nil }
        var configuration = TLSConfiguration.makeClientConfiguration()
        if self.tls != .verifyFull { configuration.certificateVerification = .none }
        return configuration
    }

    func connectionConfiguration(password: String) throws -> PostgresConnection.Configuration {
        var tls = PostgresConnection.Configuration.TLS.disable
        if let settings = self.tlsConfiguration {
            let context = try NIOSSLContext(configuration: settings)
            tls = self.tls == .prefer ? .prefer(context) : .require(context)
        }
        var configuration = PostgresConnection.Configuration(
            host: self.host, port: self.port, username: self.user, password: password, database: self.database, tls: tls
        )
        configuration.options.connectTimeout = .seconds(3)
        return configuration
    }

    func clientConfiguration(password: String) -> PostgresClient.Configuration {
        var tls = PostgresClient.Configuration.TLS.disable
        if let settings = self.tlsConfiguration { tls = self.tls == .prefer ? .prefer(settings) : .require(settings) }
        var configuration = PostgresClient.Configuration(
            host: self.host, port: self.port, username: self.user, password: password, database: self.database, tls: tls
        )
        configuration.options.connectTimeout = .seconds(3)
        // Reads for /usage only: the writer has a connection of its own.
        configuration.options.maximumConnections = 4
        // The server ends a read that runs long itself, so a connection is never held by one.
        configuration.options.additionalStartupParameters = [("statement_timeout", "2000")]
        return configuration
    }
}

/// What is wrong with a `--ledger-url`.
public struct AddressError: Error, CustomStringConvertible, Equatable {
    public var description: String
    init(_ description: String) { self.description = description }
}
