// Meso-4's first block in training as two XLA FFI calls: conv (3x3, SAME, bias, 3 -> 8 channels) -> ReLU
// -> batch statistics -> 2x2 max-pool selection, and its kernel and bias gradients. Built into the same
// library as onednn_conv.cc by meso_jax/onednn.py; used by meso_jax/fast_training.py.
//
// In XLA the block takes a pass over memory per step (convolution phases, statistics, pooling, the
// gradient of each phase, re-interleaving, the weight gradient: ~90 ms of a ~160 ms training step at
// batch 32). Here each call is one pass over the image, split over threads by rows of pooling windows:
//
// * Forward: per window, the convolution at its 4 positions, ReLU, the running sums of the activations
//   and their squares (BatchNorm's batch statistics), and the window's selected activation (its maximum,
//   or its minimum for channels with a negative BatchNorm scale: `sign`) with the first position holding
//   it (row-major, as XLA's max-pool gradient picks). The activations themselves are not stored.
// * Backward: recomputes each position's activation and accumulates the kernel and bias gradients of
//   d(loss)/dz = [z > 0] * c1 * ([chosen] * grad_pooled + c0 + (a - mean) * c2), with the per-channel
//   coefficients (c1, c0, c2, mean) of BatchNorm's closed-form gradient computed by the caller.
//
// Sums are accumulated in float along a row of windows and in double across rows.

#include <omp.h>

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kKernel = 3, kInChannels = 3, kOutChannels = 8, kPool = 2;
constexpr int kTaps = kKernel * kKernel * kInChannels;

// The 8 output channels of one position as one vector (GCC/Clang vector extension: AVX registers where the
// CPU has them, the library being built for the machine it runs on).
typedef float Channels __attribute__((vector_size(kOutChannels * sizeof(float))));

inline Channels Load(const float* values) {
  Channels vector;
  __builtin_memcpy(&vector, values, sizeof(vector));
  return vector;
}

inline void Store(float* values, Channels vector) { __builtin_memcpy(values, &vector, sizeof(vector)); }

// The input rows under one pooling window's kernel positions: kSpan rows of kSpan pixels (kernel
// positions (dy, dx) read rows dy..dy+2, pixels dx..dx+2), pointing into the image where the window is
// inside it, else into a zero-padded copy.
constexpr int kSpan = kPool + kKernel - 1;
struct WindowRows {
  const float* rows[kSpan];
  float padded[kSpan][kSpan * kInChannels];
};

inline void LoadWindow(const float* image, int64_t height, int64_t width, int64_t i, int64_t j, WindowRows& window) {
  const int64_t top = i * kPool - kKernel / 2, left = j * kPool - kKernel / 2;
  const bool inside = top >= 0 && top + kSpan <= height && left >= 0 && left + kSpan <= width;
  for (int r = 0; r < kSpan; ++r) {
    if (inside) {
      window.rows[r] = image + ((top + r) * width + left) * kInChannels;
      continue;
    }
    for (int c = 0; c < kSpan; ++c) {
      const bool in_image = top + r >= 0 && top + r < height && left + c >= 0 && left + c < width;
      for (int ci = 0; ci < kInChannels; ++ci) {
        window.padded[r][c * kInChannels + ci] =
            in_image ? image[((top + r) * width + left + c) * kInChannels + ci] : 0.0f;
      }
    }
    window.rows[r] = window.padded[r];
  }
}

// z = bias + conv at the window's kernel position (dy, dx), the taps in kernel order (ky, kx, ci).
inline Channels ConvAt(const WindowRows& window, int dy, int dx, const Channels* kernel, Channels bias) {
  Channels z = bias;
  for (int ky = 0; ky < kKernel; ++ky) {
    for (int kx = 0; kx < kKernel; ++kx) {
      for (int ci = 0; ci < kInChannels; ++ci) {
        z += window.rows[dy + ky][(dx + kx) * kInChannels + ci] * kernel[(ky * kKernel + kx) * kInChannels + ci];
      }
    }
  }
  return z;
}

using Dims = ffi::Buffer<ffi::F32>::Dimensions;

// The shapes these kernels compute: x (B, H, W, 3) with H and W even, kernel (3, 3, 3, 8).
bool Supported(Dims x, Dims kernel) {
  return x.size() == 4 && kernel.size() == 4 && x[3] == kInChannels && x[1] % kPool == 0 && x[2] % kPool == 0 &&
         kernel[0] == kKernel && kernel[1] == kKernel && kernel[2] == kInChannels && kernel[3] == kOutChannels;
}

