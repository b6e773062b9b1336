#pragma once

#include <diffusion/random.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
#include <string>
#include <vector>

/// The 2-D distributions every diffusion course starts from, with their exact densities, so that a
/// model's samples can be scored by likelihood under the truth (eval::sliced_wasserstein compares them
/// to fresh true samples).
namespace diffusion::data {

/// A distribution over the plane that can be sampled and whose density is known.
class ToyDistribution {
 public:
  virtual ~ToyDistribution() = default;
  /// `n` >= 1 independent draws, (n, 2) float32, the same for the same seed.
  virtual torch::Tensor sample(int64_t n, uint64_t seed) const = 0;
  /// log p(x) for points x (N, 2) (any floating dtype, the CPU), as (N,) float64.
  virtual torch::Tensor log_prob(const torch::Tensor& x) const = 0;
  /// Its registered name ("eight_gaussians", "two_moons").
  virtual std::string name() const = 0;
};

namespace detail {

inline torch::Tensor check_points(const char* who, const torch::Tensor& x) {
  TORCH_CHECK(x.defined() && x.is_floating_point() && x.dim() == 2 && x.size(1) == 2, who,
              ": expected floating-point points (N, 2), got ",
              x.defined() ? c10::str(x.scalar_type(), " of shape ", x.sizes()) : std::string("an undefined tensor"));
  return x.to(torch::kCPU, torch::kFloat64);
}

/// log sum_k w_k N(x; centers_k, s^2 I) in 2-D for x (N, 2), centers (K, 2) and log_weights (K,), by
/// chunks of x so memory stays bounded.
inline torch::Tensor log_mixture(const torch::Tensor& x, const torch::Tensor& centers, const torch::Tensor& log_weights, double s) {
  std::vector<torch::Tensor> parts;
  const double norm = -std::log(2 * std::numbers::pi * s * s);
  for (int64_t i = 0; i < x.size(0); i += 1024) {
    const auto d2 = torch::cdist(x.slice(0, i, i + 1024), centers).pow(2);
    parts.push_back(torch::logsumexp(d2 / (-2 * s * s) + log_weights, 1) + norm);
  }
  return parts.empty() ? torch::empty({0}, torch::kFloat64) : torch::cat(parts);
}

}  // namespace detail

/// Eight Gaussians: the mixture of 8 equally weighted isotropic normals of standard deviation `std`
/// centred on the circle of radius `radius` at angles 2 pi k / 8 (Grathwohl et al. 2019's FFJORD toy
/// set, here with radius 2 and std 0.25 by default). log p(x) = log (1/8) sum_k N(x; c_k, std^2 I), exact.
class EightGaussians : public ToyDistribution {
 public:
  explicit EightGaussians(double radius = 2.0, double std = 0.25) : radius_(radius), std_(std) {
    TORCH_CHECK(radius >= 0 && std::isfinite(radius) && std > 0 && std::isfinite(std),
                "EightGaussians: radius must be >= 0 and std > 0 (finite), got ", radius, " and ", std);
  }
  torch::Tensor sample(int64_t n, uint64_t seed) const override {
    TORCH_CHECK(n >= 1, "EightGaussians::sample: n must be >= 1, got ", n);
    auto g = make_generator(seed);
    const auto k = torch::randint(8, {n}, g, torch::kLong);
    return (centers().index_select(0, k) + std_ * torch::randn({n, 2}, g, torch::kFloat64)).to(torch::kFloat32);
  }
  torch::Tensor log_prob(const torch::Tensor& x) const override {
    return detail::log_mixture(detail::check_points("EightGaussians::log_prob", x), centers(),
                               torch::full({8}, -std::log(8.0), torch::kFloat64), std_);
  }
  std::string name() const override { return "eight_gaussians"; }
  /// The 8 centres, (8, 2) float64.
  torch::Tensor centers() const {
    const auto angle = torch::arange(8, torch::kFloat64) * (2 * std::numbers::pi / 8);
    return torch::stack({angle.cos(), angle.sin()}, 1) * radius_;
  }

