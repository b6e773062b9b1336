#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/detail/json.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/detail/registry.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/precondition.hpp>
#include <diffusion/random.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/sampling/plans.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

/// Samplers over noise levels (k-diffusion's design): a method is a short update from one level of a
/// plan to the next that calls a denoiser D(x; sigma) as often as it needs; the plan (plans.hpp) and the
/// formulation (formulation/) are chosen apart from it. Every method is written in the variance-exploding
/// view (x / alpha_t = x_0 + sigma eps) and carried into the formulation's own scale by level(), so one
/// implementation serves every formulation, including a first level of +inf (pure noise).
namespace diffusion {

/// What a method's update sees at one step: x at plan level `sigma`, to be moved to `sigma_next`.
struct SamplerStep {
  const Formulation& formulation;
  /// D(x; sigma) for any x of the batch's shape at any level in (0, formulation.sigma_max()] (and above it
  /// where the formulation allows, e.g. EDM). Each call is one model evaluation (two under guidance).
  const Denoiser& denoiser;
  /// Position of this step in the plan (0: the first, noisiest) and the plan's number of steps.
  int64_t index, count;
  /// The level x is at and the next plan entry (0 after the last step).
  double sigma, sigma_next;
  /// x at `sigma`, in the formulation's scale.
  const torch::Tensor& x;
  /// Fresh N(0, I) noise of x's shape from the run's generator. Call it only when the update adds noise:
  /// the order of draws is what makes a seed reproduce a run.
  const std::function<torch::Tensor()>& noise;
};

/// A sampling method over noise levels. Subclass it for a new sampler and register it
/// (register_level_sampler); `start` returns the update for one run (a closure: a multistep method keeps
/// its history in it, so runs never share state).
///
/// Example (Euler, which is DDIM at eta 0):
///   struct MyEuler : LevelSampler {
///     std::string name() const override { return "my-euler"; }
///     std::string describe() const override { return "Euler"; }
///     nlohmann::json options() const override { return nlohmann::json::object(); }
///     Step start() const override {
///       return [](const SamplerStep& s) {
///         const auto d = s.denoiser(s.x, s.sigma);
///         return ode_step(s.formulation, s.x, d, s.sigma, s.sigma_next);
///       };
///     }
///   };
class LevelSampler {
 public:
  /// x at step.sigma -> x at step.sigma_next.
  using Step = std::function<torch::Tensor(const SamplerStep&)>;

