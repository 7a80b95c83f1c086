// Glibc's Swift module first: the library header then reuses its glibc
// declarations instead of defining its own copies (fd_set, for one), which
// would clash in any Swift file that also imports Glibc.
#pragma clang module import SwiftGlibc
// liburing, plus the few things Swift cannot reach directly: fields in
// anonymous unions of io_uring_sqe, and eventfd(), which Glibc's Swift module
// does not export.
#include <liburing.h>
#include <sys/eventfd.h>

static inline void dmio_sqe_set_rw_flags(struct io_uring_sqe *sqe, int flags) {
    sqe->rw_flags = flags;
}

static inline int dmio_eventfd(unsigned int initval, int flags) {
    return eventfd(initval, flags);
}

// The completion ring's tail is written by the kernel: read it with acquire
// ordering, as liburing's io_uring_for_each_cqe does.
static inline unsigned dmio_load_acquire(const unsigned *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
