// Formulations, the preconditioned denoiser and the samplers over noise levels: closed forms, the
// Gaussian oracle's exact probability-flow solution, and equality with the timestep samplers.
#include "helpers.hpp"

namespace {

/// The ideal denoiser for data N(mu, s^2) in the variance-exploding view: E[x_0 | x_0 + sigma eps = y] =
/// mu + s^2 / (s^2 + sigma^2) (y - mu); a formulation's x is alpha_t y.
Denoiser gaussian_denoiser(const Formulation& f, double mu, double s) {
  return [&f, mu, s](const torch::Tensor& x, double sigma) {
    const auto l = f.level(sigma);
    const auto y = l.alpha_t == 0.0 ? torch::zeros_like(x) : x / l.alpha_t;  // at +inf, E[x_0] = mu
    return l.alpha_t == 0.0 ? torch::full_like(x, mu) : mu + (y - mu) * (s * s / (s * s + sigma * sigma));
  };
}

/// The exact solution of the probability-flow ODE from y at sigma_max to sigma = 0 for that data:
/// mu + (y - mu) s / sqrt(sigma_max^2 + s^2).
torch::Tensor exact_flow(const torch::Tensor& y, double sigma_max, double mu, double s) {
  return mu + (y - mu) * (s / std::sqrt(sigma_max * sigma_max + s * s));
}

/// A sampler's run with `denoiser` from x over `sigmas`, as sample() runs it, counting denoiser calls.
torch::Tensor run(const LevelSampler& sampler, const Formulation& f, const Denoiser& denoiser,
                  const std::vector<double>& sigmas, torch::Tensor x, uint64_t seed = 0, int64_t* calls = nullptr) {
  auto gen = make_generator(seed);
  const std::function<torch::Tensor()> noise = [&] { return torch::randn(x.sizes(), gen, x.options()); };
  int64_t n = 0;
  const Denoiser counted = [&](const torch::Tensor& at, double sigma) {
    ++n;
    return denoiser(at, sigma);
  };
  const auto update = sampler.start();
  const auto S = static_cast<int64_t>(sigmas.size()) - 1;
  for (int64_t k = 0; k < S; ++k) {
    x = update(SamplerStep{f, counted, k, S, sigmas[static_cast<size_t>(k)], sigmas[static_cast<size_t>(k + 1)], x, noise});
  }
  if (calls) *calls = n;
  return x;
}

double max_abs(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

}  // namespace

TEST_CASE("EDM's preconditioning and levels are Table 1's closed forms", "[formulation]") {
  const EDM edm(EDMOptions().sigma_data(0.5));
  for (const double sigma : {0.002, 0.1, 0.5, 1.0, 7.3, 80.0}) {
    INFO("sigma = " << sigma);
    const auto c = edm.precondition(sigma);
    const double sd = 0.5;
    CHECK_THAT(c.c_skip, WithinRel(sd * sd / (sigma * sigma + sd * sd), 1e-14));
    CHECK_THAT(c.c_out, WithinRel(sigma * sd / std::sqrt(sigma * sigma + sd * sd), 1e-14));
    CHECK_THAT(c.c_in, WithinRel(1.0 / std::sqrt(sigma * sigma + sd * sd), 1e-14));
    CHECK_THAT(edm.noise_conditioning(sigma, 3, torch::kCPU)[2].item<double>(), WithinRel(std::log(sigma) / 4, 1e-6));
    const auto l = edm.level(sigma);
    CHECK((l.alpha_t == 1.0 && l.sigma_t == sigma));
    CHECK(edm.prior_std(sigma) == sigma);
  }
  // Unit variance of F's input and of its target at every level (the point of Table 1): for data of std
  // sigma_data, Var(c_in (x_0 + sigma n)) = 1 and Var((x_0 - c_skip (x_0 + sigma n)) / c_out) = 1.
  for (const double sigma : {0.01, 1.0, 50.0}) {
    const auto c = edm.precondition(sigma);
    CHECK_THAT(c.c_in * c.c_in * (0.25 + sigma * sigma), WithinRel(1.0, 1e-12));
    const double target_var = ((1 - c.c_skip) * (1 - c.c_skip) * 0.25 + c.c_skip * c.c_skip * sigma * sigma) / (c.c_out * c.c_out);
    CHECK_THAT(target_var, WithinRel(1.0, 1e-12));
  }
  CHECK(make_plan(edm, edm.default_plan(), 5) == karras_sigmas(5, 0.002, 80.0));
  CHECK_REFUSED(EDM(EDMOptions().sigma_data(0)), "sigma_data must be positive");
  CHECK_REFUSED(EDM(EDMOptions().sigma_min(1).sigma_max(1)), "sigma_min < sigma_max");
  CHECK_REFUSED(edm.precondition(0.0), "positive and finite");
  CHECK_REFUSED(edm.level(std::numeric_limits<double>::infinity()), "finite");
  CHECK_REFUSED(edm.level(-1), ">= 0");
}

TEST_CASE("The discrete formulation equals the schedule's tables at its own levels", "[formulation]") {
  const NoiseSchedule schedule;
  for (const auto prediction : {Prediction::Epsilon, Prediction::V, Prediction::Sample}) {
    const DiscreteFormulation f(schedule, prediction);
    for (const int64_t t : {0, 1, 500, 999}) {
      const auto i = static_cast<size_t>(t);
      const double sigma = schedule.sigma(static_cast<double>(t));
      const auto l = f.level(sigma);
      CHECK(l.alpha_t == schedule.host().sqrt_alphas_cumprod[i]);
      CHECK(l.sigma_t == schedule.host().sqrt_one_minus_alphas_cumprod[i]);
      const auto c_noise = f.noise_conditioning(sigma, 2, torch::kCPU);
      CHECK(c_noise.scalar_type() == torch::kLong);
      CHECK(c_noise[1].item<int64_t>() == t);
      // The denoiser is convert_prediction()'s x_0 for every prediction type.
      auto gen = make_generator(3);
      const auto x = torch::randn({2, 3}, gen, f64), out = torch::randn({2, 3}, gen, f64);
      const auto c = f.precondition(sigma);
      const auto expected = convert_prediction(schedule.to(torch::kCPU, torch::kFloat64), x, t, out, prediction).x0;
      CHECK(max_abs(x * c.c_skip + out * c.c_out, expected) < 1e-9 * (1 + expected.abs().max().item<double>()));
    }
  }
  // Between integer timesteps: the continuous timestep as a float, and the VP coefficients.
  const DiscreteFormulation f(schedule);
  const double sigma = std::sqrt(schedule.sigma(10.0) * schedule.sigma(11.0));  // halfway in log sigma
  const auto c_noise = f.noise_conditioning(sigma, 1, torch::kCPU);
  CHECK(c_noise.scalar_type() == torch::kFloat32);
  CHECK_THAT(c_noise.item<double>(), WithinAbs(10.5, 1e-5));
  const auto l = f.level(sigma);
  CHECK_THAT(l.alpha_t * l.alpha_t + l.sigma_t * l.sigma_t, WithinRel(1.0, 1e-14));
  CHECK_THAT(l.sigma_t / l.alpha_t, WithinRel(sigma, 1e-14));
  CHECK(make_plan(f, "trailing", 4) == discrete_sigmas(schedule, 4, TimestepSpacing::Trailing));
  CHECK(make_plan(f, f.default_plan(), 4) == discrete_sigmas(schedule, 4, TimestepSpacing::Leading));
  CHECK(make_plan(f, "karras", 4) == karras_sigmas(4, schedule.sigma_min(), schedule.sigma_max()));
  CHECK_REFUSED(make_plan(f, "cosine", 4), "unknown plan 'cosine'");
  CHECK_REFUSED(f.level(schedule.sigma_max() * 1.01), "must be in [0, ");
  // Zero terminal SNR: +inf is pure noise, where only v and sample predictions give x_0.
  const NoiseSchedule ztsnr(NoiseScheduleOptions().zero_terminal_snr(true));
  const auto inf = std::numeric_limits<double>::infinity();
  const auto l_inf = DiscreteFormulation(ztsnr, Prediction::V).level(inf);
  CHECK((l_inf.alpha_t == 0.0 && l_inf.sigma_t == 1.0));
  CHECK(DiscreteFormulation(ztsnr, Prediction::V).noise_conditioning(inf, 1, torch::kCPU).item<int64_t>() == 999);
  CHECK_REFUSED(DiscreteFormulation(ztsnr).precondition(inf), "determines no x_0");
  CHECK_REFUSED(make_plan(DiscreteFormulation(ztsnr, Prediction::V), "karras", 5), "reaches pure noise only at sigma = "
                "+inf; use a plan of its own that starts there (its plans: leading, linspace, trailing)");
}

TEST_CASE("Formulations are rebuilt by name from their JSON options", "[formulation]") {
  const auto names = formulation_names();
  CHECK(std::find(names.begin(), names.end(), "ddpm") != names.end());
  CHECK(std::find(names.begin(), names.end(), "edm") != names.end());
  const DiscreteFormulation d(NoiseSchedule(NoiseScheduleOptions().kind(ScheduleKind::Cosine).num_timesteps(50)),
                              Prediction::V);
  const auto d2 = make_formulation(d.name(), d.options());
  CHECK(d2->options() == d.options());
  CHECK(d2->sigma_max() == d.sigma_max());
  const EDM e(EDMOptions().sigma_data(1.0).sigma_max(20));
  CHECK(make_formulation("edm", e.options())->options() == e.options());
  CHECK(make_formulation("edm")->options() == EDM().options());
  CHECK_REFUSED(make_formulation("vp"), "unknown formulation 'vp' (known: ");
  CHECK_REFUSED(make_formulation("edm", {{"sigma_date", 0.5}}), "unknown field \"sigma_date\"");
  CHECK_REFUSED(make_formulation("edm", {{"sigma_data", "half"}}), "malformed");
  CHECK_REFUSED(make_formulation("edm", {{"sigma_data", -1.0}}), "sigma_data must be positive");
  CHECK_REFUSED(make_formulation("ddpm", {{"prediction", "noise"}}), "parse_prediction");
}

TEST_CASE("The deterministic samplers converge to the exact flow at their orders", "[samplers]") {
  // Data N(0.3, 0.5^2), EDM's formulation, Karras plans; the error of the final sample against the exact
  // probability-flow solution must fall by about 2^order when the steps double.
  const double mu = 0.3, s = 0.5;
  const EDM f;
  const auto D = gaussian_denoiser(f, mu, s);
  auto gen = make_generator(0);
  const auto y = torch::randn({256}, gen, f64) * 80.0;
  const auto exact = exact_flow(y, 80.0, mu, s);
  struct Case {
    const char* name;
    double order;
  };
  for (const auto& c : {Case{"euler", 1}, Case{"heun", 2}, Case{"dpmpp-2m", 2}, Case{"dpmpp-3m-sde", 0}}) {
    INFO(c.name);
    const auto sampler = make_level_sampler(c.name, std::string(c.name) == "dpmpp-3m-sde" ? nlohmann::json{{"eta", 0.0}}
                                                                                           : nlohmann::json::object());
    std::vector<double> errors;
    for (const int64_t n : {16, 32, 64}) {
      errors.push_back(max_abs(run(*sampler, f, D, karras_sigmas(n, 0.002, 80.0), y), exact));
    }
    INFO("errors " << errors[0] << ", " << errors[1] << ", " << errors[2]);
    CHECK(errors[2] < 0.1);
    if (c.order == 0) {
      // DPM++ 3M at eta 0 has no clean order on a Karras plan (its final step is first order and the
      // steps vary in length; k-diffusion's own code gives the same errors: 0.0461, 0.00195, 0.00106):
      // it must converge and beat the second-order solvers at the same steps.
      CHECK(errors[0] > errors[1]);
      CHECK(errors[1] > errors[2]);
      CHECK(errors[2] < 2e-3);
      continue;
    }
    const double expected = std::pow(2.0, c.order);
    CHECK(errors[1] / errors[2] > 0.75 * expected);
    CHECK(errors[1] / errors[2] < 1.5 * expected);
  }
}

TEST_CASE("Each sampler calls the denoiser as it says", "[samplers]") {
  const EDM f;
  const auto D = gaussian_denoiser(f, 0.0, 1.0);
  const auto sigmas = karras_sigmas(7, 0.002, 80.0);
  for (const auto& name : level_sampler_names()) {
    INFO(name);
    const auto sampler = make_level_sampler(name);
    int64_t calls = 0;
    run(*sampler, f, D, sigmas, torch::randn({4}, f64) * 80.0, 0, &calls);
    CHECK(calls == sampler->model_calls(sigmas));
    CHECK(calls == (name == "heun" ? 13 : 7));
    CHECK(make_level_sampler(name, sampler->options())->options() == sampler->options());
  }
}

TEST_CASE("The stochastic samplers reach the data's mean and variance", "[samplers]") {
  // 40,000 independent chains: the sample mean's standard error is s / 200 = 0.0025 and the std's about
  // s / 283 = 0.0018; the bounds allow 4 of them plus the discretisation's bias at 400 steps.
  const double mu = -0.4, s = 0.5;
  const EDM f;
  const auto D = gaussian_denoiser(f, mu, s);
  const auto sigmas = karras_sigmas(400, 0.002, 80.0);
  for (const auto& [name, options] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"euler-a", {}}, {"ddpm", {}}, {"dpmpp-2m-sde", {}}, {"dpmpp-3m-sde", {}},
           {"heun", {{"s_churn", 40.0}, {"s_tmin", 0.05}, {"s_tmax", 50.0}}}, {"ddim", {{"eta", 0.5}}}}) {
    INFO(name);
    auto gen = make_generator(1);
    const auto y = torch::randn({40000}, gen, f64) * 80.0;
    const auto x = run(*make_level_sampler(name, options), f, D, sigmas, y, 7);
    CHECK_THAT(x.mean().item<double>(), WithinAbs(mu, 0.015));
    CHECK_THAT(x.std().item<double>(), WithinAbs(s, 0.015));
  }
}

