#include "czlib.h"
#include <zlib.h>
#include <string.h>

// windowBits 15 + 16 asks zlib for a gzip header and trailer instead of a zlib one.
static const int gzip_window_bits = 15 + 16;

size_t czlib_gzip_bound(size_t length) {
    // deflateBound's figure for zlib framing, plus gzip's larger header and trailer.
    return (size_t)compressBound((uLong)length) + 32;
}

size_t czlib_gzip(const uint8_t *input, size_t length, uint8_t *output, size_t capacity, int level) {
    z_stream stream;
    memset(&stream, 0, sizeof stream);
    if (deflateInit2(&stream, level, Z_DEFLATED, gzip_window_bits, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
        return 0;
    }
    stream.next_in = (Bytef *)input;
    stream.avail_in = (uInt)length;
    stream.next_out = output;
    stream.avail_out = (uInt)capacity;
    int status = deflate(&stream, Z_FINISH);
    size_t written = stream.total_out;
    deflateEnd(&stream);
    return status == Z_STREAM_END ? written : 0;
}
