#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/checkpoint.hpp>
#include <diffusion/detail/check.hpp>
#include <diffusion/detail/random.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/image.hpp>
#include <diffusion/progress.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/random.hpp>
#include <diffusion/sampling/ddim.hpp>
#include <diffusion/sampling/ddpm.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/schedule.hpp>

#include <fmt/core.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numbers>
#include <optional>
#include <string>
#include <thread>
#include <vector>

/// Training a backbone with DDPM's objective (Ho et al. 2020, Algorithm 1), the seed's whole job.
namespace diffusion {

/// Picks CUDA when this LibTorch has it and a GPU is present, else the CPU.
inline torch::Device auto_device() { return torch::cuda::is_available() ? torch::kCUDA : torch::kCPU; }

/// Sets LibTorch's CPU intra-op threads to `threads`, or to every core when 0: Debian's LibTorch starts
/// with one, and sampling and training on a CPU then use a single core.
inline void set_threads(int64_t threads = 0) {
  TORCH_CHECK(threads >= 0, "set_threads: threads must be >= 0 (0 = all cores), got ", threads);
  at::set_num_threads(
      static_cast<int>(threads > 0 ? threads : std::max<int64_t>(1, std::thread::hardware_concurrency())));
}

/// How the learning rate moves over a run (after the linear warm-up, if any).
enum class LRSchedule {
  /// lr throughout, as in the seed.
  Constant,
  /// lr * (1 + cos(pi * p)) / 2 where p goes from 0 after warm-up to 1 at the run's last step
  /// (Loshchilov & Hutter 2017, without restarts): large steps early, small ones as the budget ends.
  Cosine,
};

/// Options for a Trainer. The defaults are the seed's: AdamW, lr 1e-3, batch 128, 100 epochs.
///
/// Example:
///   Trainer trainer(ConvNet(), NoiseSchedule(), TrainerOptions().epochs(10).ema_decay(0.999).out_dir("run"));
struct TrainerOptions {
  TORCH_ARG(int64_t, epochs) = 100;
  TORCH_ARG(int64_t, batch_size) = 128;
  /// Split each batch into micro-batches of this size and accumulate their gradients (0: off). With
  /// layers that have no batch statistics (GroupNorm, as in every library backbone) the gradient equals
  /// the whole batch's; the optimizer still steps once per batch. Smaller working sets run faster on a
  /// CPU: measured ~1.27x for the seed's ConvNet at 32 (docs/performance.md). Do not use it with
  /// BatchNorm, whose statistics would then be per micro-batch.
  TORCH_ARG(int64_t, micro_batch) = 0;
  TORCH_ARG(double, lr) = 1e-3;
  /// The learning rate's course over the epochs x steps of the run; Constant is the seed's.
  TORCH_ARG(LRSchedule, lr_schedule) = LRSchedule::Constant;
  /// Raise the learning rate linearly from lr / warmup_steps to lr over this many first steps (0: off).
  TORCH_ARG(int64_t, warmup_steps) = 0;
  /// AdamW's decoupled weight decay; 0.01 is torch.optim.AdamW's default, which the seed uses.
  TORCH_ARG(double, weight_decay) = 0.01;
  /// Weight each image's loss by min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t): "Min-SNR-gamma"
  /// (Hang et al. 2023, eq. 6 rewritten for noise prediction), which down-weights the nearly clean
  /// timesteps whose noise is hardest to see and least useful, so training spends itself on the noisy
  /// ones that decide a sample's shape. The paper uses gamma = 5. 0 turns it off (the seed's plain MSE).
  TORCH_ARG(double, min_snr_gamma) = 0.0;
  /// Clip the global gradient norm to this; 0 turns clipping off.
  TORCH_ARG(double, grad_clip) = 0.0;
  /// Keep an exponential moving average of the weights with this decay (e.g. 0.999); 0 turns it off.
  /// The decay is warmed up: min(ema_decay, (1 + n) / (10 + n)) after n steps. Sampling and the epoch
  /// grids use the EMA weights when it is on.
  TORCH_ARG(double, ema_decay) = 0.0;
  /// Seeds shuffling, timesteps and noise (a private generator, saved in checkpoints).
  TORCH_ARG(uint64_t, seed) = 0;
  /// Where samples/, checkpoints/ and metrics.jsonl go; empty writes nothing.
  TORCH_ARG(std::string, out_dir) = "";
  /// How many checkpoints to keep (the newest).
  TORCH_ARG(int64_t, keep_checkpoints) = 1;
  /// Epochs whose checkpoints are kept besides the newest, e.g. an early one to guide sampling with
  /// (see Guided).
  TORCH_ARG(std::vector<int64_t>, keep_epochs) = std::vector<int64_t>{};
  /// Images in the per-epoch grid (the seed's 25, a 5x5 grid); 0 skips it.
  TORCH_ARG(int64_t, grid_samples) = 25;
  /// Sample the grids with DDIM in this many steps at eta 1 instead of DDPM over all T steps (0, the
  /// seed's). On a CPU the 25-image DDPM grid costs about 20 s an epoch; DDIM 50 a twentieth of it.
  TORCH_ARG(int64_t, grid_ddim_steps) = 0;
  /// Stop each epoch after this many steps (quick runs, smoke tests); 0 runs whole epochs.
  TORCH_ARG(int64_t, max_steps_per_epoch) = 0;
  /// Device; unset picks CUDA when available, else CPU.
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
  /// The backbone's arithmetic in training steps, validation and grids. BFloat16 autocasts the forward
  /// pass (the backward follows it); weights, AdamW, the EMA, the loss and the sampler stay float32.
  /// Measured on an AMX CPU: 1.5x the UNet's and several times the MLPs' float32 throughput, with
  /// the same sample quality within noise (docs/performance.md, docs/results.md).
  TORCH_ARG(Precision, precision) = Precision::Float32;
  /// CPU intra-op threads; 0 uses every core (Debian's LibTorch starts with one).
  TORCH_ARG(int64_t, threads) = 0;
  TORCH_ARG(ProgressMode, progress) = ProgressMode::Auto;
  /// Seconds between progress lines when not on a terminal.
  TORCH_ARG(double, progress_interval) = 10.0;
};

/// What the trainer reports after each optimizer step.
struct StepInfo {
  int64_t epoch, epochs, step, steps, global_step;
  double loss, mean_loss;
  /// The learning rate this step used.
  double lr;
};

/// The learning rate of step `step` (0-based) of a run of `total` steps under `o`'s lr, lr_schedule
/// and warmup_steps.
inline double learning_rate_at(const TrainerOptions& o, int64_t step, int64_t total) {
  const int64_t warmup = o.warmup_steps();
  if (step < warmup) return o.lr() * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (o.lr_schedule() == LRSchedule::Constant) return o.lr();
  const int64_t span = total - warmup - 1;
  const double p = span > 0 ? std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(span)) : 1.0;
  return o.lr() * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
}

