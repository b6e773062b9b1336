#pragma once

#include <diffusion/checkpoint.hpp>
#include <diffusion/training/run_directory.hpp>
#include <diffusion/data/tensor_file.hpp>
#include <diffusion/image.hpp>
#include <diffusion/sampling/ddpm.hpp>
#include <diffusion/sampling/heun.hpp>
#include <diffusion/sampling/sampler.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/training/hooks.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

/// What a training run leaves on disk: sample grids, checkpoints and metrics, written by a hook.
namespace diffusion {

/// Options for RunOutputs.
///
/// Example:
///   RunOutputsOptions("runs/mnist").keep_checkpoints(1).keep_epochs({2}).checkpoint_every_minutes(10)
struct RunOutputsOptions {
  explicit RunOutputsOptions(std::filesystem::path dir) : dir_(std::move(dir)) {}
  /// The run's directory: samples/, checkpoints/ and metrics.jsonl go there.
  TORCH_ARG(std::filesystem::path, dir);
  /// How many checkpoints to keep (the newest).
  TORCH_ARG(int64_t, keep_checkpoints) = 1;
  /// Epochs whose checkpoints are kept besides the newest, e.g. an early one to guide sampling with.
  TORCH_ARG(std::vector<int64_t>, keep_epochs) = std::vector<int64_t>{};
  /// Images in each epoch's grid (the seed's 25, a 5x5 grid); 0 draws none.
  TORCH_ARG(int64_t, grid_samples) = 25;
  /// How the grids of a discrete-schedule run are sampled; unset: DDPM over all T steps (the seed's).
  TORCH_ARG(std::shared_ptr<const SamplingMethod>, grid_sampler) = nullptr;
  /// Or a sampler over noise levels (any formulation; takes precedence over grid_sampler), over the plan
  /// grid_plan makes from the run's formulation (unset: its default plan with 18 steps). A run of a
  /// formulation other than the discrete schedule without one is sampled with Heun over 18 steps of its
  /// default plan (EDM's setting for its grids: 35 model calls).
  TORCH_ARG(std::shared_ptr<const LevelSampler>, grid_level_sampler) = nullptr;
  TORCH_ARG(std::function<std::vector<double>(const Formulation&)>, grid_plan) = nullptr;
  /// The grids' seed: every epoch's grid starts from the same noise, so epochs compare.
  TORCH_ARG(uint64_t, grid_seed) = 1;
  /// For a conditional model: the class of each grid image ((grid_samples,) labels, e.g. one row per
  /// class); undefined draws unconditional grids.
  TORCH_ARG(torch::Tensor, grid_labels) = {};
  /// Also write a checkpoint every this many steps within an epoch (0: off), and/or every this many
  /// minutes (0: off), so that a kill loses at most that much. Resuming from one continues mid-epoch.
  TORCH_ARG(int64_t, checkpoint_every_steps) = 0;
  TORCH_ARG(double, checkpoint_every_minutes) = 0.0;
};

/// The run's files, as a hook: after each epoch a grid samples/epoch_NNN.png (for examples that are not
/// images, the samples as samples/epoch_NNN.npy), a checkpoint
/// checkpoints/checkpoint_epoch_NNN.pt and a line of metrics.jsonl; mid-epoch checkpoints
/// checkpoint_epoch_NNN_step_SSSSSS.pt (NNN epochs done, SSSSSS steps into the next) when asked and when
/// the run is stopped on request. Only the newest keep_checkpoints are kept, plus the pinned epochs; a
/// checkpoint is removed only after a newer one was written.
///
/// It holds a lock on the directory while it lives (flock on DIR/run.lock): a second run into the same
/// directory is refused, and the lock of a crashed run goes with its process.
///
/// Example:
///   auto outputs = std::make_shared<RunOutputs>(RunOutputsOptions("runs/mnist").grid_sampler(make_sampler("ddim")));
///   trainer.add_hook(outputs);
///   if (auto last = outputs->latest_checkpoint()) trainer.load_checkpoint(*last);
class RunOutputs : public TrainerHook {
 public:
  explicit RunOutputs(RunOutputsOptions options) : options_(std::move(options)) {
    const auto& o = options_;
    TORCH_CHECK(!o.dir().empty(), "RunOutputs: dir must not be empty");
    TORCH_CHECK(o.keep_checkpoints() >= 1, "RunOutputs: keep_checkpoints must be >= 1, got ", o.keep_checkpoints());
    for (const auto e : o.keep_epochs()) TORCH_CHECK(e >= 1, "RunOutputs: keep_epochs must hold epochs >= 1, got ", e);
    TORCH_CHECK(o.grid_samples() >= 0, "RunOutputs: grid_samples must be >= 0, got ", o.grid_samples());
    const auto& g = o.grid_labels();
    TORCH_CHECK(!g.defined() || (!g.is_floating_point() && !g.is_complex() && g.scalar_type() != torch::kBool && g.dim() == 1 &&
                                 g.size(0) == o.grid_samples()),
                "RunOutputs: grid_labels must be 1-D integer labels, one per grid image (", o.grid_samples(), "), got ",
                g.defined() ? c10::str(g.scalar_type(), " of shape ", g.sizes()) : std::string());
    TORCH_CHECK(o.checkpoint_every_steps() >= 0, "RunOutputs: checkpoint_every_steps must be >= 0 (0: off), got ",
                o.checkpoint_every_steps());
    TORCH_CHECK(o.checkpoint_every_minutes() >= 0, "RunOutputs: checkpoint_every_minutes must be >= 0 (0: off), got ",
                o.checkpoint_every_minutes());
    lock();
    last_save_ = std::chrono::steady_clock::now();
  }
  ~RunOutputs() override {
    if (lock_fd_ >= 0) ::close(lock_fd_);
  }
  RunOutputs(const RunOutputs&) = delete;
  RunOutputs& operator=(const RunOutputs&) = delete;

