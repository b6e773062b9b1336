#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/detail/archive.hpp>
#include <diffusion/detail/atomic_file.hpp>
#include <diffusion/detail/pickle.hpp>
#include <diffusion/detail/zip.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/registry.hpp>
#include <diffusion/schedule.hpp>
#include <diffusion/formulation/discrete.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/training/ema.hpp>

#include <c10/util/hash.h>
#include <torch/version.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <functional>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

/// Checkpoints: the one owner of the file format. Written atomically with a checksum; read back to resume
/// training, to sample (load_model rebuilds the model without the caller knowing its architecture), or
/// to inspect (read_checkpoint_info).
///
/// The file is a LibTorch archive (a zip) holding: "format" (2); "config", a JSON document with the
/// schedule, the prediction type, the backbone's registered name and options, the trainer's options and
/// the user's metadata; "epoch", "global_step", "step_in_epoch", "skipped_steps" and "rng" (the trainer's
/// generator), and for a checkpoint written mid-epoch "epoch_rng" (the generator that drew the epoch's
/// shuffle); "model" and, when an EMA is kept, "ema" (both nested like Module::save, so either loads into
/// the model) and "ema_updates"; and "optimizer". The zip's comment holds "diffusion-sha1:" and the
/// SHA-1 of every byte up to the comment (the end record included, its comment length counted as 0), so
/// a changed byte anywhere is found on reading, and a format-2 file without the comment is refused as
/// damaged. Format 1 (before the JSON config and the checksum) is read too, verified by the zip's own
/// CRC-32 of each entry (which LibTorch does not check), so a changed byte in an entry is found as well.
namespace diffusion {

inline constexpr int64_t checkpoint_format = 2;

/// What a checkpoint says about itself, readable without building a model.
struct CheckpointInfo {
  std::filesystem::path path;
  int64_t format = 0;
  /// Epochs completed, optimizer steps taken, and steps taken in the next epoch (written mid-epoch) when
  /// it was written.
  int64_t epoch = 0, global_step = 0, step_in_epoch = 0;
  bool has_ema = false;
  /// The formulation trained for (make_formulation rebuilds it): for files written before formulations
  /// were recorded, "ddpm" with the recorded schedule and prediction.
  FormulationConfig formulation;
  /// For the discrete formulation ("ddpm"), its schedule and what the model predicts (the defaults for
  /// another formulation); sampling must use the same.
  NoiseScheduleOptions schedule;
  Prediction prediction = Prediction::Epsilon;
  /// The backbone's registered name and options (absent when its type was not registered).
  std::optional<BackboneConfig> backbone;
  /// The trainer's options, as JSON.
  nlohmann::json training = nlohmann::json::object();
  /// The shape of one training example, (C, H, W) for images, as the Trainer recorded it: what a program
  /// samples. Empty in files written before it was recorded.
  std::vector<int64_t> data_shape;
  /// Free-form strings the trainer's user attached.
  std::map<std::string, std::string> metadata;
};

/// Where a training run stood: what save_checkpoint writes for it and load_training_state restores.
struct TrainingProgress {
  /// Epochs completed, steps taken in all, steps taken in the epoch in progress, and steps skipped for
  /// non-finite values.
  int64_t epoch = 0, global_step = 0, step_in_epoch = 0, skipped_steps = 0;
  /// The trainer's random generator state (torch::Generator::get_state()), and its state when the epoch
  /// in progress began (to draw the same shuffle again on resuming mid-epoch; undefined between epochs).
  /// Both on the CPU.
  torch::Tensor rng_state, epoch_rng_state;
  /// The trainer's options (JSON; read back as CheckpointInfo::training too): a position in an epoch
  /// means something only for the same data size, batch size and ranks.
  nlohmann::json training = nlohmann::json::object();
};

/// What save_checkpoint writes. The pointers may be null where there is nothing of the kind (no EMA, no
/// optimizer: a checkpoint that only samples).
struct CheckpointContents {
  torch::nn::Module* model = nullptr;
  torch::optim::Optimizer* optimizer = nullptr;
  const EMA* ema = nullptr;
  TrainingProgress progress;
  /// The discrete schedule and prediction type, recorded as the formulation "ddpm" unless `formulation`
  /// is given.
  NoiseScheduleOptions schedule;
  Prediction prediction = Prediction::Epsilon;
  /// The formulation trained for, when not the discrete schedule above.
  std::optional<FormulationConfig> formulation;
  std::map<std::string, std::string> metadata;
};

namespace detail {

/// The key of CheckpointInfo::data_shape in the training record (written by the Trainer).
inline constexpr const char* data_shape_key = "data_shape";

/// The archive's keys, in one place.
namespace key {
inline constexpr const char* format = "format";
inline constexpr const char* config = "config";
inline constexpr const char* epoch = "epoch";
inline constexpr const char* global_step = "global_step";
inline constexpr const char* rng = "rng";
inline constexpr const char* epoch_rng = "epoch_rng";
inline constexpr const char* step_in_epoch = "step_in_epoch";
inline constexpr const char* skipped_steps = "skipped_steps";
inline constexpr const char* model = "model";
inline constexpr const char* ema = "ema";
inline constexpr const char* has_ema = "has_ema";
inline constexpr const char* optimizer = "optimizer";
}  // namespace key

inline constexpr std::string_view checksum_tag = "diffusion-sha1:";
/// SHA-1 (c10's) of `bytes` up to the end record, with the comment length counted as 0.
inline std::string archive_digest(const std::string& bytes, size_t end) {
  auto covered = bytes.substr(0, end + zip_end_record);
  covered[end + 20] = covered[end + 21] = '\0';
  return c10::sha1(covered).str();
}

/// Serializes `archive`, adds the checksum comment, and writes it atomically; `kind` names the file in
/// messages.
inline void save_archive(torch::serialize::OutputArchive& archive, const std::filesystem::path& path,
                         const std::string& kind = "checkpoint") {
  std::string bytes;
  archive.save_to([&bytes](const void* data, size_t size) -> size_t {
    bytes.append(static_cast<const char*>(data), size);
    return size;
  });
  const auto end = find_zip_end(bytes);
  TORCH_CHECK(end && bytes.size() == *end + zip_end_record, kind, ": LibTorch wrote an archive without a plain zip "
              "end record; cannot add the checksum to ", path.string());
  const std::string comment = std::string(checksum_tag) + archive_digest(bytes, *end);
  bytes[*end + 20] = static_cast<char>(comment.size() & 0xFF);
  bytes[*end + 21] = static_cast<char>(comment.size() >> 8);
  bytes += comment;
  write_file_atomically(path, bytes, kind.c_str());
}

/// Refuses, naming `file` ("checkpoint: run.pt"), a tensor anywhere in `archive` (nested archives, lists and dicts included)
/// whose view reaches past its storage: LibTorch rebuilds each tensor from the pickle's offset, sizes and
/// strides without checking them against the record, which a crafted file makes point anywhere.
inline void check_tensor_bounds(torch::serialize::InputArchive& archive, const std::string& file) {
  const std::function<void(const c10::IValue&, const std::string&)> visit = [&](const c10::IValue& v, const std::string& key) {
    if (v.isTensor()) {
      const auto& t = v.toTensor();
      if (!t.defined() || t.numel() == 0 || !t.has_storage()) return;
      int64_t last = t.storage_offset();
      bool ok = last >= 0;
      for (int64_t d = 0; d < t.dim(); ++d) {
        ok = ok && t.stride(d) >= 0;
        last += (t.size(d) - 1) * t.stride(d);
      }
      TORCH_CHECK(ok && last >= 0 && static_cast<uint64_t>(last) < t.storage().nbytes() / t.element_size(),
                  file, " is damaged: tensor '", key, "' reaches past its data (offset ", t.storage_offset(),
                  ", sizes ", t.sizes(), ", strides ", t.strides(), ", ", t.storage().nbytes(), " bytes stored)");
    } else if (v.isList()) {
      for (const auto& e : v.toListRef()) visit(e, key);
    } else if (v.isGenericDict()) {
      for (const auto& e : v.toGenericDict()) visit(e.value(), key);
    } else if (v.isTuple()) {
      for (const auto& e : v.toTupleRef().elements()) visit(e, key);
    }
  };
  const std::function<void(torch::serialize::InputArchive&, const std::string&)> walk =
      [&](torch::serialize::InputArchive& a, const std::string& prefix) {
        for (const auto& key : a.keys()) {
          torch::serialize::InputArchive nested;
          if (a.try_read(key, nested)) {
            walk(nested, prefix + key + ".");
            continue;
          }
          c10::IValue value;
          if (a.try_read(key, value)) visit(value, prefix + key);
        }
      };
  try {
    walk(archive, "");
  } catch (const std::exception& e) {
    if (std::string(e.what()).rfind(file, 0) == 0) throw;  // ours, from visit
    TORCH_CHECK(false, file, " is damaged or not a LibTorch archive (", libtorch_reason(e.what()), ")");
  }
}

/// A LibTorch archive read and verified (open_archive), and whether it carried a diffusion checksum.
struct VerifiedArchive {
  torch::serialize::InputArchive archive;
  bool sealed = false;
};

/// Reads and verifies a LibTorch archive (a zip that torch::save or save_checkpoint wrote) into an
/// archive whose tensors land on `device`. Every way a file can be unreadable becomes one error naming
/// it as `kind` ("checkpoint: run.pt ..."): missing, not a regular file, empty, truncated or not a zip, a
/// checksum that does not match (a changed byte), in a file without one a zip entry that does not match
/// its CRC-32, a zip entry outside the file, a pickle that would make LibTorch's unpickler allocate far
/// more than its size (detail::check_pickle), an archive LibTorch cannot read, a tensor that reaches
/// past its data.
inline VerifiedArchive open_archive(const std::filesystem::path& path, std::optional<torch::Device> device,
                                    const std::string& kind) {
  const auto name = path.string(), file = kind + ": " + name;
  TORCH_CHECK(std::filesystem::exists(path), file, ": no such file");
  TORCH_CHECK(std::filesystem::is_regular_file(path), file, " is not a regular file (a directory, a pipe?)");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), file, ": cannot open it");
  const auto size = static_cast<size_t>(std::filesystem::file_size(path));
  TORCH_CHECK(size > 0, file, " is empty (a save that never finished?)");
  // The end record lies in the last 64 kB: a large file that is no zip is refused before it is read.
  std::string bytes(std::min(size, zip_end_record + 0xFFFF), '\0');
  const size_t tail_at = size - bytes.size();
  in.seekg(static_cast<std::streamoff>(tail_at));
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  const auto tail_end = in ? find_zip_end(bytes) : std::nullopt;
  TORCH_CHECK(tail_end, file, " is truncated or not a ", kind == "checkpoint" ? "checkpoint" : "LibTorch archive",
              " (no zip end record)");
  const size_t end = tail_at + *tail_end;  // in the whole file
  bytes.assign(size, '\0');
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  TORCH_CHECK(in && in.peek() == std::char_traits<char>::eof(), file, ": cannot read it (", std::strerror(errno),
              "; did it change while being read?)");
  const std::string comment = bytes.substr(end + zip_end_record);
  VerifiedArchive out;
  out.sealed = comment.rfind(checksum_tag, 0) == 0;
  if (out.sealed) {
    TORCH_CHECK(comment.substr(checksum_tag.size()) == archive_digest(bytes, end), file,
                " is damaged: its contents do not match the checksum written with it");
  }
  const auto entries = zip_entries(bytes, end, file);
  if (!out.sealed) check_zip_crcs(bytes, entries, file);  // no checksum: the zip's own, which LibTorch skips
  // A checksum proves the file is as it was written, not that its writer was sound: the pickles are walked
  // before LibTorch's unpickler, which believes their lengths (a 4 GB string in 15 kB) and memo slots.
  // LibTorch finds entries by name ignoring case, so any "*.pkl" (data.PKL too), stored or deflated.
  for (const auto& entry : entries) {
    std::string lower = entry.name;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    if (lower.ends_with(".pkl") || lower.ends_with(".debug_pkl"))
      check_pickle(zip_entry_bytes(bytes, entry, file), file + " is damaged: its entry " + entry.name);
  }
  try {
    c10::optional<torch::Device> to;  // c10::optional is std::optional only from LibTorch 2.x
    if (device) to = *device;
    out.archive.load_from(bytes.data(), bytes.size(), to);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, file, " is damaged or not a LibTorch archive (", libtorch_reason(e.what()), ")");
  }
  check_tensor_bounds(out.archive, file);
  return out;
}

