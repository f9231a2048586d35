/*
 * pyvmm guest /init: a small static PID 1 implementing pyvmm's guest contract
 * (docs/guest-contract.md).
 *
 * Guest kernel work is very slow on PVM hosts (a syscall ~0.3 ms, fork+exec
 * ~138 ms, a page fault ~1.7 ms), so this program does its job with few
 * system calls, no stdio, and at most one fork+exec:
 *
 *   1. mount /proc, /sys, /dev (devtmpfs), /tmp (tmpfs);
 *   2. read /proc/cmdline;
 *   3. load /lib/modules/<name> listed in /lib/modules/load-order (finit_module);
 *   4. with `pyvmm.snapshot=1`: tell the VMM (a write to I/O port 0x502) that
 *      this is the snapshot point; after a restore the program goes on here;
 *   5. with `pyvmm.agent=DEV` (e.g. hvc0): say HELLO on that virtio-console
 *      port and take more words (shares), the wall clock and fresh entropy
 *      from the host's CONFIG (agent.c);
 *   6. mount each `pyvmm.share=TAG[:dax][:ro]` (virtiofs) at /mnt/TAG
 *      (`pyvmm.dax=1`: every share with -o dax);
 *   7. print "pyvmm-guest: ready";
 *   7a. with `pyvmm.memory=START+SIZE[,...]` (pyvmm on a PVM host boots a large
 *      guest with `mem=256M`): a niced child adds that RAM, one 128 MiB memory
 *      block at a time, through /sys/devices/system/memory/probe (auto-onlined
 *      by `memhp_default_state=online`); in a snapshot boot it is added before
 *      the snapshot point instead, so that no restore pays for it;
 *   8. with the agent: serve the host's commands (and a shell on the console);
 *      with `pyvmm.run=PATH`: run `/bin/sh PATH`, print "pyvmm-guest: exit N",
 *      sync, write N to the debug-exit port 0x501 through /dev/port; fall back
 *      to reboot(RB_AUTOBOOT) if the VMM is still running us.
 *      Otherwise: an interactive shell with a controlling tty; reboot when it exits.
 *
 * PID 1 never exits: it reaps every child, and SIGTERM / SIGUSR2 / SIGUSR1
 * (what busybox reboot / poweroff / halt send to init) end the machine.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define DEBUG_EXIT_PORT 0x501 /* pyvmm's isa-debug-exit style port */
#define SNAPSHOT_PORT 0x502   /* pyvmm's snapshot point: the VMM pauses on this write */
#define MODULE_DIR "/lib/modules"
#define MAX_SHARES 16
#define MAX_MEMORY_RANGES 4
/* Memory block size on x86-64 while boot RAM is below 64 GiB
 * (probe_memory_block_size, arch/x86/mm/init_64.c): the unit of a probe. */
#define MEMORY_BLOCK (128UL << 20)
#define MEMORY_PROBE "/sys/devices/system/memory/probe"
/* The adding child's nice value: a command started at "ready" keeps most of the
 * vCPU, while RAM still comes online far faster than a PVM guest can fill it. */
#define MEMORY_NICE 5
#define TAG_MAX 64

struct share {
    char tag[TAG_MAX];
    bool dax;
    bool readonly;
};

struct memory_range {
    unsigned long start, size; /* guest-physical, both multiples of MEMORY_BLOCK */
};

struct config {
    struct share shares[MAX_SHARES];
    int nshares;
    struct memory_range memory[MAX_MEMORY_RANGES]; /* RAM to add after the boot */
    int nmemory;
    bool dax; /* pyvmm.dax=1: every share */
    bool debug;
    bool snapshot;
    const char *agent; /* virtio-console device of the agent, e.g. "hvc0" */
    const char *run;   /* script path, or NULL for an interactive shell */
};

static struct config cfg;
static char cmdline[4096];
static bool debug_on;
static char *const child_env[] = {
    "PATH=/bin:/sbin", "HOME=/", "TERM=linux", "PS1=pyvmm:\\w# ", NULL,
};

/* ---- console output: one write() per line, no stdio ---- */

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

