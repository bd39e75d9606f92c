// oneDNN convolutions as XLA FFI handlers: NHWC activations, HWIO kernels (lps_jax.onednn).
//
// Three passes of one 2-D convolution without bias, each an FFI handler:
//   lps_onednn_conv_fwd          (x, w)  -> y     x: [..., N, H, W, C]   w: [..., KH, KW, C, O]
//   lps_onednn_conv_bwd_data     (dy, w) -> dx    dy: [..., N, Ho, Wo, O]
//   lps_onednn_conv_bwd_weights  (x, dy) -> dw
// Leading dimensions (a vmapped population) are looped over with one primitive. Inputs are
// float32 or bfloat16 (then oneDNN accumulates in float32); outputs are always float32.
// Attributes: stride, pad_top, pad_bottom, pad_left, pad_right (explicit, so the caller decides
// what 'SAME' means) and threads (the OpenMP team of this call; 0 = OpenMP's default).
// Primitives are created once per (pass, shapes, dtype, padding, threads) and cached; the
// kernel is handed to oneDNN in whatever layout it prefers (format_tag::any) through a reorder.
#include <omp.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "common.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

using namespace lps_onednn;   // NOLINT: the shared helpers of common.h

enum class Pass { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Geometry {
  int64_t n, h, w, c, ho, wo, o, kh, kw;
  int64_t stride, pt, pb, pl, pr, threads;
  memory::data_type in_type;
  Pass pass;

  std::string Key() const {
    std::ostringstream s;
    s << static_cast<int>(pass) << ':' << static_cast<int>(in_type) << ':' << n << ',' << h
      << ',' << w << ',' << c << ',' << ho << ',' << wo << ',' << o << ',' << kh << ',' << kw
      << ':' << stride << ',' << pt << ',' << pb << ',' << pl << ',' << pr << ':' << threads;
    return s.str();
  }
};

struct Entry {
  dnnl::primitive conv;
  memory::desc user_weights;    // HWIO, as the caller holds the kernel (or its gradient)
  memory::desc conv_weights;    // what the primitive reads (or writes)
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;  // user -> conv (fwd, bwd data); conv -> user (bwd weights)
  memory::desc first, second;     // the activations: (x, y), (dy, dx) or (x, dy)
  memory::desc scratchpad;
};

Entry Create(const Geometry& g) {
  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  const auto in = g.in_type;
  const memory::dims src{g.n, g.c, g.h, g.w}, wei{g.o, g.c, g.kh, g.kw},
      dst{g.n, g.o, g.ho, g.wo};
  const memory::dims strides{g.stride, g.stride}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto direct = dnnl::algorithm::convolution_direct;
  auto& eng = Engine();
  // The forward descriptor is also the hint of both backward passes.
  const auto fwd_dst_type = g.pass == Pass::kFwd ? f32 : in;
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, direct, memory::desc(src, in, tag::nhwc),
      memory::desc(wei, in, tag::any), memory::desc(dst, fwd_dst_type, tag::nhwc), strides,
      pad_l, pad_r, attr);
  Entry e;
  const memory::desc src_in(src, in, tag::nhwc), src_f32(src, f32, tag::nhwc),
      dst_in(dst, in, tag::nhwc), dst_f32(dst, f32, tag::nhwc);
  if (g.pass == Pass::kFwd) {
    e.first = src_in, e.second = dst_f32;
    e.conv = dnnl::convolution_forward(fwd);
    e.user_weights = memory::desc(wei, in, tag::hwio);
    e.conv_weights = fwd.weights_desc();
    e.scratchpad = fwd.scratchpad_desc();
  } else if (g.pass == Pass::kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, direct, memory::desc(src, f32, tag::nhwc), memory::desc(wei, in, tag::any),
        memory::desc(dst, in, tag::nhwc), strides, pad_l, pad_r, fwd, attr);
    e.conv = dnnl::convolution_backward_data(bwd);
    e.first = dst_in, e.second = src_f32;
    e.user_weights = memory::desc(wei, in, tag::hwio);
    e.conv_weights = bwd.weights_desc();
    e.scratchpad = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, direct, memory::desc(src, in, tag::nhwc), memory::desc(wei, f32, tag::any),
        memory::desc(dst, in, tag::nhwc), strides, pad_l, pad_r, fwd, attr);
    e.conv = dnnl::convolution_backward_weights(bwd);
    e.first = src_in, e.second = dst_in;
    e.user_weights = memory::desc(wei, f32, tag::hwio);
    e.conv_weights = bwd.diff_weights_desc();
    e.scratchpad = bwd.scratchpad_desc();
  }
  e.reorder_weights = e.conv_weights != e.user_weights;
  if (e.reorder_weights) {
    e.weights_reorder = g.pass == Pass::kBwdWeights
        ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, e.conv_weights, eng, e.user_weights))
        : dnnl::reorder(dnnl::reorder::primitive_desc(eng, e.user_weights, eng, e.conv_weights));
  }
  return e;
}

const Entry& Lookup(const Geometry& g) {
  return Cached<Entry>(g.Key(), [&g] { return Create(g); });
}

ffi::Error InputType(const ffi::AnyBuffer& b, memory::data_type* type) {
  switch (b.element_type()) {
    case ffi::DataType::F32: *type = memory::data_type::f32; return ffi::Error::Success();
    case ffi::DataType::BF16: *type = memory::data_type::bf16; return ffi::Error::Success();
    default: return ffi::Error::InvalidArgument("lps_onednn: inputs must be float32 or bfloat16");
  }
}

