#pragma once

#include <diffusion/detail/check.hpp>

#include <torch/torch.h>

/// The Frechet distance between Gaussians fitted to two sets of features (the quantity behind FID).
namespace diffusion::eval {

/// Mean and covariance of a feature set, in float64.
struct FeatureStatistics {
  /// (D,)
  torch::Tensor mean;
  /// (D, D), the unbiased sample covariance.
  torch::Tensor covariance;
  int64_t count = 0;
};

/// Fits a Gaussian to `features` (N, D), N >= 2.
inline FeatureStatistics feature_statistics(const torch::Tensor& features) {
  TORCH_CHECK(features.defined() && features.dim() == 2 && features.size(0) >= 2,
              "feature_statistics: features must be (N, D) with N >= 2, got ",
              features.defined() ? detail::shape_str(features) : "an undefined tensor");
  const auto f = features.detach().to(torch::kCPU, torch::kFloat64);
  const auto mean = f.mean(0);
  const auto centered = f - mean;
  return {mean, centered.t().mm(centered) / static_cast<double>(f.size(0) - 1), f.size(0)};
}

/// d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))   (Dowson & Landau 1982; Heusel et al. 2017)
///
/// Tr((S_1 S_2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
/// matrix S_1^(1/2) S_2 S_1^(1/2), which has the same eigenvalues as S_1 S_2 and is stable for the
/// positive semi-definite covariances of real features.
inline double frechet_distance(const FeatureStatistics& a, const FeatureStatistics& b) {
  TORCH_CHECK(a.mean.defined() && b.mean.defined() && a.mean.sizes() == b.mean.sizes(),
              "frechet_distance: the two feature sets must have the same dimension, got ",
              a.mean.defined() ? detail::shape_str(a.mean) : "undefined", " and ",
              b.mean.defined() ? detail::shape_str(b.mean) : "undefined");
  // The ATen spellings (torch::linalg_eigh), not torch::linalg::eigh: Debian's LibTorch 2.x ships no
  // torch/linalg.h, and these exist in 1.13 and 2.x alike.
  const auto sym_sqrt = [](const torch::Tensor& s) {
    const auto [values, vectors] = torch::linalg_eigh(s, "L");
    return vectors.mm(torch::diag(values.clamp_min(0).sqrt())).mm(vectors.t());
  };
  const auto root_a = sym_sqrt(a.covariance);
  auto m = root_a.mm(b.covariance).mm(root_a);
  m = (m + m.t()) / 2;  // symmetric up to rounding
  const double trace_sqrt = torch::linalg_eigvalsh(m, "L").clamp_min(0).sqrt().sum().item<double>();
  const double mean_term = (a.mean - b.mean).pow(2).sum().item<double>();
  return mean_term + a.covariance.trace().item<double>() + b.covariance.trace().item<double>() - 2 * trace_sqrt;
}

}  // namespace diffusion::eval
