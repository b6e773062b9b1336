// Flow matching (formulation/flow.hpp): the path and the velocity target against their closed forms, the
// shift applied once, the time distributions, the samplers against the exact flow map of Gaussian data,
// and a flow run that trains, checkpoints, resumes and samples.
#include "helpers.hpp"

namespace flow_helpers {

/// The exact velocity for data N(mu, s^2) (every element independent) on the rectified path: x_t is
/// Gaussian with mean (1 - t) mu and variance (1 - t)^2 s^2 + t^2, so E[x_0 | x_t] = mu + (1 - t) s^2
/// (x_t - (1 - t) mu) / ((1 - t)^2 s^2 + t^2), and v = E[eps - x_0 | x_t] = (x_t - E[x_0 | x_t]) / t.
/// It reads t from the conditioning 1000 t the formulation hands it.
struct FlowOracleImpl : torch::nn::Module {
  FlowOracleImpl(double mu, double s) : mu(mu), s(s) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& c_noise) {
    std::vector<int64_t> per_sample(static_cast<size_t>(x.dim()), 1);
    per_sample[0] = -1;
    const auto t = (c_noise.to(torch::kFloat64) / 1000.0).reshape(per_sample);
    const auto x0 = mu + (1 - t) * (s * s) * (x - (1 - t) * mu) / ((1 - t).pow(2) * (s * s) + t * t);
    return ((x - x0) / t).to(x.scalar_type());
  }
  double mu, s;
};
TORCH_MODULE(FlowOracle);

double max_abs_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

}  // namespace flow_helpers
using namespace flow_helpers;

TEST_CASE("Flow's levels, preconditioning and conditioning are the rectified path's closed forms", "[flow]") {
  const Flow f;
  CHECK(f.name() == "flow");
  CHECK(std::isinf(f.sigma_max()));
  for (const double t : {0.001, 0.1, 0.5, 0.9, 0.999}) {
    INFO("t = " << t);
    const double sigma = Flow::sigma_of(t);
    CHECK_THAT(sigma, WithinRel(t / (1 - t), 1e-14));
    CHECK_THAT(Flow::time(sigma), WithinRel(t, 1e-14));
    const auto l = f.level(sigma);
    CHECK_THAT(l.alpha_t, WithinRel(1 - t, 1e-12));
    CHECK_THAT(l.sigma_t, WithinRel(t, 1e-12));
    const auto p = f.precondition(sigma);
    CHECK(p.c_skip == 1.0);
    CHECK(p.c_in == 1.0);
    CHECK_THAT(p.c_out, WithinRel(-t, 1e-12));
    CHECK_THAT(f.noise_conditioning(sigma, 3, torch::kCPU)[2].item<double>(), WithinRel(1000 * t, 1e-6));
  }
  // Pure noise at t = 1 (sigma = +inf), where the velocity still determines x_0 = x_1 - v.
  const auto inf = std::numeric_limits<double>::infinity();
  CHECK(f.level(inf).alpha_t == 0.0);
  CHECK(f.level(inf).sigma_t == 1.0);
  CHECK(f.precondition(inf).c_out == -1.0);
  CHECK(f.noise_conditioning(inf, 1, torch::kCPU).item<float>() == 1000.0f);
  CHECK(f.prior_std(inf) == 1.0);
  CHECK_REFUSED(f.level(-1.0), "Flow::level: the noise level must be in [0, inf], got -1");
  CHECK_REFUSED(f.precondition(0.0), "Flow::precondition: the noise level must be positive, got 0");
  CHECK_REFUSED(Flow(FlowOptions().shift(0)), "Flow: the shift must be in [0.001, 1000], got 0");
  CHECK_REFUSED(Flow(FlowOptions().shift(1e30)), "Flow: the shift must be in [0.001, 1000], got 1e+30");
  CHECK_REFUSED(Flow(FlowOptions().shift(std::nan(""))), "Flow: the shift must be in [0.001, 1000]");
  // The extremes still give a valid plan.
  for (const double shift : {1e-3, 1e3}) CHECK(make_plan(Flow(FlowOptions().shift(shift)), "uniform", 1000).size() == 1001);
  // Rebuilt by name from its options, as a checkpoint records it.
  const Flow shifted(FlowOptions().shift(3));
  const auto rebuilt = make_formulation(formulation_config(shifted));
  CHECK(rebuilt->name() == "flow");
  CHECK(rebuilt->options() == shifted.options());
  CHECK_REFUSED(make_formulation("flow", {{"shfit", 3}}), "shfit");
}