/// The Min-SNR-gamma loss weight min(SNR_t, gamma) / SNR_t of each timestep in `t` (Hang et al. 2023,
/// for a noise-predicting model), SNR_t = abar_t / (1 - abar_t), in the schedule's dtype on its device.
/// 1 where SNR_t <= gamma (the noisy timesteps), gamma / SNR_t below; gamma must be > 0.
namespace detail {
/// min_snr_weights without the checks, for the Trainer's own valid timesteps: checking their range
/// reads two values back from the device every step.
inline torch::Tensor min_snr_weights(const NoiseSchedule& schedule, const torch::Tensor& t, double gamma) {
  // From the square-root tables, not abar / (1 - abar): in float32, 1 - abar_1 = 1e-4 keeps only three
  // significant digits, while both square roots are stored to full precision.
  const auto ratio = schedule.sqrt_alphas_cumprod.index_select(0, t) / schedule.sqrt_one_minus_alphas_cumprod.index_select(0, t);
  const auto snr = ratio * ratio;
  return snr.clamp_max(gamma) / snr;
}
}  // namespace detail

inline torch::Tensor min_snr_weights(const NoiseSchedule& schedule, const torch::Tensor& t, double gamma) {
  TORCH_CHECK(gamma > 0, "min_snr_weights: gamma must be > 0, got ", gamma);
  detail::check_timesteps("min_snr_weights", t, t.defined() ? t.numel() : 0, schedule.device(), schedule.timesteps());
  return detail::min_snr_weights(schedule, t, gamma);
}