/// open_archive for a diffusion checkpoint: also refused, one that is not a diffusion checkpoint, one of
/// another format version, and one of format 2 without its checksum.
inline torch::serialize::InputArchive open_checkpoint(const std::filesystem::path& path,
                                                      std::optional<torch::Device> device = std::nullopt,
                                                      int64_t* format_out = nullptr) {
  const auto name = path.string();
  auto opened = open_archive(path, device, "checkpoint");
  auto& archive = opened.archive;
  const bool sealed = opened.sealed;
  c10::IValue format;
  bool has_format = false;
  try {
    has_format = archive.try_read(key::format, format) && format.isInt();
  } catch (const std::exception&) {
    has_format = false;
  }
  TORCH_CHECK(has_format, "checkpoint: ", name, " is not a diffusion checkpoint (no format field)");
  TORCH_CHECK(format.toInt() == 1 || format.toInt() == checkpoint_format, "checkpoint: ", name, " has format ",
              format.toInt(), "; this library reads formats 1 and ", checkpoint_format);
  // Format 1 predates the checksum; a format-2 file without one lost its zip comment (damaged, or edited).
  TORCH_CHECK(sealed || format.toInt() == 1, "checkpoint: ", name, " is damaged: it has format ", format.toInt(),
              " but no checksum in its zip comment");
  if (format_out) *format_out = format.toInt();
  return std::move(opened.archive);
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

inline c10::IValue read_value(torch::serialize::InputArchive& a, const std::string& key, const std::filesystem::path& path) {
  c10::IValue v;
  TORCH_CHECK(a.try_read(key, v), "checkpoint: ", path.string(), " has no '", key, "' field");
  return v;
}

/// Runs `read` and turns any error into one that names the file as damaged.
template <class F>
auto reading(const std::filesystem::path& path, F&& read) {
  try {
    return read();
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (what.rfind("checkpoint: ", 0) == 0) throw;
    TORCH_CHECK(false, "checkpoint: ", path.string(), " is damaged (", libtorch_reason(what), ")");
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "checkpoint: ", path.string(), " is damaged (", e.what(), ")");
  }
  return read();  // not reached
}

