// Quickstart: train a small ConvNet to generate 8x8 "bar" images (one lit row or column), sample
// from it with DDPM, draw the samples in the terminal and count how many are clean bars.
//
//   quickstart [steps]      (default 2000 training steps, under a minute on 2 CPU cores)
#include <diffusion/diffusion.hpp>

#include <fmt/core.h>

#include <chrono>
#include <cstdlib>

namespace {

/// n images of 8x8 in [-1, 1]: background -1, one full row or column at +1.
torch::Tensor bars(int64_t n) {
  auto x = torch::full({n, 1, 8, 8}, -1.0f);
  const auto pos = torch::randint(0, 8, {n}, torch::kLong);
  const auto vertical = torch::randint(0, 2, {n}, torch::kLong);
  for (int64_t i = 0; i < n; ++i) {
    const auto p = pos[i].item<int64_t>();
    if (vertical[i].item<int64_t>()) x[i][0].select(1, p).fill_(1.0f);
    else x[i][0][p].fill_(1.0f);
  }
  return x;
}

/// A clean bar: exactly 8 pixels above 0, forming one full row or one full column.
bool is_clean_bar(const torch::Tensor& img) {
  const auto lit = img[0] > 0;
  if (lit.sum().item<int64_t>() != 8) return false;
  return (lit.all(1).any().item<bool>()) || (lit.all(0).any().item<bool>());
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 2000;
  if (steps < 1) {
    fmt::print(stderr, "usage: quickstart [steps >= 1], got '{}'\n", argv[1]);
    return 2;
  }
  diffusion::set_threads();       // every core: Debian's LibTorch starts with one intra-op thread
  diffusion::reuse_freed_memory();  // no page faults on the memory each step frees and takes again
  torch::manual_seed(0);

  using namespace diffusion;
  ConvNet model(ConvNetOptions().widths({16, 32}).time_dim(64));
  NoiseSchedule schedule;  // the seed's: linear, T = 1000
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(2e-3));

  const auto start = std::chrono::steady_clock::now();
  double running = 0;
  for (int64_t step = 1; step <= steps; ++step) {
    const auto x0 = bars(64);
    const auto t = torch::randint(0, schedule.num_timesteps(), {x0.size(0)}, torch::kLong);
    const auto noise = torch::randn_like(x0);
    const auto loss = diffusion_loss(model, schedule, x0, t, noise).mean();  // Ho et al. 2020, eq. 14
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    running += loss.item<double>();
    if (step % 250 == 0 || step == steps) {
      const auto n = step % 250 == 0 ? 250 : step % 250;
      fmt::print("step {:5d}/{}  loss {:.4f}  {:.1f} s\n", step, steps, running / n,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      running = 0;
    }
  }

  const auto samples = sample(model, schedule, {64, 1, 8, 8}, DDPM(), SampleOptions().seed(1));
  int clean = 0;
  for (int64_t i = 0; i < samples.size(0); ++i) clean += is_clean_bar(samples[i]);
  fmt::print("\nThe first 8 of 64 samples ('#' above 0.5, '+' above 0, '.' below):\n");
  for (int64_t row = 0; row < 8; ++row) {
    for (int64_t i = 0; i < 8; ++i) {
      for (int64_t col = 0; col < 8; ++col) {
        const auto v = samples[i][0][row][col].item<float>();
        fmt::print("{}", v > 0.5f ? '#' : v > 0.0f ? '+' : '.');
      }
      fmt::print("  ");
    }
    fmt::print("\n");
  }
  fmt::print("\n{} of 64 samples are clean bars (one full row or column lit, nothing else).\n", clean);
  return 0;
}
