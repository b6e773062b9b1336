#pragma once

#include <diffusion/detail/check.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/sampling/spacing.hpp>
#include <diffusion/schedule.hpp>

#include <fmt/core.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

/// DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
/// Probabilistic Models"): the probability-flow ODE solved in log-SNR time with data predictions.
namespace diffusion {

namespace detail {

/// lambda_t = log(alpha_t / sigma_t) = log(sqrt(abar_t) / sqrt(1 - abar_t)), half the log-SNR; -inf where
/// abar_t = 0 (zero terminal SNR), +inf for t = -1 (x_0).
inline double half_log_snr(const NoiseSchedule& schedule, int64_t t) {
  if (t < 0) return std::numeric_limits<double>::infinity();
  const auto& h = schedule.host();
  const auto i = static_cast<size_t>(t);
  return std::log(h.sqrt_alphas_cumprod[i]) - std::log(h.sqrt_one_minus_alphas_cumprod[i]);
}

/// The inputs both DPM-Solver++ steps take: x_t a batch, a step from t to t_next, x0 of x_t's shape, and
/// for a second-order step the previous step's t_last in (t, T) with its x0_last.
inline void check_dpm_solver_step(const char* fn, const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t,
                                  int64_t t_next, const torch::Tensor& x0, int64_t t_last, const torch::Tensor& x0_last) {
  check_sample_batch(fn, "x_t", x_t);
  const int64_t T = schedule.num_timesteps();
  check_step(fn, T, t, t_next);
  TORCH_CHECK(x0.defined() && x0.sizes() == x_t.sizes(), fn, ": x0 must have x_t's shape ", shape_str(x_t), ", got ",
              x0.defined() ? shape_str(x0) : "an undefined tensor");
  if (!x0_last.defined()) return;
  TORCH_CHECK(t_last > t && t_last < T, fn, ": t_last must be in (t = ", t, ", ", T, "), got ", t_last);
  TORCH_CHECK(x0_last.sizes() == x_t.sizes(), fn, ": x0_last must have x_t's shape ", shape_str(x_t), ", got ",
              shape_str(x0_last));
}

}  // namespace detail

/// One DPM-Solver++ step from timestep index t to t_next < t (-1: to x_0), given the data prediction
/// x0 at t and, for the second-order multistep update, the one made at the previous evaluation
/// t_last > t (Lu et al. 2022, Algorithm 2, "DPM-Solver++(2M)"). With alpha = sqrt(abar),
/// sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and h = lambda_{t_next} - lambda_t:
///   first order (x0_last undefined):  D = x0
///   second order:                     r = (lambda_t - lambda_{t_last}) / h,
///                                     D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_last
///   x_{t_next} = (sigma_{t_next} / sigma_t) x_t - alpha_{t_next} (e^{-h} - 1) D
/// First order is DDIM at eta 0. A step to x_0 (sigma = 0, h = inf) is first order and returns x0 (the
/// paper's "lower order final"; second order is undefined there).
///
/// Example:
///   auto x1 = dpm_solver_pp_step(schedule, x, 999, 949, x0_999);                 // first step
///   auto x2 = dpm_solver_pp_step(schedule, x1, 949, 899, x0_949, 999, x0_999);    // then multistep
inline torch::Tensor dpm_solver_pp_step(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t,
                                        int64_t t_next, const torch::Tensor& x0, int64_t t_last = -1,
                                        const torch::Tensor& x0_last = {}) {
  constexpr const char* fn = "dpm_solver_pp_step";
  detail::check_dpm_solver_step(fn, schedule, x_t, t, t_next, x0, t_last, x0_last);
  const bool second = x0_last.defined();
  if (t_next < 0) return x0.clone();
  const auto& h = schedule.host();
  const auto i = static_cast<size_t>(t), j = static_cast<size_t>(t_next);
  const double lambda = detail::half_log_snr(schedule, t), lambda_prev = detail::half_log_snr(schedule, t_next);
  const double step = lambda_prev - lambda;
  const double c_x = h.sqrt_one_minus_alphas_cumprod[j] / h.sqrt_one_minus_alphas_cumprod[i];
  const double c_d = -h.sqrt_alphas_cumprod[j] * std::expm1(-step);
  auto out = x_t * c_x;
  const double step_last = second ? lambda - detail::half_log_snr(schedule, t_last) : 0.0;
  if (!second || !std::isfinite(step_last)) return out.add_(x0, c_d);
  const double half_over_r = 0.5 * step / step_last;  // 1 / (2 r)
  return out.add_(x0, c_d * (1.0 + half_over_r)).add_(x0_last, -c_d * half_over_r);
}

/// One step of the stochastic DPM-Solver++(2M) ("SDE-DPM-Solver++", Lu et al. 2022, sec. 5 and appendix;
/// the midpoint form diffusers and k-diffusion use), from t to t_next with fresh noise z:
///   x_{t_next} = (sigma_{t_next} / sigma_t) e^{-h} x_t + alpha_{t_next} (1 - e^{-2h}) D
///                + sigma_{t_next} sqrt(1 - e^{-2h}) z
/// with h, r and D as in dpm_solver_pp_step (D = x0 at first order). First order it is DDIM at eta 1 (the
/// same coefficients, written in log-SNR time); the second-order term corrects the drift as DPM-Solver++
/// does. A step to x_0 returns x0. `noise` is needed unless t_next = -1.
inline torch::Tensor dpm_solver_pp_sde_step(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t,
                                            int64_t t_next, const torch::Tensor& x0, const torch::Tensor& noise,
                                            int64_t t_last = -1, const torch::Tensor& x0_last = {}) {
  constexpr const char* fn = "dpm_solver_pp_sde_step";
  detail::check_dpm_solver_step(fn, schedule, x_t, t, t_next, x0, t_last, x0_last);
  const bool second = x0_last.defined();
  if (t_next < 0) return x0.clone();
  TORCH_CHECK(noise.defined() && noise.sizes() == x_t.sizes(), fn, ": the noise z must have x_t's shape ",
              detail::shape_str(x_t), ", got ", noise.defined() ? detail::shape_str(noise) : "an undefined tensor");
  const auto& h = schedule.host();
  const auto i = static_cast<size_t>(t), j = static_cast<size_t>(t_next);
  const double lambda = detail::half_log_snr(schedule, t);
  const double step = detail::half_log_snr(schedule, t_next) - lambda;
  const double decay = std::exp(-step);  // e^{-h}
  const double c_x = h.sqrt_one_minus_alphas_cumprod[j] / h.sqrt_one_minus_alphas_cumprod[i] * decay;
  const double c_d = -h.sqrt_alphas_cumprod[j] * std::expm1(-2 * step);
  const double c_z = h.sqrt_one_minus_alphas_cumprod[j] * std::sqrt(-std::expm1(-2 * step));
  auto out = x_t * c_x;
  out.add_(noise, c_z);
  const double step_last = second ? lambda - detail::half_log_snr(schedule, t_last) : 0.0;
  if (!second || !std::isfinite(step_last)) return out.add_(x0, c_d);
  const double half_over_r = 0.5 * step / step_last;  // 1 / (2 r)
  return out.add_(x0, c_d * (1.0 + half_over_r)).add_(x0_last, -c_d * half_over_r);
}

/// DPM-Solver++(2M) over `steps` timesteps spread by `spacing`: deterministic, one model call a step, the
/// first step first order and each later one second order from the last two data predictions, the last
/// to x_0 (Lu et al. 2022, Algorithm 2). order(1) is DDIM at eta 0. Reaches in 10-20 calls what DDIM
/// needs about 50 for (docs/results.md measures it on MNIST). Works with any prediction type and with
/// guidance wrappers, since it sees only the data predictions.
///
/// Example:
///   auto images = sample(model, schedule, {25, 1, 28, 28}, DPMSolverPP().steps(15), SampleOptions().seed(0));
class DPMSolverPP final : public SamplingMethod {
 public:
  /// Model evaluations S (<= T).
  TORCH_ARG(int64_t, steps) = 20;
  TORCH_ARG(TimestepSpacing, spacing) = TimestepSpacing::Leading;
  /// 2: the multistep second-order solver; 1: first order (DDIM at eta 0, or at eta 1 with sde). Others
  /// are refused.
  TORCH_ARG(int64_t, order) = 2;
  /// The stochastic solver (dpm_solver_pp_sde_step): fresh noise each step, as DDIM at eta 1 adds, with
  /// the second-order correction. Often better samples than the deterministic one at 10-20 steps.
  TORCH_ARG(bool, sde) = false;

