// Meso-4's first block in training as two XLA FFI calls: conv (3x3, SAME, bias, 3 -> 8 channels) -> ReLU
// -> batch statistics -> 2x2 max-pool selection, and its kernel and bias gradients. Built into the same
// library as onednn_conv.cc by meso_jax/onednn.py; used by meso_jax/fast_training.py.
//
// In XLA the block takes a pass over memory per step (convolution phases, statistics, pooling, the
// gradient of each phase, re-interleaving, the weight gradient: ~90 ms of a ~160 ms training step at
// batch 32). Here each call is one pass over the image, split over threads by rows of pooling windows:
//
// * Forward: per window, the convolution at its 4 positions (two windows' 8 positions side by side, tap by
//   tap: independent multiply-adds, not one chain per position), ReLU, the running sums of the activations
//   and their squares (BatchNorm's batch statistics), and the window's selected activation (its maximum,
//   or its minimum for channels with a negative BatchNorm scale: `sign`) with the first position holding
//   it (row-major, as XLA's max-pool gradient picks). The activations themselves are not stored.
// * Backward: recomputes each position's activation and accumulates the kernel and bias gradients of
//   d(loss)/dz = [z > 0] * c1 * ([chosen] * grad_pooled + c0 + (a - mean) * c2), with the per-channel
//   coefficients (c1, c0, c2) of BatchNorm's closed-form gradient (c0 and c2 from BatchNorm's own
//   gradients, summed over grad_pooled and the selected activations in a first pass): d(loss)/dz
//   of a row of windows into a buffer, then the kernel gradient a kernel row (9 taps) at a time, each
//   d(loss)/dz vector loaded once for its 9 taps.
//
// Sums are accumulated in float along a row of windows and in double across rows.

#include <omp.h>

#include <cstdint>
#include <vector>

#include "batch_norm_gradients.h"
#include "vector8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kKernel = 3, kInChannels = 3, kOutChannels = 8, kPool = 2;
constexpr int kTaps = kKernel * kKernel * kInChannels;

// The 8 output channels of one position as one vector.
using Channels = meso::Vector8;
static_assert(kOutChannels == meso::kVectorLanes, "one vector holds a position's output channels");
using meso::Load;
using meso::Store;

// The input rows under kWindows neighbouring pooling windows of one row: kSpan rows of kWindows * kPool + 2
// pixels (window w's kernel position (dy, dx) reads rows dy..dy+2, pixels w * kPool + dx..+2), pointing into
// the image where the windows are inside it, else into a zero-padded copy.
constexpr int kSpan = kPool + kKernel - 1;
template <int kWindows>
struct WindowRows {
  static constexpr int kColumns = kWindows * kPool + kKernel - 1;
  const float* rows[kSpan];
  float padded[kSpan][kColumns * kInChannels];
};

template <int kWindows>
inline void LoadWindows(const float* image, int64_t height, int64_t width, int64_t i, int64_t j,
                        WindowRows<kWindows>& windows) {
  constexpr int kColumns = WindowRows<kWindows>::kColumns;
  const int64_t top = i * kPool - kKernel / 2, left = j * kPool - kKernel / 2;
  const bool inside = top >= 0 && top + kSpan <= height && left >= 0 && left + kColumns <= width;
  for (int r = 0; r < kSpan; ++r) {
    if (inside) {
      windows.rows[r] = image + ((top + r) * width + left) * kInChannels;
      continue;
    }
    for (int c = 0; c < kColumns; ++c) {
      const bool in_image = top + r >= 0 && top + r < height && left + c >= 0 && left + c < width;
      for (int ci = 0; ci < kInChannels; ++ci) {
        windows.padded[r][c * kInChannels + ci] =
            in_image ? image[((top + r) * width + left + c) * kInChannels + ci] : 0.0f;
      }
    }
    windows.rows[r] = windows.padded[r];
  }
}

