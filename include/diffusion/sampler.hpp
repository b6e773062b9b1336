#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/detail/check.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/random.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

/// The DDPM reverse process: one step, and the loop from pure noise to samples.
namespace diffusion {

namespace detail {

/// The x_0 that x_t and the predicted noise imply, eq. 4 solved for x_0:
/// (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clamped to [-clip_x0, clip_x0] when clip_x0 > 0.
inline torch::Tensor predicted_x0(const torch::Tensor& x_t, const torch::Tensor& eps, double abar, double clip_x0) {
  auto x0 = (x_t - eps * std::sqrt(1.0 - abar)) / std::sqrt(abar);
  return clip_x0 > 0.0 ? x0.clamp_(-clip_x0, clip_x0) : x0;
}

}  // namespace detail

/// One reverse step x_t -> x_{t-1} given the predicted noise (Ho et al. 2020, Algorithm 2, line 4):
///   mean    = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps_pred)   (eq. 11)
///   x_{t-1} = mean + sqrt(beta-tilde_t) * z,  z ~ N(0, I)                         (sigma_t^2 = eq. 7's beta-tilde)
/// At t = 0 no noise is added and the mean is returned, as in the seed.
///
/// `t` is the timestep index in [0, T) shared by the whole batch; `noise` is z (x_t's shape), needed
/// only when t > 0. This is the seed's `calc_x_t_minus_one` with the model call factored out.
///
/// `clip_x0` > 0 clamps the implied prediction of x_0, (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), to
/// [-clip_x0, clip_x0] and takes the posterior mean in its x_0 form (eq. 7):
///   mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
/// which equals eq. 11 when nothing is clamped. Data in [-1, 1] never leaves that range, so an
/// imperfect model's out-of-range x_0 guesses are errors; clamping them (as Ho et al.'s code does)
/// keeps early steps from amplifying them. 0 (the default, and the seed) is eq. 11 unchanged.
///
/// Example:
///   auto x_prev = ddpm_step(schedule, x_t, 500, model(x_t, t_batch), torch::randn_like(x_t));
inline torch::Tensor ddpm_step(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t,
                               const torch::Tensor& eps_pred, const torch::Tensor& noise = {}, double clip_x0 = 0.0) {
  constexpr const char* fn = "ddpm_step";
  detail::check_sample_batch(fn, "x_t", x_t);
  TORCH_CHECK(x_t.device() == schedule.device(), fn, ": x_t is on ", x_t.device(), " but the schedule is on ",
              schedule.device());
  TORCH_CHECK(t >= 0 && t < schedule.timesteps(), fn, ": t must be in [0, ", schedule.timesteps(), "), got ", t);
  TORCH_CHECK(eps_pred.defined() && eps_pred.sizes() == x_t.sizes(), fn,
              ": the predicted noise must have x_t's shape ", detail::shape_str(x_t), ", got ",
              eps_pred.defined() ? detail::shape_str(eps_pred) : "an undefined tensor");
  TORCH_CHECK(clip_x0 >= 0.0, fn, ": clip_x0 must be >= 0 (0: off), got ", clip_x0);
  // One t for the whole batch: the coefficients are host scalars (no gather, no device sync).
  const auto& h = schedule.host();
  const auto i = static_cast<size_t>(t);
  const double beta = h.betas[i], sqrt_one_minus_abar = h.sqrt_one_minus_alphas_cumprod[i];
  torch::Tensor mean;
  if (clip_x0 > 0.0) {
    const double abar = h.alphas_cumprod[i], abar_prev = h.alphas_cumprod_prev[i];
    auto x0 = detail::predicted_x0(x_t, eps_pred, abar, clip_x0);
    const double c_x0 = std::sqrt(abar_prev) * beta / (1.0 - abar);
    const double c_xt = std::sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar);
    mean = x0.mul_(c_x0).add_(x_t, c_xt);
  } else {
    mean = (x_t - eps_pred * (beta / sqrt_one_minus_abar)) * h.sqrt_recip_alphas[i];
  }
  if (t == 0) return mean;
  TORCH_CHECK(noise.defined() && noise.sizes() == x_t.sizes(), fn, ": at t = ", t,
              " > 0 the noise z must have x_t's shape ", detail::shape_str(x_t), ", got ",
              noise.defined() ? detail::shape_str(noise) : "an undefined tensor");
  const double sigma = std::sqrt(h.posterior_variance[i]);
  return mean.add_(noise, sigma);
}

