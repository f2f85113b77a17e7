// dispatch.cpp - CPU feature detection and the one-time choice of kernel table;
// OpenMP thread controls; build information (baseline unit only).
//
// Detection: cpuid leaves 1 and 7 for SSE4.2, AVX, FMA, AVX2, AVX-512F, and xgetbv
// (XCR0) to confirm that the OS saves the YMM (and ZMM) state; a feature counts only
// if both agree.  The avx2 table needs AVX2 and FMA.  Choice: the best available
// table, or the one the environment variable FASTPROP_ISA names ("generic" forces
// the reference path; "avx2" without CPU support falls back to generic and records
// a note; "auto"/unset picks the best).  Made once, thread-safely (function-local
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
    CpuFeatures f{false, false, false, false, false};
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
    }
#endif
    return f;
}

struct DispatchState {
    CpuFeatures features;
    const detail::KernelTable* table;
    bool avx2_usable;
    char requested[32];
    char note[192];
};

DispatchState choose() {
    DispatchState s{};
    s.features = detect();
    s.table = generic::kernel_table();
#if FASTPROP_BUILD_AVX2
    s.avx2_usable = s.features.avx2 && s.features.fma;
#else
    s.avx2_usable = false;
#endif
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
    if (std::strcmp(want, "generic") == 0 || std::strcmp(want, "baseline") == 0) {
        s.table = generic::kernel_table();
    } else if (std::strcmp(want, "avx2") == 0) {
        if (s.avx2_usable) {
#if FASTPROP_BUILD_AVX2
            s.table = avx2::kernel_table();
#endif
        } else {
            std::snprintf(s.note, sizeof(s.note), "FASTPROP_ISA=avx2 requested but %s; using generic",
                          FASTPROP_BUILD_AVX2 ? "this CPU lacks AVX2+FMA"
                                              : "this build has no avx2 unit");
        }
    } else {
        if (!is_auto)
            std::snprintf(s.note, sizeof(s.note),
                          "unknown FASTPROP_ISA=%s (expected generic, avx2 or auto); using auto",
                          want);
#if FASTPROP_BUILD_AVX2
        if (s.avx2_usable) s.table = avx2::kernel_table();
#endif
    }
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

const char* compiler_id() noexcept { return FASTPROP_COMPILER_ID; }
const char* baseline_flags() noexcept { return FASTPROP_BASELINE_FLAGS_STR; }
const char* avx2_flags() noexcept { return FASTPROP_AVX2_FLAGS_STR; }

}  // namespace fastprop
