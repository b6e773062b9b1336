#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

/// Reading and writing modules' weights in LibTorch archives, for checkpoints and the EMA.
namespace diffusion::detail {

/// Writes `module` like Module::save does (same names, same nesting), but each parameter's value comes
/// from `value(full_name, parameter)`: how EMA weights are stored so that a model loads them as its own.
inline void save_module_as(const torch::nn::Module& module, torch::serialize::OutputArchive& archive,
                           const std::function<torch::Tensor(const std::string&, const torch::Tensor&)>& value,
                           const std::string& prefix = "") {
  for (const auto& p : module.named_parameters(/*recurse=*/false)) {
    // Module::load insists that requires_grad matches: mark the stand-in like the parameter.
    archive.write(p.key(), value(prefix + p.key(), p.value()).detach().requires_grad_(p.value().requires_grad()));
  }
  for (const auto& b : module.named_buffers(/*recurse=*/false)) archive.write(b.key(), b.value(), /*is_buffer=*/true);
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::OutputArchive nested(archive.compilation_unit());
    save_module_as(*child.value(), nested, value, prefix + child.key() + ".");
    archive.write(child.key(), nested);
  }
}

/// Loads the nested archive `key` into `module` with Module::load, refusing an archive written for another
/// architecture: a missing parameter, or one of another shape (Module::load would silently take it).
/// `path` names the file in messages.
inline void load_module(torch::serialize::InputArchive& archive, const std::string& key, torch::nn::Module& module,
                        const std::filesystem::path& path) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  for (const auto& p : module.named_parameters()) shapes.emplace_back(p.key(), p.value().sizes().vec());
  torch::serialize::InputArchive nested;
  TORCH_CHECK(archive.try_read(key, nested), "checkpoint: ", path.string(), " has no '", key, "' weights");
  try {
    module.load(nested);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "checkpoint: ", path.string(), " does not fit this model (written for another backbone?): ",
                e.what_without_backtrace());
  }
  size_t i = 0;
  for (const auto& p : module.named_parameters()) {
    const auto& [name, before] = shapes[i++];
    TORCH_CHECK(p.value().sizes() == torch::IntArrayRef(before), "checkpoint: ", path.string(), " holds '", name,
                "' with shape ", p.value().sizes(), " but the model's is ", torch::IntArrayRef(before),
                " (written for another backbone configuration?)");
  }
}

}  // namespace diffusion::detail
