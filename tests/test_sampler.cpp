// The DDPM reverse step and sampling loop, checked end to end with a closed-form optimal denoiser.
#include "catch.hpp"

#include <diffusion/diffusion.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

using namespace diffusion;

namespace {

/// The optimal noise predictor for data x0 ~ N(mu, s^2) (every element independent): x_t is Gaussian with
/// mean sqrt(abar) mu and variance abar s^2 + 1 - abar, and E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu)
/// / (abar s^2 + 1 - abar). A backbone with no parameters, so the sampler can be proven without training.
struct GaussianOracleImpl : torch::nn::Module {
  GaussianOracleImpl(NoiseSchedule schedule, double mu, double s) : schedule(std::move(schedule)), mu(mu), s(s) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    const auto abar = schedule.alphas_cumprod.index_select(0, t).to(torch::kFloat64).reshape({-1, 1, 1, 1});
    const auto eps = (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s * s + 1 - abar);
    return eps.to(x.scalar_type());
  }
  NoiseSchedule schedule;
  double mu, s;
};
TORCH_MODULE(GaussianOracle);

/// Mean and std of the DDPM sampler's output under the oracle, by propagating N(m, v) through the linear
/// reverse steps exactly: x_{t-1} = A x_t + B + sigma_t z. The sampler targets N(mu, s^2) but with T steps
/// and sigma_t^2 = beta-tilde_t it lands slightly off (std about 1% low for the linear schedule); this is
/// that exact target.
std::pair<double, double> predicted_moments(const NoiseSchedule& schedule, double mu, double s) {
  const auto& h = schedule.host();
  double m = 0, v = 1;
  for (auto t = schedule.timesteps() - 1; t >= 0; --t) {
    const auto i = static_cast<size_t>(t);
    const double abar = h.alphas_cumprod[i];
    const double c = std::sqrt(1 - abar) / (abar * s * s + 1 - abar);
    const double k = h.betas[i] / h.sqrt_one_minus_alphas_cumprod[i];
    const double A = h.sqrt_recip_alphas[i] * (1 - k * c);
    const double B = h.sqrt_recip_alphas[i] * k * c * std::sqrt(abar) * mu;
    m = A * m + B;
    v = A * A * v + (t > 0 ? h.posterior_variance[i] : 0.0);
  }
  return {m, std::sqrt(v)};
}

}  // namespace

TEST_CASE("ddpm_step computes the posterior mean, adds sigma_t z, and adds nothing at t = 0", "[sampler]") {
  NoiseSchedule s;
  const auto x = torch::full({2, 3}, 0.7);
  const auto eps = torch::full({2, 3}, -0.2);
  const auto z = torch::full({2, 3}, 1.5);
  for (const int64_t t : {0, 1, 487, 999}) {
    INFO("t = " << t);
    const auto i = static_cast<size_t>(t);
    const auto& h = s.host();
    const double mean = (0.7 - h.betas[i] / h.sqrt_one_minus_alphas_cumprod[i] * -0.2) * h.sqrt_recip_alphas[i];
    const double expected = mean + (t > 0 ? std::sqrt(h.posterior_variance[i]) * 1.5 : 0.0);
    const auto out = ddpm_step(s, x, t, eps, z);
    CHECK_THAT(out[1][2].item<double>(), WithinAbs(expected, 1e-6));
  }
  // t = 0 needs no noise tensor at all.
  CHECK_NOTHROW(ddpm_step(s, x, 0, eps));
}

TEST_CASE("ddpm_step refuses bad inputs", "[sampler][errors]") {
  NoiseSchedule s;
  const auto x = torch::zeros({2, 3});
  CHECK_REFUSED(ddpm_step(s, x, 1000, x, x), "t must be in [0, 1000), got 1000");
  CHECK_REFUSED(ddpm_step(s, x, -1, x, x), "t must be in [0, 1000), got -1");
  CHECK_REFUSED(ddpm_step(s, x, 5, torch::zeros({1, 3}), x), "the predicted noise must have x_t's shape");
  CHECK_REFUSED(ddpm_step(s, x, 5, x), "the noise z must have x_t's shape");
  CHECK_REFUSED(ddpm_step(s, x, 5, x, torch::zeros({2, 1})), "the noise z must have x_t's shape");
  CHECK_REFUSED(ddpm_step(s, torch::zeros({2, 3}, torch::kInt), 5, x, x), "x_t must be a floating-point tensor");
}

