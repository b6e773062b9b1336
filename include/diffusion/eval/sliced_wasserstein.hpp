#pragma once

#include <diffusion/random.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>

namespace diffusion::eval {

/// The sliced 2-Wasserstein distance between two equally sized point sets a and b (N, D) (Rabin et al.
/// 2011; Bonneel et al. 2015): sqrt of the mean over `projections` random unit directions theta (uniform on
/// the sphere, drawn from `seed`) of W_2^2 between the projected sets, each exact in 1-D: the mean squared
/// difference of the sorted projections. In the units of the data; 0 for identical sets; a set against
/// itself shifted by v gives sqrt(mean (v . theta)^2), |v| / sqrt(D) in expectation. Computed in float64
/// on the CPU. Refused: sets that are not (N, D) floating point with the same N >= 1 and D >= 1, and
/// projections < 1.
///
/// Example:
///   auto truth = data::TwoMoons().sample(5000, 1);
///   double floor = eval::sliced_wasserstein(truth, data::TwoMoons().sample(5000, 2));
///   double score = eval::sliced_wasserstein(samples, truth);
inline double sliced_wasserstein(const torch::Tensor& a, const torch::Tensor& b, int64_t projections = 1000, uint64_t seed = 0) {
  constexpr const char* fn = "sliced_wasserstein";
  const auto check = [&](const torch::Tensor& x, const char* name) {
    TORCH_CHECK(x.defined() && x.is_floating_point() && x.dim() == 2 && x.size(0) >= 1 && x.size(1) >= 1, fn, ": ", name,
                " must be floating-point points (N, D), got ",
                x.defined() ? c10::str(x.scalar_type(), " of shape ", x.sizes()) : std::string("an undefined tensor"));
  };
  check(a, "a");
  check(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes(), fn, ": the sets must have the same shape (N, D), got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(projections >= 1, fn, ": projections must be >= 1, got ", projections);
  auto theta = torch::randn({a.size(1), projections}, make_generator(seed), torch::kFloat64);
  theta = theta / theta.norm(2, 0, true);
  const auto pa = std::get<0>(a.to(torch::kCPU, torch::kFloat64).matmul(theta).sort(0));
  const auto pb = std::get<0>(b.to(torch::kCPU, torch::kFloat64).matmul(theta).sort(0));
  return std::sqrt((pa - pb).pow(2).mean().item<double>());
}

}  // namespace diffusion::eval
