#pragma once

#include <diffusion/errors.hpp>

#include <diffusion/detail/registry.hpp>

#include <nlohmann/json.hpp>
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

/// Formulations (noise processes): what a noise level means for x, and what a network sees and predicts
/// at one. The library's unit is the noise level sigma of the variance-exploding view (Karras et al.
/// 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", sec. 2 and Table 1): a
/// sample x_t = alpha_t x_0 + sigma_t eps of any formulation is alpha_t (x_0 + sigma eps) with
/// sigma = sigma_t / alpha_t. Plans are lists of sigmas (sampling/plans.hpp); samplers read (alpha_t,
/// sigma_t) at them through level() and the denoiser through precondition() and noise_conditioning().
namespace diffusion {

/// One noise level in a formulation's own scale: x_t = alpha_t x_0 + sigma_t eps, sigma = sigma_t / alpha_t.
/// sigma = +inf (pure noise, where a formulation allows it) has alpha_t = 0; sigma = 0 (the data) has
/// sigma_t = 0.
struct Level {
  double sigma, alpha_t, sigma_t;
};

/// The preconditioning of Karras et al. 2022 (Table 1, eq. 7) at one noise level, relative to x_t in the
/// formulation's own scale: the denoiser is D(x_t) = c_skip x_t + c_out F(c_in x_t; c_noise), where F is
/// the backbone and c_noise its noise conditioning (Formulation::noise_conditioning).
struct Preconditioning {
  double c_skip, c_out, c_in;
};

/// A noise process: alpha_t and sigma_t as functions of the noise level, the preconditioning that makes a
/// backbone a denoiser, and what the backbone is told about the noise level. A formulation is an immutable
/// value, shared by pointer (make_formulation); subclass it for a new one and register it by name
/// (register_formulation) so that checkpoints can record and rebuild it.
class Formulation {
 public:
  virtual ~Formulation() = default;
  /// The name make_formulation knows it by, e.g. "ddpm" or "edm".
  virtual std::string name() const = 0;
  /// Its options as JSON: make_formulation(name(), options()) rebuilds it.
  virtual nlohmann::json options() const = 0;
  /// It and its settings in words, for logs.
  virtual std::string describe() const = 0;

  /// (alpha_t, sigma_t) at noise level sigma >= 0 (+inf only where sigma_max() is +inf). Refused where the
  /// formulation is not defined (the discrete schedule: above sigma_max(); EDM: +inf).
  virtual Level level(double sigma) const = 0;
  /// The range of noise levels the formulation trains on, and so the range plans should cover.
  virtual double sigma_min() const = 0;
  virtual double sigma_max() const = 0;

  /// c_skip, c_out and c_in at noise level sigma in (0, sigma_max()]. Refused where the network's output
  /// determines no denoised sample (an epsilon prediction at sigma = +inf).
  virtual Preconditioning precondition(double sigma) const = 0;
  /// The noise conditioning the backbone receives at sigma, for a batch of `batch` samples on `device`:
  /// its forward's `t` (a timestep index for the discrete schedule, ln(sigma) / 4 for EDM).
  virtual torch::Tensor noise_conditioning(double sigma, int64_t batch, const torch::Device& device) const = 0;

  /// The standard deviation of the pure noise a sampler starts from at noise level sigma, in the
  /// formulation's scale: 1 for a variance-preserving process (x_T ~ N(0, I)), sigma for a
  /// variance-exploding one.
  virtual double prior_std(double sigma) const = 0;

