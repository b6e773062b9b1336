#pragma once

#include <diffusion/eval/classifier.hpp>
#include <diffusion/eval/frechet.hpp>

#include <torch/torch.h>

#include <array>
#include <cmath>
#include <cstdint>

/// Sample quality as numbers: Frechet distance in the classifier's feature space, digit rate, and the
/// class histogram with its entropy.
namespace diffusion::eval {

struct SampleQuality {
  /// Frechet distance between the samples' features and the reference set's.
  double frechet = 0;
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

/// Scores `samples` (N, 1, 28, 28) in [-1, 1] against the reference feature statistics.
inline SampleQuality evaluate_samples(LeNet& classifier, const torch::Tensor& samples,
                                      const FeatureStatistics& reference) {
  TORCH_CHECK(samples.dim() == 4 && samples.size(0) >= 2, "evaluate_samples: need at least 2 samples (N, 1, 28, 28), got ",
              detail::shape_str(samples));
  const auto x = samples.to(torch::kCPU, torch::kFloat32).clamp(-1, 1);
  SampleQuality q;
  q.frechet = frechet_distance(feature_statistics(features_of(classifier, x)), reference);
  const auto probs = batched(classifier, x, 1000, [&](const torch::Tensor& b) { return torch::softmax(classifier(b), 1); });
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

}  // namespace diffusion::eval
