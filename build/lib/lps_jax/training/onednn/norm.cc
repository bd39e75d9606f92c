// oneDNN batch normalization in training mode as XLA FFI handlers: NHWC float32 (lps_jax.onednn).
//
//   lps_onednn_bn_fwd  (x, scale, bias)                     -> (y, mean, var, workspace)
//   lps_onednn_bn_bwd  (x, dy, scale, mean, var, workspace) -> (dx, dscale, dbias)
//
// x, y, dy, dx: [..., N, H, W, C]; scale, bias, mean, var and their gradients: [..., C];
// workspace: [..., B] bytes (B from lps_onednn_bn_workspace_bytes: oneDNN's record of where the
// fused ReLU was active). y = BN(x), then relu(y) when relu = 1 (oneDNN's fuse_norm_relu; its
// fuse_norm_add_relu has no CPU implementation in this oneDNN, so a block's residual add stays
// with XLA). mean and var are the batch statistics (var biased, as Flax's). Attributes: epsilon,
// relu (0 / 1), threads (the OpenMP team of this call; 0 = OpenMP's default). Leading
// dimensions (a vmapped population) are looped over with one primitive; primitives are
// created once per shape and cached.
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "common.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using dnnl::normalization_flags;

namespace {

using namespace lps_onednn;   // NOLINT: the shared helpers of common.h

// oneDNN plans a primitive's work for the OpenMP team of the thread that creates it, so the
// team size is part of the key and the primitive is created under it (as the convs do).
struct Geometry {
  int64_t n, h, w, c;
  float epsilon;
  bool relu;
  int64_t threads;

  normalization_flags Flags() const {
    auto f = normalization_flags::use_scale | normalization_flags::use_shift;
    return relu ? f | normalization_flags::fuse_norm_relu : f;
  }

