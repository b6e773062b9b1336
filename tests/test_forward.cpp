// The closed-form forward process q(x_t | x_0), prediction types and their conversions.
#include "helpers.hpp"


TEST_CASE("q_sample is sqrt(abar) x0 + sqrt(1 - abar) eps exactly for a given noise", "[forward]") {
  NoiseSchedule s;
  const auto x0 = torch::linspace(-1, 1, 4 * 2 * 3, torch::kFloat64).reshape({4, 2, 3}).to(torch::kFloat32);
  const auto eps = torch::linspace(2, -3, 4 * 2 * 3, torch::kFloat64).reshape({4, 2, 3}).to(torch::kFloat32);
  const auto t = torch::tensor({0, 10, 487, 999}, torch::kLong);
  const auto xt = q_sample(s, x0, t, eps);
  REQUIRE(xt.sizes() == x0.sizes());
  for (int64_t i = 0; i < 4; ++i) {
    const auto ti = static_cast<size_t>(t[i].item<int64_t>());
    const double abar = s.host().alphas_cumprod[ti];
    for (int64_t j = 0; j < 6; ++j) {
      const double x = x0[i].flatten()[j].item<double>(), e = eps[i].flatten()[j].item<double>();
      CHECK_THAT(xt[i].flatten()[j].item<double>(), WithinAbs(std::sqrt(abar) * x + std::sqrt(1 - abar) * e, 1e-6));
    }
  }
  // Any rank: (N,) and (N, C, H, W) alike.
  const auto flat = torch::ones({3});
  CHECK(torch::allclose(q_sample(s, flat, torch::tensor({0, 0, 0}), torch::zeros({3})),
                        torch::full({3}, std::sqrt(0.9999))));
}

TEST_CASE("q_sample from a generator is reproducible, the default draw is random", "[forward]") {
  NoiseSchedule s;
  const auto x0 = torch::zeros({8, 1, 4, 4});
  const auto t = torch::full({8}, 999, torch::kLong);
  auto g1 = make_generator(7), g2 = make_generator(7);
  CHECK(torch::equal(q_sample(s, x0, t, g1), q_sample(s, x0, t, g2)));
  CHECK(!torch::equal(q_sample(s, x0, t), q_sample(s, x0, t)));
}

TEST_CASE("q_sample matches iterating the one-step forward process in distribution", "[forward][statistics]") {
  // Iterating x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) eps_k for k = 0..t gives x_t ~ N(sqrt(abar_t) x0,
  // (1 - abar_t) I) (Ho et al. 2020, eq. 2 -> eq. 4). Compare both against those moments. With n samples per
  // pixel the sample mean has standard error sigma / sqrt(n) and the sample variance ~ sigma^2 sqrt(2 / n):
  // 5 standard errors fail a correct implementation with probability < 1e-6 per check.
  torch::manual_seed(1234);
  NoiseSchedule s(NoiseScheduleOptions().dtype(torch::kFloat64));
  const int64_t n = 20000;
  const auto pixel = torch::tensor({0.9, -0.5, 0.0}, torch::kFloat64);  // three pixels, each its own law
  const auto x0 = pixel.expand({n, 3}).contiguous();
  for (const int64_t t : {0, 50, 300, 999}) {
    INFO("t = " << t);
    auto x = x0.clone();
    for (int64_t k = 0; k <= t; ++k) {
      const double beta = s.host().betas[static_cast<size_t>(k)];
      x = std::sqrt(1 - beta) * x + std::sqrt(beta) * torch::randn_like(x);
    }
    const auto closed = q_sample(s, x0, torch::full({n}, t, torch::kLong));
    const double abar = s.host().alphas_cumprod[static_cast<size_t>(t)];
    const double var = 1 - abar, se_mean = std::sqrt(var / n), se_var = var * std::sqrt(2.0 / n);
    for (const auto& sample : {x, closed}) {
      for (int64_t p = 0; p < 3; ++p) {
        const auto col = sample.select(1, p);
        CHECK_THAT(col.mean().item<double>(), WithinAbs(std::sqrt(abar) * pixel[p].item<double>(), 5 * se_mean));
        CHECK_THAT(col.var().item<double>(), WithinAbs(var, 5 * se_var));
      }
    }
  }
}

