#pragma once

#include <diffusion/random.hpp>
#include <diffusion/schedule.hpp>
#include <diffusion/training/loss.hpp>
#include <diffusion/training/options.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

/// The Trainer's internals: option checks, the default optimizer, gradient clipping and the guard against
/// non-finite values.
namespace diffusion::detail {

inline void check_trainer_options(const TrainerOptions& o, const NoiseSchedule& schedule) {
  const auto& u = o.optimization();
  TORCH_CHECK(o.epochs() >= 1, "Trainer: epochs must be >= 1, got ", o.epochs());
  TORCH_CHECK(o.batch_size() >= 1, "Trainer: batch_size must be >= 1, got ", o.batch_size());
  TORCH_CHECK(o.micro_batch() >= 0, "Trainer: micro_batch must be >= 0 (0 = off), got ", o.micro_batch());
  TORCH_CHECK(o.max_steps_per_epoch() >= 0, "Trainer: max_steps_per_epoch must be >= 0, got ", o.max_steps_per_epoch());
  TORCH_CHECK(u.lr() > 0, "Trainer: lr must be > 0, got ", u.lr());
  TORCH_CHECK(u.warmup_steps() >= 0, "Trainer: warmup_steps must be >= 0 (0 = off), got ", u.warmup_steps());
  TORCH_CHECK(u.weight_decay() >= 0, "Trainer: weight_decay must be >= 0, got ", u.weight_decay());
  TORCH_CHECK(u.grad_clip() >= 0, "Trainer: grad_clip must be >= 0 (0 = off), got ", u.grad_clip());
  TORCH_CHECK(o.loss().min_snr_gamma() >= 0, "Trainer: min_snr_gamma must be >= 0 (0 = off), got ",
              o.loss().min_snr_gamma());
  TORCH_CHECK(o.ema_decay() >= 0 && o.ema_decay() < 1, "Trainer: ema_decay must be in [0, 1) (0 = off), got ",
              o.ema_decay());
  TORCH_CHECK(o.skip_nonfinite() >= 0, "Trainer: skip_nonfinite must be >= 0, got ", o.skip_nonfinite());
  TORCH_CHECK(o.cond_dropout() >= 0 && o.cond_dropout() <= 1, "Trainer: cond_dropout must be in [0, 1], got ",
              o.cond_dropout());
  const auto device = o.device();
  TORCH_CHECK(!device || !device->is_cuda() || torch::cuda::is_available(), "Trainer: device ", device->str(),
              " requested but this LibTorch sees no CUDA device");
  check_prediction_fits("Trainer", schedule, o.loss().prediction());
}

inline void check_images(const char* name, const torch::Tensor& x) {
  TORCH_CHECK(x.defined() && x.dim() == 4 && x.size(0) >= 1 && x.is_floating_point(), "Trainer::fit: ", name,
              " must be a non-empty floating-point (N, C, H, W) tensor, got ",
              x.defined() ? c10::str(x.sizes(), " ", x.scalar_type()) : "an undefined tensor");
}

/// Labels, when given, must be one non-negative integer per image.
inline void check_labels(const char* name, const torch::Tensor& labels, const torch::Tensor& images) {
  if (!labels.defined()) return;
  TORCH_CHECK(images.defined(), "Trainer::fit: ", name, " labels given without their images");
  TORCH_CHECK(!labels.is_floating_point() && labels.scalar_type() != torch::kBool && labels.dim() == 1 &&
                  labels.size(0) == images.size(0),
              "Trainer::fit: ", name, " labels must be 1-D integers, one per image (", images.size(0), "), got ",
              labels.scalar_type(), " of shape ", labels.sizes());
  TORCH_CHECK(labels.min().item<int64_t>() >= 0, "Trainer::fit: ", name, " labels must be >= 0, got ",
              labels.min().item<int64_t>());
}

/// AdamW with the seed's settings (torch.optim.AdamW's betas and eps) at `o`'s lr and weight decay.
inline std::shared_ptr<torch::optim::Optimizer> default_optimizer(torch::nn::Module& model, const OptimizationOptions& o) {
  return std::make_shared<torch::optim::AdamW>(model.parameters(),
                                               torch::optim::AdamWOptions(o.lr()).weight_decay(o.weight_decay()));
}

/// The global gradient norm (0-d, on the device) of `model`'s parameters, after scaling the gradients
/// down to `max_norm` when it is above (0: no clipping). Computed on the device: no wait for the host.
inline torch::Tensor clip_and_norm(torch::nn::Module& model, double max_norm) {
  std::vector<torch::Tensor> norms;
  std::vector<torch::Tensor> grads;
  for (const auto& p : model.parameters()) {
    if (!p.grad().defined()) continue;
    grads.push_back(p.grad());
    norms.push_back(p.grad().detach().to(torch::kFloat32).norm());
  }
  if (norms.empty()) return torch::zeros({});
  const auto total = torch::stack(norms).norm();
  if (max_norm > 0) {
    const auto scale = (max_norm / (total + 1e-6)).clamp_max(1.0);
    for (auto& g : grads) g.mul_(scale.to(g.scalar_type()));
  }
  return total;
}

/// Rank `rank`'s share of a shuffled epoch for `world` ranks (PyTorch's DistributedSampler): the order
/// padded to a multiple of `world` by repeating its start, then every world-th entry from `rank` on. With
/// one rank, the order itself.
inline torch::Tensor shard(const torch::Tensor& order, int64_t world, int64_t rank) {
  if (world == 1) return order;
  const int64_t n = order.size(0), total = (n + world - 1) / world * world;
  auto padded = order;
  while (padded.size(0) < total) padded = torch::cat({padded, order.slice(0, 0, total - padded.size(0))});
  return padded.slice(0, rank, total, world);
}

/// Rank `rank`'s rows of a global batch that `world` ranks share: every world-th row from `rank` on.
inline torch::Tensor take_share(const torch::Tensor& global, int64_t world, int64_t rank) {
  return world == 1 ? global : global.slice(0, rank, global.size(0), world);
}

/// One timestep and one noise tensor per validation image, from a generator of their own: the same
/// every epoch and after a resume, and independent of the training draws.
inline std::pair<torch::Tensor, torch::Tensor> fixed_validation_draws(const torch::Tensor& val, const NoiseSchedule& s,
                                                                      uint64_t seed) {
  if (!val.defined()) return {};
  auto gen = make_generator(seed ^ 0x9E3779B97F4A7C15ULL);
  auto t = torch::randint(0, s.num_timesteps(), {val.size(0)}, gen, torch::kLong);
  auto noise = torch::randn(val.sizes(), gen, torch::TensorOptions().dtype(s.dtype()));
  return {t, noise};
}

/// Watches each step's loss and gradient norm for non-finite values. On the CPU (where reading a value
/// costs nothing), or when steps may be skipped, it reads a flag every step and decides at once. On a GPU
/// without skipping it keeps the first bad step on the device and verify() reads it (at epoch ends and
/// before any checkpoint): the step never waits for the host, and the error still names the step.
class NonFiniteGuard {
 public:
  /// `steps_per_epoch` turns a global step back into (epoch, step) for the message.
  NonFiniteGuard(const torch::Device& device, int64_t skip_budget, int64_t steps_per_epoch)
      : immediate_(device.is_cpu() || skip_budget > 0), budget_(skip_budget), steps_per_epoch_(steps_per_epoch) {}