/// What the trainer reports after each epoch.
struct EpochInfo {
  int64_t epoch, epochs, global_step;
  double train_loss;
  /// NaN when there is no validation set.
  double val_loss;
  /// Time spent in the epoch's training steps, and the images per second they processed.
  double seconds, images_per_second;
  /// Empty when nothing was written.
  std::filesystem::path checkpoint, grid;
};

/// Trains any Backbone with DDPM's simplified objective: for a batch x0, t ~ U{0..T-1}, eps ~ N(0, I),
/// minimize || eps - model(q_sample(x0, t, eps), t) ||^2 (Ho et al. 2020, eq. 14 and Algorithm 1).
///
/// Each epoch shuffles the training set (held in memory as one tensor), steps through it in batches,
/// then computes the validation loss with fixed noise and timesteps (so epochs compare), writes a
/// sample grid, appends a line to metrics.jsonl and saves a checkpoint atomically.
///
/// Example:
///   Trainer trainer(ConvNet(), NoiseSchedule(), TrainerOptions().epochs(5).out_dir("run"));
///   trainer.resume();                        // continues from run/checkpoints if any
///   trainer.fit(train.images, test.images);
template <Backbone B>
class Trainer {
 public:
  Trainer(B model, NoiseSchedule schedule, TrainerOptions options = {})
      : model_(std::move(model)),
        options_(std::move(options)),
        device_(options_.device().value_or(auto_device())),
        schedule_(schedule.to(device_)),
        generator_(make_generator(options_.seed())) {
    const auto& o = options_;
    TORCH_CHECK(o.epochs() >= 1, "Trainer: epochs must be >= 1, got ", o.epochs());
    TORCH_CHECK(o.batch_size() >= 1, "Trainer: batch_size must be >= 1, got ", o.batch_size());
    TORCH_CHECK(o.micro_batch() >= 0, "Trainer: micro_batch must be >= 0 (0 = off), got ", o.micro_batch());
    TORCH_CHECK(o.lr() > 0, "Trainer: lr must be > 0, got ", o.lr());
    TORCH_CHECK(o.warmup_steps() >= 0, "Trainer: warmup_steps must be >= 0 (0 = off), got ", o.warmup_steps());
    TORCH_CHECK(o.weight_decay() >= 0, "Trainer: weight_decay must be >= 0, got ", o.weight_decay());
    TORCH_CHECK(o.min_snr_gamma() >= 0, "Trainer: min_snr_gamma must be >= 0 (0 = off), got ", o.min_snr_gamma());
    TORCH_CHECK(o.grad_clip() >= 0, "Trainer: grad_clip must be >= 0 (0 = off), got ", o.grad_clip());
    TORCH_CHECK(o.ema_decay() >= 0 && o.ema_decay() < 1, "Trainer: ema_decay must be in [0, 1) (0 = off), got ",
                o.ema_decay());
    TORCH_CHECK(o.keep_checkpoints() >= 1, "Trainer: keep_checkpoints must be >= 1, got ", o.keep_checkpoints());
    for (const auto e : o.keep_epochs()) TORCH_CHECK(e >= 1, "Trainer: keep_epochs must hold epochs >= 1, got ", e);
    TORCH_CHECK(o.grid_samples() >= 0, "Trainer: grid_samples must be >= 0, got ", o.grid_samples());
    TORCH_CHECK(o.grid_ddim_steps() >= 0 && o.grid_ddim_steps() <= schedule_.timesteps(),
                "Trainer: grid_ddim_steps must be in [0, ", schedule_.timesteps(), "] (0: DDPM), got ",
                o.grid_ddim_steps());
    TORCH_CHECK(o.max_steps_per_epoch() >= 0, "Trainer: max_steps_per_epoch must be >= 0, got ",
                o.max_steps_per_epoch());
    TORCH_CHECK(o.threads() >= 0, "Trainer: threads must be >= 0 (0 = all cores), got ", o.threads());
    TORCH_CHECK(!device_.is_cuda() || torch::cuda::is_available(), "Trainer: device ", device_,
                " requested but this LibTorch sees no CUDA device");
    set_threads(o.threads());
    unwrap(model_).to(device_);
    optimizer_ = std::make_unique<torch::optim::AdamW>(
        unwrap(model_).parameters(), torch::optim::AdamWOptions(o.lr()).weight_decay(o.weight_decay()));
    if (o.ema_decay() > 0) {
      torch::NoGradGuard no_grad;
      for (const auto& p : unwrap(model_).named_parameters()) ema_.insert(p.key(), p.value().detach().clone());
    }
  }

