/*
 * map_aligned: mmap a whole file MAP_SHARED at a 2 MiB aligned address.
 *
 * On a virtio-fs DAX mount the kernel can then map each 2 MiB of the file with
 * one PMD entry (FS_DAX_PMD): one guest page fault per 2 MiB instead of 512.
 * On PVM hosts a guest page fault costs ~1.7 ms of emulated kernel code, so
 * this is the difference between ~2 MB/s and memory speed.  Linux 6.1 does not
 * align FUSE mappings by itself: reserve a larger range, then map the file
 * over its aligned middle with MAP_FIXED and return the rest.
 */
#ifndef MAP_ALIGNED_H
#define MAP_ALIGNED_H

#include <stdint.h>
#include <sys/mman.h>

#define MAP_ALIGNMENT_BYTES (2UL << 20)

static void *map_aligned(int fd, size_t len, int prot)
{
    size_t span = len + MAP_ALIGNMENT_BYTES;
    char *res = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (res == MAP_FAILED)
        return MAP_FAILED;
    uintptr_t base = ((uintptr_t)res + MAP_ALIGNMENT_BYTES - 1) & ~(MAP_ALIGNMENT_BYTES - 1);
    char *p = mmap((void *)base, len, prot, MAP_SHARED | MAP_FIXED, fd, 0);
    if (p == MAP_FAILED) {
        munmap(res, span);
        return MAP_FAILED;
    }
    size_t head = (size_t)(p - res);
    if (head)
        munmap(res, head);
    size_t end = (len + 4095) & ~(size_t)4095;
    if (span > head + end)
        munmap(p + end, span - head - end);
    return p;
}

#endif
