/*
 * The guest's malloc: linked into the static musl programs of the default guest
 * (busybox, /init, the helpers) in place of musl's own allocator.
 *
 * Why: on KVM hosts of the PVM flavour every system call and every page fault
 * of the guest runs in KVM's instruction emulator (~0.3 ms and ~1.7 ms).
 * musl's mallocng gives some request sizes a group of their own, mapped with
 * mmap() at malloc() and unmapped at free(): measured in the guest, a
 * malloc()+free() pair of 1000 bytes took 3.3 ms, one of 5000 bytes 4.1 ms
 * (glibc: about 15 ns), and a busybox shell loop growing a string ran six
 * times slower than with Debian's glibc busybox (docs/pvm.md).
 *
 * What: power-of-two size classes from 16 bytes to 256 KiB, each with a free
 * list; memory comes from 4 MiB chunks mapped once and never given back
 * (these programs are small and short-lived).  A request above 256 KiB gets
 * its own mapping, unmapped at free(), and so does an aligned_alloc() block.
 * Every block starts 16 bytes after a header that says which kind it is.  Single-threaded, as
 * the guest's programs are.  musl lets a program replace malloc as long as it
 * provides all of these functions (musl 1.2.1 release notes); musl's own
 * internal allocations (atexit, locales, ...) keep using its allocator through
 * __libc_malloc, and never cross with ours.  Used only with musl: a glibc
 * build keeps glibc's allocator.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define HEADER 16                   /* keeps blocks 16-byte aligned */
#define MIN_SHIFT 4                 /* the smallest class: 16 bytes */
#define MAX_SHIFT 18                /* the largest class: 256 KiB */
#define CHUNK (4 << 20)             /* mapped at a time for the classes */
#define BIG ((size_t)-1)            /* header of a block with its own mapping */
#define ALIGNED ((size_t)-2)        /* header of an aligned block (aligned_alloc) */

struct header {
    size_t shift;                   /* the class (log2 of the block size), BIG or ALIGNED */
    size_t map_size;                /* BIG: the size of the mapping, header included;
                                       ALIGNED: the mapping's address */
};

static void *free_lists[MAX_SHIFT + 1];
static char *chunk_next, *chunk_end;

static size_t class_of(size_t n)
{
    size_t shift = MIN_SHIFT;
    while (((size_t)1 << shift) < n)
        shift++;
    return shift;
}

static void *carve(size_t bytes)
{
    if ((size_t)(chunk_end - chunk_next) < bytes) {
        void *p = mmap(0, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return 0;
        chunk_next = p;             /* the rest of the old chunk is left unused */
        chunk_end = chunk_next + CHUNK;
    }
    void *p = chunk_next;
    chunk_next += bytes;
    return p;
}

/* malloc() under another name: calloc() calls this, so that no compiler turns
 * its malloc-then-memset into a call to calloc() itself. */
static void *alloc(size_t n)
{
    struct header *h;
    if (n > ((size_t)1 << MAX_SHIFT)) {
        if (n > SIZE_MAX - HEADER - 4095) {
            errno = ENOMEM;
            return 0;
        }
        size_t size = (n + HEADER + 4095) & ~(size_t)4095;
        h = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (h == MAP_FAILED) {
            errno = ENOMEM;
            return 0;
        }
        h->shift = BIG;
        h->map_size = size;
        return (char *)h + HEADER;
    }
    size_t shift = class_of(n ? n : 1);
    void *block = free_lists[shift];
    if (block) {
        free_lists[shift] = *(void **)block;
        return block;
    }
    h = carve(HEADER + ((size_t)1 << shift));
    if (!h) {
        errno = ENOMEM;
        return 0;
    }
    h->shift = shift;
    return (char *)h + HEADER;
}

void *malloc(size_t n)
{
    return alloc(n);
}

static struct header *header_of(void *p)
{
    return (struct header *)((char *)p - HEADER);
}

void free(void *p)
{
    if (!p)
        return;
    struct header *h = header_of(p);
    if (h->shift == BIG) {
        munmap(h, h->map_size);
        return;
    }
    if (h->shift == ALIGNED) {
        char *base = (char *)h->map_size;
        munmap(base, *(size_t *)base);
        return;
    }
    *(void **)p = free_lists[h->shift];
    free_lists[h->shift] = p;
}

size_t malloc_usable_size(void *p)
{
    if (!p)
        return 0;
    struct header *h = header_of(p);
    if (h->shift == BIG)
        return h->map_size - HEADER;
    if (h->shift == ALIGNED) {
        char *base = (char *)h->map_size;
        return *(size_t *)base - ((char *)p - base);
    }
    return (size_t)1 << h->shift;
}

void *calloc(size_t count, size_t size)
{
    if (size && count > SIZE_MAX / size) {
        errno = ENOMEM;
        return 0;
    }
    void *p = alloc(count * size);
    if (p && header_of(p)->shift <= MAX_SHIFT)   /* a block of its own mapping is zero */
        memset(p, 0, count * size);
    return p;
}

void *realloc(void *p, size_t n)
{
    if (!p)
        return malloc(n);
    size_t have = malloc_usable_size(p);
    if (n <= have && header_of(p)->shift <= MAX_SHIFT)
        return p;
    void *q = malloc(n);
    if (!q)
        return 0;
    memcpy(q, p, have < n ? have : n);
    free(p);
    return q;
}

/* Aligned blocks get a mapping of their own: the size of the mapping is kept
 * in its first word, and the header before the block says ALIGNED and points
 * at that word.  Rare in the guest's programs. */
void *aligned_alloc(size_t align, size_t n)
{
    if (!align || (align & (align - 1))) {
        errno = EINVAL;
        return 0;
    }
    if (align <= HEADER)
        return malloc(n);
    if (n > SIZE_MAX / 2 || align > SIZE_MAX / 4) {
        errno = ENOMEM;
        return 0;
    }
    size_t size = (n + align + 2 * HEADER + 4095) & ~(size_t)4095;
    char *base = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        errno = ENOMEM;
        return 0;
    }
    *(size_t *)base = size;
    uintptr_t user = ((uintptr_t)base + 2 * HEADER + align - 1) & ~(uintptr_t)(align - 1);
    struct header *h = header_of((void *)user);
    h->shift = ALIGNED;
    h->map_size = (size_t)base;     /* for ALIGNED: where the mapping starts */
    return (void *)user;
}

int posix_memalign(void **out, size_t align, size_t n)
{
    if (align < sizeof(void *) || (align & (align - 1)))
        return EINVAL;
    void *p = aligned_alloc(align, n);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

void *memalign(size_t align, size_t n)
{
    return aligned_alloc(align, n);
}
