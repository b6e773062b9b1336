#pragma once

#include <diffusion/detail/check.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/formulation/discrete.hpp>
#include <diffusion/formulation/edm.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/training/loss.hpp>
#include <diffusion/backbone.hpp>
#include <diffusion/sampling/loop.hpp>

#include <fmt/core.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <memory>
#include <string>

/// Training objectives: the distribution of noise levels a batch is trained at, the noising, the
/// network's target and the weighting, as one object the Trainer is given (EDM2's training loop takes its
/// loss the same way).
namespace diffusion {

/// The backbone as an objective calls it: F(x_in, c_noise) (with the run's class labels and precision),
/// returning x_in's shape.
using NetworkCall = std::function<torch::Tensor(const torch::Tensor& x_in, const torch::Tensor& c_noise)>;

/// What a batch is trained on. Subclass it for a new formulation's loss; the Trainer draws the levels
/// and the noise for the global batch from its own generator (levels first), so that runs reproduce.
class Objective {
 public:
  virtual ~Objective() = default;
  /// The formulation trained for (what checkpoints record and sampling rebuilds).
  virtual std::shared_ptr<const Formulation> formulation() const = 0;
  /// It and its settings in words.
  virtual std::string describe() const = 0;
  /// The dtype the data and noise are drawn in.
  virtual torch::Dtype dtype() const = 0;
  /// This objective with its tensors on `device`.
  virtual std::shared_ptr<const Objective> to(const torch::Device& device) const = 0;
  /// The noise levels of `n` samples drawn from `generator` (a CPU generator; the result on the CPU), in
  /// the form per_sample reads (timestep indices for the discrete schedule, sigmas for EDM).
  virtual torch::Tensor draw_levels(int64_t n, torch::Generator& generator) const = 0;
  /// Each sample's loss (N,) in x0's dtype for data x0 (N, ...), its levels and its noise (x0's shape),
  /// through `network`; gradients flow into it. `weighted` false: the plain objective validation reports
  /// (the discrete schedule's MSE without Min-SNR); true: the one training minimizes.
  virtual torch::Tensor per_sample(const NetworkCall& network, const torch::Tensor& x0, const torch::Tensor& levels,
                                   const torch::Tensor& noise, bool weighted) const = 0;
};

namespace detail {
/// The discrete schedule's per-sample loss (DiscreteObjective and diffusion_loss): x_t = q_sample, the
/// prediction type's target, Min-SNR weights when min_snr_gamma > 0.
inline torch::Tensor discrete_loss(const NoiseSchedule& s, Prediction prediction, double min_snr_gamma,
                                   const NetworkCall& network, const torch::Tensor& x0, const torch::Tensor& t,
                                   const torch::Tensor& noise) {
  const auto x_t = extract(s.sqrt_alphas_cumprod, t, x0) * x0 + extract(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise;
  const auto output = network(x_t, t);
  const auto loss = (output - training_target(s, prediction, x0, noise, t)).pow(2).flatten(1).mean(1);
  if (min_snr_gamma <= 0) return loss;
  return loss * detail::min_snr_weights(s, t, min_snr_gamma, prediction).to(loss.scalar_type());
}
}  // namespace detail

/// The discrete schedule's objective (Ho et al. 2020, Algorithm 1): t ~ U{0, ..., T-1}, x_t = q_sample,
/// the target of the prediction type (training_target), optionally weighted by Min-SNR-gamma (Hang et al.
/// 2023; min_snr_weights). The Trainer's objective when it is given a NoiseSchedule. Refused: an epsilon
/// prediction on a zero-terminal-SNR schedule, min_snr_gamma < 0.
///
/// Example:
///   auto objective = std::make_shared<DiscreteObjective>(NoiseSchedule(), Prediction::V, 5.0);
class DiscreteObjective final : public Objective {
 public:
  explicit DiscreteObjective(NoiseSchedule schedule = NoiseSchedule(), Prediction prediction = Prediction::Epsilon,
                             double min_snr_gamma = 0.0)
      : formulation_(std::make_shared<DiscreteFormulation>(std::move(schedule), prediction)),
        min_snr_gamma_(min_snr_gamma) {
    TORCH_CHECK(std::isfinite(min_snr_gamma) && min_snr_gamma >= 0, "DiscreteObjective: min_snr_gamma must be >= 0 (0: "
                "off), got ", min_snr_gamma);
    detail::check_prediction_fits("DiscreteObjective", formulation_->schedule(), prediction);
  }

