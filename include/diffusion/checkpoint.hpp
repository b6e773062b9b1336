#pragma once

#include <diffusion/backbone.hpp>
#include <diffusion/detail/archive.hpp>
#include <diffusion/detail/checkpoint_legacy.hpp>
#include <diffusion/detail/file_kind.hpp>
#include <diffusion/detail/json.hpp>
#include <diffusion/detail/verified_archive.hpp>
#include <diffusion/errors.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/module_file.hpp>
#include <diffusion/registry.hpp>
#include <diffusion/schedule.hpp>
#include <diffusion/formulation/discrete.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/training/ema.hpp>
#include <diffusion/training/options.hpp>

#include <torch/version.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

/// Checkpoints: the schema, the one owner of what a checkpoint holds. Written atomically with a checksum
/// and read back only after the integrity checks of detail/verified_archive.hpp; format 1's fields and
/// LibTorch 1.x's optimizer keys are migrated by detail/checkpoint_legacy.hpp; run directories name
/// their checkpoints by training/run_directory.hpp. Read back to resume training, to sample (load_model
/// rebuilds the model without the caller knowing its architecture), or to inspect (read_checkpoint_info).
///
/// The file is a LibTorch archive (a zip) holding, each written and read by its own state object:
///   "format"     2;
///   "config"     the JSON record (detail::CheckpointConfig): the formulation, for the discrete one its
///                schedule and prediction type, the backbone's registered name and options, the trainer's
///                options and how the run was laid out (RunLayout), the user's metadata, whether an EMA is kept;
///   progress     TrainingProgress: "epoch", "global_step", "step_in_epoch", "skipped_steps",
///                "images_seen", "images_in_epoch", "rng" (the trainer's generator) and, for a checkpoint
///                written mid-epoch, "epoch_rng" (the generator that drew the epoch's shuffle);
///   "model"      the weights, nested like Module::save;
///   "ema"        when kept (EMA::save: nested the same way, so either loads into the model), and
///                "ema_updates";
///   "optimizer"  when there is one.
/// Format 1 (before the JSON config and the checksum) is read too.
namespace diffusion {

inline constexpr int64_t checkpoint_format = 2;

/// How a training run was laid out when its checkpoint was written, as its training record keeps it: the
/// shape of one example ((C, H, W) for images; empty when not recorded), the training set's size, the
/// batch size on each rank (-1: not recorded, as in format 1), the number of ranks, the device, and the
/// global batch the learning-rate schedule counts its warm-up and end in (the run's when it started,
/// kept across resumes with another batch; -1: not recorded).
struct RunLayout {
  std::vector<int64_t> data_shape;
  int64_t train_size = -1, batch_size = -1, world_size = 1;
  std::string device;
  int64_t schedule_batch = -1;

  /// Adds the layout to a training record (the trainer's options as JSON, whose batch size it keeps).
  void write(nlohmann::json& training) const {
    training["world_size"] = world_size;
    if (!device.empty()) training["device"] = device;
    if (train_size >= 0) training["train_size"] = train_size;
    if (!data_shape.empty()) training["data_shape"] = data_shape;
    if (batch_size >= 1) training[detail::batch_size_key] = batch_size;
    if (schedule_batch >= 1) training["schedule_batch"] = schedule_batch;
  }

  /// The layout a training record holds; a malformed data shape is refused as damage, naming `file`.
  static RunLayout read(const nlohmann::json& training, const std::string& file = "checkpoint") {
    RunLayout r;
    const auto get = [&](const char* key, int64_t otherwise) {
      return training.contains(key) && training.at(key).is_number_integer() ? training.at(key).get<int64_t>() : otherwise;
    };
    r.world_size = get("world_size", 1);
    r.train_size = get("train_size", -1);
    r.batch_size = get(detail::batch_size_key, -1);
    r.schedule_batch = get("schedule_batch", -1);
    if (training.contains("device") && training.at("device").is_string()) r.device = training.at("device").get<std::string>();
    if (training.contains("data_shape")) {
      const auto& shape = training.at("data_shape");
      DIFFUSION_CHECK(DamagedFileError, shape.is_array() && !shape.empty() &&
                          std::all_of(shape.begin(), shape.end(), [](const auto& d) { return d.is_number_integer() && d.template get<int64_t>() >= 1; }),
                      file, ": the recorded data shape is malformed (", shape.dump(), ")");
      r.data_shape = shape.get<std::vector<int64_t>>();
    }
    return r;
  }
};

/// Where a training run stood: what save_checkpoint writes for it and load_training_state restores.
/// Progress is counted in steps and in examples ("images"): the learning-rate schedule and the position
/// in an epoch's shuffle are in examples, so that a run may resume with another batch size or number of
/// ranks (Trainer::fit).
struct TrainingProgress {
  /// Epochs completed, steps taken in all, steps taken in the epoch in progress, and steps skipped for
  /// non-finite values.
  int64_t epoch = 0, global_step = 0, step_in_epoch = 0, skipped_steps = 0;
  /// Examples all ranks trained on in all (each step adds its global batch, the wrap-around of an epoch's
  /// last batch included), and positions of the epoch's shuffle consumed in the epoch in progress. -1 in
  /// files written before they were recorded (Trainer::fit derives them from the recorded layout).
  int64_t images_seen = 0, images_in_epoch = 0;
  /// The trainer's random generator state (torch::Generator::get_state()), and its state when the epoch
  /// in progress began (to draw the same shuffle again on resuming mid-epoch; undefined between epochs).
  /// Both on the CPU.
  torch::Tensor rng_state, epoch_rng_state;
  /// The trainer's options and the run's layout (JSON; read back as CheckpointInfo::training too).
  nlohmann::json training = nlohmann::json::object();

