// runtime.hpp - baseline-compiled services the ISA units call (internal).
//
// These are ordinary (non-inline, non-template) functions compiled once with the
// baseline flags, so calling them from an AVX2 unit shares no code.
#pragma once

#include <cstddef>

namespace fastprop {
namespace detail {

// A 64-byte aligned buffer of at least `bytes` bytes owned by the calling thread,
// one per slot (0 <= slot < 4), kept and grown across calls and freed at thread
// exit.  Contents are undefined.  Returns nullptr if the allocation fails.
void* thread_scratch(int slot, std::size_t bytes) noexcept;
// Free the calling thread's buffer of `slot` if it is larger than 16 MiB (what a
// kernel that took scratch sized by its problem calls before it returns).
void trim_scratch(int slot) noexcept;

// Fork safety.  GNU OpenMP's thread pool does not survive fork(): a child that
// enters a parallel region after its parent started the pool deadlocks.  The
// kernels call note_thread_pool_started() before every parallel region;
// install_fork_handler() (called once at import) registers pthread_atfork handlers,
// and in a child forked after the pool started, or from a process that had more
// than one thread (another library's pool may share this libgomp), threads_usable()
// is false and every kernel runs serially (as PyTorch does for the same reason).
void note_thread_pool_started(int team) noexcept;
void note_team_done() noexcept;  // (after the region: its workers spin from now)
bool threads_usable() noexcept;
void install_fork_handler() noexcept;

// Busy cores.  An OpenMP team meets at barriers, and GNU OpenMP's workers spin for
// milliseconds after each region: when other processes keep the cores busy, every
// barrier waits for a scheduler time slice and the spinning workers take the cores
// from the master's serial code (measured on 2 cores beside one busy process: the
// digits MLP at batch 32 trains 45x slower with 2 threads than with 1).  So a kernel
// runs with at most threads_free(nt) threads: the online CPUs less the threads of
// other processes (and of this process' other callers) that are runnable, read from
// /proc/loadavg at most every 10 ms (a few microseconds; never from a parallel
// region) and averaged over the last readings (a process that runs now and then does
// not count), and never less than 1.  Results do not depend on it: every kernel whose
// sums depend on the thread count keeps its split and runs the parts serially.
// FASTPROP_BACKOFF=0 in the environment, or set_backoff(false), turns this off
// (then threads_free(nt) == nt).  In a process whose CPU affinity leaves out some
// online CPUs (taskset, a cpuset container), where the machine-wide count says
// nothing about its cores, it is the CPUs of the affinity less this process' own
// other runnable threads (/proc/self/task: e.g. OpenBLAS's workers, which busy-wait
// ~0.1 s after each NumPy product).  Without /proc (not Linux) it returns nt.
int threads_free(int nt) noexcept;
bool backoff_enabled() noexcept;
void set_backoff(bool on) noexcept;  // (process-wide; for tests and benchmarks)
int backoff_state() noexcept;  // 0 off (switch), 1 on, 2 on, own threads (pinned)
// Runnable threads of this process, the caller included; -1 when unknown (no /proc).
int own_runnable_threads() noexcept;
// Tests: treat the process as pinned (to the CPUs it has) on a machine of any size.
void force_pinned(bool on) noexcept;

}  // namespace detail
}  // namespace fastprop
