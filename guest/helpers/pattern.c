/*
 * pattern: write, verify and hash deterministic test files.
 *
 *   pattern write FILE SIZE SEED   write SIZE bytes of the pattern for SEED
 *   pattern check FILE SIZE SEED   exit 0 if FILE is exactly that, else 1
 *   pattern sum FILE               print "<fnv64w hex> <bytes>"
 *
 * SIZE takes an optional K/M/G suffix (powers of 1024); SEED is a 64-bit
 * number (decimal or 0x hex).  The pattern's 64-bit little-endian word number
 * i is splitmix64(SEED + (i + 1) * golden ratio), truncated to SIZE bytes, so
 * any offset can be checked on its own.  Builds for the guest (static) and
 * for the host, which gives the same output for comparison.
 *
 * Guest kernel work is slow (a syscall ~0.3 ms, a page fault ~1.7 ms), so I/O
 * goes through one 1 MiB buffer mapped with MAP_POPULATE: few syscalls and no
 * per-page faults.  Exit status: 0 ok, 1 mismatch or I/O error, 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "parse_size.h"

#include "fnv64w.h"

#define BUF_SIZE (1u << 20) /* a multiple of 8: chunks start on word boundaries */
#define GOLDEN 0x9e3779b97f4a7c15ULL

static const char *prog = "pattern";

static int usage(void)
{
    fprintf(stderr,
            "usage: %s write FILE SIZE SEED | check FILE SIZE SEED | sum FILE\n", prog);
    return 2;
}

static int fail(const char *what, const char *file)
{
    fprintf(stderr, "%s: %s: %s: %s\n", prog, file, what, strerror(errno));
    return 1;
}

/* splitmix64 output function (Steele, Lea, Flood 2014). */
static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Fill buf with pattern bytes for file offset `off` (a multiple of 8). */
static void generate(unsigned char *buf, size_t len, uint64_t off, uint64_t seed)
{
    uint64_t word = off / 8;
    for (size_t i = 0; i < len; i += 8, word++) {
        uint64_t v = mix(seed + (word + 1) * GOLDEN);
        memcpy(buf + i, &v, len - i < 8 ? len - i : 8);
    }
}

static int parse_seed(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    *out = strtoull(s, &end, 0);
    return (end == s || *end != '\0' || errno) ? -1 : 0;
}

static unsigned char *alloc_buf(void)
{
    void *p = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        perror("pattern: mmap");
        exit(1);
    }
    return p;
}

/* Read until `len` bytes or end of file; returns the count, or -1. */
static ssize_t read_full(int fd, unsigned char *buf, size_t len)
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

static int write_full(int fd, const unsigned char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int cmd_write(const char *file, uint64_t size, uint64_t seed)
{
    unsigned char *buf = alloc_buf();
    int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return fail("open", file);
    for (uint64_t off = 0; off < size; off += BUF_SIZE) {
        size_t len = size - off < BUF_SIZE ? (size_t)(size - off) : BUF_SIZE;
        generate(buf, len, off, seed);
        if (write_full(fd, buf, len) != 0)
            return fail("write", file);
    }
    if (close(fd) != 0)
        return fail("close", file);
    return 0;
}

/* Offset of the first differing byte of two equal-length buffers. */
static size_t first_diff(const unsigned char *a, const unsigned char *b, size_t len)
{
    size_t i = 0;
    while (i < len && a[i] == b[i])
        i++;
    return i;
}

static int cmd_check(const char *file, uint64_t size, uint64_t seed)
{
    unsigned char *buf = alloc_buf();
    unsigned char *want = alloc_buf();
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail("open", file);
    uint64_t off = 0;
    for (;;) {
        ssize_t n = read_full(fd, buf, BUF_SIZE);
        if (n < 0)
            return fail("read", file);
        if (n == 0)
            break;
        size_t expect = size > off ? (size - off < BUF_SIZE ? size - off : BUF_SIZE) : 0;
        size_t len = (size_t)n < expect ? (size_t)n : expect;
        generate(want, len, off, seed);
        if (memcmp(buf, want, len) != 0) {
            fprintf(stderr, "%s: %s: mismatch at offset %" PRIu64 "\n", prog, file,
                    off + first_diff(buf, want, len));
            return 1;
        }
        off += (uint64_t)n;
        if ((size_t)n < BUF_SIZE)
            break;
    }
    if (off != size) {
        fprintf(stderr, "%s: %s: size %" PRIu64 ", expected %" PRIu64 "\n", prog,
                file, off, size);
        return 1;
    }
    return 0;
}

static int cmd_sum(const char *file)
{
    unsigned char *buf = alloc_buf();
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail("open", file);
    uint64_t h = FNV64_OFFSET, total = 0;
    for (;;) {
        ssize_t n = read_full(fd, buf, BUF_SIZE);
        if (n < 0)
            return fail("read", file);
        h = fnv64w_update(h, buf, (size_t)n);
        total += (uint64_t)n;
        if ((size_t)n < BUF_SIZE)
            break;
    }
    printf("%016" PRIx64 " %" PRIu64 "\n", h, total);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t size, seed;
    if (argc == 3 && strcmp(argv[1], "sum") == 0)
        return cmd_sum(argv[2]);
    if (argc != 5 || parse_size(argv[3], &size) || parse_seed(argv[4], &seed))
        return usage();
    if (strcmp(argv[1], "write") == 0)
        return cmd_write(argv[2], size, seed);
    if (strcmp(argv[1], "check") == 0)
        return cmd_check(argv[2], size, seed);
    return usage();
}