  /// Trains until `options.epochs()` epochs are done (counting epochs restored by resume()).
  /// `train` and `val` are (N, C, H, W) images in [-1, 1] on the CPU; `val` may be undefined.
  void fit(const torch::Tensor& train, const torch::Tensor& val = {}) {
    check_images("train", train);
    if (val.defined()) check_images("val", val);
    const int64_t n = train.size(0), bs = options_.batch_size();
    int64_t steps = (n + bs - 1) / bs;
    if (options_.max_steps_per_epoch() > 0) steps = std::min(steps, options_.max_steps_per_epoch());
    const auto val_fixed = fixed_validation_draws(val);
    const auto opts = torch::TensorOptions().device(device_);

    while (epoch_ < options_.epochs()) {
      const auto start = std::chrono::steady_clock::now();
      ProgressBar bar(fmt::format("Epoch {}/{}", epoch_ + 1, options_.epochs()), steps, options_.progress(),
                      options_.progress_interval());
      const auto perm = torch::randperm(n, generator_, torch::kLong);
      double total = 0;
      int64_t images = 0;
      unwrap(model_).train();
      for (int64_t step = 0; step < steps; ++step) {
        const auto idx = perm.slice(0, step * bs, std::min(n, (step + 1) * bs));
        const auto x0 = train.index_select(0, idx).to(opts.dtype(schedule_.dtype()));
        const auto t = torch::randint(0, schedule_.timesteps(), {x0.size(0)}, generator_, torch::kLong).to(device_);
        const auto noise = detail::randn(x0.sizes(), x0.options(), generator_);
        // From the global step alone, so a resumed run continues the same curve.
        const double lr = learning_rate_at(options_, global_step_, options_.epochs() * steps);
        for (auto& group : optimizer_->param_groups()) {
          static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
        }
        optimizer_->zero_grad();
        const double l = accumulate_gradients(x0, t, noise);
        if (options_.grad_clip() > 0) torch::nn::utils::clip_grad_norm_(unwrap(model_).parameters(), options_.grad_clip());
        optimizer_->step();
        update_ema();
        ++global_step_;
        total += l;
        images += x0.size(0);
        bar.update(step + 1, total / static_cast<double>(step + 1));
        if (on_step) on_step(StepInfo{epoch_ + 1, options_.epochs(), step + 1, steps, global_step_, l, total / (step + 1), lr});
      }
      bar.finish();
      ++epoch_;
      // Throughput counts the training steps only, not validation, grids or checkpoints.
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EpochInfo info{epoch_, options_.epochs(), global_step_, total / static_cast<double>(steps),
                     val.defined() ? validation_loss(val, val_fixed) : std::nan(""), seconds,
                     static_cast<double>(images) / seconds, {}, {}};
      write_epoch_outputs(info, train);
      if (on_epoch) on_epoch(info);
    }
  }

  /// Loads the newest checkpoint in out_dir/checkpoints, if any. Returns whether one was loaded.
  bool resume() {
    if (options_.out_dir().empty()) return false;
    const auto found = list_checkpoints(checkpoint_dir());
    if (found.empty()) return false;
    load_checkpoint(found.back());
    return true;
  }

