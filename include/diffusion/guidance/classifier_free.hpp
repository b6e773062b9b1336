#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/registry.hpp>

#include <torch/torch.h>

#include <cmath>
#include <utility>
#include <vector>

/// Classifier-free guidance: ask a class-conditional model for a class, and get it.
namespace diffusion {

/// Options for ClassifierFreeGuidance.
///
/// Example:
///   ClassifierFreeGuidanceOptions(3.0).rescale(0.7)
struct ClassifierFreeGuidanceOptions {
  /* implicit */ ClassifierFreeGuidanceOptions(double weight) : weight_(weight) {}
  /// w: 1 is the conditional model alone, 0 the unconditional one; w > 1 pushes each prediction away from
  /// the unconditional one, towards what makes the sample typical of its class.
  TORCH_ARG(double, weight);
  /// phi of guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
  /// Flawed", sec. 3.4, eq. 15-16): the guided prediction is scaled to the conditional prediction's
  /// per-sample standard deviation and mixed in with weight phi, which undoes the overexposure large w
  /// causes. 0: off.
  TORCH_ARG(double, rescale) = 0.0;
};

/// A backbone whose prediction for class labels `cond` is classifier-free guided (Ho & Salimans 2022,
/// "Classifier-Free Diffusion Guidance", eq. 6, written for noise):
///
///   eps(x_t, t, c) = eps(x_t, t, null) + w (eps(x_t, t, c) - eps(x_t, t, null))
///
/// of one class-conditional model that learned both predictions (trained with its labels dropped to
/// null_class now and then: TrainerOptions::cond_dropout). It predicts whatever the model predicts
/// (noise, v or x_0: the combination is affine, so the same w works in each). w = 1 calls the model once
/// with the labels, w = 0 once with null labels; any other w makes one batched call of 2N. Labels must be
/// given (the classes to steer towards); null_class among them samples unconditionally. It is a
/// ConditionalBackbone: every sampler takes it, and so does Autoguidance.
///
/// Example:
///   UNet model(UNetOptions().num_classes(10));   // trained with labels
///   ClassifierFreeGuidance guided(model, 3.0);
///   auto sevens = sample(guided, schedule, {16, 1, 28, 28}, DDIM(), SampleOptions().cond(torch::full({16}, 7, torch::kLong)));
class ClassifierFreeGuidanceImpl : public torch::nn::Module {
 public:
  ClassifierFreeGuidanceImpl(AnyBackbone model, ClassifierFreeGuidanceOptions options)
      : options(std::move(options)), model_(std::move(model)) {
    TORCH_CHECK(!model_.is_empty(), "ClassifierFreeGuidance: the model must be given");
    TORCH_CHECK(model_->conditional(), "ClassifierFreeGuidance: the model takes no class labels (num_classes 0, or not "
                "a ConditionalBackbone)");
    TORCH_CHECK(std::isfinite(this->options.weight()), "ClassifierFreeGuidance: weight must be finite, got ",
                this->options.weight());
    TORCH_CHECK(this->options.rescale() >= 0 && this->options.rescale() <= 1,
                "ClassifierFreeGuidance: rescale must be in [0, 1], got ", this->options.rescale());
    register_module("model", model_.ptr());
  }
  template <ConditionalBackbone B>
    requires(!std::is_same_v<B, AnyBackbone>)
  ClassifierFreeGuidanceImpl(B model, ClassifierFreeGuidanceOptions options)
      : ClassifierFreeGuidanceImpl(AnyBackbone(std::move(model)), std::move(options)) {}

  /// The guided prediction for x (N, ...) at t (N,) towards the classes `cond` (N,), in the model's dtype
  /// (combined in fp32 under bf16, as w > 1 amplifies the difference).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    TORCH_CHECK(cond.defined(), "ClassifierFreeGuidance: class labels are needed (the classes to guide towards)");
    TORCH_CHECK(cond.dim() == 1 && cond.size(0) == x.size(0), "ClassifierFreeGuidance: cond must hold one label per "
                "sample (", x.size(0), "), got shape ", cond.sizes());
    const double w = options.weight();
    const auto null = torch::full_like(cond, null_class);
    if (w == 1.0) return model_->forward(x, t, cond);
    if (w == 0.0) return model_->forward(x, t, null);
    const auto both = model_->forward(torch::cat({x, x}), torch::cat({t, t}), torch::cat({cond, null}));
    const int64_t n = x.size(0);
    const auto dtype = both.scalar_type();
    const auto wide = dtype == torch::kBFloat16 || dtype == torch::kHalf ? torch::kFloat : dtype;
    const auto conditional = both.slice(0, 0, n).to(wide), unconditional = both.slice(0, n).to(wide);
    auto guided = torch::lerp(unconditional, conditional, w);
    if (options.rescale() > 0) {
      // Lin et al. 2024, eq. 15-16: match the conditional prediction's per-sample std, then mix.
      std::vector<int64_t> dims;
      for (int64_t d = 1; d < guided.dim(); ++d) dims.push_back(d);
      const auto ratio = conditional.std(dims, /*unbiased=*/true, /*keepdim=*/true) /
                         guided.std(dims, /*unbiased=*/true, /*keepdim=*/true);
      guided = torch::lerp(guided, guided * ratio, options.rescale());
    }
    return guided.to(dtype);
  }

  ClassifierFreeGuidanceOptions options;
  AnyBackbone& model() { return model_; }

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())})

 private:
  AnyBackbone model_;
};
TORCH_MODULE(ClassifierFreeGuidance);

}  // namespace diffusion
