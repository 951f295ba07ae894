// What this CPU can run, asked once per process: AVX2 (with FMA), AVX-512 (F, BW, VL, DQ), AVX512-VNNI, AVX512-BF16, AMX-BF16 and
// AMX-INT8 (the tile state granted by Linux). Every kernel choice, in C++ and in Python, goes through these answers.
//
// QUANTIZER_PLUGIN_MAX_ISA caps them, so that a machine with AMX can run the paths a CPU without it takes:
// "amx" (or unset: everything the CPU has), "avx512_bf16" (no AMX), "avx512" (no AMX, no BF16 instructions),
// "avx2" (no AVX-512 either: the paths of an AMD EPYC before Zen 4), "scalar" (plain C++ only). native.py checks the
// value before the library loads.

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace quantizer_plugin {

namespace {

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3, AMX = 4 };

Isa max_isa() {
  static const Isa cap = [] {
    const char* value = std::getenv("QUANTIZER_PLUGIN_MAX_ISA");
    if (value == nullptr || !*value || !std::strcmp(value, "amx")) return AMX;
    if (!std::strcmp(value, "avx512_bf16")) return AVX512_BF16;
    if (!std::strcmp(value, "avx512")) return AVX512;
    if (!std::strcmp(value, "avx2")) return AVX2;
    return SCALAR;
  }();
  return cap;
}

}  // namespace

bool has_avx2() {
  // F16C too (every AVX2 CPU has it): the kept layers' kernel reads float16 weights with it
  static const bool yes = max_isa() >= AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}

bool has_avx512() {
  static const bool yes = max_isa() >= AVX512 && has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return yes;
}

bool has_avx512_vnni() {  // every AVX-512 CPU since Cascade Lake and Zen 4; capped with AVX-512
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

bool has_avx512_bf16() {
  static const bool yes = max_isa() >= AVX512_BF16 && has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

bool has_amx_bf16() {
  static const bool yes = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (max_isa() < AMX || !has_avx512_bf16() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx = (edx >> 22 & 1) && (edx >> 24 & 1);  // AMX-BF16, AMX-TILE
    constexpr long request_permission = 0x1023, tile_data = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return amx && syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
  }();
  return yes;
}

bool has_amx_int8() {
  static const bool yes = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // has_amx_bf16() also asks Linux for the tile state, which both tile paths need.
    return has_amx_bf16() && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 25 & 1);  // AMX-INT8
  }();
  return yes;
}

}  // namespace quantizer_plugin
