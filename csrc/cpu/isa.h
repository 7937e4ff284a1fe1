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

}  // namespace pyopt

// Kernel headers declare their per-ISA entry points with this suffix.
#define PYOPT_CAT2(a, b) a##_##b
#define PYOPT_CAT(a, b) PYOPT_CAT2(a, b)