/* Print "pyvmm-guest: " + the concatenation of the NULL-terminated string args + "\n". */
static void say(const char *first, ...)
{
    char line[512] = "pyvmm-guest: ";
    size_t len = strlen(line);
    va_list ap;
    va_start(ap, first);
    for (const char *s = first; s != NULL; s = va_arg(ap, const char *)) {
        size_t n = strnlen(s, sizeof(line) - 1 - len);
        memcpy(line + len, s, n);
        len += n;
    }
    va_end(ap);
    line[len++] = '\n';
    write_all(STDOUT_FILENO, line, len);
}

/* Decimal text of a non-negative number (buf must hold 21 bytes). */
static const char *utoa(unsigned long value, char *buf)
{
    char *p = buf + 20;
    *p = '\0';
    do {
        *--p = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    return p;
}

/* Debug line with the uptime in milliseconds, only with pyvmm.debug=1. */
static void debug(const char *what, const char *arg)
{
    struct timespec ts;
    char ms[21];
    if (!debug_on)
        return;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    say("debug: ", utoa((unsigned long)ts.tv_sec * 1000 + (unsigned long)ts.tv_nsec / 1000000, ms),
        " ms: ", what, arg ? " " : "", arg ? arg : "", NULL);
}

/* ---- early setup ---- */

/* If the kernel could not open /dev/console for us, do it now (after devtmpfs). */
static void ensure_console(void)
{
    if (fcntl(STDOUT_FILENO, F_GETFD) >= 0)
        return;
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0)
        return;
    for (int i = 0; i < 3; i++)
        if (fd != i)
            dup2(fd, i);
    if (fd > 2)
        close(fd);
}

static void mount_one(const char *src, const char *dir, const char *type, const char *data)
{
    mkdir(dir, 0755); /* EEXIST is the normal case */
    if (mount(src, dir, type, MS_NOSUID, data) != 0 && errno != EBUSY)
        say("mount ", dir, " failed: ", strerror(errno), NULL);
}

static void mount_basics(void)
{
    mount_one("proc", "/proc", "proc", NULL);
    mount_one("sysfs", "/sys", "sysfs", NULL);
    mount_one("devtmpfs", "/dev", "devtmpfs", NULL); /* EBUSY if DEVTMPFS_MOUNT did it */
    mount_one("tmpfs", "/tmp", "tmpfs", "mode=1777");
}

/* Read /proc/cmdline into the static buffer (NUL-terminated, newline dropped). */
static void read_cmdline(void)
{
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, cmdline, sizeof(cmdline) - 1);
    if (fd >= 0)
        close(fd);
    cmdline[n > 0 ? n : 0] = '\0';
    char *nl = strchr(cmdline, '\n');
    if (nl)
        *nl = '\0';
}

/* `TAG[:dax][:ro]` -> a share; false for an empty tag, a bad option or a long tag. */
static bool parse_share(const char *spec, struct share *out)
{
    const char *colon = strchr(spec, ':');
    size_t len = colon ? (size_t)(colon - spec) : strlen(spec);
    if (len == 0 || len >= TAG_MAX)
        return false;
    memset(out, 0, sizeof(*out));
    memcpy(out->tag, spec, len);
    while (colon) {
        const char *opt = colon + 1;
        colon = strchr(opt, ':');
        size_t n = colon ? (size_t)(colon - opt) : strlen(opt);
        if (n == 3 && strncmp(opt, "dax", 3) == 0)
            out->dax = true;
        else if (n == 2 && strncmp(opt, "ro", 2) == 0)
            out->readonly = true;
        else
            return false;
    }
    return true;
}

/* `START+SIZE[,START+SIZE...]` (numbers in C syntax, block-aligned) -> c->memory;
 * false (nothing kept) for anything else. */
static bool parse_memory(struct config *c, const char *spec)
{
    int n = 0;
    struct memory_range ranges[MAX_MEMORY_RANGES];
    for (const char *p = spec;; p++) {
        char *end;
        if (n == MAX_MEMORY_RANGES)
            return false;
        errno = 0;
        ranges[n].start = strtoul(p, &end, 0);
        if (end == p || *end != '+' || errno)
            return false;
        p = end + 1;
        ranges[n].size = strtoul(p, &end, 0);
        if (end == p || errno || ranges[n].size == 0 || ranges[n].start % MEMORY_BLOCK
            || ranges[n].size % MEMORY_BLOCK || ranges[n].start + ranges[n].size < ranges[n].start)
            return false;
        n++;
        p = end;
        if (*p == '\0')
            break;
        if (*p != ',')
            return false;
    }
    memcpy(c->memory, ranges, sizeof(ranges[0]) * (size_t)n);
    c->nmemory = n;
    return true;
}

