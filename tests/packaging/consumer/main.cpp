// Samples with a small ConvNet through the installed / added / fetched library.
#include <diffusion/diffusion.hpp>

#include <fmt/core.h>

int main() {
  diffusion::ConvNet model(diffusion::ConvNetOptions().widths({8, 16}));
  diffusion::NoiseSchedule schedule(diffusion::NoiseScheduleOptions().num_timesteps(10));
  const auto x = diffusion::sample(model, schedule, {2, 1, 8, 8}, diffusion::DDPM(), diffusion::SampleOptions().seed(0));
  if (x.sizes() != torch::IntArrayRef({2, 1, 8, 8}) || !torch::isfinite(x).all().item<bool>()) {
    fmt::print("consumer: bad samples\n");
    return 1;
  }
  fmt::print("consumer: sampled 2 images of 1x8x8 with diffusion {}.{}.{} via {}\n", diffusion::version_major,
             diffusion::version_minor, diffusion::version_patch, CONSUME);
  return 0;
}
