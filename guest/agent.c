/*
 * pyvmm guest agent: runs the host's commands and sends back their output
 * and status over a virtio-console port (protocol: agent.h, pyvmm/agent.py).
 *
 * It runs inside PID 1 (/init), single-threaded, around one poll() loop:
 * the port, the running command's stdout and stderr pipes, and a self-pipe
 * written by the SIGCHLD handler.  Commands are started with posix_spawn
 * (vfork-like: on PVM hosts every page-table copy of a fork is emulated
 * kernel work).  One command runs at a time; it gets /dev/null as stdin and
 * a session of its own, so KILL reaches everything it started.
 *
 * The standby shell: starting /bin/sh (busybox) costs about 0.5 s of
 * emulated kernel work on a PVM host, so a shell is started ahead of time,
 * waiting on its stdin for the name of a file that holds the command (it
 * then sources it: `exit N` and the status behave as with sh -c).  It is
 * started before the snapshot point, so a restored guest runs its first
 * command at once.  Later commands start their own shell: on one vCPU a
 * standby started right after a command only delays the next one (measured:
 * 0.48 -> 0.69 s to the first output of back-to-back commands).
 */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* <linux/random.h> (musl has no kernel headers): add entropy, then reseed the crng. */
#define RNDADDENTROPY 0x40085203  /* _IOW('R', 0x03, int[2]) */
#define RNDRESEEDCRNG 0x5207      /* _IO('R', 0x07), Linux 4.17+ */

#define OPEN_TRIES 50             /* x 100 ms: the hvc node may appear after init starts */
#define CHUNK 16384               /* bytes of command output per frame */
#define COMMAND_FILE "/tmp/.pyvmm-agent-command"
/* The standby shell: says it is up (one byte on stderr, which the agent eats),
 * reads a file name, makes /dev/null its stdin, sources the file. */
#define STANDBY_SCRIPT "printf . >&2; IFS= read -r f && exec </dev/null && . \"$f\""
#define STANDBY_WAIT_MS 10000   /* for the standby to be up before the snapshot point */
#define CONSOLE_SHELL_IDLE_MS 1000  /* the console shell starts once the agent is idle */

extern char **environ;

static int port = -1;
static unsigned char rbuf[sizeof(struct agent_frame_header) + AGENT_MAX_PAYLOAD + 1];
static size_t rlen;
static int sigchld_pipe[2] = {-1, -1};

/* ---- frames ---- */

static bool write_all_fd(int fd, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        p += n;
        len -= (size_t)n;
    }
    return true;
}

static bool send_frame(uint8_t type, const void *payload, size_t len)
{
    static unsigned char out[sizeof(struct agent_frame_header) + AGENT_MAX_PAYLOAD];
    struct agent_frame_header h = {.type = type, .length = (uint32_t)len};
    if (len > AGENT_MAX_PAYLOAD)
        return false;
    memcpy(out, &h, sizeof(h));
    if (len)
        memcpy(out + sizeof(h), payload, len);
    return write_all_fd(port, out, sizeof(h) + len);
}

static void send_text(uint8_t type, const char *text)
{
    send_frame(type, text, strlen(text));
}

/* Read more bytes from the port into rbuf; false when the port is broken. */
static bool fill(void)
{
    for (;;) {
        ssize_t n = read(port, rbuf + rlen, sizeof(rbuf) - 1 - rlen);
        if (n > 0) {
            rlen += (size_t)n;
            return true;
        }
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            return true;
        return false;
    }
}

/* The header of the next whole frame in rbuf (its payload follows it there), or NULL. */
static struct agent_frame_header *next_frame(void)
{
    static struct agent_frame_header h;
    if (rlen < sizeof(h))
        return NULL;
    memcpy(&h, rbuf, sizeof(h));
    if (h.length > AGENT_MAX_PAYLOAD) { /* the stream cannot be trusted: drop it all */
        rlen = 0;
        send_text(AGENT_ERROR, "frame too long");
        return NULL;
    }
    if (rlen < sizeof(h) + h.length)
        return NULL;
    return &h;
}

