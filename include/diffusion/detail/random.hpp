#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>

namespace diffusion::detail {

/// Standard normal noise of `sizes` with `options`, drawn from `gen` when given (on the generator's
/// own device, then moved), else from LibTorch's default generator for that device.
inline torch::Tensor randn(torch::IntArrayRef sizes, const torch::TensorOptions& options,
                           const std::optional<torch::Generator>& gen) {
  if (!gen) return torch::randn(sizes, options);
  const auto gen_device = gen->device();
  if (gen_device == options.device()) return torch::randn(sizes, *gen, options);
  return torch::randn(sizes, *gen, options.device(gen_device)).to(options.device());
}

}  // namespace diffusion::detail
