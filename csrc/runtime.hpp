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

}  // namespace detail
}  // namespace fastprop
