"""guest/malloc.c, the allocator of the guest's static musl programs: a random mix of
malloc, calloc, realloc, posix_memalign and free, every block filled and checked, built
and run on the host with musl-gcc (the compiler the guest's programs are built with)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parent.parent / "guest"

STRESS = r"""
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#define N 2048
static unsigned char *ptr[N];
static size_t len[N];
static unsigned char tag[N];
static uint64_t rng;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
/* sizes across every class, the class edges and the own-mapping path */
static size_t pick(void) {
    switch (next() % 8) {
    case 0: return 0;
    case 1: return (size_t)1 << (next() % 19);            /* exactly a class size */
    case 2: return ((size_t)1 << (next() % 19)) + 1;      /* one past it */
    case 3: return next() % 600000;                       /* up to the own mappings */
    default: return next() % 300;
    }
}
static void fill(int i) { for (size_t j = 0; j < len[i]; j++) ptr[i][j] = (unsigned char)(tag[i] + j); }
static int intact(int i, size_t n) {
    for (size_t j = 0; j < n; j++) if (ptr[i][j] != (unsigned char)(tag[i] + j)) return 0;
    return 1;
}
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    long ops = atol(argv[1]);
    rng = strtoull(argv[2], 0, 0) | 1;
    for (long op = 0; op < ops; op++) {
        int i = next() % N, kind = next() % 5;
        if (ptr[i] && !intact(i, len[i])) { printf("block %d corrupted\n", i); return 1; }
        if (kind == 0 && ptr[i]) { free(ptr[i]); ptr[i] = 0; continue; }
        if (kind == 1 && ptr[i]) {
            size_t n = pick(), keep = len[i] < n ? len[i] : n;
            unsigned char *q = realloc(ptr[i], n);
            if (!q && n) { puts("realloc failed"); return 1; }
            if (!q) continue;          /* realloc(p, 0) may free p and return NULL */
            ptr[i] = q;
            if (!intact(i, keep)) { puts("realloc lost data"); return 1; }
            len[i] = n; fill(i); continue;
        }
        free(ptr[i]);
        len[i] = pick(); tag[i] = (unsigned char)next();
        if (kind == 2) {
            size_t align = (size_t)1 << (3 + next() % 19);   /* 8 bytes to 2 MiB */
            void *p = 0;
            if (posix_memalign(&p, align, len[i])) { puts("posix_memalign failed"); return 1; }
            if ((uintptr_t)p % align) { puts("misaligned"); return 1; }
            ptr[i] = p;
        } else if (kind == 3) {
            ptr[i] = calloc(len[i], 1);
            for (size_t j = 0; ptr[i] && j < len[i]; j++)
                if (ptr[i][j]) { puts("calloc gave a non-zero byte"); return 1; }
        } else {
            ptr[i] = malloc(len[i]);
        }
        if (!ptr[i]) { puts("allocation failed"); return 1; }
        if ((uintptr_t)ptr[i] % 16) { puts("not 16-byte aligned"); return 1; }
        if (malloc_usable_size(ptr[i]) < len[i]) { puts("usable size too small"); return 1; }
        fill(i);
    }
    volatile size_t half = SIZE_MAX / 2, huge = SIZE_MAX - 8;   /* opaque to the compiler */
    if (calloc(half, 4) || malloc(huge)) { puts("an impossible size succeeded"); return 1; }
    void *p;
    if (posix_memalign(&p, 24, 8) == 0) { puts("posix_memalign took a non-power of two"); return 1; }
    for (int i = 0; i < N; i++) {
        if (ptr[i] && !intact(i, len[i])) { printf("block %d corrupted\n", i); return 1; }
        free(ptr[i]);
    }
    puts("ok");
    return 0;
}
"""


@pytest.fixture(scope="module")
def stress(tmp_path_factory) -> Path:
    cc = shutil.which("musl-gcc")
    if cc is None:
        pytest.fail("musl-gcc not found: apt-get install musl-tools (the guest is built with it)")
    d = tmp_path_factory.mktemp("malloc")
    (d / "stress.c").write_text(STRESS)
    exe = d / "stress"
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-o", str(exe),
                    str(d / "stress.c"), str(GUEST / "malloc.c")], check=True, capture_output=True)
    return exe


@pytest.mark.parametrize("seed", ["1", "0x5eed", "0xdeadbeef"])
def test_malloc_keeps_every_block_intact(stress, seed):
    r = subprocess.run([str(stress), "40000", seed], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stdout + r.stderr

