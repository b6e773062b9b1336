#pragma once

#include <diffusion/detail/check.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/sampling/spacing.hpp>
#include <diffusion/schedule.hpp>

#include <fmt/core.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

/// DDIM (Song, Meng & Ermon 2021): sampling in far fewer steps than T, deterministic at eta = 0.
namespace diffusion {

namespace detail {

/// Eq. 12 of Song et al. from a consistent (eps, x0) pair: see ddim_step.
inline torch::Tensor ddim_update(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t, int64_t t_next,
                                 const Denoised& d, double eta, const torch::Tensor& noise) {
  const auto& h = schedule.host();
  const double abar = h.alphas_cumprod[static_cast<size_t>(t)];
  const double abar_prev = t_next >= 0 ? h.alphas_cumprod[static_cast<size_t>(t_next)] : 1.0;
  const double sigma = eta > 0 ? eta * std::sqrt((1 - abar_prev) / (1 - abar)) * std::sqrt(1 - abar / abar_prev) : 0.0;
  auto out = d.x0 * std::sqrt(abar_prev) + d.eps * std::sqrt(std::max(0.0, 1 - abar_prev - sigma * sigma));
  return sigma > 0 ? out.add_(noise, sigma) : out;
}

}  // namespace detail

/// One DDIM step from timestep index t to index t_next < t (t_next = -1 means "to x_0", abar = 1),
/// given the predicted noise (Song et al. 2021, eq. 12):
///   x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
///   x_prev  = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z
///   sigma   = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)     (eq. 16)
/// eta = 0 is deterministic; eta = 1 has DDPM's posterior variance between the visited steps.
/// `clip_x0` > 0 clamps x0_pred to [-clip_x0, clip_x0] and recomputes eps from the clamped x0_pred so
/// that both terms agree (see convert_prediction; 0: off).
///
/// Example:
///   auto x_prev = ddim_step(schedule, x_t, 500, 480, model(x_t, t_batch));
inline torch::Tensor ddim_step(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t, int64_t t_next,
                               const torch::Tensor& eps_pred, double eta = 0.0, const torch::Tensor& noise = {},
                               double clip_x0 = 0.0) {
  constexpr const char* fn = "ddim_step";
  detail::check_sample_batch(fn, "x_t", x_t);
  detail::check_step(fn, schedule.num_timesteps(), t, t_next);
  detail::check_ancestral_eta(fn, eta);
  detail::check_clip_x0(fn, clip_x0);
  TORCH_CHECK(eps_pred.defined() && eps_pred.sizes() == x_t.sizes(), fn,
              ": the predicted noise must have x_t's shape ", detail::shape_str(x_t), ", got ",
              eps_pred.defined() ? detail::shape_str(eps_pred) : "an undefined tensor");
  TORCH_CHECK(eta == 0.0 || t_next < 0 || (noise.defined() && noise.sizes() == x_t.sizes()), fn,
              ": with sigma > 0 the noise z must have x_t's shape ", detail::shape_str(x_t), ", got ",
              noise.defined() ? detail::shape_str(noise) : "an undefined tensor");
  return detail::ddim_update(schedule, x_t, t, t_next, convert_prediction(schedule, x_t, t, eps_pred, Prediction::Epsilon, clip_x0),
                             eta, noise);
}

/// DDIM over `steps` timesteps spread by `spacing`: ddim_step from each to the next, the last to x_0.
/// eta 0 is the deterministic sampler (the probability-flow ODE's first-order solver); eta 1 draws fresh
/// noise each step with DDPM's posterior variance between the visited timesteps.
///
/// Example:
///   auto images = sample(model, schedule, {25, 1, 28, 28}, DDIM().steps(50).eta(1), SampleOptions().seed(0));
class DDIM final : public SamplingMethod {
 public:
  /// Model evaluations S (<= T).
  TORCH_ARG(int64_t, steps) = 50;
  /// 0: deterministic; 1: DDPM-like noise between the visited timesteps. Refused below 0.
  TORCH_ARG(double, eta) = 0.0;
  TORCH_ARG(TimestepSpacing, spacing) = TimestepSpacing::Leading;

 public:
  std::string name() const override { return "ddim"; }
  std::string describe() const override {
    return fmt::format("DDIM, {} steps ({}), eta {}", steps(), to_string(spacing()), eta());
  }
  std::vector<int64_t> timesteps(int64_t num_timesteps) const override {
    detail::check_ancestral_eta("DDIM", eta());
    return timestep_plan(num_timesteps, steps(), spacing());
  }
  Update start() const override {
    return [eta = eta()](const StepContext& c) {
      return detail::ddim_update(c.schedule, c.x, c.t, c.t_next, c.denoised, eta,
                                 eta > 0 && c.t_next >= 0 ? c.noise() : torch::Tensor{});
    };
  }
};

namespace detail {
inline const bool ddim_registered = (register_sampler("ddim", [](const SamplerSettings& s) {
  auto method = std::make_shared<DDIM>();
  if (s.steps()) method->steps(*s.steps());
  if (s.eta()) {
    detail::check_ancestral_eta("make_sampler: ddim", *s.eta());  // when made, not when sampling starts
    method->eta(*s.eta());
  }
  if (s.spacing()) method->spacing(*s.spacing());
  return std::shared_ptr<const SamplingMethod>(method);
}), true);
}  // namespace detail

}  // namespace diffusion