const char kShapeError[] =
    "Meso-4 first block: expected x (B, H, W, 3) with H and W even and a (3, 3, 3, 8) kernel";

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> sign, ffi::ResultBuffer<ffi::F32> selected,
                   ffi::ResultBuffer<ffi::F32> winner, ffi::ResultBuffer<ffi::F32> sums) {
  if (!Supported(x.dimensions(), kernel.dimensions())) return ffi::Error::InvalidArgument(kShapeError);
  const int64_t batch = x.dimensions()[0], height = x.dimensions()[1], width = x.dimensions()[2];
  const int64_t out_h = height / kPool, out_w = width / kPool;
  const float *x_data = x.typed_data(), *k_data = kernel.typed_data(), *b_data = bias.typed_data();
  const float* s_data = sign.typed_data();
  float *selected_data = selected->typed_data(), *winner_data = winner->typed_data();
  Channels kernel_taps[kTaps];
  for (int tap = 0; tap < kTaps; ++tap) kernel_taps[tap] = Load(k_data + tap * kOutChannels);
  const Channels bias_v = Load(b_data), sign_v = Load(s_data), zero = {};
  double total[2 * kOutChannels] = {};
#pragma omp parallel
  {
    double local[2 * kOutChannels] = {};
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      const int64_t b = window_row / out_h, i = window_row % out_h;
      const float* image = x_data + b * height * width * kInChannels;
      Channels row_sum = {}, row_squares = {};
      for (int64_t j = 0; j < out_w; ++j) {
        WindowRows window;
        LoadWindow(image, height, width, i, j, window);
        Channels best = {}, best_position = {};
        for (int position = 0; position < kPool * kPool; ++position) {
          const Channels z = ConvAt(window, position / kPool, position % kPool, kernel_taps, bias_v);
          const Channels activation = z < zero ? zero : z;  // ReLU; NaN stays NaN, as in XLA
          row_sum += activation;
          row_squares += activation * activation;
          const Channels signed_activation = activation * sign_v;
          if (position == 0) {
            best = signed_activation;
          } else {
            // Strictly greater: the first position keeps a tie. A NaN wins and stays (XLA's maximum).
            const auto better = signed_activation > best || signed_activation != signed_activation;
            best = better ? signed_activation : best;
            best_position = better ? Channels{} + static_cast<float>(position) : best_position;
          }
        }
        const int64_t out = (window_row * out_w + j) * kOutChannels;
        Store(selected_data + out, best * sign_v);
        Store(winner_data + out, best_position);
      }
      for (int co = 0; co < kOutChannels; ++co) {
        local[co] += row_sum[co];
        local[kOutChannels + co] += row_squares[co];
      }
    }
#pragma omp critical
    for (int index = 0; index < 2 * kOutChannels; ++index) total[index] += local[index];
  }
  for (int index = 0; index < 2 * kOutChannels; ++index) sums->typed_data()[index] = static_cast<float>(total[index]);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> winner, ffi::Buffer<ffi::F32> grad_pooled,
                    ffi::Buffer<ffi::F32> coefficients, ffi::ResultBuffer<ffi::F32> grad_kernel,
                    ffi::ResultBuffer<ffi::F32> grad_bias) {
  if (!Supported(x.dimensions(), kernel.dimensions())) return ffi::Error::InvalidArgument(kShapeError);
  const int64_t batch = x.dimensions()[0], height = x.dimensions()[1], width = x.dimensions()[2];
  const int64_t out_h = height / kPool, out_w = width / kPool;
  const float *x_data = x.typed_data(), *k_data = kernel.typed_data(), *b_data = bias.typed_data();
  const float *winner_data = winner.typed_data(), *grad_data = grad_pooled.typed_data();
  // Rows of `coefficients`: c1, c0, c2, mean (see the top of this file).
  const float* c1 = coefficients.typed_data();
  const float* c0 = c1 + kOutChannels;
  const float* c2 = c0 + kOutChannels;
  const float* mean = c2 + kOutChannels;
  Channels kernel_taps[kTaps];
  for (int tap = 0; tap < kTaps; ++tap) kernel_taps[tap] = Load(k_data + tap * kOutChannels);
  const Channels bias_v = Load(b_data), zero = {};
  const Channels c1_v = Load(c1), c0_v = Load(c0), c2_v = Load(c2), mean_v = Load(mean);
  std::vector<double> total(kTaps * kOutChannels + kOutChannels, 0.0);
#pragma omp parallel
  {
    std::vector<double> local(total.size(), 0.0);
    std::vector<Channels> grad_z(kPool * width);  // d(loss)/dz of a row of windows' image rows
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      const int64_t b = window_row / out_h, i = window_row % out_h;
      const float* image = x_data + b * height * width * kInChannels;
      // d(loss)/dz of the window row's kPool image rows first, then each tap's kernel gradient as running
      // sums over them (accumulators that stay in registers).
      Channels row_kernel[kTaps] = {}, row_bias = {};
      for (int64_t j = 0; j < out_w; ++j) {
        const int64_t out = (window_row * out_w + j) * kOutChannels;
        const Channels winner_v = Load(winner_data + out), grad_v = Load(grad_data + out);
        WindowRows window;
        LoadWindow(image, height, width, i, j, window);
        for (int position = 0; position < kPool * kPool; ++position) {
          const int dy = position / kPool, dx = position % kPool;
          const Channels z = ConvAt(window, dy, dx, kernel_taps, bias_v);
          const Channels chosen = winner_v == static_cast<float>(position) ? grad_v : zero;
          const Channels gradient = z > zero ? c1_v * (chosen + c0_v + (z - mean_v) * c2_v) : zero;
          grad_z[dy * width + j * kPool + dx] = gradient;
          row_bias += gradient;
        }
      }
      for (int ky = 0; ky < kKernel; ++ky) {
        for (int kx = 0; kx < kKernel; ++kx) {
          // Output columns whose tap (ky, kx) reads inside the image.
          const int64_t first = kx < kKernel / 2 ? kKernel / 2 - kx : 0;
          const int64_t last = width - (kx > kKernel / 2 ? kx - kKernel / 2 : 0);
          for (int ci = 0; ci < kInChannels; ++ci) {
            Channels sums[4] = {};  // four running sums, so that the additions do not wait on each other
            for (int dy = 0; dy < kPool; ++dy) {
              const int64_t r = i * kPool + dy + ky - kKernel / 2;
              if (r < 0 || r >= height) continue;
              const float* pixels = image + (r * width + kx - kKernel / 2) * kInChannels + ci;
              const Channels* gradients = grad_z.data() + dy * width;
              int64_t col = first;
              for (; col + 4 <= last; col += 4) {
                for (int lane = 0; lane < 4; ++lane) {
                  sums[lane] += pixels[(col + lane) * kInChannels] * gradients[col + lane];
                }
              }
              for (; col < last; ++col) sums[0] += pixels[col * kInChannels] * gradients[col];
            }
            row_kernel[(ky * kKernel + kx) * kInChannels + ci] = (sums[0] + sums[1]) + (sums[2] + sums[3]);
          }
        }
      }
      for (int tap = 0; tap < kTaps; ++tap) {
        for (int co = 0; co < kOutChannels; ++co) local[tap * kOutChannels + co] += row_kernel[tap][co];
      }
      for (int co = 0; co < kOutChannels; ++co) local[kTaps * kOutChannels + co] += row_bias[co];
    }
#pragma omp critical
    for (size_t index = 0; index < total.size(); ++index) total[index] += local[index];
  }
  for (int index = 0; index < kTaps * kOutChannels; ++index) {
    grad_kernel->typed_data()[index] = static_cast<float>(total[index]);
  }
  for (int co = 0; co < kOutChannels; ++co) {
    grad_bias->typed_data()[co] = static_cast<float>(total[kTaps * kOutChannels + co]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoFirstBlockForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (B, H, W, 3)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel (3, 3, 3, 8)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (8,)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sign (8,): +1 window maximum, -1 minimum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // selected (B, H/2, W/2, 8)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // winner: its position in the window, 0-3
                                  .Ret<ffi::Buffer<ffi::F32>>());  // sums (2, 8): of relu(z), of relu(z)^2

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoFirstBlockBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // winner
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad_pooled (B, H/2, W/2, 8)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coefficients (4, 8): c1, c0, c2, mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad_kernel (3, 3, 3, 8)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // grad_bias (8,)
