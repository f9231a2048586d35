/* fullio.h: read() and write() that carry on after short transfers and EINTR,
 * for the guest test helpers (pattern, rwbench). */
#ifndef PYVMM_FULLIO_H
#define PYVMM_FULLIO_H

#include <errno.h>
#include <stddef.h>
#include <sys/types.h>
#include <unistd.h>

/* Read until `len` bytes or end of file; returns the count, or -1. */
static inline ssize_t read_full(int fd, unsigned char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

/* Write all `len` bytes; 0, or -1 with errno set. */
static inline int write_full(int fd, const unsigned char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n == 0)
                errno = EIO;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Hash the rest of `fd` with fnv64w (needs fnv64w.h), reading `len`-byte
 * chunks into `buf`; stores the byte count in *total.  0, or -1 on a read error. */
#ifdef FNV64_OFFSET
static inline int fnv64w_fd(int fd, unsigned char *buf, size_t len, uint64_t *hash,
                            uint64_t *total)
{
    uint64_t h = FNV64_OFFSET, t = 0;
    for (;;) {
        ssize_t n = read_full(fd, buf, len);
        if (n < 0)
            return -1;
        h = fnv64w_update(h, buf, (size_t)n);
        t += (uint64_t)n;
        if ((size_t)n < len)
            break;
    }
    *hash = h;
    *total = t;
    return 0;
}
#endif

#endif