TEST_CASE("A plan from +inf (pure noise) works for every sampler", "[samplers]") {
  // Zero terminal SNR with an oracle: the first step is the limit sigma -> inf (an Euler step, first order:
  // it leaves the std s sigma_1 / sqrt(sigma_1^2 + s^2), about 1% low here), and the result is finite and
  // near the data's N(mu, s^2); the first-order samplers land 2-3% low at 250 steps.
  const NoiseSchedule schedule(NoiseScheduleOptions().zero_terminal_snr(true).dtype(torch::kFloat64));
  const DiscreteFormulation f(schedule, Prediction::V);
  const double mu = 0.2, s = 0.5;
  const auto D = gaussian_denoiser(f, mu, s);
  const auto sigmas = discrete_sigmas(schedule, 250, TimestepSpacing::Trailing);
  REQUIRE(std::isinf(sigmas.front()));
  for (const auto& name : level_sampler_names()) {
    INFO(name);
    auto gen = make_generator(2);
    const auto x = run(*make_level_sampler(name), f, D, sigmas, torch::randn({20000}, gen, f64), 3);
    REQUIRE(torch::isfinite(x).all().item<bool>());
    CHECK_THAT(x.mean().item<double>(), WithinAbs(mu, 0.03));
    CHECK_THAT(x.std().item<double>(), WithinAbs(s, 0.03));
  }
}

