/*
 * daxtool: the guest side of the virtio-fs DAX boot tests.  Every access goes
 * through a MAP_SHARED mapping, which on a DAX mount is the host's page cache
 * page itself, mapped into the DAX window (no guest page cache, no copy).
 *
 *   daxtool store FILE OFFSET TEXT   map FILE read-write, copy TEXT to OFFSET,
 *                                    msync(MS_SYNC); prints "stored N"
 *   daxtool watch FILE LEN           map FILE read-only, print "before: <LEN
 *                                    bytes>", wait for a line on stdin, print
 *                                    "after: <LEN bytes>" from the same mapping
 *   daxtool copy SRC DST             map SRC and write(2) the mapping into DST
 *                                    (created/truncated): a FUSE WRITE whose
 *                                    buffer lies in the DAX window; prints
 *                                    "copied N"
 *   daxtool io OP MODE MAP SKIP FILE LEN
 *                                    one read(2)/write(2) of LEN bytes between
 *                                    FILE (offset 0) and the bytes at SKIP of a
 *                                    mapping of MAP (another share's DAX file:
 *                                    the FUSE request on FILE's share carries
 *                                    that share's window pages).  OP: read
 *                                    (FILE -> mapping), write (mapping -> FILE,
 *                                    created/truncated), readv/writev (iovec:
 *                                    4096 bytes of guest RAM first, then the
 *                                    mapping; writev's RAM bytes are 'R').
 *                                    MODE: direct (O_DIRECT) or buffered.
 *                                    Prints "io OP MODE: N" (bytes moved),
 *                                    "io OP MODE: error <strerror>" or "io OP
 *                                    MODE: N, then close: error <strerror>"
 *
 * Exit status: 0 ok, 1 error (perror), 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "map_aligned.h"

static int usage(void)
{
    fprintf(stderr, "usage: daxtool store FILE OFFSET TEXT | watch FILE LEN | copy SRC DST\n"
                    "       daxtool io read|write|readv|writev direct|buffered MAP SKIP FILE LEN\n");
    return 2;
}

static void *map_file(const char *path, int flags, int prot, size_t *len)
{
    int fd = open(path, flags | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        perror(path);
        return NULL;
    }
    *len = (size_t)st.st_size;
    if (*len == 0) {
        fprintf(stderr, "%s: empty file\n", path);
        return NULL;
    }
    void *p = map_aligned(fd, *len, prot);
    close(fd);
    if (p == MAP_FAILED) {
        perror("daxtool: mmap");
        return NULL;
    }
    return p;
}

static int cmd_store(const char *path, const char *offset_text, const char *text)
{
    char *end;
    unsigned long offset = strtoul(offset_text, &end, 10);
    size_t len, n = strlen(text);
    if (*offset_text == '\0' || *end != '\0')
        return usage();
    char *p = map_file(path, O_RDWR, PROT_READ | PROT_WRITE, &len);
    if (p == NULL)
        return 1;
    if (offset > len || n > len - offset) {
        fprintf(stderr, "daxtool: %zu bytes at %lu do not fit in %zu\n", n, offset, len);
        return 1;
    }
    memcpy(p + offset, text, n);
    if (msync(p, len, MS_SYNC) != 0) {
        perror("daxtool: msync");
        return 1;
    }
    printf("stored %zu\n", n);
    return 0;
}

static void show(const char *label, const char *p, size_t n)
{
    printf("%s: ", label);
    fwrite(p, 1, n, stdout);
    printf("\n");
    fflush(stdout);
}

static int cmd_watch(const char *path, const char *len_text)
{
    size_t len, n = strtoul(len_text, NULL, 10);
    const char *p = map_file(path, O_RDONLY, PROT_READ, &len);
    if (p == NULL)
        return 1;
    if (n > len)
        n = len;
    show("before", p, n);
    char line[64];
    if (fgets(line, sizeof line, stdin) == NULL)
        return 1;
    show("after", p, n);
    return 0;
}

static int cmd_copy(const char *src, const char *dst)
{
    size_t len;
    const char *p = map_file(src, O_RDONLY, PROT_READ, &len);
    if (p == NULL)
        return 1;
    int fd = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(dst);
        return 1;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, p + done, len - done);
        if (n <= 0) {
            perror("daxtool: write");
            return 1;
        }
        done += (size_t)n;
    }
    if (close(fd) != 0) {
        perror("daxtool: close");
        return 1;
    }
    printf("copied %zu\n", done);
    return 0;
}

#define RAM_PART 4096

static int cmd_io(char **argv)
{
    const char *op = argv[0], *mode = argv[1], *map = argv[2], *file = argv[4];
    char *end1, *end2;
    unsigned long skip = strtoul(argv[3], &end1, 10), n = strtoul(argv[5], &end2, 10);
    int into_map = strcmp(op, "read") == 0 || strcmp(op, "readv") == 0;
    int vec = strcmp(op, "readv") == 0 || strcmp(op, "writev") == 0;
    int direct = strcmp(mode, "direct") == 0;
    if (*end1 || *end2 || (!into_map && strcmp(op, "write") != 0 && !vec) ||
        (!direct && strcmp(mode, "buffered") != 0))
        return usage();
    size_t len;
    char *p = map_file(map, into_map ? O_RDWR : O_RDONLY,
                       into_map ? PROT_READ | PROT_WRITE : PROT_READ, &len);
    if (p == NULL)
        return 1;
    if (skip > len || n > len - skip) {
        fprintf(stderr, "daxtool: %lu bytes at %lu do not fit in %zu\n", n, skip, len);
        return 1;
    }
    int flags = (into_map ? O_RDONLY : O_WRONLY | O_CREAT | O_TRUNC) | (direct ? O_DIRECT : 0);
    int fd = open(file, flags | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(file);
        return 1;
    }
    static char ram[RAM_PART];
    memset(ram, 'R', sizeof ram);
    struct iovec iov[2] = {{ram, sizeof ram}, {p + skip, n}};
    ssize_t got;
    if (vec)
        got = into_map ? readv(fd, iov, 2) : writev(fd, iov, 2);
    else
        got = into_map ? read(fd, p + skip, n) : write(fd, p + skip, n);
    if (got < 0) {
        printf("io %s %s: error %s\n", op, mode, strerror(errno));
        return 1;
    }
    if (close(fd) != 0) {
        printf("io %s %s: %zd, then close: error %s\n", op, mode, got, strerror(errno));
        return 1;
    }
    printf("io %s %s: %zd\n", op, mode, got);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "store") == 0)
        return cmd_store(argv[2], argv[3], argv[4]);
    if (argc == 4 && strcmp(argv[1], "watch") == 0)
        return cmd_watch(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "copy") == 0)
        return cmd_copy(argv[2], argv[3]);
    if (argc == 8 && strcmp(argv[1], "io") == 0)
        return cmd_io(argv + 2);
    return usage();
}