/* Record one pyvmm.* word; other words are the kernel's business. */
static void parse_word(struct config *c, char *word)
{
    if (strncmp(word, "pyvmm.share=", 12) == 0 && word[12] != '\0') {
        struct share sh;
        if (!parse_share(word + 12, &sh)) {
            say("bad share word: ", word, NULL);
            return;
        }
        for (int i = 0; i < c->nshares; i++)
            if (strcmp(c->shares[i].tag, sh.tag) == 0)
                return; /* words after "--" are in both /proc/cmdline and argv */
        if (c->nshares < MAX_SHARES)
            c->shares[c->nshares++] = sh;
    } else if (strncmp(word, "pyvmm.memory=", 13) == 0) {
        if (!parse_memory(c, word + 13))
            say("bad memory word: ", word, NULL);
    } else if (strcmp(word, "pyvmm.dax=1") == 0) {
        c->dax = true;
    } else if (strcmp(word, "pyvmm.debug=1") == 0) {
        c->debug = true;
    } else if (strcmp(word, "pyvmm.snapshot=1") == 0) {
        c->snapshot = true;
    } else if (strncmp(word, "pyvmm.agent=", 12) == 0 && word[12] != '\0') {
        c->agent = word + 12;
    } else if (strncmp(word, "pyvmm.run=", 10) == 0 && word[10] != '\0') {
        c->run = word + 10;
    }
}

/* Words from the agent's CONFIG frame (after a restore: the shares of this run). */
static void agent_word(char *word)
{
    parse_word(&cfg, word);
}

/*
 * Words come from /proc/cmdline (the kernel keeps dotted words out of init's
 * argv) and then from argv (words after "--" on the kernel command line, or
 * given by hand when /init is tried out in a container).
 */
static void parse_cmdline(struct config *c, int argc, char **argv)
{
    for (char *word = strtok(cmdline, " \t"); word; word = strtok(NULL, " \t"))
        parse_word(c, word);
    for (int i = 1; i < argc; i++)
        parse_word(c, argv[i]);
}

/* ---- kernel modules (Debian stock kernel) ---- */

static void load_module(const char *name)
{
    char path[256] = MODULE_DIR "/";
    if (strlen(path) + strlen(name) >= sizeof(path) || strchr(name, '/')) {
        say("module ", name, " failed: bad name", NULL);
        return;
    }
    strcat(path, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        say("module ", name, " failed: ", strerror(errno), NULL);
        return;
    }
    if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
        say("module ", name, " failed: ", strerror(errno), NULL);
    else
        debug("loaded module", name);
    close(fd);
}

/* load-order: one module file name per line, dependencies first. */
static void load_modules(void)
{
    static char list[8192];
    int fd = open(MODULE_DIR "/load-order", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, list, sizeof(list) - 1);
    close(fd);
    list[n > 0 ? n : 0] = '\0';
    for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n"))
        if (line[0] != '\0' && line[0] != '#')
            load_module(line);
}

/* ---- virtio-fs shares ---- */

static bool valid_tag(const char *tag)
{
    return strchr(tag, '/') == NULL && strcmp(tag, ".") != 0 && strcmp(tag, "..") != 0 &&
           strlen(tag) < 200;
}

/* Mount one share at /mnt/TAG; false (and a console line) when that fails. */
static bool mount_share(const struct share *sh, bool dax)
{
    char dir[256] = "/mnt/";
    if (!valid_tag(sh->tag)) {
        say("mount ", sh->tag, " failed: bad tag", NULL);
        return false;
    }
    strcat(dir, sh->tag);
    mkdir("/mnt", 0755);
    mkdir(dir, 0755);
    if (mount(sh->tag, dir, "virtiofs", sh->readonly ? MS_RDONLY : 0, dax ? "dax" : NULL) != 0) {
        say("mount ", sh->tag, " failed: ", strerror(errno), NULL);
        return false;
    }
    debug(dax ? "mounted virtiofs (dax)" : "mounted virtiofs", dir);
    return true;
}

