#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/detail/check.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/detail/registry.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/platform.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/random.hpp>
#include <diffusion/sampling/spacing.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

/// Sampling: one loop that drives any method (DDPM, DDIM, DPM-Solver++, or a user's) over any backbone.
namespace diffusion {

/// What a method's update sees at one step of its plan.
struct StepContext {
  const NoiseSchedule& schedule;
  /// Position of this step in the plan (0: the first, noisiest) and the plan's length.
  int64_t index, count;
  /// The timestep index denoised now, and the one this step goes to (the next plan entry; -1 after the
  /// last: x_0, abar = 1).
  int64_t t, t_next;
  /// x_t.
  const torch::Tensor& x;
  /// The model's prediction at t as noise and clean data (see convert_prediction; clip_x0 already applied).
  const Denoised& denoised;
  /// Fresh N(0, I) noise of x's shape from the run's generator. Call it only when the update adds noise:
  /// the order of draws is what makes a seed reproduce a run.
  const std::function<torch::Tensor()>& noise;
  /// Deprecated (to be removed after 0.x's next release): the former name of t_next, which is the next
  /// plan entry, not an earlier one. Holds the same value.
  [[deprecated("StepContext::t_prev is now t_next")]] int64_t t_prev = t_next;
};

/// A sampling method: the timesteps the model is called at, and the update from one to the next.
///
/// Subclass it for a new sampler: `timesteps` gives the plan, `start` returns the update for one run (a
/// closure; a multistep method keeps its history in it, so runs never share state). The loop calls the
/// model, converts its output (convert_prediction), and hands both to the update.
///
/// Example:
///   struct Euler : SamplingMethod {   // DDIM at eta 0, written out
///     std::string name() const override { return "euler"; }
///     std::string describe() const override { return "Euler, 20 steps"; }
///     std::vector<int64_t> timesteps(int64_t T) const override { return timestep_plan(T, 20); }
///     Update start() const override {
///       return [](const StepContext& c) { return ddim_step(c.schedule, c.x, c.t, c.t_next, c.denoised.eps); };
///     }
///   };
class SamplingMethod {
 public:
  /// x_t -> x_{t_next} for one step.
  using Update = std::function<torch::Tensor(const StepContext&)>;

