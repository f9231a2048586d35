/*
 * metabench DIR N: file metadata operations per second, timing itself.
 *
 * Three passes over the names DIR/f0 .. DIR/f<N-1>, each timed on its own:
 *   create  open(O_CREAT | O_EXCL | O_WRONLY) + close   (a new empty file)
 *   stat    stat()
 *   unlink  unlink()
 * and prints one line (ops = 3 per file):
 *   files=N create_s=S stat_s=S unlink_s=S seconds=S ops_per_s=R
 * DIR must exist; it is left empty.  One process does all of it: a fork+exec
 * per file would cost ~0.14 s of emulated guest kernel on PVM hosts and
 * measure the shell, not the file system.  Exit status: 0 ok, 1 error, 2 usage.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "now.h"
#include "parse_size.h"

enum { CREATE, STAT, UNLINK };

/* One operation on DIR/f<i>; 0, or -1 with errno set. */
static int one_op(int op, const char *dir, uint64_t i)
{
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/f%" PRIu64, dir, i);
    switch (op) {
    case CREATE: {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        return fd < 0 ? -1 : close(fd);
    }
    case STAT:
        return stat(path, &st);
    default:
        return unlink(path);
    }
}

int main(int argc, char **argv)
{
    static const char *names[] = {"create", "stat", "unlink"};
    uint64_t n;
    if (argc != 3 || parse_size(argv[2], &n) || n == 0) {
        fprintf(stderr, "usage: metabench DIR N  (N > 0)\n");
        return 2;
    }
    double secs[3], total = 0;
    for (int op = CREATE; op <= UNLINK; op++) {
        double t0 = now();
        for (uint64_t i = 0; i < n; i++) {
            if (one_op(op, argv[1], i) != 0) {
                fprintf(stderr, "metabench: %s %s/f%" PRIu64 ": ", names[op], argv[1], i);
                perror(NULL);
                return 1;
            }
        }
        secs[op] = now() - t0;
        total += secs[op];
    }
    printf("files=%" PRIu64 " create_s=%.6f stat_s=%.6f unlink_s=%.6f seconds=%.6f ops_per_s=%.1f\n",
           n, secs[CREATE], secs[STAT], secs[UNLINK], total, total > 0 ? 3.0 * (double)n / total : 0.0);
    return 0;
}