TEST_CASE("DDPM sampling with the closed-form optimal denoiser reproduces N(mu, s^2)", "[sampler][statistics]") {
  // 200,000 independent samples: the sample mean has standard error std / sqrt(n) and the sample std
  // about std / sqrt(2 n); 5 of them bound a correct sampler's deviation from its exact target.
  const int64_t n = 200000;
  const double mu = 1.5, sd = 0.5;
  for (const auto kind : {ScheduleKind::Linear, ScheduleKind::Cosine}) {
    INFO(to_string(kind) << " schedule");
    NoiseSchedule schedule(NoiseScheduleOptions().kind(kind));
    GaussianOracle oracle(schedule, mu, sd);
    const auto x = ddpm_sample(oracle, schedule, {n / 100, 1, 10, 10}, SampleOptions().seed(2024));
    const double mean = x.mean().item<double>(), std = x.std().item<double>();
    const auto [m_exact, s_exact] = predicted_moments(schedule, mu, sd);
    CHECK_THAT(mean, WithinAbs(m_exact, 5 * s_exact / std::sqrt(n)));
    CHECK_THAT(std, WithinAbs(s_exact, 5 * s_exact / std::sqrt(2.0 * n)));
    // And the target itself is the data law up to the discretization (< 1% here).
    CHECK_THAT(mean, WithinAbs(mu, 0.01));
    CHECK_THAT(std, WithinRel(sd, 0.012));
  }
}

TEST_CASE("sampling is reproducible from a seed or a generator, and reports every step", "[sampler]") {
  NoiseSchedule schedule(NoiseScheduleOptions().timesteps(20));
  GaussianOracle oracle(schedule, 0.0, 1.0);
  std::vector<int64_t> ts;
  int64_t last_step = 0, total = 0;
  const auto a = ddpm_sample(oracle, schedule, {3, 1, 2, 2}, SampleOptions().seed(5).callback([&](const SampleStep& s) {
    ts.push_back(s.t);
    last_step = s.step;
    total = s.total;
    CHECK(s.x.sizes() == torch::IntArrayRef({3, 1, 2, 2}));
  }));
  const auto b = ddpm_sample(oracle, schedule, {3, 1, 2, 2}, SampleOptions().seed(5));
  const auto c = ddpm_sample(oracle, schedule, {3, 1, 2, 2}, SampleOptions().seed(6));
  auto gen = make_generator(5);
  const auto d = ddpm_sample(oracle, schedule, {3, 1, 2, 2}, SampleOptions().generator(gen));
  CHECK(torch::equal(a, b));
  CHECK(torch::equal(a, d));
  CHECK(!torch::equal(a, c));
  REQUIRE(ts.size() == 20);
  CHECK(ts.front() == 19);
  CHECK(ts.back() == 0);
  CHECK(last_step == 20);
  CHECK(total == 20);
  // The result is an ordinary tensor: it can enter autograd afterwards.
  CHECK_FALSE(a.is_inference());
  CHECK_NOTHROW((a * torch::ones({1}, torch::requires_grad())).sum().backward());
}

TEST_CASE("sampling runs without autograd and restores the model's train/eval mode", "[sampler]") {
  NoiseSchedule schedule(NoiseScheduleOptions().timesteps(3));
  struct ProbeImpl : torch::nn::Module {
    ProbeImpl() { w = register_parameter("w", torch::ones({1})); }
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) {
      grad_mode_seen = grad_mode_seen || torch::GradMode::is_enabled();
      training_seen = training_seen || is_training();
      return x * w;
    }
    torch::Tensor w;
    bool grad_mode_seen = false, training_seen = false;
  };
  auto probe = std::make_shared<ProbeImpl>();
  probe->train();
  ddpm_sample(probe, schedule, {2, 1, 1, 1});
  CHECK_FALSE(probe->grad_mode_seen);
  CHECK_FALSE(probe->training_seen);
  CHECK(probe->is_training());
  probe->eval();
  ddpm_sample(probe, schedule, {2, 1, 1, 1});
  CHECK_FALSE(probe->is_training());
}

