// BatchNorm's scale and offset gradients from the pooled outputs' gradient, shared by the native backwards
// (first_block.cc, pool_select.cc): every pooled output is BatchNorm of one selected activation, so
// grad_offset = sum(grad_pooled) and grad_scale = sum(grad_pooled * (selected - mean)) * inv_std, per channel
// over all windows. One pass over grad_pooled and selected, split over threads; sums in float over chunks of
// windows and in double across chunks.
#pragma once

#include <cstdint>
#include <vector>

#include "vector8.h"

namespace meso {

// `grad_pooled` and `selected`: `windows` rows of `channels` values (a multiple of kVectorLanes); `mean` and
// `inv_std` (channels,) the batch statistics; writes `grad_scale` and `grad_offset` (channels,).
inline void BatchNormGradients(const float* grad_pooled, const float* selected, int64_t windows, int64_t channels,
                               const float* mean, const float* inv_std, float* grad_scale, float* grad_offset) {
  constexpr int64_t kChunk = 256;  // windows summed in float before the double total
  const int64_t vectors = channels / kVectorLanes;
  std::vector<double> total(2 * channels, 0.0);
#pragma omp parallel
  {
    std::vector<double> local(2 * channels, 0.0);
    std::vector<Vector8> sum_grad(vectors), sum_product(vectors);
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < (windows + kChunk - 1) / kChunk; ++chunk) {
      for (int64_t v = 0; v < vectors; ++v) sum_grad[v] = sum_product[v] = Vector8{};
      for (int64_t window = chunk * kChunk; window < windows && window < (chunk + 1) * kChunk; ++window) {
        for (int64_t v = 0; v < vectors; ++v) {
          const int64_t at = window * channels + v * kVectorLanes;
          const Vector8 grad = Load(grad_pooled + at);
          sum_grad[v] += grad;
          sum_product[v] += grad * (Load(selected + at) - Load(mean + v * kVectorLanes));
        }
      }
      AddLanes(sum_grad.data(), vectors, local.data());
      AddLanes(sum_product.data(), vectors, local.data() + channels);
    }
#pragma omp critical
    for (int64_t index = 0; index < 2 * channels; ++index) total[index] += local[index];
  }
  for (int64_t channel = 0; channel < channels; ++channel) {
    grad_offset[channel] = static_cast<float>(total[channel]);
    grad_scale[channel] = static_cast<float>(total[channels + channel]) * inv_std[channel];
  }
}

}  // namespace meso