ffi::Error Run(Pass pass, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
               int64_t threads) {
  Geometry g{};
  g.pass = pass;
  g.stride = stride, g.pt = pt, g.pb = pb, g.pl = pl, g.pr = pr, g.threads = threads;
  memory::data_type ta, tb;
  if (auto err = InputType(a, &ta); err.failure()) return err;
  if (auto err = InputType(b, &tb); err.failure()) return err;
  if (ta != tb) return ffi::Error::InvalidArgument("lps_onednn: inputs differ in dtype");
  if (out->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("lps_onednn: the output must be float32");
  g.in_type = ta;
  int64_t la, lb, lo, da[4], db[4], dout[4];
  if (!Split4(a.dimensions(), &la, da) || !Split4(b.dimensions(), &lb, db) ||
      !Split4(out->dimensions(), &lo, dout) || la != lb || la != lo)
    return ffi::Error::InvalidArgument("lps_onednn: operands need rank >= 4 and equal leading dims");
  const int64_t* x = pass == Pass::kBwdData ? dout : da;          // N, H, W, C
  const int64_t* y = pass == Pass::kFwd ? dout : (pass == Pass::kBwdData ? da : db);
  const int64_t* k = pass == Pass::kBwdWeights ? dout : db;       // KH, KW, C, O
  g.n = x[0], g.h = x[1], g.w = x[2], g.c = x[3];
  g.ho = y[1], g.wo = y[2], g.o = y[3], g.kh = k[0], g.kw = k[1];
  if (y[0] != g.n || k[2] != g.c || k[3] != g.o || stride < 1 ||
      g.ho != (g.h + pt + pb - g.kh) / stride + 1 || g.wo != (g.w + pl + pr - g.kw) / stride + 1)
    return ffi::Error::InvalidArgument("lps_onednn: inconsistent convolution shapes");
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  try {
    const Entry& e = Lookup(g);
    auto& eng = Engine();
    ThreadScratch& s = Scratch();
    memory scratch(e.scratchpad, eng, Grow(s.scratchpad, e.scratchpad.get_size()));
    memory conv_w(e.conv_weights, eng,
                  e.reorder_weights ? Grow(s.weights, e.conv_weights.get_size()) : nullptr);
    const size_t in_bytes = ta == memory::data_type::f32 ? 4 : 2;
    const size_t a_step = a.element_count() / la * in_bytes;
    const size_t b_step = b.element_count() / lb * in_bytes;
    const size_t o_step = out->element_count() / lo * 4;
    auto* pa = static_cast<uint8_t*>(a.untyped_data());
    auto* pb_ = static_cast<uint8_t*>(b.untyped_data());
    auto* po = static_cast<uint8_t*>(out->untyped_data());
    const auto& cd = e.conv;
    for (int64_t i = 0; i < la; ++i, pa += a_step, pb_ += b_step, po += o_step) {
      if (pass == Pass::kFwd || pass == Pass::kBwdData) {
        memory user_w(e.user_weights, eng, pb_);
        if (e.reorder_weights) {
          e.weights_reorder.execute(*s.stream, user_w, conv_w);
        } else {
          conv_w.set_data_handle(pb_);
        }
        const auto act_in = pass == Pass::kFwd ? DNNL_ARG_SRC : DNNL_ARG_DIFF_DST;
        const auto act_out = pass == Pass::kFwd ? DNNL_ARG_DST : DNNL_ARG_DIFF_SRC;
        memory min(e.first, eng, pa), mout(e.second, eng, po);
        cd.execute(*s.stream, {{act_in, min}, {DNNL_ARG_WEIGHTS, conv_w}, {act_out, mout},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
      } else {
        memory msrc(e.first, eng, pa), mdy(e.second, eng, pb_);
        if (!e.reorder_weights) conv_w.set_data_handle(po);
        cd.execute(*s.stream, {{DNNL_ARG_SRC, msrc}, {DNNL_ARG_DIFF_DST, mdy},
                               {DNNL_ARG_DIFF_WEIGHTS, conv_w}, {DNNL_ARG_SCRATCHPAD, scratch}});
        if (e.reorder_weights) {
          memory user_w(e.user_weights, eng, po);
          e.weights_reorder.execute(*s.stream, conv_w, user_w);
        }
      }
    }
    s.stream->wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("lps_onednn: oneDNN error: ") + err.what());
  }
  return ffi::Error::Success();
}

#define LPS_BIND()                                                                      \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::AnyBuffer>()                                                            \
      .Arg<ffi::AnyBuffer>()                                                            \
      .Ret<ffi::AnyBuffer>()                                                            \
      .Attr<int64_t>("stride")                                                          \
      .Attr<int64_t>("pad_top")                                                         \
      .Attr<int64_t>("pad_bottom")                                                      \
      .Attr<int64_t>("pad_left")                                                        \
      .Attr<int64_t>("pad_right")                                                       \
      .Attr<int64_t>("threads")

// One handler per pass: (a, b) -> out, as listed at the top of this file.
template <Pass P>
ffi::Error Handler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                   int64_t s, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t threads) {
  return Run(P, a, b, out, s, pt, pb, pl, pr, threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lps_onednn_conv_fwd, Handler<Pass::kFwd>, LPS_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(lps_onednn_conv_bwd_data, Handler<Pass::kBwdData>, LPS_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(lps_onednn_conv_bwd_weights, Handler<Pass::kBwdWeights>,
                              LPS_BIND());

// The oneDNN version this library runs against, for the record (major * 10000 + minor * 100 + patch).
extern "C" int lps_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
