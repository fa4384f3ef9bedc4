// Eight float32 values as one vector, for the native kernels (first_block.cc, pool_select.cc): a GCC/Clang
// vector extension, compiled to AVX registers where the CPU has them (the library is built for the machine
// it runs on, see meso_jax/onednn.py).
#pragma once

namespace meso {

constexpr int kVectorLanes = 8;
typedef float Vector8 __attribute__((vector_size(kVectorLanes * sizeof(float))));

inline Vector8 Load(const float* values) {
  Vector8 vector;
  __builtin_memcpy(&vector, values, sizeof(vector));
  return vector;
}

inline void Store(float* values, Vector8 vector) { __builtin_memcpy(values, &vector, sizeof(vector)); }

}  // namespace meso