  /// Writes the counters and generator states into `archive` (the training record goes in the config).
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("epoch", c10::IValue(epoch));
    archive.write("global_step", c10::IValue(global_step));
    archive.write("step_in_epoch", c10::IValue(step_in_epoch));
    archive.write("skipped_steps", c10::IValue(skipped_steps));
    archive.write("images_seen", c10::IValue(images_seen));
    archive.write("images_in_epoch", c10::IValue(images_in_epoch));
    archive.write("rng", rng_state.defined() ? rng_state : torch::Tensor(torch::empty({0}, torch::kUInt8)));
    if (epoch_rng_state.defined()) archive.write("epoch_rng", epoch_rng_state);
  }

  /// Reads what save wrote (format 1 wrote the epoch, the step and the generator). Refused as damage,
  /// naming `file`: a missing epoch or step count, and a position mid-epoch without the epoch's shuffle.
  static TrainingProgress load(torch::serialize::InputArchive& archive, const std::string& file) {
    TrainingProgress p;
    p.epoch = detail::required_value(archive, "epoch", file).toInt();
    p.global_step = detail::required_value(archive, "global_step", file).toInt();
    const auto optional = [&](const char* key, int64_t otherwise) {
      c10::IValue v;
      return archive.try_read(key, v) && v.isInt() ? v.toInt() : otherwise;
    };
    p.step_in_epoch = optional("step_in_epoch", 0);
    p.skipped_steps = optional("skipped_steps", 0);
    p.images_seen = optional("images_seen", -1);
    p.images_in_epoch = optional("images_in_epoch", p.step_in_epoch == 0 ? 0 : -1);
    if (archive.try_read("rng", p.rng_state)) p.rng_state = p.rng_state.cpu();
    if (archive.try_read("epoch_rng", p.epoch_rng_state)) p.epoch_rng_state = p.epoch_rng_state.cpu();
    DIFFUSION_CHECK(DamagedFileError, p.step_in_epoch == 0 || p.epoch_rng_state.defined(), file,
                    " stopped mid-epoch but has no record of the epoch's shuffle");
    return p;
  }
};

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

/// The archive's top-level keys besides the progress's (TrainingProgress spells its own).
namespace key {
inline constexpr const char* format = "format";
inline constexpr const char* config = "config";
inline constexpr const char* model = "model";
inline constexpr const char* ema = "ema";
inline constexpr const char* optimizer = "optimizer";
}  // namespace key

/// The "config" record, written and read here only: the formulation (and for the discrete one its
/// schedule and prediction at the top as well, which files before formulations were recorded had only),
/// the backbone, the training record, the metadata and whether an EMA is kept.
struct CheckpointConfig {
  FormulationConfig formulation;
  std::optional<NoiseScheduleOptions> schedule;
  std::optional<Prediction> prediction;
  std::optional<BackboneConfig> backbone;
  nlohmann::json training = nlohmann::json::object();
  std::map<std::string, std::string> metadata;
  bool has_ema = false;

  std::string dump() const {
    nlohmann::json j = {{"has_ema", has_ema}, {"training", training}, {"metadata", metadata},
                        {"formulation", {{"name", formulation.name}, {"options", formulation.options}}}};
    if (schedule) j["schedule"] = *schedule;
    if (prediction) j["prediction"] = std::string(to_string(*prediction));
    if (backbone) j["backbone"] = {{"name", backbone->name}, {"options", backbone->options}};
    return j.dump();
  }

