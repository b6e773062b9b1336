// Guidance wrappers: autoguidance.
#include "helpers.hpp"


TEST_CASE("Autoguidance is eq. 1 of Karras et al. 2024: guide + w (main - guide)", "[guidance]") {
  static_assert(Backbone<Autoguidance>);
  static_assert(Backbone<AutoguidanceImpl>);
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
    Autoguidance guided(main, guide, w);
    CHECK(guided->weight() == w);
    // guide + w (main - guide) = (1 + 2 w) x, exactly representable for these x and w.
    CHECK(torch::equal(guided->forward(x, t), x * (1 + 2 * w)));
  }
  // Both models are submodules: their parameters, device moves and train/eval mode go with the wrapper.
  Autoguidance guided(main, guide, 2.0);
  const auto names = guided->named_parameters().keys();
  CHECK(names == std::vector<std::string>{"main.scale", "guide.scale"});
  guided->eval();
  CHECK_FALSE(main->is_training());
  CHECK_FALSE(guide->is_training());
  guided->to(torch::kFloat64);
  CHECK(main->scale.scalar_type() == torch::kFloat64);
  CHECK(guide->scale.scalar_type() == torch::kFloat64);
}

TEST_CASE("Autoguidance returns the main prediction's dtype under bf16", "[guidance][precision]") {
  struct ConstImpl : torch::nn::Module {
    explicit ConstImpl(float v) : v(v) {}
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return torch::full_like(x, v, torch::kBFloat16); }
    float v;
  };
  // 1 + 3 (1.0078125 - 1) = 1.0234375, exact in bf16 (1 + 3 * 2^-7).
  Autoguidance guided(std::make_shared<ConstImpl>(1.0078125F), std::make_shared<ConstImpl>(1.0F), 3.0);
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
    Autoguidance guided(main, guide, w);
    const auto x = sample(guided, schedule, {n / 100, 1, 10, 10}, DDIM().steps(50).eta(eta), SampleOptions().seed(7));
    const double mean = x.mean().item<double>(), std = x.std().item<double>();
    const auto [m_exact, s_exact] = predicted_ddim_moments(schedule, 50, eta, mu, sd, sd_guide, w);
    const auto [m_main, s_main] = predicted_ddim_moments(schedule, 50, eta, mu, sd);
    CHECK_THAT(mean, WithinAbs(m_exact, 5 * s_exact / std::sqrt(n)));
    CHECK_THAT(std, WithinAbs(s_exact, 5 * s_exact / std::sqrt(2.0 * n)));
    CHECK(s_exact < 0.9 * s_main);
    CHECK_THAT(m_exact, WithinRel(m_main, 0.01));
  }
  // A guide identical to the main model changes nothing, whatever w: the same samples, bit for bit.
  Autoguidance same(main, main, 3.0);
  CHECK(torch::equal(sample(same, schedule, {4, 1, 2, 2}, DDIM().steps(10).eta(1), SampleOptions().seed(3)),
                     sample(main, schedule, {4, 1, 2, 2}, DDIM().steps(10).eta(1), SampleOptions().seed(3))));
}

TEST_CASE("Autoguidance refuses bad inputs", "[guidance][errors]") {
  NoiseSchedule schedule;
  GaussianOracle oracle(schedule, 0.0, 1.0);
  CHECK_REFUSED(Autoguidance(torch::nn::AnyModule(), torch::nn::AnyModule(oracle), 2.0),
                "Autoguidance: both the main and the guide model must be given");
  CHECK_REFUSED(Autoguidance(oracle, oracle, std::nan("")), "Autoguidance: weight must be finite, got nan");
  CHECK_REFUSED(Autoguidance(oracle, oracle, INFINITY), "Autoguidance: weight must be finite, got inf");
  struct FirstChannelImpl : torch::nn::Module {
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x.slice(1, 0, 1); }
  };
  Autoguidance mismatched(oracle, std::make_shared<FirstChannelImpl>(), 2.0);
  CHECK_REFUSED(mismatched->forward(torch::zeros({2, 3, 1, 1}), torch::zeros({2}, torch::kLong)),
                "Autoguidance: the main model returned shape [2, 3, 1, 1] but the guide returned [2, 1, 1, 1]");
}