  /// A plan of `steps` steps this formulation knows by name, beyond the ones every formulation has
  /// ("karras", "exponential": make_plan); nothing when it does not know `name`.
  virtual std::optional<std::vector<double>> plan(std::string_view name, int64_t steps) const {
    (void)name;
    (void)steps;
    return std::nullopt;
  }
  /// The names plan() knows.
  virtual std::vector<std::string> plan_names() const { return {}; }
  /// The plan make_plan uses when none is named.
  virtual std::string default_plan() const { return "karras"; }
};

namespace detail {
using FormulationFactory = std::function<std::shared_ptr<const Formulation>(const nlohmann::json&)>;
inline Registry<FormulationFactory>& formulations() {
  static Registry<FormulationFactory> registry("formulation");
  return registry;
}

/// Refuses a noise level outside [0, sigma_max] (NaN included), naming `who`.
inline void check_level(std::string_view who, double sigma, double sigma_max) {
  TORCH_CHECK(sigma >= 0.0 && (sigma <= sigma_max || (std::isinf(sigma) && std::isinf(sigma_max))), who,
              ": the noise level must be in [0, ", sigma_max, "], got ", sigma);
}
}  // namespace detail

/// Makes `name` known to make_formulation; the library's formulations register themselves ("ddpm",
/// "edm", "flow"). A name registered twice is refused.
inline void register_formulation(const std::string& name, detail::FormulationFactory factory) {
  detail::formulations().add(name, std::move(factory));
}

/// The formulation registered as `name` with `options` (JSON; null or {} for the defaults). Refused: an
/// unknown name (the message lists the known ones), unknown or malformed options.
inline std::shared_ptr<const Formulation> make_formulation(std::string_view name,
                                                          const nlohmann::json& options = nlohmann::json::object()) {
  return detail::make_from_json(detail::formulations(), name, options, "make_formulation");
}

/// A formulation as a checkpoint records it: its registered name and options.
struct FormulationConfig {
  std::string name;
  nlohmann::json options = nlohmann::json::object();
  bool operator==(const FormulationConfig&) const = default;
};

/// The record of `f`: make_formulation(config.name, config.options) rebuilds it.
inline FormulationConfig formulation_config(const Formulation& f) { return {f.name(), f.options()}; }

/// Refuses, with an IncompatibleFileError, a model trained for `theirs` where `mine` is needed (resuming a
/// run, guiding one network by another), saying how the two differ: for two discrete formulations
/// ("ddpm") the prediction type or the noise schedule, else the two records. The message begins with
/// `who`, names the two as `theirs_name` (a file) and `mine_name` ("this run"), and ends with `reason`
/// when given.
inline void check_same_formulation(const FormulationConfig& theirs, const FormulationConfig& mine, const std::string& who,
                                   const std::string& theirs_name, const std::string& mine_name,
                                   const std::string& reason = "") {
  const auto tail = reason.empty() ? std::string() : "; " + reason;
  if (theirs.name == "ddpm" && mine.name == "ddpm") {
    const auto option = [](const FormulationConfig& c, const char* key) {
      return c.options.contains(key) ? c.options.at(key) : nlohmann::json();
    };
    const auto p1 = option(theirs, "prediction"), p2 = option(mine, "prediction");
    DIFFUSION_CHECK(IncompatibleFileError, p1 == p2, who, ": ", theirs_name, " was trained with ",
                    p1.is_string() ? p1.get<std::string>() : p1.dump(), " prediction, ", mine_name, "'s is ",
                    p2.is_string() ? p2.get<std::string>() : p2.dump(), tail);
    DIFFUSION_CHECK(IncompatibleFileError, option(theirs, "schedule") == option(mine, "schedule"), who, ": ", theirs_name,
                    " was trained with another noise schedule (", option(theirs, "schedule").dump(), ", ", mine_name,
                    "'s ", option(mine, "schedule").dump(), ")", tail);
  }
  DIFFUSION_CHECK(IncompatibleFileError, theirs == mine, who, ": ", theirs_name, " was trained for the formulation ",
                  theirs.name, " ", theirs.options.dump(), ", ", mine_name, "'s is ", mine.name, " ", mine.options.dump(), tail);
}

/// The formulation a record describes (see make_formulation for what is refused).
inline std::shared_ptr<const Formulation> make_formulation(const FormulationConfig& config) {
  return make_formulation(config.name, config.options);
}

/// The names make_formulation knows, sorted.
inline std::vector<std::string> formulation_names() { return detail::formulations().names(); }

}  // namespace diffusion