TEST_CASE("Over the schedule's own levels the samplers equal the timestep samplers", "[samplers]") {
  // The same network, seed and plan through both loops: DDPM, DDIM (eta 0 and 1) and DPM-Solver++(2M)
  // ODE and SDE, with clamping, image-to-image and inpainting, on eps and v prediction.
  torch::manual_seed(0);
  MLP model(MLPOptions().channels(1).image_size(4).hidden(32).depth(2).time_dim(16));
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100));
  const std::vector<int64_t> shape{6, 1, 4, 4};
  auto gen = make_generator(9);
  const auto image = torch::rand({1, 1, 4, 4}, gen) * 2 - 1;
  const auto mask = (torch::rand({1, 1, 4, 4}, gen) > 0.5).to(torch::kFloat32);
  struct Case {
    std::string name;
    std::shared_ptr<const SamplingMethod> method;
    nlohmann::json options;
    int64_t steps;
    TimestepSpacing spacing;
  };
  const std::vector<Case> cases{
      {"ddpm", std::make_shared<DDPM>(), {}, 100, TimestepSpacing::Leading},
      {"ddim", std::make_shared<DDIM>(DDIM().steps(12)), {}, 12, TimestepSpacing::Leading},
      {"ddim", std::make_shared<DDIM>(DDIM().steps(12).eta(1).spacing(TimestepSpacing::Trailing)), {{"eta", 1.0}}, 12,
       TimestepSpacing::Trailing},
      {"dpmpp-2m", std::make_shared<DPMSolverPP>(DPMSolverPP().steps(10).spacing(TimestepSpacing::Linspace)), {}, 10,
       TimestepSpacing::Linspace},
      {"dpmpp-2m-sde", std::make_shared<DPMSolverPP>(DPMSolverPP().steps(10).sde(true).spacing(TimestepSpacing::Trailing)),
       {}, 10, TimestepSpacing::Trailing}};
  for (const auto prediction : {Prediction::Epsilon, Prediction::V}) {
    const DiscreteFormulation f(schedule, prediction);
    for (const auto& c : cases) {
      for (int variant = 0; variant < 3; ++variant) {
        INFO(c.name << " " << c.options.dump() << ", " << to_string(prediction) << ", variant " << variant);
        auto options = SampleOptions().seed(4).clip_x0(variant == 0 ? 0.0 : 1.0);
        if (variant >= 1) options.image(image).strength(0.6);
        if (variant == 2) options.mask(mask);
        const auto old = sample(model, schedule, shape, *c.method, SampleOptions(options).prediction(prediction));
        const auto now = sample(model, f, shape, *make_level_sampler(c.name, c.options),
                                discrete_sigmas(schedule, c.steps, c.spacing), options);
        // float32 rounding only: 1e-6 of the samples' magnitude (unclamped ones reach ~10).
        CHECK(max_abs(old, now) <= 1e-6 * std::max(1.0, old.abs().max().item<double>()));
      }
    }
  }
}

