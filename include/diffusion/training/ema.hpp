#pragma once

#include <diffusion/detail/archive.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

/// An exponential moving average of a model's weights.
namespace diffusion {

/// The averaged weights of a model, by parameter name:
///   shadow <- d shadow + (1 - d) parameter,   d = min(decay, (1 + n) / (10 + n))
/// after n updates. The warm-up of d (TensorFlow's ExponentialMovingAverage with num_updates) keeps a
/// short run's average from being mostly the random initial weights: 0.999^469 = 0.63 after one MNIST
/// epoch without it. Sampling with the average (Scope) usually gives better samples than the last
/// weights (Ho et al. 2020, appendix B, decay 0.9999).
///
/// Example:
///   EMA ema(*model, 0.999);
///   ...; optimizer.step(); ema.update(*model);
///   {
///     auto swapped = ema.scope(*model);      // the model holds the averaged weights in this block
///     auto x = sample(model, schedule, {25, 1, 28, 28}, DDIM());
///   }
class EMA {
 public:
  /// Starts the average at `model`'s current weights. decay must be in (0, 1).
  EMA(const torch::nn::Module& model, double decay) : decay_(decay) {
    TORCH_CHECK(decay > 0.0 && decay < 1.0, "EMA: decay must be in (0, 1), got ", decay);
    torch::NoGradGuard no_grad;
    for (const auto& p : model.named_parameters()) shadow_.insert(p.key(), p.value().detach().clone());
  }

  /// Moves the average towards `model`'s weights (same parameter names) with the warmed-up decay.
  void update(const torch::nn::Module& model) {
    torch::NoGradGuard no_grad;
    const double d = current_decay();
    for (const auto& p : model.named_parameters()) shadow_[p.key()].mul_(d).add_(p.value().detach(), 1.0 - d);
    ++updates_;
  }

  /// The decay the next update uses: min(decay, (1 + n) / (10 + n)).
  double current_decay() const {
    const auto n = static_cast<double>(updates_);
    return std::min(decay_, (1.0 + n) / (10.0 + n));
  }

  double decay() const noexcept { return decay_; }
  /// Updates so far (n above).
  int64_t updates() const noexcept { return updates_; }
  /// Sets the update count the decay's warm-up reads (a run resumed with another batch size continues
  /// from the count that batch would have reached). Refused: a negative count.
  void set_updates(int64_t n) {
    TORCH_CHECK(n >= 0, "EMA: the update count must be >= 0, got ", n);
    updates_ = n;
  }
  const torch::OrderedDict<std::string, torch::Tensor>& shadow() const noexcept { return shadow_; }

  /// While alive, `model` holds the averaged weights; its own come back when it ends.
  class Scope {
   public:
    Scope(const EMA& ema, torch::nn::Module& model) : model_(model) {
      torch::NoGradGuard no_grad;
      for (auto& p : model_.named_parameters()) {
        saved_.push_back(p.value().detach().clone());
        p.value().copy_(ema.shadow_[p.key()]);
      }
    }
    ~Scope() {
      torch::NoGradGuard no_grad;
      size_t i = 0;
      for (auto& p : model_.parameters()) p.copy_(saved_[i++]);
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    torch::nn::Module& model_;
    std::vector<torch::Tensor> saved_;
  };
  Scope scope(torch::nn::Module& model) const { return Scope(*this, model); }

  /// Writes the average into `archive` under `key` the way `model` (whose structure it averages) would be
  /// saved, so that a model loads it as its own weights (load_weights), and the update count beside it.
  void save(torch::serialize::OutputArchive& archive, const std::string& key, const torch::nn::Module& model) const {
    torch::serialize::OutputArchive nested;
    detail::save_module_as(model, nested, [this](const std::string& name, const torch::Tensor&) { return shadow_[name]; });
    archive.write(key, nested);
    archive.write(key + "_updates", c10::IValue(updates_));
  }

  /// Reads what save wrote (through `model`, whose weights are left as they were). Archives without the
  /// update count (checkpoint format 1) take `updates_if_absent`.
  void load(torch::serialize::InputArchive& archive, const std::string& key, torch::nn::Module& model,
            const std::filesystem::path& path, int64_t updates_if_absent) {
    Scope keep(*this, model);  // restores the model's own weights at the end
    detail::load_module(archive, key, model, path);
    torch::NoGradGuard no_grad;
    for (const auto& p : model.named_parameters()) shadow_[p.key()].copy_(p.value());
    c10::IValue updates;
    updates_ = archive.try_read(key + "_updates", updates) ? updates.toInt() : updates_if_absent;
  }

 private:
  double decay_;
  int64_t updates_ = 0;
  torch::OrderedDict<std::string, torch::Tensor> shadow_;
};

}  // namespace diffusion
