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

// Fork safety.  GNU OpenMP's thread pool does not survive fork(): a child that
// enters a parallel region after its parent started the pool deadlocks.  The
// kernels call note_thread_pool_started() before every parallel region;
// install_fork_handler() (called once at import) registers pthread_atfork handlers,
// and in a child forked after the pool started, or from a process that had more
// than one thread (another library's pool may share this libgomp), threads_usable()
// is false and every kernel runs serially (as PyTorch does for the same reason).
void note_thread_pool_started() noexcept;
bool threads_usable() noexcept;
void install_fork_handler() noexcept;

}  // namespace detail
}  // namespace fastprop
