#ifndef CPREFETCH_H
#define CPREFETCH_H

/// Asks the processor to bring the cache line at `address` in, for writing, without waiting for
/// it: Swift has no prefetch of its own. An address that is not mapped is ignored, not a fault.
static inline void cprefetch(const void *address) { __builtin_prefetch(address, 1, 3); }

#endif