  /// Restores model, optimizer, EMA, epoch, step and the random generator from a checkpoint.
  void load_checkpoint(const std::filesystem::path& path) {
    auto archive = detail::open_checkpoint(path);
    auto& module = unwrap(model_);
    if (!ema_.is_empty()) {
      // The EMA weights are stored like a model's: load them through the model, keep a copy.
      TORCH_CHECK(detail::read_value(archive, "has_ema").toBool(), "Trainer: ", path.string(),
                  " has no EMA weights but this trainer keeps an EMA");
      detail::load_module(archive, "ema", module, path);
      torch::NoGradGuard no_grad;
      for (const auto& p : module.named_parameters()) ema_[p.key()].copy_(p.value());
    }
    detail::load_module(archive, "model", module, path);
    torch::serialize::InputArchive optim;
    archive.read("optimizer", optim);
    optimizer_->load(optim);
    // The archive yields the AdamW moments on the CPU; they must live beside the parameters.
    for (auto& [key, state] : optimizer_->state()) {
      auto& adam = static_cast<torch::optim::AdamWParamState&>(*state);
      adam.exp_avg(adam.exp_avg().to(device_));
      adam.exp_avg_sq(adam.exp_avg_sq().to(device_));
      if (adam.max_exp_avg_sq().defined()) adam.max_exp_avg_sq(adam.max_exp_avg_sq().to(device_));
    }
    epoch_ = detail::read_value(archive, "epoch").toInt();
    global_step_ = detail::read_value(archive, "global_step").toInt();
    torch::Tensor rng;
    archive.read("rng", rng);
    generator_.set_state(rng);
  }

  /// Writes model, optimizer, EMA, epoch, step, generator state, schedule and metadata to `path`,
  /// atomically (a crash mid-save leaves the previous file intact).
  void save_checkpoint(const std::filesystem::path& path) {
    torch::serialize::OutputArchive archive;
    archive.write("format", c10::IValue(detail::kCheckpointFormat));
    torch::serialize::OutputArchive model;
    unwrap(model_).save(model);
    archive.write("model", model);
    torch::serialize::OutputArchive optim;
    optimizer_->save(optim);
    archive.write("optimizer", optim);
    archive.write("has_ema", c10::IValue(!ema_.is_empty()));
    if (!ema_.is_empty()) {
      // Stored like a model's weights (same names, same nesting), so load_weights reads either.
      torch::serialize::OutputArchive ema;
      detail::save_module_as(unwrap(model_), ema, [this](const std::string& name, const torch::Tensor&) {
        return ema_[name];
      });
      archive.write("ema", ema);
    }
    archive.write("epoch", c10::IValue(epoch_));
    archive.write("global_step", c10::IValue(global_step_));
    archive.write("rng", generator_.get_state());
    detail::write_schedule(archive, schedule_.options());
    detail::write_metadata(archive, metadata);
    detail::write_metadata(archive, options_as_strings(), "training");
    save_atomically(archive, path);
  }

  /// Samples `shape` images with DDPM (or DDIM at eta 1 when grid_ddim_steps is set: what the grids use),
  /// from the EMA weights when kept.
  torch::Tensor sample(const std::vector<int64_t>& shape, uint64_t seed) {
    WeightSwap swap(*this);
    const auto options = SampleOptions().seed(seed).precision(options_.precision());
    if (options_.grid_ddim_steps() > 0) {
      return diffusion::sample(model_, schedule_, shape, DDIM().steps(options_.grid_ddim_steps()).eta(1.0), options);
    }
    return diffusion::sample(model_, schedule_, shape, DDPM(), options);
  }

  B& model() noexcept { return model_; }
  const NoiseSchedule& schedule() const noexcept { return schedule_; }
  torch::optim::AdamW& optimizer() noexcept { return *optimizer_; }
  const TrainerOptions& options() const noexcept { return options_; }
  torch::Device device() const noexcept { return device_; }
  /// Epochs completed.
  int64_t epoch() const noexcept { return epoch_; }
  int64_t global_step() const noexcept { return global_step_; }
  /// The EMA weights by parameter name (empty when EMA is off).
  const torch::OrderedDict<std::string, torch::Tensor>& ema() const noexcept { return ema_; }

  /// Called after every optimizer step.
  std::function<void(const StepInfo&)> on_step;
  /// Called after every epoch, once its outputs are written.
  std::function<void(const EpochInfo&)> on_epoch;
  /// Strings saved in every checkpoint (read back with read_checkpoint_info).
  std::map<std::string, std::string> metadata;

