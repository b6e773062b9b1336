#pragma once

#include <diffusion/sampling/sampler.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <memory>
#include <string>

/// DPM-Solver++(2M) over noise levels (Lu et al. 2022, Algorithm 2; k-diffusion's sample_dpmpp_2m and
/// sample_dpmpp_2m_sde), registered as "dpmpp-2m" and "dpmpp-2m-sde".
namespace diffusion {

/// The multistep second-order solver in log-SNR time. With lambda = -log sigma (half the log-SNR),
/// h = lambda_next - lambda and r = h_last / h, the data prediction is extrapolated from the last two,
/// D' = (1 + 1 / (2 r)) D - 1 / (2 r) D_last (first order, D' = D, at the first step and after a step from
/// +inf), and in the variance-exploding view
///   ODE (eta = 0):  x_next = (sigma_next / sigma) x - (e^{-h} - 1) D'
///   SDE (eta > 0):  x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1 + eta) h}) D'
///                            + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z
/// (the SDE form is k-diffusion's midpoint variant, Lu et al. 2022 sec. 5 at eta = 1). The step to 0
/// returns D. First order, the ODE is DDIM at eta 0 and the SDE at eta 1 is DDIM at eta 1. One denoiser call
/// a step; second order. Refused: eta or s_noise negative or not finite.
///
/// Example:
///   auto images = sample(model, f, {16, 1, 28, 28}, DPMSolverPP2M(), make_plan(f, "karras", 15));   // "DPM++ 2M Karras"
class DPMSolverPP2M final : public LevelSampler {
 public:
  /// 0: the ODE solver; > 0: the SDE solver, 1 its standard form.
  TORCH_ARG(double, eta) = 0.0;
  TORCH_ARG(double, s_noise) = 1.0;

 public:
  /// The name it is registered under: "dpmpp-2m" (eta 0) or "dpmpp-2m-sde" (eta 1).
  explicit DPMSolverPP2M(std::string name = "dpmpp-2m") : name_(std::move(name)) {}

  std::string name() const override { return name_; }
  std::string describe() const override {
    return eta() == 0.0 ? std::string("DPM++ 2M")
                        : fmt::format("DPM++ 2M SDE (eta {}{})", eta(),
                                      s_noise() != 1.0 ? fmt::format(", s_noise {}", s_noise()) : "");
  }
  nlohmann::json options() const override { return {{"eta", eta()}, {"s_noise", s_noise()}}; }

  Step start() const override {
    detail::check_nonnegative(name_.c_str(), "eta", eta());
    detail::check_nonnegative(name_.c_str(), "s_noise", s_noise());
    struct History {
      torch::Tensor d;
      double h = 0.0;  // the last step's length in lambda; +inf after a step from +inf
    };
    auto last = std::make_shared<History>();
    return [last, eta = eta(), s_noise = s_noise()](const SamplerStep& s) {
      const auto d = s.denoiser(s.x, s.sigma);
      const auto& f = s.formulation;
      if (s.sigma_next == 0.0) return at_level(f.level(0.0), d, d);
      const auto from = f.level(s.sigma), to = f.level(s.sigma_next);
      const double h = std::log(s.sigma) - std::log(s.sigma_next);  // +inf from sigma = +inf
      // sigma_t,next / sigma_t = alpha_next (sigma_next / sigma) / alpha: the VE ratio in the formulation's scale.
      const double c_x = to.sigma_t / from.sigma_t * (eta == 0.0 ? 1.0 : std::exp(-eta * h));
      const double c_d = -to.alpha_t * std::expm1(-(1.0 + eta) * h);
      auto out = s.x * c_x;
      if (eta > 0.0) out.add_(s.noise(), to.sigma_t * std::sqrt(-std::expm1(-2.0 * eta * h)) * s_noise);
      const bool second = last->d.defined() && std::isfinite(last->h);
      if (!second) {
        out.add_(d, c_d);
      } else {
        const double half_over_r = 0.5 * h / last->h;  // 1 / (2 r)
        out.add_(d, c_d * (1.0 + half_over_r)).add_(last->d, -c_d * half_over_r);
      }
      *last = {d, h};
      return out;
    };
  }

 private:
  std::string name_;
};

namespace detail {
inline std::shared_ptr<const LevelSampler> make_dpmpp_2m(const char* name, double eta, const nlohmann::json& j) {
  auto sampler = std::make_shared<DPMSolverPP2M>(name);
  sampler->eta(eta);
  return with_noise_options(name, sampler, j);
}
inline const bool dpmpp_2m_registered =
    (register_level_sampler("dpmpp-2m", [](const nlohmann::json& j) { return make_dpmpp_2m("dpmpp-2m", 0.0, j); }),
     register_level_sampler("dpmpp-2m-sde", [](const nlohmann::json& j) { return make_dpmpp_2m("dpmpp-2m-sde", 1.0, j); }),
     true);
}  // namespace detail

}  // namespace diffusion
