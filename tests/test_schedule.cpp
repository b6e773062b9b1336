// The noise schedule's tables and the closed-form forward process q(x_t | x_0).
#include "catch.hpp"

#include <diffusion/diffusion.hpp>

#include <cmath>
#include <map>

using namespace diffusion;

namespace {

// abar_t computed outside LibTorch (Python, float64, from the formulas: linear betas
// beta_start + i (beta_end - beta_start) / (T - 1); cosine betas min(1 - f((i+1)/T) / f(i/T), 0.999)).
const std::map<int64_t, double> kLinearAbar = {
    {0, 0.9999},           {1, 0.9997800920720721}, {10, 0.997806572507846},      {100, 0.8951415908975365},
    {487, 0.08858573232059307}, {500, 0.07779665836502386}, {999, 4.0358297653756754e-05}};
const std::map<int64_t, double> kCosineAbar = {
    {0, 0.999958715775178},     {1, 0.9999125759273678},   {10, 0.9992789037733427},  {100, 0.9715756818078386},
    {487, 0.5125449999747288}, {500, 0.49228517244880304}, {999, 2.4287669070348567e-09}};

double value_at(const torch::Tensor& table, int64_t t) { return table[t].item<double>(); }

}  // namespace

TEST_CASE("linear schedule matches abar computed from the formula", "[schedule]") {
  NoiseSchedule s;  // the seed's defaults
  REQUIRE(s.timesteps() == 1000);
  REQUIRE(s.dtype() == torch::kFloat32);
  CHECK_THAT(value_at(s.betas, 0), WithinRel(1e-4, 1e-6));
  CHECK_THAT(value_at(s.betas, 999), WithinRel(0.02, 1e-6));
  for (const auto& [t, abar] : kLinearAbar) {
    INFO("t = " << t);
    CHECK_THAT(value_at(s.alphas_cumprod, t), WithinRel(abar, 2e-6));
    CHECK_THAT(s.host().alphas_cumprod[static_cast<size_t>(t)], WithinRel(abar, 1e-12));
  }
  // The values the issue quotes, and beta-tilde_0 = 0 exactly (no noise at the last reverse step).
  CHECK_THAT(value_at(s.posterior_variance, 487), WithinRel(0.00979157198569004, 1e-5));
  CHECK_THAT(value_at(s.posterior_variance, 999), WithinRel(0.01999998352656061, 1e-5));
  CHECK(value_at(s.posterior_variance, 0) == 0.0);
}

TEST_CASE("cosine schedule matches abar computed from the formula", "[schedule]") {
  NoiseSchedule s(NoiseScheduleOptions().kind(ScheduleKind::Cosine));
  for (const auto& [t, abar] : kCosineAbar) {
    INFO("t = " << t);
    CHECK_THAT(value_at(s.alphas_cumprod, t), WithinRel(abar, 2e-6));
    CHECK_THAT(s.host().alphas_cumprod[static_cast<size_t>(t)], WithinRel(abar, 1e-12));
  }
  // The last beta hits the clip (1 - f(1)/f((T-1)/T) would be 1).
  CHECK_THAT(value_at(s.betas, 999), WithinRel(0.999, 1e-6));
  CHECK(s.betas.max().item<double>() <= 0.999 + 1e-7);
}

TEST_CASE("derived tables agree with each other for both schedules", "[schedule]") {
  for (const auto kind : {ScheduleKind::Linear, ScheduleKind::Cosine}) {
    INFO(to_string(kind));
    NoiseSchedule s(NoiseScheduleOptions().kind(kind).dtype(torch::kFloat64));
    const auto& b = s.betas;
    CHECK(torch::allclose(s.alphas, 1 - b));
    CHECK(torch::allclose(s.alphas_cumprod, torch::cumprod(1 - b, 0)));
    CHECK(value_at(s.alphas_cumprod_prev, 0) == 1.0);
    CHECK(torch::allclose(s.alphas_cumprod_prev.slice(0, 1), s.alphas_cumprod.slice(0, 0, -1)));
    CHECK(torch::allclose(s.sqrt_alphas_cumprod.pow(2), s.alphas_cumprod));
    CHECK(torch::allclose(s.sqrt_one_minus_alphas_cumprod.pow(2), 1 - s.alphas_cumprod));
    CHECK(torch::allclose(s.sqrt_recip_alphas.pow(-2), s.alphas));
    CHECK(torch::allclose(s.posterior_variance,
                          b * (1 - s.alphas_cumprod_prev) / (1 - s.alphas_cumprod)));
    // abar decreases strictly: every step adds noise.
    CHECK((s.alphas_cumprod.slice(0, 1) < s.alphas_cumprod.slice(0, 0, -1)).all().item<bool>());
  }
}

TEST_CASE("schedule moves to a dtype and device, the original unchanged", "[schedule]") {
  NoiseSchedule s;
  const auto d = s.to(torch::kCPU, torch::kFloat64);
  CHECK(d.dtype() == torch::kFloat64);
  CHECK(d.posterior_variance.scalar_type() == torch::kFloat64);
  CHECK(d.options().dtype() == torch::kFloat64);
  CHECK(s.dtype() == torch::kFloat32);
  CHECK(torch::allclose(d.alphas_cumprod.to(torch::kFloat32), s.alphas_cumprod));
  if (torch::cuda::is_available()) {
    const auto g = s.to(torch::kCUDA);
    CHECK(g.device().is_cuda());
    CHECK(g.betas.device().is_cuda());
  }
  const auto one = NoiseSchedule(NoiseScheduleOptions().timesteps(1));
  CHECK(one.timesteps() == 1);
  CHECK(value_at(one.posterior_variance, 0) == 0.0);
}

TEST_CASE("schedule refuses bad options", "[schedule][errors]") {
  using O = NoiseScheduleOptions;
  CHECK_REFUSED(NoiseSchedule(O().timesteps(0)), "timesteps must be >= 1, got 0");
  CHECK_REFUSED(NoiseSchedule(O().beta_start(0.0)), "beta_start must be in (0, 1), got 0");
  CHECK_REFUSED(NoiseSchedule(O().beta_start(-0.1)), "beta_start must be in (0, 1)");
  CHECK_REFUSED(NoiseSchedule(O().beta_end(1.0)), "beta_end must be in (0, 1), got 1");
  CHECK_REFUSED(NoiseSchedule(O().beta_start(0.03).beta_end(0.02)), "beta_start must be <= beta_end");
  CHECK_REFUSED(NoiseSchedule(O().kind(ScheduleKind::Cosine).max_beta(1.0)), "max_beta must be in (0, 1)");
  CHECK_REFUSED(NoiseSchedule(O().kind(ScheduleKind::Cosine).cosine_s(-0.1)), "cosine_s must be >= 0");
  CHECK_REFUSED(NoiseSchedule(O().dtype(torch::kLong)), "dtype must be floating point");
  CHECK_REFUSED(NoiseSchedule().to(torch::kCPU, torch::kInt), "dtype must be floating point");
}

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

TEST_CASE("q_sample from a generator is reproducible; the default draw is random", "[forward]") {
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