  /// Returns whether to skip this step's update (global_step is 1-based); throws when the run must stop.
  bool check(const torch::Tensor& loss, const torch::Tensor& grad_norm, int64_t global_step) {
    const auto bad = torch::logical_not(torch::isfinite(loss)) | torch::logical_not(torch::isfinite(grad_norm.to(loss.device())));
    if (immediate_) {
      if (!bad.item<bool>()) return false;
      if (skipped_ < budget_) {
        ++skipped_;
        return true;
      }
      fail(global_step, loss.item<double>(), grad_norm.item<double>());
    }
    if (!first_bad_.defined()) {
      first_bad_ = torch::full({}, -1, torch::TensorOptions().dtype(torch::kLong).device(loss.device()));
      bad_loss_ = torch::zeros({}, loss.options());
    }
    const auto fresh = bad & (first_bad_ < 0);
    first_bad_ = torch::where(fresh, torch::full({}, global_step, first_bad_.options()), first_bad_);
    bad_loss_ = torch::where(fresh, loss.detach(), bad_loss_);
    return false;
  }

  /// Throws if a non-finite step was seen and not yet reported (deferred mode); does nothing otherwise.
  void verify() const {
    if (immediate_ || !first_bad_.defined()) return;
    const auto global = first_bad_.item<int64_t>();
    if (global >= 0) fail(global, bad_loss_.item<double>(), std::nan(""));
  }

  int64_t skipped() const noexcept { return skipped_; }
  void set_skipped(int64_t n) noexcept { skipped_ = n; }

 private:
  [[noreturn]] void fail(int64_t global_step, double loss, double grad_norm) const {
    const int64_t epoch = (global_step - 1) / steps_per_epoch_ + 1, step = (global_step - 1) % steps_per_epoch_ + 1;
    TORCH_CHECK(false, "Trainer: non-finite ", std::isfinite(loss) ? "gradients" : "loss", " at epoch ", epoch, ", step ",
                step, " (global step ", global_step, "; loss ", loss,
                std::isnan(grad_norm) ? std::string() : ", gradient norm " + std::to_string(grad_norm),
                "); stopped before writing anything from it. Lower the learning rate, clip gradients (grad_clip), "
                "or allow skipping a few such steps (skip_nonfinite)");
    std::abort();  // not reached: TORCH_CHECK(false) throws
  }

  bool immediate_;
  int64_t budget_, steps_per_epoch_, skipped_ = 0;
  torch::Tensor first_bad_, bad_loss_;
};

}  // namespace diffusion::detail