TEST_CASE("sample over noise levels: callbacks, guidance, seeds and refusals", "[samplers]") {
  torch::manual_seed(0);
  MLP model(MLPOptions().channels(1).image_size(4).hidden(32).depth(2).time_dim(16));
  const EDM f;
  const std::vector<int64_t> shape{3, 1, 4, 4};
  const auto sigmas = make_plan(f, "karras", 5);
  const auto heun = make_level_sampler("heun");
  std::vector<double> seen;
  const auto a = sample(model, f, shape, *heun, sigmas, SampleOptions().seed(1).callback([&](const SampleStep& s) {
    CHECK(s.t == -1);
    CHECK(s.total == 5);
    CHECK(s.x0.sizes() == s.x.sizes());
    seen.push_back(s.sigma);
  }));
  CHECK(seen == std::vector<double>(sigmas.begin(), sigmas.end() - 1));
  CHECK(torch::equal(a, sample(model, f, shape, *heun, sigmas, SampleOptions().seed(1))));
  CHECK_FALSE(torch::equal(a, sample(model, f, shape, *heun, sigmas, SampleOptions().seed(2))));
  // strength 0 returns the image; a float64 run.
  const auto image = torch::zeros({1, 1, 4, 4}, f64);
  CHECK(torch::equal(sample(model, f, shape, *heun, sigmas, SampleOptions().dtype(torch::kFloat64).image(image).strength(0)),
                     image.expand({3, 1, 4, 4})));

  CHECK_REFUSED(sample(model, f, shape, *heun, {80.0, 1.0}), "must end at sigma = 0");
  CHECK_REFUSED(sample(model, f, shape, *heun, {80.0, 80.0, 0.0}), "decrease strictly");
  CHECK_REFUSED(sample(model, f, shape, *heun, {std::numeric_limits<double>::infinity(), 0.0}), "finite");
  CHECK_REFUSED(sample(model, f, shape, *heun, sigmas, SampleOptions().prediction(Prediction::V)),
                "the formulation says what the network predicts");
  CHECK_REFUSED(sample(model, f, shape, *heun, sigmas, SampleOptions().dtype(torch::kLong)), "floating point");
  CHECK_REFUSED(sample(model, f, shape, *heun, sigmas, SampleOptions().clip_x0(-1)), "clip_x0 must be >= 0");
  // A zero-terminal-SNR schedule from noise must start at +inf.
  const NoiseSchedule ztsnr(NoiseScheduleOptions().zero_terminal_snr(true).num_timesteps(100));
  const DiscreteFormulation z(ztsnr, Prediction::V);
  CHECK_REFUSED(sample(model, z, shape, *heun, discrete_sigmas(ztsnr, 5, TimestepSpacing::Leading)),
                "must start there");
  CHECK(sample(model, z, shape, *heun, discrete_sigmas(ztsnr, 5, TimestepSpacing::Trailing), SampleOptions().seed(0))
            .isfinite()
            .all()
            .item<bool>());

  CHECK_REFUSED(make_level_sampler("euler-ancestral"), "unknown sampler 'euler-ancestral' (known: ");
  CHECK_REFUSED(make_level_sampler("euler-a", {{"eta", -1.0}}), "euler-a: eta must be in [0, 1], got -1");
  CHECK_REFUSED(make_level_sampler("euler-a", {{"steps", 10}}), "unknown field \"steps\"");
  CHECK_REFUSED(make_level_sampler("heun", {{"s_churn", "a lot"}}), "malformed");
  CHECK_REFUSED(make_level_sampler("heun", {{"s_tmin", 2.0}, {"s_tmax", 1.0}}), "s_tmin <= s_tmax");
  CHECK_REFUSED(make_level_sampler("dpmpp-3m-sde", {{"s_noise", -0.5}}), "s_noise must be finite and >= 0");
  CHECK_REFUSED(make_level_sampler("euler", {{"eta", 0.0}}), "unknown field \"eta\"");
}