TEST_CASE("The shift is applied once: to the uniform plan and to the training times", "[flow]") {
  CHECK(shift_time(0.0, 3.0) == 0.0);
  CHECK(shift_time(1.0, 3.0) == 1.0);
  CHECK_THAT(shift_time(0.5, 3.0), WithinRel(0.75, 1e-15));
  CHECK_REFUSED(shift_time(1.5, 3.0), "shift_time: t must be in [0, 1], got 1.5");
  CHECK_REFUSED(shift_time(0.5, -1.0), "shift_time: the shift must be positive and finite, got -1");
  for (const int64_t steps : {1, 2, 7, 28}) {
    INFO(steps << " steps");
    const auto plain = make_plan(Flow(), "uniform", steps);
    const auto shifted = make_plan(Flow(FlowOptions().shift(3)), "uniform", steps);
    REQUIRE(plain.size() == static_cast<size_t>(steps + 1));
    REQUIRE(shifted.size() == plain.size());
    CHECK(std::isinf(plain.front()));
    CHECK(std::isinf(shifted.front()));
    CHECK(plain.back() == 0.0);
    CHECK(shifted.back() == 0.0);
    for (size_t i = 1; i + 1 < plain.size(); ++i) {
      const double t = 1.0 - static_cast<double>(i) / static_cast<double>(steps);
      CHECK_THAT(Flow::time(plain[i]), WithinRel(t, 1e-12));
      // The formula applied once to the unshifted plan's time (twice would give shift_time(shift_time(t))).
      CHECK_THAT(Flow::time(shifted[i]), WithinRel(shift_time(Flow::time(plain[i]), 3.0), 1e-12));
    }
  }
  CHECK(make_plan(Flow(), "uniform", 5) == make_plan(Flow(), Flow().default_plan(), 5));
  CHECK_REFUSED(make_plan(Flow(), "karras", 5), "make_plan: 'karras' spans [sigma_min, sigma_max], but rectified flow "
                "(velocity prediction) reaches pure noise only at sigma = +inf; use a plan of its own that starts there "
                "(its plans: uniform)");
  CHECK_REFUSED(make_plan(Flow(), "exponential", 5), "'exponential' spans [sigma_min, sigma_max]");
  CHECK_REFUSED(make_plan(Flow(), "trailing", 5), "unknown plan 'trailing' for rectified flow (velocity prediction) "
                "(known: uniform)");
  // Training times: the same draws as the unshifted objective's, shifted once.
  auto g1 = make_generator(4), g2 = make_generator(4);
  const auto t = FlowObjective().draw_levels(1000, g1);
  const auto t_shifted = FlowObjective(Flow(FlowOptions().shift(3))).draw_levels(1000, g2);
  CHECK(max_abs_difference(t_shifted, 3 * t / (1 + 2 * t)) < 1e-15);
}

TEST_CASE("Flow's training times follow their distributions", "[flow]") {
  // 100,000 draws: the mean of U(0, 1) has standard error 0.29 / 316 = 0.0009; the logit-normal's logit
  // is N(m, s^2), its mean's standard error s / 316, its std's about s / 447. Bounds: 5 of them.
  auto gen = make_generator(9);
  const auto u = FlowObjective().draw_levels(100000, gen);
  CHECK(u.scalar_type() == torch::kFloat64);
  CHECK(u.min().item<double>() >= 0.0);
  CHECK(u.max().item<double>() < 1.0);
  CHECK_THAT(u.mean().item<double>(), WithinAbs(0.5, 0.0045));
  const auto logit_normal = FlowObjective(Flow(), FlowObjectiveOptions()
                                                      .distribution(TimeDistribution::LogitNormal)
                                                      .location(0.5)
                                                      .scale(0.8));
  const auto t = logit_normal.draw_levels(100000, gen);
  const auto logit = (t / (1 - t)).log();
  CHECK_THAT(logit.mean().item<double>(), WithinAbs(0.5, 5 * 0.8 / 316));
  CHECK_THAT(logit.std().item<double>(), WithinAbs(0.8, 5 * 0.8 / 447));
  CHECK_REFUSED(FlowObjective(Flow(), FlowObjectiveOptions().scale(0)), "need a finite location and a positive");
  CHECK(logit_normal.describe() == "rectified flow (velocity prediction), t ~ logit-normal(0.5, 0.8)");
}

TEST_CASE("Flow's loss is the velocity's squared error at x_t = (1 - t) x_0 + t eps", "[flow]") {
  auto gen = make_generator(3);
  const auto x0 = torch::randn({4, 1, 3, 3}, gen);
  const auto noise = torch::randn({4, 1, 3, 3}, gen);
  const auto t = torch::tensor({0.0, 0.25, 0.6, 1.0}, torch::kFloat64);
  torch::Tensor seen_x, seen_c;
  const NetworkCall network = [&](const torch::Tensor& x, const torch::Tensor& c) {
    seen_x = x;
    seen_c = c;
    return torch::zeros_like(x);
  };
  const FlowObjective objective;
  const auto loss = objective.per_sample(network, x0, t, noise, true);
  const auto tx = t.to(torch::kFloat32).reshape({-1, 1, 1, 1});
  CHECK(max_abs_difference(seen_x, (1 - tx) * x0 + tx * noise) < 1e-6);
  CHECK(max_abs_difference(seen_c, torch::tensor({0.0f, 250.0f, 600.0f, 1000.0f})) < 1e-3);
  // A network answering 0 pays the whole target eps - x_0.
  CHECK(max_abs_difference(loss, (noise - x0).pow(2).flatten(1).mean(1)) < 1e-6);
  CHECK(max_abs_difference(objective.per_sample(network, x0, t, noise, false), loss) == 0.0);
  // The exact velocity pays nothing.
  const NetworkCall exact = [&](const torch::Tensor& x, const torch::Tensor&) { return noise - x0 + 0 * x; };
  CHECK(objective.per_sample(exact, x0, t, noise, true).abs().max().item<double>() == 0.0);
}

