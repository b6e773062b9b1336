#pragma once

#include <diffusion/eval/classifier.hpp>
#include <diffusion/eval/frechet.hpp>
#include <diffusion/eval/kernel.hpp>

#include <torch/torch.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>

/// Sample quality as numbers: Frechet and kernel distances in the classifier's feature space, digit rate,
/// and the class histogram with its entropy.
namespace diffusion::eval {

struct SampleQuality {
  /// Frechet distance between the samples' features and the reference set's.
  double frechet = 0;
  /// Kernel distance (KID) between the same features, with its standard error; empty when scored against
  /// statistics alone (the overload taking FeatureStatistics), which it cannot be computed from.
  std::optional<KernelDistance> kernel;
  /// Share of samples the classifier assigns to one class with probability >= 0.9.
  double digit_rate = 0;
  /// Predicted-class counts.
  std::array<int64_t, 10> histogram{};
  /// Entropy of the predicted-class distribution in nats (ln 10 = 2.303 when all ten are equally common;
  /// a missing class lowers it).
  double class_entropy = 0;
  /// The smallest class share.
  double min_class_share = 0;
};

/// The classifier's penultimate features of `images` (N, 1, 28, 28) in [-1, 1].
inline torch::Tensor features_of(LeNet& classifier, const torch::Tensor& images) {
  return batched(classifier, images, 1000, [&](const torch::Tensor& x) { return classifier->features(x); });
}

/// A reference set in the classifier's features: the features themselves (for the kernel distance) and
/// their Gaussian fit (for the Frechet distance), computed once and scored against many times.
struct ReferenceFeatures {
  /// (N, D), float32 on the CPU.
  torch::Tensor features;
  FeatureStatistics statistics;
  /// The root mean square of the features' entries, sqrt(mean ||f||^2 / D): the kernel distance divides
  /// all features by it (see evaluate_samples).
  double scale = 1;
};

/// The reference features of `images` (N, 1, 28, 28) in [-1, 1], N >= 3.
inline ReferenceFeatures reference_features(LeNet& classifier, const torch::Tensor& images) {
  TORCH_CHECK(images.dim() == 4 && images.size(0) >= 3, "reference_features: need at least 3 images (N, 1, 28, 28), got ",
              detail::shape_str(images));
  auto f = features_of(classifier, images.to(torch::kCPU, torch::kFloat32)).to(torch::kCPU);
  auto statistics = feature_statistics(f);
  const double scale = f.to(torch::kFloat64).pow(2).mean().sqrt().item<double>();
  return {std::move(f), std::move(statistics), scale > 0 ? scale : 1.0};
}

}  // namespace diffusion::eval

namespace diffusion::detail {

/// Everything but the two distances.
inline eval::SampleQuality classify_samples(eval::LeNet& classifier, const torch::Tensor& x) {
  eval::SampleQuality q;
  const auto probs = eval::batched(classifier, x, 1000, [&](const torch::Tensor& b) { return torch::softmax(classifier(b), 1); });
  const auto [top, cls] = probs.max(1);
  q.digit_rate = top.ge(0.9).to(torch::kFloat64).mean().item<double>();
  const auto counts = torch::bincount(cls, {}, 10);
  const auto n = static_cast<double>(x.size(0));
  q.min_class_share = 1.0;
  for (int64_t c = 0; c < 10; ++c) {
    q.histogram[static_cast<size_t>(c)] = counts[c].item<int64_t>();
    const double p = static_cast<double>(q.histogram[static_cast<size_t>(c)]) / n;
    if (p > 0) q.class_entropy -= p * std::log(p);
    q.min_class_share = std::min(q.min_class_share, p);
  }
  return q;
}

inline torch::Tensor checked_samples(const torch::Tensor& samples, int64_t at_least) {
  TORCH_CHECK(samples.defined() && samples.dim() == 4 && samples.size(0) >= at_least, "evaluate_samples: need at least ",
              at_least, " samples (N, 1, 28, 28), got ", samples.defined() ? shape_str(samples) : "an undefined tensor");
  return samples.to(torch::kCPU, torch::kFloat32).clamp(-1, 1);
}

}  // namespace diffusion::detail

namespace diffusion::eval {

/// Scores `samples` (N, 1, 28, 28) in [-1, 1], N >= 2, against the reference feature statistics: the
/// Frechet distance, digit rate and classes (no kernel distance: it needs the reference's features).
inline SampleQuality evaluate_samples(LeNet& classifier, const torch::Tensor& samples,
                                      const FeatureStatistics& reference) {
  const auto x = detail::checked_samples(samples, 2);
  auto q = detail::classify_samples(classifier, x);
  q.frechet = frechet_distance(feature_statistics(features_of(classifier, x)), reference);
  return q;
}

/// Scores `samples` (N, 1, 28, 28) in [-1, 1], N >= 3, against a reference set: the Frechet and kernel
/// distances, digit rate and classes.
///
/// The kernel distance is computed on the features divided by the reference's `scale`, so that the
/// reference's x . x / D averages 1: the cubic kernel (x . y / D + 1)^3 was made for Inception features,
/// whose entries are well below 1; on raw LeNet features x . y / D reaches ~15 and the cube's heavy tail
/// makes the estimate several times noisier. The scale is the reference's alone, so every sample set
/// scored against one reference is scored by the same kernel.
inline SampleQuality evaluate_samples(LeNet& classifier, const torch::Tensor& samples, const ReferenceFeatures& reference) {
  const auto x = detail::checked_samples(samples, 3);
  auto q = detail::classify_samples(classifier, x);
  const auto f = features_of(classifier, x);
  q.frechet = frechet_distance(feature_statistics(f), reference.statistics);
  q.kernel = kernel_distance(f / reference.scale, reference.features / reference.scale);
  return q;
}

}  // namespace diffusion::eval
