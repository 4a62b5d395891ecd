import Foundation
import TestSupport

/// HTTP/1.1 over a plain loopback socket, so tests control every byte sent and see every byte
/// received.
enum RawHTTP {
    static func post(_ path: String, _ body: String, headers: [String] = []) -> String {
        "POST \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers.map { $0 + "\r\n" }.joined()
            + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body
    }

    static func get(_ path: String, headers: [String] = []) -> String {
        "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers.map { $0 + "\r\n" }.joined() + "Connection: close\r\n\r\n"
    }

    /// Sends one request (which should ask for `Connection: close`) and reads to end of stream.
    static func exchange(port: Int, _ request: String) throws -> ParsedResponse {
        let connection = try Connection(port: port)
        defer { connection.close() }
        try connection.write(request)
        guard let response = ParsedResponse.parseAll(try connection.readToEnd()).first else {
            throw E2EError("no response to \(request.prefix(40))")
        }
        return response
    }

    static func loopback(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return address
    }

    final class Connection {
        let fd: Int32

        init(port: Int) throws {
            self.fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var timeout = timeval(tv_sec: 15, tv_usec: 0)
            setsockopt(self.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var address = RawHTTP.loopback(port: port)
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(self.fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard connected == 0 else {
                Glibc.close(self.fd)
                throw E2EError("cannot connect to 127.0.0.1:\(port)")
            }
        }

        func write(_ text: String) throws {
            let bytes = Array(text.utf8)
            var offset = 0
            while offset < bytes.count {
                let sent = bytes[offset...].withUnsafeBytes { send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                guard sent > 0 else { throw E2EError("send failed") }
                offset += sent
            }
        }

        /// Reads until the peer closes (or the 15 s receive timeout passes).
        func readToEnd() throws -> [UInt8] {
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = chunk.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
                if count > 0 {
                    bytes += chunk[0..<count]
                } else if count == 0 {
                    return bytes
                } else {
                    throw E2EError("receive failed or timed out after \(bytes.count) bytes")
                }
            }
        }

        func close() { Glibc.close(self.fd) }
    }
}
