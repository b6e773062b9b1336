#pragma once

// What the test files share: closed-form oracles (backbones without parameters whose answers are exact),
// scratch directories, a tiny dataset and network, and idx-file writers.
#include "catch.hpp"

#include <diffusion/diffusion.hpp>

#if !defined(DIFFUSION_NO_ZLIB)
#include <zlib.h>
#endif

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

using namespace diffusion;
namespace fs = std::filesystem;


/// The optimal noise predictor for data x0 ~ N(mu, s^2) (every element independent): x_t is Gaussian with
/// mean sqrt(abar) mu and variance abar s^2 + 1 - abar, and E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu)
/// / (abar s^2 + 1 - abar). A backbone with no parameters, so the sampler can be proven without training.
struct GaussianOracleImpl : torch::nn::Module {
  GaussianOracleImpl(NoiseSchedule schedule, double mu, double s) : schedule(std::move(schedule)), mu(mu), s(s) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    std::vector<int64_t> per_sample(static_cast<size_t>(x.dim()), 1);
    per_sample[0] = -1;
    const auto abar = schedule.alphas_cumprod.index_select(0, t).to(torch::kFloat64).reshape(per_sample);
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
inline std::pair<double, double> predicted_moments(const NoiseSchedule& schedule, double mu, double s) {
  const auto& h = schedule.host();
  double m = 0, v = 1;
  for (auto t = schedule.num_timesteps() - 1; t >= 0; --t) {
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



/// Mean and std of DDIM's output under the oracle, by the same exact propagation as for DDPM:
/// x_prev = a1 x + a2 eps + sigma z with eps = c (x - sqrt(abar) mu) is linear in x.
///
/// With `s_guide` and `w`: the same for the autoguided oracle, whose noise prediction at every step is
/// c_guide + w (c - c_guide) times (x_t - sqrt(abar) mu), c and c_guide being the oracles' gains for std s
/// and s_guide (both oracles share mu, so the guided prediction is the same linear map with a mixed gain).
inline std::pair<double, double> predicted_ddim_moments(const NoiseSchedule& schedule, int64_t steps, double eta, double mu,
                                                 double s, double s_guide = -1, double w = 1) {
  if (s_guide < 0) s_guide = s;
  const auto ts = timestep_plan(schedule.num_timesteps(), steps);
  const auto& h = schedule.host();
  double m = 0, v = 1;
  for (size_t i = 0; i < ts.size(); ++i) {
    const double a = h.alphas_cumprod[static_cast<size_t>(ts[i])];
    const double ap = i + 1 < ts.size() ? h.alphas_cumprod[static_cast<size_t>(ts[i + 1])] : 1.0;
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

/// The exact noise predictor for data that is one point x0 everywhere: eps = (x - sqrt(abar) x0) /
/// sqrt(1 - abar). Every prediction of x_0 it implies is x0 itself.
struct PointOracleImpl : torch::nn::Module {
  PointOracleImpl(NoiseSchedule schedule, double x0) : schedule(std::move(schedule)), x0(x0) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    const auto abar = schedule.alphas_cumprod.index_select(0, t).to(x.scalar_type()).reshape({-1, 1});
    return (x - abar.sqrt() * x0) / (1 - abar).sqrt();
  }
  NoiseSchedule schedule;
  double x0;
};
TORCH_MODULE(PointOracle);

/// Records the input of every call, answering as a PointOracle.
struct InputRecorderImpl : torch::nn::Module {
  InputRecorderImpl(NoiseSchedule schedule, double x0) : oracle(std::move(schedule), x0) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    inputs.push_back(x.clone());
    timesteps.push_back(t[0].item<int64_t>());
    return oracle(x, t);
  }
  PointOracle oracle;
  std::vector<torch::Tensor> inputs;
  std::vector<int64_t> timesteps;
};
TORCH_MODULE(InputRecorder);


/// A fresh, empty directory under the system temp dir for one test.
inline fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("diffusion_tests_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

/// 64 images of 1x8x8 in [-1, 1]: a bright square at one of four positions.
inline torch::Tensor tiny_dataset(int64_t n = 64) {
  auto x = torch::full({n, 1, 8, 8}, -1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = (i % 2) * 4, c = ((i / 2) % 2) * 4;
    x[i][0].slice(0, r, r + 4).slice(1, c, c + 4).fill_(1.0f);
  }
  return x;
}

inline ConvNet tiny_net() { return ConvNet(ConvNetOptions().widths({8, 16}).time_dim(32)); }

/// Trainer options for tests: batch 16, no progress output, on the CPU, at learning rate `lr`.
inline TrainerOptions quiet(double lr = 2e-3) {
  return TrainerOptions().batch_size(16).optimization(OptimizationOptions().lr(lr)).progress(ProgressMode::Off).device(torch::kCPU);
}

inline std::vector<uint8_t> idx_bytes(uint32_t magic, std::vector<uint32_t> dims, size_t data_bytes, uint8_t fill = 7) {
  std::vector<uint8_t> out;
  const auto be = [&](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
  };
  be(magic);
  for (auto d : dims) be(d);
  out.insert(out.end(), data_bytes, fill);
  return out;
}

inline void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                               static_cast<std::streamsize>(bytes.size()));
}

#if !defined(DIFFUSION_NO_ZLIB)
inline void write_gz(const fs::path& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}
#endif


/// A backbone whose output is its input times one learned scalar: simple enough to compute its losses by hand.
struct ScaleNetImpl : torch::nn::Module {
  explicit ScaleNetImpl(double s = 0.5) { scale = register_parameter("scale", torch::full({1}, s)); }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x * scale; }
  torch::Tensor scale;
};
TORCH_MODULE(ScaleNet);

/// The values of every parameter of `module`, by name.
inline std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : module.named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

/// The largest absolute difference between two snapshots of the same module.
inline double max_difference(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  double worst = 0;
  for (const auto& [name, value] : a) worst = std::max(worst, (value - b.at(name)).abs().max().item<double>());
  return worst;
}

/// A run of a fresh `objective()` trains one epoch of tiny_dataset(32) with a grid and validation, and a
/// second run of it resumes from the checkpoint for a second epoch; the checkpoint then samples with
/// every sampler over the formulation's `plan` (4 steps). Returns the first epoch's checkpoint.
inline fs::path check_objective_run(const std::string& name, const std::function<std::shared_ptr<const Objective>()>& objective,
                                    const std::string& plan) {
  const auto dir = scratch(name);
  const auto data = tiny_dataset(32);
  const auto opts = quiet().epochs(1).batch_size(8);
  torch::manual_seed(0);
  Trainer trainer(tiny_net(), objective(), opts);
  auto outputs = std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(4));
  trainer.add_hook(outputs);
  double last_loss = std::nan("");
  trainer.on_epoch = [&](const TrainEpoch& e) { last_loss = e.train_loss; };
  trainer.fit(data, data.slice(0, 0, 8));
  CHECK(std::isfinite(last_loss));
  CHECK(fs::exists(dir / "samples" / "epoch_001.png"));  // the grid: Heun over the formulation's default plan
  const auto checkpoint = *outputs->latest_checkpoint();
  Trainer again(tiny_net(), objective(), TrainerOptions(opts).epochs(2));
  again.load_checkpoint(checkpoint);
  CHECK(again.epoch() == 1);
  again.fit(data);
  CHECK(again.epoch() == 2);
  auto [model, loaded] = load_model(checkpoint);
  const auto f = make_formulation(loaded.formulation);
  for (const auto& sampler : level_sampler_names()) {
    INFO(sampler);
    const auto x = sample(model, *f, {2, 1, 28, 28}, *make_level_sampler(sampler), make_plan(*f, plan, 4),
                          SampleOptions().seed(0));
    CHECK(torch::isfinite(x).all().item<bool>());
  }
  return checkpoint;
}
