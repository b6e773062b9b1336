// Sample-quality evaluation: the Frechet distance, the feature classifier, digit rate and class histogram.
#include "helpers.hpp"

using namespace diffusion::eval;

namespace eval_helpers {

FeatureStatistics stats(torch::Tensor mean, torch::Tensor cov) {
  return {mean.to(torch::kFloat64), cov.to(torch::kFloat64), 1000};
}

/// n images of ten classes: class c is a vertical bar at column 3 + 2c, plus N(0, 0.2^2) pixel noise.
std::pair<torch::Tensor, torch::Tensor> bars(int64_t n, uint64_t seed) {
  auto gen = make_generator(seed);
  auto labels = torch::randint(0, 10, {n}, gen, torch::kLong);
  auto x = torch::full({n, 1, 28, 28}, -1.0f) + 0.2 * torch::randn({n, 1, 28, 28}, gen);
  for (int64_t i = 0; i < n; ++i) x[i][0].select(1, 3 + 2 * labels[i].item<int64_t>()).slice(0, 4, 24).fill_(1.0f);
  return {x.clamp(-1, 1), labels};
}

}  // namespace eval_helpers
using namespace eval_helpers;


TEST_CASE("Frechet distance of two Gaussians equals its closed form", "[eval]") {
  // Diagonal covariances: sum (m1 - m2)^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
  const auto a = stats(torch::tensor({0.0, 1.0, 2.0}), torch::diag(torch::tensor({1.0, 4.0, 0.25})));
  const auto b = stats(torch::tensor({1.0, 1.0, 0.0}), torch::diag(torch::tensor({9.0, 1.0, 0.25})));
  const double expected = (1 + 0 + 4) + (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2) + 0;
  CHECK_THAT(frechet_distance(a, b), WithinAbs(expected, 1e-9));
  CHECK_THAT(frechet_distance(a, a), WithinAbs(0.0, 1e-9));
  // Non-commuting 2x2: for 2x2 M with real non-negative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
  const auto s1 = torch::tensor({{2.0, 0.5}, {0.5, 1.0}}), s2 = torch::tensor({{1.0, -0.3}, {-0.3, 3.0}});
  const double tr = s1.mm(s2).trace().item<double>(), det = s1.det().item<double>() * s2.det().item<double>();
  const double closed = 0.5 * 0.5 + (3.0 + 4.0) - 2 * std::sqrt(tr + 2 * std::sqrt(det));
  CHECK_THAT(frechet_distance(stats(torch::tensor({0.5, 0.0}), s1), stats(torch::tensor({0.0, 0.0}), s2)),
             WithinAbs(closed, 1e-6));
  // From samples: the fitted statistics of N(mu, I) draws approach the closed form.
  torch::manual_seed(0);
  const auto x = torch::randn({20000, 4}, torch::kFloat64), y = torch::randn({20000, 4}, torch::kFloat64) + 1.0;
  CHECK_THAT(frechet_distance(feature_statistics(x), feature_statistics(y)), WithinAbs(4.0, 0.1));
  CHECK_REFUSED(feature_statistics(torch::zeros({1, 4})), "features must be (N, D) with N >= 2");
  CHECK_REFUSED(frechet_distance(a, stats(torch::zeros({2}), torch::eye(2))), "must have the same dimension");
}

TEST_CASE("a trained feature classifier separates data from noise", "[eval]") {
  torch::manual_seed(1);
  const auto [train_x, train_y] = bars(2000, 1);
  const auto [test_x, test_y] = bars(500, 2);
  LeNet classifier;
  train_classifier(classifier, train_x, train_y, 3, 0);
  CHECK(accuracy(classifier, test_x, test_y) >= 0.98);

  const auto reference = feature_statistics(features_of(classifier, test_x));
  const auto floor = frechet_distance(feature_statistics(features_of(classifier, train_x)), reference);
  const auto noise = torch::rand({500, 1, 28, 28}, make_generator(3)) * 2 - 1;
  const auto ceiling = frechet_distance(feature_statistics(features_of(classifier, noise)), reference);
  INFO("floor " << floor << ", ceiling " << ceiling);
  CHECK(floor < 0.1 * ceiling);

  const auto good = evaluate_samples(classifier, test_x, reference);
  CHECK(good.digit_rate >= 0.95);
  CHECK(good.class_entropy > 0.95 * std::log(10.0));
  CHECK(good.min_class_share > 0.05);
  int64_t total = 0;
  for (const auto c : good.histogram) total += c;
  CHECK(total == 500);
  // Mode collapse shows: only class 3.
  const auto collapsed = evaluate_samples(classifier, test_x.index({test_y == 3}), reference);
  CHECK(collapsed.min_class_share == 0.0);
  CHECK(collapsed.class_entropy < 0.5);
  CHECK(collapsed.frechet > good.frechet);
  CHECK_REFUSED(classifier->features(torch::zeros({2, 1, 32, 32})), "expected (N, 1, 28, 28) images");
}