  virtual ~SamplingMethod() = default;
  /// The name make_sampler knows it by, e.g. "ddim".
  virtual std::string name() const = 0;
  /// The method and its settings in words, e.g. "DDIM, 50 steps (leading), eta 1".
  virtual std::string describe() const = 0;
  /// The timestep indices visited, in order (strictly descending, in [0, num_timesteps)).
  virtual std::vector<int64_t> timesteps(int64_t num_timesteps) const = 0;
  /// A fresh update for one run.
  virtual Update start() const = 0;
};

/// What the sampling loop reports after each step.
struct SampleStep {
  /// Steps done so far, 1 .. total.
  int64_t step;
  /// Steps in this run (fewer than the plan's when starting from an image, see SampleOptions::strength).
  int64_t total;
  /// The timestep index just denoised: x_t -> x_{t_next}.
  int64_t t;
  /// The batch after this step (do not modify it in place).
  const torch::Tensor& x;
  /// The model's prediction of x_0 at t (clamped per clip_x0): a preview of where the run is going.
  const torch::Tensor& x0;
  /// The noise level just denoised (sigma of the variance-exploding view; plans.hpp). In a run over noise
  /// levels (sample with a Formulation), `t` is -1 and this is the step's level.
  double sigma = std::numeric_limits<double>::quiet_NaN();
};

/// Options shared by every sampling method.
///
/// Example:
///   auto x = sample(model, schedule, {25, 1, 28, 28}, DDIM().steps(50), SampleOptions().seed(42).callback(
///       [](const SampleStep& s) { fmt::print("{}/{}\n", s.step, s.total); }));
///   auto edited = sample(model, schedule, {8, 1, 28, 28}, DDIM(), SampleOptions().image(x0).strength(0.6));
struct SampleOptions {
  /// Seeds a private CPU generator for x_T and every step's noise: same seed, same samples, on any
  /// device. Ignored when `generator` is set.
  TORCH_ARG(std::optional<uint64_t>, seed) = std::nullopt;
  /// Draws all noise from this generator (CPU, or the sampling device's). Takes precedence over `seed`.
  TORCH_ARG(std::optional<torch::Generator>, generator) = std::nullopt;
  /// Called after every step (progress bars, previews).
  TORCH_ARG(std::function<void(const SampleStep&)>, callback) = nullptr;
  /// Clamp each step's predicted x_0 to [-clip_x0, clip_x0] (see convert_prediction); 0: off, as in the seed.
  /// 1 suits data scaled to [-1, 1] such as the MNIST example's.
  TORCH_ARG(double, clip_x0) = 0.0;
  /// The backbone's arithmetic (Precision::BFloat16: autocast); the sampler's own stays in the
  /// schedule's dtype.
  TORCH_ARG(Precision, precision) = Precision::Float32;
  /// What the backbone predicts (the checkpoint records it for trained models).
  TORCH_ARG(Prediction, prediction) = Prediction::Epsilon;
  /// Class labels for a class-conditional backbone (ConditionalBackbone): (N,) or (1,) for the whole batch,
  /// integers in [0, num_classes) or null_class. Undefined: unconditional. Refused for a backbone that takes
  /// no labels.
  TORCH_ARG(torch::Tensor, cond) = {};
  /// Start from this image rather than from noise (image-to-image, SDEdit: Meng et al. 2022), and the
  /// known pixels for `mask`. Shape (N, ...) as the batch, or (1, ...) for one image for the whole batch;
  /// on the schedule's device; values as the training data (e.g. [-1, 1]).
  TORCH_ARG(torch::Tensor, image) = {};
  /// With `image`: the share of the plan to run, in [0, 1]. Of a plan of S timesteps the last
  /// floor(strength S) run, starting from the image noised (q_sample) to the first of them: 0 returns
  /// the image, 1 ignores it and equals sampling from noise with the same seed (the prior x_T ~ N(0, I)
  /// is what the plan's first timestep stands for).
  TORCH_ARG(double, strength) = 1.0;
  /// Inpainting (the replacement step of RePaint, Lugmayr et al. 2022): 1 where `image` is known, 0
  /// where it is to be generated (values in [0, 1]; shape (N or 1, C or 1, ...) as the batch). After each
  /// step the known pixels are replaced by `image` noised to that step's timestep, and by `image` itself
  /// after the last. The noise for that comes from its own generator (derived from the run's without
  /// drawing from it), so an all-zero mask gives exactly the unmasked run.
  TORCH_ARG(torch::Tensor, mask) = {};
  /// The dtype of a run over noise levels (sample with a Formulation; the timestep loop uses its schedule's).
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
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
  // Every parameter: a wrapper (guidance) holds several networks, each of which must be there.
  for (const auto& p : unwrap(model).named_parameters()) {
    TORCH_CHECK(p.value().device() == device, fn, ": the model's parameters are on ", p.value().device(),
                " but the schedule is on ", device, " ('", p.key(), "'); move one with .to(device)");
  }
}

/// The backbone's forward: with the class labels `cond` when it takes them, refusing labels when it does not.
template <Backbone B>
torch::Tensor call_backbone(const char* fn, B& model, const torch::Tensor& x_t, const torch::Tensor& t,
                            const torch::Tensor& cond) {
  if constexpr (ConditionalBackbone<B>) {
    return unwrap(model).forward(x_t, t, cond);
  } else {
    TORCH_CHECK(!cond.defined(), fn, ": class labels given to a backbone that takes none (not a ConditionalBackbone)");
    return unwrap(model).forward(x_t, t);
  }
}

/// The model's output for (x_t, t[, cond]) in x_t's dtype, the model call (and so its backward) autocast
/// under Precision::BFloat16. What the sampling loop and the Trainer call the backbone through.
template <Backbone B>
torch::Tensor forward_in(Precision precision, B& model, const torch::Tensor& x_t, const torch::Tensor& t,
                         const torch::Tensor& cond = {}) {
  detail::check_cpu_convolutions_for(x_t);  // once per process: a user's backbone is protected too
  torch::Tensor out;
  {
    AutocastGuard amp(precision, x_t.device());
    out = call_backbone("forward", model, x_t, t, cond);
  }
  return out.scalar_type() == x_t.scalar_type() ? out : out.to(x_t.scalar_type());
}

/// forward_in, checked to return x_t's shape (no silent broadcasting downstream).
template <Backbone B>
torch::Tensor predict(const char* fn, B& model, const torch::Tensor& x_t, const torch::Tensor& t_batch,
                      Precision precision = Precision::Float32, const torch::Tensor& cond = {}) {
  const auto out = forward_in(precision, model, x_t, t_batch, cond);
  TORCH_CHECK(out.sizes() == x_t.sizes(), fn, ": the backbone returned shape ", shape_str(out), " for input ",
              shape_str(x_t), "; it must predict a tensor of the input's shape");
  return out;
}

/// The timestep index `t` for every sample of the batch, on `device`.
inline torch::Tensor timestep_batch(int64_t batch, int64_t t, const torch::Device& device) {
  return torch::full({batch}, t, torch::TensorOptions().dtype(torch::kLong).device(device));
}

/// A generator whose stream is independent of `gen`'s and fixed by gen's state, without drawing from gen
/// (a clone is drawn from instead); for the default generator when none is given.
inline torch::Generator fork_generator(const std::optional<torch::Generator>& gen) {
  auto clone = gen ? gen->clone() : at::detail::getDefaultCPUGenerator().clone();
  const auto options = torch::TensorOptions().dtype(torch::kLong).device(clone.device());
  const auto seed = torch::empty({1}, options).random_(0, std::numeric_limits<int64_t>::max(), clone).item<int64_t>();
  return make_generator(static_cast<uint64_t>(seed) ^ 0x5DEECE66DULL);
}

/// `image` (1 or N, ...) as a batch of `shape`, checked.
inline torch::Tensor batch_like(const char* fn, const char* name, const torch::Tensor& image,
                                const std::vector<int64_t>& shape, const torch::TensorOptions& options,
                                bool channels_may_be_one) {
  TORCH_CHECK(image.dim() == static_cast<int64_t>(shape.size()), fn, ": ", name, " must have the batch's ",
              shape.size(), " dimensions ", torch::IntArrayRef(shape), ", got shape ", shape_str(image));
  for (size_t d = 0; d < shape.size(); ++d) {
    const auto got = image.size(static_cast<int64_t>(d));
    const bool ok = got == shape[d] || (d == 0 && got == 1) || (d == 1 && channels_may_be_one && got == 1);
    TORCH_CHECK(ok, fn, ": ", name, " has shape ", shape_str(image), " but the batch is ", torch::IntArrayRef(shape),
                d == 0 ? " (its batch size must be 1 or the batch's)" : "");
  }
  TORCH_CHECK(image.device() == options.device(), fn, ": ", name, " is on ", image.device(), " but the samples are made on ",
              options.device());
  TORCH_CHECK(image.is_floating_point(), fn, ": ", name, " must be floating point, got ", image.scalar_type());
  return image.to(options.dtype()).expand(shape);
}

/// What sample() takes besides the model and the plan, checked and shaped as the batch: the class labels
/// (N,), the known image and the mask (undefined when not given).
struct SampleInputs {
  torch::Tensor cond, image, mask;
};

/// The checks every sampling loop makes of `shape` and `options` (the one copy of them), and the inputs
/// they describe on `x_options`' device and dtype.
inline SampleInputs sample_inputs(const char* fn, const std::vector<int64_t>& shape, const SampleOptions& options,
                                  const torch::TensorOptions& x_options) {
  TORCH_CHECK(!shape.empty() && shape.front() >= 1, fn, ": shape must start with a batch size >= 1, got ",
              torch::IntArrayRef(shape));
  for (const auto d : shape) TORCH_CHECK(d >= 1, fn, ": every dimension must be >= 1, got ", torch::IntArrayRef(shape));
  detail::check_clip_x0(fn, options.clip_x0());
  TORCH_CHECK(options.strength() >= 0.0 && options.strength() <= 1.0, fn, ": strength must be in [0, 1], got ",
              options.strength());
  TORCH_CHECK(!options.mask().defined() || options.image().defined(), fn,
              ": a mask needs the image whose known pixels it marks (SampleOptions::image)");
  const auto device = x_options.device();
  SampleInputs in;
  if (options.cond().defined()) {
    const auto& c = options.cond();
    TORCH_CHECK(!c.is_floating_point() && !c.is_complex() && c.scalar_type() != torch::kBool && c.dim() == 1 &&
                    (c.size(0) == 1 || c.size(0) == shape.front()),
                fn, ": cond must be 1-D integer class labels, one per sample (", shape.front(), ") or one for all, got ",
                c.scalar_type(), " of shape ", detail::shape_str(c));
    TORCH_CHECK(c.device() == device, fn, ": cond is on ", c.device(), " but the samples are made on ", device);
    in.cond = c.to(torch::kLong).expand({shape.front()});
  }
  if (options.image().defined()) in.image = batch_like(fn, "image", options.image(), shape, x_options, false);
  if (options.mask().defined()) {
    in.mask = batch_like(fn, "mask", options.mask(), shape, x_options, true);
    const double lo = in.mask.min().item<double>(), hi = in.mask.max().item<double>();
    TORCH_CHECK(lo >= 0.0 && hi <= 1.0, fn, ": mask values must be in [0, 1] (1: known), got values in [", lo, ", ",
                hi, "]");
  }
  return in;
}

/// The first plan entry a run starts at: 0 from noise; with an image, the last floor(strength S) of the S
/// steps run (the floor taken with a little slack, so that 0.6 x 50 is 30, not 29). Refused: a strength
/// above 0 that runs no step of this plan (it would return the image as strength 0 does, unasked).
inline int64_t first_step(const char* fn, const SampleOptions& options, bool has_image, int64_t S) {
  if (!has_image) return 0;
  const auto run = static_cast<int64_t>(std::floor(options.strength() * static_cast<double>(S) + 1e-9));
  TORCH_CHECK(run > 0 || options.strength() == 0.0, fn, ": strength ", options.strength(), " of a plan of ", S,
              " steps runs none of them (floor(strength x steps) = 0); give more steps, or strength 0 to return the image");
  return S - run;
}

}  // namespace detail

