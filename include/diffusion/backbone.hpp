#pragma once

#include <torch/torch.h>

#include <concepts>
#include <memory>
#include <type_traits>

/// What the samplers and the trainer accept as a noise-prediction network.
namespace diffusion {

namespace detail {

template <class T>
struct module_of {
  using type = T;
};
template <class T>
struct module_of<std::shared_ptr<T>> {
  using type = T;
};
template <class T>
  requires std::derived_from<T, torch::nn::ModuleHolder<typename T::ContainedType>>
struct module_of<T> {
  using type = typename T::ContainedType;
};

}  // namespace detail

/// The module type behind a backbone handle: `ConvNetImpl` for `ConvNet` (a TORCH_MODULE holder),
/// for `std::shared_ptr<ConvNetImpl>` and for `ConvNetImpl` itself.
template <class B>
using module_type_t = typename detail::module_of<std::remove_cvref_t<B>>::type;

/// A torch::nn::Module (through a holder, a shared_ptr or directly), so that its parameters, device and
/// train/eval mode can be reached.
template <class B>
concept TorchModule = std::derived_from<module_type_t<B>, torch::nn::Module>;

/// A network of the noisy input and its noise level: `forward(x_t, t)` with x_t of shape (N, ...) and t of
/// shape (N,) returns a tensor of x_t's shape (a prediction of the noise, of v or of x_0, as its
/// formulation says).
template <class B>
concept NoiseConditional = requires(module_type_t<B>& m, const torch::Tensor& x, const torch::Tensor& t) {
  { m.forward(x, t) } -> std::convertible_to<torch::Tensor>;
};

/// Deprecated (to be removed after 0.x's next release): the former name of NoiseConditional, which also
/// covers v and x_0 predictions. (A concept takes no [[deprecated]] attribute.)
template <class B>
concept PredictsNoise = NoiseConditional<B>;

/// A network the samplers and the trainer can drive: a torch::nn::Module with `forward(x, t)`.
///
/// Satisfied by a TORCH_MODULE holder (`ConvNet`), its Impl (`ConvNetImpl`), a
/// `std::shared_ptr<ConvNetImpl>`, and a user's subclass of any of them.
///
/// Example:
///   struct MyNetImpl : torch::nn::Module {
///     torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t);
///   };
///   TORCH_MODULE(MyNet);
///   static_assert(diffusion::Backbone<MyNet>);
template <class B>
concept Backbone = TorchModule<B> && NoiseConditional<B>;

/// A backbone that also takes a condition: `forward(x_t, t, cond)` with cond of shape (N,) holding int64
/// class labels in [0, num_classes), or null_class for "no condition" (what classifier-free guidance's
/// unconditional branch asks for). A conditional backbone is still a Backbone: forward(x_t, t) means
/// unconditional.
template <class B>
concept ConditionalBackbone = Backbone<B> && requires(module_type_t<B>& m, const torch::Tensor& x, const torch::Tensor& t,
                                                      const torch::Tensor& cond) {
  { m.forward(x, t, cond) } -> std::convertible_to<torch::Tensor>;
};

/// The label that stands for "no condition": a conditional backbone maps it to its learned null
/// embedding (Ho & Salimans 2022 train one model for both by dropping labels to it).
inline constexpr int64_t null_class = -1;

/// The module behind a backbone handle, as a reference.
template <Backbone B>
module_type_t<B>& unwrap(B& backbone) {
  if constexpr (std::is_same_v<std::remove_cvref_t<B>, module_type_t<B>>) {
    return backbone;
  } else {
    TORCH_CHECK(static_cast<bool>(backbone), "diffusion: the backbone handle is empty (a null holder or shared_ptr)");
    return *backbone;
  }
}

/// Whether `backbone` takes class labels as it is built: a ConditionalBackbone whose options say
/// num_classes > 0 (the library's ConvNet and UNet: their forward takes labels whatever the count, but
/// with 0 classes has no embedding to look them up in), or that answers conditional() (AnyBackbone), or
/// any other ConditionalBackbone. What ClassifierFreeGuidance and Trainer::fit check before using labels.
template <Backbone B>
bool takes_class_labels(B& backbone) {
  if constexpr (!ConditionalBackbone<B>) {
    return false;
  } else {
    auto& m = unwrap(backbone);
    if constexpr (requires { m.conditional(); }) {
      return m.conditional();
    } else if constexpr (requires { m.options.num_classes(); }) {
      return m.options.num_classes() > 0;
    } else {
      return true;
    }
  }
}

}  // namespace diffusion