/* Drop the frame next_frame() returned; the caller has used its payload. */
static void consume(const struct agent_frame_header *h)
{
    size_t n = sizeof(*h) + h->length;
    memmove(rbuf, rbuf + n, rlen - n);
    rlen -= n;
}

/* Copy the frame's payload out as a NUL-terminated string into dst (size cap). */
static void payload_text(const struct agent_frame_header *h, char *dst, size_t cap)
{
    size_t n = h->length < cap - 1 ? h->length : cap - 1;
    memcpy(dst, rbuf + sizeof(*h), n);
    dst[n] = '\0';
}

/* ---- start: HELLO, CONFIG ---- */

static void make_raw(int fd)
{
    struct termios t;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        tcsetattr(fd, TCSANOW, &t);
    }
}

static void apply_config(const struct agent_config *c, char *words, agent_word_fn on_word)
{
    if (c->flags & AGENT_CONFIG_SET_CLOCK) {
        struct timespec ts = {.tv_sec = (time_t)c->realtime_sec, .tv_nsec = (long)c->realtime_nsec};
        clock_settime(CLOCK_REALTIME, &ts);
    }
    if (c->flags & AGENT_CONFIG_ENTROPY) {
        struct {
            int entropy_count; /* bits credited */
            int buf_size;
            unsigned char buf[AGENT_ENTROPY_BYTES];
        } pool = {.entropy_count = AGENT_ENTROPY_BYTES * 8, .buf_size = AGENT_ENTROPY_BYTES};
        memcpy(pool.buf, c->entropy, sizeof(pool.buf));
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            ioctl(fd, RNDADDENTROPY, &pool);
            ioctl(fd, RNDRESEEDCRNG);
            close(fd);
        }
    }
    for (char *w = strtok(words, " \t\n"); w; w = strtok(NULL, " \t\n"))
        on_word(w);
}

bool agent_start(const char *device, agent_word_fn on_word, agent_setup_fn setup)
{
    static char words[4096];
    char path[64] = "/dev/";
    if (strlen(device) >= sizeof(path) - 5 || strchr(device, '/'))
        return false;
    strcat(path, device);
    for (int i = 0; i < OPEN_TRIES && port < 0; i++) {
        port = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (port < 0)
            usleep(100000);
    }
    if (port < 0)
        return false;
    make_raw(port);
    uint32_t version = AGENT_VERSION;
    if (!send_frame(AGENT_HELLO, &version, sizeof(version)))
        return false;
    for (;;) {
        struct agent_frame_header *h;
        while ((h = next_frame()) != NULL) {
            if (h->type == AGENT_CONFIG && h->length >= sizeof(struct agent_config)) {
                struct agent_config c;
                memcpy(&c, rbuf + sizeof(*h), sizeof(c));
                size_t n = h->length - sizeof(c);
                if (n >= sizeof(words))
                    n = sizeof(words) - 1;
                memcpy(words, rbuf + sizeof(*h) + sizeof(c), n);
                words[n] = '\0';
                consume(h);
                apply_config(&c, words, on_word);
                const char *failed = setup();
                send_text(AGENT_READY, failed);
                return true;
            }
            consume(h);
            send_text(AGENT_ERROR, "waiting for CONFIG");
        }
        if (!fill())
            return false;
    }
}

/* ---- serving commands ---- */

struct command {
    pid_t pid;      /* -1: none running */
    int out, err;   /* read ends of its stdout/stderr pipes, -1 when closed */
    int in;         /* standby shell only: write end of its stdin, -1 otherwise */
    int status;
    bool exited;
};

static struct command standby = {.pid = -1, .out = -1, .err = -1, .in = -1};

static void on_sigchld(int sig)
{
    (void)sig;
    int saved = errno;
    ssize_t ignored = write(sigchld_pipe[1], "", 1);
    (void)ignored;
    errno = saved;
}