TEST_CASE("EDM's training loss is lambda(sigma) |D - x_0|^2 with the denoiser sampling uses", "[objective]") {
  // The objective's F-space form must equal the weighted denoiser error through make_denoiser: the same
  // preconditioning trains and samples.
  torch::manual_seed(0);
  MLP model(MLPOptions().channels(1).image_size(4).hidden(32).depth(2).time_dim(16));
  const EDM edm;
  const EDMObjective objective(edm);
  auto gen = make_generator(5);
  const auto x0 = torch::rand({6, 1, 4, 4}, gen) * 2 - 1, noise = torch::randn({6, 1, 4, 4}, gen);
  const auto sigma = objective.draw_levels(6, gen);
  const NetworkCall network = [&](const torch::Tensor& x, const torch::Tensor& c_noise) { return model->forward(x, c_noise); };
  const auto loss = objective.per_sample(network, x0, sigma, noise, true);
  const auto D = make_denoiser(model, edm);
  for (int64_t i = 0; i < 6; ++i) {
    const double s = sigma[i].item<double>(), sd = 0.5;
    const auto x = x0.slice(0, i, i + 1) + noise.slice(0, i, i + 1) * s;
    const double lambda = (s * s + sd * sd) / (s * sd * s * sd);
    const double expected = lambda * (D(x, s) - x0.slice(0, i, i + 1)).pow(2).mean().item<double>();
    CHECK_THAT(loss[i].item<double>(), WithinRel(expected, 1e-4));
  }
  // ln sigma ~ N(-1.2, 1.2^2): 100,000 draws, 4 standard errors (0.015 for the mean, 0.011 for the std).
  const auto log_sigma = objective.draw_levels(100000, gen).log();
  CHECK_THAT(log_sigma.mean().item<double>(), WithinAbs(-1.2, 0.015));
  CHECK_THAT(log_sigma.std().item<double>(), WithinAbs(1.2, 0.011));
  CHECK_REFUSED(EDMObjective(edm, 0.0, 0.0), "positive, finite p_std");
  // The discrete objective draws timestep indices uniformly.
  const DiscreteObjective discrete(NoiseSchedule(NoiseScheduleOptions().num_timesteps(10)));
  const auto t = discrete.draw_levels(10000, gen);
  CHECK(t.scalar_type() == torch::kLong);
  CHECK((t.min().item<int64_t>() == 0 && t.max().item<int64_t>() == 9));
  CHECK_REFUSED(DiscreteObjective(NoiseSchedule(), Prediction::Epsilon, -1), "min_snr_gamma must be >= 0");
  CHECK_REFUSED(DiscreteObjective(NoiseSchedule(NoiseScheduleOptions().zero_terminal_snr(true))),
                "an epsilon prediction cannot be trained");
}