TEST_CASE("q_sample refuses bad inputs", "[forward][errors]") {
  NoiseSchedule s;
  const auto x = torch::zeros({2, 1, 4, 4});
  const auto t = torch::tensor({0, 1});
  CHECK_REFUSED(q_sample(s, x, torch::tensor({0, 1000})), "t must be in [0, 1000), got values in [0, 1000]");
  CHECK_REFUSED(q_sample(s, x, torch::tensor({-1, 3})), "t must be in [0, 1000), got values in [-1, 3]");
  CHECK_REFUSED(q_sample(s, x, torch::tensor({0, 1, 2})), "t has 3 timesteps but the batch has 2 samples");
  CHECK_REFUSED(q_sample(s, x, torch::tensor({0})), "t has 1 timesteps but the batch has 2 samples");
  CHECK_REFUSED(q_sample(s, x, torch::tensor({{0, 1}})), "t must be 1-D");
  CHECK_REFUSED(q_sample(s, x, torch::tensor({0.0, 1.0})), "t must be an integer tensor");
  CHECK_REFUSED(q_sample(s, torch::zeros({2, 1, 4, 4}, torch::kLong), t), "x0 must be a floating-point tensor");
  CHECK_REFUSED(q_sample(s, torch::zeros({}), torch::tensor({0})), "x0 must have a batch dimension");
  CHECK_REFUSED(q_sample(s, torch::Tensor{}, t), "x0 is an undefined tensor");
  CHECK_REFUSED(q_sample(s, x, t, torch::zeros({2, 1, 4})), "noise must have x0's shape");
  CHECK_REFUSED(q_sample(s, x, t, torch::zeros({1, 1, 4, 4})), "noise must have x0's shape");  // no broadcasting
  CHECK_REFUSED(q_sample(s, x, t, torch::zeros({2, 1, 4, 4}, torch::kFloat64)), "noise has dtype Double");
  if (torch::cuda::is_available()) {
    CHECK_REFUSED(q_sample(s, x.cuda(), t.cuda()), "but the schedule is on cpu");
    CHECK_REFUSED(q_sample(s.to(torch::kCUDA), x.cuda(), t), "t is on cpu but x is on cuda");
  } else {
    // A schedule "on" the meta device stands in for another device where no GPU is present.
    CHECK_REFUSED(q_sample(s.to(torch::Device(torch::kMeta)), x, t), "x0 is on cpu but the schedule is on meta");
  }
}
TEST_CASE("convert_prediction converts epsilon, v and sample predictions to consistent (eps, x0)", "[sampler][prediction]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().dtype(torch::kFloat64));
  const auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto gen = make_generator(3);
  const auto x0 = torch::randn({4, 3}, gen, opts), eps = torch::randn({4, 3}, gen, opts);
  for (const int64_t t : {0, 10, 500, 999}) {
    INFO("t = " << t);
    const double a = schedule.host().sqrt_alphas_cumprod[static_cast<size_t>(t)];
    const double b = schedule.host().sqrt_one_minus_alphas_cumprod[static_cast<size_t>(t)];
    const auto x_t = x0 * a + eps * b;
    const auto v = eps * a - x0 * b;  // Salimans & Ho 2022
    for (const auto& [prediction, output] : {std::pair{Prediction::Epsilon, eps}, std::pair{Prediction::V, v},
                                              std::pair{Prediction::Sample, x0}}) {
      INFO(to_string(prediction));
      const auto d = convert_prediction(schedule, x_t, t, output, prediction);
      CHECK(torch::allclose(d.x0, x0, 1e-9, t == 999 && prediction == Prediction::Epsilon ? 1e-6 : 1e-9));
      CHECK(torch::allclose(d.eps, eps, 1e-9, t == 0 && prediction == Prediction::Sample ? 1e-6 : 1e-9));
    }
    // Clamped: x0 in [-0.5, 0.5] and eps recomputed to match it.
    const auto c = convert_prediction(schedule, x_t, t, v, Prediction::V, 0.5);
    CHECK(c.x0.abs().max().item<double>() <= 0.5);
    CHECK(torch::allclose(c.x0 * a + c.eps * b, x_t, 1e-9, 1e-9));
  }
  CHECK(parse_prediction("v") == Prediction::V);
  CHECK(parse_prediction("epsilon") == Prediction::Epsilon);
  CHECK(parse_prediction("sample") == Prediction::Sample);
  CHECK_REFUSED(parse_prediction("noise"), "expected \"epsilon\", \"v\" or \"sample\", got \"noise\"");
  CHECK_REFUSED(convert_prediction(schedule, x0, 1000, eps), "t must be in [0, 1000), got 1000");
  CHECK_REFUSED(convert_prediction(schedule, x0, 5, eps.slice(0, 0, 2)), "the prediction must have x_t's shape [4, 3]");
  CHECK_REFUSED(convert_prediction(schedule, x0, 5, eps, Prediction::Epsilon, -1), "clip_x0 must be >= 0");
  // The deprecated name converts alike.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  const auto old_name = denoise(schedule, x0, 5, eps, Prediction::V, 0.5);
#pragma GCC diagnostic pop
  const auto new_name = convert_prediction(schedule, x0, 5, eps, Prediction::V, 0.5);
  CHECK(torch::equal(old_name.x0, new_name.x0));
  CHECK(torch::equal(old_name.eps, new_name.eps));
}