/// What the sampling loop reports after each reverse step.
struct SampleStep {
  /// Reverse steps done so far, 1 .. total.
  int64_t step;
  /// Reverse steps in the whole run.
  int64_t total;
  /// The timestep index just denoised: x_t -> x_{t-1}.
  int64_t t;
  /// x_{t-1}, the batch after this step (do not modify it in place).
  const torch::Tensor& x;
};

/// Options for ddpm_sample.
///
/// Example:
///   auto x = ddpm_sample(model, schedule, {25, 1, 28, 28}, SampleOptions().seed(42).callback(
///       [](const SampleStep& s) { if (s.step % 100 == 0) std::cout << s.step << "/" << s.total << "\n"; }));
struct SampleOptions {
  /// Seeds a private CPU generator for x_T and every step's noise: same seed, same samples, on any
  /// device. Ignored when `generator` is set.
  TORCH_ARG(std::optional<uint64_t>, seed) = std::nullopt;
  /// Draws all noise from this generator (CPU, or the sampling device's). Takes precedence over `seed`.
  TORCH_ARG(std::optional<torch::Generator>, generator) = std::nullopt;
  /// Called after every reverse step (progress bars, intermediate images).
  TORCH_ARG(std::function<void(const SampleStep&)>, callback) = nullptr;
  /// Clamp each step's predicted x_0 to [-clip_x0, clip_x0] (see ddpm_step); 0: off, as in the seed.
  /// 1 suits data scaled to [-1, 1] such as the MNIST example's.
  TORCH_ARG(double, clip_x0) = 0.0;
  /// The backbone's arithmetic (Precision::BFloat16: autocast); the sampler's own stays float32.
  TORCH_ARG(Precision, precision) = Precision::Float32;
};

namespace detail {

/// Puts a module in eval mode and restores the mode it found on scope exit.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(torch::nn::Module& module) : module_(module), was_training_(module.is_training()) {
    module_.eval();
  }
  ~EvalModeGuard() { module_.train(was_training_); }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  torch::nn::Module& module_;
  bool was_training_;
};

template <Backbone B>
void check_backbone_device(const char* fn, B& model, const torch::Device& device) {
  const auto params = unwrap(model).parameters();
  if (!params.empty()) {
    TORCH_CHECK(params.front().device() == device, fn, ": the model's parameters are on ", params.front().device(),
                " but the schedule is on ", device, "; move one with .to(device)");
  }
}

/// The model's output for (x_t, t) in x_t's dtype, the model call (and so its backward) autocast under
/// Precision::BFloat16. What the samplers and the Trainer call the backbone through.
template <Backbone B>
torch::Tensor forward_in(Precision precision, B& model, const torch::Tensor& x_t, const torch::Tensor& t) {
  torch::Tensor out;
  {
    AutocastGuard amp(precision, x_t.device());
    out = unwrap(model).forward(x_t, t);
  }
  return out.scalar_type() == x_t.scalar_type() ? out : out.to(x_t.scalar_type());
}

/// The model's noise prediction (forward_in), checked to have x_t's shape (no silent broadcasting
/// downstream).
template <Backbone B>
torch::Tensor predict_noise(const char* fn, B& model, const torch::Tensor& x_t, const torch::Tensor& t_batch,
                            Precision precision = Precision::Float32) {
  const auto eps = forward_in(precision, model, x_t, t_batch);
  TORCH_CHECK(eps.sizes() == x_t.sizes(), fn, ": the backbone returned shape ", shape_str(eps), " for input ",
              shape_str(x_t), "; it must predict noise of the input's shape");
  return eps;
}

}  // namespace detail

