#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/magic.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <sys/sysinfo.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dmio_support.h"

int dmio_o_direct(void) { return O_DIRECT; }

long dmio_pwritev2(int fd, const void *iovecs, int count, long long offset, int flags) {
    return pwritev2(fd, (const struct iovec *)iovecs, count, offset, flags);
}

int dmio_fallocate(int fd, int mode, long long offset, long long length) {
    return fallocate(fd, mode, offset, length);
}

int dmio_pipe_nonblocking(int fds[2]) { return pipe2(fds, O_CLOEXEC | O_NONBLOCK); }

void dmio_set_thread_name(const char *name) {
    char truncated[16];
    strncpy(truncated, name, sizeof truncated - 1);
    truncated[sizeof truncated - 1] = '\0';
    pthread_setname_np(pthread_self(), truncated);
}

long long dmio_seek_data(int fd, long long offset) { return lseek(fd, offset, SEEK_DATA); }

long long dmio_seek_hole(int fd, long long offset) { return lseek(fd, offset, SEEK_HOLE); }

int dmio_peer_pid(int fd) {
    struct ucred credentials;
    socklen_t length = sizeof credentials;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) return -1;
    return credentials.pid;
}

int dmio_file_in_memory(int fd) {
    struct statfs info;
    if (fstatfs(fd, &info) != 0) return -1;
    return info.f_type == TMPFS_MAGIC || info.f_type == RAMFS_MAGIC;
}

void dmio_keep_freed_buffers(int bytes) {
    mallopt(M_MMAP_THRESHOLD, bytes);
    mallopt(M_TRIM_THRESHOLD, bytes);
}

int dmio_memfd(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int dmio_return_free_memory(void) { return malloc_trim(0); }

int dmio_current_cpu(void) { return sched_getcpu(); }

int dmio_cpu_count(void) { return get_nprocs_conf(); }

int dmio_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

int dmio_peer_hung_up(int fd) {
    struct pollfd watch = {.fd = fd, .events = POLLRDHUP};
    return poll(&watch, 1, 0) > 0 && (watch.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}
