// fastprop/dispatch.hpp - runtime ISA selection and threading controls.
//
// The kernel table is chosen once, on the first call of any kernel or of
// init_dispatch(): the best ISA the CPU and OS support (cpuid + xgetbv on x86),
// unless the environment variable FASTPROP_ISA names another ("generic" forces the
// reference path; an ISA the CPU lacks falls back to generic and says so in
// dispatch_note()).
#pragma once

namespace fastprop {

struct CpuFeatures {
    bool sse4_2;
    bool avx;
    bool avx2;
    bool fma;
    bool avx512f;
    bool avx512;  // F + DQ + BW + VL with OS ZMM support: what the avx512 unit needs
};

void init_dispatch() noexcept;
const char* isa_name() noexcept;         // "generic", "avx2" or "avx512"
const char* isa_requested() noexcept;    // FASTPROP_ISA as read ("" when unset)
const char* dispatch_note() noexcept;    // "" or why the request was not honoured
const char* available_isas() noexcept;   // e.g. "generic,avx2" (built and usable)
CpuFeatures cpu_features() noexcept;

bool openmp_enabled() noexcept;
int get_num_threads() noexcept;          // omp_get_max_threads(), 1 without OpenMP
// false in a fork child of a process whose OpenMP pool had started (or that had more
// than one thread): every kernel runs serially there (csrc/runtime.hpp)
bool threads_usable() noexcept;
void set_num_threads(int n) noexcept;    // omp_set_num_threads(n); n >= 1
// Threads a kernel asking for nt would use now, with other processes keeping cores
// busy (csrc/runtime.hpp: at most the online CPUs less the other runnable threads;
// nt when FASTPROP_BACKOFF=0), and whether that back-off is on.
int threads_free(int nt) noexcept;
bool backoff_enabled() noexcept;
void set_backoff(bool on) noexcept;
int backoff_state() noexcept;  // 0 off (FASTPROP_BACKOFF=0 / set_backoff), 1 on, 2 on (pinned:
                               // this process' own threads)
int own_runnable_threads() noexcept;  // (-1: unknown; for the tests)
void force_pinned(bool on) noexcept;   // (for the tests)

const char* compiler_id() noexcept;
const char* baseline_flags() noexcept;
const char* avx2_flags() noexcept;
const char* avx512_flags() noexcept;

}  // namespace fastprop