 public:
  std::string name() const override { return sde() ? "dpmpp-2m-sde" : "dpmpp-2m"; }
  std::string describe() const override {
    return fmt::format("DPM-Solver++({}M){}, {} steps ({})", order(), sde() ? " SDE" : "", steps(), to_string(spacing()));
  }
  std::vector<int64_t> timesteps(int64_t num_timesteps) const override {
    TORCH_CHECK(order() == 1 || order() == 2, "DPMSolverPP: order must be 1 or 2, got ", order());
    return timestep_plan(num_timesteps, steps(), spacing());
  }
  Update start() const override {
    struct History {
      int64_t t = -1;
      torch::Tensor x0;
    };
    auto last = std::make_shared<History>();
    return [last, second = order() == 2, sde = sde()](const StepContext& c) {
      const auto previous = second ? last->x0 : torch::Tensor{};
      const auto out = sde ? dpm_solver_pp_sde_step(c.schedule, c.x, c.t, c.t_next, c.denoised.x0,
                                                    c.t_next >= 0 ? c.noise() : torch::Tensor{}, last->t, previous)
                           : dpm_solver_pp_step(c.schedule, c.x, c.t, c.t_next, c.denoised.x0, last->t, previous);
      *last = {c.t, c.denoised.x0};
      return out;
    };
  }
};

namespace detail {
inline std::shared_ptr<const SamplingMethod> make_dpm_solver_pp(const SamplerSettings& s, bool sde) {
  refuse_unused_settings(sde ? "dpmpp-2m-sde" : "dpmpp-2m", s, true, false, true);
  auto method = std::make_shared<DPMSolverPP>();
  method->sde(sde);
  if (s.steps()) method->steps(*s.steps());
  if (s.spacing()) method->spacing(*s.spacing());
  return method;
}
inline const bool dpm_solver_pp_registered =
    (register_sampler("dpmpp-2m", [](const SamplerSettings& s) { return make_dpm_solver_pp(s, false); }),
     register_sampler("dpmpp-2m-sde", [](const SamplerSettings& s) { return make_dpm_solver_pp(s, true); }), true);
}  // namespace detail

}  // namespace diffusion
