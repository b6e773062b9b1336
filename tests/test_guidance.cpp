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
  CHECK_REFUSED(Autoguidance(GaussianOracle(nullptr), oracle, 2.0),
                "Autoguidance: both the main and the guide model must be given");
  CHECK_REFUSED(Autoguidance(oracle, oracle, std::nan("")), "Autoguidance: weight must be finite, got nan");
  CHECK_REFUSED(Autoguidance(oracle, oracle, INFINITY), "Autoguidance: weight must be finite, got inf");
  // Two networks on two devices: refused when guidance is made, and by sample() for any parameter.
  struct ElsewhereImpl : torch::nn::Module {  // a network whose weights live on another device (meta)
    ElsewhereImpl() { register_parameter("w", torch::zeros({1}, torch::Device(torch::kMeta))); }
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x; }
  };
  ConvNet on_cpu(ConvNetOptions().widths({8}).time_dim(8));
  CHECK_REFUSED(Autoguidance(on_cpu, std::make_shared<ElsewhereImpl>(), 2.0),
                "Autoguidance: the main model is on cpu but the guide on meta");
  struct FirstChannelImpl : torch::nn::Module {
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x.slice(1, 0, 1); }
  };
  Autoguidance mismatched(oracle, std::make_shared<FirstChannelImpl>(), 2.0);
  CHECK_REFUSED(mismatched->forward(torch::zeros({2, 3, 1, 1}), torch::zeros({2}, torch::kLong)),
                "Autoguidance: the main model returned shape [2, 3, 1, 1] but the guide returned [2, 1, 1, 1]");
}


// ---- Classifier-free guidance ------------------------------------------------------------------------

namespace cfg_helpers {

/// The exact noise predictor for class-conditional data: class k ~ N(mu_k, s^2) elementwise, and the null
/// class the equal mixture of the classes (its exact E[eps | x_t] is the posterior-weighted mixture of the
/// classes' predictions). Counts its calls and the batch sizes it saw.
struct ClassOracleImpl : torch::nn::Module {
  ClassOracleImpl(NoiseSchedule schedule, std::vector<double> mu, double s) : schedule(std::move(schedule)), mu(std::move(mu)), s(s) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    batches.push_back(x.size(0));
    REQUIRE(cond.defined());
    std::vector<int64_t> per_sample(static_cast<size_t>(x.dim()), 1);
    per_sample[0] = -1;
    const auto abar = schedule.alphas_cumprod.index_select(0, t).to(torch::kFloat64).reshape(per_sample);
    const auto var = abar * s * s + 1 - abar;
    const auto xd = x.to(torch::kFloat64);
    const auto gain = (1 - abar).sqrt() / var;
    std::vector<torch::Tensor> eps_k, logp_k;
    for (const double m : mu) {
      const auto centered = xd - abar.sqrt() * m;
      eps_k.push_back(gain * centered);
      logp_k.push_back((-0.5 * centered.pow(2) / var).flatten(1).sum(1));
    }
    const auto eps = torch::stack(eps_k);                    // (K, N, ...)
    const auto post = torch::softmax(torch::stack(logp_k), 0);  // (K, N): p(k | x_t), per sample
    std::vector<int64_t> shape{static_cast<int64_t>(mu.size()), -1};
    for (int64_t d = 1; d < x.dim(); ++d) shape.push_back(1);
    const auto mixture = (post.reshape(shape) * eps).sum(0);
    const auto labels = cond.to(torch::kLong);
    const auto picked = eps.index({labels.clamp_min(0), torch::arange(x.size(0))});  // eps of each sample's class
    return torch::where(labels.reshape(per_sample).lt(0), mixture, picked).to(x.scalar_type());
  }
  NoiseSchedule schedule;
  std::vector<double> mu;
  double s;
  std::vector<int64_t> batches;
};
TORCH_MODULE(ClassOracle);

/// Answers (c + 1) x for class c and 0.5 x for the null class: simple enough to combine by hand.
struct LinearClassImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&, const torch::Tensor& cond = {}) {
    calls.push_back(x.size(0));
    const auto c = cond.to(x.scalar_type()).reshape({-1, 1});
    return torch::where(c < 0, 0.5 * x, (c + 1) * x);
  }
  std::vector<int64_t> calls;
};
TORCH_MODULE(LinearClass);

}  // namespace cfg_helpers
using namespace cfg_helpers;

