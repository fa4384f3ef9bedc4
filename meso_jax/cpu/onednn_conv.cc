// oneDNN 2-D convolutions for XLA:CPU as FFI custom calls: stride 1, SAME padding, any dilation, no bias,
// float32, NHWC activations and HWIO kernels used in place in XLA's row-major buffers. Three calls: the forward
// convolution, its gradient to the input (backward data) and to the kernel (backward weights).
// Built on first use by meso_jax/onednn.py, which also registers the calls with JAX.
//
// A primitive is created once per shape and kept (creating one costs milliseconds). XLA may run two of
// these calls at once (e.g. both gradients), so each call brings its own scratchpad: oneDNN's default
// shares one scratchpad among primitives, unsafe for concurrent execution. When oneDNN prefers a
// blocked kernel layout the (small) kernel is reordered per call.

#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Dims = ffi::Buffer<ffi::F32>::Dimensions;
// batch, height, width, input channels, kernel height, kernel width, output channels, dilation
using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Descriptors {
  dnnl::memory::desc src, kernel_hwio, kernel_any, dst;
  dnnl::memory::dims strides, dilates, padding_l, padding_r;
};

Descriptors MakeDescriptors(const Shape& shape) {
  const auto [batch, height, width, in_channels, kernel_h, kernel_w, out_channels, dilation] = shape;
  // SAME padding of the dilated kernel's extent; oneDNN counts dilation from 0 (0 = none).
  const int64_t extent_h = dilation * (kernel_h - 1), extent_w = dilation * (kernel_w - 1);
  using tag = dnnl::memory::format_tag;
  const auto f32 = dnnl::memory::data_type::f32;
  const dnnl::memory::dims kernel_dims = {out_channels, in_channels, kernel_h, kernel_w};
  return Descriptors{dnnl::memory::desc({batch, in_channels, height, width}, f32, tag::nhwc),
                     dnnl::memory::desc(kernel_dims, f32, tag::hwio),
                     dnnl::memory::desc(kernel_dims, f32, tag::any),
                     dnnl::memory::desc({batch, out_channels, height, width}, f32, tag::nhwc),
                     {1, 1},
                     {dilation - 1, dilation - 1},
                     {extent_h / 2, extent_w / 2},
                     {extent_h - extent_h / 2, extent_w - extent_w / 2}};
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attributes;
  attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attributes;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Descriptors& d) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.src, d.kernel_any,
      d.dst, d.strides, d.dilates, d.padding_l, d.padding_r, UserScratchpad());
}

// A primitive, the kernel layout it works with and the scratchpad it needs.
struct Prepared {
  dnnl::primitive primitive;
  dnnl::memory::desc kernel, scratchpad;
};

enum class Kind { kForward, kBackwardData, kBackwardWeights };

Prepared Prepare(Kind kind, const Descriptors& d) {
  switch (kind) {
    case Kind::kForward: {
      auto pd = ForwardDesc(d);
      return {dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc()};
    }
    case Kind::kBackwardData: {
      auto pd = dnnl::convolution_backward_data::primitive_desc(Engine(), dnnl::algorithm::convolution_direct,
                                                                d.src, d.kernel_any, d.dst, d.strides,
                                                                d.dilates, d.padding_l, d.padding_r, ForwardDesc(d),
                                                                UserScratchpad());
      return {dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
    }
    case Kind::kBackwardWeights: {
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, d.src, d.kernel_any, d.dst, d.strides, d.dilates,
          d.padding_l, d.padding_r, ForwardDesc(d), UserScratchpad());
      return {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), pd.scratchpad_desc()};
    }
  }
  throw std::logic_error("unknown convolution kind");
}

const Prepared& Cached(Kind kind, const Shape& shape, const Descriptors& d) {
  static std::mutex mutex;
  static std::map<std::pair<Kind, Shape>, Prepared> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(kind, shape);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, Prepare(kind, d)).first;
  return it->second;
}

