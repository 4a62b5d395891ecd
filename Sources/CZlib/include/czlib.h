#ifndef CZLIB_H
#define CZLIB_H
#include <stddef.h>
#include <stdint.h>

/// Upper bound of the gzip output for `length` input bytes.
size_t czlib_gzip_bound(size_t length);

/// Compresses `input` into a complete gzip member in `output` (at least czlib_gzip_bound bytes).
/// Returns the number of bytes written, or 0 when zlib fails.
size_t czlib_gzip(const uint8_t *input, size_t length, uint8_t *output, size_t capacity, int level);

#endif
