/* parse_size.h: "64M"-style sizes for the guest test helpers.
 *
 * A decimal number with an optional K, M or G suffix (powers of 1024).
 * Returns 0 and stores the value, or -1 for anything else: no sign, no
 * trailing characters, no overflow.
 */
#ifndef PYVMM_PARSE_SIZE_H
#define PYVMM_PARSE_SIZE_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    int shift = 0;
    if (end == s || errno || *s == '-')
        return -1;
    switch (*end) {
    case 'G': case 'g': shift += 10; /* fall through */
    case 'M': case 'm': shift += 10; /* fall through */
    case 'K': case 'k': shift += 10; end++; break;
    default: break;
    }
    if (*end != '\0' || (shift && v > (UINT64_MAX >> shift)))
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

#endif
