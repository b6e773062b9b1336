#pragma once

#include <diffusion/detail/check.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

/// What the Trainer trains on: a set of examples of one shape, read a batch at a time.
namespace diffusion::data {

/// Which draw of a dataset's random augmentations a batch takes. Each example's draw is a function of
/// (seed, epoch, the example's index) alone (augmentation_bits), so an example is augmented alike
/// whatever the batch size, the number of ranks, or where a run was resumed; the next epoch draws anew.
struct AugmentationDraw {
  uint64_t seed = 0;
  int64_t epoch = 0;
};

/// 64 random bits for example `index` of `draw`, stream `stream` (one per kind of augmentation):
/// SplitMix64 (Steele, Lea & Flood 2014) over the three, a counter-based generator, so no state is
/// carried from batch to batch.
inline uint64_t augmentation_bits(const AugmentationDraw& draw, int64_t index, uint64_t stream = 0) {
  const auto mix = [](uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  return mix(mix(mix(draw.seed ^ mix(stream)) ^ static_cast<uint64_t>(draw.epoch)) ^ static_cast<uint64_t>(index));
}

/// A training set: size() examples, each of shape(), read by index. The Trainer asks for one batch a
/// step (batch), and says which batch comes next (prefetch) so that a dataset that decodes on the fly can
/// prepare it while the step trains. Implementations: TensorDataset (tensors in memory, what load_mnist's
/// split becomes) and ImageFolder (a directory tree of image files).
///
/// Example:
///   auto train = std::make_shared<data::ImageFolder>("sprites", data::ImageFolderOptions(32));
///   trainer.fit(train);
class Dataset {
 public:
  virtual ~Dataset() = default;

  /// The number of examples (>= 1).
  virtual int64_t size() const = 0;
  /// One example's shape: (C, H, W) for images.
  virtual std::vector<int64_t> shape() const = 0;
  /// The examples `idx` ((B,) int64 in [0, size())) as a float32 tensor (B, shape()...) on the CPU, in the
  /// range the model trains on ([-1, 1] for images). `draw` selects the random augmentations; none (what
  /// validation asks for) means none are applied.
  virtual torch::Tensor batch(const torch::Tensor& idx, const std::optional<AugmentationDraw>& draw) const = 0;
  /// The classes of examples `idx`, (B,) int64 in [0, num_classes()); undefined when unlabelled.
  virtual torch::Tensor labels(const torch::Tensor& idx) const {
    (void)idx;
    return {};
  }
  /// The number of classes of the labels (0: unlabelled).
  virtual int64_t num_classes() const { return 0; }
  /// A hint that batch(idx, draw) comes next: a dataset that decodes on the fly may start on it now.
  virtual void prefetch(const torch::Tensor& idx, const std::optional<AugmentationDraw>& draw) const {
    (void)idx;
    (void)draw;
  }
};

/// Examples held in memory: `examples` (N, ...) floating point, optionally with (N,) integer labels in
/// [0, num_classes). No augmentation. Refused: an undefined, empty or non-floating tensor; labels that are
/// not one integer per example or fall outside [0, num_classes) (num_classes 0: 1 + the largest label).
///
/// Example:
///   auto split = data::load_mnist("data/mnist", data::Split::Train);
///   auto train = std::make_shared<data::TensorDataset>(split.images, split.labels);
class TensorDataset : public Dataset {
 public:
  explicit TensorDataset(torch::Tensor examples, torch::Tensor labels = {}, int64_t num_classes = 0)
      : examples_(std::move(examples)), labels_(std::move(labels)) {
    TORCH_CHECK(examples_.defined() && examples_.dim() >= 2 && examples_.size(0) >= 1 && examples_.is_floating_point(),
                "TensorDataset: examples must be a non-empty floating-point (N, ...) tensor, got ",
                examples_.defined() ? c10::str(examples_.sizes(), " ", examples_.scalar_type()) : "an undefined tensor");
    TORCH_CHECK(num_classes >= 0, "TensorDataset: num_classes must be >= 0 (0: from the labels), got ", num_classes);
    if (labels_.defined()) {
      TORCH_CHECK(!labels_.is_floating_point() && labels_.scalar_type() != torch::kBool && labels_.dim() == 1 &&
                      labels_.size(0) == examples_.size(0),
                  "TensorDataset: labels must be 1-D integers, one per example (", examples_.size(0), "), got ",
                  labels_.scalar_type(), " of shape ", labels_.sizes());
      labels_ = labels_.to(torch::kLong);
      const auto lo = labels_.min().item<int64_t>(), hi = labels_.max().item<int64_t>();
      num_classes_ = num_classes > 0 ? num_classes : hi + 1;
      TORCH_CHECK(lo >= 0 && hi < num_classes_, "TensorDataset: labels must be in [0, ", num_classes_, "), got values in [",
                  lo, ", ", hi, "]");
    }
  }

  int64_t size() const override { return examples_.size(0); }
  std::vector<int64_t> shape() const override { return examples_.sizes().slice(1).vec(); }
  torch::Tensor batch(const torch::Tensor& idx, const std::optional<AugmentationDraw>&) const override {
    return examples_.index_select(0, idx);
  }
  torch::Tensor labels(const torch::Tensor& idx) const override {
    return labels_.defined() ? labels_.index_select(0, idx) : torch::Tensor();
  }
  int64_t num_classes() const override { return num_classes_; }

  /// All examples and labels, as given.
  const torch::Tensor& examples() const noexcept { return examples_; }
  const torch::Tensor& all_labels() const noexcept { return labels_; }

 private:
  torch::Tensor examples_, labels_;
  int64_t num_classes_ = 0;
};

/// The examples `indices` of another dataset, in that order (PyTorch's torch.utils.data.Subset): a
/// validation split, or a limit. Augmentation draws keep the underlying indices, so an example is
/// augmented alike in any subset. Refused: a null dataset, indices that are not a non-empty 1-D integer
/// tensor within [0, dataset->size()).
///
/// Example:
///   auto perm = torch::randperm(folder->size(), make_generator(0));
///   auto val = std::make_shared<data::Subset>(folder, perm.slice(0, 0, 500));
///   auto train = std::make_shared<data::Subset>(folder, perm.slice(0, 500));
class Subset : public Dataset {
 public:
  Subset(std::shared_ptr<const Dataset> dataset, torch::Tensor indices) : dataset_(std::move(dataset)), indices_(std::move(indices)) {
    TORCH_CHECK(dataset_ != nullptr, "Subset: the dataset must be given");
    TORCH_CHECK(indices_.defined() && indices_.dim() == 1 && indices_.numel() >= 1 && !indices_.is_floating_point() &&
                    indices_.scalar_type() != torch::kBool,
                "Subset: indices must be a non-empty 1-D integer tensor");
    indices_ = indices_.to(torch::kCPU, torch::kLong).contiguous();
    const auto lo = indices_.min().item<int64_t>(), hi = indices_.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < dataset_->size(), "Subset: indices must be in [0, ", dataset_->size(), "), got values in [", lo,
                ", ", hi, "]");
  }

  int64_t size() const override { return indices_.size(0); }
  std::vector<int64_t> shape() const override { return dataset_->shape(); }
  torch::Tensor batch(const torch::Tensor& idx, const std::optional<AugmentationDraw>& draw) const override {
    return dataset_->batch(indices_.index_select(0, idx), draw);
  }
  torch::Tensor labels(const torch::Tensor& idx) const override { return dataset_->labels(indices_.index_select(0, idx)); }
  int64_t num_classes() const override { return dataset_->num_classes(); }
  void prefetch(const torch::Tensor& idx, const std::optional<AugmentationDraw>& draw) const override {
    dataset_->prefetch(indices_.index_select(0, idx), draw);
  }

 private:
  std::shared_ptr<const Dataset> dataset_;
  torch::Tensor indices_;
};

}  // namespace diffusion::data