TEST_CASE("ddpm_sample refuses bad inputs", "[sampler][errors]") {
  NoiseSchedule schedule(NoiseScheduleOptions().timesteps(3));
  GaussianOracle oracle(schedule, 0.0, 1.0);
  CHECK_REFUSED(ddpm_sample(oracle, schedule, {}), "shape must start with a batch size >= 1");
  CHECK_REFUSED(ddpm_sample(oracle, schedule, {0, 1, 2, 2}), "shape must start with a batch size >= 1");
  CHECK_REFUSED(ddpm_sample(oracle, schedule, {2, 1, 0, 2}), "every dimension must be >= 1");
  // A backbone that does not preserve the shape is caught, not broadcast.
  ConvNet net(ConvNetOptions().widths({8}).channels(1));
  struct ShrinkImpl : torch::nn::Module {
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x.mean(0, true); }
  };
  auto shrink = std::make_shared<ShrinkImpl>();
  CHECK_REFUSED(ddpm_sample(shrink, schedule, {2, 1, 2, 2}), "the backbone returned shape [1, 1, 2, 2]");
  // Model and schedule on different devices.
  if (torch::cuda::is_available()) {
    CHECK_REFUSED(ddpm_sample(net, schedule.to(torch::kCUDA), {2, 1, 4, 4}), "the model's parameters are on cpu");
  } else {
    CHECK_REFUSED(ddpm_sample(net, schedule.to(torch::Device(torch::kMeta)), {2, 1, 4, 4}),
                  "the model's parameters are on cpu but the schedule is on meta");
  }
  ConvNet empty{nullptr};
  CHECK_REFUSED(ddpm_sample(empty, schedule, {2, 1, 4, 4}), "the backbone handle is empty");
}

namespace {

/// Mean and std of DDIM's output under the oracle, by the same exact propagation as for DDPM:
/// x_prev = a1 x + a2 eps + sigma z with eps = c (x - sqrt(abar) mu) is linear in x.
///
/// With `s_guide` and `w`: the same for the autoguided oracle, whose noise prediction at every step is
/// c_guide + w (c - c_guide) times (x_t - sqrt(abar) mu), c and c_guide being the oracles' gains for std s
/// and s_guide (both oracles share mu, so the guided prediction is the same linear map with a mixed gain).
std::pair<double, double> predicted_ddim_moments(const NoiseSchedule& schedule, int64_t steps, double eta, double mu,
                                                 double s, double s_guide = -1, double w = 1) {
  if (s_guide < 0) s_guide = s;
  const auto ts = ddim_timesteps(schedule.timesteps(), steps);
  const auto& h = schedule.host();
  double m = 0, v = 1;
  for (auto i = static_cast<int64_t>(ts.size()) - 1; i >= 0; --i) {
    const double a = h.alphas_cumprod[static_cast<size_t>(ts[static_cast<size_t>(i)])];
    const double ap = i > 0 ? h.alphas_cumprod[static_cast<size_t>(ts[static_cast<size_t>(i - 1)])] : 1.0;
    const double sigma = eta * std::sqrt((1 - ap) / (1 - a)) * std::sqrt(1 - a / ap);
    const double c_main = std::sqrt(1 - a) / (a * s * s + 1 - a);
    const double c_guide = std::sqrt(1 - a) / (a * s_guide * s_guide + 1 - a);
    const double c = c_guide + w * (c_main - c_guide);
    const double a1 = std::sqrt(ap / a);
    const double a2 = std::sqrt(std::max(0.0, 1 - ap - sigma * sigma)) - std::sqrt(ap) * std::sqrt(1 - a) / std::sqrt(a);
    m = (a1 + a2 * c) * m - a2 * c * std::sqrt(a) * mu;
    v = (a1 + a2 * c) * (a1 + a2 * c) * v + sigma * sigma;
  }
  return {m, std::sqrt(v)};
}

}  // namespace

TEST_CASE("DDIM visits strided timesteps and steps to the previous strided one", "[ddim]") {
  const auto ts = ddim_timesteps(1000, 50);
  REQUIRE(ts.size() == 50);
  CHECK(ts.front() == 0);
  CHECK(ts[1] == 20);
  CHECK(ts.back() == 980);
  CHECK(ddim_timesteps(1000, 1000).back() == 999);
  CHECK(ddim_timesteps(10, 3) == std::vector<int64_t>{0, 3, 6});
  CHECK_REFUSED(ddim_timesteps(1000, 0), "steps must be in [1, 1000], got 0");
  CHECK_REFUSED(ddim_timesteps(1000, 1001), "steps must be in [1, 1000], got 1001");

  // The loop calls the model at exactly those timesteps, largest first.
  NoiseSchedule schedule;
  std::vector<int64_t> seen;
  struct RecorderImpl : torch::nn::Module {
    std::vector<int64_t>* seen = nullptr;
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
      seen->push_back(t[0].item<int64_t>());
      return torch::zeros_like(x);
    }
  };
  auto recorder = std::make_shared<RecorderImpl>();
  recorder->seen = &seen;
  ddim_sample(recorder, schedule, {1, 1}, DDIMOptions().steps(50));
  REQUIRE(seen.size() == 50);
  CHECK(seen.front() == 980);
  CHECK(seen[1] == 960);  // the previous strided timestep, not 979
  CHECK(seen.back() == 0);
}

