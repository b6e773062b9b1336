#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/registry.hpp>

#include <torch/torch.h>

#include <cmath>
#include <utility>

/// Autoguidance: steer a model away from the mistakes of a weaker version of itself.
namespace diffusion {

/// A backbone whose noise prediction extrapolates from a weaker "guide" model through the main one
/// (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 1):
///
///   eps(x_t, t) = eps_guide(x_t, t) + w (eps_main(x_t, t) - eps_guide(x_t, t)).
///
/// The paper writes it for denoisers D(x; sigma); the predicted x_0 is an affine function of the
/// predicted noise with coefficients that do not depend on the model, so the same w in noise space is
/// the same guidance. w = 1 is the main model alone and w = 0 the guide alone; w > 1 moves each
/// prediction further along the direction in which the better model improved on the weaker one. When
/// the guide makes the same kind of errors as the main model but more of them (the paper uses a smaller
/// or shorter-trained model of the same family, e.g. an early checkpoint of the same run), that
/// direction points towards the data and away from the blurry, ambiguous outskirts of the distribution,
/// without collapsing its variety as classifier-free guidance does. Unlike classifier-free guidance it
/// needs no labels, so an unconditional model can be guided.
///
/// Each step calls both networks, so sampling costs twice the model calls. Autoguidance satisfies Backbone:
/// every sampler takes it unchanged. Both models must be on the same device (refused otherwise); eval mode
/// and the device (`.to`) apply to both, as they are submodules ("main" and "guide").
///
/// Example:
///   UNet main = ..., early = ...;          // e.g. the last and an early checkpoint of one run
///   Autoguidance guided(main, early, 2.0);
///   auto images = sample(guided, schedule, {25, 1, 28, 28}, DDIM().steps(50).eta(1));
class AutoguidanceImpl : public torch::nn::Module {
 public:
  /// `main` and `guide` are backbones (any TORCH_MODULE holder, shared_ptr, or AnyBackbone); `weight` is
  /// w above. For class-conditional models both get the same labels (Karras et al. 2024 guide
  /// class-conditional ImageNet models so, with a weaker conditional model as the guide).
  AutoguidanceImpl(AnyBackbone main, AnyBackbone guide, double weight)
      : main_(std::move(main)), guide_(std::move(guide)), weight_(weight) {
    TORCH_CHECK(!main_.is_empty() && !guide_.is_empty(), "Autoguidance: both the main and the guide model must be given");
    TORCH_CHECK(std::isfinite(weight_), "Autoguidance: weight must be finite, got ", weight_);
    const auto main_params = main_->parameters(), guide_params = guide_->parameters();
    TORCH_CHECK(main_params.empty() || guide_params.empty() || main_params.front().device() == guide_params.front().device(),
                "Autoguidance: the main model is on ", main_params.empty() ? "" : main_params.front().device().str(),
                " but the guide on ", guide_params.empty() ? "" : guide_params.front().device().str(),
                "; both must be on one device");
    register_module("main", main_.ptr());
    register_module("guide", guide_.ptr());
  }

  template <Backbone M, Backbone G>
    requires(!std::is_same_v<M, AnyBackbone> || !std::is_same_v<G, AnyBackbone>)
  AutoguidanceImpl(M main, G guide, double weight) : AutoguidanceImpl(wrap(std::move(main)), wrap(std::move(guide)), weight) {}

  /// eps_guide + w (eps_main - eps_guide), in the main prediction's dtype; `cond` (class labels) goes to
  /// both. Under bf16 autocast both predictions are combined in fp32, as w > 1 amplifies their difference.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    auto main = main_->forward(x, t, cond);
    auto guide = guide_->forward(x, t, cond);
    TORCH_CHECK(main.sizes() == guide.sizes(), "Autoguidance: the main model returned shape ", main.sizes(),
                " but the guide returned ", guide.sizes(), "; both must predict noise of the input's shape");
    const auto dtype = main.scalar_type();
    const auto wide = dtype == torch::kBFloat16 || dtype == torch::kHalf ? torch::kFloat : dtype;
    return torch::lerp(guide.to(wide), main.to(wide), weight_).to(dtype);
  }

  /// w: 1 is the main model alone, 0 the guide alone.
  double weight() const { return weight_; }
  AnyBackbone& main() { return main_; }
  AnyBackbone& guide() { return guide_; }

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())})

 private:
  template <Backbone B>
  static AnyBackbone wrap(B backbone) {
    if constexpr (std::is_same_v<B, AnyBackbone>) {
      return backbone;
    } else {
      TORCH_CHECK(static_cast<bool>(backbone), "Autoguidance: both the main and the guide model must be given");
      return AnyBackbone(std::move(backbone));
    }
  }

  AnyBackbone main_, guide_;
  double weight_;
};
TORCH_MODULE(Autoguidance);

}  // namespace diffusion