/// Format 1 stored string maps as "PREFIX_keys" (newline-joined) and "PREFIX_value_I".
inline std::map<std::string, std::string> read_v1_map(torch::serialize::InputArchive& a, const std::string& prefix,
                                                      const std::filesystem::path& path) {
  std::map<std::string, std::string> out;
  c10::IValue stored;
  if (!a.try_read(prefix + "_keys", stored)) return out;
  const auto keys = stored.toStringRef();
  size_t begin = 0, i = 0;
  while (begin < keys.size()) {
    const auto end = std::min(keys.find('\n', begin), keys.size());
    out[keys.substr(begin, end - begin)] = read_value(a, prefix + "_value_" + std::to_string(i++), path).toStringRef();
    begin = end + 1;
  }
  return out;
}

/// The MNIST example's format-1 metadata (backbone, widths, blocks, patch) as a registered backbone, so
/// that its old checkpoints still load with load_model.
inline std::optional<BackboneConfig> v1_backbone(const std::map<std::string, std::string>& m) {
  const auto ints = [](const std::string& s) {
    std::vector<int64_t> out;
    std::stringstream ss(s);
    for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoll(item));
    return out;
  };
  if (!m.count("backbone")) return std::nullopt;
  const auto& name = m.at("backbone");
  if (name == "conv" || name == "conv-small") return BackboneConfig{"convnet", {{"widths", ints(m.at("widths"))}}};
  if (name == "smol") return BackboneConfig{"smol_mlp", nlohmann::json::object()};
  if (name == "chunky") return BackboneConfig{"chunky_mlp", nlohmann::json::object()};
  if (name == "unet") {
    const auto widths = ints(m.at("widths"));
    return BackboneConfig{"unet", {{"widths", widths},
                                   {"blocks", m.count("blocks") ? ints(m.at("blocks")) : std::vector<int64_t>(widths.size(), 1)},
                                   {"patch", m.count("patch") ? std::stoll(m.at("patch")) : 1}}};
  }
  return std::nullopt;
}

