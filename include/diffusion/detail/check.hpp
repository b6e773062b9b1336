#pragma once

#include <torch/torch.h>

#include <cmath>
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

/// clip_x0, the range x_0's prediction is clamped to: >= 0, 0 turning it off.
inline void check_clip_x0(const char* fn, double clip_x0) {
  TORCH_CHECK(clip_x0 >= 0.0, fn, ": clip_x0 must be >= 0 (0: off), got ", clip_x0);
}

/// eta of an ancestral step (DDIM, Euler ancestral): the share of the step's variance drawn afresh, in
/// [0, 1] (Song et al. 2021, eq. 16: above 1 the step asks for more noise than x_{t_next} holds).
inline void check_ancestral_eta(const char* fn, double eta) {
  TORCH_CHECK(std::isfinite(eta) && eta >= 0.0 && eta <= 1.0, fn, ": eta must be in [0, 1], got ", eta);
}

/// A step of a discrete schedule of T timesteps from t to t_next: t in [0, T), t_next in [-1, t) (-1: to x_0).
inline void check_step(const char* fn, int64_t T, int64_t t, int64_t t_next) {
  TORCH_CHECK(t >= 0 && t < T, fn, ": t must be in [0, ", T, "), got ", t);
  TORCH_CHECK(t_next >= -1 && t_next < t, fn, ": t_next must be in [-1, t = ", t, "), got ", t_next);
}

}  // namespace diffusion::detail
