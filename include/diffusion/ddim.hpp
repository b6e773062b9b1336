#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/detail/check.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/random.hpp>
#include <diffusion/sampler.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <vector>

/// DDIM (Song, Meng & Ermon 2021): sampling in far fewer steps than T, deterministic at eta = 0.
namespace diffusion {

/// The S timestep indices DDIM visits, ascending: i * T / S for i = 0 .. S-1 (integer division), so
/// 0 is always included and the stride is T / S. The step from index k goes to the previous entry of
/// this list, not to k - 1.
inline std::vector<int64_t> ddim_timesteps(int64_t T, int64_t steps) {
  TORCH_CHECK(steps >= 1 && steps <= T, "ddim_timesteps: steps must be in [1, ", T, "], got ", steps);
  std::vector<int64_t> out;
  for (int64_t i = 0; i < steps; ++i) out.push_back(i * T / steps);
  return out;
}

/// One DDIM step from timestep index t to index t_prev < t (t_prev = -1 means "to x_0", abar = 1),
/// given the predicted noise (Song et al. 2021, eq. 12):
///   x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
///   x_prev  = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z
///   sigma   = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)     (eq. 16)
/// eta = 0 is deterministic; eta = 1 has DDPM's posterior variance between the visited steps.
/// `clip_x0` > 0 clamps x0_pred to [-clip_x0, clip_x0] and recomputes eps from the clamped x0_pred so
/// that both terms agree (as ddpm_step's clip_x0; 0: off).
inline torch::Tensor ddim_step(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t, int64_t t_prev,
                               const torch::Tensor& eps_pred, double eta = 0.0, const torch::Tensor& noise = {},
                               double clip_x0 = 0.0) {
  constexpr const char* fn = "ddim_step";
  detail::check_sample_batch(fn, "x_t", x_t);
  TORCH_CHECK(t >= 0 && t < schedule.timesteps(), fn, ": t must be in [0, ", schedule.timesteps(), "), got ", t);
  TORCH_CHECK(t_prev >= -1 && t_prev < t, fn, ": t_prev must be in [-1, t = ", t, "), got ", t_prev);
  TORCH_CHECK(eta >= 0.0, fn, ": eta must be >= 0, got ", eta);
  TORCH_CHECK(clip_x0 >= 0.0, fn, ": clip_x0 must be >= 0 (0: off), got ", clip_x0);
  TORCH_CHECK(eps_pred.defined() && eps_pred.sizes() == x_t.sizes(), fn,
              ": the predicted noise must have x_t's shape ", detail::shape_str(x_t), ", got ",
              eps_pred.defined() ? detail::shape_str(eps_pred) : "an undefined tensor");
  const auto& h = schedule.host();
  const double abar = h.alphas_cumprod[static_cast<size_t>(t)];
  const double abar_prev = t_prev >= 0 ? h.alphas_cumprod[static_cast<size_t>(t_prev)] : 1.0;
  const double sigma = eta * std::sqrt((1 - abar_prev) / (1 - abar)) * std::sqrt(1 - abar / abar_prev);
  const auto x0_pred = detail::predicted_x0(x_t, eps_pred, abar, clip_x0);
  // After clamping, the noise that the clamped x0 implies, so both terms of eq. 12 agree.
  const auto eps = clip_x0 > 0.0 ? (x_t - x0_pred * std::sqrt(abar)) / std::sqrt(1 - abar) : eps_pred;
  auto out = x0_pred * std::sqrt(abar_prev) + eps * std::sqrt(std::max(0.0, 1 - abar_prev - sigma * sigma));
  if (sigma > 0) {
    TORCH_CHECK(noise.defined() && noise.sizes() == x_t.sizes(), fn, ": with sigma > 0 the noise z must have x_t's shape ",
                detail::shape_str(x_t), ", got ", noise.defined() ? detail::shape_str(noise) : "an undefined tensor");
    out.add_(noise, sigma);
  }
  return out;
}

/// Options for ddim_sample.
///
/// Example:
///   auto x = ddim_sample(model, schedule, {25, 1, 28, 28}, DDIMOptions().steps(50).eta(0.0).seed(1));
struct DDIMOptions {
  /// Number of model evaluations S (<= T).
  TORCH_ARG(int64_t, steps) = 50;
  /// 0: deterministic DDIM; 1: DDPM-like stochasticity.
  TORCH_ARG(double, eta) = 0.0;
  TORCH_ARG(std::optional<uint64_t>, seed) = std::nullopt;
  TORCH_ARG(std::optional<torch::Generator>, generator) = std::nullopt;
  TORCH_ARG(std::function<void(const SampleStep&)>, callback) = nullptr;
  /// Clamp each step's predicted x_0 to [-clip_x0, clip_x0] (see ddim_step); 0: off.
  TORCH_ARG(double, clip_x0) = 0.0;
  /// The backbone's arithmetic (Precision::BFloat16: autocast); the sampler's own stays float32.
  TORCH_ARG(Precision, precision) = Precision::Float32;
};

/// Generates samples with DDIM: x_T ~ N(0, I), then ddim_step over ddim_timesteps(T, steps) from the
/// largest to 0, ending at x_0. Same device, dtype, eval-mode and InferenceMode handling as ddpm_sample.
template <Backbone B>
torch::Tensor ddim_sample(B& model, const NoiseSchedule& schedule, std::vector<int64_t> shape,
                          const DDIMOptions& options = {}) {
  constexpr const char* fn = "ddim_sample";
  const auto ts = ddim_timesteps(schedule.timesteps(), options.steps());
  TORCH_CHECK(options.eta() >= 0.0, fn, ": eta must be >= 0, got ", options.eta());
  TORCH_CHECK(options.clip_x0() >= 0.0, fn, ": clip_x0 must be >= 0 (0: off), got ", options.clip_x0());
  return detail::run_sampler(fn, model, schedule, shape, options.seed(), options.generator(),
                             [&](torch::Tensor x, const auto& draw_noise) {
                               const auto total = static_cast<int64_t>(ts.size());
                               for (int64_t i = total - 1; i >= 0; --i) {
                                 const int64_t t = ts[static_cast<size_t>(i)];
                                 const int64_t t_prev = i > 0 ? ts[static_cast<size_t>(i - 1)] : -1;
                                 const auto t_batch = detail::timestep_batch(shape.front(), t, schedule.device());
                                 const auto eps = detail::predict_noise(fn, model, x, t_batch, options.precision());
                                 const bool stochastic = options.eta() > 0 && t_prev >= 0;
                                 x = ddim_step(schedule, x, t, t_prev, eps, options.eta(),
                                               stochastic ? draw_noise() : torch::Tensor{}, options.clip_x0());
                                 if (options.callback()) options.callback()(SampleStep{total - i, total, t, x});
                               }
                               return x;
                             });
}

}  // namespace diffusion