  const NoiseSchedule& schedule() const noexcept { return formulation_->schedule(); }
  Prediction prediction() const noexcept { return formulation_->prediction(); }
  double min_snr_gamma() const noexcept { return min_snr_gamma_; }

  std::shared_ptr<const Formulation> formulation() const override { return formulation_; }
  std::string describe() const override {
    return min_snr_gamma_ > 0 ? fmt::format("{}, Min-SNR gamma {}", formulation_->describe(), min_snr_gamma_)
                              : formulation_->describe();
  }
  torch::Dtype dtype() const override { return schedule().dtype(); }
  std::shared_ptr<const Objective> to(const torch::Device& device) const override {
    return std::make_shared<DiscreteObjective>(schedule().to(device), prediction(), min_snr_gamma_);
  }
  torch::Tensor draw_levels(int64_t n, torch::Generator& generator) const override {
    return torch::randint(0, schedule().num_timesteps(), {n}, generator, torch::kLong);
  }
  torch::Tensor per_sample(const NetworkCall& network, const torch::Tensor& x0, const torch::Tensor& t,
                           const torch::Tensor& noise, bool weighted) const override {
    return detail::discrete_loss(schedule(), prediction(), weighted ? min_snr_gamma_ : 0.0, network, x0, t, noise);
  }

 private:
  std::shared_ptr<const DiscreteFormulation> formulation_;
  double min_snr_gamma_;
};

/// EDM's objective (Karras et al. 2022, Table 1 and eq. 2): ln sigma ~ N(p_mean, p_std^2) (-1.2 and 1.2),
/// x = x_0 + sigma n, and the loss lambda(sigma) |D(x; sigma) - x_0|^2 with lambda = (sigma^2 +
/// sigma_data^2) / (sigma sigma_data)^2, computed as the equal |F(c_in x; c_noise) - (x_0 - c_skip x) /
/// c_out|^2 (lambda c_out^2 = 1): unit-variance targets at every level. Validation reports the same
/// (weighted) loss. Refused: p_std not positive, p_mean or p_std not finite.
///
/// Example:
///   auto objective = std::make_shared<EDMObjective>(EDM(EDMOptions().sigma_data(0.5)));
class EDMObjective final : public Objective {
 public:
  explicit EDMObjective(EDM edm = EDM(), double p_mean = -1.2, double p_std = 1.2)
      : edm_(std::make_shared<EDM>(std::move(edm))), p_mean_(p_mean), p_std_(p_std) {
    TORCH_CHECK(std::isfinite(p_mean) && std::isfinite(p_std) && p_std > 0, "EDMObjective: need a finite p_mean and a "
                "positive, finite p_std, got p_mean = ", p_mean, ", p_std = ", p_std);
  }

  double p_mean() const noexcept { return p_mean_; }
  double p_std() const noexcept { return p_std_; }

