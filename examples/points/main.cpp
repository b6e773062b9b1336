// points: the first exercise of every diffusion course. Draws a 2-D distribution whose density is known
// (two moons or eight Gaussians), trains an MLP on it, samples, and scores the samples exactly: their
// mean negative log-likelihood under the true density and their sliced Wasserstein distance to fresh
// true samples, each beside its floor (what true samples score). Draws the samples over the density.
//
//   points [--distribution two_moons] [--epochs 30] [--out points.png] ...   (seconds on 2 CPU cores)
#include <diffusion/diffusion.hpp>

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

namespace {

/// The density of `truth` over the square [-extent, extent]^2 as a (3, size, size) RGB image in [0, 1]
/// (white where it is 0, blue at its largest), with `points` (N, 2) drawn as dark dots. Rows run top to
/// bottom, so y is flipped.
torch::Tensor scatter(const diffusion::data::ToyDistribution& truth, const torch::Tensor& points, int64_t size, double extent) {
  // The density at a quarter of the resolution (a 16th of the cost), interpolated up.
  const int64_t coarse = size / 4;
  const auto axis = (torch::arange(coarse, torch::kFloat64) + 0.5) * (2 * extent / static_cast<double>(coarse)) - extent;
  const auto grid = torch::stack(torch::meshgrid({axis.flip(0), axis}, "ij"), -1).reshape({-1, 2}).flip(1);  // (x, y) per pixel
  auto density = truth.log_prob(grid).exp().reshape({1, 1, coarse, coarse});
  density = torch::nn::functional::interpolate(density, torch::nn::functional::InterpolateFuncOptions()
                                                            .size(std::vector<int64_t>{size, size})
                                                            .mode(torch::kBilinear)
                                                            .align_corners(false))[0][0];
  density = (density / density.max()).pow(0.5).to(torch::kFloat32);  // square root: the tails stay visible
  const auto blue = torch::tensor({0.25f, 0.45f, 0.85f}).reshape({3, 1, 1});
  auto image = 1 - density.unsqueeze(0) * (1 - blue);
  const auto pixel = ((points.to(torch::kFloat64) + extent) * (static_cast<double>(size) / (2 * extent))).floor().to(torch::kLong);
  const auto col = pixel.select(1, 0), row = (size - 1) - pixel.select(1, 1);
  const auto inside = (col >= 0) & (col < size - 1) & (row >= 0) & (row < size - 1);
  const auto r = row.masked_select(inside), c = col.masked_select(inside);
  const auto dot = torch::tensor({0.55f, 0.05f, 0.05f});
  for (const int64_t dr : {0, 1}) {  // 2x2 dots
    for (const int64_t dc : {0, 1}) {
      const auto flat = (r + dr) * size + (c + dc);
      for (int64_t ch = 0; ch < 3; ++ch) image[ch].view({-1}).index_fill_(0, flat, dot[ch].item<float>());
    }
  }
  return image;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Train a diffusion model on a 2-D distribution with a known density and score its samples exactly"};
  std::string distribution = "two_moons", out = "points.png", formulation = "flow", sampler_name, save_data, score;
  int64_t epochs = 30, train_size = 20000, batch_size = 256, hidden = 256, depth = 3, n = 5000, steps = 50, threads = 0;
  double lr = 3e-3;
  uint64_t seed = 0;
  app.add_option("--distribution", distribution, "two_moons or eight_gaussians")->capture_default_str();
  app.add_option("--epochs", epochs, "Epochs over the training set")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--train-size", train_size, "Points drawn for training")->check(CLI::Range(int64_t{1}, int64_t{1} << 26))->capture_default_str();
  app.add_option("--batch-size", batch_size, "Points a step")->check(CLI::Range(int64_t{1}, int64_t{1} << 20))->capture_default_str();
  app.add_option("--lr", lr, "Peak learning rate (AdamW, cosine decay to 0 at the last step)")->check(CLI::Range(1e-8, 1.0))->capture_default_str();
  app.add_option("--hidden", hidden, "The MLP's width")->check(CLI::Range(int64_t{1}, int64_t{1} << 16))->capture_default_str();
  app.add_option("--depth", depth, "The MLP's hidden layers")->check(CLI::Range(int64_t{1}, int64_t{64}))->capture_default_str();
  app.add_option("--n", n, "Samples scored (and as many fresh true points)")->check(CLI::Range(int64_t{2}, int64_t{1} << 22))->capture_default_str();
  app.add_option("--formulation", formulation, "flow (rectified flow matching, Lipman et al. 2023) or ddpm (the seed's "
                 "linear schedule, epsilon prediction)")->check(CLI::IsMember({"flow", "ddpm"}))->capture_default_str();
  app.add_option("--sampler", sampler_name, "flow: euler or heun (default heun); ddpm: ddpm or ddim (default ddpm)")
      ->check(CLI::IsMember({"euler", "heun", "ddpm", "ddim"}));
  app.add_option("--steps", steps, "Sampling steps (but ddpm's, which visits all 1000)")->check(CLI::Range(int64_t{1}, int64_t{1000}))->capture_default_str();
  app.add_option("--seed", seed, "Seed of the data, the training and the samples")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (0: all cores)")->check(CLI::Range(0, 256))->capture_default_str();
  app.add_option("--out", out, "The scatter plot of the samples over the density (PNG)")->capture_default_str();
  app.add_option("--save-data", save_data, "Also write the training points as FILE.npy (for `diffusion train --data FILE.npy`)")
      ->check([](const std::string& f) { return f.size() > 4 && f.compare(f.size() - 4, 4, ".npy") == 0 ? "" : "expected a FILE.npy"; });
  app.add_option("--score", score, "Only score the points of FILE.npy (N, 2), e.g. what `diffusion sample` drew, against "
                 "--distribution, and draw them over it; no training")
      ->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);

