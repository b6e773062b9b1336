// The noise schedule's tables: closed forms, derived tables, zero terminal SNR, JSON.
#include "helpers.hpp"

namespace schedule_values {

// abar_t computed outside LibTorch (Python, float64, from the formulas: linear betas
// beta_start + i (beta_end - beta_start) / (T - 1); cosine betas min(1 - f((i+1)/T) / f(i/T), 0.999)).
const std::map<int64_t, double> kLinearAbar = {
    {0, 0.9999},           {1, 0.9997800920720721}, {10, 0.997806572507846},      {100, 0.8951415908975365},
    {487, 0.08858573232059307}, {500, 0.07779665836502386}, {999, 4.0358297653756754e-05}};
const std::map<int64_t, double> kCosineAbar = {
    {0, 0.999958715775178},     {1, 0.9999125759273678},   {10, 0.9992789037733427},  {100, 0.9715756818078386},
    {487, 0.5125449999747288}, {500, 0.49228517244880304}, {999, 2.4287669070348567e-09}};

double value_at(const torch::Tensor& table, int64_t t) { return table[t].item<double>(); }

}  // namespace schedule_values
using namespace schedule_values;


TEST_CASE("linear schedule matches abar computed from the formula", "[schedule]") {
  NoiseSchedule s;  // the seed's defaults
  REQUIRE(s.num_timesteps() == 1000);
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
  const auto one = NoiseSchedule(NoiseScheduleOptions().num_timesteps(1));
  CHECK(one.num_timesteps() == 1);
  CHECK(value_at(one.posterior_variance, 0) == 0.0);
}

TEST_CASE("schedule refuses bad options", "[schedule][errors]") {
  using O = NoiseScheduleOptions;
  CHECK_REFUSED(NoiseSchedule(O().num_timesteps(0)), "timesteps must be >= 1, got 0");
  CHECK_REFUSED(NoiseSchedule(O().beta_start(0.0)), "beta_start must be in (0, 1), got 0");
  CHECK_REFUSED(NoiseSchedule(O().beta_start(-0.1)), "beta_start must be in (0, 1)");
  CHECK_REFUSED(NoiseSchedule(O().beta_end(1.0)), "beta_end must be in (0, 1), got 1");
  CHECK_REFUSED(NoiseSchedule(O().beta_start(0.03).beta_end(0.02)), "beta_start must be <= beta_end");
  CHECK_REFUSED(NoiseSchedule(O().kind(ScheduleKind::Cosine).max_beta(1.0)), "max_beta must be in (0, 1)");
  CHECK_REFUSED(NoiseSchedule(O().kind(ScheduleKind::Cosine).cosine_s(-0.1)), "cosine_s must be >= 0");
  CHECK_REFUSED(NoiseSchedule(O().dtype(torch::kLong)), "dtype must be floating point");
  CHECK_REFUSED(NoiseSchedule().to(torch::kCPU, torch::kInt), "dtype must be floating point");
}

