#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/checkpoint.hpp>
#include <diffusion/data/dataset.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/progress.hpp>
#include <diffusion/random.hpp>
#include <diffusion/runtime.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/schedule.hpp>
#include <diffusion/training/collective.hpp>
#include <diffusion/training/ema.hpp>
#include <diffusion/training/hooks.hpp>
#include <diffusion/training/loss.hpp>
#include <diffusion/training/objective.hpp>
#include <diffusion/sampling/sampler.hpp>
#include <diffusion/training/options.hpp>
#include <diffusion/detail/training.hpp>

#include <fmt/core.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

/// Training a backbone with the denoising objective (Ho et al. 2020, Algorithm 1).
namespace diffusion {

/// Class labels for Trainer::fit: one per training (and validation) image, for a ConditionalBackbone.
struct Labels {
  torch::Tensor train, val;
};

/// Trains any Backbone: for each batch x0, t ~ U{0..T-1} and eps ~ N(0, I) from the run's own generator,
/// the mean of diffusion_loss (Ho et al. 2020, eq. 14 for epsilon prediction) is minimized by the
/// optimizer (AdamW with the seed's settings unless one is given), with the learning rate from
/// TrainerOptions::optimization, an EMA of the weights, and micro-batches; after each epoch the validation
/// loss (fixed noise and timesteps, so epochs compare). Files, grids and metrics are the hooks' business
/// (RunOutputs); the trainer never sets threads or other process-wide state.
///
/// Example:
///   Trainer trainer(UNet(), NoiseSchedule(), TrainerOptions().epochs(5).ema_decay(0.999));
///   auto outputs = std::make_shared<RunOutputs>(RunOutputsOptions("run"));
///   trainer.add_hook(outputs);
///   if (auto last = outputs->latest_checkpoint()) trainer.load_checkpoint(*last);
///   trainer.fit(train.images, test.images);
template <Backbone B>
class Trainer final : public TrainingRun {
 public:
  /// The discrete schedule's objective (DiscreteObjective) with options.loss()'s prediction and Min-SNR.
  Trainer(B model, NoiseSchedule schedule, TrainerOptions options = {},
          std::shared_ptr<torch::optim::Optimizer> optimizer = nullptr)
      : Trainer(std::move(model), discrete_objective(schedule, options), options, std::move(optimizer), true) {}

  /// Any objective (EDMObjective, DiscreteObjective, a user's): it carries the formulation, the
  /// distribution of noise levels and the weighting, so options.loss() must leave prediction and
  /// min_snr_gamma at their defaults (only its precision applies); refused otherwise.
  ///
  /// Example:
  ///   Trainer trainer(UNet(), std::make_shared<EDMObjective>(), TrainerOptions().epochs(8));
  Trainer(B model, std::shared_ptr<const Objective> objective, TrainerOptions options = {},
          std::shared_ptr<torch::optim::Optimizer> optimizer = nullptr)
      : Trainer(std::move(model), std::move(objective), std::move(options), std::move(optimizer), false) {}

  void add_hook(std::shared_ptr<TrainerHook> hook) { hooks_.push_back(std::move(hook)); }

  /// Trains data-parallel with the other ranks of `group` (each running the same program with the same
  /// options and data): rank 0's weights (and EMA) are copied to all at the start of fit; each epoch's
  /// shuffle, drawn alike on every rank, is padded by wrapping around to a multiple of the ranks and dealt
  /// out in turn (PyTorch's DistributedSampler), so that step k's batches together are the single-process
  /// batch k of batch_size x ranks images; the timesteps, noise and label dropout of that global batch are
  /// drawn alike too and each rank takes its share; gradients (and the loss) are averaged in flattened
  /// buckets. Weights, EMA, learning rate and step counts stay identical on every rank, and a stop request
  /// on any rank stops all at the same step. Only rank 0 should write files (add RunOutputs there).
  void distribute(std::shared_ptr<Collective> group) { group_ = std::move(group); }