inline CheckpointInfo read_info(torch::serialize::InputArchive& a, int64_t format, const std::filesystem::path& path) {
  CheckpointInfo info;
  info.path = path;
  info.format = format;
  info.epoch = read_value(a, key::epoch, path).toInt();
  info.global_step = read_value(a, key::global_step, path).toInt();
  c10::IValue step;
  if (a.try_read(key::step_in_epoch, step) && step.isInt()) info.step_in_epoch = step.toInt();
  if (format == 1) {
    info.has_ema = read_value(a, key::has_ema, path).toBool();
    info.schedule = NoiseScheduleOptions()
                        .num_timesteps(read_value(a, "schedule_timesteps", path).toInt())
                        .kind(parse_schedule_kind(read_value(a, "schedule_kind", path).toStringRef()))
                        .beta_start(read_value(a, "schedule_beta_start", path).toDouble())
                        .beta_end(read_value(a, "schedule_beta_end", path).toDouble())
                        .cosine_s(read_value(a, "schedule_cosine_s", path).toDouble())
                        .max_beta(read_value(a, "schedule_max_beta", path).toDouble());
    info.metadata = read_v1_map(a, "metadata", path);
    for (const auto& [k, v] : read_v1_map(a, "training", path)) info.training[k] = v;
    info.backbone = v1_backbone(info.metadata);
    info.formulation = formulation_config(DiscreteFormulation(NoiseSchedule(info.schedule), info.prediction));
    return info;
  }
  const auto config = nlohmann::json::parse(read_value(a, key::config, path).toStringRef());
  check_json_fields(config, {"schedule", "prediction", "formulation", "backbone", "training", "metadata", "has_ema"},
                    "checkpoint config");
  if (config.contains("formulation")) {
    info.formulation = {config.at("formulation").at("name").get<std::string>(), config.at("formulation").at("options")};
  }
  if (config.contains("schedule")) info.schedule = config.at("schedule").get<NoiseScheduleOptions>();
  if (config.contains("prediction")) info.prediction = parse_prediction(config.at("prediction").get<std::string>());
  if (!config.contains("formulation")) {
    TORCH_CHECK(config.contains("schedule") && config.contains("prediction"), path.string(),
                ": the checkpoint records no formulation and no schedule and prediction");
    info.formulation = formulation_config(DiscreteFormulation(NoiseSchedule(info.schedule), info.prediction));
  }
  info.has_ema = config.at("has_ema").get<bool>();
  if (config.contains("backbone")) {
    info.backbone = BackboneConfig{config.at("backbone").at("name").get<std::string>(), config.at("backbone").at("options")};
  }
  info.training = config.value("training", nlohmann::json::object());
  if (info.training.contains(data_shape_key)) {
    const auto& shape = info.training.at(data_shape_key);
    TORCH_CHECK(shape.is_array() && !shape.empty() &&
                    std::all_of(shape.begin(), shape.end(), [](const auto& d) { return d.is_number_integer() && d.template get<int64_t>() >= 1; }),
                path.string(), ": the recorded data shape is malformed (", shape.dump(), ")");
    info.data_shape = shape.get<std::vector<int64_t>>();
  }
  info.metadata = config.value("metadata", std::map<std::string, std::string>{});
  return info;
}

}  // namespace detail

