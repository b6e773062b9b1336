#pragma once

#include <diffusion/sampling/sampler.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <memory>
#include <string>

/// Euler ancestral (k-diffusion's sample_euler_ancestral), registered as "euler-a"; with its own defaults
/// it is also DDIM ("ddim", eta 0) and DDPM's ancestral sampler ("ddpm", eta 1), over noise levels.
namespace diffusion {

/// An Euler step to sigma_down, then fresh noise of standard deviation s_noise sigma_up
/// (ancestral_split: sigma_down^2 + sigma_up^2 = sigma_next^2), in the variance-exploding view:
///   x_next = D + sigma_down eps + s_noise sigma_up z
/// carried to the formulation's scale by alpha_next. eta = 1 adds DDPM's posterior noise between the two
/// levels (Ho et al. 2020, eq. 7: with every timestep of the schedule it is DDPM's sampler), eta = 0 is
/// Euler (DDIM at eta 0); in a variance-preserving formulation eta is DDIM's (Song et al. 2021, eq. 16).
/// No noise is drawn when eta or the next level is 0. Refused: eta outside [0, 1] (above 1 it would ask for
/// more fresh noise than the step has, which ancestral_split caps), s_noise negative or not finite.
///
/// Example:
///   auto images = sample(model, f, {16, 1, 28, 28}, EulerAncestral().eta(1), make_plan(f, "karras", 30));
class EulerAncestral final : public LevelSampler {
 public:
  /// The share of the step's noise that is fresh: 0 (ODE) to 1 (DDPM's posterior).
  TORCH_ARG(double, eta) = 1.0;
  /// Scales the fresh noise (Karras et al. 2022's S_noise).
  TORCH_ARG(double, s_noise) = 1.0;

 public:
  /// The name it is registered under: "euler-a", or "ddim" / "ddpm" for the same method with their defaults.
  explicit EulerAncestral(std::string name = "euler-a") : name_(std::move(name)) {}

  std::string name() const override { return name_; }
  std::string describe() const override {
    return fmt::format("{} (eta {}{})", name_ == "ddim" ? "DDIM" : name_ == "ddpm" ? "DDPM" : "Euler ancestral", eta(),
                       s_noise() != 1.0 ? fmt::format(", s_noise {}", s_noise()) : "");
  }
  nlohmann::json options() const override { return {{"eta", eta()}, {"s_noise", s_noise()}}; }
  Step start() const override {
    detail::check_ancestral_eta(name_.c_str(), eta());
    detail::check_nonnegative("EulerAncestral", "s_noise", s_noise());
    return [eta = eta(), s_noise = s_noise()](const SamplerStep& s) {
      const auto d = s.denoiser(s.x, s.sigma);
      const auto [down, up] = ancestral_split(s.sigma, s.sigma_next, eta);
      if (up == 0.0) return ode_step(s.formulation, s.x, d, s.sigma, s.sigma_next);
      const auto eps = implied_noise(s.x, d, s.formulation.level(s.sigma));
      const double alpha_next = s.formulation.level(s.sigma_next).alpha_t;
      // alpha_next (d + down eps + s_noise up z)
      return torch::add(d * alpha_next, eps, alpha_next * down).add_(s.noise(), alpha_next * up * s_noise);
    };
  }

 private:
  std::string name_;
};

namespace detail {
inline std::shared_ptr<const LevelSampler> make_euler_ancestral(const char* name, double eta, const nlohmann::json& j) {
  auto sampler = std::make_shared<EulerAncestral>(name);
  sampler->eta(eta);
  return with_noise_options(name, sampler, j, /*ancestral=*/true);
}
inline const bool euler_ancestral_registered =
    (register_level_sampler("euler-a", [](const nlohmann::json& j) { return make_euler_ancestral("euler-a", 1.0, j); }),
     register_level_sampler("ddim", [](const nlohmann::json& j) { return make_euler_ancestral("ddim", 0.0, j); }),
     register_level_sampler("ddpm", [](const nlohmann::json& j) { return make_euler_ancestral("ddpm", 1.0, j); }), true);
}  // namespace detail

}  // namespace diffusion