  /// Trains until options().epochs() epochs are done (counting those restored by load_checkpoint, and
  /// continuing mid-epoch where it stopped). `train` and `val` are (N, ...) examples on the CPU (images (N, C,
  /// H, W), sequences (N, C, L), vectors (N, D)); `val`
  /// may be undefined. `labels` (for a ConditionalBackbone) hold their classes; each batch's are dropped to
  /// null_class with probability options().cond_dropout(), the validation ones never. Labels for a backbone
  /// that takes none are refused.
  void fit(const torch::Tensor& train, const torch::Tensor& val = {}, const Labels& labels = {}) {
    detail::check_fit_inputs(train, val, labels.train, labels.val, model_);
    fit(std::make_shared<data::TensorDataset>(train, labels.train),
        val.defined() ? std::make_shared<data::TensorDataset>(val, labels.val) : nullptr);
  }

  /// The same over any dataset (data::Dataset: an ImageFolder, a TensorDataset, a user's): each step reads
  /// its batch with dataset->batch (augmented with the run's seed and the epoch) and names the next one
  /// with prefetch. The examples may have any shape of at least one value. The labels are used when the backbone takes
  /// them (takes_class_labels) and the dataset has them; an unconditional backbone trains on a labelled
  /// dataset without them. `val` (optional) is read once, whole and without augmentation.
  void fit(std::shared_ptr<const data::Dataset> train, std::shared_ptr<const data::Dataset> val = nullptr) {
    TORCH_CHECK(train != nullptr, "Trainer::fit: the training set must be given");
    const bool use_labels = takes_class_labels(model_) && train->num_classes() > 0;
    const auto [val_images, val_labels] = detail::whole_validation_set(val.get(), use_labels);
    detail::check_fit_dataset(*train, val_images, val_labels, use_labels);
    train_ = train;
    const int64_t world = group_ ? group_->world_size() : 1, rank = group_ ? group_->rank() : 0;
    const int64_t n = train->size(), batch = options_.batch_size(), max_steps = options_.max_steps_per_epoch();
    auto& p = progress_;
    const auto recorded = RunLayout::read(p.training);  // what a resumed checkpoint recorded (none: all unset)
    detail::check_resumed_layout(p, recorded, train->shape(), n);
    detail::derive_examples(p, recorded, n, batch, max_steps);
    // A resume with another global batch: the EMA's warm-up continues from as many updates as this batch
    // would have taken for the examples seen.
    if (ema_ && recorded.batch_size > 0 && recorded.batch_size * recorded.world_size != batch * world) {
      ema_->set_updates(static_cast<int64_t>(std::llround(static_cast<double>(ema_->updates()) *
                                                          static_cast<double>(recorded.batch_size * recorded.world_size) /
                                                          static_cast<double>(batch * world))));
    }
    // The schedule's unit: the global batch the run started with, kept when it resumes with another, so
    // that the learning rate goes on where the examples seen put it.
    schedule_batch_ = recorded.schedule_batch > 0 ? recorded.schedule_batch
                      : recorded.batch_size > 0   ? recorded.batch_size * recorded.world_size
                                                  : batch * world;
    RunLayout{train->shape(), n, batch, world, device_.str(), schedule_batch_}.write(p.training);
    if (group_) detail::broadcast_from_rank0(*group_, unwrap(model_), ema_ptr());
    const auto val_draws = detail::fixed_validation_draws(val_images, *objective_, options_.seed());
    const detail::EpochLayout whole(world, rank, n, batch, max_steps);
    auto& guard = guard_.emplace(device_, options_.skip_nonfinite(), whole.steps);
    guard.set_skipped(p.skipped_steps);
    // The run's length in examples (the learning-rate schedule's clock): those seen, the rest of the epoch
    // in progress, and the epochs after it.
    const int64_t total = p.epoch >= options_.epochs() ? p.images_seen
        : p.images_seen + detail::EpochLayout(world, rank, n, batch, max_steps, p.images_in_epoch).examples_left() +
              (options_.epochs() - p.epoch - 1) * whole.examples_left();
    while (p.epoch < options_.epochs()) {
      const auto start = std::chrono::steady_clock::now();
      // From where the epoch stands (a resumed run: perhaps reached with another batch size or number of
      // ranks); its steps are numbered on from those taken before.
      const detail::EpochLayout layout(world, rank, n, batch, max_steps, p.images_in_epoch);
      const int64_t first = p.step_in_epoch, steps = first + layout.steps;
      ProgressBar bar(fmt::format("Epoch {}/{}", p.epoch + 1, options_.epochs()), steps,
                      rank == 0 ? options_.progress() : ProgressMode::Off, options_.progress_interval());
      const auto share = layout.share(detail::epoch_permutation(n, generator_, p.epoch_rng_state, p.step_in_epoch > 0));
      const data::AugmentationDraw augmentation{options_.seed(), p.epoch};
      auto running = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat64).device(device_));
      int64_t skipped_here = 0, examples_here = 0;  // skipped steps' losses are not finite: the epoch's loss leaves them out
      unwrap(model_).train();
      bool stop_at_epoch_end = false;
      for (int64_t k = 0; k < layout.steps; ++k) {
        const int64_t step = first + k;
        const auto idx = layout.batch_indices(share, k);
        const auto b = detail::draw_batch(*train, use_labels, idx, augmentation, *objective_, options_.cond_dropout(), generator_,
                                          layout, device_);
        if (k + 1 < layout.steps) train->prefetch(layout.batch_indices(share, k + 1), augmentation);
        const double lr = learning_rate_at_example(options_.optimization(), p.images_seen, schedule_batch_, total);
        for (auto& group : optimizer_->param_groups()) group.options().set_lr(lr);
        optimizer_->zero_grad();
        auto loss = detail::accumulate_gradients(*objective_, [this](const torch::Tensor& cond) { return network(cond); }, b.x0,
                                                 b.t, b.noise, b.cond, options_.micro_batch());
        // With ranks, whether any was asked to stop travels with the gradients, so that all stop at one step.
        bool shared_stop = false;
        if (group_) std::tie(loss, shared_stop) = detail::average_over_ranks(*group_, unwrap(model_), loss, stop_requested());
        const bool skip =
            guard.check(loss, detail::clip_and_norm(unwrap(model_), options_.optimization().grad_clip()), p.global_step + 1);
        if (!skip) {
          optimizer_->step();
          if (ema_) ema_->update(unwrap(model_));
        }
        const int64_t examples = layout.examples_in_step(k);
        ++p.global_step;
        p.step_in_epoch = step + 1;
        p.images_seen += examples;
        p.images_in_epoch = std::min(layout.end, p.images_in_epoch + examples);  // the wrap-around is no new position
        examples_here += examples;
        p.skipped_steps = guard.skipped();
        if (skip) ++skipped_here;
        else running += loss;
        if (bar.due(step + 1)) bar.update(step + 1, running.item<double>() / static_cast<double>(k + 1 - skipped_here));
        const TrainStep info{p.epoch + 1, options_.epochs(), step + 1, steps, p.global_step, loss, lr, skip};
        for (auto& hook : hooks_) hook->on_step(*this, info);
        if (on_step) on_step(info);
        // A stop on the epoch's last step lets the epoch end first (validation, hooks, its checkpoint).
        stop_at_epoch_end = group_ ? shared_stop : stop_requested();
        if (stop_at_epoch_end && k + 1 < layout.steps) interrupt();
      }
      bar.finish();
      guard.verify();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      TrainEpoch info{p.epoch + 1, options_.epochs(), p.global_step,
                      running.item<double>() / static_cast<double>(layout.steps - skipped_here),  // NaN when all were skipped
                      val_images.defined() ? std::optional<double>(detail::validation_loss(unwrap(model_), *objective_,
                          [this](const torch::Tensor& cond) { return network(cond); }, val_images, val_labels, val_draws,
                          options_.batch_size(), device_, group_.get())) : std::nullopt, seconds,
                      static_cast<double>(examples_here) / seconds, guard.skipped(), {}, {}};
      ++p.epoch;
      p.step_in_epoch = p.images_in_epoch = 0;
      for (auto& hook : hooks_) hook->on_epoch(*this, info);
      if (on_epoch) on_epoch(info);
      if (stop_at_epoch_end && p.epoch < options_.epochs()) interrupt();
    }
  }

  /// Restores the model, optimizer, EMA, epoch, position in the epoch and generator from a checkpoint
  /// written by save_checkpoint (or by a format-1 Trainer). Refused, before anything changes: a checkpoint
  /// of another noise schedule or prediction type (the run would change its objective half-way).
  void load_checkpoint(const std::filesystem::path& path) {
    progress_ = load_training_state(path, unwrap(model_), optimizer_.get(), ema_ptr(), device_, [&](const CheckpointInfo& info) {
      check_same_formulation(info.formulation, formulation_config(formulation()), "Trainer::load_checkpoint", path.string(),
                             "this run");
    });
    generator_.set_state(progress_.rng_state);
  }

  void save_checkpoint(const std::filesystem::path& path) override {
    if (guard_) guard_->verify();  // a deferred non-finite step stops the run before anything is written
    CheckpointContents c{&unwrap(model_), optimizer_.get(), ema_ptr(), progress_, {}, Prediction::Epsilon,
                         formulation_config(formulation()), metadata};
    c.progress.rng_state = generator_.get_state();
    if (c.progress.step_in_epoch == 0) c.progress.epoch_rng_state = torch::Tensor();
    c.progress.training = options_;
    RunLayout{train_ ? train_->shape() : std::vector<int64_t>{}, train_ ? train_->size() : -1, options_.batch_size(),
              group_ ? group_->world_size() : 1, device_.str(),
              schedule_batch_ > 0 ? schedule_batch_ : RunLayout::read(progress_.training).schedule_batch}
        .write(c.progress.training);
    diffusion::save_checkpoint(path, c);
  }

  torch::Tensor sample(int64_t n, const SamplingMethod& method, uint64_t seed, const torch::Tensor& labels = {}) override {
    const auto* discrete = dynamic_cast<const DiscreteObjective*>(objective_.get());
    TORCH_CHECK(discrete, "Trainer::sample: ", method.name(), " samples the discrete schedule, but this run trains ",
                objective_->describe(), "; sample with a LevelSampler and a plan");
    std::optional<EMA::Scope> averaged;
    if (ema_) averaged.emplace(*ema_, unwrap(model_));
    return diffusion::sample(model_, discrete->schedule(), batch_shape(n), method,
                             SampleOptions().seed(seed).precision(options_.loss().precision())
                                 .prediction(discrete->prediction())
                                 .cond(labels.defined() ? labels.to(device_) : labels));
  }

  torch::Tensor sample(int64_t n, const LevelSampler& sampler, const std::vector<double>& sigmas, uint64_t seed,
                       const torch::Tensor& labels = {}) override {
    std::optional<EMA::Scope> averaged;
    if (ema_) averaged.emplace(*ema_, unwrap(model_));
    return diffusion::sample(model_, formulation(), batch_shape(n), sampler, sigmas,
                             SampleOptions().seed(seed).precision(options_.loss().precision()).dtype(objective_->dtype())
                                 .cond(labels.defined() ? labels.to(device_) : labels));
  }

  int64_t epoch() const override { return progress_.epoch; }
  int64_t global_step() const override { return progress_.global_step; }
  int64_t step_in_epoch() const override { return progress_.step_in_epoch; }
  const Formulation& formulation() const override { return *objective_->formulation(); }
  /// The objective trained (on the run's device).
  const Objective& objective() const noexcept { return *objective_; }
  std::vector<int64_t> image_shape() const override {
    TORCH_CHECK(train_ != nullptr, "Trainer: the image shape is known once fit has been called");
    return train_->shape();
  }
  B& model() noexcept { return model_; }
  /// (n, image shape...).
  std::vector<int64_t> batch_shape(int64_t n) const {
    auto shape = image_shape();
    shape.insert(shape.begin(), n);
    return shape;
  }
  torch::optim::Optimizer& optimizer() noexcept { return *optimizer_; }
  /// The EMA of the weights, when options().ema_decay() > 0.
  const std::optional<EMA>& ema() const noexcept { return ema_; }
  const TrainerOptions& options() const noexcept { return options_; }
  torch::Device device() const noexcept { return device_; }

  /// Called after every optimizer step, after the hooks.
  std::function<void(const TrainStep&)> on_step;
  /// Called after every epoch, after the hooks (so it sees what they wrote).
  std::function<void(const TrainEpoch&)> on_epoch;
  /// Strings saved in every checkpoint (read back with read_checkpoint_info).
  std::map<std::string, std::string> metadata;

 private:
  Trainer(B model, std::shared_ptr<const Objective> objective, TrainerOptions options,
          std::shared_ptr<torch::optim::Optimizer> optimizer, bool from_schedule)
      : model_(std::move(model)), options_(std::move(options)), device_(options_.device().value_or(auto_device())),
        generator_(make_generator(options_.seed())) {
    detail::check_trainer_options(options_);
    TORCH_CHECK(objective != nullptr, "Trainer: the objective must be given");
    TORCH_CHECK(from_schedule || (options_.loss().prediction() == Prediction::Epsilon && options_.loss().min_snr_gamma() == 0),
                "Trainer: LossOptions' prediction and min_snr_gamma apply to a Trainer given a NoiseSchedule; the "
                "objective (", objective->describe(), ") carries its own");
    objective_ = objective->to(device_);
    detail::check_archive_names(unwrap(model_), "Trainer");  // before training: its checkpoints must load
    unwrap(model_).to(device_);
    optimizer_ = optimizer ? std::move(optimizer) : detail::default_optimizer(unwrap(model_), options_.optimization());
    if (options_.ema_decay() > 0) ema_.emplace(unwrap(model_), options_.ema_decay());
  }

  static std::shared_ptr<const Objective> discrete_objective(const NoiseSchedule& schedule, const TrainerOptions& o) {
    detail::check_trainer_options(o);
    detail::check_prediction_fits("Trainer", schedule, o.loss().prediction());
    return std::make_shared<DiscreteObjective>(schedule, o.loss().prediction(), o.loss().min_snr_gamma());
  }

  /// The backbone as the objective calls it: this batch's labels, the run's precision.
  NetworkCall network(const torch::Tensor& cond) {
    return [this, cond](const torch::Tensor& x, const torch::Tensor& c_noise) {
      return detail::predict("Trainer", model_, x, c_noise, options_.loss().precision(), cond);
    };
  }

  EMA* ema_ptr() noexcept { return ema_ ? &*ema_ : nullptr; }

  /// Lets the hooks save the run, then throws TrainingInterrupted.
  [[noreturn]] void interrupt() {
    guard_->verify();
    std::optional<std::filesystem::path> saved;
    for (auto& hook : hooks_) {
      if (auto path = hook->on_interrupt(*this)) saved = path;
    }
    const auto& p = progress_;
    const auto where = p.step_in_epoch > 0 ? fmt::format("at epoch {}, step {}", p.epoch + 1, p.step_in_epoch)
                                           : fmt::format("after epoch {}", p.epoch);
    throw TrainingInterrupted(fmt::format("stopped on request {} (global step {}){}", where, p.global_step,
                                          saved ? "; saved " + saved->string() : std::string()),
                              saved);
  }

  B model_;
  TrainerOptions options_;
  torch::Device device_;
  std::shared_ptr<const Objective> objective_;
  torch::Generator generator_;
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  std::optional<EMA> ema_;
  std::vector<std::shared_ptr<TrainerHook>> hooks_;
  std::optional<detail::NonFiniteGuard> guard_;
  std::shared_ptr<Collective> group_;
  TrainingProgress progress_;
  std::shared_ptr<const data::Dataset> train_;
  int64_t schedule_batch_ = -1;  // the learning-rate schedule's unit (RunLayout::schedule_batch), once fit has begun
};

}  // namespace diffusion
