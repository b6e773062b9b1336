#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

/// Which S of the T timesteps a few-step sampler visits.
namespace diffusion {

/// How S of T timestep indices are spread. Each gives S distinct indices in [0, T) for every S in 1..T.
enum class TimestepSpacing {
  /// i * T / S for i = 0 .. S-1 (integer division): 0 is always visited, the largest is T - T/S (DDIM's
  /// original; for T = 1000, S = 50: 980, 960, ..., 0).
  Leading,
  /// round(T (S - i) / S) - 1 for i = 0 .. S-1: T - 1 is always visited, so sampling starts from the
  /// noisiest timestep (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
  /// sec. 3.3; for T = 1000, S = 50: 999, 979, ..., 19).
  Trailing,
  /// round(i (T - 1) / (S - 1)) for i = 0 .. S-1: both ends visited (999, 979, 958, ..., 20, 0). With one
  /// step, just T - 1.
  Linspace,
};

inline std::string_view to_string(TimestepSpacing s) {
  return s == TimestepSpacing::Leading ? "leading" : s == TimestepSpacing::Trailing ? "trailing" : "linspace";
}

/// "leading", "trailing" or "linspace"; anything else is refused, naming it.
inline TimestepSpacing parse_spacing(std::string_view s) {
  if (s == "leading") return TimestepSpacing::Leading;
  if (s == "trailing") return TimestepSpacing::Trailing;
  if (s == "linspace") return TimestepSpacing::Linspace;
  TORCH_CHECK(false, "parse_spacing: expected \"leading\", \"trailing\" or \"linspace\", got \"", std::string(s), "\"");
  return TimestepSpacing::Leading;
}

/// The `steps` timestep indices a sampler visits out of `num_timesteps`, in the order it visits them
/// (descending). Each step goes from one entry to the next, and the last to x_0 (abar = 1): take the
/// previous timestep from this list, never as t - T/S (which is wrong for trailing and linspace). Rounding
/// is half up, in integer arithmetic.
///
/// Example:
///   timestep_plan(1000, 5, TimestepSpacing::Trailing);   // {999, 799, 599, 399, 199}
inline std::vector<int64_t> timestep_plan(int64_t num_timesteps, int64_t steps,
                                          TimestepSpacing spacing = TimestepSpacing::Leading) {
  const int64_t T = num_timesteps, S = steps;
  TORCH_CHECK(T >= 1, "timestep_plan: num_timesteps must be >= 1, got ", T);
  TORCH_CHECK(S >= 1 && S <= T, "timestep_plan: steps must be in [1, ", T, "], got ", S);
  std::vector<int64_t> plan(static_cast<size_t>(S));
  for (int64_t i = 0; i < S; ++i) {
    int64_t t = 0;
    switch (spacing) {
      case TimestepSpacing::Leading: t = (S - 1 - i) * T / S; break;
      case TimestepSpacing::Trailing: t = (2 * T * (S - i) + S) / (2 * S) - 1; break;
      case TimestepSpacing::Linspace:
        t = S == 1 ? T - 1 : (2 * (S - 1 - i) * (T - 1) + (S - 1)) / (2 * (S - 1));
        break;
    }
    plan[static_cast<size_t>(i)] = t;
  }
  return plan;
}

}  // namespace diffusion
