// What the oneDNN FFI handlers of lps_jax.onednn share: one CPU engine, per-thread scratch
// space and stream, a primitive cache keyed by shapes, and the split of a (vmapped) operand
// into its leading count and trailing dimensions.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace lps_onednn {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Scratch space of the calling thread (XLA may run several calls at once on its threads).
struct ThreadScratch {
  std::vector<uint8_t> scratchpad, weights;
  std::unique_ptr<dnnl::stream> stream;
};

inline ThreadScratch& Scratch() {
  thread_local ThreadScratch scratch;
  if (!scratch.stream) scratch.stream = std::make_unique<dnnl::stream>(Engine());
  return scratch;
}

inline void* Grow(std::vector<uint8_t>& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// The entry of `key` in a process-wide cache, created once by `create` (primitives are built
// once per shape and reused by every later call).
template <typename Entry>
const Entry& Cached(const std::string& key, const std::function<Entry()>& create) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, std::make_unique<Entry>(create())).first;
  return *it->second;
}

// Splits [..., d0, d1, d2, d3] into a leading count and the last four dimensions.
inline bool Split4(xla::ffi::AnyBuffer::Dimensions dims, int64_t* lead, int64_t out[4]) {
  if (dims.size() < 4) return false;
  *lead = 1;
  for (size_t i = 0; i + 4 < dims.size(); ++i) *lead *= dims[i];
  for (int i = 0; i < 4; ++i) out[i] = dims[dims.size() - 4 + i];
  return true;
}

}  // namespace lps_onednn
