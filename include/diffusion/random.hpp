#pragma once

#include <torch/torch.h>

#include <cstdint>

/// Reproducible randomness.
namespace diffusion {

/// A CPU random generator seeded with `seed`, for q_sample and the samplers. Noise drawn from it on
/// the CPU is moved to the target device, so one seed gives the same noise on CPU and CUDA (the copies
/// are small next to a model call).
///
/// Example:
///   auto gen = diffusion::make_generator(42);
///   auto x_t = diffusion::q_sample(schedule, x0, t, gen);
inline torch::Generator make_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

}  // namespace diffusion
