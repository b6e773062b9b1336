#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/checkpoint.hpp>
#include <diffusion/data/dataset.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/random.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/schedule.hpp>
#include <diffusion/training/collective.hpp>
#include <diffusion/training/ema.hpp>
#include <diffusion/training/loss.hpp>
#include <diffusion/training/objective.hpp>
#include <diffusion/training/options.hpp>

#include <nlohmann/json.hpp>

#include <torch/torch.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

/// The Trainer's internals: option and input checks, what a resume must match, the default optimizer,
/// the epoch's shuffle and its labels, gradients (micro-batched, averaged over ranks), the validation
/// loss, gradient clipping and the guard against non-finite values.
namespace diffusion::detail {

inline void check_trainer_options(const TrainerOptions& o) {
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
}

/// Examples (N, ...): images (N, C, H, W), sequences (N, C, L), vectors (N, D).
inline void check_images(const char* name, const torch::Tensor& x) {
  TORCH_CHECK(x.defined() && x.dim() >= 2 && x.size(0) >= 1 && x.numel() >= 1 && x.is_floating_point(), "Trainer::fit: ", name,
              " must be a non-empty floating-point (N, ...) tensor (images (N, C, H, W), sequences (N, C, L), vectors "
              "(N, D)), got ", x.defined() ? c10::str(x.sizes(), " ", x.scalar_type()) : "an undefined tensor");
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

/// Rank `rank`'s share of `order` for `world` ranks (PyTorch's DistributedSampler): `order` padded to a
/// multiple of `world` with the first entries of `wrap` (undefined: of `order` itself, repeated as often as
/// needed), then every world-th entry from `rank` on. With one rank, `order` itself.
inline torch::Tensor shard(const torch::Tensor& order, int64_t world, int64_t rank, const torch::Tensor& wrap = {}) {
  if (world == 1) return order;
  const auto& source = wrap.defined() ? wrap : order;
  const int64_t total = (order.size(0) + world - 1) / world * world;
  auto padded = order;
  while (padded.size(0) < total) padded = torch::cat({padded, source.slice(0, 0, total - padded.size(0))});
  return padded.slice(0, rank, total, world);
}

/// Rank `rank`'s rows of a global batch that `world` ranks share: every world-th row from `rank` on.
inline torch::Tensor take_share(const torch::Tensor& global, int64_t world, int64_t rank) {
  return world == 1 ? global : global.slice(0, rank, global.size(0), world);
}

/// Trainer::fit's tensors: images, their labels (for a model that takes them), validation alike (the rest is
/// check_fit_dataset's).
template <Backbone B>
void check_fit_inputs(const torch::Tensor& train, const torch::Tensor& val, const torch::Tensor& train_labels,
                      const torch::Tensor& val_labels, B& model) {
  check_images("train", train);
  if (val.defined()) check_images("val", val);
  check_labels("train", train_labels, train);
  check_labels("val", val_labels, val);
  TORCH_CHECK(!val_labels.defined() || train_labels.defined(), "Trainer::fit: validation labels without training labels");
  TORCH_CHECK(!train_labels.defined() || takes_class_labels(model), "Trainer::fit: labels given for a backbone that "
              "takes none (num_classes 0, or not a ConditionalBackbone)");
}

/// A validation set read whole, without augmentation: its examples, and its labels when `use_labels`
/// (both undefined without a set).
inline std::pair<torch::Tensor, torch::Tensor> whole_validation_set(const data::Dataset* val, bool use_labels) {
  if (val == nullptr) return {};
  const auto all = torch::arange(val->size(), torch::kLong);
  return {val->batch(all, std::nullopt), use_labels ? val->labels(all) : torch::Tensor()};
}

/// Trainer::fit's dataset: examples of one shape (images (C, H, W), sequences (C, L), vectors (D)), and
/// validation examples of the same shape with labels when the training uses them.
inline void check_fit_dataset(const data::Dataset& train, const torch::Tensor& val, const torch::Tensor& val_labels,
                              bool use_labels) {
  const auto shape = train.shape();
  TORCH_CHECK(train.size() >= 1 && !shape.empty() && std::all_of(shape.begin(), shape.end(), [](int64_t d) { return d >= 1; }),
              "Trainer::fit: the training set must hold examples of at least one value (images (C, H, W), sequences "
              "(C, L), vectors (D)), got ", train.size(), " examples of shape ", c10::IntArrayRef(shape));
  if (!val.defined()) return;
  check_images("val", val);
  TORCH_CHECK(val.sizes().slice(1) == c10::IntArrayRef(shape), "Trainer::fit: validation images are ",
              val.sizes().slice(1), ", training images ", c10::IntArrayRef(shape));
  TORCH_CHECK(!use_labels || val_labels.defined(), "Trainer::fit: training labels but no validation labels: give the "
              "validation images' classes too (validation scores the class-conditional prediction)");
  check_labels("val", val_labels, val);
}

/// A resumed run trains on examples of the shape its checkpoint recorded (none recorded: any), and one
/// resumed mid-epoch on a training set of the recorded size (its position is one in the epoch's shuffle).
/// The batch size and the number of ranks may change: the position is counted in examples. `recorded` is
/// the layout `p` recorded (RunLayout::read(p.training)).
inline void check_resumed_layout(const TrainingProgress& p, const RunLayout& recorded, const std::vector<int64_t>& shape,
                                 int64_t train_size) {
  DIFFUSION_CHECK(IncompatibleFileError, recorded.data_shape.empty() || recorded.data_shape == shape,
                  "Trainer::fit: the checkpoint was trained on examples of shape ", c10::IntArrayRef(recorded.data_shape),
                  ", this training set's are ", c10::IntArrayRef(shape), "; resume with the same data, or start a new run");
  DIFFUSION_CHECK(IncompatibleFileError, p.step_in_epoch == 0 || recorded.train_size < 0 || recorded.train_size == train_size,
                  "Trainer::fit: the checkpoint stopped mid-epoch in a training set of ", recorded.train_size,
                  " examples, but this one has ", train_size, "; resume with the same data, or from an epoch's end");
}

/// The epoch's shuffle of `n` images, drawn from the generator's state at the epoch's start (kept in
/// `epoch_state`): a run resumed mid-epoch draws the same one, then continues from where its generator was.
inline torch::Tensor epoch_permutation(int64_t n, torch::Generator& generator, torch::Tensor& epoch_state,
                                       bool mid_epoch) {
  if (!mid_epoch) epoch_state = generator.get_state();
  const auto now = generator.get_state();
  generator.set_state(epoch_state);
  auto perm = torch::randperm(n, generator, torch::kLong);
  if (mid_epoch) generator.set_state(now);
  return perm;
}

/// A batch's labels on `device`, each dropped to null_class with probability `dropout` (drawn from
/// `generator` for the whole global batch of `world` ranks, and only when there are labels; rank `rank`
/// takes its share).
inline torch::Tensor batch_labels(const torch::Tensor& labels, double dropout, torch::Generator& generator, int64_t world,
                                  int64_t rank, torch::Device device) {
  if (!labels.defined()) return {};
  auto cond = labels.to(torch::kLong);
  if (dropout > 0) {
    const auto drop = take_share(torch::rand({cond.size(0) * world}, generator), world, rank) < dropout;
    cond = torch::where(drop, torch::full_like(cond, null_class), cond);
  }
  return cond.to(device);
}

/// How an epoch of `n` examples is dealt out to the ranks of `group` (none: one process) in batches of
/// `batch` per rank, from position `from` of its shuffle on (0, or where a resumed run stopped): the epoch
/// covers positions [0, end) of the shuffle (end = n, or max_steps global batches when that is > 0 and
/// fewer); positions [from, end) are padded by wrapping around to the shuffle's start up to a multiple of
/// the ranks and dealt out in turn (shard), and `steps` batches take each rank's share. Because every
/// global batch before the last is full, a pass from `from` = k x batch x world deals out exactly the
/// batches k, k+1, ... of the pass from 0, whatever the layout that took the first k.
struct EpochLayout {
  int64_t world, rank, n, batch, end, from, per_rank, steps;

  EpochLayout(int64_t world_size, int64_t rank_index, int64_t n_examples, int64_t batch_size, int64_t max_steps,
              int64_t from_position = 0)
      : world(world_size), rank(rank_index), n(n_examples), batch(batch_size),
        end(max_steps > 0 ? std::min(n, max_steps * batch * world) : n), from(std::min(from_position, end)),
        per_rank((end - from + world - 1) / world), steps((per_rank + batch - 1) / batch) {}

  /// This rank's share of the epoch's shuffle `perm` from position `from`, wrapping to the shuffle's start.
  torch::Tensor share(const torch::Tensor& perm) const { return shard(perm.slice(0, from, end), world, rank, perm); }
  /// The indices of step `step`'s batch in this rank's share.
  torch::Tensor batch_indices(const torch::Tensor& share, int64_t step) const {
    return share.slice(0, step * batch, std::min(per_rank, (step + 1) * batch));
  }
  /// The examples all ranks take in step `step` (the last may be short, its wrap-around counted).
  int64_t examples_in_step(int64_t step) const { return world * (std::min(per_rank, (step + 1) * batch) - step * batch); }
  /// The examples all ranks take in the steps from `from` to the epoch's end.
  int64_t examples_left() const { return world * per_rank; }
  /// The global batch: examples per full step.
  int64_t global_batch() const { return batch * world; }
};

/// The progress counted in examples of a checkpoint written before they were recorded, from the layout it
/// recorded (its batch size, or this run's when none was recorded): each epoch one pass of that layout,
/// the epoch in progress step_in_epoch full global batches. `recorded` is the layout `p` recorded.
inline void derive_examples(TrainingProgress& p, const RunLayout& recorded, int64_t n, int64_t batch, int64_t max_steps) {
  const int64_t old_batch = recorded.batch_size > 0 ? recorded.batch_size : batch, old_world = recorded.world_size;
  if (p.images_in_epoch < 0) p.images_in_epoch = p.step_in_epoch * old_batch * old_world;
  if (p.images_seen < 0) p.images_seen = p.epoch * EpochLayout(old_world, 0, n, old_batch, max_steps).examples_left() + p.images_in_epoch;
}

/// One step's batch on `device`: the images `idx`, and this rank's share of the timesteps, noise and
/// labels (batch_labels) drawn from `generator` for the whole global batch, so that every rank draws alike
/// and the ranks' shares together are the single-process batch.
struct Batch {
  torch::Tensor x0, t, noise, cond;
};
inline Batch draw_batch(const data::Dataset& dataset, bool use_labels, const torch::Tensor& idx,
                        const data::AugmentationDraw& augmentation, const Objective& objective, double dropout,
                        torch::Generator& generator, const EpochLayout& layout, torch::Device device) {
  const auto [world, rank] = std::pair(layout.world, layout.rank);
  auto x0 = dataset.batch(idx, augmentation);
  TORCH_CHECK(x0.defined() && x0.dim() >= 1 && x0.size(0) == idx.size(0), "Trainer::fit: the dataset returned ",
              x0.defined() ? c10::str(x0.sizes()) : "an undefined tensor", " for a batch of ", idx.size(0), " examples");
  x0 = x0.to(device, objective.dtype());
  auto global_shape = x0.sizes().vec();
  global_shape[0] *= world;
  auto t = take_share(objective.draw_levels(global_shape[0], generator), world, rank);
  auto noise = take_share(detail::randn(global_shape, x0.options(), generator), world, rank).contiguous();
  auto cond = batch_labels(use_labels ? dataset.labels(idx) : torch::Tensor(), dropout, generator, world, rank, device);
  return {std::move(x0), t.to(device), std::move(noise), std::move(cond)};
}

/// The network for one (micro-)batch's labels (undefined: unconditional).
using NetworkFor = std::function<NetworkCall(const torch::Tensor& cond)>;

/// Forward and backward of the batch's mean loss, in micro-batches of `micro_batch` (0: one), each
/// micro-batch's mean weighted by its share so that the gradients sum to the batch's. Returns the batch's
/// mean loss (0-d, float64).
inline torch::Tensor accumulate_gradients(const Objective& objective, const NetworkFor& network, const torch::Tensor& x0,
                                          const torch::Tensor& t, const torch::Tensor& noise, const torch::Tensor& cond,
                                          int64_t micro_batch) {
  const int64_t n = x0.size(0);
  const int64_t m = micro_batch > 0 ? std::min(micro_batch, n) : n;
  torch::Tensor total;
  for (int64_t i = 0; i < n; i += m) {
    const int64_t j = std::min(n, i + m);
    const auto loss = objective.per_sample(network(cond.defined() ? cond.slice(0, i, j) : cond), x0.slice(0, i, j),
                                           t.slice(0, i, j), noise.slice(0, i, j), true).mean() *
                      (static_cast<double>(j - i) / static_cast<double>(n));
    loss.backward();
    total = total.defined() ? total + loss.detach() : loss.detach();
  }
  return total.to(torch::kFloat64);
}

/// The mean validation loss (the objective's unweighted form: for the discrete schedule the MSE of the
/// prediction's target) over `all_val` with its fixed draws (fixed_validation_draws), in batches of
/// `batch`. With a `group`, each rank scores every W-th image and the sums are added up over the ranks.
inline double validation_loss(torch::nn::Module& model, const Objective& objective, const NetworkFor& network,
                              const torch::Tensor& all_val, const torch::Tensor& all_labels,
                              const std::pair<torch::Tensor, torch::Tensor>& all_draws, int64_t batch,
                              torch::Device device, Collective* group) {
  const int64_t W = group ? group->world_size() : 1, rank = group ? group->rank() : 0;
  const auto val = take_share(all_val, W, rank);
  const auto labels = all_labels.defined() ? take_share(all_labels, W, rank) : all_labels;
  const auto t = take_share(all_draws.first, W, rank), noise = take_share(all_draws.second, W, rank);
  EvalModeGuard eval(model);
  c10::InferenceMode no_autograd;
  auto sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat64).device(device));
  for (int64_t i = 0; i < val.size(0); i += batch) {
    const auto j = std::min(val.size(0), i + batch);
    const auto cond = labels.defined() ? labels.slice(0, i, j).to(device, torch::kLong) : labels;
    sum += objective.per_sample(network(cond), val.slice(0, i, j).to(device, objective.dtype()), t.slice(0, i, j).to(device),
                                noise.slice(0, i, j).to(device), false)
               .to(torch::kFloat64)
               .sum();
  }
  if (group) {
    std::vector<torch::Tensor> total{sum};
    group->all_reduce_sum(total);
  }
  return sum.item<double>() / static_cast<double>(all_val.size(0));
}