/// Generates samples with the DDPM ancestral sampler (Ho et al. 2020, Algorithm 2): x_T ~ N(0, I),
/// then ddpm_step for t = T-1 .. 0 with the model's noise prediction.
///
/// `shape` is the batch shape (N, ...), e.g. {25, 1, 28, 28}. Runs on the schedule's device (the
/// model must be there too) in the schedule's dtype, without autograd (InferenceMode), with the model
/// in eval mode; the model's train/eval mode is restored afterwards. The result is an ordinary tensor.
///
/// Example:
///   ConvNet model;
///   NoiseSchedule schedule;
///   auto images = ddpm_sample(model, schedule, {25, 1, 28, 28}, SampleOptions().seed(0));   // in ~[-1, 1]
namespace detail {

/// What every sampling loop shares: checks the shape and the model's device, builds the generator from
/// seed or generator, puts the model in eval mode under InferenceMode, draws x_T ~ N(0, I), runs
/// `steps(x, draw_noise)` and returns its result as an ordinary tensor (an inference tensor cannot enter
/// autograd later). `draw_noise()` returns fresh N(0, I) noise of the batch's shape.
template <Backbone B, class Steps>
torch::Tensor run_sampler(const char* fn, B& model, const NoiseSchedule& schedule, const std::vector<int64_t>& shape,
                          const std::optional<uint64_t>& seed, const std::optional<torch::Generator>& generator,
                          Steps&& steps) {
  TORCH_CHECK(!shape.empty() && shape.front() >= 1, fn, ": shape must start with a batch size >= 1, got ",
              torch::IntArrayRef(shape));
  for (const auto d : shape) TORCH_CHECK(d >= 1, fn, ": every dimension must be >= 1, got ", torch::IntArrayRef(shape));
  const auto device = schedule.device();
  check_backbone_device(fn, model, device);
  std::optional<torch::Generator> gen = generator;
  if (!gen && seed) gen = make_generator(*seed);

  torch::Tensor result;
  {
    EvalModeGuard eval(unwrap(model));
    c10::InferenceMode no_autograd;
    const auto x_options = torch::TensorOptions().dtype(schedule.dtype()).device(device);
    const auto draw_noise = [&] { return randn(shape, x_options, gen); };
    result = steps(draw_noise(), draw_noise);
  }
  return result.clone();
}

/// The timestep index `t` for every sample of the batch, on `device`.
inline torch::Tensor timestep_batch(int64_t batch, int64_t t, const torch::Device& device) {
  return torch::full({batch}, t, torch::TensorOptions().dtype(torch::kLong).device(device));
}

}  // namespace detail

/// Generates samples with the DDPM ancestral sampler (Ho et al. 2020, Algorithm 2): x_T ~ N(0, I),
/// then ddpm_step for t = T-1 .. 0 with the model's noise prediction.
///
/// `shape` is the batch shape (N, ...), e.g. {25, 1, 28, 28}. Runs on the schedule's device (the
/// model must be there too) in the schedule's dtype, without autograd (InferenceMode), with the model
/// in eval mode; the model's train/eval mode is restored afterwards. The result is an ordinary tensor.
///
/// Example:
///   ConvNet model;
///   NoiseSchedule schedule;
///   auto images = ddpm_sample(model, schedule, {25, 1, 28, 28}, SampleOptions().seed(0));   // in ~[-1, 1]
template <Backbone B>
torch::Tensor ddpm_sample(B& model, const NoiseSchedule& schedule, std::vector<int64_t> shape,
                          const SampleOptions& options = {}) {
  constexpr const char* fn = "ddpm_sample";
  TORCH_CHECK(options.clip_x0() >= 0.0, fn, ": clip_x0 must be >= 0 (0: off), got ", options.clip_x0());
  return detail::run_sampler(fn, model, schedule, shape, options.seed(), options.generator(),
                             [&](torch::Tensor x, const auto& draw_noise) {
                               const int64_t T = schedule.timesteps();
                               for (int64_t t = T - 1; t >= 0; --t) {
                                 const auto t_batch = detail::timestep_batch(shape.front(), t, schedule.device());
                                 const auto eps = detail::predict_noise(fn, model, x, t_batch, options.precision());
                                 x = ddpm_step(schedule, x, t, eps, t > 0 ? draw_noise() : torch::Tensor{},
                                               options.clip_x0());
                                 if (options.callback()) options.callback()(SampleStep{T - t, T, t, x});
                               }
                               return x;
                             });
}

}  // namespace diffusion