TEST_CASE("An EDM run trains, checkpoints its formulation, resumes and samples", "[objective]") {
  const auto edm = [] { return std::make_shared<EDMObjective>(EDM(EDMOptions().sigma_data(0.6))); };
  const auto checkpoint = check_objective_run("edm_run", edm, "karras");
  const auto info = read_checkpoint_info(checkpoint);
  CHECK(info.formulation.name == "edm");
  CHECK(info.formulation.options.at("sigma_data").get<double>() == 0.6);
  // Refused by a run of another formulation, and by a run that gives LossOptions a prediction while its
  // objective carries one.
  const auto opts = quiet().epochs(1).batch_size(8);
  Trainer ddpm_run(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(100)), opts);
  CHECK_REFUSED(ddpm_run.load_checkpoint(checkpoint), "was trained for the formulation edm");
  Trainer other_edm(tiny_net(), std::make_shared<EDMObjective>(), opts);
  CHECK_REFUSED(other_edm.load_checkpoint(checkpoint), "was trained for the formulation edm");
  CHECK_REFUSED(Trainer(tiny_net(), std::make_shared<EDMObjective>(), quiet().loss(LossOptions().prediction(Prediction::V))),
                "the objective (EDM");
  Trainer edm_run(tiny_net(), edm(), opts);
  CHECK_REFUSED(edm_run.sample(2, DDIM().steps(3), 0), "samples the discrete schedule");
}