/// Writes a checkpoint of `contents` to `path`, atomically (see detail::write_file_atomically: a crash or
/// a full disk leaves the previous file intact) and with its checksum. The model's backbone config is
/// recorded when its type is registered (register_backbone).
///
/// Example:
///   CheckpointContents c;
///   c.model = model.ptr().get();
///   c.schedule = schedule.options();
///   save_checkpoint("model.pt", c);
inline void save_checkpoint(const std::filesystem::path& path, const CheckpointContents& c) {
  TORCH_CHECK(c.model != nullptr, "save_checkpoint: a model is needed");
  detail::check_archive_names(*c.model, "save_checkpoint");
  namespace key = detail::key;
  // Never a checkpoint of a diverged run: it would replace a good one.
  std::vector<std::pair<std::string, torch::Tensor>> weights;
  for (const auto& p : c.model->named_parameters()) weights.emplace_back(p.key(), p.value());
  if (c.ema) {
    for (const auto& p : c.ema->shadow()) weights.emplace_back("EMA of " + p.key(), p.value());
  }
  if (!weights.empty()) {
    std::vector<torch::Tensor> finite;
    for (const auto& [name, w] : weights) finite.push_back(torch::isfinite(w.detach()).all());
    const auto all = torch::stack(finite);
    if (!all.all().item<bool>()) {
      const auto first = static_cast<size_t>(torch::logical_not(all).nonzero()[0][0].item<int64_t>());
      TORCH_CHECK(false, "save_checkpoint: refusing to write ", path.string(), ": '", weights[first].first,
                  "' holds non-finite values (the run diverged)");
    }
  }
  // The discrete formulation keeps its schedule and prediction at the top as well (files before
  // formulations were recorded had only those).
  nlohmann::json config = {{"has_ema", c.ema != nullptr},
                           {"training", c.progress.training},
                           {"metadata", c.metadata}};
  const auto formulation = c.formulation.value_or(formulation_config(DiscreteFormulation(NoiseSchedule(c.schedule), c.prediction)));
  config["formulation"] = {{"name", formulation.name}, {"options", formulation.options}};
  if (!c.formulation || c.formulation->name == "ddpm") {
    const auto discrete = std::dynamic_pointer_cast<const DiscreteFormulation>(make_formulation(formulation));
    config["schedule"] = discrete->schedule().options();
    config["prediction"] = std::string(to_string(discrete->prediction()));
  }
  if (const auto backbone = backbone_config(*c.model)) {
    config["backbone"] = {{"name", backbone->name}, {"options", backbone->options}};
  }
  torch::serialize::OutputArchive archive;
  archive.write(key::format, c10::IValue(checkpoint_format));
  archive.write(key::config, c10::IValue(config.dump()));
  const auto& p = c.progress;
  archive.write(key::epoch, c10::IValue(p.epoch));
  archive.write(key::global_step, c10::IValue(p.global_step));
  archive.write(key::step_in_epoch, c10::IValue(p.step_in_epoch));
  archive.write(key::skipped_steps, c10::IValue(p.skipped_steps));
  archive.write(key::rng, p.rng_state.defined() ? p.rng_state : torch::Tensor(torch::empty({0}, torch::kUInt8)));
  if (p.epoch_rng_state.defined()) archive.write(key::epoch_rng, p.epoch_rng_state);
  torch::serialize::OutputArchive model;
  c.model->save(model);
  archive.write(key::model, model);
  if (c.ema) c.ema->save(archive, key::ema, *c.model);
  if (c.optimizer) {
    torch::serialize::OutputArchive optimizer;
    c.optimizer->save(optimizer);
    archive.write(key::optimizer, optimizer);
  }
  detail::save_archive(archive, path);
}

