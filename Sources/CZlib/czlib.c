#include "czlib.h"
#include <zlib.h>
#include <limits.h>
#include <stdlib.h>
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

struct czlib_gunzip_stream {
    z_stream z;
};

czlib_gunzip_stream *czlib_gunzip_start(void) {
    czlib_gunzip_stream *stream = calloc(1, sizeof *stream);
    if (stream == NULL) return NULL;
    if (inflateInit2(&stream->z, gzip_window_bits) != Z_OK) {
        free(stream);
        return NULL;
    }
    return stream;
}

const char *czlib_gunzip(czlib_gunzip_stream *stream, const uint8_t *input, size_t length, size_t *consumed,
                         uint8_t *output, size_t capacity, size_t *produced) {
    z_stream *z = &stream->z;
    // zlib counts in uInt; a longer chunk is simply taken in several calls.
    uInt in = length > UINT_MAX ? UINT_MAX : (uInt)length;
    uInt out = capacity > UINT_MAX ? UINT_MAX : (uInt)capacity;
    z->next_in = (Bytef *)input;
    z->avail_in = in;
    z->next_out = output;
    z->avail_out = out;
    int status = inflate(z, Z_NO_FLUSH);
    *consumed = in - z->avail_in;
    *produced = out - z->avail_out;
    switch (status) {
    case Z_OK:
    case Z_BUF_ERROR: // no progress possible until more input (or room) comes: not an error
        return NULL;
    case Z_STREAM_END:
        // A member ended; what follows, if anything, must be another member (RFC 1952 2.2).
        return inflateReset(z) == Z_OK ? NULL : "cannot restart after a gzip member";
    case Z_MEM_ERROR:
        return "out of memory";
    case Z_NEED_DICT:
        return "needs a preset dictionary";
    default:
        return z->msg != NULL ? z->msg : "invalid gzip data";
    }
}

void czlib_gunzip_end(czlib_gunzip_stream *stream) {
    if (stream == NULL) return;
    inflateEnd(&stream->z);
    free(stream);
}

uint32_t czlib_crc32(uint32_t crc, const uint8_t *data, size_t length) {
    // crc32_z takes a size_t length; the journal's records are at most a few MiB anyway.
    return (uint32_t)crc32_z((uLong)crc, data, length);
}