/* Mount every share; returns the tags that failed ("" when none), for the agent's READY. */
static const char *mount_shares(void)
{
    static char failed[512];
    failed[0] = '\0';
    for (int i = 0; i < cfg.nshares; i++) {
        if (!mount_share(&cfg.shares[i], cfg.dax || cfg.shares[i].dax) &&
            strlen(failed) + strlen(cfg.shares[i].tag) + 16 < sizeof(failed)) {
            strcat(failed, "mount ");
            strcat(failed, cfg.shares[i].tag);
            strcat(failed, " failed\n");
        }
    }
    return failed;
}

/* ---- ending the machine ---- */

/* ---- RAM added after the boot (pyvmm.memory=) ---- */

/* Hex text of a number (buf must hold 19 bytes). */
static const char *xtoa(unsigned long value, char *buf)
{
    char *p = buf + 18;
    *p = '\0';
    do {
        *--p = "0123456789abcdef"[value & 0xf];
        value >>= 4;
    } while (value != 0);
    *--p = 'x';
    *--p = '0';
    return p;
}

/* Add (and, with memhp_default_state=online, online) every block of cfg.memory.
 * Each probe sets up the block's struct pages: ~2 s of emulated kernel work on PVM. */
static void add_memory_now(void)
{
    char hex[19], mib[21];
    unsigned long added = 0;
    for (int i = 0; i < cfg.nmemory; i++) {
        const struct memory_range *r = &cfg.memory[i];
        for (unsigned long a = r->start; a < r->start + r->size; a += MEMORY_BLOCK) {
            const char *text = xtoa(a, hex);
            int fd = open(MEMORY_PROBE, O_WRONLY | O_CLOEXEC);
            ssize_t n = fd < 0 ? -1 : write(fd, text, strlen(text));
            int err = errno;
            if (fd >= 0)
                close(fd);
            if (n < 0 && err != EEXIST) { /* EEXIST: added before (a second call) */
                say("memory: cannot add the block at ", text, ": ", strerror(err), NULL);
                return;
            }
            added += MEMORY_BLOCK >> 20;
        }
    }
    debug("memory added, MiB:", utoa(added, mib));
}

/* After "ready": a niced child adds the RAM while the command runs (PID 1 reaps it). */
static void add_memory_later(void)
{
    if (cfg.nmemory == 0)
        return;
    pid_t pid = fork();
    if (pid != 0) {
        if (pid < 0)
            say("fork failed: ", strerror(errno), NULL);
        return;
    }
    signal(SIGTERM, SIG_DFL);
    signal(SIGUSR1, SIG_DFL);
    signal(SIGUSR2, SIG_DFL);
    setpriority(PRIO_PROCESS, 0, MEMORY_NICE);
    add_memory_now();
    _exit(0);
}

static void reboot_now(int how)
{
    sync();
    reboot(how);
    say("reboot failed: ", strerror(errno), NULL);
}

/* SIGTERM: reboot, SIGUSR2: power off, SIGUSR1: halt (busybox init's convention). */
static void on_signal(int sig)
{
    reboot_now(sig == SIGUSR2 ? RB_POWER_OFF : sig == SIGUSR1 ? RB_HALT_SYSTEM : RB_AUTOBOOT);
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
}

/* Write one byte to an I/O port through /dev/port; false (and a console line) on failure. */
static bool port_write(unsigned port, unsigned char byte, const char *what)
{
    int fd = open("/dev/port", O_WRONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT && mknod("/dev/port", S_IFCHR | 0600, makedev(1, 4)) == 0)
        fd = open("/dev/port", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        say(what, ": /dev/port: ", strerror(errno), NULL);
        return false;
    }
    bool ok = pwrite(fd, &byte, 1, port) == 1;
    if (!ok)
        say(what, ": write: ", strerror(errno), NULL);
    close(fd);
    return ok;
}

/* Tell the VMM the exit status through the debug-exit port; returns only on failure. */
static void debug_exit(int status)
{
    if (port_write(DEBUG_EXIT_PORT, (unsigned char)status, "debug-exit"))
        say("debug-exit: the VMM did not stop, rebooting", NULL);
}

/* ---- children ---- */