  virtual ~LevelSampler() = default;
  /// The name make_level_sampler knows it by, e.g. "euler-a".
  virtual std::string name() const = 0;
  /// The method and its settings in words, e.g. "Euler ancestral (eta 1, s_noise 1)".
  virtual std::string describe() const = 0;
  /// Its options as JSON: make_level_sampler(name(), options()) rebuilds it.
  virtual nlohmann::json options() const = 0;
  /// A fresh update for one run.
  virtual Step start() const = 0;
  /// The model evaluations it makes over `sigmas` (one per step unless it says otherwise).
  virtual int64_t model_calls(const std::vector<double>& sigmas) const {
    return static_cast<int64_t>(sigmas.size()) - 1;
  }
};

/// The noise the denoised sample `d` implies for x at `level` (sigma_t > 0): eps = (x - alpha_t d) /
/// sigma_t. In the variance-exploding view this is k-diffusion's derivative (x - D) / sigma.
inline torch::Tensor implied_noise(const torch::Tensor& x, const torch::Tensor& d, const Level& level) {
  TORCH_CHECK(level.sigma_t > 0.0, "implied_noise: sigma_t must be > 0, got ", level.sigma_t);
  if (level.alpha_t == 0.0) return x / level.sigma_t;
  return (x - d * level.alpha_t) / level.sigma_t;
}

/// The point at noise level `to` on the line through (d, eps): alpha_t d + sigma_t eps, i.e. d + sigma eps
/// in the variance-exploding view.
inline torch::Tensor at_level(const Level& to, const torch::Tensor& d, const torch::Tensor& eps) {
  if (to.sigma_t == 0.0) return to.alpha_t == 1.0 ? d.clone() : d * to.alpha_t;
  return torch::add(d * to.alpha_t, eps, to.sigma_t);
}

/// One step of the probability-flow ODE from sigma to sigma_next with the denoised sample d at sigma held
/// fixed: x_next = alpha_next d + sigma_t,next eps, eps = implied_noise. Euler's method in the
/// variance-exploding view (Karras et al. 2022, Algorithm 1 without the correction) and DDIM at eta 0
/// (Song et al. 2021, eq. 12) in a variance-preserving one.
inline torch::Tensor ode_step(const Formulation& f, const torch::Tensor& x, const torch::Tensor& d, double sigma,
                              double sigma_next) {
  const auto to = f.level(sigma_next);
  if (to.sigma_t == 0.0) return at_level(to, d, d);
  return at_level(to, d, implied_noise(x, d, f.level(sigma)));
}

/// The split of an ancestral step from sigma to sigma_next (VE levels) into a deterministic move to
/// sigma_down and fresh noise of standard deviation sigma_up, with sigma_down^2 + sigma_up^2 =
/// sigma_next^2 (k-diffusion's get_ancestral_step): sigma_up = min(sigma_next, eta sigma_next sqrt(1 -
/// sigma_next^2 / sigma^2)). eta = 1 is DDPM's posterior (Ho et al. 2020, eq. 7) between the two levels,
/// eta = 0 the ODE; in a variance-preserving formulation this is DDIM's eta (Song et al. 2021, eq. 16).
/// sigma = +inf is allowed.
struct AncestralSplit {
  double sigma_down, sigma_up;
};
inline AncestralSplit ancestral_split(double sigma, double sigma_next, double eta) {
  if (sigma_next == 0.0 || eta == 0.0) return {sigma_next, 0.0};
  const double ratio = std::isinf(sigma) ? 0.0 : sigma_next / sigma;
  const double up = std::min(sigma_next, eta * sigma_next * std::sqrt(std::max(0.0, 1.0 - ratio * ratio)));
  return {std::sqrt(std::max(0.0, sigma_next * sigma_next - up * up)), up};
}

namespace detail {
/// Refuses a sampler option outside its range, naming the sampler: finite and >= 0.
inline void check_nonnegative(const char* who, const char* what, double v) {
  TORCH_CHECK(std::isfinite(v) && v >= 0.0, who, ": ", what, " must be finite and >= 0, got ", v);
}

using LevelSamplerFactory = std::function<std::shared_ptr<const LevelSampler>(const nlohmann::json&)>;
inline Registry<LevelSamplerFactory>& level_samplers() {
  static Registry<LevelSamplerFactory> registry("sampler");
  return registry;
}

/// The device a model's parameters (or buffers) are on, all of them; the CPU for one that has none.
template <Backbone B>
torch::Device model_device(const char* fn, B& model) {
  std::optional<torch::Device> device;
  for (const auto& p : unwrap(model).named_parameters()) {
    if (!device) device = p.value().device();
    TORCH_CHECK(p.value().device() == *device, fn, ": the model's parameters are on several devices (", *device,
                " and ", p.value().device(), " for '", p.key(), "')");
  }
  if (!device) {
    for (const auto& b : unwrap(model).named_buffers()) {
      device = b.value().device();
      break;
    }
  }
  return device.value_or(torch::Device(torch::kCPU));
}
}  // namespace detail

namespace detail {
/// A sampler whose options are "eta" and "s_noise" (and no other field), read from `j` and checked: eta
/// in [0, 1] when `ancestral` (check_ancestral_eta), else >= 0; s_noise >= 0.
template <class S>
std::shared_ptr<const LevelSampler> with_noise_options(const char* name, std::shared_ptr<S> sampler,
                                                       const nlohmann::json& j, bool ancestral = false) {
  check_json_fields(j, {"eta", "s_noise"}, name);
  read_json_field<double>(j, "eta", [&](double v) { sampler->eta(v); });
  read_json_field<double>(j, "s_noise", [&](double v) { sampler->s_noise(v); });
  if (ancestral) check_ancestral_eta(name, sampler->eta());
  else check_nonnegative(name, "eta", sampler->eta());
  check_nonnegative(name, "s_noise", sampler->s_noise());
  return sampler;
}
}  // namespace detail

/// Makes `name` known to make_level_sampler, with a factory from the method's JSON options. The built-in
/// methods register themselves (level_sampler_names lists them). A name registered twice is refused.
inline void register_level_sampler(const std::string& name, detail::LevelSamplerFactory factory) {
  detail::level_samplers().add(name, std::move(factory));
}

/// The sampler registered as `name` with its `options` (JSON: each method's own fields; null or {} for its
/// defaults). Refused: an unknown name (the known ones are listed), an unknown field, a malformed or out
/// of range value.
inline std::shared_ptr<const LevelSampler> make_level_sampler(std::string_view name,
                                                             const nlohmann::json& options = nlohmann::json::object()) {
  return detail::make_from_json(detail::level_samplers(), name, options, "make_level_sampler");
}

/// The names make_level_sampler knows, sorted.
inline std::vector<std::string> level_sampler_names() { return detail::level_samplers().names(); }

/// The plan `name` of `steps` steps for `formulation`: "karras" (karras_sigmas with `rho`) and
/// "exponential" (exponential_sigmas) over [formulation.sigma_min(), formulation.sigma_max()], or one the
/// formulation knows (Formulation::plan: "leading", "trailing", "linspace" for the discrete schedule).
/// Refused: an unknown name (the known ones are listed), and what the plan function refuses.
inline std::vector<double> make_plan(const Formulation& formulation, std::string_view name, int64_t steps,
                                     double rho = 7.0) {
  // Karras and exponential plans span [sigma_min, sigma_max]: a formulation whose pure noise is at +inf
  // (zero terminal SNR, flow matching) has only its own plans, which start there.
  const bool spans = std::isfinite(formulation.sigma_max());
  std::string known = spans ? "exponential, karras" : "";
  for (const auto& n : formulation.plan_names()) known += (known.empty() ? "" : ", ") + n;
  if (name == "karras" || name == "exponential") {
    TORCH_CHECK(spans, "make_plan: '", std::string(name), "' spans [sigma_min, sigma_max], but ", formulation.describe(),
                " reaches pure noise only at sigma = +inf; use a plan of its own that starts there (its plans: ", known, ")");
    return name == "karras" ? karras_sigmas(steps, formulation.sigma_min(), formulation.sigma_max(), rho)
                            : exponential_sigmas(steps, formulation.sigma_min(), formulation.sigma_max());
  }
  if (auto plan = formulation.plan(name, steps)) return *plan;
  TORCH_CHECK(false, "make_plan: unknown plan '", std::string(name), "' for ", formulation.describe(), " (known: ", known,
              ")");
  return {};
}

/// Draws samples of `shape` (N, ...) with `sampler` over the noise levels `sigmas` (a plan: strictly
/// decreasing, ending in 0; make_plan), the model made a denoiser by `formulation` (make_denoiser). Starts
/// from N(0, I) scaled by formulation.prior_std(sigmas[0]) (or from options.image noised to the first level
/// run: image-to-image), and the sampler moves x from each level to the next, the last to the data.
///
/// Runs on the model's device, in options.dtype(), without autograd and in eval mode (restored), as
/// sample() with a NoiseSchedule does; SampleOptions means the same here (seed, generator, callback,
/// clip_x0, precision, cond, image, strength, mask) but for `prediction`, which the formulation carries
/// (a value other than the default is refused). The inpainting replacement noises the known image to each
/// level: alpha_t image + sigma_t z. Refused besides what sample() refuses: a list that is not a plan
/// (check_plan), a first level the formulation does not allow, and, for a formulation whose pure noise is
/// sigma = +inf (a zero-terminal-SNR schedule), sampling from noise with a plan that does not start there.
///
/// Example:
///   const DiscreteFormulation f(schedule);
///   auto sampler = make_level_sampler("dpmpp-2m");
///   auto images = sample(model, f, {25, 1, 28, 28}, *sampler, make_plan(f, "karras", 15), SampleOptions().seed(0));
template <Backbone B>
torch::Tensor sample(B& model, const Formulation& formulation, const std::vector<int64_t>& shape,
                     const LevelSampler& sampler, const std::vector<double>& sigmas, const SampleOptions& options = {}) {
  constexpr const char* fn = "sample";
  check_plan(sigmas, fn);
  TORCH_CHECK(options.prediction() == Prediction::Epsilon, fn, ": SampleOptions::prediction applies to the timestep "
              "loop; over noise levels the formulation says what the network predicts (", formulation.describe(), ")");
  TORCH_CHECK(at::isFloatingType(options.dtype()), fn, ": dtype must be floating point, got ", options.dtype());
  const auto device = detail::model_device(fn, model);
  const auto x_options = torch::TensorOptions().dtype(options.dtype()).device(device);
  const auto [cond, image, mask] = detail::sample_inputs(fn, shape, options, x_options);
  const auto S = static_cast<int64_t>(sigmas.size()) - 1;
  const auto first = detail::first_step(fn, options, image.defined(), S);
  (void)formulation.level(sigmas.front());  // refuses a level the formulation does not have
  // From pure noise (no image, or strength 1).
  TORCH_CHECK(first > 0 || !std::isinf(formulation.sigma_max()) || std::isinf(sigmas.front()), fn, ": ",
              formulation.describe(), " reaches pure noise only at sigma = +inf, so sampling from noise must start "
              "there, but the plan starts at ", sigmas.front(), " (prepend +inf, or use a trailing or linspace plan)");

  std::optional<torch::Generator> gen = options.generator();
  if (!gen && options.seed()) gen = make_generator(*options.seed());
  std::optional<torch::Generator> mask_gen;
  if (mask.defined()) mask_gen = detail::fork_generator(gen);
  // The known image at noise level sigma (0: itself).
  const auto known_at = [&](double sigma) {
    if (sigma == 0.0) return image;
    const auto l = formulation.level(sigma);
    return torch::add(image * l.alpha_t, detail::randn(shape, x_options, mask_gen), l.sigma_t);
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
      const auto l = formulation.level(sigmas[static_cast<size_t>(first)]);
      x = torch::add(image * l.alpha_t, x, l.sigma_t);
    } else if (const double scale = formulation.prior_std(sigmas.front()); scale != 1.0) {
      x = x * scale;
    }
    if (mask.defined() && first < S) x = torch::lerp(x, known_at(sigmas[static_cast<size_t>(first)]), mask);
    const auto denoiser = make_denoiser(model, formulation, DenoiserOptions().precision(options.precision()).cond(cond).clip_x0(options.clip_x0()));
    torch::Tensor preview;  // the last denoised sample, for the callback
    const Denoiser tracked = [&](const torch::Tensor& at, double sigma) {
      TORCH_CHECK(at.sizes() == x.sizes(), fn, ": ", sampler.name(), " asked the denoiser about a tensor of shape ",
                  detail::shape_str(at), " but the batch is ", detail::shape_str(x));
      preview = denoiser(at, sigma);
      return preview;
    };
    const auto update = sampler.start();
    for (int64_t k = first; k < S; ++k) {
      const double sigma = sigmas[static_cast<size_t>(k)], sigma_next = sigmas[static_cast<size_t>(k + 1)];
      x = update(SamplerStep{formulation, tracked, k, S, sigma, sigma_next, x, noise});
      TORCH_CHECK(x.sizes() == torch::IntArrayRef(shape), fn, ": ", sampler.name(), " returned shape ",
                  detail::shape_str(x), " for a batch of ", torch::IntArrayRef(shape));
      if (mask.defined()) x = torch::lerp(x, known_at(sigma_next), mask);
      if (options.callback()) options.callback()(SampleStep{k - first + 1, S - first, -1, x, preview, sigma});
    }
  }
  return x.clone();
}

}  // namespace diffusion
