#pragma once

#include <diffusion/sampling/spacing.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <new>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

/// Plans as noise levels: the decreasing list of sigmas a sampler visits, ending in 0 (the data itself).
/// sigma is the noise level of the variance-exploding view x / sqrt(abar) = x_0 + sigma * noise (Karras
/// et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", sec. 2); a discrete
/// schedule's sigma_t is NoiseSchedule::sigma(t). Each step of a sampler goes from one entry to the next;
/// there is no sentinel, and the last step always reaches sigma = 0.
namespace diffusion {

/// Refuses a list that is not a plan, naming `who`: at least two entries, strictly decreasing (no
/// duplicate, so no zero-length step), the last exactly 0, the others positive and finite, except that
/// the first may be +inf (a zero-terminal-SNR schedule's pure noise, NoiseSchedule::sigma(T-1)).
inline void check_plan(const std::vector<double>& sigmas, std::string_view who = "check_plan") {
  const auto n = sigmas.size();
  TORCH_CHECK(n >= 2, who, ": a plan needs at least two noise levels (a start and 0), got ", n);
  TORCH_CHECK(sigmas.back() == 0.0, who, ": a plan must end at sigma = 0, got ", sigmas.back());
  for (size_t i = 0; i + 1 < n; ++i) {
    const double s = sigmas[i];
    TORCH_CHECK(s > 0.0 && (std::isfinite(s) || (i == 0 && std::isinf(s))), who, ": noise level ", i,
                " must be positive and finite (only the first may be +inf), got ", s);
  }
  for (size_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK(sigmas[i] > sigmas[i + 1], who, ": noise levels must decrease strictly, got ", sigmas[i], " at ", i,
                " then ", sigmas[i + 1], " at ", i + 1, sigmas[i] == sigmas[i + 1] ? " (a step of length zero)" : "");
  }
}

namespace detail {
inline void check_plan_range(std::string_view who, int64_t steps, double sigma_min, double sigma_max) {
  TORCH_CHECK(steps >= 1, who, ": steps must be >= 1, got ", steps);
  TORCH_CHECK(std::isfinite(sigma_min) && sigma_min > 0.0, who, ": sigma_min must be positive and finite, got ",
              sigma_min);
  TORCH_CHECK(std::isfinite(sigma_max), who, ": sigma_max must be finite, got ", sigma_max,
              " (a formulation whose pure noise is at sigma = +inf, a zero-terminal-SNR schedule or flow matching, "
              "needs a plan that starts there: a trailing or linspace timestep spacing, flow's uniform plan)");
  TORCH_CHECK(sigma_min < sigma_max || (steps == 1 && sigma_min == sigma_max), who,
              ": sigma_min must be below sigma_max, got sigma_min = ", sigma_min, ", sigma_max = ", sigma_max);
}

/// Room for steps + 1 levels, refused as a c10::Error when it cannot be had.
inline std::vector<double> plan_storage(std::string_view who, int64_t steps) {
  TORCH_CHECK(static_cast<uint64_t>(steps) < std::vector<double>().max_size(), who, ": ", steps,
              " steps are more than a plan can hold");
  try {
    return std::vector<double>(static_cast<size_t>(steps) + 1, 0.0);
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, who, ": ", steps, " steps need ", (static_cast<double>(steps) + 1) * 8 / (1 << 20),
                " MiB for the plan, which could not be allocated");
  }
  return {};
}

/// The levels between the ends must be positive and finite: an extreme exponent can overflow them.
inline void check_plan_values(std::string_view who, const std::vector<double>& sigmas, std::string_view what) {
  for (size_t i = 1; i + 2 < sigmas.size(); ++i) {
    TORCH_CHECK(std::isfinite(sigmas[i]) && sigmas[i] > 0.0, who, ": ", what, " over [sigma_min, sigma_max] = [",
                sigmas[sigmas.size() - 2], ", ", sigmas.front(), "] leaves double's range (level ", i, " came out as ",
                sigmas[i], ")");
  }
}
}  // namespace detail

