/* now.h: CLOCK_MONOTONIC in seconds, for the helpers that time themselves.
 * clock_gettime is served by the vDSO: no system call, no guest kernel work. */
#ifndef PYVMM_NOW_H
#define PYVMM_NOW_H

#include <time.h>

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
