// Meso-4's first block in training as two XLA FFI calls: conv (3x3, SAME, bias, 3 -> 8 channels) -> ReLU
// -> batch statistics -> 2x2 max-pool selection, and its kernel and bias gradients. Built into the same
// library as onednn_conv.cc by meso_jax/onednn.py; used by meso_jax/fast_training.py.
//
// In XLA the block takes a pass over memory per step (convolution phases, statistics, pooling, the
// gradient of each phase, re-interleaving, the weight gradient: ~90 ms of a ~160 ms training step at
// batch 32). Here each call is one pass over the image, split over threads by rows of pooling windows:
//
// * Forward: per window, the convolution at its 4 positions, ReLU, the running sums of the activations and
//   their squares (BatchNorm's batch statistics), and the window's selected activation (its maximum, or its
//   minimum for channels with a negative BatchNorm scale: `sign`) with the first position holding it
//   (row-major, as XLA's max-pool gradient picks). The activations themselves are not stored.
//   BatchNorm's affine map is applied by the caller (or folded into the next convolution).
// * Backward: recomputes each position's activation and accumulates the kernel and bias gradients of
//   d(loss)/dz = [z > 0] * ([chosen] * grad_selected + c0 + (a - mean) * c2), with the per-channel
//   coefficients c0 = d(loss)/d(mean) / count and c2 = 2 d(loss)/d(var) / count of the batch statistics'
//   gradients: d(loss)/dz of a row of windows into a buffer, then the kernel gradient as running sums
//   over it.
//
// Two implementations of a window row's work (class WindowRowKernel), chosen when the library is compiled
// for the machine (-march=native):
// * With AVX-512, 16-wide vectors: a window's row as one vector (8 channels x its 2 columns), each pair of
//   neighbouring input pixels broadcast into every lane pair from per-channel copies of the image rows:
//   every multiply-add is a whole register of useful work (~1.25x faster than the 8-wide kernel here).
// * Otherwise (AVX2), 8-wide vectors of one position's 8 channels: 16-wide vectors are two registers there
//   and GCC scalarises their comparisons.
// Both give the same values to float rounding (tests build both on an AVX-512 machine).
//
// Sums are accumulated in float along a row of windows and in double across rows.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vector8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kKernel = 3, kInChannels = 3, kOutChannels = 8, kPool = 2;
constexpr int kTaps = kKernel * kKernel * kInChannels;
constexpr int kSpan = kPool + kKernel - 1;  // the image rows under a row of windows

// The 8 output channels of one position as one vector.
using Channels = meso::Vector8;
static_assert(kOutChannels == meso::kVectorLanes, "one vector holds a position's output channels");
using meso::Load;
using meso::Store;

// The gradient through the block: d(loss)/dz = [z > 0] * ([chosen] * grad_selected + c0 + (z - mean) * c2),
// per channel.
struct GradientCoefficients {
  Channels c0, c2, mean;
};

#if defined(__AVX512F__)

// A window's row (its two columns) of the 8 output channels: lane 2 * channel + column.
typedef float Pairs __attribute__((vector_size(kPool * kOutChannels * sizeof(float))));
typedef double PairsAsDoubles __attribute__((vector_size(sizeof(Pairs))));
static_assert(kPool == 2, "a window's row is a pair of columns");