TEST_CASE("ddim_step is eq. 12 of Song et al. and refuses bad inputs", "[ddim]") {
  NoiseSchedule s;
  const auto x = torch::full({2, 3}, 0.7), eps = torch::full({2, 3}, -0.2), z = torch::full({2, 3}, 1.5);
  const auto& h = s.host();
  const double a = h.alphas_cumprod[500], ap = h.alphas_cumprod[480];
  const double x0 = (0.7 + 0.2 * std::sqrt(1 - a)) / std::sqrt(a);
  CHECK_THAT(ddim_step(s, x, 500, 480, eps)[0][0].item<double>(),
             WithinAbs(std::sqrt(ap) * x0 - 0.2 * std::sqrt(1 - ap), 1e-5));
  const double sigma = std::sqrt((1 - ap) / (1 - a)) * std::sqrt(1 - a / ap);
  CHECK_THAT(ddim_step(s, x, 500, 480, eps, 1.0, z)[1][2].item<double>(),
             WithinAbs(std::sqrt(ap) * x0 - 0.2 * std::sqrt(1 - ap - sigma * sigma) + 1.5 * sigma, 1e-5));
  // To x_0 (t_prev = -1): the predicted x0 itself.
  CHECK_THAT(ddim_step(s, x, 0, -1, eps)[0][0].item<double>(),
             WithinAbs((0.7 + 0.2 * std::sqrt(1 - h.alphas_cumprod[0])) / std::sqrt(h.alphas_cumprod[0]), 1e-5));
  CHECK_REFUSED(ddim_step(s, x, 500, 500, eps), "t_prev must be in [-1, t = 500), got 500");
  CHECK_REFUSED(ddim_step(s, x, 1000, 5, eps), "t must be in [0, 1000), got 1000");
  CHECK_REFUSED(ddim_step(s, x, 500, 480, eps, -0.5), "eta must be >= 0, got -0.5");
  CHECK_REFUSED(ddim_step(s, x, 500, 480, eps, 1.0), "with sigma > 0 the noise z must have x_t's shape");
  CHECK_REFUSED(ddim_step(s, x, 500, 480, torch::zeros({2})), "the predicted noise must have x_t's shape");
}

TEST_CASE("DDIM with 50 steps and the closed-form optimal denoiser reproduces N(mu, s^2)", "[ddim][statistics]") {
  // The exact target of 50-step DDIM is off the data law by its discretization (eta = 0: std 5.5% low on
  // the linear schedule, 3.0% on the cosine, mean within 1.5%; eta = 1: std 11% and 6.4% low): checked
  // tightly against the exact propagation, loosely against (mu, s).
  const int64_t n = 200000;
  const double mu = 1.5, sd = 0.5;
  for (const auto kind : {ScheduleKind::Linear, ScheduleKind::Cosine}) {
    for (const double eta : {0.0, 1.0}) {
      INFO(to_string(kind) << " schedule, eta = " << eta);
      NoiseSchedule schedule(NoiseScheduleOptions().kind(kind));
      GaussianOracle oracle(schedule, mu, sd);
      const auto x = ddim_sample(oracle, schedule, {n / 100, 1, 10, 10}, DDIMOptions().steps(50).eta(eta).seed(7));
      const double mean = x.mean().item<double>(), std = x.std().item<double>();
      const auto [m_exact, s_exact] = predicted_ddim_moments(schedule, 50, eta, mu, sd);
      CHECK_THAT(mean, WithinAbs(m_exact, 5 * s_exact / std::sqrt(n)));
      CHECK_THAT(std, WithinAbs(s_exact, 5 * s_exact / std::sqrt(2.0 * n)));
      CHECK_THAT(mean, WithinRel(mu, 0.02));
      CHECK_THAT(std, WithinRel(sd, eta == 0.0 ? 0.06 : 0.15));
    }
  }
}