 private:
  double radius_, std_;
};

/// Two moons (scikit-learn's make_moons): the upper half circle (cos u, sin u) and the lower one
/// (1 - cos u, 1/2 - sin u), u uniform on [0, pi], each with probability 1/2, plus isotropic normal noise
/// of standard deviation `noise`; then centred ((1/2, 1/4) subtracted) and scaled by `scale`, so that
/// the default (noise 0.1, scale 2) spans about [-3, 3] x [-2, 2]. Its density, a normal smoothed over
/// the two arcs, has no closed form: log_prob integrates u by Simpson's rule over `intervals` (even) a
/// moon; at the default count, 16 times as many change log p by less than 1e-8 on the distribution's own
/// samples and by less than 1e-4 anywhere in [-4, 4]^2 (tested).
class TwoMoons : public ToyDistribution {
 public:
  static constexpr int64_t default_intervals = 2048;
  explicit TwoMoons(double noise = 0.1, double scale = 2.0, int64_t intervals = default_intervals)
      : noise_(noise), scale_(scale), intervals_(intervals) {
    TORCH_CHECK(noise > 0 && std::isfinite(noise) && scale > 0 && std::isfinite(scale) && intervals >= 2 &&
                    intervals % 2 == 0 && intervals <= (int64_t{1} << 24),
                "TwoMoons: noise and scale must be > 0 (finite) and intervals even in [2, 2^24], got ", noise, ", ", scale,
                " and ", intervals);
  }
  torch::Tensor sample(int64_t n, uint64_t seed) const override {
    TORCH_CHECK(n >= 1, "TwoMoons::sample: n must be >= 1, got ", n);
    auto g = make_generator(seed);
    const auto moon = torch::randint(2, {n}, g, torch::kLong);
    const auto u = torch::rand({n}, g, torch::kFloat64) * std::numbers::pi;
    const auto noise = noise_ * torch::randn({n, 2}, g, torch::kFloat64);
    return ((arcs(u, moon) + noise) * scale_).to(torch::kFloat32);
  }
  torch::Tensor log_prob(const torch::Tensor& x) const override {
    // p(y) = sum over the moons of (1/2)(1/pi) int_0^pi N(y; arc(u), noise^2 I) du, and x = scale y:
    // normals of std scale * noise around the scaled arcs. Simpson's weights (h/3)(1, 4, 2, ..., 4, 1).
    const int64_t m = intervals_;
    const double h = std::numbers::pi / static_cast<double>(m);
    const auto u = torch::arange(m + 1, torch::kFloat64) * h;
    auto w = torch::where(torch::arange(m + 1) % 2 == 1, torch::full({m + 1}, 4.0, torch::kFloat64), torch::full({m + 1}, 2.0, torch::kFloat64));
    w[0] = 1.0;
    w[m] = 1.0;
    const auto log_w = (w * (h / 3 / (2 * std::numbers::pi))).log();
    const auto points = torch::cat({arcs(u, torch::zeros({m + 1}, torch::kLong)), arcs(u, torch::ones({m + 1}, torch::kLong))});
    return detail::log_mixture(detail::check_points("TwoMoons::log_prob", x), points * scale_, torch::cat({log_w, log_w}),
                               noise_ * scale_);
  }
  std::string name() const override { return "two_moons"; }

 private:
  /// The centred arcs at parameters u (float64) for moons 0 (upper) and 1 (lower).
  static torch::Tensor arcs(const torch::Tensor& u, const torch::Tensor& moon) {
    const auto upper = torch::stack({u.cos(), u.sin()}, 1);
    const auto lower = torch::stack({1 - u.cos(), 0.5 - u.sin()}, 1);
    const auto centre = torch::tensor({0.5, 0.25}, torch::kFloat64);
    return torch::where(moon.eq(0).unsqueeze(1), upper, lower) - centre;
  }

  double noise_, scale_;
  int64_t intervals_;
};

/// The toy distributions by name: "eight_gaussians" or "two_moons", at their defaults. Refused: another name.
inline std::unique_ptr<ToyDistribution> make_toy_distribution(const std::string& name) {
  if (name == "eight_gaussians") return std::make_unique<EightGaussians>();
  if (name == "two_moons") return std::make_unique<TwoMoons>();
  TORCH_CHECK(false, "make_toy_distribution: unknown distribution '", name, "'; known: eight_gaussians, two_moons");
  return nullptr;
}

}  // namespace diffusion::data
