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

TEST_CASE("kernel distance equals its pair sums, and its jackknife the leave-one-out recomputation", "[eval]") {
  auto gen = make_generator(5);
  const auto a = torch::randn({4, 3}, gen, torch::kFloat64), b = torch::randn({5, 3}, gen, torch::kFloat64) + 0.5;
  const auto k = [](const torch::Tensor& p, int64_t i, const torch::Tensor& q, int64_t j) {
    return std::pow(p[i].dot(q[j]).item<double>() / 3 + 1, 3);
  };
  // The U-statistic written out pair by pair, over the rows kept.
  const auto u = [&](const std::vector<int64_t>& ia, const std::vector<int64_t>& ib) {
    double xx = 0, yy = 0, xy = 0;
    for (auto i : ia) for (auto j : ia) if (i != j) xx += k(a, i, a, j);
    for (auto i : ib) for (auto j : ib) if (i != j) yy += k(b, i, b, j);
    for (auto i : ia) for (auto j : ib) xy += k(a, i, b, j);
    const double n = static_cast<double>(ia.size()), m = static_cast<double>(ib.size());
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m);
  };
  const std::vector<int64_t> all_a{0, 1, 2, 3}, all_b{0, 1, 2, 3, 4};
  const auto jack = [&](bool drop_a) {
    std::vector<double> loo;
    const auto& all = drop_a ? all_a : all_b;
    for (auto skip : all) {
      std::vector<int64_t> kept;
      for (auto i : all) if (i != skip) kept.push_back(i);
      loo.push_back(drop_a ? u(kept, all_b) : u(all_a, kept));
    }
    double mean = 0, var = 0;
    for (auto v : loo) mean += v / static_cast<double>(loo.size());
    for (auto v : loo) var += (v - mean) * (v - mean);
    return var * static_cast<double>(loo.size() - 1) / static_cast<double>(loo.size());
  };
  const auto kd = kernel_distance(a, b);
  CHECK_THAT(kd.value, WithinAbs(u(all_a, all_b), 1e-12));
  CHECK_THAT(kd.standard_error, WithinAbs(std::sqrt(jack(true) + jack(false)), 1e-12));
  const auto blocked = kernel_distance(a, b, 1);  // one row at a time: the same sums
  CHECK_THAT(blocked.value, WithinAbs(kd.value, 1e-12));
  CHECK_THAT(blocked.standard_error, WithinAbs(kd.standard_error, 1e-12));
  CHECK_REFUSED(kernel_distance(a.slice(0, 0, 2), b), "need at least 3 rows in each set");
  CHECK_REFUSED(kernel_distance(a, b.slice(1, 0, 2)), "with the same D >= 1, got [4, 3] and [5, 2]");
  CHECK_REFUSED(kernel_distance(a.flatten(), b), "features must be (N, D) and (M, D)");
  CHECK_REFUSED(kernel_distance(a, b, 0), "block must be >= 1, got 0");
}

