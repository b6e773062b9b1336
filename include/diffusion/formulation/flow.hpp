#pragma once

#include <diffusion/detail/json.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/sampling/plans.hpp>
#include <diffusion/training/objective.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

/// Flow matching with the rectified-flow path (Lipman et al. 2023, "Flow Matching for Generative
/// Modeling"; Liu et al. 2023, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow
/// Transformers"): x_t = (1 - t) x_0 + t eps for t in [0, 1], the network predicting the velocity
/// v = eps - x_0. Registered as "flow"; its training objective is FlowObjective.
namespace diffusion {

namespace detail {
/// Esser et al. 2024, eq. 23, for a double or a tensor of times.
template <class T>
T shifted(const T& t, double s) {
  return s * t / (1.0 + (s - 1.0) * t);
}
}  // namespace detail

/// The timestep shift of Esser et al. 2024 (eq. 23): t' = s t / (1 + (s - 1) t), which moves every t in
/// (0, 1) towards 1 (more noise) for s > 1 and keeps 0 and 1. Refused: t outside [0, 1], s not positive
/// and finite.
inline double shift_time(double t, double shift) {
  TORCH_CHECK(t >= 0.0 && t <= 1.0, "shift_time: t must be in [0, 1], got ", t);
  TORCH_CHECK(std::isfinite(shift) && shift > 0.0, "shift_time: the shift must be positive and finite, got ", shift);
  return detail::shifted(t, shift);
}

/// The flow formulation's options. shift: the timestep shift s (1: none), in [1e-3, 1e3], applied once,
/// both to the times training draws and to the "uniform" plan. In noise levels the shift is a scaling,
/// sigma' = s sigma; published models use 1 to about 20 (Stable Diffusion 3: 3), and far outside [1e-3,
/// 1e3] the shifted times round to 0 or 1 in double precision.
///
/// Example:
///   auto f = std::make_shared<Flow>(FlowOptions().shift(3.0));
struct FlowOptions {
  TORCH_ARG(double, shift) = 1.0;
};

inline void to_json(nlohmann::json& j, const FlowOptions& o) { j = {{"shift", o.shift()}}; }
inline void from_json(const nlohmann::json& j, FlowOptions& o) {
  detail::check_json_fields(j, {"shift"}, "FlowOptions");
  detail::read_json_field<double>(j, "shift", [&](double v) { o.shift(v); });
}

/// Rectified flow as a formulation: at time t, alpha_t = 1 - t and sigma_t = t, so the noise level is
/// sigma = t / (1 - t) (t = sigma / (1 + sigma)) and t = 1, pure noise, is sigma = +inf. The backbone F
/// predicts the velocity v = eps - x_0 and the denoiser is D(x_t) = x_t - t F(x_t; 1000 t): c_skip = 1,
/// c_out = -t, c_in = 1, defined at every t including 1. The backbone is told 1000 t, the range of the
/// discrete schedule's timesteps its embedding is made for (as Stable Diffusion 3 and diffusers'
/// FlowMatchEulerDiscreteScheduler do).
///
/// Plans start at t = 1 (sigma = +inf; sample() refuses a plan from noise that does not). The default,
/// "uniform", takes t_i = 1 - i / steps for i < steps, shifted once (shift_time), then 0. "karras" and
/// "exponential" need a finite sigma_max and are refused. Every sampler runs on it: Euler is the
/// rectified-flow step x' = x + (t' - t) v (and equals DDIM at eta 0 here). Refused: a shift outside
/// [1e-3, 1e3] (NaN included).
class Flow final : public Formulation {
 public:
  explicit Flow(FlowOptions options = {}) : options_(options) {
    TORCH_CHECK(options_.shift() >= 1e-3 && options_.shift() <= 1e3, "Flow: the shift must be in [0.001, 1000], got ",
                options_.shift());
  }

  const FlowOptions& flow_options() const noexcept { return options_; }

  /// The time t in [0, 1] of noise level sigma in [0, +inf].
  static double time(double sigma) { return std::isinf(sigma) ? 1.0 : sigma / (1.0 + sigma); }
  /// The noise level of time t in [0, 1].
  static double sigma_of(double t) {
    return t >= 1.0 ? std::numeric_limits<double>::infinity() : t / (1.0 - t);
  }

  std::string name() const override { return "flow"; }
  nlohmann::json options() const override { return options_; }
  std::string describe() const override {
    return options_.shift() == 1.0 ? std::string("rectified flow (velocity prediction)")
                                   : fmt::format("rectified flow (velocity prediction, shift {})", options_.shift());
  }

  Level level(double sigma) const override {
    detail::check_level("Flow::level", sigma, sigma_max());
    if (std::isinf(sigma)) return {sigma, 0.0, 1.0};
    return {sigma, 1.0 / (1.0 + sigma), sigma / (1.0 + sigma)};  // 1 - t without cancellation
  }
  /// The noise level of t = 1/1000, the finest a plan of 1000 uniform steps reaches.
  double sigma_min() const override { return sigma_of(1e-3); }
  double sigma_max() const override { return std::numeric_limits<double>::infinity(); }

  Preconditioning precondition(double sigma) const override {
    TORCH_CHECK(sigma > 0.0, "Flow::precondition: the noise level must be positive, got ", sigma);
    return {1.0, -level(sigma).sigma_t, 1.0};
  }

