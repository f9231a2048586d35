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

#include "fnv64w.h"
#include "fullio.h"
#include "parse_size.h"
#include "pattern.h"

#define BUF_SIZE (1u << 20) /* a multiple of 8: chunks start on word boundaries */

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

static int cmd_write(const char *file, uint64_t size, uint64_t seed)
{
    unsigned char *buf = alloc_buf();
    int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return fail("open", file);
    for (uint64_t off = 0; off < size; off += BUF_SIZE) {
        size_t len = size - off < BUF_SIZE ? (size_t)(size - off) : BUF_SIZE;
        pattern_generate(buf, len, off, seed);
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
        pattern_generate(want, len, off, seed);
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
    uint64_t h, total;
    if (fnv64w_fd(fd, buf, BUF_SIZE, &h, &total) != 0)
        return fail("read", file);
    printf("%016" PRIx64 " %" PRIu64 "\n", h, total);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t size, seed;
    if (argc == 3 && strcmp(argv[1], "sum") == 0)
        return cmd_sum(argv[2]);
    if (argc != 5 || parse_size(argv[3], &size) || pattern_parse_seed(argv[4], &seed))
        return usage();
    if (strcmp(argv[1], "write") == 0)
        return cmd_write(argv[2], size, seed);
    if (strcmp(argv[1], "check") == 0)
        return cmd_check(argv[2], size, seed);
    return usage();
}
