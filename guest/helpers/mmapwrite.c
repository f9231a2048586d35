/*
 * mmapwrite FILE SIZE SEED: write the `pattern` bytes for SEED over the first
 * SIZE bytes of FILE through a MAP_SHARED mapping, then msync(MS_SYNC).
 *
 * FILE must exist and hold at least SIZE bytes (a store past the end of a
 * file is SIGBUS): bench/fs.py preallocates it on the host with another seed,
 * so `pattern check FILE SIZE SEED` there shows that every byte arrived.
 * On a virtio-fs DAX mount the stores land in the host's page cache pages
 * mapped into the DAX window; without DAX they fill guest page cache pages
 * that msync writes back with FUSE_WRITE requests.
 *
 * Prints "bytes=N seconds=S mbps=M" (MB = 10^6 bytes).  The time covers mmap,
 * the page faults the stores take, the stores (a memcpy of each 1 MiB chunk),
 * msync and munmap; generating the pattern into the 1 MiB source buffer is not
 * timed.  Exit status: 0 ok, 1 error, 2 usage.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "now.h"
#include "parse_size.h"
#include "pattern.h"

#define CHUNK (1u << 20) /* a multiple of 8: chunks start on pattern words */

static int fail(const char *what)
{
    perror(what);
    return 1;
}

int main(int argc, char **argv)
{
    uint64_t size, seed;
    if (argc != 4 || parse_size(argv[2], &size) || pattern_parse_seed(argv[3], &seed) ||
        size == 0) {
        fprintf(stderr, "usage: mmapwrite FILE SIZE SEED  (SIZE > 0)\n");
        return 2;
    }
    const char *path = argv[1];
    int fd = open(path, O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        return fail(path);
    if ((uint64_t)st.st_size < size) {
        fprintf(stderr, "mmapwrite: %s: %jd bytes, smaller than SIZE %" PRIu64 "\n", path,
                (intmax_t)st.st_size, size);
        return 1;
    }
    unsigned char *chunk = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (chunk == MAP_FAILED)
        return fail("mmapwrite: mmap buffer");

    double start = now(), untimed = 0;
    unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return fail("mmapwrite: mmap");
    for (uint64_t off = 0; off < size; off += CHUNK) {
        size_t len = size - off < CHUNK ? (size_t)(size - off) : CHUNK;
        double g = now();
        pattern_generate(chunk, len, off, seed);
        untimed += now() - g;
        memcpy(p + off, chunk, len);
    }
    if (msync(p, size, MS_SYNC) != 0)
        return fail("mmapwrite: msync");
    munmap(p, size);
    double secs = now() - start - untimed;
    close(fd);
    printf("bytes=%" PRIu64 " seconds=%.6f mbps=%.2f\n", size, secs,
           secs > 0 ? (double)size / secs / 1e6 : 0.0);
    return 0;
}
