#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/sampling/loop.hpp>

#include <torch/torch.h>

#include <functional>

/// The preconditioner: any backbone, through a formulation, as a denoiser D(x; sigma).
namespace diffusion {

/// D(x_t; sigma): x_t at noise level sigma > 0, in the formulation's scale (x_t = alpha_t x_0 + sigma_t
/// eps), to the denoised sample (the estimate of x_0), of x_t's shape and dtype. What samplers over noise
/// levels call.
using Denoiser = std::function<torch::Tensor(const torch::Tensor& x, double sigma)>;

/// How make_denoiser calls the backbone.
struct DenoiserOptions {
  /// The backbone's arithmetic (Precision::BFloat16: autocast); the denoiser's own stays in x's dtype.
  TORCH_ARG(Precision, precision) = Precision::Float32;
  /// Class labels (N,) for a ConditionalBackbone, already shaped as the batch; undefined: unconditional.
  TORCH_ARG(torch::Tensor, cond) = {};
  /// Clamp the denoised sample to [-clip_x0, clip_x0] (0: off); see convert_prediction.
  TORCH_ARG(double, clip_x0) = 0.0;
};

/// `model` made a denoiser by `formulation` (Karras et al. 2022, eq. 7):
///   D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
/// with (c_skip, c_out, c_in) = formulation.precondition(sigma) and c_noise =
/// formulation.noise_conditioning(sigma, N, x's device); F's output is checked to have x's shape. The model
/// and the formulation are held by reference: they must outlive the denoiser. Refused at call time: sigma
/// not positive (a sampler never denoises at 0), clip_x0 < 0 (when made).
///
/// Example:
///   const DiscreteFormulation formulation(schedule, Prediction::V);
///   auto D = make_denoiser(model, formulation);
///   auto x0_hat = D(x_t, 3.5);
template <Backbone B>
Denoiser make_denoiser(B& model, const Formulation& formulation, const DenoiserOptions& options = {}) {
  detail::check_clip_x0("make_denoiser", options.clip_x0());
  return [&model, &formulation, options](const torch::Tensor& x, double sigma) {
    TORCH_CHECK(sigma > 0.0, "denoiser: the noise level must be > 0, got ", sigma);
    const auto c = formulation.precondition(sigma);
    const auto c_noise = formulation.noise_conditioning(sigma, x.size(0), x.device());
    const auto out = detail::predict("denoiser", model, c.c_in == 1.0 ? x : x * c.c_in, c_noise, options.precision(),
                                     options.cond());
    auto d = c.c_skip == 0.0 ? out * c.c_out : torch::add(x * c.c_skip, out, c.c_out);
    if (options.clip_x0() > 0.0) d = d.clamp(-options.clip_x0(), options.clip_x0());
    return d;
  };
}

}  // namespace diffusion