TEST_CASE("Guided is eq. 1 of Karras et al. 2024: guide + w (main - guide)", "[guidance]") {
  static_assert(Backbone<Guided>);
  static_assert(Backbone<GuidedImpl>);
  struct ScaleImpl : torch::nn::Module {
    explicit ScaleImpl(double s) { scale = register_parameter("scale", torch::full({1}, s)); }
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x * scale; }
    torch::Tensor scale;
  };
  const auto x = torch::tensor({1.0F, -2.0F, 0.5F}).reshape({3, 1, 1, 1});
  const auto t = torch::zeros({3}, torch::kLong);
  auto main = std::make_shared<ScaleImpl>(3.0), guide = std::make_shared<ScaleImpl>(1.0);
  for (const double w : {0.0, 1.0, 2.0, 3.5, -0.5}) {
    INFO("w = " << w);
    Guided guided(main, guide, w);
    CHECK(guided->weight() == w);
    // guide + w (main - guide) = (1 + 2 w) x, exactly representable for these x and w.
    CHECK(torch::equal(guided->forward(x, t), x * (1 + 2 * w)));
  }
  // Both models are submodules: their parameters, device moves and train/eval mode go with the wrapper.
  Guided guided(main, guide, 2.0);
  const auto names = guided->named_parameters().keys();
  CHECK(names == std::vector<std::string>{"main.scale", "guide.scale"});
  guided->eval();
  CHECK_FALSE(main->is_training());
  CHECK_FALSE(guide->is_training());
  guided->to(torch::kFloat64);
  CHECK(main->scale.scalar_type() == torch::kFloat64);
  CHECK(guide->scale.scalar_type() == torch::kFloat64);
}

TEST_CASE("Guided returns the main prediction's dtype under bf16", "[guidance][precision]") {
  struct ConstImpl : torch::nn::Module {
    explicit ConstImpl(float v) : v(v) {}
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return torch::full_like(x, v, torch::kBFloat16); }
    float v;
  };
  // 1 + 3 (1.0078125 - 1) = 1.0234375, exact in bf16 (1 + 3 * 2^-7).
  Guided guided(std::make_shared<ConstImpl>(1.0078125F), std::make_shared<ConstImpl>(1.0F), 3.0);
  const auto out = guided->forward(torch::zeros({2, 1}), torch::zeros({2}, torch::kLong));
  CHECK(out.scalar_type() == torch::kBFloat16);
  CHECK(out[0][0].item<float>() == 1.0234375F);
}

TEST_CASE("autoguided DDIM with closed-form oracles lands on the guided map's exact moments", "[guidance][statistics]") {
  // The main oracle knows the data law N(mu, 0.5^2); the guide is a worse one that believes the spread is
  // 0.8. Guiding with w = 2 extrapolates away from the guide's belief, so the samples' spread falls below
  // the main model's alone; both oracles share mu, so the mean stays. Checked against the exact
  // propagation of the guided linear map through the 50 steps.
  const int64_t n = 200000;
  const double mu = 1.5, sd = 0.5, sd_guide = 0.8, w = 2.0;
  NoiseSchedule schedule;
  GaussianOracle main(schedule, mu, sd), guide(schedule, mu, sd_guide);
  for (const double eta : {0.0, 1.0}) {
    INFO("eta = " << eta);
    Guided guided(main, guide, w);
    const auto x = ddim_sample(guided, schedule, {n / 100, 1, 10, 10}, DDIMOptions().steps(50).eta(eta).seed(7));
    const double mean = x.mean().item<double>(), std = x.std().item<double>();
    const auto [m_exact, s_exact] = predicted_ddim_moments(schedule, 50, eta, mu, sd, sd_guide, w);
    const auto [m_main, s_main] = predicted_ddim_moments(schedule, 50, eta, mu, sd);
    CHECK_THAT(mean, WithinAbs(m_exact, 5 * s_exact / std::sqrt(n)));
    CHECK_THAT(std, WithinAbs(s_exact, 5 * s_exact / std::sqrt(2.0 * n)));
    CHECK(s_exact < 0.9 * s_main);
    CHECK_THAT(m_exact, WithinRel(m_main, 0.01));
  }
  // A guide identical to the main model changes nothing, whatever w: the same samples, bit for bit.
  Guided same(main, main, 3.0);
  CHECK(torch::equal(ddim_sample(same, schedule, {4, 1, 2, 2}, DDIMOptions().steps(10).eta(1).seed(3)),
                     ddim_sample(main, schedule, {4, 1, 2, 2}, DDIMOptions().steps(10).eta(1).seed(3))));
}

