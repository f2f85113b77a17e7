// dispatch.cpp - CPU feature detection and the one-time choice of kernel table;
// OpenMP thread controls; build information (baseline unit only).
//
// Detection: cpuid leaves 1 and 7 for SSE4.2, AVX, FMA, AVX2, AVX-512F/DQ/BW/VL,
// and xgetbv (XCR0) to confirm that the OS saves the YMM (and ZMM) state; a feature
// counts only if both agree.  The avx2 table needs AVX2 and FMA, the avx512 table
// also AVX-512 F, DQ, BW and VL.  Choice: the best available table (avx512 > avx2 >
// generic), or the one the environment variable FASTPROP_ISA names ("generic"
// forces the reference path; an ISA the CPU or build lacks falls back to the best
// lower one and records a note; "auto"/unset picks the best).  Made once, thread-safely (function-local
// static), on the first kernel call or init_dispatch().
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "fastprop/dispatch.hpp"
#include "kernel_table.hpp"
#include "runtime.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define FASTPROP_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#else
#define FASTPROP_X86 0
#endif

#ifndef FASTPROP_BUILD_AVX2
#define FASTPROP_BUILD_AVX2 0
#endif
#ifndef FASTPROP_BUILD_AVX512
#define FASTPROP_BUILD_AVX512 0
#endif
#ifndef FASTPROP_AVX512_FLAGS_STR
#define FASTPROP_AVX512_FLAGS_STR ""
#endif
#ifndef FASTPROP_COMPILER_ID
#define FASTPROP_COMPILER_ID "unknown"
#endif
#ifndef FASTPROP_BASELINE_FLAGS_STR
#define FASTPROP_BASELINE_FLAGS_STR ""
#endif
#ifndef FASTPROP_AVX2_FLAGS_STR
#define FASTPROP_AVX2_FLAGS_STR ""
#endif

