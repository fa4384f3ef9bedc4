// The later blocks of Meso-4 after their convolution, as two XLA FFI calls: ReLU(z + bias) -> batch
// statistics -> pool x pool max-pool selection, and its gradient back to z. Built into the same library as
// onednn_conv.cc by meso_jax/onednn.py; used by meso_jax/fast_training.py.
//
// The bias is per position (H, W, C): a previous block's BatchNorm folded into the convolution adds a
// constant that changes near the image's edges (fast_training.conv_of_normalized).
//
// Each call is one pass over the convolution's output, split over threads by rows of pooling windows, 8
// channels at a time (XLA's fusions make a pass each for the ReLU, both statistics and the selection, and
// for the gradient's product, mask and sums):
//
// * Forward: per window, the activations at its pool * pool positions, their running sums and sums of
//   squares (BatchNorm's batch statistics), and the selected activation (the maximum, or the minimum for
//   channels with a negative BatchNorm scale: `sign`) with the first position holding it (row-major, as
//   XLA's max-pool gradient picks). BatchNorm's affine map is applied by the caller (or folded into the
//   next convolution).
// * Backward: d(loss)/dz = [z + bias > 0] * ([chosen] * grad_selected + c0 + (a - mean) * c2) at every
//   position, with the per-channel coefficients c0 = d(loss)/d(mean) / count and c2 = 2 d(loss)/d(var) /
//   count of the batch statistics' gradients, and the bias gradient (its sum over the batch).
//
// The statistics are summed in float along a row of windows and in double across rows; the bias gradient
// in float over each thread's images, then across threads.

#include <omp.h>

#include <cstdint>
#include <vector>

#include "vector8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = meso::kVectorLanes;  // channels per vector
using Lanes = meso::Vector8;
using meso::Load;
using meso::Store;

using Dims = ffi::Buffer<ffi::F32>::Dimensions;

// z (B, H, W, C) with C a multiple of 8, pooled (B, H/p, W/p, C), bias (H, W, C).
bool Supported(Dims dims, Dims out_dims, Dims bias_dims) {
  return dims.size() == 4 && out_dims.size() == 4 && dims[3] % kLanes == 0 && out_dims[1] > 0 &&
         out_dims[2] > 0 && dims[1] % out_dims[1] == 0 && dims[1] / out_dims[1] * out_dims[2] == dims[2] &&
         dims[2] % out_dims[2] == 0 && out_dims[0] == dims[0] && out_dims[3] == dims[3] &&
         bias_dims.size() == 3 && bias_dims[0] == dims[1] && bias_dims[1] == dims[2] && bias_dims[2] == dims[3];
}

const char kShapeError[] =
    "pooling selection: expected z (B, H, W, C) with C a multiple of 8, an (H, W, C) bias, (B, H/p, W/p, C) "
    "pooled values (and winners and the selected values' gradient alike, (3, C) coefficients in the backward)";

ffi::Error Forward(ffi::Buffer<ffi::F32> conv, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> sign,
                   ffi::ResultBuffer<ffi::F32> selected, ffi::ResultBuffer<ffi::F32> winner,
                   ffi::ResultBuffer<ffi::F32> sums) {
  const auto dims = conv.dimensions();
  const auto out_dims = selected->dimensions();
  if (!Supported(dims, out_dims, bias.dimensions())) return ffi::Error::InvalidArgument(kShapeError);
  const int64_t batch = dims[0], height = dims[1], width = dims[2], channels = dims[3];
  const int64_t out_h = out_dims[1], out_w = out_dims[2], pool = height / out_h;
  const int64_t chunks = channels / kLanes;
  const float *z_data = conv.typed_data(), *b_data = bias.typed_data(), *s_data = sign.typed_data();
  float *selected_data = selected->typed_data(), *winner_data = winner->typed_data();
  std::vector<double> total(2 * channels, 0.0);
#pragma omp parallel
  {
    std::vector<double> local(2 * channels, 0.0);
    std::vector<Lanes> row_sum(chunks), row_squares(chunks);
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      const int64_t b = window_row / out_h, i = window_row % out_h;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) row_sum[chunk] = row_squares[chunk] = Lanes{};
      for (int64_t j = 0; j < out_w; ++j) {
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const Lanes sign_v = Load(s_data + chunk * kLanes), zero = {};
          Lanes best = {}, best_position = {}, sum = {}, squares = {};
          for (int64_t position = 0; position < pool * pool; ++position) {
            const int64_t row = i * pool + position / pool, col = j * pool + position % pool;
            const int64_t at = (row * width + col) * channels + chunk * kLanes;
            const Lanes pre = Load(z_data + b * height * width * channels + at) + Load(b_data + at);
            const Lanes activation = pre < zero ? zero : pre;  // ReLU; NaN stays NaN, as in XLA
            sum += activation;
            squares += activation * activation;
            const Lanes signed_activation = activation * sign_v;
            if (position == 0) {
              best = signed_activation;
            } else {
              // Strictly greater: the first position keeps a tie. A NaN wins and stays (XLA's maximum).
              const auto better = signed_activation > best || signed_activation != signed_activation;
              best = better ? signed_activation : best;
              best_position = better ? Lanes{} + static_cast<float>(position) : best_position;
            }
          }
          row_sum[chunk] += sum;
          row_squares[chunk] += squares;
          const int64_t out = (window_row * out_w + j) * channels + chunk * kLanes;
          Store(selected_data + out, best * sign_v);
          Store(winner_data + out, best_position);
        }
      }
      meso::AddLanes(row_sum.data(), chunks, local.data());
      meso::AddLanes(row_squares.data(), chunks, local.data() + channels);
    }