TEST_CASE("Guided refuses bad inputs", "[guidance][errors]") {
  NoiseSchedule schedule;
  GaussianOracle oracle(schedule, 0.0, 1.0);
  CHECK_REFUSED(Guided(torch::nn::AnyModule(), torch::nn::AnyModule(oracle), 2.0),
                "Guided: both the main and the guide model must be given");
  CHECK_REFUSED(Guided(oracle, oracle, std::nan("")), "Guided: weight must be finite, got nan");
  CHECK_REFUSED(Guided(oracle, oracle, INFINITY), "Guided: weight must be finite, got inf");
  struct FirstChannelImpl : torch::nn::Module {
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x.slice(1, 0, 1); }
  };
  Guided mismatched(oracle, std::make_shared<FirstChannelImpl>(), 2.0);
  CHECK_REFUSED(mismatched->forward(torch::zeros({2, 3, 1, 1}), torch::zeros({2}, torch::kLong)),
                "Guided: the main model returned shape [2, 3, 1, 1] but the guide returned [2, 1, 1, 1]");
}

TEST_CASE("DDIM at eta = 0 is deterministic given x_T", "[ddim]") {
  NoiseSchedule schedule;
  GaussianOracle oracle(schedule, 0.0, 1.0);
  const auto a = ddim_sample(oracle, schedule, {4, 1, 2, 2}, DDIMOptions().steps(10).seed(3));
  const auto b = ddim_sample(oracle, schedule, {4, 1, 2, 2}, DDIMOptions().steps(10).seed(3));
  const auto c = ddim_sample(oracle, schedule, {4, 1, 2, 2}, DDIMOptions().steps(10).seed(4));
  CHECK(torch::equal(a, b));
  CHECK_FALSE(torch::equal(a, c));
  CHECK_REFUSED(ddim_sample(oracle, schedule, {4, 1, 2, 2}, DDIMOptions().steps(2000)), "steps must be in [1, 1000]");
  CHECK_REFUSED(ddim_sample(oracle, schedule, {4, 1, 2, 2}, DDIMOptions().eta(-1)), "eta must be >= 0");
}

TEST_CASE("clip_x0 clamps the predicted x_0 and uses eq. 7's posterior mean, which is eq. 11 unclamped", "[sampler][clip]") {
  NoiseSchedule s;
  const auto& h = s.host();
  const auto x = torch::full({2, 3}, 0.7), eps = torch::full({2, 3}, -0.2), z = torch::full({2, 3}, 1.5);
  for (const int64_t t : {0, 1, 487, 999}) {
    INFO("t = " << t);
    const auto i = static_cast<size_t>(t);
    // Nothing clamped: eq. 7 with x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is eq. 11.
    CHECK(torch::allclose(ddpm_step(s, x, t, eps, z, 1e6), ddpm_step(s, x, t, eps, z), 1e-5, 1e-5));
    // Clamped: by hand in double.
    const double abar = h.alphas_cumprod[i], abar_prev = h.alphas_cumprod_prev[i], beta = h.betas[i];
    const double x0 = std::clamp((0.7 + 0.2 * std::sqrt(1 - abar)) / std::sqrt(abar), -1.0, 1.0);
    const double mean = std::sqrt(abar_prev) * beta / (1 - abar) * x0 +
                        std::sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * 0.7;
    const double expected = mean + (t > 0 ? std::sqrt(h.posterior_variance[i]) * 1.5 : 0.0);
    CHECK_THAT(ddpm_step(s, x, t, eps, z, 1.0)[1][2].item<double>(), WithinAbs(expected, 1e-6));
  }
  // At t = 0 the step returns the clamped x_0 itself.
  CHECK(ddpm_step(s, torch::full({2, 3}, 3.0), 0, torch::zeros({2, 3}), {}, 1.0).eq(1.0).all().item<bool>());

  // DDIM: x0 clamped, eps recomputed from it.
  const double a = h.alphas_cumprod[500], ap = h.alphas_cumprod[480];
  const double x0 = std::clamp((0.7 + 0.2 * std::sqrt(1 - a)) / std::sqrt(a), -1.0, 1.0);
  REQUIRE(x0 == 1.0);  // this x_t and eps imply an x_0 above 1
  const double eps_clamped = (0.7 - std::sqrt(a) * x0) / std::sqrt(1 - a);
  CHECK_THAT(ddim_step(s, x, 500, 480, eps, 0.0, {}, 1.0)[0][0].item<double>(),
             WithinAbs(std::sqrt(ap) * x0 + std::sqrt(1 - ap) * eps_clamped, 1e-5));
  CHECK(torch::allclose(ddim_step(s, x, 500, 480, eps, 1.0, z, 1e6), ddim_step(s, x, 500, 480, eps, 1.0, z), 1e-5,
                        1e-5));

  CHECK_REFUSED(ddpm_step(s, x, 5, eps, z, -1.0), "clip_x0 must be >= 0 (0: off), got -1");
  CHECK_REFUSED(ddim_step(s, x, 500, 480, eps, 0.0, {}, -2.0), "clip_x0 must be >= 0 (0: off), got -2");
}