/// Draws samples of `shape` (N, ...) with `method` (DDPM(), DDIM(), DPMSolverPP(), make_sampler(...)):
/// x_T ~ N(0, I) (or `options.image` noised, for image-to-image), then for each timestep t of the
/// method's plan the model's output at t is converted to noise and x_0 (convert_prediction, per
/// `options.prediction`, clamped per `options.clip_x0`) and the method's update goes to the next
/// timestep, the last to x_0.
///
/// Runs on the schedule's device (the model must be there) in the schedule's dtype, without autograd
/// (InferenceMode), with the model in eval mode (its mode restored afterwards); the result is an ordinary
/// tensor. Refused: an empty or non-positive shape, a model on another device, a model whose output
/// shape differs from its input's, class labels for a model that takes none or of the wrong shape, clip_x0 < 0, strength outside [0, 1], a mask without an image,
/// image or mask shapes that do not fit the batch, mask values outside [0, 1], a plan that is not
/// strictly descending in [0, T), and, for a zero-terminal-SNR schedule, sampling from noise with a plan
/// that does not start at T-1 (leading spacing: use trailing or linspace).
///
/// Example:
///   UNet model = ...;
///   NoiseSchedule schedule;
///   auto images = sample(model, schedule, {25, 1, 28, 28}, DPMSolverPP().steps(15), SampleOptions().seed(0));
template <Backbone B>
torch::Tensor sample(B& model, const NoiseSchedule& schedule, const std::vector<int64_t>& shape,
                     const SamplingMethod& method, const SampleOptions& options = {}) {
  constexpr const char* fn = "sample";
  const auto device = schedule.device();
  detail::check_backbone_device(fn, model, device);
  const auto x_options = torch::TensorOptions().dtype(schedule.dtype()).device(device);
  const auto [cond, image, mask] = detail::sample_inputs(fn, shape, options, x_options);
  const int64_t T = schedule.num_timesteps();
  const auto plan = method.timesteps(T);
  TORCH_CHECK(!plan.empty(), fn, ": ", method.name(), " planned no timesteps");
  for (size_t i = 0; i < plan.size(); ++i) {
    TORCH_CHECK(plan[i] >= 0 && plan[i] < T && (i == 0 || plan[i] < plan[i - 1]), fn, ": ", method.name(),
                "'s plan must be strictly descending in [0, ", T, "), got ", torch::IntArrayRef(plan));
  }
  const auto S = static_cast<int64_t>(plan.size());
  const auto first = detail::first_step(fn, options, image.defined(), S);
  // From pure noise (no image, or strength 1), a zero-terminal-SNR model has learned to start only at T-1
  // (where x_T is N(0, I)).
  TORCH_CHECK(!schedule.options().zero_terminal_snr() || first > 0 || plan.front() == T - 1, fn,
              ": the schedule has zero terminal SNR, so sampling from noise must start at t = T-1 = ", T - 1, ", but ",
              method.name(), "'s plan starts at ", plan.front(), "; use trailing or linspace spacing (Lin et al. 2024)");

  std::optional<torch::Generator> gen = options.generator();
  if (!gen && options.seed()) gen = make_generator(*options.seed());
  std::optional<torch::Generator> mask_gen;
  if (mask.defined()) mask_gen = detail::fork_generator(gen);
  const auto& h = schedule.host();
  // The known image as it looks at timestep t (t = -1: itself).
  const auto known_at = [&](int64_t t) {
    if (t < 0) return image;
    const auto i = static_cast<size_t>(t);
    return image * h.sqrt_alphas_cumprod[i] + detail::randn(shape, x_options, mask_gen) * h.sqrt_one_minus_alphas_cumprod[i];
  };

  torch::Tensor x;
  {
    detail::EvalModeGuard eval(unwrap(model));
    c10::InferenceMode no_autograd;
    const std::function<torch::Tensor()> noise = [&] { return detail::randn(shape, x_options, gen); };
    x = noise();  // always drawn first: strength 1 and an all-zero mask are the plain run, draw for draw
    if (first == S) {
      x = image;
    } else if (first > 0) {
      const auto i = static_cast<size_t>(plan[static_cast<size_t>(first)]);
      x = image * h.sqrt_alphas_cumprod[i] + x * h.sqrt_one_minus_alphas_cumprod[i];
    }
    if (mask.defined() && first < S) x = torch::lerp(x, known_at(plan[static_cast<size_t>(first)]), mask);
    const auto update = method.start();
    for (int64_t k = first; k < S; ++k) {
      const int64_t t = plan[static_cast<size_t>(k)];
      const int64_t t_next = k + 1 < S ? plan[static_cast<size_t>(k + 1)] : -1;
      const auto out =
          detail::predict(fn, model, x, detail::timestep_batch(shape.front(), t, device), options.precision(), cond);
      const auto d = convert_prediction(schedule, x, t, out, options.prediction(), options.clip_x0());
      x = update(StepContext{schedule, k, S, t, t_next, x, d, noise});
      if (mask.defined()) x = torch::lerp(x, known_at(t_next), mask);
      if (options.callback()) options.callback()(SampleStep{k - first + 1, S - first, t, x, d.x0, h.sigmas[static_cast<size_t>(t)]});
    }
  }
  return x.clone();
}

