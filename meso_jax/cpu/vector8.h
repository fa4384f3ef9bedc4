// Eight float32 values as one vector, for the native kernels (first_block.cc, pool_select.cc): a GCC/Clang
// vector extension, compiled to AVX registers where the CPU has them (the library is built for the machine
// it runs on, see meso_jax/onednn.py).
#pragma once

#include <cstdint>

namespace meso {

constexpr int kVectorLanes = 8;
typedef float Vector8 __attribute__((vector_size(kVectorLanes * sizeof(float))));

inline Vector8 Load(const float* values) {
  Vector8 vector;
  __builtin_memcpy(&vector, values, sizeof(vector));
  return vector;
}

inline void Store(float* values, Vector8 vector) { __builtin_memcpy(values, &vector, sizeof(vector)); }

// Adds the lanes of `count` vectors of float sums to `totals` (double), lane by lane: totals[v * 8 + lane] +=
// sums[v][lane] (the kernels sum in float along a row and in double across rows).
inline void AddLanes(const Vector8* sums, int64_t count, double* totals) {
  for (int64_t v = 0; v < count; ++v) {
    for (int lane = 0; lane < kVectorLanes; ++lane) totals[v * kVectorLanes + lane] += sums[v][lane];
  }
}

}  // namespace meso