  std::string Key() const {
    std::ostringstream s;
    uint32_t eps_bits;
    std::memcpy(&eps_bits, &epsilon, sizeof eps_bits);
    s << n << ',' << h << ',' << w << ',' << c << ':' << eps_bits << ':' << relu << ':'
      << threads;
    return s.str();
  }
};

struct Entry {
  dnnl::batch_normalization_forward fwd;
  dnnl::batch_normalization_backward bwd;
  memory::desc data, channels, workspace, fwd_scratchpad, bwd_scratchpad;
};

Entry Create(const Geometry& g) {
  const memory::desc data({g.n, g.c, g.h, g.w}, memory::data_type::f32, memory::format_tag::nhwc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& eng = Engine();
  dnnl::batch_normalization_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, data, data, g.epsilon, g.Flags(), attr);
  dnnl::batch_normalization_backward::primitive_desc bwd(
      eng, dnnl::prop_kind::backward, data, data, data, g.epsilon, g.Flags(), fwd, attr);
  return Entry{dnnl::batch_normalization_forward(fwd), dnnl::batch_normalization_backward(bwd),
               data, fwd.mean_desc(), fwd.workspace_desc(), fwd.scratchpad_desc(),
               bwd.scratchpad_desc()};
}

const Entry& Lookup(const Geometry& g) {
  return Cached<Entry>(g.Key(), [&g] { return Create(g); });
}

// Reads the geometry off x ([..., N, H, W, C]) and checks every other operand against it:
// `channel_ops` are [..., C], `data_ops` are [..., N, H, W, C]; all share the leading count.
ffi::Error Check(const ffi::AnyBuffer& x, std::initializer_list<const ffi::AnyBuffer*> data_ops,
                 std::initializer_list<const ffi::AnyBuffer*> channel_ops, Geometry* g,
                 int64_t* lead) {
  int64_t d[4];
  if (!Split4(x.dimensions(), lead, d))
    return ffi::Error::InvalidArgument("lps_onednn_bn: x must be [..., N, H, W, C]");
  g->n = d[0], g->h = d[1], g->w = d[2], g->c = d[3];
  for (const auto* b : data_ops) {
    if (b->element_type() != ffi::DataType::F32 || b->element_count() != x.element_count())
      return ffi::Error::InvalidArgument("lps_onednn_bn: activations must be float32, x's shape");
  }
  for (const auto* b : channel_ops) {
    if (b->element_type() != ffi::DataType::F32 || b->element_count() != *lead * g->c)
      return ffi::Error::InvalidArgument("lps_onednn_bn: per-channel operands must be float32 "
                                         "[..., C]");
  }
  if (x.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("lps_onednn_bn: x must be float32");
  return ffi::Error::Success();
}

// One model's operands: `base` advanced by `index` blocks of `bytes`.
void* At(void* base, int64_t index, size_t bytes) {
  return static_cast<uint8_t*>(base) + index * bytes;
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                   ffi::Result<ffi::AnyBuffer> workspace, float epsilon, int64_t relu,
                   int64_t threads) {
  Geometry g{};
  g.epsilon = epsilon, g.relu = relu != 0, g.threads = threads;
  int64_t lead;
  if (auto err = Check(x, {&*y}, {&scale, &bias, &*mean, &*var}, &g, &lead);
      err.failure())
    return err;
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  try {
    const Entry& e = Lookup(g);
    const size_t ws = e.workspace.get_size(), ws_step = workspace->element_count() / lead;
    if ((ws > 0 && ws_step < ws) || workspace->element_type() != ffi::DataType::U8)
      return ffi::Error::InvalidArgument("lps_onednn_bn: the workspace is too small");
    auto& eng = Engine();
    ThreadScratch& s = Scratch();
    memory scratch(e.fwd_scratchpad, eng, Grow(s.scratchpad, e.fwd_scratchpad.get_size()));
    const size_t data_step = x.element_count() / lead * 4, chan_step = g.c * 4;
    for (int64_t i = 0; i < lead; ++i) {
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, memory(e.data, eng, At(x.untyped_data(), i, data_step))},
          {DNNL_ARG_DST, memory(e.data, eng, At(y->untyped_data(), i, data_step))},
          {DNNL_ARG_SCALE, memory(e.channels, eng, At(scale.untyped_data(), i, chan_step))},
          {DNNL_ARG_SHIFT, memory(e.channels, eng, At(bias.untyped_data(), i, chan_step))},
          {DNNL_ARG_MEAN, memory(e.channels, eng, At(mean->untyped_data(), i, chan_step))},
          {DNNL_ARG_VARIANCE, memory(e.channels, eng, At(var->untyped_data(), i, chan_step))},
          {DNNL_ARG_SCRATCHPAD, scratch}};
      if (ws > 0)
        args[DNNL_ARG_WORKSPACE] =
            memory(e.workspace, eng, At(workspace->untyped_data(), i, ws_step));
      e.fwd.execute(*s.stream, args);
    }
    s.stream->wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("lps_onednn_bn: oneDNN error: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer scale,
                    ffi::AnyBuffer mean, ffi::AnyBuffer var, ffi::AnyBuffer workspace,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                    ffi::Result<ffi::AnyBuffer> dbias, float epsilon,
                    int64_t relu, int64_t threads) {
  Geometry g{};
  g.epsilon = epsilon, g.relu = relu != 0, g.threads = threads;
  int64_t lead;
  if (auto err = Check(x, {&dy, &*dx},
                       {&scale, &mean, &var, &*dscale, &*dbias}, &g, &lead);
      err.failure())
    return err;
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  try {
    const Entry& e = Lookup(g);
    const size_t ws = e.workspace.get_size(), ws_step = workspace.element_count() / lead;
    if (ws > 0 && ws_step < ws)
      return ffi::Error::InvalidArgument("lps_onednn_bn: the workspace is too small");
    auto& eng = Engine();
    ThreadScratch& s = Scratch();
    memory scratch(e.bwd_scratchpad, eng, Grow(s.scratchpad, e.bwd_scratchpad.get_size()));
    const size_t data_step = x.element_count() / lead * 4, chan_step = g.c * 4;
    for (int64_t i = 0; i < lead; ++i) {
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, memory(e.data, eng, At(x.untyped_data(), i, data_step))},
          {DNNL_ARG_DIFF_DST, memory(e.data, eng, At(dy.untyped_data(), i, data_step))},
          {DNNL_ARG_SCALE, memory(e.channels, eng, At(scale.untyped_data(), i, chan_step))},
          {DNNL_ARG_MEAN, memory(e.channels, eng, At(mean.untyped_data(), i, chan_step))},
          {DNNL_ARG_VARIANCE, memory(e.channels, eng, At(var.untyped_data(), i, chan_step))},
          {DNNL_ARG_DIFF_SRC, memory(e.data, eng, At(dx->untyped_data(), i, data_step))},
          {DNNL_ARG_DIFF_SCALE,
           memory(e.channels, eng, At(dscale->untyped_data(), i, chan_step))},
          {DNNL_ARG_DIFF_SHIFT, memory(e.channels, eng, At(dbias->untyped_data(), i, chan_step))},
          {DNNL_ARG_SCRATCHPAD, scratch}};
      if (ws > 0)
        args[DNNL_ARG_WORKSPACE] =
            memory(e.workspace, eng, At(workspace.untyped_data(), i, ws_step));
      e.bwd.execute(*s.stream, args);
    }
    s.stream->wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("lps_onednn_bn: oneDNN error: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lps_onednn_bn_fwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // scale
                                  .Arg<ffi::AnyBuffer>()   // bias
                                  .Ret<ffi::AnyBuffer>()   // y
                                  .Ret<ffi::AnyBuffer>()   // mean
                                  .Ret<ffi::AnyBuffer>()   // var
                                  .Ret<ffi::AnyBuffer>()   // workspace
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(lps_onednn_bn_bwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // dy
                                  .Arg<ffi::AnyBuffer>()   // scale
                                  .Arg<ffi::AnyBuffer>()   // mean
                                  .Arg<ffi::AnyBuffer>()   // var
                                  .Arg<ffi::AnyBuffer>()   // workspace
                                  .Ret<ffi::AnyBuffer>()   // dx
                                  .Ret<ffi::AnyBuffer>()   // dscale
                                  .Ret<ffi::AnyBuffer>()   // dbias
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));

// Bytes of oneDNN's workspace for one model's batch normalization of this shape (0 without a
// fused ReLU); the Python side sizes the workspace output with it. -1 if oneDNN refuses. The
// primitive is created (and cached) under the calling thread's team of `threads`, which is
// restored after.
extern "C" int64_t lps_onednn_bn_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                                 float epsilon, int64_t relu, int64_t threads) {
  const int saved = omp_get_max_threads();
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  int64_t bytes = -1;
  try {
    bytes = static_cast<int64_t>(Lookup(Geometry{n, h, w, c, epsilon, relu != 0, threads})
                                     .workspace.get_size());
  } catch (const dnnl::error&) {
  }
  omp_set_num_threads(saved);
  return bytes;
}
