#pragma once

#include <diffusion/sampling/sampler.hpp>

#include <nlohmann/json.hpp>

#include <memory>
#include <string>

/// Euler's method on the probability-flow ODE over noise levels (Karras et al. 2022, Algorithm 1 without
/// the second-order correction; k-diffusion's sample_euler), registered as "euler".
namespace diffusion {

/// One denoiser call a step: x_next = alpha_next D + sigma_t,next eps with eps the noise D implies at sigma
/// (ode_step): dx/dsigma = (x - D) / sigma integrated with the derivative held. Deterministic; first order
/// (halving every step halves the error). In a variance-preserving formulation it is DDIM at eta 0 (Song
/// et al. 2021), in flow matching the rectified-flow Euler step. No options.
///
/// Example:
///   auto images = sample(model, f, {16, 1, 28, 28}, Euler(), make_plan(f, "karras", 30));
class Euler final : public LevelSampler {
 public:
  std::string name() const override { return "euler"; }
  std::string describe() const override { return "Euler"; }
  nlohmann::json options() const override { return nlohmann::json::object(); }
  Step start() const override {
    return [](const SamplerStep& s) {
      return ode_step(s.formulation, s.x, s.denoiser(s.x, s.sigma), s.sigma, s.sigma_next);
    };
  }
};

namespace detail {
inline const bool euler_registered = (register_level_sampler("euler", [](const nlohmann::json& j) {
  check_json_fields(j, {}, "euler");
  return std::shared_ptr<const LevelSampler>(std::make_shared<Euler>());
}), true);
}  // namespace detail

}  // namespace diffusion
