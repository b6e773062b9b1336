#pragma once

#include <diffusion/formulation/discrete.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/sampling/sampler.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

/// What a training run shows the parts that watch it (run outputs, progress, a user's callback).
namespace diffusion {

/// What the trainer reports after each optimizer step.
struct TrainStep {
  /// 1-based epoch and step within it; global_step counts every step of the run.
  int64_t epoch, epochs, step, steps, global_step;
  /// This step's mean loss, a 0-d tensor on the training device (reading it waits for the device).
  torch::Tensor loss;
  /// The learning rate this step used.
  double lr;
  /// Whether the step was skipped for a non-finite loss or gradient (TrainerOptions::skip_nonfinite).
  bool skipped = false;
};

/// What the trainer reports after each epoch.
struct TrainEpoch {
  int64_t epoch, epochs, global_step;
  double train_loss;
  /// The validation loss, when there is a validation set.
  std::optional<double> val_loss;
  /// Time spent in the epoch's training steps, and the images per second they processed.
  double seconds, images_per_second;
  /// Steps skipped for non-finite values so far in the run.
  int64_t skipped_steps = 0;
  /// What the run outputs wrote this epoch (empty when nothing).
  std::filesystem::path checkpoint, grid;
};

/// The run as a hook sees it: implemented by Trainer.
class TrainingRun {
 public:
  virtual ~TrainingRun() = default;
  /// Epochs completed, and optimizer steps taken.
  virtual int64_t epoch() const = 0;
  virtual int64_t global_step() const = 0;
  /// Steps done in the epoch in progress (0 between epochs).
  virtual int64_t step_in_epoch() const = 0;
  /// The formulation trained for.
  virtual const Formulation& formulation() const = 0;
  /// The discrete schedule trained with; refused for a run of another formulation (use formulation()).
  const NoiseSchedule& schedule() const {
    const auto* discrete = dynamic_cast<const DiscreteFormulation*>(&formulation());
    TORCH_CHECK(discrete, "TrainingRun::schedule: this run trains ", formulation().describe(), ", not a discrete schedule");
    return discrete->schedule();
  }
  /// The shape of one training image, e.g. {1, 28, 28}.
  virtual std::vector<int64_t> image_shape() const = 0;
  /// Writes everything needed to continue the run, and to sample from it, to `path` (atomically).
  virtual void save_checkpoint(const std::filesystem::path& path) = 0;
  /// `n` samples with `method` from the EMA weights (the trained ones without an EMA), seeded; of the
  /// classes `labels` ((n,) or (1,)) for a conditional model, unconditional when undefined.
  virtual torch::Tensor sample(int64_t n, const SamplingMethod& method, uint64_t seed, const torch::Tensor& labels = {}) = 0;
  /// The same with a sampler over noise levels and its plan (make_plan(formulation(), ...)): any formulation.
  virtual torch::Tensor sample(int64_t n, const LevelSampler& sampler, const std::vector<double>& sigmas, uint64_t seed,
                               const torch::Tensor& labels = {}) = 0;
};

/// Something the trainer calls as the run goes: outputs, reporting, stopping. Override what you need.
class TrainerHook {
 public:
  virtual ~TrainerHook() = default;
  /// After every optimizer step.
  virtual void on_step(TrainingRun&, const TrainStep&) {}
  /// After every epoch (validation done); may fill `epoch.checkpoint` and `epoch.grid`.
  virtual void on_epoch(TrainingRun&, TrainEpoch&) {}
  /// When the run stops early on request (stop_requested): the last chance to save it. Returns what it
  /// wrote, if anything.
  virtual std::optional<std::filesystem::path> on_interrupt(TrainingRun&) { return std::nullopt; }
};

/// Thrown by Trainer::fit when a stop was requested (install_stop_signals, request_stop) and the hooks
/// have had their chance to save the run (TrainerHook::on_interrupt).
struct TrainingInterrupted : std::runtime_error {
  TrainingInterrupted(const std::string& what, std::optional<std::filesystem::path> saved)
      : std::runtime_error(what), checkpoint(std::move(saved)) {}
  /// What a hook wrote on the way out (RunOutputs: a checkpoint to resume from).
  std::optional<std::filesystem::path> checkpoint;
};

}  // namespace diffusion
