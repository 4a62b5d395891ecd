import Glibc
import Synchronization

/// The shared secrets a caller may present. Any one of them is valid, so a Secret can be rotated
/// by adding the new value before removing the old one.
///
/// Secrets come from a value (an environment variable) and from a file with one secret per line.
/// The file is re-read by `reloadIfChanged`, which a timer calls off the request path; a request
/// only takes a lock to read the current list.
public final class CallbackSecrets: Sendable {
    public enum LoadError: Error, CustomStringConvertible {
        case unreadable(path: String, errno: Int32)

        public var description: String {
            switch self {
            case .unreadable(let path, let code): "cannot read callback secret file \(path): \(String(cString: strerror(code)))"
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

    /// Fails when a file is named but cannot be read: starting without the secrets an operator
    /// configured would leave `/track` in a state they did not choose.
    public init(value: String?, filePath: String?) throws(LoadError) {
        self.filePath = filePath
        self.fixed = value.map { Self.parse($0) } ?? []
        var loaded: [[UInt8]] = []
        var version: FileVersion? = nil
        if let filePath {
            (loaded, version) = try Self.load(filePath)
        }
        self.state = Mutex((self.fixed + loaded, version))
    }

    /// Whether callers must authenticate: true as soon as any source of secrets is configured,
    /// even if the file is empty for now (then nobody is let in).
    public var isRequired: Bool { self.filePath != nil || !self.fixed.isEmpty }

    public var count: Int { self.state.withLock { $0.secrets.count } }

    /// Compares `presented` with every secret in constant time per secret, without stopping at
    /// the first match, so timing tells nothing about which secret or how many bytes matched.
    public func accepts(_ presented: some Sequence<UInt8>) -> Bool {
        let presented = Array(presented)
        let secrets = self.state.withLock { $0.secrets }
        var matched = false
        for secret in secrets {
            var difference = UInt64(secret.count ^ presented.count)
            for index in 0..<secret.count {
                difference |= UInt64(secret[index] ^ (index < presented.count ? presented[index] : 0))
            }
            matched = matched || difference == 0
        }
        return matched
    }

    public enum Reload: Equatable {
        case unchanged
        case reloaded(count: Int)
        case failed(String)
    }

    /// Re-reads the file if it changed. On failure the previous secrets stay in force.
    public func reloadIfChanged() -> Reload {
        guard let filePath else { return .unchanged }
        let current = self.state.withLock { $0.fileVersion }
        guard let version = Self.version(of: filePath) else {
            return .failed("cannot stat callback secret file \(filePath): \(String(cString: strerror(errno)))")
        }
        guard version != current else { return .unchanged }
        do {
            let (loaded, loadedVersion) = try Self.load(filePath)
            self.state.withLock { $0 = (self.fixed + loaded, loadedVersion) }
            return .reloaded(count: loaded.count)
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