static void setup_sigchld(void)
{
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        return;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
}

/* posix_spawn /bin/sh with argv, stdin from `in_fd` (or /dev/null when < 0), stdout
 * and stderr into new pipes; fills cmd (pid, out, err) and returns true on success. */
static bool spawn_shell_with_pipes(struct command *cmd, char *const argv[], int in_fd)
{
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) != 0)
        return false;
    if (pipe2(err, O_CLOEXEC) != 0) {
        close(out[0]);
        close(out[1]);
        return false;
    }
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t defaults, none;
    posix_spawn_file_actions_init(&fa);
    if (in_fd >= 0)
        posix_spawn_file_actions_adddup2(&fa, in_fd, 0);
    else
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    posix_spawnattr_init(&attr);
    sigfillset(&defaults);
    sigemptyset(&none);
    posix_spawnattr_setsigdefault(&attr, &defaults); /* init's handlers are not the command's */
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    pid_t pid;
    int rc = posix_spawn(&pid, "/bin/sh", &fa, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    close(out[1]);
    close(err[1]);
    if (rc != 0) {
        close(out[0]);
        close(err[0]);
        return false;
    }
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    *cmd = (struct command){.pid = pid, .out = out[0], .err = err[0], .in = -1};
    return true;
}

/* Wait until the standby shell has started (its "." on stderr): a snapshot then holds
 * a shell blocked in read, not one half-way through its start-up. */
static void wait_standby_up(void)
{
    struct pollfd p = {.fd = standby.err, .events = POLLIN};
    char dot;
    while (poll(&p, 1, STANDBY_WAIT_MS) < 0 && errno == EINTR)
        ;
    if (p.revents && read(standby.err, &dot, 1) == 1)
        return;
    close(standby.in); /* no sign of it: it reads EOF and ends; commands start their own */
    standby.in = -1;
}

void agent_prepare(void)
{
    int in[2];
    if (standby.pid >= 0 || pipe2(in, O_CLOEXEC) != 0)
        return;
    char *const argv[] = {"sh", "-c", STANDBY_SCRIPT, NULL};
    if (spawn_shell_with_pipes(&standby, argv, in[0]))
        standby.in = in[1];
    else
        close(in[1]);
    close(in[0]);
    if (standby.pid >= 0)
        wait_standby_up();
}

/* Hand `text` to the standby shell; false when there is none or it cannot take it. */
static bool use_standby(struct command *cmd, const char *text)
{
    if (standby.pid < 0 || standby.in < 0)
        return false;
    int fd = open(COMMAND_FILE, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return false;
    bool ok = write_all_fd(fd, text, strlen(text)) && write_all_fd(fd, "\n", 1);
    close(fd);
    ok = ok && write_all_fd(standby.in, COMMAND_FILE "\n", sizeof(COMMAND_FILE));
    close(standby.in);
    standby.in = -1;
    *cmd = standby;
    standby = (struct command){.pid = -1, .out = -1, .err = -1, .in = -1};
    if (!ok)  /* the shell reads EOF and exits: its status tells */
        send_text(AGENT_STDERR, "pyvmm-agent: cannot hand the command to the shell\n");
    return true;
}

static void spawn_command(struct command *cmd, const char *text)
{
    if (use_standby(cmd, text))
        return;
    char *const argv[] = {"sh", "-c", (char *)text, NULL};
    if (spawn_shell_with_pipes(cmd, argv, -1))
        return;
    send_text(AGENT_STDERR, "pyvmm-agent: cannot start /bin/sh\n");
    int32_t status = 127;
    send_frame(AGENT_EXIT, &status, sizeof(status));
}

/* Forward what a pipe has; close it at end of file.  `all`: until it is empty. */
static void forward(int *fd, uint8_t type, bool all)
{
    static unsigned char buf[CHUNK];
    do {
        ssize_t n = read(*fd, buf, sizeof(buf));
        if (n > 0) {
            send_frame(type, buf, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || errno != EAGAIN) {
            close(*fd);
            *fd = -1;
        }
        return;
    } while (all);
}

static void reap(struct command *cmd, pid_t *shell)
{
    char drain[64];
    while (read(sigchld_pipe[0], drain, sizeof(drain)) > 0)
        ;
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p <= 0)
            return;
        if (p == cmd->pid) {
            cmd->exited = true;
            cmd->status = WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
        } else if (p == standby.pid) {  /* it died waiting: drop it, a new one comes later */
            close(standby.in);
            close(standby.out);
            close(standby.err);
            standby = (struct command){.pid = -1, .out = -1, .err = -1, .in = -1};
        } else if (p == *shell) {
            *shell = -1;
        }
    }
}

