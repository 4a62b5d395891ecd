import Glibc
import Synchronization

/// The shared secrets a caller may present. Any one of them is valid, so a Secret can be rotated
/// by adding the new value before removing the old one.
///
/// Secrets come from a value (an environment variable) and from a file with one secret per line.
/// The file is re-read by `reloadIfChanged`, which a timer calls off the request path; a request
/// only takes a lock to read the current list.
public final class CallbackSecrets: Sendable {
    public enum LoadError: Error, Equatable, CustomStringConvertible {
        case unreadable(path: String, errno: Int32)
        /// The value was given but is empty or only whitespace.
        case blankValue
        /// The file was read at startup but holds no secret (empty or only whitespace).
        case blankFile(path: String)

        public var description: String {
            switch self {
            case .unreadable(let path, let code): "cannot read callback secret file \(path): \(String(cString: strerror(code)))"
            case .blankValue: "USAGE_TRACKING_CALLBACK_SECRET is set but holds no secret"
            case .blankFile(let path): "callback secret file \(path) holds no secret"
            }
        }
    }

    public let filePath: String?
    private let fixed: [[UInt8]]
    private let state: Mutex<(secrets: [[UInt8]], fileVersion: FileVersion?)>

    /// What identifies one content of the file: Kubernetes replaces a mounted Secret by swapping a
    /// symlink, which changes the inode; an edit in place changes the size or modification time.
    struct FileVersion: Equatable {
        var device: UInt64, inode: UInt64, size: Int64, modified: Int, modifiedNanoseconds: Int
    }

    /// Fails when a source is configured but yields no secret: a file that cannot be read, or a
    /// value or file that is empty or only whitespace. Starting without the secrets an operator
    /// meant to configure would leave `/track` in a state they did not choose (a blank value used
    /// to turn authentication off). `value` is whatever the variable holds when it is set, even
    /// empty; `nil` only when it is unset.
    public init(value: String?, filePath: String?) throws(LoadError) {
        self.filePath = filePath
        self.fixed = value.map { Self.parse($0) } ?? []
        if value != nil, self.fixed.isEmpty { throw .blankValue }
        var loaded: [[UInt8]] = []
        var version: FileVersion? = nil
        if let filePath {
            (loaded, version) = try Self.load(filePath)
            if loaded.isEmpty { throw .blankFile(path: filePath) }
        }
        self.isRequired = value != nil || filePath != nil
        self.state = Mutex((self.fixed + loaded, version))
    }

    /// Whether callers must authenticate: true as soon as any source of secrets is configured,
    /// and it stays true if the file is emptied later (then only the value's secret, if any,
    /// lets anyone in). Fixed at startup so that nothing at runtime can turn it off.
    public let isRequired: Bool

    public var count: Int { self.state.withLock { $0.secrets.count } }

    public func accepts(_ presented: some Sequence<UInt8>) -> Bool {
        self.matchingSecret(presented) != nil
    }

    /// The position (0-based) of the secret `presented` equals, or `nil`: the value's secrets
    /// come first, then the file's lines in order. Never the secret itself, so a status page can
    /// show which one callers use during a rotation.
    ///
    /// Compares `presented` with every secret in constant time per secret, without stopping at
    /// the first match, so timing tells nothing about which secret or how many bytes matched.
    public func matchingSecret(_ presented: some Sequence<UInt8>) -> Int? {
        let presented = Array(presented)
        let secrets = self.state.withLock { $0.secrets }
        var matched = -1
        for (position, secret) in secrets.enumerated() {
            var difference = UInt64(secret.count ^ presented.count)
            for index in 0..<secret.count {
                difference |= UInt64(secret[index] ^ (index < presented.count ? presented[index] : 0))
            }
            // A select, not an early exit: every secret is still compared in full.
            matched = difference == 0 && matched < 0 ? position : matched
        }
        return matched < 0 ? nil : matched
    }

    public enum Reload: Equatable {
        case unchanged
        case reloaded(count: Int)
        /// The file changed and now holds no secret. Authentication stays required: only the
        /// value's secrets (if any) are accepted, so without one every callback is refused until
        /// the file holds a secret again. Worth a warning: callbacks are being refused.
        case emptied
        case failed(String)
    }

    /// Re-reads the file if it changed, or in any case with `force` (SIGHUP). On failure the
    /// previous secrets stay in force; an emptied file is not a failure, since the operator may
    /// mean to revoke every secret.
    public func reloadIfChanged(force: Bool = false) -> Reload {
        guard let filePath else { return .unchanged }
        let current = self.state.withLock { $0.fileVersion }
        guard let version = Self.version(of: filePath) else {
            return .failed("cannot stat callback secret file \(filePath): \(String(cString: strerror(errno)))")
        }
        guard force || version != current else { return .unchanged }
        do {
            let (loaded, loadedVersion) = try Self.load(filePath)
            self.state.withLock { $0 = (self.fixed + loaded, loadedVersion) }
            return loaded.isEmpty ? .emptied : .reloaded(count: loaded.count)
        } catch {
            return .failed(error.description)
        }
    }

    private static func parse(_ text: String) -> [[UInt8]] {
        text.split(whereSeparator: \.isNewline).map { $0.trimmingASCIISpaces() }.filter { !$0.isEmpty }.map { Array($0.utf8) }
    }

    private static func load(_ path: String) throws(LoadError) -> ([[UInt8]], FileVersion?) {
        let version = Self.version(of: path)
        guard let text = readWholeFile(path) else { throw .unreadable(path: path, errno: errno) }
        return (Self.parse(text), version)
    }

    private static func version(of path: String) -> FileVersion? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return FileVersion(
            device: UInt64(info.st_dev), inode: UInt64(info.st_ino), size: Int64(info.st_size),
            modified: info.st_mtim.tv_sec, modifiedNanoseconds: info.st_mtim.tv_nsec
        )
    }
}