/// Reads a checkpoint's info (epoch, step, schedule, prediction, backbone, options, metadata), checking
/// the whole file first.
inline CheckpointInfo read_checkpoint_info(const std::filesystem::path& path) {
  int64_t format = 0;
  auto archive = detail::open_checkpoint(path, std::nullopt, &format);
  return detail::reading(path, [&] { return detail::read_info(archive, format, path); });
}

/// Loads a checkpoint's weights into `module` (built with the same architecture): the EMA weights when
/// `use_ema` and the checkpoint has them, else the trained weights. Refused: a file that does not fit the
/// module (a missing parameter or one of another shape), and every unreadable file (open_checkpoint).
///
/// Example:
///   ConvNet model;
///   load_weights("checkpoints/checkpoint_epoch_010.pt", *model);
template <class M>
  requires std::derived_from<M, torch::nn::Module>
void load_weights(const std::filesystem::path& path, M& module, bool use_ema = true) {
  int64_t format = 0;
  auto archive = detail::open_checkpoint(path, std::nullopt, &format);
  const auto info = detail::reading(path, [&] { return detail::read_info(archive, format, path); });
  detail::load_module(archive, use_ema && info.has_ema ? detail::key::ema : detail::key::model, module, path);
}

/// load_weights for a backbone handle (a TORCH_MODULE holder or a shared_ptr).
template <Backbone B>
  requires(!std::derived_from<B, torch::nn::Module>)
