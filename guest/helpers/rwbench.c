/*
 * rwbench: sequential read() and write() of a file in 1 MiB calls, timing
 * itself (bench/fs.py runs it in the guest and on the host alike).
 *
 *   rwbench read FILE              read FILE to its end, hashing it as
 *                                  `pattern sum` does (fnv64w)
 *   rwbench write FILE SIZE SEED   write the `pattern` bytes for SEED over
 *                                  [0, SIZE) of FILE (created if missing, never
 *                                  truncated: an existing file is overwritten
 *                                  in place), then fsync
 *
 * Prints one line of key=value words (MB = 10^6 bytes):
 *   hash=<16 hex> bytes=N seconds=S mbps=M     (read)
 *   bytes=N seconds=S mbps=M                   (write)
 * Timed with CLOCK_MONOTONIC: read covers open to close, hash included (the
 * guest's mmap read, mmapread, hashes too); write covers each write() call
 * and the final fsync + close, not the user-space generation of the pattern.
 * One 1 MiB buffer mapped with MAP_POPULATE: few system calls, no page
 * faults (each costs ~0.3 ms / ~1.7 ms of emulated guest kernel on PVM).
 * Exit status: 0 ok, 1 I/O error, 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fnv64w.h"
#include "fullio.h"
#include "now.h"
#include "parse_size.h"
#include "pattern.h"

#define BUF_SIZE (1u << 20) /* a multiple of 8: chunks start on pattern/hash words */

static int fail(const char *what, const char *file)
{
    fprintf(stderr, "rwbench: %s: %s: %s\n", file, what, strerror(errno));
    return 1;
}

static unsigned char *alloc_buf(void)
{
    void *p = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void print_rate(uint64_t bytes, double secs)
{
    printf("bytes=%" PRIu64 " seconds=%.6f mbps=%.2f\n", bytes, secs,
           secs > 0 ? (double)bytes / secs / 1e6 : 0.0);
}

static int cmd_read(const char *file)
{
    unsigned char *buf = alloc_buf();
    if (buf == NULL)
        return fail("mmap", "buffer");
    uint64_t h, total;
    double t0 = now();
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail("open", file);
    if (fnv64w_fd(fd, buf, BUF_SIZE, &h, &total) != 0)
        return fail("read", file);
    close(fd);
    double secs = now() - t0;
    printf("hash=%016" PRIx64 " ", h);
    print_rate(total, secs);
    return 0;
}

static int cmd_write(const char *file, uint64_t size, uint64_t seed)
{
    unsigned char *buf = alloc_buf();
    if (buf == NULL)
        return fail("mmap", "buffer");
    double t0 = now(), untimed = 0;
    int fd = open(file, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return fail("open", file);
    for (uint64_t off = 0; off < size; off += BUF_SIZE) {
        size_t len = size - off < BUF_SIZE ? (size_t)(size - off) : BUF_SIZE;
        double g = now();
        pattern_generate(buf, len, off, seed);
        untimed += now() - g;
        if (write_full(fd, buf, len) != 0)
            return fail("write", file);
    }
    if (fsync(fd) != 0)
        return fail("fsync", file);
    if (close(fd) != 0)
        return fail("close", file);
    print_rate(size, now() - t0 - untimed);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t size, seed;
    if (argc == 3 && strcmp(argv[1], "read") == 0)
        return cmd_read(argv[2]);
    if (argc == 5 && strcmp(argv[1], "write") == 0 && parse_size(argv[3], &size) == 0 &&
        pattern_parse_seed(argv[4], &seed) == 0)
        return cmd_write(argv[2], size, seed);
    fprintf(stderr, "usage: rwbench read FILE | write FILE SIZE SEED\n");
    return 2;
}