  /// Parses the record; JSON that does not parse or lacks what it needs is refused as damage, naming `file`.
  static CheckpointConfig parse(const std::string& text, const std::string& file) {
    CheckpointConfig c;
    try {
      const auto j = nlohmann::json::parse(text);
      check_json_fields(j, {"schedule", "prediction", "formulation", "backbone", "training", "metadata", "has_ema"},
                        "checkpoint config");
      if (j.contains("schedule")) c.schedule = j.at("schedule").get<NoiseScheduleOptions>();
      if (j.contains("prediction")) c.prediction = parse_prediction(j.at("prediction").get<std::string>());
      if (j.contains("formulation")) {
        c.formulation = {j.at("formulation").at("name").get<std::string>(), j.at("formulation").at("options")};
      } else {
        DIFFUSION_CHECK(DamagedFileError, c.schedule && c.prediction, file,
                        ": the checkpoint records no formulation and no schedule and prediction");
        c.formulation = formulation_config(DiscreteFormulation(NoiseSchedule(*c.schedule), *c.prediction));
      }
      c.has_ema = j.at("has_ema").get<bool>();
      if (j.contains("backbone")) {
        c.backbone = BackboneConfig{j.at("backbone").at("name").get<std::string>(), j.at("backbone").at("options")};
      }
      c.training = j.value("training", nlohmann::json::object());
      c.metadata = j.value("metadata", std::map<std::string, std::string>{});
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      DIFFUSION_CHECK(DamagedFileError, false, file, " is damaged (its config: ", libtorch_reason(e.what()), ")");
    }
    return c;
  }
};

/// open_archive for a diffusion checkpoint. Also refused: a file that is not a diffusion checkpoint and
/// one of another format version (IncompatibleFileError), and one of format 2 without its checksum
/// (DamagedFileError).
inline torch::serialize::InputArchive open_checkpoint(const std::filesystem::path& path,
                                                      std::optional<torch::Device> device = std::nullopt,
                                                      int64_t* format_out = nullptr) {
  const auto file = "checkpoint: " + path.string();
  auto opened = open_archive(path, device, "checkpoint");
  auto& archive = opened.archive;
  c10::IValue format;
  bool has_format = false;
  try {
    has_format = archive.try_read(key::format, format) && format.isInt();
  } catch (const std::exception&) {
    has_format = false;
  }
  DIFFUSION_CHECK(IncompatibleFileError, has_format, file, " is not a diffusion checkpoint (no format field)");
  DIFFUSION_CHECK(IncompatibleFileError, format.toInt() == 1 || format.toInt() == checkpoint_format, file, " has format ",
                  format.toInt(), "; this library reads formats 1 and ", checkpoint_format);
  // Format 1 predates the checksum; a format-2 file without one lost its zip comment (damaged, or edited).
  DIFFUSION_CHECK(DamagedFileError, opened.sealed || format.toInt() == 1, file, " is damaged: it has format ",
                  format.toInt(), " but no checksum in its zip comment");
  if (format_out) *format_out = format.toInt();
  return std::move(opened.archive);
}

/// Runs `read`; the library's typed errors pass through, any other error (LibTorch's reader, a JSON
/// type mismatch) becomes a DamagedFileError naming the file.
template <class F>
auto reading(const std::filesystem::path& path, F&& read) {
  try {
    return read();
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    DIFFUSION_CHECK(DamagedFileError, false, "checkpoint: ", path.string(), " is damaged (",
                    libtorch_reason(e.what_without_backtrace()), ")");
  } catch (const std::exception& e) {
    DIFFUSION_CHECK(DamagedFileError, false, "checkpoint: ", path.string(), " is damaged (", e.what(), ")");
  }
  return read();  // not reached
}