TEST_CASE("kernel distance is unbiased at 5 samples, and its standard error is the spread over draws", "[eval]") {
  // D = 1: k(x, y) = (x y + 1)^3 = x^3 y^3 + 3 x^2 y^2 + 3 x y + 1, so MMD^2 in closed form from the first
  // three moments: (m3 - m3')^2 + 3 (m2 - m2')^2 + 3 (m1 - m1')^2. N(0, 1) against N(1/2, 1): m1' = 1/2,
  // m2' = 5/4, m3' = 1/8 + 3/2; MMD^2 = (13/8)^2 + 3 / 16 + 3 / 4.
  const double exact = 169.0 / 64 + 3.0 / 16 + 3.0 / 4;
  auto gen = make_generator(11);
  const int reps = 4000;
  std::vector<double> values;
  for (int r = 0; r < reps; ++r) {
    values.push_back(kernel_distance(torch::randn({5, 1}, gen, torch::kFloat64),
                                     torch::randn({5, 1}, gen, torch::kFloat64) + 0.5).value);
  }
  const auto v = torch::tensor(values, torch::kFloat64);
  const double mean = v.mean().item<double>(), se = v.std().item<double>() / std::sqrt(double(reps));
  // The biased (all-pairs, diagonal kept) estimate would sit about (E k(x,x) - E k(x,x')) / 5 = 4.8 higher.
  INFO("mean over draws " << mean << " +- " << se << ", exact " << exact);
  CHECK(std::abs(mean - exact) < 4 * se);

  // The jackknife's standard error against the spread of the estimate over 300 independent draws of
  // 100 against 100 in D = 4 (the spread's own relative standard error is about 1/sqrt(600) = 4%).
  const auto calibration = [&](double shift) {
    std::vector<double> draws, errors;
    for (int r = 0; r < 300; ++r) {
      const auto kd = kernel_distance(torch::randn({100, 4}, gen, torch::kFloat64),
                                      torch::randn({100, 4}, gen, torch::kFloat64) + shift);
      draws.push_back(kd.value);
      errors.push_back(kd.standard_error);
    }
    return std::pair{torch::tensor(draws, torch::kFloat64).std().item<double>(),
                     torch::tensor(errors, torch::kFloat64).mean().item<double>()};
  };
  const auto [spread, claimed] = calibration(0.3);
  INFO("distinct distributions: spread over draws " << spread << ", mean jackknife standard error " << claimed);
  CHECK(claimed > 0.8 * spread);
  CHECK(claimed < 1.25 * spread);
  // Where the two distributions are equal the U-statistic is degenerate and the jackknife errs on the
  // safe side (Efron & Stein 1981): its standard error is larger than the spread, never smaller.
  const auto [null_spread, null_claimed] = calibration(0.0);
  INFO("equal distributions: spread over draws " << null_spread << ", mean jackknife standard error " << null_claimed);
  CHECK(null_claimed > 0.95 * null_spread);
  CHECK(null_claimed < 2.5 * null_spread);
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

TEST_CASE("sliced Wasserstein is exact for shifts, meets its floor on true samples, and grows with the error", "[eval][toy]") {
  const auto a = torch::randn({3000, 2}, make_generator(1), torch::kFloat64);
  CHECK(eval::sliced_wasserstein(a, a) == 0.0);
  // In 1-D every direction is +-1: a shift by v is exactly |v|, whatever the order of the points.
  const auto line = torch::randn({500, 1}, make_generator(2), torch::kFloat64);
  CHECK_THAT(eval::sliced_wasserstein(line, line.flip(0) + 0.7, 10), WithinRel(0.7, 1e-12));
  // In 2-D a shift by v gives sqrt(mean (v . theta)^2) over the directions: |v| / sqrt(2) in expectation;
  // with 1000 directions the mean of cos^2 is within 0.05 of 1/2 (its standard deviation is 0.011).
  const auto v = torch::tensor({0.6, -0.8}, torch::kFloat64);
  CHECK_THAT(eval::sliced_wasserstein(a, a + v), WithinAbs(1.0 / std::sqrt(2.0), 0.05));
  // True samples against true samples (the floor) score far below samples shifted by 0.5 or too wide.
  const data::EightGaussians truth;
  const auto reference = truth.sample(2000, 3), other = truth.sample(2000, 4);
  const double floor = eval::sliced_wasserstein(other, reference);
  CHECK(floor < 0.08);
  CHECK(eval::sliced_wasserstein(other + 0.5, reference) > 3 * floor);
  CHECK(eval::sliced_wasserstein(other * 1.3, reference) > 3 * floor);
  // And the likelihood under the truth: shifted or widened samples score worse than true ones.
  const auto nll = [&](const torch::Tensor& x) { return -truth.log_prob(x).mean().item<double>(); };
  CHECK(nll(other + 0.5) > nll(other) + 0.5);
  CHECK(nll(other * 1.3) > nll(other) + 0.5);
  // Refused: unequal sets, other shapes, no projections.
  CHECK_REFUSED(eval::sliced_wasserstein(a, a.slice(0, 1)), "the sets must have the same shape (N, D), got [3000, 2] and [2999, 2]");
  CHECK_REFUSED(eval::sliced_wasserstein(a.reshape({-1}), a.reshape({-1})), "a must be floating-point points (N, D)");
  CHECK_REFUSED(eval::sliced_wasserstein(a, a.to(torch::kLong)), "b must be floating-point points (N, D)");
  CHECK_REFUSED(eval::sliced_wasserstein(a, a, 0), "projections must be >= 1, got 0");
}
