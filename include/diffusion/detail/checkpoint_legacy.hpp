#pragma once

#include <diffusion/detail/verified_archive.hpp>
#include <diffusion/backbones/unet.hpp>
#include <diffusion/registry.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

/// Legacy and migration: what older writers left that the current schema (checkpoint.hpp) does not
/// spell any more. Format 1 (before the JSON config and the checksum) kept its schedule in separate
/// fields and its string maps as numbered entries; LibTorch 1.x wrote optimizer keys LibTorch 2.x
/// misreads. Each reader here turns the old form into the current one, and nothing else reads the old form.
namespace diffusion::detail {

/// What format 1 recorded that the schema now keeps in its JSON config.
struct FormatOneRecord {
  bool has_ema = false;
  NoiseScheduleOptions schedule;
  std::map<std::string, std::string> metadata, training;
  std::optional<BackboneConfig> backbone;
};

/// Format 1 stored string maps as "PREFIX_keys" (newline-joined) and "PREFIX_value_I".
inline std::map<std::string, std::string> read_v1_map(torch::serialize::InputArchive& a, const std::string& prefix,
                                                      const std::string& file) {
  std::map<std::string, std::string> out;
  c10::IValue stored;
  if (!a.try_read(prefix + "_keys", stored)) return out;
  const auto keys = stored.toStringRef();
  size_t begin = 0, i = 0;
  while (begin < keys.size()) {
    const auto end = std::min(keys.find('\n', begin), keys.size());
    out[keys.substr(begin, end - begin)] = required_value(a, prefix + "_value_" + std::to_string(i++), file).toStringRef();
    begin = end + 1;
  }
  return out;
}

/// The example program's backbone presets (its --backbone names, which format 1 recorded) as registered
/// backbones: "conv" and "conv-small" a convnet of `widths` (empty: 32, 64, 128, 256 and 32, 64), "smol"
/// and "chunky" the seed's MLPs, "unet" a unet of `widths` (empty: UNetOptions') with `blocks` per level
/// (empty: one each) and `patch` when > 0. nullopt for another name. The program and the format-1 reader
/// both ask this one table.
inline std::optional<BackboneConfig> preset_backbone(const std::string& name, std::vector<int64_t> widths = {},
                                                     std::vector<int64_t> blocks = {}, int64_t patch = 0) {
  if (name == "conv" || name == "conv-small") {
    if (widths.empty()) widths = name == "conv" ? std::vector<int64_t>{32, 64, 128, 256} : std::vector<int64_t>{32, 64};
    return BackboneConfig{"convnet", {{"widths", widths}}};
  }
  if (name == "smol") return BackboneConfig{"smol_mlp", nlohmann::json::object()};
  if (name == "chunky") return BackboneConfig{"chunky_mlp", nlohmann::json::object()};
  if (name != "unet") return std::nullopt;
  if (widths.empty()) widths = UNetOptions().widths();
  if (blocks.empty()) blocks.assign(widths.size(), 1);
  BackboneConfig config{"unet", {{"widths", widths}, {"blocks", blocks}}};
  if (patch > 0) config.options["patch"] = patch;
  return config;
}

/// The example program's format-1 metadata (backbone, widths, blocks, patch) as a registered backbone,
/// so that its old checkpoints still load with load_model.
inline std::optional<BackboneConfig> v1_backbone(const std::map<std::string, std::string>& m) {
  const auto ints = [&](const char* key) {
    std::vector<int64_t> out;
    if (!m.count(key)) return out;
    std::stringstream ss(m.at(key));
    for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoll(item));
    return out;
  };
  if (!m.count("backbone")) return std::nullopt;
  return preset_backbone(m.at("backbone"), ints("widths"), ints("blocks"), m.count("patch") ? std::stoll(m.at("patch")) : 1);
}

/// Reads format 1's record (the fields beside the weights and the progress).
inline FormatOneRecord read_format_one(torch::serialize::InputArchive& a, const std::string& file) {
  FormatOneRecord r;
  r.has_ema = required_value(a, "has_ema", file).toBool();
  r.schedule = NoiseScheduleOptions()
                   .num_timesteps(required_value(a, "schedule_timesteps", file).toInt())
                   .kind(parse_schedule_kind(required_value(a, "schedule_kind", file).toStringRef()))
                   .beta_start(required_value(a, "schedule_beta_start", file).toDouble())
                   .beta_end(required_value(a, "schedule_beta_end", file).toDouble())
                   .cosine_s(required_value(a, "schedule_cosine_s", file).toDouble())
                   .max_beta(required_value(a, "schedule_max_beta", file).toDouble());
  r.metadata = read_v1_map(a, "metadata", file);
  r.training = read_v1_map(a, "training", file);
  r.backbone = v1_backbone(r.metadata);
  return r;
}

/// A copy of an optimizer's archive whose parameter keys LibTorch 2.x can read. The optimizers key each
/// parameter's state by the address of its TensorImpl as text: LibTorch 1.13 writes it in hexadecimal
/// ("0x55d5..."), 2.x parses it as a decimal number (std::stoull), so every 1.13 key reads as 0 there and
/// the states land on the wrong parameters. Hexadecimal keys are rewritten in decimal, in the state's
/// names and in each parameter group's list; everything else is copied as it is.
inline torch::serialize::InputArchive portable_optimizer_archive(torch::serialize::InputArchive& in,
                                                                 const torch::Device& device) {
  const auto decimal = [](const std::string& key) {
    return key.rfind("0x", 0) == 0 ? std::to_string(std::stoull(key, nullptr, 16)) : key;
  };
  const std::function<void(torch::serialize::InputArchive&, torch::serialize::OutputArchive&)> copy =
      [&](torch::serialize::InputArchive& from, torch::serialize::OutputArchive& to) {
        for (const auto& key : from.keys()) {
          torch::serialize::InputArchive nested;
          if (from.try_read(key, nested)) {
            torch::serialize::OutputArchive out(to.compilation_unit());
            copy(nested, out);
            to.write(decimal(key), out);
            continue;
          }
          torch::Tensor tensor;
          if (from.try_read(key, tensor)) {
            to.write(key, tensor);
          } else if (from.try_read(key, tensor, /*is_buffer=*/true)) {
            to.write(key, tensor, /*is_buffer=*/true);
          } else {
            c10::IValue value;
            from.read(key, value);
            to.write(key, value.isString() ? c10::IValue(decimal(value.toStringRef())) : value);
          }
        }
      };
  torch::serialize::OutputArchive out;
  copy(in, out);
  std::ostringstream bytes;
  out.save_to(bytes);
  torch::serialize::InputArchive portable;
  std::istringstream back(bytes.str());
  portable.load_from(back, device);
  return portable;
}

/// Loads an optimizer's state from `state`, migrating LibTorch 1.x's keys when this is LibTorch 2.x.
inline void load_optimizer_state(torch::optim::Optimizer& optimizer, torch::serialize::InputArchive& state,
                                 const torch::Device& device) {
#if TORCH_VERSION_MAJOR >= 2
  auto portable = portable_optimizer_archive(state, device);  // written by LibTorch 1.x, perhaps
  optimizer.load(portable);
#else
  (void)device;
  optimizer.load(state);
#endif
}

}  // namespace diffusion::detail