TEST_CASE("Checkpoints written before formulations were recorded read as the discrete one", "[objective]") {
  // format2_convnet_v_cosine.pt: written by the library at f54deb5 (tests/fixtures/README.md), a ConvNet
  // trained with v prediction on a cosine schedule of T = 50; format1_convnet.pt: epsilon, linear, T = 50.
  const fs::path fixtures(DIFFUSION_TEST_FIXTURES);
  for (const auto& [file, prediction, kind] : {std::tuple{"format2_convnet_v_cosine.pt", "v", ScheduleKind::Cosine},
                                               std::tuple{"format1_convnet.pt", "epsilon", ScheduleKind::Linear}}) {
    INFO(file);
    const auto info = read_checkpoint_info(fixtures / file);
    CHECK(info.formulation.name == "ddpm");
    CHECK(info.formulation.options.at("prediction") == prediction);
    CHECK(info.formulation.options.at("schedule") == nlohmann::json(info.schedule));
    CHECK(info.schedule.kind() == kind);
    CHECK(info.schedule.num_timesteps() == 50);
    CHECK(info.backbone.has_value() == (info.format == 2));
    if (!info.backbone) continue;  // format 1 records no backbone (test_checkpoint.cpp samples it)
    // Sampled through its formulation, it gives what the timestep loop gives.
    auto [model, loaded] = load_model(fixtures / file);
    const auto f = make_formulation(info.formulation);
    const NoiseSchedule schedule(info.schedule);
    const auto old = sample(model, schedule, {2, 1, 8, 8}, DDIM().steps(5).spacing(TimestepSpacing::Trailing),
                            SampleOptions().seed(3).prediction(info.prediction));
    const auto now = sample(model, *f, {2, 1, 8, 8}, *make_level_sampler("ddim"), make_plan(*f, "trailing", 5),
                            SampleOptions().seed(3));
    CHECK(max_abs(old, now) <= 1e-6 * std::max(1.0, old.abs().max().item<double>()));
  }
}

namespace {
/// A small backbone whose parameters are made on `device` (Module::to cannot move a module to the meta
/// device: set_data refuses the tensor type), conditioned on t through a sinusoidal feature. Linear layers,
/// since LibTorch's C++ meta device has no convolution (its meta convolution is registered from Python).
struct DeviceNetImpl : torch::nn::Module {
  explicit DeviceNetImpl(torch::Device device) {
    const auto o = torch::TensorOptions().device(device);
    w1 = register_parameter("w1", torch::randn({32, 64}, o) * 0.1);
    b1 = register_parameter("b1", torch::zeros({32}, o));
    wt = register_parameter("wt", torch::randn({32, 2}, o) * 0.1);
    w2 = register_parameter("w2", torch::randn({64, 32}, o) * 0.1);
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    const auto tf = t.to(x.scalar_type()).unsqueeze(1) / 100;
    const auto time = torch::nn::functional::linear(torch::cat({tf.sin(), tf.cos()}, 1), wt);
    const auto h = torch::silu(torch::nn::functional::linear(x.flatten(1), w1, b1) + time);
    return torch::nn::functional::linear(h, w2).view(x.sizes());
  }
  torch::Tensor w1, b1, wt, w2;
};
TORCH_MODULE(DeviceNet);
}  // namespace