TEST_CASE("classifier-free guidance is eps_null + w (eps_cond - eps_null), in one batched call", "[guidance][cfg]") {
  static_assert(ConditionalBackbone<ClassifierFreeGuidance> && ConditionalBackbone<LinearClass>);
  const auto x = torch::tensor({1.0, -2.0, 0.5}).reshape({3, 1});
  const auto t = torch::zeros({3}, torch::kLong);
  const auto cond = torch::tensor({0, 2, 1});
  for (const double w : {0.0, 1.0, 2.0, 3.5}) {
    INFO("w = " << w);
    LinearClass model;
    ClassifierFreeGuidance guided(model, w);
    const auto out = guided->forward(x, t, cond);
    // null: 0.5 x; class c: (c + 1) x; so 0.5 x + w ((c + 1) x - 0.5 x), exact in binary for these values.
    const auto c = cond.to(torch::kDouble).reshape({3, 1});
    CHECK(torch::equal(out, 0.5 * x + w * ((c + 1) * x - 0.5 * x)));
    // w = 1: the conditional call alone; w = 0: the unconditional one alone; else one call of 2N.
    CHECK(model->calls == std::vector<int64_t>{w == 0.0 || w == 1.0 ? 3 : 6});
  }
  // A null label among the requested ones samples that one unconditionally.
  LinearClass model;
  ClassifierFreeGuidance guided(model, 3.0);
  CHECK(torch::equal(guided->forward(x, t, torch::tensor(std::vector<int64_t>{null_class, 0, 0})).slice(0, 0, 1), 0.5 * x.slice(0, 0, 1)));
}

TEST_CASE("guidance rescale matches the conditional prediction's std with weight phi", "[guidance][cfg]") {
  LinearClass model;
  auto gen = make_generator(1);
  const auto x = torch::randn({2, 5}, gen, torch::kFloat64);
  const auto t = torch::zeros({2}, torch::kLong), cond = torch::tensor({1, 3});
  ClassifierFreeGuidance plain(model, ClassifierFreeGuidanceOptions(4.0));
  ClassifierFreeGuidance full(model, ClassifierFreeGuidanceOptions(4.0).rescale(1.0));
  ClassifierFreeGuidance half(model, ClassifierFreeGuidanceOptions(4.0).rescale(0.5));
  const auto g = plain->forward(x, t, cond);
  const auto conditional = model->forward(x, t, cond);
  const auto r = full->forward(x, t, cond);
  // phi = 1: the guided direction at the conditional prediction's per-sample std (Lin et al. 2024, eq. 15).
  CHECK(torch::allclose(r.std(1), conditional.std(1), 1e-12, 1e-12));
  CHECK(torch::allclose(r / r.norm(2, 1, true), g / g.norm(2, 1, true), 1e-12, 1e-12));
  CHECK(torch::allclose(half->forward(x, t, cond), 0.5 * r + 0.5 * g, 1e-12, 1e-12));  // eq. 16
}

TEST_CASE("class-conditional sampling with the exact oracle lands on each class's moments", "[guidance][cfg][statistics]") {
  // Class k ~ N(mu_k, 0.4^2): sampling class k with w = 1 (the conditional model alone) follows the
  // Gaussian oracle of (mu_k, 0.4), whose exact DDIM moments are known (predicted_ddim_moments).
  const NoiseSchedule schedule;
  const std::vector<double> mu = {-0.8, 0.3, 1.1};
  ClassOracle oracle(schedule, mu, 0.4);
  const int64_t n = 60000;
  for (int64_t k = 0; k < 3; ++k) {
    INFO("class " << k);
    ClassifierFreeGuidance conditional(oracle, 1.0);
    const auto x = sample(conditional, schedule, {n / 100, 1, 10, 10}, DDIM().steps(50),
                          SampleOptions().seed(static_cast<uint64_t>(k)).cond(torch::full({1}, k, torch::kLong)));
    const auto [m, s] = predicted_ddim_moments(schedule, 50, 0.0, mu[static_cast<size_t>(k)], 0.4);
    CHECK_THAT(x.mean().item<double>(), WithinAbs(m, 5 * s / std::sqrt(n)));
    CHECK_THAT(x.std().item<double>(), WithinAbs(s, 5 * s / std::sqrt(2.0 * n)));
  }
  // Guidance w > 1 concentrates each class: the spread around its mean shrinks, the mean stays near mu_k.
  ClassifierFreeGuidance strong(oracle, 3.0);
  const auto x = sample(strong, schedule, {100, 1, 10, 10}, DDIM().steps(50), SampleOptions().seed(9).cond(torch::full({1}, 1, torch::kLong)));
  CHECK(x.std().item<double>() < 0.4);
  CHECK_THAT(x.mean().item<double>(), WithinAbs(0.3, 0.1));
}

