import Foundation
import TestSupport
import Testing

/// The binary as an operator runs it: flags, environment, signals, secret rotation, logs.
@Suite(.serialized) struct ProcessEndToEndTests {
    @Test func helpDocumentsEveryFlagWithItsDefaultAndVariable() throws {
        let help = try run(try builtBinary(), ["--help"])
        #expect(help.status == 0)
        let documented = [
            ("--host", "HOST", "0.0.0.0"), ("--port", "PORT", "8080"), ("--log-level", "LOG_LEVEL", "info"),
            ("--callback-secret-file", "USAGE_TRACKING_CALLBACK_SECRET_FILE", "none"),
            ("--callback-secret-header", "USAGE_TRACKING_CALLBACK_SECRET_HEADER", "Authorization"),
            ("--max-body-bytes", "USAGE_TRACKING_MAX_BODY_BYTES", "65536"),
            ("--max-label-bytes", "USAGE_TRACKING_MAX_LABEL_BYTES", "256"),
            ("--max-header-bytes", "USAGE_TRACKING_MAX_HEADER_BYTES", "16384"),
            ("--idle-timeout", "USAGE_TRACKING_IDLE_TIMEOUT", "60"),
            ("--request-timeout", "USAGE_TRACKING_REQUEST_TIMEOUT", "10"),
            ("--max-connections", "USAGE_TRACKING_MAX_CONNECTIONS", "4096"),
            ("--shutdown-timeout", "USAGE_TRACKING_SHUTDOWN_TIMEOUT", "20"),
            ("--drain-delay", "USAGE_TRACKING_DRAIN_DELAY", "0"),
            ("--event-loop-threads", "USAGE_TRACKING_EVENT_LOOP_THREADS", "one per core"),
            ("--config", "USAGE_TRACKING_CONFIG", "the built-in llm_requests_total{user,groups,path}"),
            ("--label-hmac-key-file", "USAGE_TRACKING_LABEL_HMAC_KEY_FILE", "none"),
            ("--new-series-hold", "USAGE_TRACKING_NEW_SERIES_HOLD", "0"),
            ("--ext-proc-port", "USAGE_TRACKING_EXT_PROC_PORT", "off"),
            ("--ext-proc-max-streams", "USAGE_TRACKING_EXT_PROC_MAX_STREAMS", "10000"),
            ("--ext-proc-idle-timeout", "USAGE_TRACKING_EXT_PROC_IDLE_TIMEOUT", "300"),
        ]
        let flat = help.output.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        for (flag, variable, value) in documented {
            #expect(flat.contains("\(flag) <"), "\(flag) missing from --help")
            #expect(flat.contains("(env: \(variable); default: \(value))"), "\(flag) help lacks env/default")
        }
        #expect(flat.contains("--print-config"))
        #expect(flat.contains("--no-debug"))
        #expect(flat.contains("USAGE_TRACKING_NO_DEBUG=true"))
        #expect(flat.contains("USAGE_TRACKING_CALLBACK_SECRET sets one callback secret"))
    }

    @Test func badSettingStopsStartupWithAClearMessage() throws {
        let result = try RunningProcess(try builtBinary(), [], environment: ["PORT": "eighty"])
        #expect(result.waitForExit() != 0)
        #expect(result.lines.joined().contains("PORT must be a whole number, got 'eighty'"))
        let level = try RunningProcess(try builtBinary(), ["--log-level", "loud"])
        #expect(level.waitForExit() != 0)
        #expect(level.lines.joined().contains("log level 'loud' is not one of trace, debug, info"))
        let secret = try RunningProcess(try builtBinary(), ["--port", "0", "--callback-secret-file", "/nonexistent/secret"])
        #expect(secret.waitForExit() == 1)
        #expect(secret.lines.joined().contains("cannot read callback secret file /nonexistent/secret: No such file or directory"))
    }

    @Test func printConfigPrintsTheBuiltInSchemaAndReadsItsOwnOutputBack() throws {
        let printed = try run(try builtBinary(), ["--print-config"])
        #expect(printed.status == 0)
        #expect(printed.output.contains("  - name: \"llm_requests_total\"\n"))
        let path = NSTemporaryDirectory() + "usage-tracking-print-\(UUID().uuidString).yaml"
        try printed.output.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let again = try run(try builtBinary(), ["--config", path, "--print-config"])
        #expect(again.status == 0)
        #expect(again.output == printed.output)
    }