inline CheckpointInfo read_info(torch::serialize::InputArchive& a, int64_t format, const std::filesystem::path& path) {
  const auto file = "checkpoint: " + path.string();
  CheckpointInfo info;
  info.path = path;
  info.format = format;
  const auto progress = TrainingProgress::load(a, file);
  info.epoch = progress.epoch;
  info.global_step = progress.global_step;
  info.step_in_epoch = progress.step_in_epoch;
  if (format == 1) {
    auto old = read_format_one(a, file);
    info.has_ema = old.has_ema;
    info.schedule = old.schedule;
    info.metadata = std::move(old.metadata);
    for (const auto& [k, v] : old.training) info.training[k] = v;
    info.backbone = std::move(old.backbone);
    info.formulation = formulation_config(DiscreteFormulation(NoiseSchedule(info.schedule), info.prediction));
    return info;
  }
  auto config = CheckpointConfig::parse(required_value(a, key::config, file).toStringRef(), path.string());
  info.formulation = std::move(config.formulation);
  if (config.schedule) info.schedule = *config.schedule;
  if (config.prediction) info.prediction = *config.prediction;
  info.has_ema = config.has_ema;
  info.backbone = std::move(config.backbone);
  info.training = std::move(config.training);
  info.data_shape = RunLayout::read(info.training, path.string()).data_shape;
  info.metadata = std::move(config.metadata);
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
  detail::CheckpointConfig config;
  config.formulation = c.formulation.value_or(formulation_config(DiscreteFormulation(NoiseSchedule(c.schedule), c.prediction)));
  if (config.formulation.name == "ddpm") {
    const auto discrete = std::dynamic_pointer_cast<const DiscreteFormulation>(make_formulation(config.formulation));
    config.schedule = discrete->schedule().options();
    config.prediction = discrete->prediction();
  }
  config.backbone = backbone_config(*c.model);
  config.training = c.progress.training;
  config.metadata = c.metadata;
  config.has_ema = c.ema != nullptr;
  torch::serialize::OutputArchive archive;
  archive.write(key::format, c10::IValue(checkpoint_format));
  archive.write(key::config, c10::IValue(config.dump()));
  c.progress.save(archive);
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

/// Whether `path` holds a diffusion checkpoint (of a format this library reads or not): false for a
/// missing file, a file that is not a zip, and a LibTorch archive without a checkpoint's format field
/// (a module torch::save wrote). Refused (DamagedFileError): a damaged zip, whose kind cannot be told.
inline bool is_checkpoint(const std::filesystem::path& path) {
  if (detail::file_kind(path) != detail::FileKind::Zip) return false;
  auto opened = detail::open_archive(path, std::nullopt, "checkpoint");
  c10::IValue format;
  return detail::reading(path, [&] { return opened.archive.try_read(detail::key::format, format) && format.isInt(); });
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

/// Restores a training run: the model's trained weights, the optimizer's state and the EMA (each when
/// given), with every tensor on `device`; returns the epoch, step and generator state to continue from,
/// and the options the run recorded. `check`, when given, sees the checkpoint's info before anything
/// changes and may refuse it by throwing (the Trainer refuses another schedule or prediction type).
/// Refused: an EMA asked for but absent, a file that does not fit the model.
inline TrainingProgress load_training_state(const std::filesystem::path& path, torch::nn::Module& model,
                                            torch::optim::Optimizer* optimizer, EMA* ema, const torch::Device& device,
                                            const std::function<void(const CheckpointInfo&)>& check = nullptr) {
  const auto file = "checkpoint: " + path.string();
  int64_t format = 0;
  auto archive = detail::open_checkpoint(path, device, &format);
  const auto info = detail::reading(path, [&] { return detail::read_info(archive, format, path); });
  if (check) check(info);
  DIFFUSION_CHECK(IncompatibleFileError, !ema || info.has_ema, file, " has no EMA weights but this run keeps an EMA");
  // The model first: its names and shapes are checked before anything is copied, so a file written for
  // another model changes neither the model nor the EMA.
  detail::load_module(archive, detail::key::model, model, path);
  if (ema) ema->load(archive, detail::key::ema, model, path, info.global_step);
  if (optimizer) {
    torch::serialize::InputArchive state;
    DIFFUSION_CHECK(IncompatibleFileError, archive.try_read(detail::key::optimizer, state), file,
                    " has no optimizer state (written to sample, not to resume?)");
    detail::reading(path, [&] {
      detail::load_optimizer_state(*optimizer, state, device);
      return 0;
    });
  }
  auto progress = detail::reading(path, [&] { return TrainingProgress::load(archive, file); });
  DIFFUSION_CHECK(DamagedFileError, progress.rng_state.defined(), file, " has no generator state");
  progress.training = info.training;
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
  DIFFUSION_CHECK(IncompatibleFileError, info.backbone, "load_model: ", path.string(), " records no backbone (its type was not registered when it "
              "was written); build the model yourself and use load_weights");
  auto model = make_backbone(*info.backbone);
  load_weights(path, model->module(), use_ema);
  model->to(device);
  model->eval();
  return {std::move(model), std::move(info)};
}

}  // namespace diffusion
