// runtime.cpp - per-thread scratch memory and fork safety for the kernels
// (baseline unit only).
//
// thread_scratch(slot, bytes) hands out a 64-byte aligned buffer per thread and
// slot, grown geometrically on demand and kept for the life of the thread (OpenMP
// worker threads persist, so steady-state kernels never allocate).  Freed at thread
// exit by a thread_local owner.  Fork safety: see runtime.hpp (a child forked
// after the OpenMP pool started runs serially).  Compiled once, with baseline flags.
#include "runtime.hpp"

#include <atomic>
#include <cstdlib>

#if !defined(_WIN32)
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <cstring>
#endif

#if defined(_WIN32)
#include <malloc.h>
#endif

namespace fastprop {
namespace detail {
namespace {

constexpr int kSlots = 4;

void* aligned_alloc_bytes(std::size_t bytes) noexcept {
#if defined(_WIN32)
    return _aligned_malloc(bytes, 64);
#else
    void* p = nullptr;
    return posix_memalign(&p, 64, bytes) == 0 ? p : nullptr;
#endif
}

void aligned_free(void* p) noexcept {
#if defined(_WIN32)
    _aligned_free(p);
#else
    std::free(p);
#endif
}

struct ScratchOwner {
    void* ptr[kSlots] = {};
    std::size_t size[kSlots] = {};
    ~ScratchOwner() {
        for (int i = 0; i < kSlots; ++i) aligned_free(ptr[i]);
    }
};

thread_local ScratchOwner tls_scratch;

std::atomic<bool> g_pool_started{false};
std::atomic<bool> g_forked_after_pool{false};

std::atomic<bool> g_fork_with_threads{false};

#if !defined(_WIN32)
// Threads of this process (field 20 of /proc/self/stat), or -1 when unknown.  Read
// with plain system calls: it runs in fork()'s prepare handler.
int process_threads() noexcept {
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[1024];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = '\0';
    const char* p = std::strrchr(buf, ')');  // (the command name may hold spaces)
    if (p == nullptr) return -1;
    int field = 2;
    for (++p; *p != '\0'; ++p) {
        if (*p == ' ' && ++field == 20) return std::atoi(p + 1);
    }
    return -1;
}

// Another library's OpenMP pool (PyTorch's, when it shares this libgomp) breaks a
// fork child as fastprop's own does, and cannot be seen from here: a process with
// more than one thread at fork() gives a serial child too.
extern "C" void fastprop_before_fork() {
    g_fork_with_threads.store(process_threads() > 1, std::memory_order_relaxed);
}

extern "C" void fastprop_after_fork_child() {
    if (g_pool_started.load(std::memory_order_relaxed)
            || g_fork_with_threads.load(std::memory_order_relaxed))
        g_forked_after_pool.store(true, std::memory_order_relaxed);
}
#endif

}  // namespace

void note_thread_pool_started() noexcept {
    if (!g_pool_started.load(std::memory_order_relaxed))
        g_pool_started.store(true, std::memory_order_relaxed);
}

bool threads_usable() noexcept { return !g_forked_after_pool.load(std::memory_order_relaxed); }

void install_fork_handler() noexcept {
#if !defined(_WIN32)
    static const int registered =
        pthread_atfork(&fastprop_before_fork, nullptr, &fastprop_after_fork_child);
    (void)registered;
#endif
}

void* thread_scratch(int slot, std::size_t bytes) noexcept {
    if (slot < 0 || slot >= kSlots) return nullptr;
    ScratchOwner& s = tls_scratch;
    if (bytes == 0) bytes = 64;
    if (s.size[slot] >= bytes) return s.ptr[slot];
    std::size_t want = s.size[slot] * 2 > bytes ? s.size[slot] * 2 : bytes;
    want = (want + 63) & ~std::size_t(63);
    aligned_free(s.ptr[slot]);
    s.ptr[slot] = aligned_alloc_bytes(want);
    s.size[slot] = s.ptr[slot] != nullptr ? want : 0;
    return s.ptr[slot];
}

}  // namespace detail
}  // namespace fastprop
