// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "usage-tracking",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "usage-tracking", targets: ["usage-tracking"]),
        .library(name: "UsageTrackingCore", targets: ["UsageTrackingCore"]),
        .library(name: "UsageTrackingServer", targets: ["UsageTrackingServer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
    ],
    targets: [
        // zlib's deflate behind one C function, so gzip needs no extra package.
        .target(name: "CZlib", linkerSettings: [.linkedLibrary("z")]),
        // Parsing, validation, counting, exposition: no HTTP and no networking in here.
        // Yams reads the metering config; Crypto's HMAC hashes labels marked `hash: hmac-sha256`;
        // GRDB keeps the usage ledger in SQLite (the system's libsqlite3).
        .target(
            name: "UsageTrackingCore",
            dependencies: [
                "CZlib", .product(name: "Yams", package: "Yams"), .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "GRDB", package: "GRDB.swift"), .product(name: "GRDBSQLite", package: "GRDB.swift"),
            ]
        ),
        // The SwiftNIO HTTP/1 server on top of the core.
        .target(
            name: "UsageTrackingServer",
            dependencies: [
                "UsageTrackingCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "usage-tracking",
            dependencies: [
                "UsageTrackingCore",
                "UsageTrackingServer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Release-mode timings of the core, for profiling the hot path (see README, Performance).
        .executableTarget(
            name: "usage-tracking-core-benchmark",
            dependencies: ["UsageTrackingCore"],
            path: "Tests/Benchmarks/CoreBenchmark"
        ),
        .testTarget(name: "UsageTrackingCoreTests", dependencies: ["UsageTrackingCore"]),
        // Shared by the test targets: reading raw HTTP replies.
        .target(name: "HTTPTestSupport", path: "Tests/HTTPTestSupport"),
        .testTarget(
            name: "UsageTrackingServerTests",
            dependencies: [
                "UsageTrackingServer",
                "HTTPTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Starts the built binary and a real Prometheus; needs `usage-tracking` built first.
        .testTarget(name: "EndToEndTests", dependencies: ["usage-tracking", "HTTPTestSupport"]),
    ]
)
