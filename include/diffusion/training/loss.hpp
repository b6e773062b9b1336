#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/detail/check.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

/// The discrete schedule's loss options and Min-SNR weighting (diffusion_loss and the objectives are in
/// training/objective.hpp).
namespace diffusion {

/// Options for diffusion_loss.
///
/// Example:
///   auto options = LossOptions().prediction(Prediction::V).min_snr_gamma(5).precision(Precision::BFloat16);
struct LossOptions {
  /// What the backbone outputs; the target is training_target's for it.
  TORCH_ARG(Prediction, prediction) = Prediction::Epsilon;
  /// Weight each sample's loss by Min-SNR-gamma (Hang et al. 2023; see min_snr_weights); 0: off (the seed's
  /// plain MSE). The paper uses 5.
  TORCH_ARG(double, min_snr_gamma) = 0.0;
  /// The backbone's arithmetic (BFloat16: autocast the forward pass, so the backward too); the loss itself
  /// is computed in x0's dtype.
  TORCH_ARG(Precision, precision) = Precision::Float32;
};

namespace detail {

inline void check_prediction_fits(const char* fn, const NoiseSchedule& schedule, Prediction prediction) {
  TORCH_CHECK(!(schedule.options().zero_terminal_snr() && prediction == Prediction::Epsilon), fn,
              ": an epsilon prediction cannot be trained for a zero-terminal-SNR schedule (at its last timestep x_t "
              "is pure noise, so the noise says nothing about x_0); use Prediction::V or Prediction::Sample");
}

/// min_snr_weights without the range check (two device reads), for the Trainer's own valid timesteps.
inline torch::Tensor min_snr_weights(const NoiseSchedule& schedule, const torch::Tensor& t, double gamma,
                                     Prediction prediction) {
  // From the square-root tables, not abar / (1 - abar): in float32, 1 - abar_1 = 1e-4 keeps only three
  // significant digits, while both square roots are stored to full precision.
  const auto ratio = schedule.sqrt_alphas_cumprod.index_select(0, t) / schedule.sqrt_one_minus_alphas_cumprod.index_select(0, t);
  const auto snr = ratio * ratio;
  const auto clipped = snr.clamp_max(gamma);
  switch (prediction) {
    // min(SNR, gamma) / SNR, which is 1 up to SNR = gamma: written so that SNR = 0 gives its limit 1.
    case Prediction::Epsilon: return torch::where(snr > gamma, gamma / snr, torch::ones_like(snr));
    case Prediction::V: return clipped / (snr + 1);
    case Prediction::Sample: return clipped;
  }
  return clipped;
}

}  // namespace detail

/// The Min-SNR-gamma loss weight of each timestep in `t` (Hang et al. 2023, "Efficient Diffusion Training
/// via Min-SNR Weighting Strategy", eq. 6 and sec. 3.4), SNR_t = abar_t / (1 - abar_t), for a backbone
/// trained to predict `prediction`: it weights the loss as an x_0 loss weighted by min(SNR_t, gamma) would
/// be, which down-weights the nearly clean timesteps whose targets are hardest to see and least useful.
///   epsilon: min(SNR, gamma) / SNR        (1 where SNR <= gamma, and at SNR = 0)
///   v:       min(SNR, gamma) / (SNR + 1)  (0 at SNR = 0)
///   sample:  min(SNR, gamma)
/// Never NaN, also at a zero-terminal-SNR schedule's last timestep. In the schedule's dtype on its device.
/// Refused: gamma <= 0, t out of [0, T).
inline torch::Tensor min_snr_weights(const NoiseSchedule& schedule, const torch::Tensor& t, double gamma,
                                     Prediction prediction = Prediction::Epsilon) {
  TORCH_CHECK(gamma > 0, "min_snr_weights: gamma must be > 0, got ", gamma);
  detail::check_timesteps("min_snr_weights", t, t.defined() ? t.numel() : 0, schedule.device(), schedule.num_timesteps());
  return detail::min_snr_weights(schedule, t, gamma, prediction);
}

}  // namespace diffusion