 private:
  /// Swaps the EMA weights into the model for its lifetime (no-op without EMA).
  struct WeightSwap {
    explicit WeightSwap(Trainer& t) : trainer(t) {
      if (t.ema_.is_empty()) return;
      torch::NoGradGuard no_grad;
      for (auto& p : unwrap(t.model_).named_parameters()) {
        saved.push_back(p.value().detach().clone());
        p.value().copy_(t.ema_[p.key()]);
      }
    }
    ~WeightSwap() {
      if (saved.empty()) return;
      torch::NoGradGuard no_grad;
      size_t i = 0;
      for (auto& p : unwrap(trainer.model_).parameters()) p.copy_(saved[i++]);
    }
    Trainer& trainer;
    std::vector<torch::Tensor> saved;
  };

  /// The options that shape training, recorded in every checkpoint.
  std::map<std::string, std::string> options_as_strings() const {
    const auto& o = options_;
    return {{"epochs", std::to_string(o.epochs())},
            {"batch_size", std::to_string(o.batch_size())},
            {"micro_batch", std::to_string(o.micro_batch())},
            {"lr", fmt::format("{}", o.lr())},
            {"lr_schedule", o.lr_schedule() == LRSchedule::Cosine ? "cosine" : "constant"},
            {"warmup_steps", std::to_string(o.warmup_steps())},
            {"weight_decay", fmt::format("{}", o.weight_decay())},
            {"grad_clip", fmt::format("{}", o.grad_clip())},
            {"min_snr_gamma", fmt::format("{}", o.min_snr_gamma())},
            {"ema_decay", fmt::format("{}", o.ema_decay())},
            {"seed", std::to_string(o.seed())},
            {"max_steps_per_epoch", std::to_string(o.max_steps_per_epoch())},
            {"precision", std::string(to_string(o.precision()))},
            {"device", device_.str()}};
  }

  void check_images(const char* name, const torch::Tensor& x) const {
    TORCH_CHECK(x.defined() && x.dim() == 4 && x.size(0) >= 1 && x.is_floating_point(), "Trainer::fit: ", name,
                " must be a non-empty floating-point (N, C, H, W) tensor, got ",
                x.defined() ? c10::str(x.sizes(), " ", x.scalar_type()) : "an undefined tensor");
  }

  /// Forward and backward of the batch's DDPM loss, in micro-batches when asked: each micro-batch's mean
  /// loss is weighted by its share of the batch, so the summed gradients are the whole batch's mean-loss
  /// gradient. Returns the batch's mean loss.
  double accumulate_gradients(const torch::Tensor& x0, const torch::Tensor& t, const torch::Tensor& noise) {
    const int64_t n = x0.size(0);
    const int64_t m = options_.micro_batch() > 0 ? std::min(options_.micro_batch(), n) : n;
    double total = 0;
    for (int64_t i = 0; i < n; i += m) {
      const int64_t j = std::min(n, i + m);
      const auto xs = x0.slice(0, i, j), ts = t.slice(0, i, j), ns = noise.slice(0, i, j);
      const auto loss = training_loss(predict(q_sample(schedule_, xs, ts, ns), ts), ns, ts);
      const double share = static_cast<double>(j - i) / static_cast<double>(n);
      (m == n ? loss : loss * share).backward();
      total += loss.template item<double>() * share;
    }
    return total;
  }

  /// The objective: mean squared error of the noise (eq. 14), each image's weighted by min_snr_weights
  /// when min_snr_gamma is set.
  torch::Tensor training_loss(const torch::Tensor& pred, const torch::Tensor& noise, const torch::Tensor& t) const {
    if (options_.min_snr_gamma() <= 0) return torch::mse_loss(pred, noise);
    const auto per_image = (pred - noise).pow(2).flatten(1).mean(1);
    return (per_image * detail::min_snr_weights(schedule_, t, options_.min_snr_gamma())).mean();
  }

  /// The model's noise prediction in x_t's dtype, autocast under Precision::BFloat16 (the backward
  /// replays the same casts, so it runs in bf16 too).
  torch::Tensor predict(const torch::Tensor& x_t, const torch::Tensor& t) {
    return detail::forward_in(options_.precision(), model_, x_t, t);
  }