namespace fastprop {

namespace generic {
const detail::KernelTable* kernel_table() noexcept;
}
#if FASTPROP_BUILD_AVX2
namespace avx2 {
const detail::KernelTable* kernel_table() noexcept;
}
#endif
#if FASTPROP_BUILD_AVX512
namespace avx512 {
const detail::KernelTable* kernel_table() noexcept;
}
#endif

namespace {

#if FASTPROP_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
    int regs[4];
    __cpuidex(regs, static_cast<int>(leaf), static_cast<int>(sub));
    for (int i = 0; i < 4; ++i) r[i] = static_cast<unsigned>(regs[i]);
#else
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

unsigned long long xgetbv0() {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned eax = 0, edx = 0;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<unsigned long long>(edx) << 32) | eax;
#endif
}
#endif

CpuFeatures detect() {
    CpuFeatures f{false, false, false, false, false, false};
#if FASTPROP_X86
    unsigned r[4];
    cpuid(0, 0, r);
    const unsigned max_leaf = r[0];
    if (max_leaf < 1) return f;
    cpuid(1, 0, r);
    const unsigned ecx1 = r[2];
    f.sse4_2 = (ecx1 >> 20) & 1u;
    const bool osxsave = (ecx1 >> 27) & 1u;
    const unsigned long long xcr0 = osxsave ? xgetbv0() : 0ull;
    const bool os_ymm = (xcr0 & 0x6ull) == 0x6ull;
    const bool os_zmm = (xcr0 & 0xE6ull) == 0xE6ull;
    f.avx = os_ymm && ((ecx1 >> 28) & 1u);
    f.fma = f.avx && ((ecx1 >> 12) & 1u);
    if (max_leaf >= 7) {
        cpuid(7, 0, r);
        const unsigned ebx7 = r[1];
        f.avx2 = f.avx && ((ebx7 >> 5) & 1u);
        f.avx512f = os_zmm && ((ebx7 >> 16) & 1u);
        const bool dq = (ebx7 >> 17) & 1u, bw = (ebx7 >> 30) & 1u, vl = (ebx7 >> 31) & 1u;
        f.avx512 = f.avx512f && dq && bw && vl && f.avx2 && f.fma;
    }
#endif
    return f;
}

struct DispatchState {
    CpuFeatures features;
    const detail::KernelTable* table;
    bool avx2_usable;
    bool avx512_usable;
    char requested[32];
    char note[192];
};

const detail::KernelTable* table_for(int level) {
#if FASTPROP_BUILD_AVX512
    if (level >= 2) return avx512::kernel_table();
#endif
#if FASTPROP_BUILD_AVX2
    if (level >= 1) return avx2::kernel_table();
#endif
    (void)level;
    return generic::kernel_table();
}

DispatchState choose() {
    DispatchState s{};
    s.features = detect();
    s.avx2_usable = FASTPROP_BUILD_AVX2 && s.features.avx2 && s.features.fma;
    s.avx512_usable = FASTPROP_BUILD_AVX512 && s.avx2_usable && s.features.avx512;
    const int best = s.avx512_usable ? 2 : (s.avx2_usable ? 1 : 0);
    const char* env = std::getenv("FASTPROP_ISA");
    char want[32] = {0};
    if (env != nullptr) {
        std::size_t j = 0;
        for (std::size_t i = 0; env[i] != '\0' && j + 1 < sizeof(want); ++i) {
            char ch = env[i];
            if (ch == ' ' || ch == '\t' || ch == '\n') continue;
            if (ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
            want[j++] = ch;
        }
    }
    std::snprintf(s.requested, sizeof(s.requested), "%s", want);
    const bool is_auto = want[0] == '\0' || std::strcmp(want, "auto") == 0 ||
                         std::strcmp(want, "best") == 0;
    int level = best;
    if (std::strcmp(want, "generic") == 0 || std::strcmp(want, "baseline") == 0) {
        level = 0;
    } else if (std::strcmp(want, "avx2") == 0 || std::strcmp(want, "avx512") == 0) {
        const int asked = want[3] == '5' ? 2 : 1;
        level = asked <= best ? asked : best;
        if (asked > best)
            std::snprintf(s.note, sizeof(s.note), "FASTPROP_ISA=%s requested but %s; using %s",
                          want,
                          (asked == 2 ? FASTPROP_BUILD_AVX512 : FASTPROP_BUILD_AVX2)
                              ? "this CPU lacks it"
                              : "this build has no such unit",
                          table_for(level)->name);
    } else if (!is_auto) {
        std::snprintf(s.note, sizeof(s.note),
                      "unknown FASTPROP_ISA=%s (expected generic, avx2, avx512 or auto); "
                      "using auto",
                      want);
    }
    s.table = table_for(level);
    return s;
}

const DispatchState& state() noexcept {
    static const DispatchState s = choose();
    return s;
}

}  // namespace

namespace detail {
const KernelTable& active_table() noexcept { return *state().table; }
}  // namespace detail

void init_dispatch() noexcept {
    detail::install_fork_handler();
    (void)state();
}
const char* isa_name() noexcept { return state().table->name; }
const char* isa_requested() noexcept { return state().requested; }
const char* dispatch_note() noexcept { return state().note; }
const char* available_isas() noexcept {
    if (state().avx512_usable) return "generic,avx2,avx512";
    return state().avx2_usable ? "generic,avx2" : "generic";
}
CpuFeatures cpu_features() noexcept { return state().features; }

bool openmp_enabled() noexcept {
#if defined(_OPENMP)
    return true;
#else
    return false;
#endif
}

int get_num_threads() noexcept {
#if defined(_OPENMP)
    return detail::threads_usable() ? omp_get_max_threads() : 1;
#else
    return 1;
#endif
}

void set_num_threads(int n) noexcept {
#if defined(_OPENMP)
    if (n >= 1) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

bool threads_usable() noexcept { return detail::threads_usable(); }
int threads_free(int nt) noexcept { return detail::threads_free(nt); }
bool backoff_enabled() noexcept { return detail::backoff_enabled(); }
void set_backoff(bool on) noexcept { detail::set_backoff(on); }
int backoff_state() noexcept { return detail::backoff_state(); }
int own_runnable_threads() noexcept { return detail::own_runnable_threads(); }
void force_pinned(bool on) noexcept { detail::force_pinned(on); }

const char* compiler_id() noexcept { return FASTPROP_COMPILER_ID; }
const char* baseline_flags() noexcept { return FASTPROP_BASELINE_FLAGS_STR; }
const char* avx2_flags() noexcept { return FASTPROP_AVX2_FLAGS_STR; }
const char* avx512_flags() noexcept { return FASTPROP_AVX512_FLAGS_STR; }

}  // namespace fastprop