// Runs the convolution `kind` on (batch, height, width, in_channels) activations `x` and a (kernel_h,
// kernel_w, in_channels, out_channels) `kernel` dilated by `dilation`: `x`, `kernel` and `y` are the
// source, kernel and destination buffers of the forward convolution, whichever are inputs or outputs.
ffi::Error Run(Kind kind, Dims x_dims, Dims kernel_dims, int64_t dilation, float* x, float* kernel, float* y) {
  if (x_dims.size() != 4 || kernel_dims.size() != 4 || kernel_dims[2] != x_dims[3] || dilation < 1) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolution: expected x (B, H, W, Cin), kernel (KH, KW, Cin, Cout), dilation >= 1");
  }
  const Shape shape{x_dims[0], x_dims[1], x_dims[2], x_dims[3], kernel_dims[0], kernel_dims[1], kernel_dims[3],
                    dilation};
  for (int64_t size : {x_dims[0], x_dims[1], x_dims[2], x_dims[3], kernel_dims[0], kernel_dims[1], kernel_dims[3]}) {
    if (size == 0) return ffi::Error::Success();  // nothing to compute (outputs of size zero)
  }
  try {
    const Descriptors d = MakeDescriptors(shape);
    const Prepared& prepared = Cached(kind, shape, d);
    dnnl::stream stream(Engine());
    dnnl::memory kernel_hwio(d.kernel_hwio, Engine(), kernel);
    const bool reordered = prepared.kernel != d.kernel_hwio;
    dnnl::memory kernel_used = reordered ? dnnl::memory(prepared.kernel, Engine()) : kernel_hwio;
    if (reordered && kind != Kind::kBackwardWeights) {
      dnnl::reorder(kernel_hwio, kernel_used).execute(stream, kernel_hwio, kernel_used);
    }
    dnnl::memory src(d.src, Engine(), x), dst(d.dst, Engine(), y);
    dnnl::memory scratchpad(prepared.scratchpad, Engine());  // allocated for this call
    switch (kind) {
      case Kind::kForward:
        prepared.primitive.execute(
            stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel_used}, {DNNL_ARG_DST, dst},
                     {DNNL_ARG_SCRATCHPAD, scratchpad}});
        break;
      case Kind::kBackwardData:
        prepared.primitive.execute(
            stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, kernel_used}, {DNNL_ARG_DIFF_DST, dst},
                     {DNNL_ARG_SCRATCHPAD, scratchpad}});
        break;
      case Kind::kBackwardWeights:
        prepared.primitive.execute(
            stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, kernel_used}, {DNNL_ARG_DIFF_DST, dst},
                     {DNNL_ARG_SCRATCHPAD, scratchpad}});
        if (reordered) dnnl::reorder(kernel_used, kernel_hwio).execute(stream, kernel_used, kernel_hwio);
        break;
    }
    stream.wait();
  } catch (const std::exception& error) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + error.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                   int64_t dilation) {
  return Run(Kind::kForward, x.dimensions(), kernel.dimensions(), dilation, x.typed_data(), kernel.typed_data(),
             y->typed_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> grad_y, ffi::Buffer<ffi::F32> kernel,
                        ffi::ResultBuffer<ffi::F32> grad_x, int64_t dilation) {
  return Run(Kind::kBackwardData, grad_x->dimensions(), kernel.dimensions(), dilation, grad_x->typed_data(),
             kernel.typed_data(), grad_y.typed_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> grad_y,
                           ffi::ResultBuffer<ffi::F32> grad_kernel, int64_t dilation) {
  return Run(Kind::kBackwardWeights, x.dimensions(), grad_kernel->dimensions(), dilation, x.typed_data(),
             grad_kernel->typed_data(), grad_y.typed_data());
}

}  // namespace

// All three: two float32 buffers in, one out, and the "dilation" attribute.
#define MESO_ONEDNN_BINDING \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>() \
      .Attr<int64_t>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoOnednnConvForward, Forward, MESO_ONEDNN_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoOnednnConvBackwardData, BackwardData, MESO_ONEDNN_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoOnednnConvBackwardWeights, BackwardWeights, MESO_ONEDNN_BINDING);

namespace {
// Hands its operand on unchanged (the result aliases it): XLA cannot fuse through a custom call, so
// the operand is computed once into memory and every consumer reads it there.
ffi::Error Materialize(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  if (x.typed_data() != y->typed_data()) {
    std::memcpy(y->typed_data(), x.typed_data(), x.element_count() * sizeof(float));
  }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MesoMaterialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