inline Pairs Duplicate(Channels v) {
  return __builtin_shufflevector(v, v, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
}
inline Channels LeftColumn(Pairs v) { return __builtin_shufflevector(v, v, 0, 2, 4, 6, 8, 10, 12, 14); }
inline Channels RightColumn(Pairs v) { return __builtin_shufflevector(v, v, 1, 3, 5, 7, 9, 11, 13, 15); }
inline Pairs SwapColumns(Pairs v) {
  return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}
inline Pairs Relu(Pairs z) { return _mm512_max_ps(Pairs{}, z); }  // max(0, z): a NaN z stays NaN, as in XLA

// (values[0], values[1]) in every lane pair: one 8-byte broadcast.
inline Pairs BroadcastPair(const float* values) {
  double pair;
  __builtin_memcpy(&pair, values, sizeof(pair));
  return (Pairs)PairsAsDoubles{pair, pair, pair, pair, pair, pair, pair, pair};
}

// Adds each channel's two columns of `count` vectors of float sums to `totals` (double).
inline void AddPairLanes(const Pairs* sums, int64_t count, double* totals) {
  for (int64_t v = 0; v < count; ++v) {
    const Channels channels = LeftColumn(sums[v]) + RightColumn(sums[v]);
    meso::AddLanes(&channels, 1, totals + v * kOutChannels);
  }
}

// Windows computed together; a row's last windows, when fewer remain, one at a time.
constexpr int kWindowsTogether = 8;

// One thread's work on rows of windows of images (B, height, width, 3), for the kernel (3, 3, 3, 8) and bias.
class WindowRowKernel {
 public:
  WindowRowKernel(const float* kernel, const float* bias, int64_t height, int64_t width)
      : height_(height), width_(width), windows_(width / kPool), stride_(width + kKernel - 1),
        bias_(Duplicate(Load(bias))), planes_((kSpan + 1) * kInChannels * stride_, 0.0f), plane_rows_(kSpan, -1),
        grad_z_(kPool * windows_) {
    for (int tap = 0; tap < kTaps; ++tap) taps_[tap] = Duplicate(Load(kernel + tap * kOutChannels));
  }

  // Window row i of image b (x_data: the batch): the windows' selected activations and winning positions
  // stored, the sums of their activations and squares added to sums[0:8] and sums[8:16].
  void Forward(const float* x_data, int64_t b, int64_t i, Channels sign, float* selected_row, float* winner_row,
               double* sums) {
    const float* rows[kSpan];
    Rows(x_data, b, i, rows);
    const Pairs sign_pairs = Duplicate(sign);
    Pairs row_sums[4] = {};  // of the top and bottom rows' activations, then of their squares
    int64_t j = 0;
    for (; j + kWindowsTogether <= windows_; j += kWindowsTogether) {
      ForwardWindows<kWindowsTogether>(rows, j, sign_pairs, selected_row, winner_row, row_sums);
    }
    for (; j < windows_; ++j) ForwardWindows<1>(rows, j, sign_pairs, selected_row, winner_row, row_sums);
    const Pairs row_sum = row_sums[0] + row_sums[1], row_squares = row_sums[2] + row_sums[3];
    AddPairLanes(&row_sum, 1, sums);
    AddPairLanes(&row_squares, 1, sums + kOutChannels);
  }

  // Window row i of image b: the kernel and bias gradients of its positions added to
  // gradients[0:27*8] and gradients[27*8:28*8].
  void Backward(const float* x_data, int64_t b, int64_t i, const float* winner_row, const float* grad_row,
                const GradientCoefficients& coefficients, double* gradients) {
    const float* rows[kSpan];
    Rows(x_data, b, i, rows);
    const Pairs pair_coefficients[3] = {Duplicate(coefficients.c0), Duplicate(coefficients.c2),
                                        Duplicate(coefficients.mean)};
    Pairs row_bias = {};
    int64_t j = 0;
    for (; j + kWindowsTogether <= windows_; j += kWindowsTogether) {
      GradZWindows<kWindowsTogether>(rows, j, winner_row, grad_row, pair_coefficients, row_bias);
    }
    for (; j < windows_; ++j) GradZWindows<1>(rows, j, winner_row, grad_row, pair_coefficients, row_bias);
    // The kernel gradient a kernel column (kx, ci) at a time: its 3 rows' sums, for the windows' top and
    // bottom rows and for even and odd windows apart (independent multiply-adds).
    Pairs row_kernel[kTaps];
#pragma GCC unroll 1
    for (int column = 0; column < kKernel * kInChannels; ++column) {
      const int kx = column / kInChannels, ci = column % kInChannels;
      const float* pixels[kSpan];
      for (int r = 0; r < kSpan; ++r) pixels[r] = rows[r] + ci * stride_ + kx;
      Pairs sums[2][kPool][kKernel] = {};
      const auto add_window = [&](Pairs(&window_sums)[kPool][kKernel], int64_t w) {
        const Pairs top = grad_z_[w], bottom = grad_z_[windows_ + w];
#pragma GCC unroll 4
        for (int r = 0; r < kSpan; ++r) {
          const Pairs pair = BroadcastPair(pixels[r] + w * kPool);
          if (r < kKernel) window_sums[0][r] += pair * top;
          if (r >= 1) window_sums[1][r - 1] += pair * bottom;
        }
      };
      int64_t w = 0;
      for (; w + 2 <= windows_; w += 2) {
        add_window(sums[0], w);
        add_window(sums[1], w + 1);
      }
      if (w < windows_) add_window(sums[0], w);
      for (int ky = 0; ky < kKernel; ++ky) {
        row_kernel[ky * kKernel * kInChannels + column] =
            (sums[0][0][ky] + sums[0][1][ky]) + (sums[1][0][ky] + sums[1][1][ky]);
      }
    }
    AddPairLanes(row_kernel, kTaps, gradients);
    AddPairLanes(&row_bias, 1, gradients + kTaps * kOutChannels);
  }

 private:
  // The input rows of window row i of image b: each image row split into its 3 channel planes with a zero
  // pixel at either end (pixel x of channel c at rows[r][c * stride_ + x + 1]); rows outside the image
  // read as zeros. A row is split once for the two window rows that read it (slot = row % kSpan).
  void Rows(const float* x_data, int64_t b, int64_t i, const float* rows[kSpan]) {
    for (int r = 0; r < kSpan; ++r) {
      const int64_t y = i * kPool - kKernel / 2 + r;
      if (y < 0 || y >= height_) {
        rows[r] = planes_.data() + kSpan * kInChannels * stride_;  // the zero slot
        continue;
      }
      const int64_t slot = y % kSpan, tag = b * height_ + y;
      float* planes = planes_.data() + slot * kInChannels * stride_;
      if (plane_rows_[slot] != tag) {
        plane_rows_[slot] = tag;
        const float* pixels = x_data + (tag * width_) * kInChannels;
        for (int c = 0; c < kInChannels; ++c) {
          float* plane = planes + c * stride_ + 1;
          for (int64_t x = 0; x < width_; ++x) plane[x] = pixels[x * kInChannels + c];
        }
      }
      rows[r] = planes;
    }
  }

  // z[dy][w] = bias + conv at row dy of window j + w, both columns at once: the taps added in kernel order
  // (ky, kx, ci), as the 8-wide kernels and XLA's formulation add them (the same sums to the last bit, so the
  // same window maxima). Each broadcast pixel pair feeds both window rows that read it; a loop over the
  // input rows, each step all 9 (kx, ci) of the row (fully unrolled, GCC keeps too many values alive and
  // spills them).
  template <int kWindows>
  void ConvPairs(const float* const rows[kSpan], int64_t j, Pairs z[kPool][kWindows]) const {
#pragma GCC unroll 8
    for (int w = 0; w < kWindows; ++w) z[0][w] = z[1][w] = bias_;
#pragma GCC unroll 4
    for (int r = 0; r < kSpan; ++r) {
#pragma GCC unroll 1
      for (int column = 0; column < kKernel * kInChannels; ++column) {
        const int kx = column / kInChannels, ci = column % kInChannels;
        const float* pixels = rows[r] + ci * stride_ + j * kPool + kx;
        // Row r is kernel row r of the windows' top row and kernel row r - 1 of their bottom row.
        const Pairs top_weight = taps_[std::min(r, kKernel - 1) * kKernel * kInChannels + column];
        const Pairs bottom_weight = taps_[std::max(r - 1, 0) * kKernel * kInChannels + column];
#pragma GCC unroll 8
        for (int w = 0; w < kWindows; ++w) {
          const Pairs pair = BroadcastPair(pixels + w * kPool);
          if (r < kKernel) z[0][w] += pair * top_weight;
          if (r >= 1) z[1][w] += pair * bottom_weight;
        }
      }
    }
  }

  template <int kWindows>
  void ForwardWindows(const float* const rows[kSpan], int64_t j, Pairs sign, float* selected_row,
                      float* winner_row, Pairs row_sums[4]) const {
    Pairs z[kPool][kWindows];
    ConvPairs<kWindows>(rows, j, z);
    const Pairs zero = {}, one = zero + 1.0f, two = zero + 2.0f, three = zero + 3.0f;
#pragma GCC unroll 8
    for (int w = 0; w < kWindows; ++w) {
      const Pairs top = Relu(z[0][w]), bottom = Relu(z[1][w]);
      row_sums[0] += top;
      row_sums[1] += bottom;
      row_sums[2] += top * top;
      row_sums[3] += bottom * bottom;
      // The first position (row-major) holding the window's maximum of activation * sign: each row's better
      // column (strictly greater: the left keeps a tie), then the better row (the top keeps a tie), in the
      // left column's lanes. A NaN never wins here, but then the statistics and every output are NaN.
      const Pairs signed_top = top * sign, signed_bottom = bottom * sign;
      const Pairs right_top = SwapColumns(signed_top), right_bottom = SwapColumns(signed_bottom);
      const auto top_right_wins = right_top > signed_top, bottom_right_wins = right_bottom > signed_bottom;
      const Pairs best_top = top_right_wins ? right_top : signed_top;
      const Pairs best_bottom = bottom_right_wins ? right_bottom : signed_bottom;
      const auto bottom_wins = best_bottom > best_top;
      const Pairs best = bottom_wins ? best_bottom : best_top;
      const Pairs position = bottom_wins ? (bottom_right_wins ? three : two) : (top_right_wins ? one : zero);
      Store(selected_row + (j + w) * kOutChannels, LeftColumn(best * sign));
      Store(winner_row + (j + w) * kOutChannels, LeftColumn(position));
    }
  }

  // d(loss)/dz at the positions of windows j..j + kWindows - 1, into grad_z_ (row dy of window w at
  // grad_z_[dy * windows_ + w]) and added to the row's bias gradient.
  template <int kWindows>
  void GradZWindows(const float* const rows[kSpan], int64_t j, const float* winner_row, const float* grad_row,
                    const Pairs coefficients[3], Pairs& row_bias) {
    Pairs z[kPool][kWindows];
    ConvPairs<kWindows>(rows, j, z);
    const Pairs zero = {}, c0 = coefficients[0], c2 = coefficients[1], mean = coefficients[2];
    // The window position of each lane of row dy: dy * kPool + column.
    const Pairs positions[kPool] = {Pairs{0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1},
                                    Pairs{2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3}};
#pragma GCC unroll 8
    for (int w = 0; w < kWindows; ++w) {
      const Pairs winner = Duplicate(Load(winner_row + (j + w) * kOutChannels));
      const Pairs grad = Duplicate(Load(grad_row + (j + w) * kOutChannels));
#pragma GCC unroll 2
      for (int dy = 0; dy < kPool; ++dy) {
        const Pairs value = z[dy][w];
        const Pairs chosen = winner == positions[dy] ? grad + c0 : c0;
        const Pairs gradient = value > zero ? chosen + (value - mean) * c2 : zero;
        grad_z_[dy * windows_ + j + w] = gradient;
        row_bias += gradient;
      }
    }
  }

  const int64_t height_, width_, windows_, stride_;
  Pairs taps_[kTaps];  // the kernel's taps (ky, kx, ci), each weight vector in both columns
  const Pairs bias_;
  std::vector<float> planes_;         // kSpan row slots of 3 planes, then a slot of zeros
  std::vector<int64_t> plane_rows_;   // the row each slot holds (b * height + y), -1 for none
  std::vector<Pairs> grad_z_;         // d(loss)/dz of a row of windows
};

#else  // 8-wide vectors

// The input rows under kWindows neighbouring pooling windows of one row: kSpan rows of kWindows * kPool + 2
// pixels (window w's kernel position (dy, dx) reads rows dy..dy+2, pixels w * kPool + dx..+2), pointing into
// the image where the windows are inside it, else into a zero-padded copy.
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

// One thread's work on rows of windows of images (B, height, width, 3), for the kernel (3, 3, 3, 8) and bias.
class WindowRowKernel {
 public:
  WindowRowKernel(const float* kernel, const float* bias, int64_t height, int64_t width)
      : height_(height), width_(width), windows_(width / kPool), bias_(Load(bias)), grad_z_(kPool * width) {
    for (int tap = 0; tap < kTaps; ++tap) taps_[tap] = Load(kernel + tap * kOutChannels);
  }

  // Window row i of image b (x_data: the batch): the windows' selected activations and winning positions
  // stored, the sums of their activations and squares added to sums[0:8] and sums[8:16].
  void Forward(const float* x_data, int64_t b, int64_t i, Channels sign, float* selected_row, float* winner_row,
               double* sums) const {
    const float* image = x_data + b * height_ * width_ * kInChannels;
    Channels row_sum = {}, row_squares = {};
    int64_t j = 0;
    for (; j + kWindowsTogether <= windows_; j += kWindowsTogether) {
      ForwardWindows<kWindowsTogether>(image, i, j, sign, selected_row, winner_row, row_sum, row_squares);
    }
    for (; j < windows_; ++j) ForwardWindows<1>(image, i, j, sign, selected_row, winner_row, row_sum, row_squares);
    meso::AddLanes(&row_sum, 1, sums);
    meso::AddLanes(&row_squares, 1, sums + kOutChannels);
  }

  // Window row i of image b: the kernel and bias gradients of its positions added to
  // gradients[0:27*8] and gradients[27*8:28*8].
  void Backward(const float* x_data, int64_t b, int64_t i, const float* winner_row, const float* grad_row,
                const GradientCoefficients& coefficients, double* gradients) {
    const float* image = x_data + b * height_ * width_ * kInChannels;
    // d(loss)/dz of the window row's kPool image rows first, then the kernel gradient as running sums over
    // them (accumulators that stay in registers).
    Channels row_kernel[kTaps] = {}, row_bias = {};
    int64_t j = 0;
    for (; j + kWindowsTogether <= windows_; j += kWindowsTogether) {
      GradZWindows<kWindowsTogether>(image, i, j, winner_row, grad_row, coefficients, row_bias);
    }
    for (; j < windows_; ++j) GradZWindows<1>(image, i, j, winner_row, grad_row, coefficients, row_bias);
    for (int ky = 0; ky < kKernel; ++ky) {
      // The kernel row's 9 taps (kx, ci) together, each d(loss)/dz loaded once for all of them; two columns
      // at a time into two sets of sums, so that the additions do not wait on each other.
      Channels sums[2][kKernel * kInChannels] = {};
      for (int dy = 0; dy < kPool; ++dy) {
        const int64_t r = i * kPool + dy + ky - kKernel / 2;
        if (r < 0 || r >= height_) continue;
        const float* pixels = image + r * width_ * kInChannels;
        const Channels* gradients_z = grad_z_.data() + dy * width_;
        // Output column col's taps kx in [first_kx, last_kx), which read pixel column col + kx - 1.
        const auto add_column = [&](Channels* column_sums, int64_t col, int first_kx, int last_kx) {
          const Channels gradient = gradients_z[col];
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
        for (; col + 2 < width_; col += 2) {
          add_column(sums[0], col, 0, kKernel);
          add_column(sums[1], col + 1, 0, kKernel);
        }
        for (; col + 1 < width_; ++col) add_column(sums[0], col, 0, kKernel);
        add_column(sums[1], width_ - 1, 0, kKernel - kKernel / 2);
      }
      for (int tap = 0; tap < kKernel * kInChannels; ++tap) {
        row_kernel[ky * kKernel * kInChannels + tap] = sums[0][tap] + sums[1][tap];
      }
    }
    meso::AddLanes(row_kernel, kTaps, gradients);
    meso::AddLanes(&row_bias, 1, gradients + kTaps * kOutChannels);
  }

 private:
  template <int kWindows>
  void ForwardWindows(const float* image, int64_t i, int64_t j, Channels sign, float* selected_row,
                      float* winner_row, Channels& row_sum, Channels& row_squares) const {
    WindowRows<kWindows> windows;
    LoadWindows(image, height_, width_, i, j, windows);
    Channels z[kWindows][kPool * kPool];
    ConvAt(windows, taps_, bias_, z);
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
      Store(selected_row + (j + w) * kOutChannels, best * sign);
      Store(winner_row + (j + w) * kOutChannels, best_position);
    }
  }

  // d(loss)/dz at the positions of windows j..j + kWindows - 1, into grad_z_ (a row of windows' kPool image
  // rows) and added to the row's bias gradient.
  template <int kWindows>
  void GradZWindows(const float* image, int64_t i, int64_t j, const float* winner_row, const float* grad_row,
                    const GradientCoefficients& coefficients, Channels& row_bias) {
    WindowRows<kWindows> windows;
    LoadWindows(image, height_, width_, i, j, windows);
    Channels z[kWindows][kPool * kPool];
    ConvAt(windows, taps_, bias_, z);
    const Channels zero = {}, c0 = coefficients.c0, c2 = coefficients.c2, mean = coefficients.mean;
#pragma GCC unroll 8
    for (int w = 0; w < kWindows; ++w) {
      const Channels winner = Load(winner_row + (j + w) * kOutChannels);
      const Channels grad = Load(grad_row + (j + w) * kOutChannels);
      Channels gradient[kPool * kPool];
#pragma GCC unroll 4
      for (int position = 0; position < kPool * kPool; ++position) {
        const Channels chosen = winner == static_cast<float>(position) ? grad : zero;
        const Channels value = z[w][position];
        gradient[position] = value > zero ? chosen + c0 + (value - mean) * c2 : zero;
        const int dy = position / kPool, dx = position % kPool;
        grad_z_[dy * width_ + (j + w) * kPool + dx] = gradient[position];
      }
      row_bias += (gradient[0] + gradient[1]) + (gradient[2] + gradient[3]);
    }
  }

  const int64_t height_, width_, windows_;
  Channels taps_[kTaps];
  const Channels bias_;
  std::vector<Channels> grad_z_;  // d(loss)/dz of a row of windows' image rows
};

#endif  // defined(__AVX512F__)

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
  const float* x_data = x.typed_data();
  float *selected_data = selected->typed_data(), *winner_data = winner->typed_data();
  const Channels sign_v = Load(sign.typed_data());
  double total[2 * kOutChannels] = {};
#pragma omp parallel
  {
    double local[2 * kOutChannels] = {};
    WindowRowKernel kernel_rows(kernel.typed_data(), bias.typed_data(), height, width);
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      kernel_rows.Forward(x_data, window_row / out_h, window_row % out_h, sign_v,
                          selected_data + window_row * out_w * kOutChannels,
                          winner_data + window_row * out_w * kOutChannels, local);
    }
#pragma omp critical
    for (int index = 0; index < 2 * kOutChannels; ++index) total[index] += local[index];
  }
  for (int index = 0; index < 2 * kOutChannels; ++index) sums->typed_data()[index] = static_cast<float>(total[index]);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> winner, ffi::Buffer<ffi::F32> grad_selected,
                    ffi::Buffer<ffi::F32> coefficients, ffi::ResultBuffer<ffi::F32> grad_kernel,
                    ffi::ResultBuffer<ffi::F32> grad_bias) {
  if (!Supported(x.dimensions(), kernel.dimensions())) return ffi::Error::InvalidArgument(kShapeError);
  const int64_t batch = x.dimensions()[0], height = x.dimensions()[1], width = x.dimensions()[2];
  const int64_t out_h = height / kPool, out_w = width / kPool;
  const int64_t pooled_count = batch * out_h * out_w * kOutChannels;
  if (winner.element_count() != pooled_count || grad_selected.element_count() != pooled_count ||
      coefficients.element_count() != 3 * kOutChannels) {
    return ffi::Error::InvalidArgument(
        "Meso-4 first block backward: expected winners and grad_selected (B, H/2, W/2, 8) and (3, 8) "
        "coefficients");
  }
  const float *x_data = x.typed_data(), *winner_data = winner.typed_data();
  const float* grad_data = grad_selected.typed_data();
  // Rows of `coefficients`: c0, c2, mean.
  const GradientCoefficients gradient_coefficients = {Load(coefficients.typed_data()),
                                                      Load(coefficients.typed_data() + kOutChannels),
                                                      Load(coefficients.typed_data() + 2 * kOutChannels)};
  std::vector<double> total(kTaps * kOutChannels + kOutChannels, 0.0);
#pragma omp parallel
  {
    std::vector<double> local(total.size(), 0.0);
    WindowRowKernel kernel_rows(kernel.typed_data(), bias.typed_data(), height, width);
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      kernel_rows.Backward(x_data, window_row / out_h, window_row % out_h,
                           winner_data + window_row * out_w * kOutChannels,
                           grad_data + window_row * out_w * kOutChannels, gradient_coefficients, local.data());
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad_selected (B, H/2, W/2, 8)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coefficients (3, 8): c0, c2, mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad_kernel (3, 3, 3, 8)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // grad_bias (8,)
