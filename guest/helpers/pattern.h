/*
 * pattern.h: the deterministic test-file byte sequence of `pattern write`,
 * shared by the helpers that write it (pattern, rwbench, mmapwrite).
 *
 * The file's 64-bit little-endian word number i is
 * splitmix64(SEED + (i + 1) * golden ratio), truncated to the file size, so
 * any offset can be generated (and checked) on its own.
 * tests/test_guest_image.py has a Python version (py_pattern).
 */
#ifndef PYVMM_PATTERN_H
#define PYVMM_PATTERN_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PATTERN_GOLDEN 0x9e3779b97f4a7c15ULL

/* splitmix64 output function (Steele, Lea, Flood 2014). */
static inline uint64_t pattern_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Fill buf with the pattern bytes for file offset `off` (a multiple of 8). */
static inline void pattern_generate(unsigned char *buf, size_t len, uint64_t off, uint64_t seed)
{
    uint64_t word = off / 8;
    for (size_t i = 0; i < len; i += 8, word++) {
        uint64_t v = pattern_mix(seed + (word + 1) * PATTERN_GOLDEN);
        memcpy(buf + i, &v, len - i < 8 ? len - i : 8);
    }
}

/* A 64-bit seed, decimal or 0x hex; 0 or -1. */
static inline int pattern_parse_seed(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    *out = strtoull(s, &end, 0);
    return (end == s || *end != '\0' || errno) ? -1 : 0;
}

#endif
