/*
 * blkbench: block-device throughput and latency inside the guest (bench/blk.py).
 *
 *   blkbench seqwrite DEV SIZE BS               write [0, SIZE) in BS-byte requests
 *   blkbench seqread  DEV SIZE BS               read  [0, SIZE) in BS-byte requests
 *   blkbench randread DEV SIZE BS COUNT [SECS]  COUNT reads of BS bytes at random
 *                                               BS-aligned offsets in [0, SIZE),
 *                                               stopping early after SECS seconds
 *
 * Each prints one line on stdout, e.g.
 *   blkbench seqread bytes=67108864 seconds=1.234567 MBps=54.36 MiBps=51.84
 *   blkbench randread bs=4096 ios=2000 seconds=1.234567 iops=1620.0 MBps=6.64
 * (MB = 10^6 bytes, MiB = 2^20 bytes).  SIZE and BS take an optional K/M/G
 * suffix (powers of 1024); BS must be a multiple of 512 and SIZE a multiple of
 * BS.  I/O is O_DIRECT from a buffer aligned to 4096 bytes, so every request
 * reaches the device: nothing is served from or left in the guest page cache.
 * Only the I/O loop is timed (CLOCK_MONOTONIC): not open, not close, and no
 * fsync (a write through O_DIRECT is complete when the device has it; a flush
 * would time the host's disk).  The data written is a fixed non-zero byte
 * pattern; random offsets come from splitmix64 with a fixed seed, so every run
 * and every VMM issues the same sequence.
 *
 * Guest kernel work is slow on PVM hosts (a syscall ~0.3 ms), so the loops make
 * one pread/pwrite per request and nothing else (clock_gettime is the vDSO).
 * Exit status: 0 ok, 1 I/O error, 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "parse_size.h"

#define ALIGN 4096
#define SEED 0x5eed0b1cb5e4c4ULL

static const char *prog = "blkbench";

static int usage(void)
{
    fprintf(stderr,
            "usage: %s seqwrite DEV SIZE BS | seqread DEV SIZE BS |"
            " randread DEV SIZE BS COUNT [SECONDS]\n", prog);
    return 2;
}

static int fail(const char *what, const char *dev)
{
    fprintf(stderr, "%s: %s: %s: %s\n", prog, dev, what, strerror(errno));
    return 1;
}

static int parse_seconds(const char *s, double *out)
{
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    return (end == s || *end != '\0' || errno || *out < 0) ? -1 : 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* splitmix64 (Steele, Lea, Flood 2014): the next value of the sequence in *state. */
static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static unsigned char *alloc_buf(size_t bs)
{
    void *p = NULL;
    int err = posix_memalign(&p, ALIGN, bs);
    if (err != 0) {
        fprintf(stderr, "%s: posix_memalign %zu: %s\n", prog, bs, strerror(err));
        exit(1);
    }
    for (size_t i = 0; i < bs; i++) /* also faults every page in before timing */
        ((unsigned char *)p)[i] = (unsigned char)(i * 131 + 7);
    return p;
}

/* Open DEV with O_DIRECT and check that it holds at least `size` bytes. */
static int open_dev(const char *dev, int flags, uint64_t size)
{
    int fd = open(dev, flags | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
        fail("open", dev);
        return -1;
    }
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
        fail("lseek", dev);
        close(fd);
        return -1;
    }
    if ((uint64_t)end < size) {
        fprintf(stderr, "%s: %s: %" PRIu64 " bytes, smaller than SIZE %" PRIu64 "\n",
                prog, dev, (uint64_t)end, size);
        close(fd);
        return -1;
    }
    return fd;
}

/* One request of exactly `len` bytes at `off`; 0 on success. */
static int do_io(int fd, int is_write, unsigned char *buf, size_t len, uint64_t off)
{
    for (;;) {
        ssize_t n = is_write ? pwrite(fd, buf, len, (off_t)off) : pread(fd, buf, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == (ssize_t)len)
            return 0;
        if (n >= 0) /* O_DIRECT: no partial requests to resume; treat as an error */
            errno = EIO;
        return -1;
    }
}

static void print_rate(const char *name, uint64_t bytes, double secs)
{
    double bps = secs > 0 ? (double)bytes / secs : 0;
    printf("%s %s bytes=%" PRIu64 " seconds=%.6f MBps=%.2f MiBps=%.2f\n",
           prog, name, bytes, secs, bps / 1e6, bps / (1 << 20));
}

static int cmd_seq(const char *dev, uint64_t size, uint64_t bs, int is_write)
{
    unsigned char *buf = alloc_buf(bs);
    int fd = open_dev(dev, is_write ? O_WRONLY : O_RDONLY, size);
    if (fd < 0)
        return 1;
    double t0 = now();
    for (uint64_t off = 0; off < size; off += bs)
        if (do_io(fd, is_write, buf, bs, off) != 0)
            return fail(is_write ? "pwrite" : "pread", dev);
    double secs = now() - t0;
    close(fd);
    print_rate(is_write ? "seqwrite" : "seqread", size, secs);
    return 0;
}

static int cmd_randread(const char *dev, uint64_t size, uint64_t bs, uint64_t count, double limit)
{
    unsigned char *buf = alloc_buf(bs);
    int fd = open_dev(dev, O_RDONLY, size);
    if (fd < 0)
        return 1;
    uint64_t blocks = size / bs, state = SEED, ios = 0;
    double t0 = now(), t = t0;
    while (ios < count && (limit <= 0 || t - t0 < limit)) {
        uint64_t off = (splitmix64(&state) % blocks) * bs;
        if (do_io(fd, 0, buf, bs, off) != 0)
            return fail("pread", dev);
        ios++;
        t = now();
    }
    double secs = t - t0;
    close(fd);
    printf("%s randread bs=%" PRIu64 " ios=%" PRIu64 " seconds=%.6f iops=%.1f MBps=%.2f\n",
           prog, bs, ios, secs, secs > 0 ? (double)ios / secs : 0,
           secs > 0 ? (double)(ios * bs) / secs / 1e6 : 0);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t size, bs, count = 0;
    double limit = 0;
    if (argc < 5 || parse_size(argv[3], &size) || parse_size(argv[4], &bs))
        return usage();
    if (bs == 0 || bs % 512 || size == 0 || size % bs) {
        fprintf(stderr, "%s: BS must be a non-zero multiple of 512 and SIZE a non-zero"
                " multiple of BS\n", prog);
        return 2;
    }
    const char *cmd = argv[1], *dev = argv[2];
    if (strcmp(cmd, "seqwrite") == 0 && argc == 5)
        return cmd_seq(dev, size, bs, 1);
    if (strcmp(cmd, "seqread") == 0 && argc == 5)
        return cmd_seq(dev, size, bs, 0);
    if (strcmp(cmd, "randread") == 0 && (argc == 6 || argc == 7)) {
        if (parse_size(argv[5], &count) || count == 0)
            return usage();
        if (argc == 7 && parse_seconds(argv[6], &limit))
            return usage();
        return cmd_randread(dev, size, bs, count, limit);
    }
    return usage();
}
