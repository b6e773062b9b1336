#pragma once

#include <diffusion/detail/check.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

/// The forward (noising) process in closed form, and what a network may predict about it.
namespace diffusion {

/// `table[t]`, one entry per sample, shaped (N, 1, ..., 1) to broadcast over `like` (N, ...) and cast to
/// its dtype: Ho et al.'s `extract(a, t, x_shape)`. t holds indices into the table (no range check here;
/// q_sample and the losses check theirs).
///
/// Example:
///   auto x_t = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * eps;
inline torch::Tensor extract(const torch::Tensor& table, const torch::Tensor& t, const torch::Tensor& like) {
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = t.size(0);
  return table.index_select(0, t.to(torch::kLong)).to(like.scalar_type()).reshape(shape);
}

/// Draws x_t ~ q(x_t | x_0) in one step:
///   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)   (Ho et al. 2020, eq. 4)
///
/// x0 is a floating-point batch (N, ...) of any rank on the schedule's device; t holds one integer
/// timestep index in [0, T) per sample. `noise` gives eps explicitly (same shape as x0); when it is
/// undefined, eps is drawn from `generator` if one is given, else from LibTorch's default generator.
/// The schedule's coefficients are cast to x0's dtype.
///
/// Example:
///   NoiseSchedule schedule;
///   auto t = torch::randint(0, schedule.num_timesteps(), {x0.size(0)}, torch::kLong);
///   auto eps = torch::randn_like(x0);
///   auto x_t = q_sample(schedule, x0, t, eps);
inline torch::Tensor q_sample(const NoiseSchedule& schedule, const torch::Tensor& x0, const torch::Tensor& t,
                              const torch::Tensor& noise = {},
                              const std::optional<torch::Generator>& generator = std::nullopt) {
  constexpr const char* fn = "q_sample";
  detail::check_sample_batch(fn, "x0", x0);
  TORCH_CHECK(x0.device() == schedule.device(), fn, ": x0 is on ", x0.device(), " but the schedule is on ",
              schedule.device(), "; move one with .to(device)");
  detail::check_timesteps(fn, t, x0.size(0), x0.device(), schedule.num_timesteps());
  torch::Tensor eps = noise;
  if (eps.defined()) {
    TORCH_CHECK(eps.sizes() == x0.sizes(), fn, ": noise must have x0's shape ", detail::shape_str(x0), ", got ",
                detail::shape_str(eps));
    TORCH_CHECK(eps.device() == x0.device(), fn, ": noise is on ", eps.device(), " but x0 is on ", x0.device());
    TORCH_CHECK(eps.scalar_type() == x0.scalar_type(), fn, ": noise has dtype ", eps.scalar_type(),
                " but x0 has ", x0.scalar_type());
  } else {
    eps = detail::randn(x0.sizes(), x0.options(), generator);
  }
  return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * eps;
}

/// q_sample with eps drawn from `generator`.
inline torch::Tensor q_sample(const NoiseSchedule& schedule, const torch::Tensor& x0, const torch::Tensor& t,
                              const torch::Generator& generator) {
  return q_sample(schedule, x0, t, torch::Tensor{}, generator);
}

/// What a backbone's output stands for. With a = sqrt(abar_t), b = sqrt(1 - abar_t) and
/// x_t = a x_0 + b eps (eq. 4), each determines the other two given x_t.
enum class Prediction {
  /// The noise eps (Ho et al. 2020; the seed's).
  Epsilon,
  /// The velocity v = a eps - b x_0 (Salimans & Ho 2022, sec. 4); x_0 = a x_t - b v, eps = b x_t + a v.
  V,
  /// The clean data x_0 itself ("sample" in diffusers).
  Sample,
};

inline std::string_view to_string(Prediction p) {
  return p == Prediction::Epsilon ? "epsilon" : p == Prediction::V ? "v" : "sample";
}

/// "epsilon" (or "eps"), "v" (or "v_prediction") or "sample" (or "x0"); anything else is refused, naming it.
inline Prediction parse_prediction(std::string_view s) {
  if (s == "epsilon" || s == "eps") return Prediction::Epsilon;
  if (s == "v" || s == "v_prediction") return Prediction::V;
  if (s == "sample" || s == "x0") return Prediction::Sample;
  TORCH_CHECK(false, "parse_prediction: expected \"epsilon\", \"v\" or \"sample\", got \"", std::string(s), "\"");
  return Prediction::Epsilon;
}

/// What a network trained for `prediction` should output for x_t = q_sample(x0, t, noise): noise
/// (epsilon), sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (v; Salimans & Ho 2022, sec. 4) or x0 (sample).
/// The loss target; convert_prediction is its inverse at sampling time. Shapes as q_sample's; t is not range-checked
/// (the loss checks it).
inline torch::Tensor training_target(const NoiseSchedule& schedule, Prediction prediction, const torch::Tensor& x0,
                                     const torch::Tensor& noise, const torch::Tensor& t) {
  switch (prediction) {
    case Prediction::Epsilon: return noise;
    case Prediction::Sample: return x0;
    case Prediction::V: break;
  }
  return extract(schedule.sqrt_alphas_cumprod, t, x0) * noise - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0;
}

/// A prediction at one timestep as both the noise and the clean data it implies, consistent with x_t:
/// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
struct Denoised {
  torch::Tensor eps, x0;
};

/// The noise and clean data that a backbone's `output` at timestep index t (shared by the batch) implies
/// for x_t, for any Prediction; the one conversion every sampler uses. `clip_x0` > 0 clamps x0 to
/// [-clip_x0, clip_x0] and recomputes eps from the clamped x0, so the two stay consistent (data in
/// [-1, 1] never leaves that range, so a model's out-of-range guesses are errors; Ho et al.'s code clamps
/// them). An epsilon prediction at a timestep with abar_t = 0 (a zero-terminal-SNR schedule's last) has
/// no x0: refused.
///
/// Example:
///   auto d = convert_prediction(schedule, x_t, 500, model(x_t, t_batch), Prediction::Epsilon, 1.0);
///   preview(d.x0);
inline Denoised convert_prediction(const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t,
                                   const torch::Tensor& output, Prediction prediction = Prediction::Epsilon,
                                   double clip_x0 = 0.0) {
  constexpr const char* fn = "convert_prediction";
  TORCH_CHECK(t >= 0 && t < schedule.num_timesteps(), fn, ": t must be in [0, ", schedule.num_timesteps(), "), got ", t);
  detail::check_clip_x0(fn, clip_x0);
  TORCH_CHECK(output.defined() && output.sizes() == x_t.sizes(), fn, ": the prediction must have x_t's shape ",
              detail::shape_str(x_t), ", got ", output.defined() ? detail::shape_str(output) : "an undefined tensor");
  const auto i = static_cast<size_t>(t);
  const double a = schedule.host().sqrt_alphas_cumprod[i], b = schedule.host().sqrt_one_minus_alphas_cumprod[i];
  Denoised d;
  switch (prediction) {
    case Prediction::Epsilon:
      TORCH_CHECK(a > 0.0, fn, ": an epsilon prediction at t = ", t,
                  " where abar_t = 0 (zero terminal SNR) determines no x_0; train with v or sample prediction");
      d.eps = output;
      d.x0 = (x_t - output * b) / a;
      break;
    case Prediction::V:
      d.x0 = x_t * a - output * b;
      d.eps = x_t * b + output * a;
      break;
    case Prediction::Sample:
      d.x0 = output;
      d.eps = (x_t - output * a) / b;
      break;
  }
  if (clip_x0 > 0.0) {
    d.x0 = d.x0.clamp(-clip_x0, clip_x0);
    if (b > 0.0) d.eps = (x_t - d.x0 * a) / b;
  }
  return d;
}

/// Deprecated (to be removed after 0.x's next release): the former name of convert_prediction, which
/// converts a prediction rather than denoising anything.
[[deprecated("denoise is now convert_prediction")]] inline Denoised denoise(
    const NoiseSchedule& schedule, const torch::Tensor& x_t, int64_t t, const torch::Tensor& output,
    Prediction prediction = Prediction::Epsilon, double clip_x0 = 0.0) {
  return convert_prediction(schedule, x_t, t, output, prediction, clip_x0);
}

}  // namespace diffusion
