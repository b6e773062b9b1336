#pragma once

#include <diffusion/detail/json.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/progress.hpp>
#include <diffusion/training/loss.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <optional>
#include <string>
#include <string_view>

/// The Trainer's options, grouped by concern, and the learning-rate course.
namespace diffusion {

/// How the learning rate moves over a run (after the linear warm-up, if any).
enum class LRSchedule {
  /// lr throughout, as in the seed.
  Constant,
  /// lr * (1 + cos(pi * p)) / 2 where p goes from 0 after warm-up to 1 at the run's last step
  /// (Loshchilov & Hutter 2017, without restarts): large steps early, small ones as the budget ends.
  Cosine,
};

inline std::string_view to_string(LRSchedule s) { return s == LRSchedule::Cosine ? "cosine" : "constant"; }

/// "constant" or "cosine"; anything else is refused, naming it.
inline LRSchedule parse_lr_schedule(std::string_view s) {
  if (s == "constant") return LRSchedule::Constant;
  if (s == "cosine") return LRSchedule::Cosine;
  TORCH_CHECK(false, "parse_lr_schedule: expected \"constant\" or \"cosine\", got \"", std::string(s), "\"");
  return LRSchedule::Constant;
}

/// How the weights are updated. The defaults are the seed's: AdamW, lr 1e-3, weight decay 0.01, constant.
///
/// Example:
///   OptimizationOptions().lr(2e-3).lr_schedule(LRSchedule::Cosine).warmup_steps(200)
struct OptimizationOptions {
  /// The learning rate (the peak, with a schedule). Applied to any optimizer's parameter groups each step.
  TORCH_ARG(double, lr) = 1e-3;
  /// The default AdamW's decoupled weight decay (torch.optim.AdamW's 0.01, which the seed uses); a
  /// caller's own optimizer keeps its own.
  TORCH_ARG(double, weight_decay) = 0.01;
  TORCH_ARG(LRSchedule, lr_schedule) = LRSchedule::Constant;
  /// Raise the learning rate linearly from lr / warmup_steps to lr over this many first steps (0: off).
  TORCH_ARG(int64_t, warmup_steps) = 0;
  /// Clip the global gradient norm to this; 0 turns clipping off.
  TORCH_ARG(double, grad_clip) = 0.0;
};

/// The learning rate of a step that begins after `seen` of a run's `total` training examples, counted in
/// units of `batch` examples (the Trainer passes the global batch, batch size x ranks, that the run
/// started with, and keeps it when the run resumes with another). Warm-up raises it linearly over the first
/// warmup_steps x batch examples, reaching lr after them ((seen + batch) / (warmup_steps x batch) of lr);
/// then it stays at lr (Constant) or follows a half cosine from lr to 0 (Cosine) at the fraction
/// p = (seen - warmup) / (total - warmup - batch), at most 1: 0 at the run's last step. Counting in
/// examples in a fixed unit keeps the schedule where it was when a run resumes with another batch size or
/// number of ranks (EDM2, Karras et al. 2024, counts its schedule in images too); for a run of full
/// batches of `batch` it is the schedule in steps exactly. After a resume with a larger batch the last
/// step may start short of p = 1 and its learning rate be near 0 rather than 0.
inline double learning_rate_at_example(const OptimizationOptions& o, int64_t seen, int64_t batch, int64_t total) {
  const int64_t warmup = o.warmup_steps() * batch;
  if (seen < warmup) return o.lr() * static_cast<double>(seen + batch) / static_cast<double>(warmup);
  if (o.lr_schedule() == LRSchedule::Constant) return o.lr();
  const int64_t span = total - warmup - batch;
  const double p = span > 0 ? std::min(1.0, static_cast<double>(seen - warmup) / static_cast<double>(span)) : 1.0;
  return o.lr() * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
}

/// The learning rate of step `step` (0-based) of a run of `total` steps: learning_rate_at_example with
/// one example per step.
inline double learning_rate_at(const OptimizationOptions& o, int64_t step, int64_t total) {
  return learning_rate_at_example(o, step, 1, total);
}

/// Options for a Trainer. The defaults are the seed's: epsilon prediction, plain MSE, AdamW lr 1e-3,
/// batch 128, 100 epochs.
///
/// Example:
///   TrainerOptions()
///       .epochs(8).batch_size(64)
///       .loss(LossOptions().prediction(Prediction::V).min_snr_gamma(5).precision(Precision::BFloat16))
///       .optimization(OptimizationOptions().lr(2e-3).lr_schedule(LRSchedule::Cosine).warmup_steps(200))
///       .ema_decay(0.999);
struct TrainerOptions {
  // The loop.
  TORCH_ARG(int64_t, epochs) = 100;
  TORCH_ARG(int64_t, batch_size) = 128;
  /// Split each batch into micro-batches of this size and accumulate their gradients (0: off). With
  /// layers that have no batch statistics (GroupNorm, as in every library backbone) the gradient equals
  /// the whole batch's; the optimizer still steps once per batch. Do not use it with BatchNorm.
  TORCH_ARG(int64_t, micro_batch) = 0;
  /// Stop each epoch after this many steps (quick runs, smoke tests); 0 runs whole epochs.
  TORCH_ARG(int64_t, max_steps_per_epoch) = 0;
  /// Seeds shuffling, timesteps and noise (a private generator, saved in checkpoints).
  TORCH_ARG(uint64_t, seed) = 0;
  // What is learned: the prediction type, the loss weighting and the backbone's arithmetic.
  TORCH_ARG(LossOptions, loss) = LossOptions();
  // How the weights move.
  TORCH_ARG(OptimizationOptions, optimization) = OptimizationOptions();
  /// With class labels (Trainer::fit's labels): the share of each batch's labels replaced by null_class, so
  /// that one model learns the conditional and the unconditional prediction that classifier-free guidance
  /// needs (Ho & Salimans 2022 use 0.1 to 0.2). 0 trains the conditional prediction only.
  TORCH_ARG(double, cond_dropout) = 0.1;
  /// Keep an exponential moving average of the weights with this decay (e.g. 0.999; see EMA); 0: off.
  /// Sampling from the trainer (and the run outputs' grids) uses the average.
  TORCH_ARG(double, ema_decay) = 0.0;
  /// A non-finite loss or gradient stops the run with an error naming the epoch, step and value; with
  /// N > 0 up to N such steps are skipped first (no update: common practice in mixed precision) and
  /// counted in the metrics. N > 0 reads a flag back from the device every step.
  TORCH_ARG(int64_t, skip_nonfinite) = 0;
  /// Device; unset picks CUDA when available, else the CPU.
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
  // Reporting.
  TORCH_ARG(ProgressMode, progress) = ProgressMode::Auto;
  /// Seconds between progress lines when not on a terminal.
  TORCH_ARG(double, progress_interval) = 10.0;
};

namespace detail {
/// The key of TrainerOptions::batch_size in its JSON (RunLayout reads it back).
inline constexpr const char* batch_size_key = "batch_size";
}  // namespace detail

/// TrainerOptions as JSON, as checkpoints record them (the device apart: it is where the run was, not
/// what it is).
inline void to_json(nlohmann::json& j, const TrainerOptions& o) {
  const auto& l = o.loss();
  const auto& u = o.optimization();
  j = {{"epochs", o.epochs()},
       {detail::batch_size_key, o.batch_size()},
       {"micro_batch", o.micro_batch()},
       {"max_steps_per_epoch", o.max_steps_per_epoch()},
       {"seed", o.seed()},
       {"loss", {{"prediction", to_string(l.prediction())}, {"min_snr_gamma", l.min_snr_gamma()},
                 {"precision", to_string(l.precision())}}},
       {"optimization", {{"lr", u.lr()}, {"weight_decay", u.weight_decay()}, {"lr_schedule", to_string(u.lr_schedule())},
                         {"warmup_steps", u.warmup_steps()}, {"grad_clip", u.grad_clip()}}},
       {"ema_decay", o.ema_decay()},
       {"cond_dropout", o.cond_dropout()},
       {"skip_nonfinite", o.skip_nonfinite()}};
}

}  // namespace diffusion
