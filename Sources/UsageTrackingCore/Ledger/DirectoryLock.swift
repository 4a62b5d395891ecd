import Glibc

/// One process per state directory: an exclusive `flock` on a file in it, held until `release`
/// or the process's end (the kernel drops it however the process dies), with the holder's pid,
/// host and start time written in the file, so the refusal can say who holds it.
final class DirectoryLock {
    private var fd: Int32

    /// The descriptor is a local until the lock is held: a class whose initializer throws still
    /// runs its deinit, which would close it a second time (and maybe another file's by then).
    init(directory: String, name: String) throws(LedgerError) {
        let path = directory.hasSuffix("/") ? directory + name : directory + "/" + name
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw .unusableDirectory(directory, "cannot write in it: \(String(cString: strerror(errno)))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let reason = errno
            var holder = [UInt8](repeating: 0, count: 512)
            let count = holder.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            close(fd)
            guard reason == EWOULDBLOCK else { throw .unusableDirectory(directory, "cannot lock \(path): \(String(cString: strerror(reason)))") }
            let text = String(decoding: holder.prefix(max(0, count)), as: UTF8.self).trimmingTrailingNewlines
            throw .locked(directory, text.isEmpty ? "holder unknown" : text)
        }
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let hostName = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let text = "pid \(getpid()) on \(hostName) since \(Self.utcNow())\n"
        guard ftruncate(fd, 0) == 0, pwrite(fd, text, text.utf8.count, 0) == text.utf8.count else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw .unusableDirectory(directory, "cannot write in it: \(reason)")
        }
        self.fd = fd
    }

    func release() {
        guard self.fd >= 0 else { return }
        close(self.fd)
        self.fd = -1
    }

    deinit { self.release() }

    private static func utcNow() -> String {
        var now = time(nil)
        var parts = tm()
        gmtime_r(&now, &parts)
        var text = [CChar](repeating: 0, count: 32)
        let count = strftime(&text, text.count, "%Y-%m-%dT%H:%M:%SZ", &parts)
        return String(decoding: text.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

extension String {
    fileprivate var trimmingTrailingNewlines: String {
        var text = Substring(self)
        while text.last == "\n" || text.last == "\r" { text = text.dropLast() }
        return String(text)
    }
}