  using namespace diffusion;
  try {
    set_threads(threads);
    reuse_freed_memory();
    // LibTorch seeds its default generator differently in every process: the weights' initialization
    // would differ from run to run without this.
    torch::manual_seed(seed);
    const auto truth = data::make_toy_distribution(distribution);
    // Scores `samples` (N, 2) against fresh true points (seeds far from those of the training set and the
    // samples) beside the floors: what as many true points score. One draw of true points varies by tens
    // of percent in sliced distance, so the floors are the median and range over 5 draws.
    const auto report = [&](const torch::Tensor& samples) {
      const auto m = samples.size(0);
      const auto reference = truth->sample(m, seed + 1000);
      const auto nll = [&](const torch::Tensor& x) { return -truth->log_prob(x).mean().item<double>(); };
      std::vector<double> nll_floor, sw_floor;
      for (uint64_t k = 0; k < 5; ++k) {
        const auto other = truth->sample(m, seed + 1001 + k);
        nll_floor.push_back(nll(other));
        sw_floor.push_back(eval::sliced_wasserstein(other, reference));
      }
      std::sort(nll_floor.begin(), nll_floor.end());
      std::sort(sw_floor.begin(), sw_floor.end());
      fmt::print("negative log-likelihood under the true density: {:.4f} nats (true points, the floor: median {:.4f}, "
                 "{:.4f} to {:.4f} over 5 draws)\n", nll(samples), nll_floor[2], nll_floor[0], nll_floor[4]);
      fmt::print("sliced Wasserstein-2 to {} fresh true points: {:.4f} (true points, the floor: median {:.4f}, {:.4f} to {:.4f} "
                 "over 5 draws)\n", m, eval::sliced_wasserstein(samples, reference), sw_floor[2], sw_floor[0], sw_floor[4]);
      write_png(out, scatter(*truth, samples, 512, 4.0));
      fmt::print("wrote {}\n", out);
    };
    if (!score.empty()) {
      const auto points = data::load_npy(score);
      if (points.dim() != 2 || points.size(1) != 2 || points.size(0) < 2 || !points.is_floating_point()) {
        throw std::invalid_argument(fmt::format("--score {}: expected floating-point points (N, 2) with N >= 2, got {} of shape {}",
                                                score, c10::toString(points.scalar_type()), c10::str(points.sizes())));
      }
      if (!torch::isfinite(points).all().item<bool>()) {
        throw std::invalid_argument(fmt::format("--score {}: holds non-finite values (NaN or inf), which no density scores", score));
      }
      fmt::print("scoring {} points of {} against {}\n", points.size(0), score, distribution);
      report(points.to(torch::kFloat32));
      return 0;
    }
    const auto train = truth->sample(train_size, seed);
    if (!save_data.empty()) {
      data::save_npy(save_data, train);
      fmt::print("wrote the {} training points to {}\n", train_size, save_data);
    }
    if (sampler_name.empty()) sampler_name = formulation == "flow" ? "heun" : "ddpm";
    if ((formulation == "flow") != (sampler_name == "euler" || sampler_name == "heun")) {
      throw std::invalid_argument(fmt::format("--sampler {} does not sample --formulation {} (flow: euler, heun; ddpm: ddpm, ddim)",
                                              sampler_name, formulation));
    }
    // An MLP on (N, 2) points, trained for flow matching or the seed's DDPM objective.
    const auto objective = formulation == "flow" ? std::shared_ptr<const Objective>(std::make_shared<FlowObjective>())
                                                 : std::make_shared<DiscreteObjective>(NoiseSchedule());
    Trainer trainer(MLP(MLPOptions().features(2).hidden(hidden).depth(depth).time_dim(64)), objective,
                    TrainerOptions()
                        .epochs(epochs)
                        .batch_size(batch_size)
                        .seed(seed)
                        .device(torch::kCPU)
                        .progress(ProgressMode::Off)
                        .optimization(OptimizationOptions().lr(lr).lr_schedule(LRSchedule::Cosine)));
    const auto start = std::chrono::steady_clock::now();
    double last_loss = 0;
    trainer.on_epoch = [&](const TrainEpoch& e) {
      last_loss = e.train_loss;
      if (e.epoch == 1 || e.epoch % 10 == 0 || e.epoch == epochs) {
        fmt::print("epoch {:3d}/{}  loss {:.4f}  {:.1f} s\n", e.epoch, epochs, e.train_loss,
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
    };
    fmt::print("training an MLP (hidden {}, depth {}) on {} points of {} for {} epochs: {}\n", hidden, depth, train_size,
               distribution, epochs, objective->describe());
    trainer.fit(train);
    const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    torch::Tensor samples;
    std::string how;
    if (formulation == "flow") {
      const auto plan = make_plan(trainer.formulation(), "uniform", steps);
      const auto sampler = make_level_sampler(sampler_name);
      samples = trainer.sample(n, *sampler, plan, seed + 1);
      how = fmt::format("{}, {} steps ({} model calls)", sampler->describe(), steps, sampler->model_calls(plan));
    } else {
      const auto method = sampler_name == "ddpm" ? make_sampler("ddpm") : make_sampler(sampler_name, SamplerSettings().steps(steps));
      samples = trainer.sample(n, *method, seed + 1);
      how = method->describe();
    }
    samples = samples.to(torch::kFloat32);
    fmt::print("trained in {:.1f} s (final loss {:.4f}); {} samples by {}\n", train_seconds, last_loss, n, how);
    report(samples);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
