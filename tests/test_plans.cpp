// Plans as noise levels: Karras, exponential and a discrete schedule's spacings, ending in 0.
#include "helpers.hpp"

#include <diffusion/sampling/plans.hpp>

TEST_CASE("karras_sigmas is EDM's eq. 5 then 0", "[plans]") {
  for (const double rho : {7.0, 1.0, 3.0}) {
    for (const int64_t n : {1, 2, 10, 30}) {
      INFO("rho = " << rho << ", steps = " << n);
      const double smin = 0.002, smax = 80.0;
      const auto sigmas = karras_sigmas(n, smin, smax, rho);
      REQUIRE(sigmas.size() == static_cast<size_t>(n) + 1);
      CHECK(sigmas.back() == 0.0);
      for (int64_t i = 0; i < n; ++i) {  // the formula in long double, written out again
        const long double ramp = n == 1 ? 0.0L : static_cast<long double>(i) / (n - 1);
        const long double hi = std::pow(static_cast<long double>(smax), 1.0L / rho);
        const long double lo = std::pow(static_cast<long double>(smin), 1.0L / rho);
        const auto expected = static_cast<double>(std::pow(hi + ramp * (lo - hi), static_cast<long double>(rho)));  // as eq. 5 reads
        CHECK_THAT(sigmas[static_cast<size_t>(i)], WithinRel(expected, 1e-12));
      }
      CHECK(sigmas.front() == smax);  // the ends exactly
      if (n > 1) CHECK(sigmas[static_cast<size_t>(n - 1)] == smin);
    }
  }
  // rho = 1 is uniform in sigma.
  const auto uniform = karras_sigmas(5, 1.0, 5.0, 1.0);
  for (size_t i = 0; i < 5; ++i) CHECK_THAT(uniform[i], WithinAbs(5.0 - static_cast<double>(i), 1e-12));
}

TEST_CASE("exponential_sigmas is uniform in log sigma then 0", "[plans]") {
  const auto sigmas = exponential_sigmas(8, 0.01, 10.0);
  REQUIRE(sigmas.size() == 9);
  CHECK(sigmas.back() == 0.0);
  CHECK(sigmas.front() == 10.0);
  CHECK(sigmas[7] == 0.01);
  const double ratio = std::pow(0.01 / 10.0, 1.0 / 7.0);  // a constant ratio between neighbours
  for (size_t i = 0; i + 2 < sigmas.size(); ++i) CHECK_THAT(sigmas[i + 1] / sigmas[i], WithinRel(ratio, 1e-12));
  CHECK(exponential_sigmas(1, 0.5, 2.0) == std::vector<double>{2.0, 0.0});
}

TEST_CASE("discrete_sigmas are the schedule's sigmas at the spacing's timesteps", "[plans]") {
  NoiseSchedule s;
  for (const auto spacing : {TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace}) {
    const auto plan = timestep_plan(1000, 20, spacing);
    const auto sigmas = discrete_sigmas(s, 20, spacing);
    REQUIRE(sigmas.size() == 21);
    for (size_t i = 0; i < plan.size(); ++i) CHECK(sigmas[i] == s.sigma(static_cast<double>(plan[i])));
    CHECK(sigmas.back() == 0.0);
  }
  // Every step count of a T = 50 schedule gives a valid plan (no repeated level, no zero-length step).
  NoiseSchedule small(NoiseScheduleOptions().num_timesteps(50));
  for (int64_t n = 1; n <= 50; ++n) {
    for (const auto spacing : {TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace}) {
      CHECK_NOTHROW(discrete_sigmas(small, n, spacing));
    }
  }
  // Zero terminal SNR: a spacing that visits T-1 starts at +inf, which is a valid start.
  NoiseSchedule z(NoiseScheduleOptions().zero_terminal_snr(true));
  CHECK(std::isinf(discrete_sigmas(z, 10, TimestepSpacing::Trailing).front()));
  CHECK(std::isfinite(discrete_sigmas(z, 10, TimestepSpacing::Leading).front()));
}

TEST_CASE("plans on a discrete schedule's range stay within what timestep() accepts", "[plans]") {
  NoiseSchedule s(NoiseScheduleOptions().kind(ScheduleKind::Cosine));
  for (const auto& sigmas : {karras_sigmas(25, s.sigma_min(), s.sigma_max()),
                             exponential_sigmas(25, s.sigma_min(), s.sigma_max())}) {
    double previous = 1000.0;
    for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
      const double t = s.timestep(sigmas[i]);
      CHECK(t < previous);
      previous = t;
    }
    CHECK_THAT(s.timestep(sigmas.front()), WithinAbs(999.0, 1e-9));
    CHECK_THAT(s.timestep(sigmas[24]), WithinAbs(0.0, 1e-9));
  }
}

