import Glibc

/// A whole small file as text, or nil when it cannot be read. Reads until end of file rather than
/// trusting the reported size, which is 0 for /proc files.
func readWholeFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var contents: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return count == 0 ? String(decoding: contents, as: UTF8.self) : nil }
        contents.append(contentsOf: chunk[0..<count])
    }
}
