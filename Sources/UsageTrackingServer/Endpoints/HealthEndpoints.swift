/// `GET /healthz` (liveness: the process answers) and `GET /readyz` (readiness: listening with
/// its configuration loaded, and not shutting down).
enum HealthEndpoints {
    static func liveness() -> HTTPResponse {
        .text(.ok, "ok\n")
    }

    static func readiness(state: ServerState) -> HTTPResponse {
        state.isReady ? .text(.ok, "ready\n") : .text(.serviceUnavailable, "not ready\n")
    }
}
