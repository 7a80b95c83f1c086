// Linux calls and constants that Swift's Glibc module does not export,
// because it is built without _GNU_SOURCE. This header includes no system
// header, so that it cannot clash with Glibc's definitions.
#pragma once

// <linux/falloc.h> and <linux/fs.h>: the same on every Linux architecture.
enum {
    DMIO_FALLOC_FL_KEEP_SIZE = 0x01,
    DMIO_FALLOC_FL_PUNCH_HOLE = 0x02,
    DMIO_FALLOC_FL_ZERO_RANGE = 0x10,
    DMIO_RWF_DSYNC = 0x02,
};

/// O_DIRECT, whose value differs between architectures.
int dmio_o_direct(void);

/// pwritev2(2); returns bytes written or -1 with errno set.
long dmio_pwritev2(int fd, const void *iovecs, int count, long long offset, int flags);

/// fallocate(2); returns 0 or -1 with errno set.
int dmio_fallocate(int fd, int mode, long long offset, long long length);

/// pipe2(2) with O_CLOEXEC | O_NONBLOCK.
int dmio_pipe_nonblocking(int fds[2]);

/// Names the calling thread (15 characters at most are kept).
void dmio_set_thread_name(const char *name);

/// lseek(2) with SEEK_DATA / SEEK_HOLE; -1 with errno set (ENXIO: no data
/// at or after `offset`).
long long dmio_seek_data(int fd, long long offset);
long long dmio_seek_hole(int fd, long long offset);

/// The pid of the process at the other end of a connected unix socket
/// (SO_PEERCRED), or -1.
int dmio_peer_pid(int fd);

/// 1 when `fd` is a file whose data lives in memory (tmpfs, ramfs), 0 when
/// not, -1 with errno set.
int dmio_file_in_memory(int fd);

/// Lets malloc keep up to `bytes` of freed memory (and serve blocks under
/// `bytes` from it) instead of handing it back to the kernel at once: I/O
/// buffers are freed and allocated again all the time, and each round trip
/// to the kernel costs page faults and zeroing.
void dmio_keep_freed_buffers(int bytes);
/// Hands the free pages of every malloc arena back to the kernel (malloc_trim); returns whether any went.
int dmio_return_free_memory(void);

/// memfd_create(2) with MFD_CLOEXEC: a file in memory; -1 with errno set.
int dmio_memfd(const char *name);

/// sched_getcpu(3): the CPU the calling thread runs on, or -1.
int dmio_current_cpu(void);
/// get_nprocs_conf(3): the CPUs the system has, online or not.
int dmio_cpu_count(void);

/// accept4(2) with SOCK_CLOEXEC: a connection no child process inherits; -1 with errno set.
int dmio_accept_cloexec(int fd);
/// 1 when the peer of connected socket `fd` closed its end or the socket
/// failed (poll's POLLRDHUP, POLLHUP, POLLERR, without waiting), else 0.
int dmio_peer_hung_up(int fd);

/// A monotonic clock in nanoseconds for timing requests (its zero is not
/// CLOCK_MONOTONIC's): the TSC where the kernel keeps time with it, else
/// clock_gettime. The first call measures the TSC for 2 ms.
unsigned long long dmio_request_clock_ns(void);
