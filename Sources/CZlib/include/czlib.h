#ifndef CZLIB_H
#define CZLIB_H
#include <stddef.h>
#include <stdint.h>

/// Upper bound of the gzip output for `length` input bytes.
size_t czlib_gzip_bound(size_t length);

/// Compresses `input` into a complete gzip member in `output` (at least czlib_gzip_bound bytes).
/// Returns the number of bytes written, or 0 when zlib fails.
size_t czlib_gzip(const uint8_t *input, size_t length, uint8_t *output, size_t capacity, int level);

/// An incremental gzip decoder (zlib state behind an opaque pointer).
typedef struct czlib_gunzip_stream czlib_gunzip_stream;

/// Starts a decoder for gzip data (one member or several concatenated). NULL when out of memory.
czlib_gunzip_stream *czlib_gunzip_start(void);

/// Decodes from `input` into `output` as far as either allows; sets `consumed` and `produced`.
/// Call again while input remains or `output` came back full; both 0 means it needs more input.
/// Returns NULL, or zlib's reason when the data is not valid gzip.
const char *czlib_gunzip(czlib_gunzip_stream *stream, const uint8_t *input, size_t length, size_t *consumed,
                         uint8_t *output, size_t capacity, size_t *produced);

/// Releases the decoder's state.
void czlib_gunzip_end(czlib_gunzip_stream *stream);

/// zlib's CRC-32 of `length` bytes, continuing `crc` (0 to start).
uint32_t czlib_crc32(uint32_t crc, const uint8_t *data, size_t length);

#endif