TEST_CASE("Flow samplers converge to the exact flow map at their orders", "[flow]") {
  // Data N(0.3, 0.5^2): the probability-flow ODE maps x_1 to x_0 = mu + s x_1 exactly. Through sample()
  // (so the preconditioning of a velocity network is what is tested), uniform plans from t = 1: the
  // error must fall by about 2^order when the steps double. Heun's and DPM++ 2M's first step from
  // t = 1 is first order; one such step keeps the global order 2. DPM++ 2M steps in log-SNR, where a
  // uniform plan's first steps stay about ln 2 long whatever the count, so it nears its order from
  // below (error ratios 2.9, then 3.3, from 32 to 128 steps; Heun 3.5, 3.6; Euler 2.0, 2.0).
  const double mu = 0.3, s = 0.5;
  FlowOracle oracle(mu, s);
  const Flow f;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto gen = make_generator(0);
  const auto x1 = diffusion::detail::randn({256, 1, 1, 1}, f64, gen);  // the loop's first draw for seed 0
  const auto exact = mu + s * x1;
  struct Case {
    const char* name;
    double order;
  };
  for (const auto& c : {Case{"euler", 1}, Case{"ddim", 1}, Case{"heun", 2}, Case{"dpmpp-2m", 2}}) {
    INFO(c.name);
    std::vector<double> errors;
    for (const int64_t n : {32, 64, 128}) {
      const auto x = sample(oracle, f, {256, 1, 1, 1}, *make_level_sampler(c.name), make_plan(f, "uniform", n),
                            SampleOptions().seed(0).dtype(torch::kFloat64));
      errors.push_back(max_abs_difference(x, exact));
    }
    INFO("errors " << errors[0] << ", " << errors[1] << ", " << errors[2]);
    CHECK(errors[2] < (c.order == 1 ? 0.03 : 2e-3));
    const double expected = std::pow(2.0, c.order);
    CHECK(errors[1] / errors[2] > 0.75 * expected);
    CHECK(errors[1] / errors[2] < 1.5 * expected);
  }
  // Euler is the rectified-flow step x' = x + (t' - t) v, and DDIM at eta 0 the same update.
  const auto plan = make_plan(f, "uniform", 8);
  const auto euler = sample(oracle, f, {256, 1, 1, 1}, *make_level_sampler("euler"), plan, SampleOptions().seed(0).dtype(torch::kFloat64));
  const auto ddim = sample(oracle, f, {256, 1, 1, 1}, *make_level_sampler("ddim"), plan, SampleOptions().seed(0).dtype(torch::kFloat64));
  auto x = x1.clone();
  for (size_t k = 0; k + 1 < plan.size(); ++k) {
    const double t = Flow::time(plan[k]), t_next = Flow::time(plan[k + 1]);
    x = x + (t_next - t) * oracle(x, f.noise_conditioning(plan[k], 256, torch::kCPU));
  }
  CHECK(max_abs_difference(euler, x) < 1e-12);
  CHECK(max_abs_difference(ddim, x) < 1e-12);
}

TEST_CASE("Flow's stochastic samplers reach the data's mean and variance", "[flow]") {
  // 40,000 chains: the mean's standard error is s / 200 = 0.0025, the std's about 0.0018; 200 steps.
  const double mu = -0.4, s = 0.5;
  FlowOracle oracle(mu, s);
  const Flow f(FlowOptions().shift(2));
  for (const auto& name : {"euler-a", "dpmpp-2m-sde", "dpmpp-3m-sde"}) {
    INFO(name);
    const auto x = sample(oracle, f, {40000, 1, 1, 1}, *make_level_sampler(name), make_plan(f, "uniform", 200),
                          SampleOptions().seed(5).dtype(torch::kFloat64));
    CHECK_THAT(x.mean().item<double>(), WithinAbs(mu, 0.015));
    CHECK_THAT(x.std().item<double>(), WithinAbs(s, 0.015));
  }
}

TEST_CASE("A flow run trains, checkpoints its formulation, resumes and samples", "[flow]") {
  const auto objective = [] {
    return std::make_shared<FlowObjective>(Flow(FlowOptions().shift(2)),
                                           FlowObjectiveOptions().distribution(TimeDistribution::LogitNormal));
  };
  const auto checkpoint = check_objective_run("flow_run", objective, "uniform");
  const auto info = read_checkpoint_info(checkpoint);
  CHECK(info.formulation.name == "flow");
  CHECK(info.formulation.options.at("shift").get<double>() == 2.0);
  Trainer unshifted(tiny_net(), std::make_shared<FlowObjective>(), quiet().epochs(1).batch_size(8));
  CHECK_REFUSED(unshifted.load_checkpoint(checkpoint), "was trained for the formulation flow");
}
