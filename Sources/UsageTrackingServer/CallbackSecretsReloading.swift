import Logging
import UsageTrackingCore

/// The callback secrets' life after startup: what is logged about them, the file watcher, and
/// reloads (the watcher's, and SIGHUP's through `UsageTrackingServer.reloadSecrets`).
extension ServerState {
    /// Says at startup how callbacks are authenticated (in the log and on the status page), or
    /// warns that they are not.
    func logAuthentication() {
        let config = self.configuration
        guard self.secrets.isRequired else {
            self.logger.warning("no callback secret configured: /track accepts callbacks from anyone who can reach it")
            return
        }
        var sources: [String] = []
        if config.callbackSecret != nil { sources.append("environment") }
        if config.callbackSecretFile != nil { sources.append("file") }
        let mode = config.callbackSecretHeader.lowercased() == "authorization" ? "bearer" : "custom-header"
        self.logger.info(
            "callback authentication required",
            metadata: [
                "mode": "\(mode)", "header": "\(config.callbackSecretHeader)", "sources": "\(sources.joined(separator: ","))",
                "secrets": "\(self.secrets.count)",
            ]
        )
        self.status?.events.recordReload(.init(time: wallClock(), result: "loaded at startup: \(self.secrets.count) secrets"))
    }

    /// Re-reads the secret file every `--secret-reload-interval`; nil without a secret file.
    func watchSecretFile() -> Task<Void, Never>? {
        guard self.secrets.filePath != nil else { return nil }
        let interval = self.configuration.secretReloadInterval
        return Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: interval)
                self.reloadSecrets(force: false)
            }
        }
    }

    /// Re-reads the secret file (`force`: even if it looks unchanged) and says what came of it.
    func reloadSecrets(force: Bool) {
        let result = self.secrets.reloadIfChanged(force: force)
        if let summary = Self.statusSummary(result) {
            self.status?.events.recordReload(.init(time: wallClock(), result: summary))
        }
        switch result {
        case .unchanged: break
        case .reloaded(let count):
            self.logger.info("callback secrets reloaded", metadata: ["secrets": "\(count)"])
        case .emptied:
            self.logger.warning(
                "callback secret file holds no secret; callbacks without another configured secret are refused",
                metadata: ["file": "\(self.secrets.filePath ?? "")", "secrets": "\(self.secrets.count)"]
            )
        case .failed(let reason):
            self.logger.error("callback secrets not reloaded; keeping the previous ones", metadata: ["reason": "\(reason)"])
        }
    }

    /// How the status page words a reload; nil when nothing changed (checked every 2 s).
    static func statusSummary(_ result: CallbackSecrets.Reload) -> String? {
        switch result {
        case .unchanged: nil
        case .reloaded(let count): "reloaded: \(count) secrets in the file"
        case .emptied: "the file holds no secret; only the environment's secret (if any) is accepted"
        case .failed(let reason): "failed, previous secrets kept: \(reason)"
        }
    }
}
