// Runtime ISA selection. Each kernel family is compiled once per variant in
// its own translation unit (see CMakeLists.txt); the variant used is picked
// here from CPUID, or forced with PYOPT_CPU_ISA through set_isa().
#pragma once
#include <string>

namespace pyopt {

enum class Isa : int { kBaseline = 0, kAVX2 = 1, kAVX512 = 2 };

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* out);
// Compiled into this build (x86 builds have all three; others baseline only).
bool isa_compiled(Isa isa);
// The CPU and OS support it (CPUID + XGETBV).
bool isa_supported(Isa isa);
Isa best_isa();
Isa current_isa();
void set_isa(Isa isa);  // caller checks isa_compiled && isa_supported

// AVX512_BF16's vcvtne2ps2bf16 rounds 32 floats to bf16 in one instruction.
// The avx512 variant's bf16 Adam step uses it where the build has
// -mavx512bf16, the CPU reports it, it is enabled and the calling thread's
// MXCSR.DAZ is clear; elsewhere the blocked step with integer rounding runs
// (same bits, slower).
bool bf16_convert_available(const char** why);
void bf16_convert_enable(bool on);  // tests and comparisons

}  // namespace pyopt

// Kernel headers declare their per-ISA entry points with this suffix.
#define PYOPT_CAT2(a, b) a##_##b
#define PYOPT_CAT(a, b) PYOPT_CAT2(a, b)