void load_weights(const std::filesystem::path& path, B& model, bool use_ema = true) {
  load_weights(path, unwrap(model), use_ema);
}

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
  TORCH_CHECK(opened.archive.try_read("0", t), kind, ": ", path.string(),
              " holds no tensor (torch::save(tensor, path) writes one under the key \"0\")");
  return t;
}

/// Restores a training run: the model's trained weights, the optimizer's state and the EMA (each when
/// given), with every tensor on `device`; returns the epoch, step and generator state to continue from,
/// and the options the run recorded. `check`, when given, sees the checkpoint's info before anything
/// changes and may refuse it by throwing (the Trainer refuses another schedule or prediction type).
/// Refused: an EMA asked for but absent, a file that does not fit the model.
inline TrainingProgress load_training_state(const std::filesystem::path& path, torch::nn::Module& model,
                                            torch::optim::Optimizer* optimizer, EMA* ema, const torch::Device& device,
                                            const std::function<void(const CheckpointInfo&)>& check = nullptr) {
  int64_t format = 0;
  auto archive = detail::open_checkpoint(path, device, &format);
  const auto info = detail::reading(path, [&] { return detail::read_info(archive, format, path); });
  if (check) check(info);
  TORCH_CHECK(!ema || info.has_ema, "checkpoint: ", path.string(), " has no EMA weights but this run keeps an EMA");
  // The model first: its names and shapes are checked before anything is copied, so a file written for
  // another model changes neither the model nor the EMA.
  detail::load_module(archive, detail::key::model, model, path);
  if (ema) ema->load(archive, detail::key::ema, model, path, info.global_step);
  if (optimizer) {
    torch::serialize::InputArchive state;
    TORCH_CHECK(archive.try_read(detail::key::optimizer, state), "checkpoint: ", path.string(), " has no optimizer state");
    detail::reading(path, [&] {
#if TORCH_VERSION_MAJOR >= 2
      auto portable = detail::portable_optimizer_archive(state, device);  // written by LibTorch 1.x, perhaps
      optimizer->load(portable);
#else
      optimizer->load(state);
#endif
      return 0;
    });
  }
  TrainingProgress progress{info.epoch, info.global_step, info.step_in_epoch, 0, {}, {}, info.training};
  c10::IValue value;
  if (archive.try_read(detail::key::skipped_steps, value)) progress.skipped_steps = value.toInt();
  TORCH_CHECK(archive.try_read(detail::key::rng, progress.rng_state), "checkpoint: ", path.string(),
              " has no generator state");
  progress.rng_state = progress.rng_state.cpu();
  if (archive.try_read(detail::key::epoch_rng, progress.epoch_rng_state)) progress.epoch_rng_state = progress.epoch_rng_state.cpu();
  TORCH_CHECK(progress.step_in_epoch == 0 || progress.epoch_rng_state.defined(), "checkpoint: ", path.string(),
              " stopped mid-epoch but has no record of the epoch's shuffle");
  return progress;
}

