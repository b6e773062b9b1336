#pragma once

#include <diffusion/sampling/sampler.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>

/// Heun's second-order method with EDM's stochastic churn (Karras et al. 2022, Algorithm 2; k-diffusion's
/// sample_heun), registered as "heun".
namespace diffusion {

/// Per step, in the variance-exploding view: optionally raise the level to sigma_hat = sigma (1 + gamma)
/// with fresh noise of standard deviation s_noise sqrt(sigma_hat^2 - sigma^2), where gamma =
/// min(s_churn / N, sqrt(2) - 1) for sigma in [s_tmin, s_tmax] and 0 elsewhere (N: the plan's steps); then
/// an Euler step to sigma_next with d = (x - D(x; sigma_hat)) / sigma_hat, corrected by the derivative
/// there: x_next = x + (sigma_next - sigma_hat) (d + d') / 2. Two denoiser calls a step but for the last
/// (to 0), which is the Euler step (2N - 1 calls in all). s_churn = 0 (the default) is the deterministic
/// Heun sampler (Algorithm 1); second order. A step from sigma = +inf has no finite derivative to average:
/// it is the Euler step. sigma_hat is kept at most the formulation's largest level (its sigma_max when the
/// process ends there, as the discrete schedule's does). Refused: s_churn, s_noise or s_tmin negative,
/// s_tmax below s_tmin, a NaN.
///
/// Example:
///   auto images = sample(model, f, {16, 1, 28, 28}, Heun().s_churn(40).s_tmin(0.05).s_tmax(50),
///                        make_plan(f, "karras", 18));
class Heun final : public LevelSampler {
 public:
  /// Total churn over the plan (EDM's S_churn); 0: deterministic.
  TORCH_ARG(double, s_churn) = 0.0;
  /// The levels churn applies to (EDM's S_tmin, S_tmax).
  TORCH_ARG(double, s_tmin) = 0.0;
  TORCH_ARG(double, s_tmax) = std::numeric_limits<double>::infinity();
  /// Scales the churn's noise (EDM's S_noise).
  TORCH_ARG(double, s_noise) = 1.0;

 public:
  std::string name() const override { return "heun"; }
  std::string describe() const override {
    return s_churn() == 0.0 ? std::string("Heun")
                            : fmt::format("Heun (s_churn {}, s_tmin {}, s_tmax {}, s_noise {})", s_churn(), s_tmin(),
                                          s_tmax(), s_noise());
  }
  nlohmann::json options() const override {
    nlohmann::json j = {{"s_churn", s_churn()}, {"s_tmin", s_tmin()}, {"s_noise", s_noise()}};
    if (std::isfinite(s_tmax())) j["s_tmax"] = s_tmax();  // JSON has no infinity: absent means +inf
    return j;
  }
  int64_t model_calls(const std::vector<double>& sigmas) const override {
    return 2 * (static_cast<int64_t>(sigmas.size()) - 1) - 1;
  }
  Step start() const override {
    check();
    return [o = *this](const SamplerStep& s) {
      const auto& f = s.formulation;
      double sigma_hat = s.sigma;
      torch::Tensor x = s.x;
      const double gamma = o.s_churn() > 0.0 && std::isfinite(s.sigma) && s.sigma >= o.s_tmin() && s.sigma <= o.s_tmax()
                               ? std::min(o.s_churn() / static_cast<double>(s.count), std::sqrt(2.0) - 1.0)
                               : 0.0;
      if (gamma > 0.0) {
        sigma_hat = std::min(s.sigma * (1.0 + gamma), f.sigma_max());
        if (sigma_hat > s.sigma) {
          // x / alpha + sqrt(sigma_hat^2 - sigma^2) s_noise z, in the scale of sigma_hat.
          const auto from = f.level(s.sigma), to = f.level(sigma_hat);
          const double extra = std::sqrt(sigma_hat * sigma_hat - s.sigma * s.sigma) * o.s_noise();
          x = torch::add(x * (to.alpha_t / from.alpha_t), s.noise(), to.alpha_t * extra);
        }
      }
      const auto d = s.denoiser(x, sigma_hat);
      const auto eps = implied_noise(x, d, f.level(sigma_hat));
      const auto next = f.level(s.sigma_next);
      const auto euler = at_level(next, d, eps);
      if (s.sigma_next == 0.0 || std::isinf(sigma_hat)) return euler;
      const auto eps_next = implied_noise(euler, s.denoiser(euler, s.sigma_next), next);
      // x_next = d + sigma_next eps + (sigma_next - sigma_hat) (eps' - eps) / 2, times alpha_next.
      return euler.add_(eps_next - eps, next.alpha_t * 0.5 * (s.sigma_next - sigma_hat));
    };
  }

 private:
  void check() const {
    detail::check_nonnegative("Heun", "s_churn", s_churn());
    detail::check_nonnegative("Heun", "s_noise", s_noise());
    TORCH_CHECK(s_tmin() >= 0.0 && s_tmax() >= s_tmin(), "Heun: need 0 <= s_tmin <= s_tmax, got s_tmin = ", s_tmin(),
                ", s_tmax = ", s_tmax());
  }
  friend std::shared_ptr<const LevelSampler> make_heun(const nlohmann::json& j);
};

inline std::shared_ptr<const LevelSampler> make_heun(const nlohmann::json& j) {
  detail::check_json_fields(j, {"s_churn", "s_tmin", "s_tmax", "s_noise"}, "heun");
  auto s = std::make_shared<Heun>();
  detail::read_json_field<double>(j, "s_churn", [&](double v) { s->s_churn(v); });
  detail::read_json_field<double>(j, "s_tmin", [&](double v) { s->s_tmin(v); });
  detail::read_json_field<double>(j, "s_tmax", [&](double v) { s->s_tmax(v); });
  detail::read_json_field<double>(j, "s_noise", [&](double v) { s->s_noise(v); });
  s->check();
  return s;
}

namespace detail {
inline const bool heun_registered = (register_level_sampler("heun", make_heun), true);
}  // namespace detail

}  // namespace diffusion