#pragma omp critical
    for (int64_t index = 0; index < 2 * channels; ++index) total[index] += local[index];
  }
  for (int64_t index = 0; index < 2 * channels; ++index) sums->typed_data()[index] = static_cast<float>(total[index]);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> conv, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> winner,
                    ffi::Buffer<ffi::F32> grad_selected, ffi::Buffer<ffi::F32> coefficients,
                    ffi::ResultBuffer<ffi::F32> grad_z, ffi::ResultBuffer<ffi::F32> grad_bias) {
  const auto dims = conv.dimensions();
  const auto out_dims = grad_selected.dimensions();
  if (!Supported(dims, out_dims, bias.dimensions()) || winner.element_count() != grad_selected.element_count() ||
      coefficients.element_count() != 3 * dims[3]) {
    return ffi::Error::InvalidArgument(kShapeError);
  }
  const int64_t batch = dims[0], height = dims[1], width = dims[2], channels = dims[3];
  const int64_t out_h = out_dims[1], out_w = out_dims[2], pool = height / out_h;
  const int64_t chunks = channels / kLanes, image_size = height * width * channels;
  // Rows of `coefficients`: c0, c2, mean.
  std::vector<Lanes> c0(chunks), c2(chunks), mean(chunks);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    c0[chunk] = Load(coefficients.typed_data() + chunk * kLanes);
    c2[chunk] = Load(coefficients.typed_data() + channels + chunk * kLanes);
    mean[chunk] = Load(coefficients.typed_data() + 2 * channels + chunk * kLanes);
  }
  const float *z_data = conv.typed_data(), *b_data = bias.typed_data(), *winner_data = winner.typed_data();
  const float* grad_data = grad_selected.typed_data();
  float *grad_z_data = grad_z->typed_data(), *grad_bias_data = grad_bias->typed_data();
  for (int64_t index = 0; index < image_size; ++index) grad_bias_data[index] = 0.0f;
#pragma omp parallel
  {
    // This thread's sums over its images of d(loss)/dz at each position (the bias's gradient).
    std::vector<float> local(image_size, 0.0f);
#pragma omp for schedule(static)
    for (int64_t window_row = 0; window_row < batch * out_h; ++window_row) {
      const int64_t b = window_row / out_h, i = window_row % out_h;
      for (int64_t j = 0; j < out_w; ++j) {
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const int64_t out = (window_row * out_w + j) * channels + chunk * kLanes;
          const Lanes winner_v = Load(winner_data + out), grad = Load(grad_data + out), zero = {};
          for (int64_t position = 0; position < pool * pool; ++position) {
            const int64_t row = i * pool + position / pool, col = j * pool + position % pool;
            const int64_t at = (row * width + col) * channels + chunk * kLanes;
            const Lanes pre = Load(z_data + b * image_size + at) + Load(b_data + at);
            const Lanes chosen = winner_v == static_cast<float>(position) ? grad : zero;
            // The ReLU's mask: zero where pre <= 0 (and where it is NaN, as XLA's select).
            const Lanes gradient = pre > zero ? chosen + c0[chunk] + (pre - mean[chunk]) * c2[chunk] : zero;
            Store(grad_z_data + b * image_size + at, gradient);
            Store(local.data() + at, Load(local.data() + at) + gradient);
          }
        }
      }
    }
#pragma omp critical
    for (int64_t index = 0; index < image_size; ++index) grad_bias_data[index] += local[index];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoPoolSelectForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z = conv(x, kernel) (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (H, W, C), per position
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sign (C,): +1 window maximum, -1 minimum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // selected (B, H/p, W/p, C)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // winner: its position in the window
                                  .Ret<ffi::Buffer<ffi::F32>>());  // sums (2, C): of relu(z), of relu(z)^2

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoPoolSelectBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // winner (B, H/p, W/p, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad_selected (B, H/p, W/p, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coefficients (3, C): c0, c2, mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad_z (B, H, W, C)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // grad_bias (H, W, C): summed over the batch