// z[w][position] = bias + conv at kernel position (dy, dx) = (position / 2, position % 2) of window w, the
// taps in kernel order (ky, kx, ci). All positions of all windows are computed side by side, tap by tap:
// kWindows * 4 independent sums, so that the multiply-adds do not wait on each other.
template <int kWindows>
inline void ConvAt(const WindowRows<kWindows>& windows, const Channels* kernel, Channels bias,
                   Channels z[kWindows][kPool * kPool]) {
  const float* rows[kSpan];
  for (int r = 0; r < kSpan; ++r) rows[r] = windows.rows[r];
#pragma GCC unroll 8
  for (int w = 0; w < kWindows; ++w) {
#pragma GCC unroll 4
    for (int position = 0; position < kPool * kPool; ++position) z[w][position] = bias;
  }
#pragma GCC unroll 3
  for (int ky = 0; ky < kKernel; ++ky) {
#pragma GCC unroll 3
    for (int kx = 0; kx < kKernel; ++kx) {
#pragma GCC unroll 3
      for (int ci = 0; ci < kInChannels; ++ci) {
        const Channels tap = kernel[(ky * kKernel + kx) * kInChannels + ci];
#pragma GCC unroll 8
        for (int w = 0; w < kWindows; ++w) {
#pragma GCC unroll 4
          for (int position = 0; position < kPool * kPool; ++position) {
            const int dy = position / kPool, dx = position % kPool;
            z[w][position] += rows[dy + ky][(w * kPool + dx + kx) * kInChannels + ci] * tap;
          }
        }
      }
    }
  }
}

// Windows computed together (ConvAt); a row's last window, when the row has an odd count, alone.
constexpr int kWindowsTogether = 2;

// The forward of kWindows windows from column j of window row i: their selected activations and winning
// positions stored, their activations added to the row's running sums.
template <int kWindows>
inline void ForwardWindows(const float* image, int64_t height, int64_t width, int64_t i, int64_t j,
                           const Channels* kernel_taps, Channels bias, Channels sign, float* selected_out,
                           float* winner_out, Channels& row_sum, Channels& row_squares) {
  WindowRows<kWindows> windows;
  LoadWindows(image, height, width, i, j, windows);
  Channels z[kWindows][kPool * kPool];
  ConvAt(windows, kernel_taps, bias, z);
  const Channels zero = {};
#pragma GCC unroll 8
  for (int w = 0; w < kWindows; ++w) {
    Channels activation[kPool * kPool];
#pragma GCC unroll 4
    for (int position = 0; position < kPool * kPool; ++position) {
      activation[position] = z[w][position] < zero ? zero : z[w][position];  // ReLU; NaN stays NaN, as in XLA
    }
    row_sum += (activation[0] + activation[1]) + (activation[2] + activation[3]);
    row_squares += (activation[0] * activation[0] + activation[1] * activation[1]) +
                   (activation[2] * activation[2] + activation[3] * activation[3]);
    Channels best = activation[0] * sign, best_position = {};
#pragma GCC unroll 4
    for (int position = 1; position < kPool * kPool; ++position) {
      // Strictly greater: the first position keeps a tie. A NaN wins and stays (XLA's maximum).
      const Channels signed_activation = activation[position] * sign;
      const auto better = signed_activation > best || signed_activation != signed_activation;
      best = better ? signed_activation : best;
      best_position = better ? Channels{} + static_cast<float>(position) : best_position;
    }
    Store(selected_out + w * kOutChannels, best * sign);
    Store(winner_out + w * kOutChannels, best_position);
  }
}

