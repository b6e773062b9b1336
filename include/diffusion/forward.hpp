#pragma once

#include <diffusion/detail/check.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <optional>

/// The forward (noising) process in closed form.
namespace diffusion {

/// Draws x_t ~ q(x_t | x_0) in one step:
///   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)   (Ho et al. 2020, eq. 4)
///
/// x0 is a floating-point batch (N, ...) of any rank on the schedule's device; t holds one integer
/// timestep index in [0, T) per sample. `noise` gives eps explicitly (same shape as x0); when it is
/// undefined, eps is drawn from `generator` if one is given, else from LibTorch's default generator.
/// The schedule's coefficients are cast to x0's dtype.
///
/// Example:
///   NoiseSchedule schedule;
///   auto t = torch::randint(0, schedule.timesteps(), {x0.size(0)}, torch::kLong);
///   auto eps = torch::randn_like(x0);
///   auto x_t = q_sample(schedule, x0, t, eps);
inline torch::Tensor q_sample(const NoiseSchedule& schedule, const torch::Tensor& x0, const torch::Tensor& t,
                              const torch::Tensor& noise = {},
                              const std::optional<torch::Generator>& generator = std::nullopt) {
  constexpr const char* fn = "q_sample";
  detail::check_sample_batch(fn, "x0", x0);
  TORCH_CHECK(x0.device() == schedule.device(), fn, ": x0 is on ", x0.device(), " but the schedule is on ",
              schedule.device(), "; move one with .to(device)");
  detail::check_timesteps(fn, t, x0.size(0), x0.device(), schedule.timesteps());
  torch::Tensor eps = noise;
  if (eps.defined()) {
    TORCH_CHECK(eps.sizes() == x0.sizes(), fn, ": noise must have x0's shape ", detail::shape_str(x0), ", got ",
                detail::shape_str(eps));
    TORCH_CHECK(eps.device() == x0.device(), fn, ": noise is on ", eps.device(), " but x0 is on ", x0.device());
    TORCH_CHECK(eps.scalar_type() == x0.scalar_type(), fn, ": noise has dtype ", eps.scalar_type(),
                " but x0 has ", x0.scalar_type());
  } else {
    eps = detail::randn(x0.sizes(), x0.options(), generator);
  }
  const auto a = detail::gather_broadcast(schedule.sqrt_alphas_cumprod, t, x0.dim(), x0.scalar_type());
  const auto b = detail::gather_broadcast(schedule.sqrt_one_minus_alphas_cumprod, t, x0.dim(), x0.scalar_type());
  return a * x0 + b * eps;
}

/// q_sample with eps drawn from `generator`.
inline torch::Tensor q_sample(const NoiseSchedule& schedule, const torch::Tensor& x0, const torch::Tensor& t,
                              const torch::Generator& generator) {
  return q_sample(schedule, x0, t, torch::Tensor{}, generator);
}

}  // namespace diffusion
