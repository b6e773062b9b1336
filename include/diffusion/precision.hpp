#pragma once

#include <ATen/autocast_mode.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <string>
#include <string_view>

/// Mixed precision: where the backbone's matrix products and convolutions run.
namespace diffusion {

/// The arithmetic of a backbone's forward (and so backward) pass.
enum class Precision {
  /// Everything in float32, as in the seed.
  Float32,
  /// Autocast to bfloat16: convolutions and matrix products run in bf16 with float32 accumulation,
  /// normalization, losses, the optimizer, the EMA and the sampler's arithmetic stay float32 (the
  /// weights themselves are float32 throughout). bf16 keeps float32's exponent range, so no loss
  /// scaling is needed. On CPUs with AMX or AVX512-BF16 (Sapphire Rapids and later) the products run
  /// several times faster (docs/performance.md); elsewhere it may be slower than Float32.
  BFloat16,
};

inline std::string_view to_string(Precision p) { return p == Precision::BFloat16 ? "bf16" : "fp32"; }

/// "fp32" or "bf16"; anything else is refused with the accepted spellings.
inline Precision parse_precision(std::string_view s) {
  const bool fp32 = s == "fp32" || s == "float32", bf16 = s == "bf16" || s == "bfloat16";
  TORCH_CHECK(fp32 || bf16, "parse_precision: expected \"fp32\" or \"bf16\", got \"", std::string(s), "\"");
  return bf16 ? Precision::BFloat16 : Precision::Float32;
}

namespace detail {

// LibTorch 2.4 replaced the per-backend autocast switches (set_cpu_enabled, set_enabled for CUDA) with
// set_autocast_enabled(device_type, ...); the old names were deprecated there and later removed.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
inline bool autocast_enabled(c10::DeviceType d) { return at::autocast::is_autocast_enabled(d); }
inline void set_autocast_enabled(c10::DeviceType d, bool on) { at::autocast::set_autocast_enabled(d, on); }
inline at::ScalarType autocast_dtype(c10::DeviceType d) { return at::autocast::get_autocast_dtype(d); }
inline void set_autocast_dtype(c10::DeviceType d, at::ScalarType t) { at::autocast::set_autocast_dtype(d, t); }
#else
inline bool autocast_enabled(c10::DeviceType d) {
  return d == c10::DeviceType::CUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
}
inline void set_autocast_enabled(c10::DeviceType d, bool on) {
  if (d == c10::DeviceType::CUDA) {
    at::autocast::set_enabled(on);
  } else {
    at::autocast::set_cpu_enabled(on);
  }
}
inline at::ScalarType autocast_dtype(c10::DeviceType d) {
  return d == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
}
inline void set_autocast_dtype(c10::DeviceType d, at::ScalarType t) {
  if (d == c10::DeviceType::CUDA) {
    at::autocast::set_autocast_gpu_dtype(t);
  } else {
    at::autocast::set_autocast_cpu_dtype(t);
  }
}
#endif

/// Runs a GroupNorm in its weights' dtype. Under autocast a convolution hands it a bf16 tensor;
/// LibTorch 1.13's CPU autocast passes that on to group_norm beside float32 weights, which it refuses.
/// Normalizing in float32 is also what autocast does on CUDA, where group_norm is on the float32 list.
/// (Casting the weights to bf16 instead runs, but more slowly with LibTorch 1.13: docs/performance.md.)
inline torch::Tensor group_norm(torch::nn::GroupNorm& norm, const torch::Tensor& x) {
  const auto& w = norm->weight;
  return norm(w.defined() && x.scalar_type() != w.scalar_type() ? x.to(w.scalar_type()) : x);
}

}  // namespace detail

/// For its lifetime, turns autocast on (BFloat16) or off (Float32) for `device`'s type, and restores
/// what it found. Like Python's torch.autocast: nests, and drops the cache of cast weights when the
/// outermost guard ends (the weights change between steps). Float32 where autocast is already off does
/// nothing (so the float32 hot paths pay nothing), nor on a device other than the CPU or CUDA; BFloat16
/// there is refused.
///
/// Example:
///   {
///     AutocastGuard amp(Precision::BFloat16, torch::kCPU);
///     auto eps = model->forward(x, t).to(torch::kFloat32);
///   }
class AutocastGuard {
 public:
  AutocastGuard(Precision precision, const torch::Device& device) : type_(device.type()) {
    const bool bf16 = precision == Precision::BFloat16, supported = device.is_cpu() || device.is_cuda();
    TORCH_CHECK(supported || !bf16, "AutocastGuard: bf16 autocast supports CPU and CUDA devices, got ", device);
    active_ = supported && (bf16 || detail::autocast_enabled(type_));
    if (!active_) return;
    was_enabled_ = detail::autocast_enabled(type_);
    was_dtype_ = detail::autocast_dtype(type_);
    detail::set_autocast_enabled(type_, bf16);
    if (bf16) detail::set_autocast_dtype(type_, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (!active_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    detail::set_autocast_enabled(type_, was_enabled_);
    detail::set_autocast_dtype(type_, was_dtype_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType type_;
  bool active_ = false;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

}  // namespace diffusion
