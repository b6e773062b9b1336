#pragma once

#include <diffusion/detail/json.hpp>
#include <diffusion/formulation/formulation.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <string>

/// EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the
/// variance-exploding process x = x_0 + sigma eps with the preconditioned denoiser of Table 1, registered
/// as "edm".
namespace diffusion {

/// EDM's options. sigma_data: the data's standard deviation (0.5 for images in [-1, 1]); sigma_min and
/// sigma_max: the range plans cover (EDM's sampler settings: 0.002 and 80).
///
/// Example:
///   auto f = std::make_shared<EDM>(EDMOptions().sigma_data(0.5).sigma_max(80));
struct EDMOptions {
  TORCH_ARG(double, sigma_data) = 0.5;
  TORCH_ARG(double, sigma_min) = 0.002;
  TORCH_ARG(double, sigma_max) = 80.0;
};

inline void to_json(nlohmann::json& j, const EDMOptions& o) {
  j = {{"sigma_data", o.sigma_data()}, {"sigma_min", o.sigma_min()}, {"sigma_max", o.sigma_max()}};
}
inline void from_json(const nlohmann::json& j, EDMOptions& o) {
  detail::check_json_fields(j, {"sigma_data", "sigma_min", "sigma_max"}, "EDMOptions");
  detail::read_json_field<double>(j, "sigma_data", [&](double v) { o.sigma_data(v); });
  detail::read_json_field<double>(j, "sigma_min", [&](double v) { o.sigma_min(v); });
  detail::read_json_field<double>(j, "sigma_max", [&](double v) { o.sigma_max(v); });
}

/// EDM's formulation: alpha_t = 1, sigma_t = sigma, and the backbone F made a denoiser by (Table 1)
///   c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)      c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
///   c_in   = 1 / sqrt(sigma^2 + sigma_data^2)             c_noise = ln(sigma) / 4
/// so that F's input and target both have unit variance at every noise level. Sampling starts from
/// sigma_max * N(0, I); the default plan is "karras" (rho = 7, EDM eq. 5). Refused: sigma_data, sigma_min
/// or sigma_max not positive and finite, sigma_min >= sigma_max.
class EDM final : public Formulation {
 public:
  explicit EDM(EDMOptions options = {}) : options_(options) {
    const auto ok = [](double v) { return std::isfinite(v) && v > 0.0; };
    TORCH_CHECK(ok(options_.sigma_data()), "EDM: sigma_data must be positive and finite, got ", options_.sigma_data());
    TORCH_CHECK(ok(options_.sigma_min()) && ok(options_.sigma_max()) && options_.sigma_min() < options_.sigma_max(),
                "EDM: need 0 < sigma_min < sigma_max < inf, got sigma_min = ", options_.sigma_min(),
                ", sigma_max = ", options_.sigma_max());
  }

  const EDMOptions& edm_options() const noexcept { return options_; }

  std::string name() const override { return "edm"; }
  nlohmann::json options() const override { return options_; }
  std::string describe() const override {
    return fmt::format("EDM (sigma_data {}, sigma in [{}, {}])", options_.sigma_data(), options_.sigma_min(),
                       options_.sigma_max());
  }

  Level level(double sigma) const override {
    // Any finite level: sigma_max bounds the plans, not the process (Heun's churn may step above it).
    TORCH_CHECK(sigma >= 0.0 && std::isfinite(sigma), "EDM::level: the noise level must be >= 0 and finite, got ", sigma);
    return {sigma, 1.0, sigma};
  }
  double sigma_min() const override { return options_.sigma_min(); }
  double sigma_max() const override { return options_.sigma_max(); }

  Preconditioning precondition(double sigma) const override {
    TORCH_CHECK(sigma > 0.0 && std::isfinite(sigma), "EDM::precondition: the noise level must be positive and finite, got ",
                sigma);
    const double sd = options_.sigma_data(), norm = std::sqrt(sigma * sigma + sd * sd);
    return {sd * sd / (norm * norm), sigma * sd / norm, 1.0 / norm};
  }

  torch::Tensor noise_conditioning(double sigma, int64_t batch, const torch::Device& device) const override {
    TORCH_CHECK(sigma > 0.0 && std::isfinite(sigma), "EDM::noise_conditioning: the noise level must be positive and "
                "finite, got ", sigma);
    return torch::full({batch}, std::log(sigma) / 4.0, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  }

  double prior_std(double sigma) const override { return sigma; }

 private:
  EDMOptions options_;
};

namespace detail {
inline const bool edm_registered = (register_formulation("edm", [](const nlohmann::json& j) {
  return std::shared_ptr<const Formulation>(std::make_shared<EDM>(j.get<EDMOptions>()));
}), true);
}  // namespace detail

}  // namespace diffusion