// The backward's first part for kWindows windows from column j of window row i: d(loss)/dz at their
// positions, stored in `grad_z` (a row of windows' kPool image rows) and added to the row's bias gradient.
template <int kWindows>
inline void GradZWindows(const float* image, int64_t height, int64_t width, int64_t i, int64_t j,
                         const Channels* kernel_taps, Channels bias, const float* winner_in, const float* grad_in,
                         const Channels coefficients[4], Channels* grad_z, Channels& row_bias) {
  WindowRows<kWindows> windows;
  LoadWindows(image, height, width, i, j, windows);
  Channels z[kWindows][kPool * kPool];
  ConvAt(windows, kernel_taps, bias, z);
  const Channels zero = {}, c1 = coefficients[0], c0 = coefficients[1], c2 = coefficients[2], mean = coefficients[3];
#pragma GCC unroll 8
  for (int w = 0; w < kWindows; ++w) {
    const Channels winner = Load(winner_in + w * kOutChannels), grad = Load(grad_in + w * kOutChannels);
    Channels gradient[kPool * kPool];
#pragma GCC unroll 4
    for (int position = 0; position < kPool * kPool; ++position) {
      const Channels chosen = winner == static_cast<float>(position) ? grad : zero;
      const Channels value = z[w][position];
      gradient[position] = value > zero ? c1 * (chosen + c0 + (value - mean) * c2) : zero;
      const int dy = position / kPool, dx = position % kPool;
      grad_z[dy * width + (j + w) * kPool + dx] = gradient[position];
    }
    row_bias += (gradient[0] + gradient[1]) + (gradient[2] + gradient[3]);
  }
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
  const Channels bias_v = Load(b_data), sign_v = Load(s_data);
  double total[2 * kOutChannels] = {};
#pragma omp parallel
  {
    double local[2 * kOutChannels] = {};
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      const int64_t b = window_row / out_h, i = window_row % out_h;
      const float* image = x_data + b * height * width * kInChannels;
      Channels row_sum = {}, row_squares = {};
      float* selected_row = selected_data + window_row * out_w * kOutChannels;
      float* winner_row = winner_data + window_row * out_w * kOutChannels;
      int64_t j = 0;
      for (; j + kWindowsTogether <= out_w; j += kWindowsTogether) {
        ForwardWindows<kWindowsTogether>(image, height, width, i, j, kernel_taps, bias_v, sign_v,
                                         selected_row + j * kOutChannels, winner_row + j * kOutChannels, row_sum,
                                         row_squares);
      }
      for (; j < out_w; ++j) {
        ForwardWindows<1>(image, height, width, i, j, kernel_taps, bias_v, sign_v, selected_row + j * kOutChannels,
                          winner_row + j * kOutChannels, row_sum, row_squares);
      }
      meso::AddLanes(&row_sum, 1, local);
      meso::AddLanes(&row_squares, 1, local + kOutChannels);
    }
#pragma omp critical
    for (int index = 0; index < 2 * kOutChannels; ++index) total[index] += local[index];
  }
  for (int index = 0; index < 2 * kOutChannels; ++index) sums->typed_data()[index] = static_cast<float>(total[index]);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> winner, ffi::Buffer<ffi::F32> selected, ffi::Buffer<ffi::F32> grad_pooled,
                    ffi::Buffer<ffi::F32> statistics, ffi::ResultBuffer<ffi::F32> grad_kernel,
                    ffi::ResultBuffer<ffi::F32> grad_bias, ffi::ResultBuffer<ffi::F32> grad_scale,
                    ffi::ResultBuffer<ffi::F32> grad_offset) {
  if (!Supported(x.dimensions(), kernel.dimensions())) return ffi::Error::InvalidArgument(kShapeError);
  const int64_t batch = x.dimensions()[0], height = x.dimensions()[1], width = x.dimensions()[2];
  const int64_t out_h = height / kPool, out_w = width / kPool;
  const int64_t pooled_count = batch * out_h * out_w * kOutChannels;
  if (winner.element_count() != pooled_count || selected.element_count() != pooled_count ||
      grad_pooled.element_count() != pooled_count || statistics.element_count() != 3 * kOutChannels) {
    return ffi::Error::InvalidArgument(
        "Meso-4 first block backward: expected winners, selected values and grad_pooled (B, H/2, W/2, 8) and "
        "(3, 8) statistics");
  }
  const float *x_data = x.typed_data(), *k_data = kernel.typed_data(), *b_data = bias.typed_data();
  const float *winner_data = winner.typed_data(), *grad_data = grad_pooled.typed_data();
  // Rows of `statistics`: scale * inv_std, inv_std, mean.
  const Channels c1 = Load(statistics.typed_data()), inv_std = Load(statistics.typed_data() + kOutChannels);
  const Channels mean = Load(statistics.typed_data() + 2 * kOutChannels);
  meso::BatchNormGradients(grad_data, selected.typed_data(), batch * out_h * out_w, kOutChannels,
                           statistics.typed_data() + 2 * kOutChannels, statistics.typed_data() + kOutChannels,
                           grad_scale->typed_data(), grad_offset->typed_data());
  const float count = static_cast<float>(batch * height * width);
  const Channels c0 = -Load(grad_offset->typed_data()) / count;
  const Channels c2 = -inv_std * Load(grad_scale->typed_data()) / count;
  Channels kernel_taps[kTaps];
  for (int tap = 0; tap < kTaps; ++tap) kernel_taps[tap] = Load(k_data + tap * kOutChannels);
  const Channels bias_v = Load(b_data);
  const Channels coefficients_v[4] = {c1, c0, c2, mean};
  std::vector<double> total(kTaps * kOutChannels + kOutChannels, 0.0);
#pragma omp parallel
  {
    std::vector<double> local(total.size(), 0.0);
    std::vector<Channels> grad_z(kPool * width);  // d(loss)/dz of a row of windows' image rows
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      const int64_t b = window_row / out_h, i = window_row % out_h;
      const float* image = x_data + b * height * width * kInChannels;
      // d(loss)/dz of the window row's kPool image rows first, then the kernel gradient as running
      // sums over them (accumulators that stay in registers).
      Channels row_kernel[kTaps] = {}, row_bias = {};
      const float* winner_row = winner_data + window_row * out_w * kOutChannels;
      const float* grad_row = grad_data + window_row * out_w * kOutChannels;
      int64_t j = 0;
      for (; j + kWindowsTogether <= out_w; j += kWindowsTogether) {
        GradZWindows<kWindowsTogether>(image, height, width, i, j, kernel_taps, bias_v, winner_row + j * kOutChannels,
                                       grad_row + j * kOutChannels, coefficients_v, grad_z.data(), row_bias);
      }
      for (; j < out_w; ++j) {
        GradZWindows<1>(image, height, width, i, j, kernel_taps, bias_v, winner_row + j * kOutChannels,
                        grad_row + j * kOutChannels, coefficients_v, grad_z.data(), row_bias);
      }
      for (int ky = 0; ky < kKernel; ++ky) {
        // The kernel row's 9 taps (kx, ci) together, each d(loss)/dz loaded once for all of them; two columns
        // at a time into two sets of sums, so that the additions do not wait on each other.
        Channels sums[2][kKernel * kInChannels] = {};
        for (int dy = 0; dy < kPool; ++dy) {
          const int64_t r = i * kPool + dy + ky - kKernel / 2;
          if (r < 0 || r >= height) continue;
          const float* pixels = image + r * width * kInChannels;
          const Channels* gradients = grad_z.data() + dy * width;
          // Output column col's taps kx in [first_kx, last_kx), which read pixel column col + kx - 1.
          const auto add_column = [&](Channels* column_sums, int64_t col, int first_kx, int last_kx) {
            const Channels gradient = gradients[col];
#pragma GCC unroll 3
            for (int kx = first_kx; kx < last_kx; ++kx) {
#pragma GCC unroll 3
              for (int ci = 0; ci < kInChannels; ++ci) {
                column_sums[kx * kInChannels + ci] += pixels[(col + kx - kKernel / 2) * kInChannels + ci] * gradient;
              }
            }
          };
          // Columns 0 and width - 1 have taps outside the image; all others read inside it.
          add_column(sums[0], 0, kKernel / 2, kKernel);
          int64_t col = 1;
          for (; col + 2 < width; col += 2) {
            add_column(sums[0], col, 0, kKernel);
            add_column(sums[1], col + 1, 0, kKernel);
          }
          for (; col + 1 < width; ++col) add_column(sums[0], col, 0, kKernel);
          add_column(sums[1], width - 1, 0, kKernel - kKernel / 2);
        }
        for (int tap = 0; tap < kKernel * kInChannels; ++tap) {
          row_kernel[ky * kKernel * kInChannels + tap] = sums[0][tap] + sums[1][tap];
        }
      }
      meso::AddLanes(row_kernel, kTaps, local.data());
      meso::AddLanes(&row_bias, 1, local.data() + kTaps * kOutChannels);
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // selected
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad_pooled (B, H/2, W/2, 8)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // statistics (3, 8): scale * inv_std, inv_std, mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad_kernel (3, 3, 3, 8)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad_bias (8,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad_scale (8,)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // grad_offset (8,)
