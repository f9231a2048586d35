/*
 * /bin/pyvmm-helpers: the static helpers of guest/helpers/ in one program,
 * the way busybox holds its applets.  /bin/pattern, /bin/daxtool, ... are
 * links to it, and it runs the helper its name (argv[0]) says; as
 * `pyvmm-helpers NAME ARGS...` it runs NAME.
 *
 * Why one program: every helper linked on its own carried its own copy of
 * the C library, about 30 KB each, and on PVM hosts the guest kernel copies
 * every byte of the initramfs in its instruction emulator at each boot
 * (docs/pvm.md).  Seven helpers took 278 KB that way and take 59 KB this
 * way, and the kernel's unpacking went from 0.89-0.94 s to 0.78-0.80 s.
 *
 * guest/build-initramfs.sh compiles each helper with -Dmain=NAME_main and
 * checks that every guest/helpers/NAME.c has its line in `helpers` below.
 */
#include <stdio.h>
#include <string.h>

typedef int helper_main(int argc, char **argv);

helper_main blkbench_main, daxtool_main, metabench_main, mmapread_main,
    mmapwrite_main, pattern_main, rwbench_main;

static const struct {
    const char *name;
    helper_main *main;
} helpers[] = {
    {"blkbench", blkbench_main},
    {"daxtool", daxtool_main},
    {"metabench", metabench_main},
    {"mmapread", mmapread_main},
    {"mmapwrite", mmapwrite_main},
    {"pattern", pattern_main},
    {"rwbench", rwbench_main},
};

static helper_main *find(const char *path)
{
    const char *name = strrchr(path, '/');
    size_t i;

    name = name ? name + 1 : path;
    for (i = 0; i < sizeof(helpers) / sizeof(helpers[0]); i++)
        if (strcmp(name, helpers[i].name) == 0)
            return helpers[i].main;
    return NULL;
}

int main(int argc, char **argv)
{
    helper_main *run = argc > 0 ? find(argv[0]) : NULL;
    size_t i;

    if (run)
        return run(argc, argv);
    if (argc > 1 && (run = find(argv[1])) != NULL)
        return run(argc - 1, argv + 1);
    fprintf(stderr, "usage: pyvmm-helpers NAME [ARGS...], or run it as NAME; NAME is one of:");
    for (i = 0; i < sizeof(helpers) / sizeof(helpers[0]); i++)
        fprintf(stderr, " %s", helpers[i].name);
    fprintf(stderr, "\n");
    return 127;
}
