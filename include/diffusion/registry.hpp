#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/detail/registry.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <typeindex>
#include <utility>

/// Backbones by name: what lets a checkpoint rebuild its model without the program knowing the
/// architecture.
namespace diffusion {

/// A backbone as a checkpoint records it: its registered name and its options as JSON.
struct BackboneConfig {
  std::string name;
  nlohmann::json options = nlohmann::json::object();
};

/// A backbone of any type behind one type: what load_model returns and what wrappers (autoguidance)
/// hold. It adopts the wrapped module's parameters, buffers and submodules under their own names, so that
/// its state_dict, its checkpoints and its EMA read exactly like the wrapped module's (the seed's names);
/// eval(), train() and to() reach the wrapped module. forward(x, t, cond) calls it, with the labels when the
/// wrapped backbone takes them (takes_class_labels: a ConditionalBackbone with classes); labels for one that
/// does not are refused.
///
/// Example:
///   AnyBackbone model(UNet());                  // or load_model(path).model
///   auto x = sample(model, schedule, {4, 1, 28, 28}, DDIM());
class AnyBackboneImpl : public torch::nn::Module {
 public:
  /// From a type-erased module: `conditional` says whether its forward takes labels (forward(x, t, cond)).
  explicit AnyBackboneImpl(torch::nn::AnyModule backbone, bool conditional = false)
      : backbone_(std::move(backbone)), conditional_(conditional) {
    TORCH_CHECK(!backbone_.is_empty(), "AnyBackbone: the backbone must be given");
    auto& inner = *backbone_.ptr();
    for (auto& p : inner.named_parameters(/*recurse=*/false)) register_parameter(p.key(), p.value(), p.value().requires_grad());
    for (auto& b : inner.named_buffers(/*recurse=*/false)) register_buffer(b.key(), b.value());
    for (const auto& child : inner.named_children()) register_module(child.key(), child.value());
  }
  template <Backbone B>
    requires(!std::is_same_v<std::remove_cvref_t<B>, torch::nn::AnyModule>)
  explicit AnyBackboneImpl(B backbone) : AnyBackboneImpl(erase(std::move(backbone))) {}

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    if (conditional_) return backbone_.forward(x, t, cond);
    TORCH_CHECK(!cond.defined(), "AnyBackbone: class labels given to a backbone that takes none (num_classes 0, or not a "
                "ConditionalBackbone)");
    return backbone_.forward(x, t);
  }

  /// Whether the wrapped backbone takes class labels.
  bool conditional() const noexcept { return conditional_; }

  /// The wrapped module's own mode goes with this one's (a module may read is_training() itself).
  void train(bool on = true) override {
    torch::nn::Module::train(on);
    backbone_.ptr()->train(on);
  }

  /// The wrapped module (its options through a dynamic_cast to its Impl).
  torch::nn::Module& module() { return *backbone_.ptr(); }
  const torch::nn::Module& module() const { return *backbone_.ptr(); }
  torch::nn::AnyModule& any() { return backbone_; }

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())})

 private:
  /// The type-erased module and whether it takes labels (asked before the module moves).
  template <Backbone B>
  static std::pair<torch::nn::AnyModule, bool> erase(B backbone) {
    const bool conditional = takes_class_labels(backbone);
    return {torch::nn::AnyModule(std::move(backbone)), conditional};
  }
  explicit AnyBackboneImpl(std::pair<torch::nn::AnyModule, bool> erased)
      : AnyBackboneImpl(std::move(erased.first), erased.second) {}

  torch::nn::AnyModule backbone_;
  bool conditional_ = false;
};
TORCH_MODULE(AnyBackbone);

namespace detail {

struct BackboneType {
  std::string name;
  std::function<nlohmann::json(const torch::nn::Module&)> options;
};
using BackboneFactory = std::function<AnyBackbone(const nlohmann::json&)>;

inline Registry<BackboneFactory>& backbones() {
  static Registry<BackboneFactory> registry("backbone");
  return registry;
}

/// Registered Impl types, for backbone_config.
inline std::map<std::type_index, BackboneType>& backbone_types() {
  static std::map<std::type_index, BackboneType> types;
  return types;
}
inline std::mutex& backbone_types_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace detail

/// Registers the backbone module `Impl` under `name`, so that checkpoints of it record its name and
/// options and load_model rebuilds it. Impl needs a constructor from its options struct, a public
/// `options` member of that type, and to_json / from_json for the options (nlohmann-json, found by
/// argument-dependent lookup). Fields a config leaves out keep their values in `defaults` (the options
/// struct's own unless given: a preset such as ChunkyMLP passes its shape). One line per backbone; the
/// library's register themselves. A name or type registered twice is refused.
///
/// Example:
///   struct MyNetOptions { TORCH_ARG(int64_t, width) = 32; };
///   void to_json(nlohmann::json& j, const MyNetOptions& o) { j = {{"width", o.width()}}; }
///   void from_json(const nlohmann::json& j, MyNetOptions& o) { o.width(j.at("width").get<int64_t>()); }
///   struct MyNetImpl : torch::nn::Module { explicit MyNetImpl(MyNetOptions o); MyNetOptions options; ... };
///   register_backbone<MyNetImpl>("mynet");
template <class Impl, class Options = std::remove_cvref_t<decltype(std::declval<Impl&>().options)>>
void register_backbone(const std::string& name, Options defaults = Options{}) {
  {
    std::lock_guard lock(detail::backbone_types_mutex());
    TORCH_CHECK(!detail::backbone_types().count(typeid(Impl)), "register_backbone: this type is already registered as '",
                detail::backbone_types().at(typeid(Impl)).name, "'");
  }
  detail::backbones().add(name, [defaults](const nlohmann::json& options) {
    Options o = defaults;
    options.get_to(o);
    return AnyBackbone(std::make_shared<Impl>(o));
  });
  std::lock_guard lock(detail::backbone_types_mutex());
  detail::backbone_types().emplace(typeid(Impl), detail::BackboneType{name, [](const torch::nn::Module& module) {
                                     return nlohmann::json(dynamic_cast<const Impl&>(module).options);
                                   }});
}

/// The names of the registered backbones, sorted.
inline std::vector<std::string> backbone_names() { return detail::backbones().names(); }

/// The name and options of `module` if its type is registered (its dynamic type: a subclass must be
/// registered itself; an AnyBackbone answers for the module it wraps), else nothing.
inline std::optional<BackboneConfig> backbone_config(const torch::nn::Module& module) {
  if (const auto* any = dynamic_cast<const AnyBackboneImpl*>(&module)) return backbone_config(any->module());
  std::lock_guard lock(detail::backbone_types_mutex());
  const auto it = detail::backbone_types().find(typeid(module));
  if (it == detail::backbone_types().end()) return std::nullopt;
  return BackboneConfig{it->second.name, it->second.options(module)};
}

/// A new backbone, with fresh weights, as `config` describes it. Null options (`{"unet", {}}` in C++
/// braces makes a JSON null) mean the defaults, as an empty object does. Refused: an unknown name (the
/// known ones are listed), and options the backbone refuses.
inline AnyBackbone make_backbone(const BackboneConfig& config) {
  return detail::make_from_json(detail::backbones(), config.name, config.options, "make_backbone");
}

}  // namespace diffusion