/// A model rebuilt from a checkpoint, ready to sample, and what the checkpoint says about itself (its
/// schedule and prediction type above all: sample with NoiseSchedule(info.schedule) and
/// SampleOptions().prediction(info.prediction)).
struct LoadedModel {
  AnyBackbone model{nullptr};
  CheckpointInfo info;
};

/// Rebuilds the model a checkpoint was written for (its registered backbone and options), loads its EMA
/// weights (or the trained ones when `use_ema` is false or there are none), moves it to `device` and puts
/// it in eval mode. The caller need not know the architecture. Refused: a checkpoint without a recorded
/// backbone (its type was not registered when it was written: use load_weights into the model), a
/// backbone name this program has not registered (the known ones are listed), and every unreadable file.
///
/// Example:
///   auto [model, info] = load_model("runs/mnist/checkpoints/checkpoint_epoch_008.pt");
///   auto x = sample(model, NoiseSchedule(info.schedule), {25, 1, 28, 28}, DPMSolverPP().steps(15),
///                   SampleOptions().prediction(info.prediction).seed(0));
inline LoadedModel load_model(const std::filesystem::path& path, bool use_ema = true,
                              const torch::Device& device = torch::kCPU) {
  auto info = read_checkpoint_info(path);
  TORCH_CHECK(info.backbone, "load_model: ", path.string(), " records no backbone (its type was not registered when it "
              "was written); build the model yourself and use load_weights");
  auto model = make_backbone(*info.backbone);
  load_weights(path, model->module(), use_ema);
  model->to(device);
  model->eval();
  return {std::move(model), std::move(info)};
}

/// The name run outputs give a checkpoint after `epoch` completed epochs and `step_in_epoch` steps of the
/// next: `checkpoint_epoch_NNN.pt`, or `checkpoint_epoch_NNN_step_SSSSSS.pt` mid-epoch. At least three and
/// six digits, so that names sort in the order they were written.
inline std::string checkpoint_filename(int64_t epoch, int64_t step_in_epoch = 0) {
  TORCH_CHECK(epoch >= 0 && step_in_epoch >= 0, "checkpoint_filename: epoch and step must be >= 0, got ", epoch, " and ",
              step_in_epoch);
  const auto padded = [](int64_t v, size_t width) {
    auto digits = std::to_string(v);
    if (digits.size() < width) digits.insert(0, width - digits.size(), '0');
    return digits;
  };
  return "checkpoint_epoch_" + padded(epoch, 3) + (step_in_epoch > 0 ? "_step_" + padded(step_in_epoch, 6) : "") + ".pt";
}

/// The checkpoints `checkpoint_epoch_NNN[_step_SSSSSS].pt` in `dir`, oldest first.
inline std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> out;
  if (!std::filesystem::is_directory(dir)) return out;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (name.starts_with("checkpoint_epoch_") && name.ends_with(".pt")) out.push_back(entry.path());
  }
  // By (epoch, step): names of different digit counts (epoch 1000 and up) sort by number, not by text.
  const auto position = [](const std::filesystem::path& p) {
    const auto name = p.filename().string();
    const auto rest = name.substr(17, name.size() - 17 - 3);  // after "checkpoint_epoch_", before ".pt"
    const auto cut = rest.find("_step_");
    try {
      return std::pair<int64_t, int64_t>{std::stoll(rest.substr(0, cut)),
                                         cut == std::string::npos ? 0 : std::stoll(rest.substr(cut + 6))};
    } catch (const std::exception&) {
      return std::pair<int64_t, int64_t>{-1, -1};
    }
  };
  std::sort(out.begin(), out.end(), [&](const auto& a, const auto& b) { return position(a) < position(b); });
  return out;
}

}  // namespace diffusion
