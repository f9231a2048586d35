/*
 * fnv64w: the FNV-1a 64-bit hash applied to 64-bit little-endian words
 * instead of single bytes (8x fewer multiplies, so it keeps up with memory),
 * with the bytes after the last whole word hashed one by one as in plain
 * FNV-1a.  Word boundaries are file offsets that are multiples of 8, so the
 * value does not depend on how a file was read.  tests/test_guest_image.py
 * has a Python version of the same function.
 *
 * FNV constants: offset basis 0xcbf29ce484222325, prime 0x100000001b3
 * (Fowler/Noll/Vo, draft-eastlake-fnv).
 */
#ifndef PYVMM_FNV64W_H
#define PYVMM_FNV64W_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FNV64_OFFSET 0xcbf29ce484222325ULL
#define FNV64_PRIME 0x100000001b3ULL

/* Hash `len` bytes; `len` must be a multiple of 8 except for the last call. */
static inline uint64_t fnv64w_update(uint64_t h, const unsigned char *p, size_t len)
{
    size_t words = len / 8;
    for (size_t i = 0; i < words; i++) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8); /* x86-64 is little-endian */
        h = (h ^ w) * FNV64_PRIME;
    }
    for (size_t i = words * 8; i < len; i++)
        h = (h ^ p[i]) * FNV64_PRIME;
    return h;
}

#endif