  std::shared_ptr<const Formulation> formulation() const override { return edm_; }
  std::string describe() const override {
    return fmt::format("{}, ln sigma ~ N({}, {}^2)", edm_->describe(), p_mean_, p_std_);
  }
  torch::Dtype dtype() const override { return torch::kFloat32; }
  std::shared_ptr<const Objective> to(const torch::Device&) const override {
    return std::make_shared<EDMObjective>(*this);
  }
  torch::Tensor draw_levels(int64_t n, torch::Generator& generator) const override {
    return (torch::randn({n}, generator, torch::TensorOptions().dtype(torch::kFloat64)) * p_std_ + p_mean_).exp();
  }
  torch::Tensor per_sample(const NetworkCall& network, const torch::Tensor& x0, const torch::Tensor& sigma,
                           const torch::Tensor& noise, bool) const override {
    std::vector<int64_t> per_sample(static_cast<size_t>(x0.dim()), 1);
    per_sample[0] = -1;
    const double sd = edm_->edm_options().sigma_data();
    const auto s = sigma.to(x0.device(), torch::kFloat64);
    const auto norm = (s * s + sd * sd).sqrt();
    const auto as_x = [&](const torch::Tensor& c) { return c.to(x0.scalar_type()).reshape(per_sample); };
    const auto c_skip = as_x(sd * sd / (norm * norm)), c_out = as_x(s * sd / norm), c_in = as_x(1.0 / norm);
    const auto x = x0 + as_x(s) * noise;
    const auto output = network(x * c_in, (s.log() / 4).to(torch::kFloat32));
    return (output - (x0 - c_skip * x) / c_out).pow(2).flatten(1).mean(1);
  }

 private:
  std::shared_ptr<const EDM> edm_;
  double p_mean_, p_std_;
};

namespace detail {

/// diffusion_loss without input checks.
template <Backbone B>
torch::Tensor diffusion_loss(B& model, const NoiseSchedule& schedule, const torch::Tensor& x0, const torch::Tensor& t,
                             const torch::Tensor& noise, const LossOptions& options, const torch::Tensor& cond = {}) {
  const NetworkCall network = [&](const torch::Tensor& x, const torch::Tensor& c_noise) {
    return predict("diffusion_loss", model, x, c_noise, options.precision(), cond);
  };
  return discrete_loss(schedule, options.prediction(), options.min_snr_gamma(), network, x0, t, noise);
}

}  // namespace detail

/// The denoising loss of each sample (shape (N,), x0's dtype): the mean over its elements of
/// (model(x_t, t) - target)^2 with x_t = q_sample(x0, t, noise) and the target of
/// `options.prediction()` (training_target), times min_snr_weights when `options.min_snr_gamma()` > 0.
/// For epsilon prediction without weighting its mean is Ho et al. 2020's L_simple (eq. 14). Gradients flow
/// into the model; take `.mean()` (or a weighted sum) and call backward. `cond` holds class labels for a
/// conditional backbone (null_class for "none").
///
/// Refused (as q_sample refuses them): t out of range or of the wrong length, noise of another shape,
/// dtype or device; also an epsilon prediction on a zero-terminal-SNR schedule.
///
/// Example:
///   auto t = torch::randint(0, schedule.num_timesteps(), {x0.size(0)}, torch::kLong);
///   auto loss = diffusion_loss(model, schedule, x0, t, torch::randn_like(x0)).mean();
///   loss.backward();
template <Backbone B>
torch::Tensor diffusion_loss(B& model, const NoiseSchedule& schedule, const torch::Tensor& x0, const torch::Tensor& t,
                             const torch::Tensor& noise, const LossOptions& options = {}, const torch::Tensor& cond = {}) {
  constexpr const char* fn = "diffusion_loss";
  detail::check_sample_batch(fn, "x0", x0);
  detail::check_timesteps(fn, t, x0.size(0), x0.device(), schedule.num_timesteps());
  TORCH_CHECK(noise.defined() && noise.sizes() == x0.sizes(), fn, ": noise must have x0's shape ", detail::shape_str(x0),
              ", got ", noise.defined() ? detail::shape_str(noise) : "an undefined tensor");
  TORCH_CHECK(noise.device() == x0.device(), fn, ": noise is on ", noise.device(), " but x0 is on ", x0.device());
  TORCH_CHECK(noise.scalar_type() == x0.scalar_type(), fn, ": noise has dtype ", noise.scalar_type(), " but x0 has ",
              x0.scalar_type());
  TORCH_CHECK(options.min_snr_gamma() >= 0, fn, ": min_snr_gamma must be >= 0 (0: off), got ", options.min_snr_gamma());
  detail::check_prediction_fits(fn, schedule, options.prediction());
  return detail::diffusion_loss(model, schedule, x0, t, noise, options, cond);
}

}  // namespace diffusion