  /// EMA update: shadow <- d shadow + (1 - d) param, with the decay warmed up as
  /// d = min(ema_decay, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage with
  /// num_updates). Without it a short run's average is still mostly the random initial weights:
  /// 0.999^469 = 0.63 after one MNIST epoch.
  void update_ema() {
    if (ema_.is_empty()) return;
    torch::NoGradGuard no_grad;
    const auto n = static_cast<double>(global_step_);
    const double d = std::min(options_.ema_decay(), (1 + n) / (10 + n));
    for (const auto& p : unwrap(model_).named_parameters()) ema_[p.key()].mul_(d).add_(p.value().detach(), 1 - d);
  }

  /// One timestep and one noise tensor per validation image, from a generator of their own: the same
  /// every epoch and after a resume, and independent of the training draws.
  std::pair<torch::Tensor, torch::Tensor> fixed_validation_draws(const torch::Tensor& val) const {
    if (!val.defined()) return {};
    auto gen = make_generator(options_.seed() ^ 0x9E3779B97F4A7C15ULL);
    auto t = torch::randint(0, schedule_.timesteps(), {val.size(0)}, gen, torch::kLong);
    auto noise = torch::randn(val.sizes(), gen, torch::TensorOptions().dtype(schedule_.dtype()));
    return {t, noise};
  }

  double validation_loss(const torch::Tensor& val, const std::pair<torch::Tensor, torch::Tensor>& fixed) {
    detail::EvalModeGuard eval(unwrap(model_));
    c10::InferenceMode no_autograd;
    double sum = 0;
    const int64_t n = val.size(0), bs = options_.batch_size();
    for (int64_t i = 0; i < n; i += bs) {
      const auto j = std::min(n, i + bs);
      const auto x0 = val.slice(0, i, j).to(device_, schedule_.dtype());
      const auto t = fixed.first.slice(0, i, j).to(device_);
      const auto noise = fixed.second.slice(0, i, j).to(device_);
      const auto pred = predict(q_sample(schedule_, x0, t, noise), t);
      sum += torch::mse_loss(pred, noise, torch::Reduction::Sum).template item<double>();
    }
    return sum / static_cast<double>(val.numel());
  }

  std::filesystem::path checkpoint_dir() const { return std::filesystem::path(options_.out_dir()) / "checkpoints"; }

  void write_epoch_outputs(EpochInfo& info, const torch::Tensor& train) {
    if (options_.out_dir().empty()) return;
    const std::filesystem::path out(options_.out_dir());
    if (options_.grid_samples() > 0) {
      auto shape = train.sizes().vec();
      shape[0] = options_.grid_samples();
      // A fixed seed: the grids of successive epochs show the same starting noise.
      const auto images = sample(shape, options_.seed() + 1);
      const auto nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(options_.grid_samples()))));
      info.grid = out / "samples" / fmt::format("epoch_{:03d}.png", epoch_);
      write_png(info.grid, make_grid(to_unit_range(images), nrow, 2));
    }
    info.checkpoint = checkpoint_dir() / checkpoint_filename(epoch_);
    save_checkpoint(info.checkpoint);
    const auto existing = list_checkpoints(checkpoint_dir());
    const auto keep = static_cast<size_t>(options_.keep_checkpoints());
    const auto& pinned = options_.keep_epochs();
    for (size_t i = 0; i + keep < existing.size(); ++i) {
      const bool is_pinned = std::any_of(pinned.begin(), pinned.end(), [&](int64_t e) {
        return existing[i].filename() == checkpoint_filename(e);
      });
      if (!is_pinned) std::filesystem::remove(existing[i]);
    }
    std::ofstream metrics(out / "metrics.jsonl", std::ios::app);
    metrics << fmt::format(
        "{{\"epoch\": {}, \"step\": {}, \"train_loss\": {:.6f}, \"val_loss\": {}, \"seconds\": {:.3f}, "
        "\"images_per_second\": {:.2f}}}\n",
        info.epoch, info.global_step, info.train_loss,
        std::isnan(info.val_loss) ? std::string("null") : fmt::format("{:.6f}", info.val_loss), info.seconds,
        info.images_per_second);
  }

  B model_;
  TrainerOptions options_;
  torch::Device device_;
  NoiseSchedule schedule_;
  torch::Generator generator_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  torch::OrderedDict<std::string, torch::Tensor> ema_;
  int64_t epoch_ = 0;
  int64_t global_step_ = 0;
};

}  // namespace diffusion
