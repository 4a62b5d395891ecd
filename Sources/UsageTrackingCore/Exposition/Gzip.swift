import CZlib

public enum Gzip {
    /// One gzip member holding `bytes`. Level 1 (fastest): exposition text is repetitive enough
    /// that it still shrinks about tenfold, and a scrape of 100k series must stay quick.
    public static func compress(_ bytes: [UInt8], level: Int32 = 1) -> [UInt8] {
        let capacity = czlib_gzip_bound(bytes.count)
        return [UInt8](unsafeUninitializedCapacity: capacity) { output, count in
            count = bytes.withUnsafeBufferPointer { input in
                czlib_gzip(input.baseAddress, input.count, output.baseAddress, capacity, level)
            }
            precondition(count > 0, "zlib failed to compress \(bytes.count) bytes")
        }
    }
}
