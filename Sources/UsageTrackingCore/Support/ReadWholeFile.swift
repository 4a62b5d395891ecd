import Glibc

/// A whole small file as text, or nil when it cannot be read. Reads until end of file rather than
/// trusting the reported size, which is 0 for /proc files.
func readWholeFile(_ path: String) -> String? {
    guard case .success(let bytes) = readFileBytes(path, limit: .max - 1) else { return nil }
    return String(decoding: bytes, as: UTF8.self)
}

/// A file's bytes, at most `limit` + 1 of them (so the caller can tell it is too large), or the
/// system's reason it cannot be read.
public func readFileBytes(_ path: String, limit: Int) -> Result<[UInt8], FileReadError> {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return .failure(FileReadError(code: errno)) }
    defer { close(fd) }
    var contents: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while contents.count <= limit {
        let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return count == 0 ? .success(contents) : .failure(FileReadError(code: errno)) }
        contents.append(contentsOf: chunk[0..<count])
    }
    return .success(contents)
}

public struct FileReadError: Error, CustomStringConvertible {
    public var code: Int32
    public var description: String { String(cString: strerror(self.code)) }
}