  torch::Tensor noise_conditioning(double sigma, int64_t batch, const torch::Device& device) const override {
    detail::check_level("Flow::noise_conditioning", sigma, sigma_max());
    return torch::full({batch}, 1000.0 * time(sigma), torch::TensorOptions().dtype(torch::kFloat32).device(device));
  }

  double prior_std(double) const override { return 1.0; }

  std::optional<std::vector<double>> plan(std::string_view name, int64_t steps) const override {
    if (name != "uniform") return std::nullopt;
    TORCH_CHECK(steps >= 1, "Flow: steps must be >= 1, got ", steps);
    auto sigmas = detail::plan_storage("Flow", steps);  // steps + 1 zeros: the last stays 0
    for (int64_t i = 0; i < steps; ++i) {
      const double t = 1.0 - static_cast<double>(i) / static_cast<double>(steps);
      sigmas[static_cast<size_t>(i)] = sigma_of(shift_time(t, options_.shift()));
    }
    check_plan(sigmas, "Flow (uniform plan)");
    return sigmas;
  }
  std::vector<std::string> plan_names() const override { return {"uniform"}; }
  std::string default_plan() const override { return "uniform"; }

 private:
  FlowOptions options_;
};

namespace detail {
inline const bool flow_registered = (register_formulation("flow", [](const nlohmann::json& j) {
  return std::shared_ptr<const Formulation>(std::make_shared<Flow>(j.get<FlowOptions>()));
}), true);
}  // namespace detail

/// How FlowObjective draws the training times before the shift: uniform on [0, 1), or logit-normal,
/// t = sigmoid(m + s n) with n ~ N(0, 1) (Esser et al. 2024, sec. 3.1: it trains the middle times most).
enum class TimeDistribution { Uniform, LogitNormal };

/// FlowObjective's options: the time distribution and the logit-normal's location m and scale s (Esser et
/// al. 2024's defaults 0 and 1).
struct FlowObjectiveOptions {
  TORCH_ARG(TimeDistribution, distribution) = TimeDistribution::Uniform;
  TORCH_ARG(double, location) = 0.0;
  TORCH_ARG(double, scale) = 1.0;
};

/// The conditional flow-matching objective (Lipman et al. 2023, eq. 23, with the rectified path): t drawn
/// from the time distribution and shifted once by the formulation's shift, x_t = (1 - t) x_0 + t eps, and
/// the loss |F(x_t; 1000 t) - (eps - x_0)|^2 averaged over each sample's elements, unweighted (validation
/// reports the same). The levels it draws are the times t (float64), not sigmas. Refused: a location that
/// is not finite, a scale that is not positive and finite.
///
/// Example:
///   auto objective = std::make_shared<FlowObjective>(Flow(FlowOptions().shift(3)),
///       FlowObjectiveOptions().distribution(TimeDistribution::LogitNormal));
///   Trainer trainer(UNet(), objective, TrainerOptions().epochs(8));
class FlowObjective final : public Objective {
 public:
  explicit FlowObjective(Flow flow = Flow(), FlowObjectiveOptions options = {})
      : flow_(std::make_shared<Flow>(std::move(flow))), options_(options) {
    TORCH_CHECK(std::isfinite(options_.location()) && std::isfinite(options_.scale()) && options_.scale() > 0.0,
                "FlowObjective: need a finite location and a positive, finite scale, got location = ",
                options_.location(), ", scale = ", options_.scale());
  }

  const FlowObjectiveOptions& objective_options() const noexcept { return options_; }

  std::shared_ptr<const Formulation> formulation() const override { return flow_; }
  std::string describe() const override {
    return options_.distribution() == TimeDistribution::Uniform
               ? fmt::format("{}, t ~ U(0, 1)", flow_->describe())
               : fmt::format("{}, t ~ logit-normal({}, {})", flow_->describe(), options_.location(), options_.scale());
  }
  torch::Dtype dtype() const override { return torch::kFloat32; }
  std::shared_ptr<const Objective> to(const torch::Device&) const override {
    return std::make_shared<FlowObjective>(*this);
  }
  torch::Tensor draw_levels(int64_t n, torch::Generator& generator) const override {
    const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    const auto t = options_.distribution() == TimeDistribution::Uniform
                       ? torch::rand({n}, generator, f64)
                       : torch::sigmoid(torch::randn({n}, generator, f64) * options_.scale() + options_.location());
    return detail::shifted(t, flow_->flow_options().shift());
  }
  torch::Tensor per_sample(const NetworkCall& network, const torch::Tensor& x0, const torch::Tensor& t,
                           const torch::Tensor& noise, bool) const override {
    std::vector<int64_t> per_sample(static_cast<size_t>(x0.dim()), 1);
    per_sample[0] = -1;
    const auto t_x = t.to(x0.device(), x0.scalar_type()).reshape(per_sample);
    const auto x_t = (1 - t_x) * x0 + t_x * noise;
    const auto output = network(x_t, (t.to(x0.device(), torch::kFloat64) * 1000.0).to(torch::kFloat32));
    return (output - (noise - x0)).pow(2).flatten(1).mean(1);
  }

 private:
  std::shared_ptr<const Flow> flow_;
  FlowObjectiveOptions options_;
};

}  // namespace diffusion
