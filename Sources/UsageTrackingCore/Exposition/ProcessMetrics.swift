import Glibc

/// The standard `process_*` metrics, with client_golang's names and meaning, read from /proc.
/// Values that cannot be read (another OS, a restricted /proc) are left out rather than faked.
public struct ProcessMetrics: Sendable {
    public var cpuSeconds: Double?
    public var residentMemoryBytes: Double?
    public var virtualMemoryBytes: Double?
    public var startTimeSeconds: Double?
    public var openFileDescriptors: Double?
    public var maximumFileDescriptors: Double?

    public static func read() -> ProcessMetrics {
        var metrics = ProcessMetrics()
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let pageSize = Double(sysconf(Int32(_SC_PAGESIZE)))
        // Fields after the command name, which is in parentheses and may itself hold spaces.
        if let stat = readWholeFile("/proc/self/stat"), let close = stat.lastIndex(of: ")") {
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            // fields[0] is field 3 (state) of proc(5).
            if fields.count > 21, let utime = Double(fields[11]), let stime = Double(fields[12]),
                let start = Double(fields[19]), let vsize = Double(fields[20]), let rss = Double(fields[21])
            {
                metrics.cpuSeconds = (utime + stime) / ticks
                metrics.virtualMemoryBytes = vsize
                metrics.residentMemoryBytes = rss * pageSize
                if let boot = bootTime() { metrics.startTimeSeconds = boot + start / ticks }
            }
        }
        metrics.openFileDescriptors = countOpenFileDescriptors()
        var limit = rlimit()
        if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 { metrics.maximumFileDescriptors = Double(limit.rlim_cur) }
        return metrics
    }

    public func write(to writer: inout ExpositionWriter) {
        let rows: [(String, String, ExpositionWriter.MetricType, Double?)] = [
            ("process_cpu_seconds_total", "CPU time used by this process, user plus system, in seconds.", .counter, self.cpuSeconds),
            ("process_max_fds", "Limit on open file descriptors (RLIMIT_NOFILE, soft).", .gauge, self.maximumFileDescriptors),
            ("process_open_fds", "File descriptors this process has open.", .gauge, self.openFileDescriptors),
            ("process_resident_memory_bytes", "Bytes of memory resident in RAM.", .gauge, self.residentMemoryBytes),
            ("process_start_time_seconds", "When this process started, in seconds since the Unix epoch.", .gauge, self.startTimeSeconds),
            ("process_virtual_memory_bytes", "Bytes of virtual address space mapped.", .gauge, self.virtualMemoryBytes),
        ]
        for (name, help, type, value) in rows {
            guard let value else { continue }
            writer.family(name, help: help, type: type)
            writer.sample(name, value: value)
        }
    }

    private static func bootTime() -> Double? {
        guard let stat = readWholeFile("/proc/stat") else { return nil }
        for line in stat.split(separator: "\n") where line.hasPrefix("btime ") {
            return Double(line.dropFirst(6).trimmingASCIISpaces())
        }
        return nil
    }

    private static func countOpenFileDescriptors() -> Double? {
        guard let directory = opendir("/proc/self/fd") else { return nil }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            let isDot = withUnsafeBytes(of: entry.pointee.d_name) { name in
                name[0] == UInt8(ascii: ".") && (name[1] == 0 || (name[1] == UInt8(ascii: ".") && name[2] == 0))
            }
            if !isDot { count += 1 }
        }
        // The directory being read holds one descriptor of its own.
        return Double(count - 1)
    }
}

private let RLIMIT_NOFILE_VALUE = Int32(RLIMIT_NOFILE.rawValue)