/* The command has exited: send what its pipes still hold, then its status.
 * Background children that keep the pipes open lose them here. */
static void finish(struct command *cmd)
{
    if (cmd->out >= 0)
        forward(&cmd->out, AGENT_STDOUT, true);
    if (cmd->err >= 0)
        forward(&cmd->err, AGENT_STDERR, true);
    if (cmd->out >= 0)
        close(cmd->out);
    if (cmd->err >= 0)
        close(cmd->err);
    sync(); /* what it wrote to a share is on the host before the host hears EXIT */
    int32_t status = cmd->status;
    send_frame(AGENT_EXIT, &status, sizeof(status));
    *cmd = (struct command){.pid = -1, .out = -1, .err = -1, .in = -1};
    unlink(COMMAND_FILE);
}

static void handle_frame(struct command *cmd, const struct agent_frame_header *h)
{
    static char text[AGENT_MAX_PAYLOAD + 1];
    if (h->type == AGENT_EXEC) {
        if (cmd->pid >= 0) {
            send_text(AGENT_ERROR, "a command is still running");
            return;
        }
        payload_text(h, text, sizeof(text));
        spawn_command(cmd, text);
    } else if (h->type == AGENT_KILL && h->length == 4) {
        uint32_t sig;
        memcpy(&sig, rbuf + sizeof(*h), 4);
        if (cmd->pid >= 0 && sig > 0 && sig < 65)
            kill(-cmd->pid, (int)sig);
    } else {
        send_text(AGENT_ERROR, "unexpected frame");
    }
}

void agent_serve(int (*console_shell)(void))
{
    struct command cmd = {.pid = -1, .out = -1, .err = -1, .in = -1};
    pid_t shell = -1;
    bool shell_due = console_shell != NULL;
    setup_sigchld();
    for (;;) {
        struct pollfd fds[4] = {
            {.fd = port, .events = POLLIN},
            {.fd = sigchld_pipe[0], .events = POLLIN},
            {.fd = cmd.out, .events = POLLIN},
            {.fd = cmd.err, .events = POLLIN},
        };
        /* The console shell costs a fork+exec: start it when the agent is idle, so that
         * it never delays the host's first command. */
        int timeout = shell_due && cmd.pid < 0 ? CONSOLE_SHELL_IDLE_MS : -1;
        int ready = poll(fds, 4, timeout);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        if (ready == 0) {
            shell = console_shell();
            shell_due = false;
            continue;
        }
        if (fds[1].revents)
            reap(&cmd, &shell);
        if (cmd.out >= 0 && fds[2].revents)
            forward(&cmd.out, AGENT_STDOUT, false);
        if (cmd.err >= 0 && fds[3].revents)
            forward(&cmd.err, AGENT_STDERR, false);
        if (cmd.pid >= 0 && cmd.exited)
            finish(&cmd);
        if (fds[0].revents) {
            if (!fill())
                return;
            struct agent_frame_header *h;
            while ((h = next_frame()) != NULL) {
                handle_frame(&cmd, h);
                consume(h);
            }
        }
    }
}
