#pragma once

#include <diffusion/errors.hpp>

#include <torch/torch.h>

#include <filesystem>
#include <algorithm>
#include <functional>
#include <set>
#include <string_view>
#include <string>
#include <utility>
#include <vector>

/// Reading and writing modules' weights in LibTorch archives, for checkpoints and the EMA.
namespace diffusion::detail {

/// Refuses, naming `who` and the full name, a module whose submodules, parameters or buffers LibTorch's
/// archives cannot read back: the archive stores each name as an attribute in TorchScript source, and a
/// name that is one of TorchScript's keywords ("in", "def", "class", "None", ...) is written as is and
/// then fails to parse when loading ("expected ident but found 'in'"). The list is what LibTorch 1.13
/// refused to load back, name by name; Python keywords that TorchScript accepts ("lambda", "async",
/// "yield", ...) are not refused.
inline void check_archive_names(const torch::nn::Module& module, const char* who) {
  static const std::set<std::string, std::less<>> refused = {
      "and",  "as",   "assert", "break", "class", "continue", "def", "del",    "elif",   "else",
      "Ellipsis", "False", "for", "global", "if", "import", "in",  "is",     "None",   "not",
      "or",   "pass", "raise",  "return", "True", "while",   "with", "__annotations__"};
  const auto check = [&](const std::string& full, const char* kind) {
    size_t begin = 0;
    while (begin <= full.size()) {
      const auto end = std::min(full.find('.', begin), full.size());
      const auto part = std::string_view(full).substr(begin, end - begin);
      TORCH_CHECK(refused.find(part) == refused.end(), who, ": the ", kind, " '", full, "' has the name '", part,
                  "', a TorchScript keyword, which LibTorch's archives write but cannot read back; rename it (e.g. "
                  "register_module(\"", part, "_\", ...))");
      begin = end + 1;
    }
  };
  for (const auto& m : module.named_modules("", /*include_self=*/false)) check(m.key(), "submodule");
  for (const auto& p : module.named_parameters()) check(p.key(), "parameter");
  for (const auto& b : module.named_buffers()) check(b.key(), "buffer");
}

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

/// What load_module walks: each tensor of `module` (parameters and buffers, recursively, in the nesting
/// Module::save and save_module_as write) paired with the archive's tensor of that name, every name and
/// shape checked before anything is copied.
/// `file` names the file in messages ("checkpoint: run.pt").
inline void collect_for_load(torch::serialize::InputArchive& archive, torch::nn::Module& module, const std::string& prefix,
                             const std::string& file, std::vector<std::pair<torch::Tensor, torch::Tensor>>& pairs) {
  const auto take = [&](const std::string& name, const torch::Tensor& target, bool is_buffer) {
    torch::Tensor source;
    DIFFUSION_CHECK(IncompatibleFileError, archive.try_read(name, source, is_buffer), file, " has no '", prefix + name,
                "' (written for another backbone?)");
    DIFFUSION_CHECK(IncompatibleFileError, source.sizes() == target.sizes(), file, " holds '", prefix + name,
                "' with shape ", source.sizes(), " but the model's is ", target.sizes(),
                " (written for another backbone configuration?)");
    pairs.emplace_back(target, source);
  };
  // And nothing more: a file for a larger model (another configuration, a conditional one) is as wrong as
  // one for a smaller model, and would otherwise fail later, in the optimizer's state, as a damaged file.
  for (const auto& key : archive.keys()) {
    const bool known = key == "training" || module.named_parameters(false).contains(key) ||
                       module.named_buffers(false).contains(key) ||
                       (module.named_children().contains(key) && module.named_children()[key]->is_serializable());
    DIFFUSION_CHECK(IncompatibleFileError, known, file, " holds '", prefix + key,
                "', which the model does not have (written for another backbone configuration?)");
  }
  for (const auto& p : module.named_parameters(/*recurse=*/false)) take(p.key(), p.value(), false);
  for (const auto& b : module.named_buffers(/*recurse=*/false)) take(b.key(), b.value(), true);
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::InputArchive nested;
    DIFFUSION_CHECK(IncompatibleFileError, archive.try_read(child.key(), nested), file, " has no '", prefix + child.key(),
                "' module (written for another backbone?)");
    collect_for_load(nested, *child.value(), prefix + child.key() + ".", file, pairs);
  }
}

/// Loads `archive` (written by Module::save or save_module_as) into `module`. Unlike Module::load, which
/// takes a tensor of another shape by replacing the parameter's, a file written for another architecture
/// (a missing tensor, an extra one, one of another shape) is refused before any weight changes: the
/// module is left as it was. Values are copied into the module's tensors (their dtype and device). `file`
/// names the file in messages ("checkpoint: run.pt").
inline void load_module_from(torch::serialize::InputArchive& archive, torch::nn::Module& module, const std::string& file) {
  std::vector<std::pair<torch::Tensor, torch::Tensor>> pairs;
  collect_for_load(archive, module, "", file, pairs);
  torch::NoGradGuard no_grad;
  for (auto& [target, source] : pairs) target.copy_(source);
}

/// load_module_from for the nested archive `key` of a checkpoint at `path`.
inline void load_module(torch::serialize::InputArchive& archive, const std::string& key, torch::nn::Module& module,
                        const std::filesystem::path& path) {
  const auto file = "checkpoint: " + path.string();
  torch::serialize::InputArchive nested;
  DIFFUSION_CHECK(DamagedFileError, archive.try_read(key, nested), file, " has no '", key, "' weights");
  load_module_from(nested, module, file);
}

}  // namespace diffusion::detail
