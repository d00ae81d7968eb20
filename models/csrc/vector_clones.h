// KDQAT_VECTOR_CLONES: compile a hot loop three times, for AVX-512 (x86-64-v4), AVX2 (v3) and the
// x86-64 baseline; the widest one the CPU runs is picked when the library loads (GCC function
// multiversioning). Wider vectors do the same IEEE operations in the same order per element, so
// every result is the same on every CPU; FPS 1024 -> 512 ran 2.1x faster with AVX-512 than with
// the baseline's SSE2 on this project's Xeon (standalone loop, -O3 -ffp-contract=off).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDQAT_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KDQAT_VECTOR_CLONES
#endif
