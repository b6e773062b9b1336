#pragma once

#include <diffusion/detail/json.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/sampling/plans.hpp>
#include <diffusion/sampling/spacing.hpp>
#include <diffusion/schedule.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

/// The discrete variance-preserving process of Ho et al. 2020 (linear, cosine or zero-terminal-SNR
/// NoiseSchedule) as a formulation, registered as "ddpm".
namespace diffusion {

/// A NoiseSchedule and what its network predicts, as a formulation over noise levels. At the schedule's
/// own levels (sigma = NoiseSchedule::sigma(t) at integer t) everything equals the timestep formulation:
/// alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), the network sees the integer t, and the denoiser is
/// convert_prediction()'s x_0. Between them, t is the continuous timestep NoiseSchedule::timestep(sigma) (log-sigma
/// interpolation, as k-diffusion's DiscreteSchedule), handed to the network as a float32 tensor, and
/// alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t. A zero-terminal-SNR schedule's last level is
/// sigma = +inf (alpha_t = 0), where only a v or sample prediction determines x_0.
///
/// Preconditioning (from convert_prediction's conversions, x_t in the schedule's scale, c_in = 1):
///   epsilon: D = x_t / alpha_t - (sigma_t / alpha_t) F
///   v:       D = alpha_t x_t - sigma_t F              (Salimans & Ho 2022)
///   sample:  D = F
///
/// Plans by name: "leading", "trailing", "linspace" (discrete_sigmas: the timesteps today's samplers
/// visit), besides make_plan's "karras" and "exponential" over [sigma(0), sigma(T-1)]. The default plan
/// is "leading".
///
/// Example:
///   auto f = std::make_shared<DiscreteFormulation>(NoiseSchedule(), Prediction::V);
///   auto g = make_formulation("ddpm", {{"schedule", {{"kind", "cosine"}}}, {"prediction", "v"}});
class DiscreteFormulation final : public Formulation {
 public:
  explicit DiscreteFormulation(NoiseSchedule schedule = NoiseSchedule(), Prediction prediction = Prediction::Epsilon)
      : schedule_(std::move(schedule)), prediction_(prediction) {}

  const NoiseSchedule& schedule() const noexcept { return schedule_; }
  Prediction prediction() const noexcept { return prediction_; }

  std::string name() const override { return "ddpm"; }
  nlohmann::json options() const override {
    return {{"schedule", nlohmann::json(schedule_.options())}, {"prediction", std::string(to_string(prediction_))}};
  }
  std::string describe() const override {
    const auto& o = schedule_.options();
    return fmt::format("discrete VP ({} schedule, T = {}{}, {} prediction)", to_string(o.kind()), o.num_timesteps(),
                       o.zero_terminal_snr() ? ", zero terminal SNR" : "", to_string(prediction_));
  }

  Level level(double sigma) const override {
    detail::check_level("DiscreteFormulation::level", sigma, sigma_max());
    if (sigma == 0.0) return {0.0, 1.0, 0.0};
    if (std::isinf(sigma)) return {sigma, 0.0, 1.0};
    const auto& h = schedule_.host();
    if (const auto i = index_of(sigma)) return {sigma, h.sqrt_alphas_cumprod[*i], h.sqrt_one_minus_alphas_cumprod[*i]};
    const double alpha = 1.0 / std::sqrt(1.0 + sigma * sigma);
    return {sigma, alpha, sigma * alpha};
  }
  double sigma_min() const override { return schedule_.sigma_min(); }
  double sigma_max() const override { return schedule_.sigma_max(); }

  Preconditioning precondition(double sigma) const override {
    TORCH_CHECK(sigma > 0.0, "DiscreteFormulation::precondition: the noise level must be > 0, got ", sigma);
    const auto l = level(sigma);
    switch (prediction_) {
      case Prediction::Epsilon:
        TORCH_CHECK(l.alpha_t > 0.0, "DiscreteFormulation: an epsilon prediction at sigma = +inf (abar = 0, zero "
                    "terminal SNR) determines no x_0; train with v or sample prediction, or start the plan below it");
        return {1.0 / l.alpha_t, -l.sigma_t / l.alpha_t, 1.0};
      case Prediction::V: return {l.alpha_t, -l.sigma_t, 1.0};
      case Prediction::Sample: return {0.0, 1.0, 1.0};
    }
    return {0.0, 0.0, 0.0};
  }

  torch::Tensor noise_conditioning(double sigma, int64_t batch, const torch::Device& device) const override {
    const double t = schedule_.timestep(sigma);
    const double rounded = std::round(t);
    if (std::abs(t - rounded) <= 1e-9 * std::max(1.0, rounded)) {
      return torch::full({batch}, static_cast<int64_t>(rounded), torch::TensorOptions().dtype(torch::kLong).device(device));
    }
    return torch::full({batch}, t, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  }

  double prior_std(double) const override { return 1.0; }

  std::optional<std::vector<double>> plan(std::string_view name, int64_t steps) const override {
    if (name != "leading" && name != "trailing" && name != "linspace") return std::nullopt;
    return discrete_sigmas(schedule_, steps, parse_spacing(name));
  }
  std::vector<std::string> plan_names() const override { return {"leading", "linspace", "trailing"}; }
  std::string default_plan() const override { return "leading"; }

 private:
  /// The integer timestep whose noise level is exactly sigma, if any.
  std::optional<size_t> index_of(double sigma) const {
    const auto& s = schedule_.host().sigmas;
    const auto it = std::lower_bound(s.begin(), s.end(), sigma);
    if (it == s.end() || *it != sigma) return std::nullopt;
    return static_cast<size_t>(it - s.begin());
  }

  NoiseSchedule schedule_;
  Prediction prediction_;
};

namespace detail {
inline const bool discrete_formulation_registered = (register_formulation("ddpm", [](const nlohmann::json& j) {
  check_json_fields(j, {"schedule", "prediction"}, "DiscreteFormulation");
  NoiseScheduleOptions schedule;
  Prediction prediction = Prediction::Epsilon;
  read_json_field<NoiseScheduleOptions>(j, "schedule", [&](const NoiseScheduleOptions& o) { schedule = o; });
  read_json_field<std::string>(j, "prediction", [&](const std::string& p) { prediction = parse_prediction(p); });
  return std::shared_ptr<const Formulation>(std::make_shared<DiscreteFormulation>(NoiseSchedule(schedule), prediction));
}), true);
}  // namespace detail

}  // namespace diffusion
