#pragma once

#include <diffusion/detail/check.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

/// DDPM's ancestral sampler (Ho et al. 2020, Algorithm 2): every one of the T timesteps.
namespace diffusion {

namespace detail {

/// The posterior mean of q(x_{t-1} | x_t, x_0) at the predicted x_0 (Ho et al. 2020, eq. 7), plus
/// sqrt(beta-tilde_t) z when t > 0:
///   mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
/// With x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) this is eq. 11's mean; written in x0, it takes a
/// clamped x0 as it is and serves every prediction type.
inline torch::Tensor ddpm_update(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t,
                                 const torch::Tensor& x0, const torch::Tensor& noise) {
  const auto& h = schedule.host();
  const auto i = static_cast<size_t>(t);
  const double beta = h.betas[i], abar = h.alphas_cumprod[i], abar_prev = h.alphas_cumprod_prev[i];
  const double c_x0 = std::sqrt(abar_prev) * beta / (1.0 - abar);
  const double c_xt = std::sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar);
  auto mean = x0 * c_x0 + x_t * c_xt;
  return t == 0 ? mean : mean.add_(noise, std::sqrt(h.posterior_variance[i]));
}

}  // namespace detail

/// One reverse step x_t -> x_{t-1} given the predicted noise (Ho et al. 2020, Algorithm 2, line 4):
///   mean    = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps_pred)   (eq. 11)
///   x_{t-1} = mean + sqrt(beta-tilde_t) * z,  z ~ N(0, I)                         (sigma_t^2 = eq. 7's beta-tilde)
/// At t = 0 no noise is added and the mean is returned, as in the seed.
///
/// `t` is the timestep index in [0, T) shared by the whole batch; `noise` is z (x_t's shape), needed
/// only when t > 0. `clip_x0` > 0 clamps the implied x_0 to [-clip_x0, clip_x0] first (see convert_prediction); the
/// mean is computed in eq. 7's x_0 form, which equals eq. 11 when nothing is clamped. This is the seed's
/// `calc_x_t_minus_one` with the model call factored out.
///
/// Example:
///   auto x_prev = ddpm_step(schedule, x_t, 500, model(x_t, t_batch), torch::randn_like(x_t));
inline torch::Tensor ddpm_step(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t,
                               const torch::Tensor& eps_pred, const torch::Tensor& noise = {}, double clip_x0 = 0.0) {
  constexpr const char* fn = "ddpm_step";
  detail::check_sample_batch(fn, "x_t", x_t);
  TORCH_CHECK(x_t.device() == schedule.device(), fn, ": x_t is on ", x_t.device(), " but the schedule is on ",
              schedule.device());
  TORCH_CHECK(t >= 0 && t < schedule.num_timesteps(), fn, ": t must be in [0, ", schedule.num_timesteps(), "), got ", t);
  TORCH_CHECK(eps_pred.defined() && eps_pred.sizes() == x_t.sizes(), fn,
              ": the predicted noise must have x_t's shape ", detail::shape_str(x_t), ", got ",
              eps_pred.defined() ? detail::shape_str(eps_pred) : "an undefined tensor");
  detail::check_clip_x0(fn, clip_x0);
  TORCH_CHECK(t == 0 || (noise.defined() && noise.sizes() == x_t.sizes()), fn, ": at t = ", t,
              " > 0 the noise z must have x_t's shape ", detail::shape_str(x_t), ", got ",
              noise.defined() ? detail::shape_str(noise) : "an undefined tensor");
  return detail::ddpm_update(schedule, x_t, t, convert_prediction(schedule, x_t, t, eps_pred, Prediction::Epsilon, clip_x0).x0,
                             noise);
}

/// DDPM's ancestral sampler: all T timesteps, T-1 down to 0, each step ddpm_step (with noise but at the
/// last). The seed's sampler; 1,000 model calls per image with the default schedule.
///
/// Example:
///   auto images = sample(model, schedule, {25, 1, 28, 28}, DDPM(), SampleOptions().seed(0));
class DDPM final : public SamplingMethod {
 public:
  std::string name() const override { return "ddpm"; }
  std::string describe() const override { return "DDPM (every timestep)"; }
  std::vector<int64_t> timesteps(int64_t num_timesteps) const override {
    std::vector<int64_t> plan;
    for (int64_t t = num_timesteps - 1; t >= 0; --t) plan.push_back(t);
    return plan;
  }
  Update start() const override {
    return [](const StepContext& c) {
      return detail::ddpm_update(c.schedule, c.x, c.t, c.denoised.x0, c.t > 0 ? c.noise() : torch::Tensor{});
    };
  }
};

namespace detail {
inline const bool ddpm_registered = (register_sampler("ddpm", [](const SamplerSettings& s) {
  detail::refuse_unused_settings("ddpm (which visits every timestep)", s, false, false, false);
  return std::make_shared<const DDPM>();
}), true);
}  // namespace detail

}  // namespace diffusion