/// Karras et al. 2022, eq. 5: `steps` noise levels from sigma_max down to sigma_min, evenly spaced in
/// sigma^(1/rho), then 0: sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) -
/// sigma_max^(1/rho)))^rho for i = 0 .. steps - 1 (k-diffusion's get_sigmas_karras). rho = 7 (the paper's)
/// spends more steps at low noise; rho = 1 is uniform in sigma. Computed as ((1 - r) sigma_max^(1/rho) + r
/// sigma_min^(1/rho))^rho, the same value without the cancellation at the low end; the first and last
/// levels are sigma_max and sigma_min exactly. One step: {sigma_max, 0}. Refused: steps < 1 (and more
/// than memory holds), sigma_min not positive, sigma_max not finite, sigma_min >= sigma_max (equal only
/// for one step), rho not positive and finite, a rho so extreme that a level leaves double's range, and a
/// range so narrow for the step count that two levels round to the same double. Returns steps + 1 values.
///
/// Example:
///   karras_sigmas(10, 0.002, 80);                                        // EDM's range
///   karras_sigmas(15, schedule.sigma_min(), schedule.sigma_max());       // "DPM++ 2M Karras" on a discrete schedule
inline std::vector<double> karras_sigmas(int64_t steps, double sigma_min, double sigma_max, double rho = 7.0) {
  detail::check_plan_range("karras_sigmas", steps, sigma_min, sigma_max);
  TORCH_CHECK(std::isfinite(rho) && rho > 0.0, "karras_sigmas: rho must be positive and finite, got ", rho);
  const double hi = std::pow(sigma_max, 1.0 / rho), lo = std::pow(sigma_min, 1.0 / rho);
  auto sigmas = detail::plan_storage("karras_sigmas", steps);
  const size_t n = sigmas.size() - 1;  // = steps
  for (size_t i = 1; i + 1 < n; ++i) {
    const double ramp = static_cast<double>(i) / static_cast<double>(n - 1);
    sigmas[i] = std::pow((1.0 - ramp) * hi + ramp * lo, rho);
  }
  // The ends are the given values exactly (the formula returns them to within rounding).
  sigmas.front() = sigma_max;
  if (n > 1) sigmas[n - 1] = sigma_min;
  const auto who = "karras_sigmas (rho = " + c10::str(rho) + ")";
  detail::check_plan_values(who, sigmas, "this rho");
  check_plan(sigmas, who);
  return sigmas;
}

/// `steps` noise levels from sigma_max down to sigma_min evenly spaced in log sigma, then 0 (k-diffusion's
/// get_sigmas_exponential): sigma_i = exp(log sigma_max + i / (steps - 1) (log sigma_min - log sigma_max)).
/// The first and last levels are sigma_max and sigma_min exactly; one step: {sigma_max, 0}. The same
/// refusals as karras_sigmas. Returns steps + 1 values.
inline std::vector<double> exponential_sigmas(int64_t steps, double sigma_min, double sigma_max) {
  detail::check_plan_range("exponential_sigmas", steps, sigma_min, sigma_max);
  const double hi = std::log(sigma_max), lo = std::log(sigma_min);
  auto sigmas = detail::plan_storage("exponential_sigmas", steps);
  const size_t n = sigmas.size() - 1;  // = steps
  for (size_t i = 1; i + 1 < n; ++i) {
    const double ramp = static_cast<double>(i) / static_cast<double>(n - 1);
    sigmas[i] = std::exp((1.0 - ramp) * hi + ramp * lo);
  }
  sigmas.front() = sigma_max;
  if (n > 1) sigmas[n - 1] = sigma_min;
  check_plan(sigmas, "exponential_sigmas");
  return sigmas;
}

/// A discrete schedule's noise levels at the `steps` timesteps a spacing picks (timestep_plan), then 0:
/// the plan today's samplers follow, as noise levels. Exactly schedule.sigma(t) at those t; on a
/// zero-terminal-SNR schedule, a plan that visits T-1 (trailing and linspace always; leading only with
/// steps = T) starts at +inf.
///
/// Example:
///   discrete_sigmas(NoiseSchedule(), 5, TimestepSpacing::Trailing);   // sigma(999), sigma(799), ..., sigma(199), 0
inline std::vector<double> discrete_sigmas(const NoiseSchedule& schedule, int64_t steps,
                                           TimestepSpacing spacing = TimestepSpacing::Leading) {
  std::vector<double> sigmas;
  for (const auto t : timestep_plan(schedule.num_timesteps(), steps, spacing)) {
    sigmas.push_back(schedule.host().sigmas[static_cast<size_t>(t)]);
  }
  sigmas.push_back(0.0);
  check_plan(sigmas, "discrete_sigmas");
  return sigmas;
}

}  // namespace diffusion