TEST_CASE("samplers with clip_x0 = 1 end inside [-1, 1]", "[sampler][clip]") {
  // An oracle for data N(0.8, 0.5^2): a sizeable share of its samples lie above 1 without clamping.
  NoiseSchedule schedule;
  GaussianOracle oracle(schedule, 0.8, 0.5);
  const auto plain = ddpm_sample(oracle, schedule, {50, 1, 4, 4}, SampleOptions().seed(1));
  CHECK(plain.gt(1.0).to(torch::kDouble).mean().item<double>() > 0.2);
  const auto ddpm = ddpm_sample(oracle, schedule, {50, 1, 4, 4}, SampleOptions().seed(1).clip_x0(1.0));
  CHECK(ddpm.abs().max().item<double>() <= 1.0);
  for (const double eta : {0.0, 1.0}) {
    const auto ddim = ddim_sample(oracle, schedule, {50, 1, 4, 4}, DDIMOptions().steps(20).eta(eta).seed(1).clip_x0(1.0));
    CHECK(ddim.abs().max().item<double>() <= 1.0);
  }
  CHECK_REFUSED(ddpm_sample(oracle, schedule, {2, 1, 2, 2}, SampleOptions().clip_x0(-1)), "clip_x0 must be >= 0");
  CHECK_REFUSED(ddim_sample(oracle, schedule, {2, 1, 2, 2}, DDIMOptions().clip_x0(-1)), "clip_x0 must be >= 0");
}

namespace {
/// The oracle, as a bf16 model would answer (its output rounded to bf16), recording whether autocast
/// was on for each call.
struct AutocastProbeImpl : torch::nn::Module {
  explicit AutocastProbeImpl(GaussianOracle oracle) : oracle(std::move(oracle)) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    seen.push_back(diffusion::detail::autocast_enabled(c10::DeviceType::CPU));
    return oracle(x, t).to(torch::kBFloat16);
  }
  GaussianOracle oracle;
  std::vector<bool> seen;
};
TORCH_MODULE(AutocastProbe);
}  // namespace

TEST_CASE("samplers autocast the model call only, and return float32", "[sampler][precision]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().timesteps(100));
  const auto all = [](const std::vector<bool>& v, bool value) {
    return !v.empty() && std::all_of(v.begin(), v.end(), [&](bool b) { return b == value; });
  };
  for (const bool ddim : {false, true}) {
    INFO((ddim ? "ddim" : "ddpm"));
    const auto run = [&](Precision precision, AutocastProbe& probe) {
      return ddim ? ddim_sample(probe, schedule, {64, 1, 4, 4}, DDIMOptions().steps(20).eta(1).precision(precision).seed(3))
                  : ddpm_sample(probe, schedule, {64, 1, 4, 4}, SampleOptions().precision(precision).seed(3));
    };
    AutocastProbe p32(GaussianOracle(schedule, 0.5, 0.2)), p16(GaussianOracle(schedule, 0.5, 0.2));
    const auto x32 = run(Precision::Float32, p32), x16 = run(Precision::BFloat16, p16);
    CHECK(all(p32->seen, false));
    CHECK(all(p16->seen, true));
    CHECK_FALSE(diffusion::detail::autocast_enabled(c10::DeviceType::CPU));
    CHECK(x16.scalar_type() == torch::kFloat32);
    // The same bf16 answers, so the same float32 arithmetic around them: equal bit for bit.
    CHECK(torch::equal(x16, x32));
  }
}
