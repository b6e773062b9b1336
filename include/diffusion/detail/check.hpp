#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <sstream>
#include <string>

/// Input checks shared by the public entry points. Every message names the function, what was
/// expected and what came, so a user can fix the call without reading the library.
namespace diffusion::detail {

inline std::string shape_str(const torch::Tensor& x) {
  std::ostringstream os;
  os << x.sizes();
  return os.str();
}

/// x must be a defined floating-point tensor of at least one dimension (the batch).
inline void check_sample_batch(const char* fn, const char* name, const torch::Tensor& x) {
  TORCH_CHECK(x.defined(), fn, ": ", name, " is an undefined tensor");
  TORCH_CHECK(x.is_floating_point(), fn, ": ", name, " must be a floating-point tensor, got dtype ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, fn, ": ", name, " must have a batch dimension (N, ...), got a 0-d tensor");
}

/// t must be a 1-D integer tensor with one timestep per sample, on x's device, in [0, T).
inline void check_timesteps(const char* fn, const torch::Tensor& t, int64_t batch, const torch::Device& device,
                            int64_t T) {
  TORCH_CHECK(t.defined(), fn, ": t is an undefined tensor");
  TORCH_CHECK(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != torch::kBool, fn,
              ": t must be an integer tensor of timesteps, got dtype ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, fn, ": t must be 1-D with one timestep per sample, got shape ", shape_str(t));
  TORCH_CHECK(t.size(0) == batch, fn, ": t has ", t.size(0), " timesteps but the batch has ", batch,
              " samples (no broadcasting)");
  TORCH_CHECK(t.device() == device, fn, ": t is on ", t.device(), " but x is on ", device);
  if (batch > 0) {
    const auto lo = t.min().item<int64_t>();
    const auto hi = t.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < T, fn, ": t must be in [0, ", T, "), got values in [", lo, ", ", hi, "]");
  }
}

}  // namespace diffusion::detail