TEST_CASE("autoguidance of a conditional model passes the labels to both models", "[guidance][cfg]") {
  LinearClass main, guide;
  Autoguidance guided(main, guide, 2.0);
  const auto x = torch::ones({2, 1});
  const auto out = guided->forward(x, torch::zeros({2}, torch::kLong), torch::tensor(std::vector<int64_t>{1, null_class}));
  CHECK(torch::equal(out, torch::tensor({2.0, 0.5}).reshape({2, 1})));  // both agree, so w changes nothing
  CHECK(main->calls == std::vector<int64_t>{2});
  CHECK(guide->calls == std::vector<int64_t>{2});
}

TEST_CASE("labels are refused where they cannot apply, and checked where they can", "[guidance][cfg][errors]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(10));
  GaussianOracle unconditional(schedule, 0.0, 1.0);
  CHECK_REFUSED(sample(unconditional, schedule, {2, 1, 2, 2}, DDIM().steps(2), SampleOptions().cond(torch::tensor({1, 2}))),
                "class labels given to a backbone that takes none");
  UNet plain(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16));
  const auto x = torch::zeros({2, 1, 8, 8});
  const auto t = torch::zeros({2}, torch::kLong);
  CHECK_REFUSED(plain->forward(x, t, torch::tensor({1, 2})), "UNet: class labels given to an unconditional model");
  UNet conditional(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16).num_classes(10));
  CHECK_REFUSED(conditional->forward(x, t, torch::tensor({1, 10})),
                "UNet: class labels must be in [0, 10) or null_class (-1), got values in [1, 10]");
  CHECK_REFUSED(conditional->forward(x, t, torch::tensor({1})), "UNet: cond has 1 labels but the batch has 2 samples");
  CHECK_REFUSED(conditional->forward(x, t, torch::tensor({0.5, 1.0})), "UNet: cond must be a 1-D integer tensor");
  CHECK_REFUSED(sample(conditional, schedule, {2, 1, 8, 8}, DDIM().steps(2), SampleOptions().cond(torch::tensor({1, 2, 3}))),
                "sample: cond must be 1-D integer class labels, one per sample (2) or one for all");
  ConvNet conv(ConvNetOptions().widths({8}).time_dim(8).num_classes(3));
  CHECK_REFUSED(conv->forward(x, t, torch::tensor({3, 0})), "ConvNet: class labels must be in [0, 3)");
  LinearClass model;
  ClassifierFreeGuidance guided(model, 2.0);
  CHECK_REFUSED(guided->forward(x.flatten(1), t), "ClassifierFreeGuidance: class labels are needed");
  CHECK_REFUSED(ClassifierFreeGuidance(model, ClassifierFreeGuidanceOptions(2.0).rescale(2)), "rescale must be in [0, 1]");
  CHECK_REFUSED(ClassifierFreeGuidance(AnyBackbone(unconditional), 2.0), "the model takes no class labels");
  // A UNet is a ConditionalBackbone in type; built without classes it is refused when guidance is made.
  CHECK_REFUSED(ClassifierFreeGuidance(UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(8)), 2.0), "the model takes no class labels");
  CHECK_FALSE(AnyBackbone(UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(8)))->conditional());
  CHECK(AnyBackbone(conv)->conditional());
}
