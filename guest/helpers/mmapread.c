/*
 * mmapread FILE [PASSES]: map FILE read-only and hash it in user space.
 *
 * Prints "<fnv64w hex> <bytes> <MB/s> MB/s", the hash being the same as
 * `pattern sum FILE`.  The time covers mmap, the page faults the loads take,
 * and the hash loop; on a virtio-fs DAX mount the loads hit host page cache
 * pages directly, which is what this measures.  MB = 10^6 bytes.
 *
 * With PASSES = 2 the same mapping is hashed once more and "<MB/s> MB/s" of
 * that second pass is appended: no page faults any more, only the loads (on
 * PVM hosts every guest page fault is emulated kernel work, so the two passes
 * tell the fault cost from the data path).  A second hash that differs from
 * the first is an error.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fnv64w.h"
#include "now.h"

static double mbps(size_t len, double secs)
{
    return secs > 0 ? (double)len / 1e6 / secs : 0.0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "1") != 0 && strcmp(argv[2], "2") != 0)) {
        fprintf(stderr, "usage: mmapread FILE [1|2]\n");
        return 2;
    }
    int passes = argc == 3 ? argv[2][0] - '0' : 1;
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        perror(argv[1]);
        return 1;
    }
    size_t len = (size_t)st.st_size;
    const unsigned char *p = NULL;
    uint64_t h = FNV64_OFFSET;
    double start = now();
    if (len > 0) {
        p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            perror("mmapread: mmap");
            return 1;
        }
        h = fnv64w_update(h, p, len);
    }
    double secs = now() - start;
    printf("%016" PRIx64 " %zu %.1f MB/s", h, len, mbps(len, secs));
    if (passes == 2) {
        double again = now();
        uint64_t h2 = len > 0 ? fnv64w_update(FNV64_OFFSET, p, len) : FNV64_OFFSET;
        double secs2 = now() - again;
        if (h2 != h) {
            fprintf(stderr, "\nmmapread: the second pass hashed %016" PRIx64 "\n", h2);
            return 1;
        }
        printf(" %.1f MB/s", mbps(len, secs2));
    }
    printf("\n");
    if (len > 0)
        munmap((void *)p, len);
    return 0;
}