/// Rank 0's weights, buffers and EMA copied to every rank of `group`.
inline void broadcast_from_rank0(Collective& group, torch::nn::Module& model, const EMA* ema) {
  std::vector<torch::Tensor> state;
  torch::NoGradGuard no_grad;
  for (auto& p : model.parameters()) state.push_back(p.data());
  for (auto& b : model.buffers()) state.push_back(b);
  if (ema) {
    for (const auto& p : ema->shadow()) state.push_back(p.value());
  }
  group.broadcast(state, 0);
}

/// Averages `model`'s gradients and `loss` over the ranks of `group` (flattened buckets); returns the
/// mean loss and whether any rank passed `stop`, so that all stop at the same step.
inline std::pair<torch::Tensor, bool> average_over_ranks(Collective& group, torch::nn::Module& model,
                                                          const torch::Tensor& loss, bool stop) {
  std::vector<torch::Tensor> tensors;
  for (auto& p : model.parameters()) {
    if (p.grad().defined()) tensors.push_back(p.mutable_grad());
  }
  auto shared = torch::stack({loss.to(torch::kFloat64), torch::full({}, stop ? 1.0 : 0.0, loss.options().dtype(torch::kFloat64))});
  tensors.push_back(shared);
  all_reduce_mean(group, tensors);
  return {shared[0], shared[1].item<double>() > 0};
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

/// One timestep and one noise tensor per validation image, from a generator of their own: the same
/// every epoch and after a resume, and independent of the training draws.
inline std::pair<torch::Tensor, torch::Tensor> fixed_validation_draws(const torch::Tensor& val, const Objective& objective,
                                                                      uint64_t seed) {
  if (!val.defined()) return {};
  auto gen = make_generator(seed ^ 0x9E3779B97F4A7C15ULL);
  auto t = objective.draw_levels(val.size(0), gen);
  auto noise = torch::randn(val.sizes(), gen, torch::TensorOptions().dtype(objective.dtype()));
  return {t, noise};
}

/// What can make a training step non-finite, for the NaN guard's message: a diverging run, or a platform
/// that computes wrong results, with what the CPU convolution self-check found (check_cpu_convolutions).
inline std::string nonfinite_causes(bool on_cpu) {
  std::string platform;
  if (!on_cpu) {
    platform = "a wrong kernel in the device's libraries can do the same";
  } else if (const auto c = check_cpu_convolutions(); !c.ran) {
    platform = "the CPU convolution self-check was turned off (DIFFUSION_CPU_CONV_CHECK=off), so a platform fault is not ruled out";
  } else if (c.healthy) {
    platform = "this CPU's convolutions passed the library's self-check, so a fault there is unlikely";
  } else if (c.fixed) {
    platform = "this CPU's oneDNN convolutions failed the self-check (" + c.fault +
               ") and were turned off, after which they agreed with the reference";
  } else {
    platform = "this CPU computes wrong convolutions even with oneDNN off (" + c.fault + "): that is the likely cause";
  }
  return "Either the run diverged (lower the learning rate, clip gradients (grad_clip), or allow skipping a few such "
         "steps (skip_nonfinite)) or the platform computes wrong results: " + platform + " (docs/platforms.md)";
}

/// Watches each step's loss and gradient norm for non-finite values. On the CPU (where reading a value
/// costs nothing), or when steps may be skipped, it reads a flag every step and decides at once. On a GPU
/// without skipping it keeps the first bad step on the device and verify() reads it (at epoch ends and
/// before any checkpoint): the step never waits for the host, and the error still names the step.
class NonFiniteGuard {
 public:
  /// `steps_per_epoch` turns a global step back into (epoch, step) for the message.
  NonFiniteGuard(const torch::Device& device, int64_t skip_budget, int64_t steps_per_epoch)
      : on_cpu_(device.is_cpu()), immediate_(on_cpu_ || skip_budget > 0), budget_(skip_budget), steps_per_epoch_(steps_per_epoch) {}

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
                "); stopped before writing anything from it. ", nonfinite_causes(on_cpu_));
    std::abort();  // not reached: TORCH_CHECK(false) throws
  }

  bool on_cpu_, immediate_;
  int64_t budget_, steps_per_epoch_, skipped_ = 0;
  torch::Tensor first_bad_, bad_loss_;
};

}  // namespace diffusion::detail
