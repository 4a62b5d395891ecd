import Foundation
import Testing

@testable import UsageTrackingCore

@Suite struct CallbackSecretsTests {
    func temporaryFile(_ contents: String) throws -> String {
        let path = NSTemporaryDirectory() + "secrets-\(UUID().uuidString)"
        try contents.write(toFile: path, atomically: false, encoding: .utf8)
        return path
    }

    @Test func noSourceMeansOpen() throws {
        let secrets = try CallbackSecrets(value: nil, filePath: nil)
        #expect(!secrets.isRequired)
        #expect(!secrets.accepts("anything".utf8))
    }

    @Test func anyConfiguredSecretIsAccepted() throws {
        let path = try temporaryFile("first\n\n  second  \n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let secrets = try CallbackSecrets(value: "from-env", filePath: path)
        #expect(secrets.isRequired)
        #expect(secrets.count == 3)
        for good in ["first", "second", "from-env"] { #expect(secrets.accepts(good.utf8)) }
        for bad in ["", "firs", "first ", "firstfirst", "FIRST"] { #expect(!secrets.accepts(bad.utf8)) }
    }

    @Test func rotationIsPickedUpAndFailureKeepsThePreviousSecrets() throws {
        let path = try temporaryFile("old\n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let secrets = try CallbackSecrets(value: nil, filePath: path)
        #expect(secrets.reloadIfChanged() == .unchanged)
        try "old\nnew\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(secrets.reloadIfChanged() == .reloaded(count: 2))
        #expect(secrets.accepts("new".utf8) && secrets.accepts("old".utf8))
        try "new\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(secrets.reloadIfChanged() == .reloaded(count: 1))
        #expect(!secrets.accepts("old".utf8))
        try FileManager.default.removeItem(atPath: path)
        guard case .failed(let reason) = secrets.reloadIfChanged() else {
            Issue.record("a missing file must be reported")
            return
        }
        #expect(reason.hasPrefix("cannot stat callback secret file \(path)"))
        #expect(secrets.accepts("new".utf8))
    }

    /// A blank value used to leave `isRequired` false: authentication silently off.
    @Test(arguments: ["", " ", "  \t ", "\n", " \r\n\t\n "])
    func blankValueFailsAtStart(value: String) {
        #expect(throws: CallbackSecrets.LoadError.blankValue) { try CallbackSecrets(value: value, filePath: nil) }
        #expect(CallbackSecrets.LoadError.blankValue.description == "USAGE_TRACKING_CALLBACK_SECRET is set but holds no secret")
    }

    @Test(arguments: ["", "\n", "  \n\t\n \r\n"])
    func fileWithoutASecretFailsAtStart(contents: String) throws {
        let path = try temporaryFile(contents)
        defer { try? FileManager.default.removeItem(atPath: path) }
        do {
            _ = try CallbackSecrets(value: "also-set", filePath: path)
            Issue.record("a file without a secret must fail at start")
        } catch {
            #expect(error == .blankFile(path: path))
            #expect(error.description == "callback secret file \(path) holds no secret")
        }
    }

    @Test func fileEmptiedAtRuntimeKeepsRefusingAndSaysSo() throws {
        let path = try temporaryFile("old\n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let secrets = try CallbackSecrets(value: nil, filePath: path)
        try "".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(secrets.reloadIfChanged() == .emptied)
        #expect(secrets.isRequired)
        #expect(secrets.count == 0)
        for presented in ["old", "", " "] { #expect(!secrets.accepts(presented.utf8)) }
        try " \n\t\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(secrets.reloadIfChanged() == .emptied)
        #expect(secrets.reloadIfChanged() == .unchanged)
        #expect(secrets.isRequired && !secrets.accepts("old".utf8))
        // Rotated to a new secret: back in service without a restart.
        try "new\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(secrets.reloadIfChanged() == .reloaded(count: 1))
        #expect(secrets.accepts("new".utf8) && !secrets.accepts("old".utf8))
    }

    @Test func fileEmptiedAtRuntimeLeavesTheValuesSecret() throws {
        let path = try temporaryFile("from-file\n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let secrets = try CallbackSecrets(value: "from-env", filePath: path)
        try "\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(secrets.reloadIfChanged() == .emptied)
        #expect(secrets.accepts("from-env".utf8) && !secrets.accepts("from-file".utf8))
    }

    @Test func matchingSecretReportsThePositionOnly() throws {
        let path = try temporaryFile("a\nsecond\n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let secrets = try CallbackSecrets(value: "v", filePath: path)
        #expect(secrets.matchingSecret("v".utf8) == 0)
        #expect(secrets.matchingSecret("a".utf8) == 1)
        #expect(secrets.matchingSecret("second".utf8) == 2)
        #expect(secrets.matchingSecret("secon".utf8) == nil)
        #expect(secrets.matchingSecret("".utf8) == nil)
    }

    @Test func unreadableFileFailsAtStart() {
        #expect(throws: CallbackSecrets.LoadError.self) { try CallbackSecrets(value: nil, filePath: "/nonexistent/secret") }
    }
}
