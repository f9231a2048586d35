/*
 * The guest side of the pyvmm agent protocol (host side: pyvmm/agent.py).
 *
 * The agent talks to the host over a virtio-console port (a raw tty such
 * as /dev/hvc0) in frames: an 8-byte little-endian header
 *
 *     u8 type, u8 flags (0), u16 reserved (0), u32 length
 *
 * then `length` payload bytes (at most AGENT_MAX_PAYLOAD).  A session:
 *
 *   guest -> HELLO (u32 version)
 *   host  -> CONFIG (struct agent_config, then command-line words such as
 *            pyvmm.share=TAG:dax): set the wall clock, reseed the RNG, mount
 *   guest -> READY (text: what failed while mounting, usually nothing)
 *   host  -> EXEC (a command for /bin/sh -c)
 *   guest -> STDOUT / STDERR (the command's output, in chunks) ... EXIT (i32)
 *   host  -> KILL (u32 signal) for the running command's process group
 */
#ifndef PYVMM_AGENT_H
#define PYVMM_AGENT_H

#include <stdbool.h>
#include <stdint.h>

#define AGENT_VERSION 1
#define AGENT_MAX_PAYLOAD 65536
#define AGENT_ENTROPY_BYTES 64

enum agent_frame_type {
    AGENT_HELLO = 1,
    AGENT_CONFIG = 2,
    AGENT_READY = 3,
    AGENT_EXEC = 4,
    AGENT_STDOUT = 5,
    AGENT_STDERR = 6,
    AGENT_EXIT = 7,
    AGENT_KILL = 8,
    AGENT_ERROR = 9,
};

struct agent_frame_header {
    uint8_t type;
    uint8_t flags;
    uint16_t reserved;
    uint32_t length;
} __attribute__((packed));

#define AGENT_CONFIG_SET_CLOCK 0x1   /* realtime_* is the host's wall clock */
#define AGENT_CONFIG_ENTROPY 0x2     /* entropy[] is fresh host randomness */

struct agent_config {
    uint64_t realtime_sec;
    uint32_t realtime_nsec;
    uint32_t flags;
    uint8_t entropy[AGENT_ENTROPY_BYTES];
} __attribute__((packed));

_Static_assert(sizeof(struct agent_frame_header) == 8, "agent_frame_header is 8 bytes");
_Static_assert(sizeof(struct agent_config) == 80, "agent_config is 80 bytes");

/* What /init gives the agent: called for every word of a CONFIG frame. */
typedef void (*agent_word_fn)(char *word);
/* Called once the CONFIG frame is applied: mount what the words asked for;
 * returns a text (static storage, may be "") of what failed. */
typedef const char *(*agent_setup_fn)(void);

/* Start the standby shell that will run the first command (before the snapshot
 * point, so that a restored guest does not pay for starting it). */
void agent_prepare(void);
/* Open the agent port, say HELLO, apply CONFIG and run setup; false if the
 * port cannot be used (the caller goes on without an agent). */
bool agent_start(const char *device, agent_word_fn on_word, agent_setup_fn setup);
/* Send READY and serve EXEC/KILL until the port breaks; console_shell()
 * (may be NULL) is started once after READY and re-started when it exits. */
void agent_serve(int (*console_shell)(void));

#endif