TEST_CASE("Every sampler and both objectives run on the meta device", "[samplers][meta]") {
  // The meta device has shapes but no data: a tensor made on the wrong device, or a value read back to
  // the host inside the loop, fails here. LibTorch 1.13's meta device lacks convolution backward, so this
  // runs from LibTorch 2 on (CI's Debian 13 leg); on the CPU the same network shows the test is sound.
  std::vector<torch::Device> devices{torch::kCPU};
#if TORCH_VERSION_MAJOR >= 2
  devices.emplace_back(torch::kMeta);
#else
  WARN("LibTorch " << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR
                   << ": the meta device lacks convolution backward; its half of this test runs on LibTorch 2");
#endif
  for (const auto& device : devices) {
    INFO(device);
    torch::manual_seed(0);
    DeviceNet model(device);
    const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100));
    const DiscreteFormulation discrete(schedule, Prediction::V);
    const EDM edm;
    for (const Formulation* f : {static_cast<const Formulation*>(&discrete), static_cast<const Formulation*>(&edm)}) {
      for (const auto& name : level_sampler_names()) {
        INFO(f->name() << ", " << name);
        const auto x = sample(model, *f, {2, 1, 8, 8}, *make_level_sampler(name), make_plan(*f, f->default_plan(), 3),
                              SampleOptions().seed(0).clip_x0(1));
        CHECK(x.device() == device);
        CHECK(x.sizes() == torch::IntArrayRef({2, 1, 8, 8}));
      }
    }
    // The discrete objective reads its tables with index_select (extract), which has no meta kernel in
    // LibTorch's C++ library (measured on 2.6): on the meta device only EDM's objective runs.
    std::vector<std::shared_ptr<const Objective>> objectives{std::make_shared<EDMObjective>(edm)};
    if (device.type() != torch::kMeta) objectives.push_back(std::make_shared<DiscreteObjective>(schedule, Prediction::V));
    torch::optim::AdamW optimizer(model->parameters());
    for (const auto& objective : objectives) {
      INFO(objective->describe());
      const auto on_device = objective->to(device);
      auto gen = make_generator(0);
      const auto x0 = torch::zeros({2, 1, 8, 8}, torch::TensorOptions().device(device));
      const auto levels = on_device->draw_levels(2, gen).to(device);
      const auto noise = torch::randn({2, 1, 8, 8}, gen).to(device);
      const NetworkCall network = [&](const torch::Tensor& x, const torch::Tensor& c) { return model->forward(x, c); };
      optimizer.zero_grad();
      const auto loss = on_device->per_sample(network, x0, levels, noise, true).mean();
      loss.backward();
      optimizer.step();
      CHECK(loss.device() == device);
      CHECK(model->w1.grad().device() == device);
    }
  }
}

TEST_CASE("Image-to-image refusals of both loops: no step run, and zero terminal SNR at strength 1", "[samplers]") {
  torch::manual_seed(0);
  MLP model(MLPOptions().channels(1).image_size(4).hidden(16).depth(1).time_dim(8));
  const auto image = torch::zeros({1, 1, 4, 4});
  const EDM edm;
  // floor(0.6 x 1) = 0 steps: refused rather than returning the image as strength 0 does.
  CHECK_REFUSED(sample(model, edm, {2, 1, 4, 4}, Euler(), make_plan(edm, "karras", 1), SampleOptions().image(image).strength(0.6)),
                "strength 0.6 of a plan of 1 steps runs none of them");
  CHECK(torch::equal(sample(model, edm, {2, 1, 4, 4}, Euler(), make_plan(edm, "karras", 1), SampleOptions().image(image).strength(0)),
                     image.expand({2, 1, 4, 4})));
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(20));
  CHECK_REFUSED(sample(model, schedule, {2, 1, 4, 4}, DDIM().steps(2), SampleOptions().image(image).strength(0.4)),
                "strength 0.4 of a plan of 2 steps runs none of them");
  // Strength 1 starts from pure noise: a zero-terminal-SNR schedule must start there, image or not.
  const NoiseSchedule ztsnr(NoiseScheduleOptions().num_timesteps(20).zero_terminal_snr(true));
  const DiscreteFormulation z(ztsnr, Prediction::V);
  CHECK_REFUSED(sample(model, z, {2, 1, 4, 4}, Euler(), make_plan(z, "leading", 4), SampleOptions().image(image).strength(1)),
                "must start there");
  CHECK_REFUSED(sample(model, ztsnr, {2, 1, 4, 4}, DDIM().steps(4), SampleOptions().prediction(Prediction::V).image(image).strength(1)),
                "must start at t = T-1");
  CHECK(sample(model, z, {2, 1, 4, 4}, Euler(), make_plan(z, "leading", 4), SampleOptions().image(image).strength(0.5))
            .isfinite().all().item<bool>());
  CHECK_REFUSED(make_level_sampler("ddim", {{"eta", 1.5}}), "ddim: eta must be in [0, 1]");
  CHECK_REFUSED(EulerAncestral().eta(2).start(), "euler-a: eta must be in [0, 1]");
  CHECK(make_level_sampler("dpmpp-2m-sde", {{"eta", 1.5}})->options().at("eta") == 1.5);  // an SDE's eta may exceed 1
}