/// Settings for make_sampler; each is optional, and a method refuses one it does not use.
///
/// Example:
///   auto method = make_sampler("dpmpp-2m", SamplerSettings().steps(15).spacing(TimestepSpacing::Trailing));
struct SamplerSettings {
  /// Model evaluations (DDIM, DPM-Solver++); the method's default when unset.
  TORCH_ARG(std::optional<int64_t>, steps) = std::nullopt;
  /// DDIM's eta.
  TORCH_ARG(std::optional<double>, eta) = std::nullopt;
  TORCH_ARG(std::optional<TimestepSpacing>, spacing) = std::nullopt;
};

namespace detail {
using SamplerFactory = std::function<std::shared_ptr<const SamplingMethod>(const SamplerSettings&)>;
inline Registry<SamplerFactory>& samplers() {
  static Registry<SamplerFactory> registry("sampler");
  return registry;
}

/// Refuses each setting in `s` that the sampler `name` does not take (eta 0 is no noise: taken by all).
inline void refuse_unused_settings(const char* name, const SamplerSettings& s, bool steps, bool eta, bool spacing) {
  TORCH_CHECK(steps || !s.steps(), "make_sampler: ", name, " takes no steps, got ", s.steps().value_or(0));
  TORCH_CHECK(eta || !s.eta() || *s.eta() == 0.0, "make_sampler: ", name, " takes no eta, got ", s.eta().value_or(0.0));
  TORCH_CHECK(spacing || !s.spacing(), "make_sampler: ", name, " takes no spacing");
}
}  // namespace detail

/// Makes `name` known to make_sampler (e.g. for a program that chooses its sampler by name). The built-in
/// methods register themselves: "ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde". A name already registered is refused.
inline void register_sampler(const std::string& name, detail::SamplerFactory factory) {
  detail::samplers().add(name, std::move(factory));
}

/// The method registered as `name`, with `settings`. Refused: an unknown name (the message lists the
/// known ones), steps below 1, and a setting the method does not take or refuses (eta outside [0, 1] for ddim). (Steps above the
/// schedule's T are refused by sample(), which knows T.)
inline std::shared_ptr<const SamplingMethod> make_sampler(std::string_view name, const SamplerSettings& settings = {}) {
  const auto& factory = detail::samplers().at(name);
  TORCH_CHECK(!settings.steps() || *settings.steps() >= 1, "make_sampler: steps must be >= 1, got ", *settings.steps());
  return factory(settings);
}

/// The names make_sampler knows, sorted.
inline std::vector<std::string> sampler_names() { return detail::samplers().names(); }

}  // namespace diffusion
