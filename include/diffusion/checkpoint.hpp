#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/schedule.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

/// Checkpoints: written atomically, read back for resuming or for sampling without the training code.
namespace diffusion {

/// What a checkpoint says about itself, readable without building a model.
struct CheckpointInfo {
  int64_t epoch = 0;
  int64_t global_step = 0;
  bool has_ema = false;
  NoiseScheduleOptions schedule;
  /// Free-form strings the trainer's user attached (the example stores the backbone's name and options).
  std::map<std::string, std::string> metadata;
  /// The trainer options the checkpoint was written with, by name ("batch_size" -> "128", ...).
  std::map<std::string, std::string> training;
};

namespace detail {

inline constexpr int64_t kCheckpointFormat = 1;

inline void write_schedule(torch::serialize::OutputArchive& a, const NoiseScheduleOptions& s) {
  a.write("schedule_timesteps", c10::IValue(s.timesteps()));
  a.write("schedule_kind", c10::IValue(to_string(s.kind())));
  a.write("schedule_beta_start", c10::IValue(s.beta_start()));
  a.write("schedule_beta_end", c10::IValue(s.beta_end()));
  a.write("schedule_cosine_s", c10::IValue(s.cosine_s()));
  a.write("schedule_max_beta", c10::IValue(s.max_beta()));
}

inline c10::IValue read_value(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v;
}

inline NoiseScheduleOptions read_schedule(torch::serialize::InputArchive& a) {
  return NoiseScheduleOptions()
      .timesteps(read_value(a, "schedule_timesteps").toInt())
      .kind(read_value(a, "schedule_kind").toStringRef() == "cosine" ? ScheduleKind::Cosine : ScheduleKind::Linear)
      .beta_start(read_value(a, "schedule_beta_start").toDouble())
      .beta_end(read_value(a, "schedule_beta_end").toDouble())
      .cosine_s(read_value(a, "schedule_cosine_s").toDouble())
      .max_beta(read_value(a, "schedule_max_beta").toDouble());
}

/// A string map is stored as "PREFIX_keys" (the keys joined by newlines) and "PREFIX_value_I", the I-th
/// key's value (archive keys stay plain identifiers).
inline void write_metadata(torch::serialize::OutputArchive& a, const std::map<std::string, std::string>& metadata,
                           const std::string& prefix = "metadata") {
  std::string keys;
  size_t i = 0;
  for (const auto& [key, value] : metadata) {
    TORCH_CHECK(!key.empty() && key.find('\n') == std::string::npos,
                "checkpoint: metadata keys must be non-empty and without newlines, got '", key, "'");
    keys += (keys.empty() ? "" : "\n") + key;
    a.write(prefix + "_value_" + std::to_string(i++), c10::IValue(value));
  }
  a.write(prefix + "_keys", c10::IValue(keys));
}

inline std::map<std::string, std::string> read_metadata(torch::serialize::InputArchive& a,
                                                        const std::string& prefix = "metadata") {
  std::map<std::string, std::string> out;
  c10::IValue stored;
  if (!a.try_read(prefix + "_keys", stored)) return out;  // absent in checkpoints written before it existed
  const auto keys = stored.toStringRef();
  size_t begin = 0, i = 0;
  while (begin < keys.size()) {
    const auto end = std::min(keys.find('\n', begin), keys.size());
    out[keys.substr(begin, end - begin)] = read_value(a, prefix + "_value_" + std::to_string(i++)).toStringRef();
    begin = end + 1;
  }
  return out;
}

inline torch::serialize::InputArchive open_checkpoint(const std::filesystem::path& path) {
  TORCH_CHECK(std::filesystem::is_regular_file(path), "checkpoint: ", path.string(), ": no such file");
  torch::serialize::InputArchive archive;
  archive.load_from(path.string());
  c10::IValue format;
  TORCH_CHECK(archive.try_read("format", format) && format.isInt(), "checkpoint: ", path.string(),
              " is not a diffusion checkpoint (no format field)");
  TORCH_CHECK(format.toInt() == kCheckpointFormat, "checkpoint: ", path.string(), " has format ", format.toInt(),
              ", this library reads format ", kCheckpointFormat);
  return archive;
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

/// Loads the nested archive `key` into `module` with Module::load, refusing an archive written for another
/// architecture: a missing parameter, or one of another shape (Module::load would silently take it).
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

}  // namespace detail

/// Writes `archive` to `path` atomically: first to `path.tmp`, then renamed over `path`, so a crash
/// while saving never destroys the previous checkpoint (the seed deletes the old one first).
inline void save_atomically(torch::serialize::OutputArchive& archive, const std::filesystem::path& path) {
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  auto tmp = path;
  tmp += ".tmp";
  archive.save_to(tmp.string());
  std::filesystem::rename(tmp, path);
}

/// Reads a checkpoint's epoch, step, schedule and metadata.
inline CheckpointInfo read_checkpoint_info(const std::filesystem::path& path) {
  auto archive = detail::open_checkpoint(path);
  CheckpointInfo info;
  info.epoch = detail::read_value(archive, "epoch").toInt();
  info.global_step = detail::read_value(archive, "global_step").toInt();
  info.has_ema = detail::read_value(archive, "has_ema").toBool();
  info.schedule = detail::read_schedule(archive);
  info.metadata = detail::read_metadata(archive);
  info.training = detail::read_metadata(archive, "training");
  return info;
}

/// Loads a checkpoint's weights into `model` (built with the same architecture): the EMA weights when
/// `use_ema` and the checkpoint has them, else the trained weights. For sampling without a trainer.
///
/// Example:
///   auto info = read_checkpoint_info("checkpoints/checkpoint_epoch_010.pt");
///   ConvNet model;
///   load_weights("checkpoints/checkpoint_epoch_010.pt", model);
///   auto x = sample(model, NoiseSchedule(info.schedule), {25, 1, 28, 28}, DDIM());
template <Backbone B>
void load_weights(const std::filesystem::path& path, B& model, bool use_ema = true) {
  auto archive = detail::open_checkpoint(path);
  const bool ema = use_ema && detail::read_value(archive, "has_ema").toBool();
  detail::load_module(archive, ema ? "ema" : "model", unwrap(model), path);
}

/// The file name the Trainer gives epoch `epoch`'s checkpoint: `checkpoint_epoch_NNN.pt` (three digits at
/// least, so that names sort by epoch up to 999).
inline std::string checkpoint_filename(int64_t epoch) {
  auto digits = std::to_string(epoch);
  if (digits.size() < 3) digits.insert(0, 3 - digits.size(), '0');
  return "checkpoint_epoch_" + digits + ".pt";
}

/// The checkpoints `checkpoint_epoch_NNN.pt` in `dir`, oldest first.
inline std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> out;
  if (!std::filesystem::is_directory(dir)) return out;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (name.starts_with("checkpoint_epoch_") && name.ends_with(".pt")) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace diffusion
