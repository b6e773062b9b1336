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


TEST_CASE("sigma(t) is sqrt((1 - abar) / abar) at the timesteps and log-linear between them", "[schedule][sigma]") {
  const auto oracle = [](double abar) { return std::sqrt((1.0 - abar) / abar); };
  NoiseSchedule linear, cosine(NoiseScheduleOptions().kind(ScheduleKind::Cosine));
  for (const auto& [s, table] : {std::pair{&linear, &kLinearAbar}, std::pair{&cosine, &kCosineAbar}}) {
    for (const auto& [t, abar] : *table) {
      INFO("t = " << t);
      CHECK_THAT(s->sigma(static_cast<double>(t)), WithinRel(oracle(abar), 1e-10));
      CHECK(s->timestep(s->sigma(static_cast<double>(t))) == static_cast<double>(t));
    }
    CHECK(s->sigma_min() == s->sigma(0.0));
    CHECK(s->sigma_max() == s->sigma(999.0));
  }
  // Halfway between two timesteps, log sigma is halfway: the geometric mean.
  const double a = linear.sigma(487), b = linear.sigma(488);
  CHECK_THAT(linear.sigma(487.5), WithinRel(std::sqrt(a * b), 1e-12));
  CHECK_THAT(linear.sigma(487.25), WithinRel(std::exp(0.75 * std::log(a) + 0.25 * std::log(b)), 1e-12));
  // timestep() inverts sigma() anywhere in range, and both increase.
  double previous = 0.0;
  for (const double t : {0.0, 0.125, 0.5, 1.0, 10.75, 487.5, 998.25, 998.999, 999.0}) {
    INFO("t = " << t);
    CHECK_THAT(linear.timestep(linear.sigma(t)), WithinAbs(t, 1e-9));
    CHECK_THAT(cosine.timestep(cosine.sigma(t)), WithinAbs(t, 1e-9));
    CHECK(linear.sigma(t) > previous);
    previous = linear.sigma(t);
  }
  // The ends, also from a value rounded a hair past them (as a plan computed from the ends may be).
  CHECK(linear.timestep(linear.sigma_min() * (1 - 1e-12)) == 0.0);
  CHECK(linear.timestep(linear.sigma_max() * (1 + 1e-12)) == 999.0);
}

TEST_CASE("sigma(t) on a zero-terminal-SNR schedule ends at +inf", "[schedule][sigma]") {
  NoiseSchedule z(NoiseScheduleOptions().zero_terminal_snr(true));
  CHECK(std::isinf(z.sigma_max()));
  CHECK(std::isinf(z.sigma(999.0)));
  CHECK(std::isinf(z.sigma(998.5)));
  CHECK(std::isfinite(z.sigma(998.0)));
  CHECK(z.timestep(std::numeric_limits<double>::infinity()) == 999.0);
  CHECK(z.timestep(z.sigma(998.0)) == 998.0);
  CHECK(z.timestep(z.sigma(998.0) * 10) == 998.0);  // no finite level lies past 998 in log sigma
  CHECK_THAT(z.timestep(z.sigma(500.5)), WithinAbs(500.5, 1e-9));
}

TEST_CASE("sigma(t) and timestep(sigma) refuse what is out of range", "[schedule][sigma][errors]") {
  NoiseSchedule s;
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  CHECK_REFUSED(s.sigma(-0.5), "t must be in [0, 999], got -0.5");
  CHECK_REFUSED(s.sigma(999.5), "t must be in [0, 999], got 999.5");
  CHECK_REFUSED(s.sigma(nan), "t must be in [0, 999], got nan");
  CHECK_REFUSED(s.timestep(0.0), "sigma must be in the schedule's range");
  CHECK_REFUSED(s.timestep(-1.0), "sigma must be in the schedule's range");
  CHECK_REFUSED(s.timestep(nan), "sigma must be in the schedule's range");
  CHECK_REFUSED(s.timestep(inf), "sigma must be in the schedule's range");
  CHECK_REFUSED(s.timestep(s.sigma_max() * 1.01), "sigma must be in the schedule's range");
  CHECK_REFUSED(s.timestep(s.sigma_min() * 0.99), "sigma must be in the schedule's range");
  // A degenerate schedule whose first levels round to 0 still refuses sigma = 0.
  NoiseSchedule flat(NoiseScheduleOptions().beta_start(1e-20).beta_end(1e-20));
  CHECK(flat.sigma_min() == 0.0);
  CHECK_REFUSED(flat.timestep(0.0), "sigma must be in the schedule's range");
  NoiseSchedule one(NoiseScheduleOptions().num_timesteps(1));
  CHECK(one.timestep(one.sigma(0.0)) == 0.0);
  CHECK_REFUSED(one.sigma(0.5), "t must be in [0, 0], got 0.5");
}