TEST_CASE("plans refuse bad ranges, and check_plan refuses what is not a plan", "[plans][errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  CHECK_REFUSED(karras_sigmas(0, 0.1, 10), "karras_sigmas: steps must be >= 1, got 0");
  CHECK_REFUSED(karras_sigmas(5, 0.0, 10), "sigma_min must be positive and finite, got 0");
  CHECK_REFUSED(karras_sigmas(5, nan, 10), "sigma_min must be positive and finite");
  CHECK_REFUSED(karras_sigmas(5, 0.1, inf), "sigma_max must be finite, got inf");
  CHECK_REFUSED(karras_sigmas(5, 10, 0.1), "sigma_min must be below sigma_max");
  CHECK_REFUSED(karras_sigmas(5, 1, 1), "sigma_min must be below sigma_max");
  CHECK(karras_sigmas(1, 1, 1) == std::vector<double>{1.0, 0.0});
  CHECK_REFUSED(karras_sigmas(5, 0.1, 10, 0.0), "rho must be positive and finite, got 0");
  CHECK_REFUSED(karras_sigmas(5, 0.1, 10, nan), "rho must be positive and finite");
  // One step is {sigma_max, 0} whatever rho; with more, a rho that takes a level out of double's range is
  // named, as is one that collapses the levels onto each other.
  CHECK(karras_sigmas(1, 0.002, 80, 0.001) == std::vector<double>{80.0, 0.0});
  CHECK(karras_sigmas(1, 0.002, 80, 1e300) == std::vector<double>{80.0, 0.0});
  CHECK_REFUSED(karras_sigmas(10, 0.002, 80, 0.001), "karras_sigmas (rho = 0.001): this rho over [sigma_min, sigma_max]");
  CHECK_REFUSED(karras_sigmas(10, 0.002, 80, 0.001), "leaves double's range (level 1 came out as inf)");
  CHECK_REFUSED(karras_sigmas(10, 0.002, 80, 1e300), "karras_sigmas (rho = 1e+300): noise levels must decrease strictly");
  // More levels than a vector can hold: a c10::Error, not std::length_error.
  CHECK_REFUSED(karras_sigmas(std::numeric_limits<int64_t>::max(), 0.1, 10), "steps are more than a plan can hold");
  CHECK_REFUSED(exponential_sigmas(std::numeric_limits<int64_t>::max(), 0.1, 10), "steps are more than a plan can hold");
  // So many steps over so narrow a range that neighbours round to the same double.
  CHECK_REFUSED(karras_sigmas(1000, 1.0, 1.0 + 1e-13), "noise levels must decrease strictly");
  CHECK_REFUSED(exponential_sigmas(0, 0.1, 10), "exponential_sigmas: steps must be >= 1, got 0");
  CHECK_REFUSED(exponential_sigmas(3, 0.1, inf), "sigma_max must be finite");
  CHECK_REFUSED(exponential_sigmas(1000, 1.0, 1.0 + 1e-13), "noise levels must decrease strictly");
  NoiseSchedule z(NoiseScheduleOptions().zero_terminal_snr(true));
  CHECK_REFUSED(karras_sigmas(10, z.sigma_min(), z.sigma_max()), "sigma_max must be finite, got inf");

  CHECK_NOTHROW(check_plan({1.0, 0.0}));
  CHECK_NOTHROW(check_plan({inf, 2.0, 1.0, 0.0}));
  CHECK_REFUSED(check_plan({0.0}), "at least two noise levels");
  CHECK_REFUSED(check_plan({2.0, 1.0}), "must end at sigma = 0, got 1");
  CHECK_REFUSED(check_plan({2.0, 2.0, 0.0}), "must decrease strictly, got 2 at 0 then 2 at 1");
  CHECK_REFUSED(check_plan({1.0, 2.0, 0.0}), "must decrease strictly");
  CHECK_REFUSED(check_plan({2.0, inf, 0.0}), "noise level 1 must be positive and finite (only the first may be +inf)");
  CHECK_REFUSED(check_plan({2.0, nan, 0.0}), "noise level 1 must be positive and finite");
  CHECK_REFUSED(check_plan({-1.0, 0.0}), "noise level 0 must be positive");
}