    @Test func badConfigStopsStartupNamingFileLineAndKey() throws {
        let path = NSTemporaryDirectory() + "usage-tracking-bad-\(UUID().uuidString).yaml"
        try "metrics:\n  - name: a_total\n    labels:\n      - {name: u, from: u, max_values: 0}\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let bad = try RunningProcess(try builtBinary(), ["--port", "0"], environment: ["USAGE_TRACKING_CONFIG": path])
        #expect(bad.waitForExit() == 64)
        #expect(bad.lines.joined().contains("--config (USAGE_TRACKING_CONFIG): \(path):4: metrics[0].labels[0].max_values: must be from 1 to 10000000, got 0"))
        let missing = try RunningProcess(try builtBinary(), ["--port", "0", "--config", "/nonexistent/c.yaml"])
        #expect(missing.waitForExit() == 64)
        #expect(missing.lines.joined().contains("--config (USAGE_TRACKING_CONFIG): /nonexistent/c.yaml: cannot be read: No such file or directory"))
        let hold = try RunningProcess(try builtBinary(), ["--port", "0", "--new-series-hold", "3601"])
        #expect(hold.waitForExit() == 64)
        #expect(hold.lines.joined().contains("--new-series-hold (USAGE_TRACKING_NEW_SERIES_HOLD) must be from 0 to 3600, got 3601"))
    }

    @Test func aHashedLabelNeedsAKey() throws {
        let path = NSTemporaryDirectory() + "usage-tracking-hash-\(UUID().uuidString).yaml"
        try "metrics:\n  - name: a_total\n    labels:\n      - {name: u, from: u, hash: hmac-sha256}\n".write(toFile: path, atomically: true, encoding: .utf8)
        let emptyKey = path + ".key"
        try "\n".write(toFile: emptyKey, atomically: true, encoding: .utf8)
        defer {
            try? FileManager.default.removeItem(atPath: path)
            try? FileManager.default.removeItem(atPath: emptyKey)
        }
        let none = try RunningProcess(try builtBinary(), ["--port", "0", "--config", path])
        #expect(none.waitForExit() == 64)
        #expect(none.lines.joined().contains("\(path): a label has 'hash: hmac-sha256' but --label-hmac-key-file (USAGE_TRACKING_LABEL_HMAC_KEY_FILE) is not set"))
        let empty = try RunningProcess(try builtBinary(), ["--port", "0", "--config", path], environment: ["USAGE_TRACKING_LABEL_HMAC_KEY_FILE": emptyKey])
        #expect(empty.waitForExit() == 64)
        #expect(empty.lines.joined().contains("--label-hmac-key-file (USAGE_TRACKING_LABEL_HMAC_KEY_FILE): \(emptyKey) is empty; a hashed label needs a key"))
        let missing = try RunningProcess(try builtBinary(), ["--port", "0", "--config", path, "--label-hmac-key-file", "/nonexistent/key"])
        #expect(missing.waitForExit() == 64)
        #expect(missing.lines.joined().contains("--label-hmac-key-file (USAGE_TRACKING_LABEL_HMAC_KEY_FILE): cannot read /nonexistent/key: No such file or directory"))
    }

