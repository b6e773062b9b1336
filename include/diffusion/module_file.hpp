#pragma once

#include <diffusion/detail/archive.hpp>
#include <diffusion/detail/verified_archive.hpp>

#include <torch/torch.h>

#include <concepts>
#include <filesystem>
#include <string>

/// Module and tensor files (what torch::save(module, path) and torch::save(tensor, path) write), written
/// and read with a checkpoint's integrity (detail::verified_archive.hpp) but none of its schema: a
/// classifier's weights, a tensor of statistics.
namespace diffusion {

/// torch::save(module, path), written as checkpoints are: atomically (a crash or a full disk keeps the
/// previous file) and with the checksum load_module_file verifies; torch::load reads the file too.
/// `kind` names the file in messages ("classifier: writing net.pt failed: ...").
template <class M>
void save_module_file(const std::filesystem::path& path, const M& module, const std::string& kind = "weights") {
  torch::serialize::OutputArchive archive;
  if constexpr (std::derived_from<M, torch::nn::Module>) {
    module.save(archive);
  } else {
    module->save(archive);
  }
  detail::save_archive(archive, path, kind);
}

/// torch::load(module, path) for a file torch::save(module, path) (or save_module_file) wrote (a classifier, say), with a
/// checkpoint's checks (detail::open_archive: a damaged or crafted file is one error naming it, as
/// `kind`: "classifier: net.pt is damaged: ..."), and every name and shape checked before any weight
/// changes (torch::load would take a tensor of another shape in place of the parameter's). The module
/// (a torch::nn::Module, a TORCH_MODULE holder or a shared_ptr) is left as it was when refused.
template <class M>
void load_module_file(const std::filesystem::path& path, M& module, const std::string& kind = "weights") {
  auto opened = detail::open_archive(path, std::nullopt, kind);
  if constexpr (std::derived_from<M, torch::nn::Module>) {
    detail::load_module_from(opened.archive, module, kind + ": " + path.string());
  } else {
    detail::load_module_from(opened.archive, *module, kind + ": " + path.string());
  }
}

/// torch::load(tensor, path) for a file torch::save(tensor, path) wrote, with a checkpoint's checks
/// (detail::open_archive), naming the file as `kind` when refused; also refused: a file without a
/// tensor where torch::save puts it (a saved module, say).
inline torch::Tensor load_tensor_file(const std::filesystem::path& path, const std::string& kind = "tensor") {
  auto opened = detail::open_archive(path, std::nullopt, kind);
  torch::Tensor t;
  DIFFUSION_CHECK(IncompatibleFileError, opened.archive.try_read("0", t), kind, ": ", path.string(),
              " holds no tensor (torch::save(tensor, path) writes one under the key \"0\")");
  return t;
}

}  // namespace diffusion
