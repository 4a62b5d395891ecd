import Foundation
import TestSupport
import Synchronization
import Testing

/// Thrown when a helper gives up; the message says what to do about it.
struct E2EError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The `usage-tracking` binary built next to this test bundle.
func builtBinary() throws -> String {
    let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
    var directory = URL(fileURLWithPath: exe).deletingLastPathComponent()
    // The bundle may be a directory (`*.xctest/...`) or a file beside the binary.
    while !FileManager.default.isExecutableFile(atPath: directory.appendingPathComponent("usage-tracking").path) {
        guard directory.path != "/" else { throw E2EError("usage-tracking binary not found beside \(exe); run `swift build` first") }
        directory = directory.deletingLastPathComponent()
    }
    return directory.appendingPathComponent("usage-tracking").path
}

/// A program the test started, with its output kept line by line. Stopped (by its own PID)
/// when the test is done with it.
final class RunningProcess: Sendable {
    let process: Process
    private let output = Mutex<[String]>([])
    private let pending = Mutex("")
    /// Set when the output reached end of file: nothing more will arrive.
    private let finished = Mutex(false)

    init(_ path: String, _ arguments: [String], environment: [String: String] = [:]) throws {
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw E2EError("\(path) is not installed; the README test command installs it")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.environment = environment.merging(["PATH": "/usr/bin:/bin"]) { a, _ in a }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        self.process = process
        try process.run()
        // A plain thread doing blocking reads until end of file: simpler and sturdier on Linux
        // than a readability handler.
        let reader = pipe.fileHandleForReading
        Thread.detachNewThread { [self] in
            while true {
                let data = reader.availableData
                guard !data.isEmpty else { break }
                self.append(String(decoding: data, as: UTF8.self))
            }
            self.append("\n")
            self.finished.withLock { $0 = true }
        }
    }

    private func append(_ chunk: String) {
        let lines = self.pending.withLock { pending -> [String] in
            pending += chunk
            var parts = pending.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            pending = parts.removeLast()
            return parts
        }
        self.output.withLock { $0 += lines.filter { !$0.isEmpty } }
    }

    var lines: [String] { self.output.withLock { $0 } }

    /// Waits until a line contains `fragment` and returns it.
    func waitForLine(containing fragment: String, seconds: Double = 20) throws -> String {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let line = self.lines.first(where: { $0.contains(fragment) }) { return line }
            guard !self.finished.withLock({ $0 }) else { break }
            Thread.sleep(forTimeInterval: 0.02)
        }
        throw E2EError("no output line containing \(fragment) within \(seconds) s; output so far:\n\(self.lines.joined(separator: "\n"))")
    }

    func signal(_ number: Int32) { kill(self.process.processIdentifier, number) }

    /// Waits for exit and returns the status; kills the process if it does not exit in time.
    @discardableResult
    func waitForExit(seconds: Double = 20) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while self.process.isRunning || !self.finished.withLock({ $0 }), Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        guard !self.process.isRunning else {
            self.signal(SIGKILL)
            self.process.waitUntilExit()
            return nil
        }
        return self.process.terminationStatus
    }

    func stop() {
        if self.process.isRunning { self.signal(SIGTERM) }
        self.waitForExit(seconds: 10)
    }
}

/// A `usage-tracking` process listening on a port the OS chose, found from its log.
final class ServiceUnderTest: Sendable {
    let process: RunningProcess
    let port: Int

    init(_ arguments: [String] = [], environment: [String: String] = [:]) throws {
        self.process = try RunningProcess(try builtBinary(), ["--host", "127.0.0.1", "--port", "0"] + arguments, environment: environment)
        let line = try self.process.waitForLine(containing: #""msg":"listening""#)
        guard let match = line.firstMatch(of: /:(\d+)","version"/), let port = Int(match.1) else {
            throw E2EError("no port in \(line)")
        }
        self.port = port
    }

    func send(_ request: String) throws -> ParsedResponse {
        try RawHTTP.exchange(port: self.port, request)
    }

    func track(_ body: String, headers: [String] = []) throws -> ParsedResponse {
        try self.send(RawHTTP.post("/track", body, headers: ["Content-Type: application/json"] + headers))
    }
}

/// Runs a command to completion with `input` on standard input; returns status and output.
func run(_ path: String, _ arguments: [String], input: [UInt8] = []) throws -> (status: Int32, output: String) {
    guard FileManager.default.isExecutableFile(atPath: path) else {
        throw E2EError("\(path) is not installed; the README test command installs it")
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let stdin = Pipe()
    let stdout = Pipe()
    process.standardInput = stdin
    process.standardOutput = stdout
    process.standardError = stdout
    try process.run()
    let writer = Thread {
        stdin.fileHandleForWriting.write(Data(input))
        try? stdin.fileHandleForWriting.close()
    }
    writer.start()
    let output = stdout.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: output, as: UTF8.self))
}