    /// Each limit and switch reaches the server, by flag or by its environment variable.
    @Test func flagsAndVariablesTakeEffect() throws {
        let service = try ServiceUnderTest(
            ["--max-body-bytes", "64", "--no-debug"], environment: ["USAGE_TRACKING_MAX_LABEL_BYTES": "8"]
        )
        defer { service.process.stop() }
        #expect(try service.track(#"{"user":"eight888"}"#).status == 202)
        let long = try service.track(#"{"user":"nine99999"}"#)
        #expect(long.status == 422)
        #expect(long.text == #"{"error":"invalid callback","problems":["user: 9 bytes; the limit is 8"]}"# + "\n")
        let large = try service.track(#"{"user":"u","padding":"\#(String(repeating: "x", count: 64))"}"#)
        #expect(large.status == 413)
        #expect(large.text == #"{"error":"body too large","problems":["body exceeds the limit of 64 bytes"]}"# + "\n")
        #expect(try service.send(RawHTTP.get("/debug")).status == 404)
    }

    @Test func environmentSecretAndDebugLogsWithRequestID() throws {
        let secret = "env-secret-\(UUID().uuidString)"
        let service = try ServiceUnderTest(environment: ["USAGE_TRACKING_CALLBACK_SECRET": secret, "LOG_LEVEL": "debug"])
        defer { service.process.stop() }
        let body = #"{"user":"alice","groups":"premium","path":"/v1/completions"}"#
        let refused = try service.track(body)
        #expect(refused.status == 401)
        #expect(refused.text == #"{"error":"unauthorized","problems":["missing credentials in Authorization"]}"# + "\n")
        #expect(try service.track(body, headers: ["Authorization: Bearer \(secret)", "x-request-id: rid-7"]).status == 202)
        let logged = try service.process.waitForLine(containing: #""request_id":"rid-7""#)
        #expect(logged.contains(#""msg":"callback accepted""#))
        let startup = try service.process.waitForLine(containing: "callback authentication required")
        #expect(startup.contains(#""mode":"bearer""#) && startup.contains(#""sources":"environment""#))
        for line in service.process.lines {
            #expect(!line.contains(secret), "secret leaked into a log line")
            #expect((try? JSONSerialization.jsonObject(with: Data(line.utf8))) is [String: Any], "not a JSON log line: \(line)")
        }
    }

    @Test func openTrackIsWarnedAboutOnce() throws {
        let service = try ServiceUnderTest()
        defer { service.process.stop() }
        let warnings = service.process.lines.filter { $0.contains("no callback secret configured") }
        #expect(warnings.count == 1)
        #expect(warnings.first?.contains(#""level":"warning""#) == true)
    }

    @Test func rotatedSecretFileIsPickedUpWithoutRestart() throws {
        let path = NSTemporaryDirectory() + "callback-secret-\(UUID().uuidString)"
        try "first-secret\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let service = try ServiceUnderTest(["--callback-secret-file", path, "--callback-secret-header", "X-Callback-Secret"])
        defer { service.process.stop() }
        let body = #"{"user":"bob"}"#
        #expect(try service.track(body, headers: ["X-Callback-Secret: first-secret"]).status == 202)
        try "second-secret\n".write(toFile: path, atomically: true, encoding: .utf8)
        _ = try service.process.waitForLine(containing: "callback secrets reloaded")
        #expect(try service.track(body, headers: ["X-Callback-Secret: first-secret"]).status == 401)
        #expect(try service.track(body, headers: ["X-Callback-Secret: second-secret"]).status == 202)
    }

    /// SIGTERM: the listener closes, a request already under way is answered (and counted),
    /// and the process exits 0.
    @Test func sigtermFinishesTheRequestInFlightAndExitsZero() throws {
        let service = try ServiceUnderTest()
        let body = #"{"user":"in-flight","groups":"g","path":"/p"}"#
        let connection = try RawHTTP.Connection(port: service.port)
        defer { connection.close() }
        try connection.write("POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n")
        Thread.sleep(forTimeInterval: 0.2)
        service.process.signal(SIGTERM)
        _ = try service.process.waitForLine(containing: "shutting down")
        #expect(throws: E2EError.self) { try RawHTTP.exchange(port: service.port, RawHTTP.get("/healthz")) }
        try connection.write(body)
        let responses = ParsedResponse.parseAll(try connection.readToEnd())
        #expect(responses.map(\.status) == [202])
        #expect(responses.first?.header("connection") == "close")
        #expect(service.process.waitForExit() == 0)
    }

    /// With a drain delay, SIGTERM first turns readiness off while new connections are still
    /// served, so a Kubernetes Service stops routing here before anything is refused.
    @Test func drainDelayKeepsServingWhileNotReady() throws {
        let service = try ServiceUnderTest(["--drain-delay", "2"])
        service.process.signal(SIGTERM)
        _ = try service.process.waitForLine(containing: "draining")
        let ready = try service.send(RawHTTP.get("/readyz"))
        #expect(ready.status == 503)
        #expect(try service.track(#"{"user":"during-drain"}"#).status == 202)
        _ = try service.process.waitForLine(containing: "shutting down")
        #expect(service.process.waitForExit() == 0)
    }
}
