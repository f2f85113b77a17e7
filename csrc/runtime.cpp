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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#if !defined(_WIN32)
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <strings.h>
#include <unistd.h>
#endif

#if defined(_WIN32)
#include <malloc.h>
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastprop {
namespace detail {
namespace {

constexpr int kSlots = 4;
// Scratch kept for the life of a thread at most (larger: freed by trim_scratch after
// the call that needed it, e.g. a matrix-vector product gathering 2^26 elements).
constexpr std::size_t kKeepBytes = std::size_t(16) << 20;

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
std::atomic<bool> g_force_pinned{false};  // (tests: a pinned process on any machine)

// busy cores (runtime.hpp)
constexpr long long kCheckEveryNs = 10000000;  // /proc/loadavg at most every 10 ms
// GNU OpenMP workers spin 300k pauses after a region ends (~5 ms on Zen, ~12 ms where
// a pause is ~140 cycles) before they sleep: for that long after the last region
// they are runnable, and counted as this process'.  OMP_WAIT_POLICY=passive: they
// sleep at once; =active, or a GOMP_SPINCOUNT of the user's: they may spin for ever
// (always counted as this process', once a team has started).
long long spin_ns() noexcept {
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    if (policy != nullptr && strcasecmp(policy, "passive") == 0) return 0;
    const bool active = policy != nullptr && strcasecmp(policy, "active") == 0;
    double count = active ? 3e10 : 3e5;  // (libgomp's defaults)
    if (const char* env = std::getenv("GOMP_SPINCOUNT")) {  // e.g. "10000", "2M", "infinite"
        if (strncasecmp(env, "infinit", 7) == 0) return 1LL << 62;
        char* end = nullptr;
        const double v = std::strtod(env, &end);
        if (end != env && v >= 0) {
            const char unit = *end;
            count = v * (unit == 'k' || unit == 'K' ? 1e3 : unit == 'M' ? 1e6
                         : unit == 'G' ? 1e9 : unit == 'T' ? 1e12 : 1.0);
        }
    }
    const double ns = count * 50.0;  // (a pause and a load: 20-50 ns)
    return ns >= 4e18 ? (1LL << 62) : static_cast<long long>(ns);
}
const long long kSpinNs = spin_ns();
// The other processes' runnable threads, averaged over the readings (weight 1/4 for
// the newest: ~30 ms to follow a change): a process busy half the time or more takes
// a core; one that runs now and then (a test suite, an editor) does not (there, 2
// threads still beat 1: the MLP step at batch 32 in 285 us against 521).
std::atomic<int> g_others_x16{0};  // (the average times 16; truncated, so it decays to 0)
std::atomic<long long> g_next_check_ns{0};
std::atomic<long long> g_last_region_ns{-(1LL << 62)};
std::atomic<int> g_last_team{1};
std::atomic<int> g_free_cpus{1 << 30};

long long now_ns() noexcept {
#if !defined(_WIN32)
    timespec ts;  // (the coarse clock, ~5 ns a call: ticks of 1-4 ms are enough here)
#if defined(CLOCK_MONOTONIC_COARSE)
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
#else
    return 0;
#endif
}

#if !defined(_WIN32)
// The CPUs this process may run on (its affinity on Linux, else the online ones), or
// -1 when unknown; *pinned: fewer than the online CPUs (taskset, a cpuset container).
// With OpenMP, OpenMP's count: GNU OpenMP binds the thread that loads it to one
// place when OMP_PROC_BIND or OMP_PLACES ask for binding, and then counts the CPUs
// the process had before (that thread's own affinity would say 1 CPU: pinned, and
// every kernel serial).
int usable_cpus(bool* pinned) noexcept {
    *pinned = false;
    const int online = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
#if defined(__linux__)
#if defined(_OPENMP)
    const int mine = omp_get_num_procs();
#else
    cpu_set_t mask;
    CPU_ZERO(&mask);
    if (sched_getaffinity(0, sizeof mask, &mask) != 0) return -1;
    const int mine = CPU_COUNT(&mask);
#endif
    if (mine < online || g_force_pinned.load(std::memory_order_relaxed)) {
        *pinned = true;
        return mine > 0 ? mine : -1;
    }
#endif
    return online > 0 ? online : -1;
}

// The start of a /proc file, NUL-terminated, into buf; false when it cannot be read.
// Plain system calls: it runs in fork()'s prepare handler too.
bool read_proc(const char* path, char* buf, std::size_t size) noexcept {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n <= 0) return false;
    buf[n] = '\0';
    return true;
}

// Runnable threads machine-wide, this one included (the fourth field of
// /proc/loadavg, "runnable/total"), or -1 when unknown.
int runnable_threads() noexcept {
    char buf[128];
    if (!read_proc("/proc/loadavg", buf, sizeof buf)) return -1;
    const char* p = buf;
    for (int spaces = 0; spaces < 3; ++p) {
        if (*p == '\0') return -1;
        if (*p == ' ') ++spaces;
    }
    if (*p < '0' || *p > '9') return -1;
    return std::atoi(p);
}

// Runnable threads of this process, this one included (state R in
// /proc/self/task/<tid>/stat), or -1 when unknown.  For a pinned process, whose
// cores the machine-wide count says nothing about: there the threads of its own
// other pools still count (OpenBLAS's workers busy-wait ~0.1 s after each NumPy
// product; beside them a 2-thread team waited a time slice at every barrier: 14x
// slower).  *seen: the threads looked at (at most kMaxTasks; a reading costs ~10 us
// a thread, so the caller reads less often in a process of many threads).
int own_runnable(int* seen_out) noexcept {
    *seen_out = 0;
#if defined(__linux__)
    constexpr int kMaxTasks = 256;
    DIR* dir = opendir("/proc/self/task");
    if (dir == nullptr) return -1;
    int runnable = 0, seen = 0;
    char path[64], buf[256];
    while (const dirent* e = readdir(dir)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        if (seen == kMaxTasks) break;
        ++seen;
        std::snprintf(path, sizeof path, "/proc/self/task/%.20s/stat", e->d_name);
        if (!read_proc(path, buf, sizeof buf)) continue;  // (a thread that just ended)
        const char* p = std::strrchr(buf, ')');  // (the name may hold spaces and parens)
        if (p != nullptr && p[1] == ' ' && p[2] == 'R') ++runnable;
    }
    closedir(dir);
    *seen_out = seen;
    return runnable > 0 ? runnable : 1;  // (the caller runs, whatever was read)
#else
    return -1;
#endif
}
#else
int usable_cpus(bool* pinned) noexcept {
    *pinned = false;
    return -1;
}
int runnable_threads() noexcept { return -1; }
int own_runnable(int* seen_out) noexcept {
    *seen_out = 0;
    return -1;
}
#endif

#if !defined(_WIN32)
// Threads of this process (field 20 of /proc/self/stat), or -1 when unknown.  Read
// with plain system calls: it runs in fork()'s prepare handler.
int process_threads() noexcept {
    char buf[1024];
    if (!read_proc("/proc/self/stat", buf, sizeof buf)) return -1;
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

int own_runnable_threads() noexcept {
    int seen = 0;
    return own_runnable(&seen);
}

void force_pinned(bool on) noexcept {
    g_force_pinned.store(on, std::memory_order_relaxed);
    g_others_x16.store(0, std::memory_order_relaxed);  // (a fresh count from the next reading)
    g_next_check_ns.store(0, std::memory_order_relaxed);
}

void note_thread_pool_started(int team) noexcept {
    if (!g_pool_started.load(std::memory_order_relaxed))
        g_pool_started.store(true, std::memory_order_relaxed);
    g_last_team.store(team, std::memory_order_relaxed);
    g_last_region_ns.store(now_ns(), std::memory_order_relaxed);
}

namespace {
std::atomic<int> g_backoff{-1};  // -1: FASTPROP_BACKOFF not read yet

// FASTPROP_BACKOFF: off for 0/false/off/no (any case, blanks around), else on (the
// Python package warns at import of a value that is none of these nor 1/true/on/yes).
bool backoff_env_off(const char* v) noexcept {
    if (v == nullptr) return false;
    const auto blank = [](char c) { return c == ' ' || (c >= '\t' && c <= '\r'); };
    while (blank(*v)) ++v;
    std::size_t n = std::strlen(v);
    while (n > 0 && blank(v[n - 1])) --n;
    static const char* const kOff[] = {"0", "false", "off", "no"};
    for (const char* off : kOff) {
        if (n == std::strlen(off) && strncasecmp(v, off, n) == 0) return true;
    }
    return false;
}
}  // namespace

void note_team_done() noexcept {
    g_last_region_ns.store(now_ns(), std::memory_order_relaxed);
}

bool backoff_enabled() noexcept {
    int on = g_backoff.load(std::memory_order_relaxed);
    if (on < 0) {
        const char* v = std::getenv("FASTPROP_BACKOFF");
        on = !backoff_env_off(v);
        int unset = -1;  // (a set_backoff() that came first wins)
        if (!g_backoff.compare_exchange_strong(unset, on, std::memory_order_relaxed))
            on = unset;
    }
    return on != 0;
}

int backoff_state() noexcept {
    if (!backoff_enabled()) return 0;
    bool pinned = false;
    return usable_cpus(&pinned) > 0 && pinned ? 2 : 1;
}

void set_backoff(bool on) noexcept { g_backoff.store(on ? 1 : 0, std::memory_order_relaxed); }

int threads_free(int nt) noexcept {
    if (nt <= 1 || !backoff_enabled()) return nt;
    const long long now = now_ns();
    long long next = g_next_check_ns.load(std::memory_order_relaxed);
    // (one caller reads /proc at a time; the others use the last reading)
    if (now >= next && g_next_check_ns.compare_exchange_strong(
            next, now + kCheckEveryNs, std::memory_order_relaxed)) {
        bool pinned = false;
        const int cpus = usable_cpus(&pinned);  // (re-read: an affinity set since counts)
        int runnable = -1;
        if (cpus > 0 && !pinned) {
            runnable = runnable_threads();
        } else if (cpus > 1) {
            int seen = 0;
            runnable = own_runnable(&seen);
            // (~8 us a thread: every 10 ms for up to 8 threads, then less often,
            // so that the readings stay under ~1% of the time)
            if (seen > 8)
                g_next_check_ns.store(now + kCheckEveryNs / 8 * seen, std::memory_order_relaxed);
        }
        // (unknown: no limit; pinned: at most its CPUs, whatever could be read)
        int free_cpus = pinned && cpus > 0 ? cpus : 1 << 30;
        if (runnable > 0) {
            // this process' own share of the count: the caller, and the workers of
            // a region that ended less than a spin period ago (still spinning)
            int ours = 1;
            if (now - g_last_region_ns.load(std::memory_order_relaxed) < kSpinNs)
                ours += g_last_team.load(std::memory_order_relaxed) - 1;
            const int now_others = runnable > ours ? runnable - ours : 0;
            // avg = 3/4 avg + 1/4 now, kept times 16
            const int x16 = (3 * g_others_x16.load(std::memory_order_relaxed)
                             + 16 * now_others) / 4;
            g_others_x16.store(x16, std::memory_order_relaxed);
            const int others = (x16 + 8) / 16;  // (busy half the time or more: a core)
            free_cpus = cpus > others ? cpus - others : 1;
        }
        g_free_cpus.store(free_cpus, std::memory_order_relaxed);
    }
    const int f = g_free_cpus.load(std::memory_order_relaxed);
    return nt < f ? nt : f;
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
    // (geometric growth for the small sizes of repeated calls; a large request gets
    // its own size, and trim_scratch gives it back after the call)
    std::size_t want = s.size[slot] * 2 > bytes && bytes <= kKeepBytes ? s.size[slot] * 2
                                                                       : bytes;
    want = (want + 63) & ~std::size_t(63);
    aligned_free(s.ptr[slot]);
    s.ptr[slot] = aligned_alloc_bytes(want);
    s.size[slot] = s.ptr[slot] != nullptr ? want : 0;
    return s.ptr[slot];
}

void trim_scratch(int slot) noexcept {
    if (slot < 0 || slot >= kSlots) return;
    ScratchOwner& s = tls_scratch;
    if (s.size[slot] > kKeepBytes) {
        aligned_free(s.ptr[slot]);
        s.ptr[slot] = nullptr;
        s.size[slot] = 0;
    }
}

}  // namespace detail
}  // namespace fastprop
