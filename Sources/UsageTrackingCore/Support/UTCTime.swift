import Glibc

/// RFC 3339 in UTC, as logs, the debug view and `/usage` write times: `2026-12-01T00:00:00Z`,
/// with `.mmm` before the `Z` when milliseconds are given.
public func rfc3339(unixSeconds: Int64, milliseconds: Int32? = nil) -> String {
    var seconds = time_t(unixSeconds)
    var parts = tm()
    gmtime_r(&seconds, &parts)
    func pad(_ value: Int32, _ width: Int) -> String {
        let digits = String(value)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
    return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
        + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2))"
        + (milliseconds.map { "." + pad($0, 3) } ?? "") + "Z"
}
