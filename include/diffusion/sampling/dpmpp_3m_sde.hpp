#pragma once

#include <diffusion/sampling/sampler.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <memory>
#include <string>

/// DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde), registered as "dpmpp-3m-sde".
namespace diffusion {

/// The third-order multistep stochastic solver. With lambda = -log sigma, h = lambda_next - lambda,
/// h_eta = (1 + eta) h and the last two steps' lengths h_1, h_2, in the variance-exploding view:
///   x_next = e^{-h_eta} x + (1 - e^{-h_eta}) D  [+ phi_2 d_1 - phi_3 d_2]  + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z
/// where phi_2 = (e^{-h_eta} - 1) / h_eta + 1 and phi_3 = phi_2 / h_eta - 1/2, and from the last three data
/// predictions D, D_1, D_2: r0 = h_1 / h, r1 = h_2 / h, d1_0 = (D - D_1) / r0, d1_1 = (D_1 - D_2) / r1,
/// d_1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1), d_2 = (d1_0 - d1_1) / (r0 + r1) (third order); with one
/// earlier prediction, d_1 = (D - D_1) / r0 and no d_2 (second order); with none, first order. The step to
/// 0 returns D. One denoiser call a step. eta = 0 is the deterministic 3M solver. Refused: eta or s_noise
/// negative or not finite.
///
/// Example:
///   auto images = sample(model, f, {16, 1, 28, 28}, DPMSolverPP3MSDE(), make_plan(f, "exponential", 20));
class DPMSolverPP3MSDE final : public LevelSampler {
 public:
  TORCH_ARG(double, eta) = 1.0;
  TORCH_ARG(double, s_noise) = 1.0;

 public:
  std::string name() const override { return "dpmpp-3m-sde"; }
  std::string describe() const override {
    return fmt::format("DPM++ 3M SDE (eta {}{})", eta(), s_noise() != 1.0 ? fmt::format(", s_noise {}", s_noise()) : "");
  }
  nlohmann::json options() const override { return {{"eta", eta()}, {"s_noise", s_noise()}}; }

  Step start() const override {
    detail::check_nonnegative("dpmpp-3m-sde", "eta", eta());
    detail::check_nonnegative("dpmpp-3m-sde", "s_noise", s_noise());
    struct History {
      torch::Tensor d1, d2;           // the last two data predictions, newest first
      double h1 = 0.0, h2 = 0.0;      // and the steps that followed them
    };
    auto last = std::make_shared<History>();
    return [last, eta = eta(), s_noise = s_noise()](const SamplerStep& s) {
      const auto d = s.denoiser(s.x, s.sigma);
      const auto& f = s.formulation;
      if (s.sigma_next == 0.0) return at_level(f.level(0.0), d, d);
      const auto from = f.level(s.sigma), to = f.level(s.sigma_next);
      const double h = std::log(s.sigma) - std::log(s.sigma_next);
      const double h_eta = h * (eta + 1.0);
      // e^{-h_eta} = (sigma_next / sigma)^(1 + eta); in the formulation's scale the VE ratio is sigma_t's.
      const double c_x = to.sigma_t / from.sigma_t * (eta == 0.0 ? 1.0 : std::exp(-eta * h));
      auto out = torch::add(s.x * c_x, d, -to.alpha_t * std::expm1(-h_eta));
      const double phi_2 = std::expm1(-h_eta) / h_eta + 1.0;
      if (last->d2.defined() && std::isfinite(last->h1) && std::isfinite(last->h2)) {
        const double r0 = last->h1 / h, r1 = last->h2 / h;
        const auto d1_0 = (d - last->d1) / r0, d1_1 = (last->d1 - last->d2) / r1;
        const auto d_1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1));
        const auto d_2 = (d1_0 - d1_1) / (r0 + r1);
        const double phi_3 = phi_2 / h_eta - 0.5;
        out.add_(d_1, to.alpha_t * phi_2).add_(d_2, -to.alpha_t * phi_3);
      } else if (last->d1.defined() && std::isfinite(last->h1)) {
        out.add_((d - last->d1) / (last->h1 / h), to.alpha_t * phi_2);
      }
      if (eta > 0.0) out.add_(s.noise(), to.sigma_t * std::sqrt(-std::expm1(-2.0 * eta * h)) * s_noise);
      *last = {d, last->d1, h, last->h1};
      return out;
    };
  }
};

namespace detail {
inline const bool dpmpp_3m_sde_registered = (register_level_sampler("dpmpp-3m-sde", [](const nlohmann::json& j) {
  return with_noise_options("dpmpp-3m-sde", std::make_shared<DPMSolverPP3MSDE>(), j);
}), true);
}  // namespace detail

}  // namespace diffusion