  std::filesystem::path checkpoint_dir() const { return options_.dir() / "checkpoints"; }
  /// The newest checkpoint in checkpoint_dir(), if any: where to resume from.
  std::optional<std::filesystem::path> latest_checkpoint() const {
    const auto all = list_checkpoints(checkpoint_dir());
    if (all.empty()) return std::nullopt;
    return all.back();
  }
  const RunOutputsOptions& options() const noexcept { return options_; }

  void on_step(TrainingRun& run, const TrainStep& step) override {
    const auto& o = options_;
    const bool by_steps = o.checkpoint_every_steps() > 0 && step.step % o.checkpoint_every_steps() == 0;
    const double minutes = std::chrono::duration<double>(std::chrono::steady_clock::now() - last_save_).count() / 60;
    const bool by_time = o.checkpoint_every_minutes() > 0 && minutes >= o.checkpoint_every_minutes();
    if ((by_steps || by_time) && step.step < step.steps) save(run, checkpoint_filename(run.epoch(), run.step_in_epoch()));
  }

  void on_epoch(TrainingRun& run, TrainEpoch& epoch) override {
    const auto& o = options_;
    if (o.grid_samples() > 0) {
      const auto& f = run.formulation();
      torch::Tensor images;
      if (o.grid_level_sampler() || !dynamic_cast<const DiscreteFormulation*>(&f)) {
        static const Heun heun;
        const LevelSampler& sampler = o.grid_level_sampler() ? *o.grid_level_sampler() : static_cast<const LevelSampler&>(heun);
        const auto sigmas = o.grid_plan() ? o.grid_plan()(f) : make_plan(f, f.default_plan(), 18);
        images = run.sample(o.grid_samples(), sampler, sigmas, o.grid_seed(), o.grid_labels());
      } else {
        static const DDPM ddpm;
        const SamplingMethod& method = o.grid_sampler() ? *o.grid_sampler() : static_cast<const SamplingMethod&>(ddpm);
        images = run.sample(o.grid_samples(), method, o.grid_seed(), o.grid_labels());
      }
      if (images.dim() == 4) {
        const auto nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(o.grid_samples()))));
        epoch.grid = o.dir() / "samples" / fmt::format("epoch_{:03d}.png", epoch.epoch);
        write_png(epoch.grid, make_grid(to_unit_range(images), nrow, 2));
      } else {  // vectors or sequences: the samples themselves
        epoch.grid = o.dir() / "samples" / fmt::format("epoch_{:03d}.npy", epoch.epoch);
        std::filesystem::create_directories(epoch.grid.parent_path());
        data::save_npy(epoch.grid, images.to(torch::kCPU, torch::kFloat32));
      }
    }
    epoch.checkpoint = save(run, checkpoint_filename(epoch.epoch));
    nlohmann::json line = {{"epoch", epoch.epoch},
                           {"step", epoch.global_step},
                           {"train_loss", number(epoch.train_loss)},
                           {"seconds", epoch.seconds},
                           {"images_per_second", epoch.images_per_second},
                           {"skipped_steps", epoch.skipped_steps}};
    if (epoch.val_loss) line["val_loss"] = number(*epoch.val_loss);
    std::ofstream metrics(o.dir() / "metrics.jsonl", std::ios::app);
    metrics << line.dump() << "\n";
    metrics.flush();  // a full disk shows when the buffer is written, not before
    TORCH_CHECK(metrics.good(), "RunOutputs: could not append to ", (o.dir() / "metrics.jsonl").string());
  }

  std::optional<std::filesystem::path> on_interrupt(TrainingRun& run) override {
    // A stop at an epoch's end finds that epoch's checkpoint just written.
    const auto name = checkpoint_filename(run.epoch(), run.step_in_epoch());
    if (run.step_in_epoch() == 0 && std::filesystem::exists(checkpoint_dir() / name)) return checkpoint_dir() / name;
    return save(run, name);
  }

 private:
  /// JSON has no NaN or infinity: those are written as the strings "nan", "inf", "-inf".
  static nlohmann::json number(double v) {
    if (std::isfinite(v)) return v;
    return std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
  }

  /// Writes a checkpoint, then removes what it supersedes: all but the newest keep_checkpoints (pinned
  /// epochs apart). A failed write throws before anything is removed.
  std::filesystem::path save(TrainingRun& run, const std::string& name) {
    const auto path = checkpoint_dir() / name;
    run.save_checkpoint(path);
    last_save_ = std::chrono::steady_clock::now();
    const auto existing = list_checkpoints(checkpoint_dir());
    const auto keep = static_cast<size_t>(options_.keep_checkpoints());
    const auto& pinned = options_.keep_epochs();
    for (size_t i = 0; i + keep < existing.size(); ++i) {
      const bool is_pinned = std::any_of(pinned.begin(), pinned.end(), [&](int64_t e) {
        return existing[i].filename() == checkpoint_filename(e);
      });
      std::error_code ec;
      if (!is_pinned && existing[i] != path) std::filesystem::remove(existing[i], ec);
    }
    return path;
  }

  void lock() {
    std::error_code ec;
    std::filesystem::create_directories(options_.dir(), ec);
    TORCH_CHECK(!ec, "RunOutputs: cannot create ", options_.dir().string(), ": ", ec.message());
    const auto path = options_.dir() / "run.lock";
    lock_fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    TORCH_CHECK(lock_fd_ >= 0, "RunOutputs: cannot open ", path.string(), ": ", std::strerror(errno));
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
      char holder[32] = {0};
      const auto n = ::pread(lock_fd_, holder, sizeof(holder) - 1, 0);
      ::close(lock_fd_);
      lock_fd_ = -1;
      TORCH_CHECK(false, "RunOutputs: another training run (pid ", n > 0 ? std::string(holder, static_cast<size_t>(n)) : "?",
                  ") is writing to ", options_.dir().string(), "; wait for it, stop it, or choose another directory");
    }
    const auto pid = std::to_string(::getpid());
    if (::ftruncate(lock_fd_, 0) == 0) (void)!::pwrite(lock_fd_, pid.data(), pid.size(), 0);
  }

  RunOutputsOptions options_;
  int lock_fd_ = -1;
  std::chrono::steady_clock::time_point last_save_;
};

}  // namespace diffusion