/*
 * Make the real console device (e.g. ttyS0, the last name in
 * /sys/class/tty/console/active) our controlling terminal, as busybox
 * cttyhack does: /dev/console itself cannot be one, so job control needs this.
 */
static void take_console_tty(void)
{
    char name[64] = "/dev/";
    int fd = open("/sys/class/tty/console/active", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, name + 5, sizeof(name) - 6);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return;
    name[5 + n] = '\0';
    char *end = name + strcspn(name, "\n");
    *end = '\0';
    char *last = strrchr(name + 5, ' ');
    if (last)
        memmove(name + 5, last + 1, strlen(last + 1) + 1);
    fd = open(name, O_RDWR);
    if (fd < 0)
        return;
    for (int i = 0; i < 3; i++)
        dup2(fd, i);
    if (fd > 2)
        close(fd);
    ioctl(STDIN_FILENO, TIOCSCTTY, 1);
}

/* The interactive shell on the console beside the agent (Guest.send/expect). */
static int console_shell(void);

/* fork + exec /bin/sh [script]; returns the child's pid (or -1). */
static pid_t spawn_shell(const char *script)
{
    pid_t pid = fork();
    if (pid != 0) {
        if (pid < 0)
            say("fork failed: ", strerror(errno), NULL);
        return pid;
    }
    signal(SIGTERM, SIG_DFL);
    signal(SIGUSR1, SIG_DFL);
    signal(SIGUSR2, SIG_DFL);
    setsid();
    if (script == NULL)
        take_console_tty();
    char *const argv_run[] = {"sh", (char *)script, NULL};
    char *const argv_shell[] = {"sh", NULL};
    execve("/bin/sh", script ? argv_run : argv_shell, child_env);
    say("exec /bin/sh failed: ", strerror(errno), NULL);
    _exit(127);
}

/* Reap children until `pid` ends; returns its exit status (128+signal if killed). */
static int wait_for(pid_t pid)
{
    for (;;) {
        int status;
        pid_t got = waitpid(-1, &status, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return 127; /* ECHILD: nothing left to wait for */
        if (got != pid)
            continue; /* an orphan re-parented to us */
        if (WIFSIGNALED(status))
            return 128 + WTERMSIG(status);
        return WEXITSTATUS(status);
    }
}

static void run_script(const char *path)
{
    char num[21];
    debug("running", path);
    pid_t pid = spawn_shell(path);
    int status = pid < 0 ? 127 : wait_for(pid);
    if (status > 255)
        status = 255;
    say("exit ", utoa((unsigned long)status, num), NULL);
    sync();
    debug_exit(status);
}

static void interactive_shell(void)
{
    pid_t pid = spawn_shell(NULL);
    if (pid > 0)
        wait_for(pid);
}

static int console_shell(void)
{
    return spawn_shell(NULL);
}

int main(int argc, char **argv)
{
    memset(&cfg, 0, sizeof(cfg));
    install_signals();
    mount_basics();
    ensure_console();
    read_cmdline();
    parse_cmdline(&cfg, argc, argv);
    debug_on = cfg.debug;
    debug("mounted /proc /sys /dev /tmp", NULL);
    load_modules();
    if (cfg.agent)
        agent_prepare();
    if (cfg.snapshot) {
        add_memory_now(); /* once, in the snapshot boot, not after every restore */
        cfg.nmemory = 0;
        debug("snapshot point", NULL);
        port_write(SNAPSHOT_PORT, 1, "snapshot");
        debug("resumed after the snapshot point", NULL);
    }
    if (cfg.agent) {
        if (agent_start(cfg.agent, agent_word, mount_shares)) {
            debug_on = cfg.debug;
            say("ready", NULL);
            add_memory_later();
            agent_serve(console_shell);
            say("agent: the port ", cfg.agent, " broke", NULL);
        } else {
            say("agent: cannot use /dev/", cfg.agent, NULL);
        }
    } else {
        mount_shares();
        say("ready", NULL);
        add_memory_later();
        if (cfg.run)
            run_script(cfg.run);
        else
            interactive_shell();
    }
    reboot_now(RB_AUTOBOOT);
    for (;;) { /* PID 1 must never exit: keep reaping */
        if (waitpid(-1, NULL, 0) < 0 && errno == ECHILD)
            sleep(1);
    }
}
