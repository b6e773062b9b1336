#include "common.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <unistd.h>
#include <sstream>
#include <stdexcept>

namespace cli {

namespace {
// The whole text as a finite number that a float can hold (the library computes in float32): no nan, no
// inf, no 1e39, no trailing text. strtod, not stod: stod refuses subnormal numbers such as 1e-320.
std::optional<double> finite_number(const std::string& s) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s.front()))) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size() || !std::isfinite(v) || std::abs(v) > std::numeric_limits<float>::max()) return std::nullopt;
  return v;
}

CLI::Validator number_check(std::function<bool(double)> ok, std::string what, std::string description) {
  return CLI::Validator(
      [ok, what](std::string& s) -> std::string {
        const auto v = finite_number(s);
        return v && ok(*v) ? "" : fmt::format("must be {}, got '{}'", what, s);
      },
      std::move(description));
}
}  // namespace

CLI::Validator at_least(double lo) {
  return number_check([lo](double v) { return v >= lo; }, fmt::format("a number >= {}", lo), fmt::format(">={}", lo));
}

CLI::Validator positive() { return number_check([](double v) { return v > 0; }, "a number > 0", ">0"); }

CLI::Validator finite() { return number_check([](double) { return true; }, "a finite number", "NUMBER"); }

CLI::Validator between(double lo, double hi) {
  return number_check([lo, hi](double v) { return v >= lo && v <= hi; }, fmt::format("a number in [{}, {}]", lo, hi),
                      fmt::format("[{}, {}]", lo, hi));
}

void check_output(const std::string& flag, const std::string& out, const std::string& extension,
                  const std::vector<std::string>& inputs) {
  namespace fs = std::filesystem;
  const fs::path path(out);
  auto ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  TORCH_CHECK(extension.empty() || ext == extension, flag, " ", out, ": expected a ", extension, " file name");
  TORCH_CHECK(!fs::is_directory(path), flag, " ", out, " is a directory; give a file name");
  for (const auto& input : inputs) {
    std::error_code ec;
    TORCH_CHECK(input.empty() || !fs::equivalent(path, input, ec), flag, " ", out, " is the input file ", input,
                "; writing it would destroy it");
  }
  const auto dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(dir, ec);
  TORCH_CHECK(!ec && ::access(dir.c_str(), W_OK) == 0, flag, " ", out, ": cannot write to the directory ", dir.string(),
              ec ? " (" + ec.message() + ")" : std::string(" (no permission)"));
}

void check_output_dir(const std::string& flag, const std::string& dir, const std::vector<std::string>& inputs) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  TORCH_CHECK(!ec && fs::is_directory(dir), flag, " ", dir, ": cannot make this directory",
              ec ? " (" + ec.message() + ")" : std::string(" (a file is in the way)"));
  for (const auto& input : inputs) {
    if (input.empty()) continue;
    const auto parent = fs::path(input).has_parent_path() ? fs::path(input).parent_path() : fs::path(".");
    TORCH_CHECK(!fs::equivalent(parent, dir, ec), flag, " ", dir, " holds the input file ", input,
                "; writing it would destroy it");
  }
}

std::vector<int64_t> parse_ints(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    size_t used = 0;
    try {
      out.push_back(std::stoll(item, &used));
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size()) {
      throw std::invalid_argument(fmt::format("expected comma-separated integers, got '{}'", s));
    }
  }
  return out;
}

namespace {
const std::vector<std::string> presets = {"conv", "conv-small", "smol", "chunky", "unet"};
}  // namespace

std::vector<std::string> backbone_names() {
  auto names = presets;
  for (const auto& name : diffusion::backbone_names()) {
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }
  return names;
}

int64_t num_classes_of(const diffusion::CheckpointInfo& info) {
  return info.backbone ? info.backbone->options.value("num_classes", int64_t{0}) : 0;
}

std::vector<std::string> class_names_of(const diffusion::CheckpointInfo& info) {
  const auto it = info.metadata.find(class_names_key);
  if (it == info.metadata.end()) return {};
  try {
    return nlohmann::json::parse(it->second).get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, info.path.string(), ": its class names are malformed (", e.what(), ")");
  }
  return {};
}

namespace {

/// --options as a JSON object (empty: none).
nlohmann::json parse_options(const std::string& text) {
  if (text.empty()) return nlohmann::json::object();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::invalid_argument(fmt::format("--options must be a JSON object such as '{{\"depth\": 4}}': {}", e.what()));
  }
  if (!j.is_object()) throw std::invalid_argument(fmt::format("--options must be a JSON object, got {}", j.dump()));
  return j;
}

/// A registered backbone by its own name: its options are --options's, with --conditional's classes.
diffusion::BackboneConfig registered_config(const std::string& name, const Shape& shape, int64_t num_classes) {
  TORCH_CHECK(shape.widths.empty() && shape.blocks.empty() && shape.patch == 0, "--widths, --blocks and --patch apply to "
              "this program's conv and unet backbones; give '", name, "' its options with --options");
  auto options = parse_options(shape.options);
  if (num_classes > 0) {
    const auto defaults = diffusion::backbone_config(diffusion::make_backbone({name, {}})->module());
    TORCH_CHECK(defaults && defaults->options.contains("num_classes"), "--conditional needs a backbone with a "
                "num_classes option; '", name, "' has none");
    TORCH_CHECK(!options.contains("num_classes") || options["num_classes"] == num_classes, "--options gives num_classes ",
                options["num_classes"].dump(), " but --conditional trains on the data's ", num_classes, " classes");
    options["num_classes"] = num_classes;
  }
  return {name, options};
}

/// One of this program's own names, with the shape flags.
diffusion::BackboneConfig preset_config(const std::string& name, const Shape& shape, int64_t num_classes) {
  TORCH_CHECK(shape.widths.empty() || name == "conv" || name == "conv-small" || name == "unet",
              "--widths applies to the conv and unet backbones only");
  TORCH_CHECK(shape.blocks.empty() || name == "unet", "--blocks applies to the unet backbone only, got --backbone ", name);
  TORCH_CHECK(shape.patch == 0 || name == "unet", "--patch applies to the unet backbone only, got --backbone ", name);
  nlohmann::json options = nlohmann::json::object();
  if (num_classes > 0) {
    TORCH_CHECK(name == "conv" || name == "conv-small" || name == "unet",
                "--conditional applies to the conv and unet backbones only, got --backbone ", name);
    options["num_classes"] = num_classes;
  }
  auto config = diffusion::detail::preset_backbone(name, shape.widths.empty() ? std::vector<int64_t>{} : parse_ints(shape.widths),
                                                  shape.blocks.empty() ? std::vector<int64_t>{} : parse_ints(shape.blocks),
                                                  shape.patch);
  TORCH_CHECK(config, "unknown backbone '", name, "'");
  config->options.update(options);
  return *config;
}

}  // namespace

diffusion::BackboneConfig backbone_config(const std::string& name, const Shape& shape, int64_t num_classes,
                                          const std::vector<int64_t>& data_shape) {
  auto config = std::find(presets.begin(), presets.end(), name) == presets.end() ? registered_config(name, shape, num_classes)
                                                                                 : preset_config(name, shape, num_classes);
  const auto given = parse_options(shape.options);
  config.options.update(given);
  if (!data_shape.empty()) {
    // Options named as the library's backbones name them take the data's values (MNIST's are their defaults).
    const auto defaults = diffusion::backbone_config(diffusion::make_backbone({config.name, {}})->module());
    const auto fit = [&](const char* field, int64_t value) {
      if (!defaults || !defaults->options.contains(field)) return;
      TORCH_CHECK(!given.contains(field) || given.at(field) == value, "--options gives ", field, " ", given.at(field).dump(),
                  " but the data's ", data_shape.size() == 3 ? "images" : "examples", " have ", value);
      config.options[field] = value;
    };
    if (data_shape.size() == 1) fit("features", data_shape[0]);
    if (data_shape.size() >= 2) fit("channels", data_shape[0]);
    if (data_shape.size() == 3 && data_shape[1] == data_shape[2]) fit("image_size", data_shape[1]);
  }
  return config;
}

DataPlan plan_data(const DataFlags& flags, bool labels) {
  namespace fs = std::filesystem;
  DataPlan plan;
  const fs::path dir(flags.data);
  TORCH_CHECK(fs::exists(dir), "train: --data ", flags.data, ": no such file or directory (give the directory of MNIST's idx "
              "files, which scripts/fetch-mnist.sh fetches, a folder of images, or a .npy, .safetensors or .pt file of examples)");
  if (!fs::is_directory(dir)) {
    TORCH_CHECK(flags.size == 0 && flags.channels == 0 && !flags.flip && !flags.strict && flags.cache_mib < 0,
                "train: --size, --channels, --flip, --strict and --cache-mib apply to folders of images; ", flags.data,
                " is a file of examples");
    plan.file = diffusion::data::load_tensor_file(dir, diffusion::data::TensorFileOptions().key(flags.key).labels(labels));
    const auto& x = plan.file->examples;
    plan.shape = x.sizes().slice(1).vec();
    plan.count = x.size(0);
    if (labels) {
      const auto top = plan.file->labels.max().item<int64_t>();
      TORCH_CHECK(top < 65536, "train: ", flags.data, ": its labels go up to ", top, "; classes are numbered 0, 1, 2, ... "
                  "(at most 65536 of them), one embedding each");
      plan.num_classes = top + 1;
    }
    TORCH_CHECK(flags.val_size < plan.count, "train: --val-size ", flags.val_size, " leaves no training examples of the ",
                plan.count, " in ", flags.data, "; give a smaller one (0: no validation)");
    plan.description = fmt::format("{}: {} examples of shape ({}), mean {:.3g}, std {:.3g}{}", flags.data, plan.count,
                                   fmt::join(plan.shape, ", "), x.mean().item<double>(), x.std().item<double>(),
                                   labels ? fmt::format(", {} classes", plan.num_classes) : std::string());
    return plan;
  }
  TORCH_CHECK(flags.key.empty(), "train: --key names a tensor in a file of examples; ", flags.data, " is a directory");
  plan.idx = fs::exists(dir / "train-images-idx3-ubyte") || fs::exists(dir / "train-images-idx3-ubyte.gz");
  if (plan.idx) {
    TORCH_CHECK(flags.size == 0 && flags.channels == 0 && !flags.flip && !flags.strict && flags.cache_mib < 0,
                "train: --size, --channels, --flip, --strict and --cache-mib apply to folders of images; ", flags.data,
                " holds MNIST-format idx files (1x28x28)");
    plan.num_classes = 10;  // MNIST's digits, Fashion-MNIST's garments
    plan.shape = {1, 28, 28};  // load_data checks the files
    plan.description = flags.data;
    return plan;
  }
  const int64_t size = flags.size > 0 ? flags.size : 32, channels = flags.channels > 0 ? flags.channels : 3;
  const int64_t cache_mib = flags.cache_mib >= 0 ? flags.cache_mib : 4096;
  plan.folder = diffusion::data::ImageFolderOptions(size)
                    .channels(channels)
                    .flip(flags.flip)
                    .strict(flags.strict)
                    .folder_labels(labels)
                    .cache_limit(cache_mib << 20);
  plan.index = diffusion::data::scan_images(dir, plan.folder);
  const auto& index = *plan.index;
  plan.shape = {channels, size, size};
  plan.count = static_cast<int64_t>(index.files.size());
  plan.classes = index.classes;
  plan.num_classes = static_cast<int64_t>(index.classes.size());
  TORCH_CHECK(flags.val_size < plan.count, "train: --val-size ", flags.val_size, " leaves no training images of the ",
              plan.count, " in ", flags.data, "; give a smaller one (0: no validation)");
  const auto bytes = index.cache_bytes(size, channels);
  std::vector<std::string> named;
  for (size_t i = 0; i < plan.classes.size(); ++i) named.push_back(fmt::format("{} {}", i, plan.classes[i]));
  plan.description = fmt::format("{}: {} images at {}x{}x{}{}{}{}; {}", flags.data, plan.count, channels, size, size, labels ? fmt::format(", classes {}", fmt::join(named, ", ")) : std::string(),
                                 index.skipped.empty() ? std::string() : fmt::format("; {} unreadable skipped: {}",
                                     index.skipped.size(), diffusion::data::detail::first_names(index.skipped)),
                                 index.other_files > 0 ? fmt::format("; {} other files ignored", index.other_files) : std::string(),
                                 bytes <= plan.folder.cache_limit() ? fmt::format("decoding into {} of memory", human_bytes(bytes))
                                 : cache_mib == 0 ? std::string("decoded on the fly by background threads (--cache-mib 0)")
                                                  : fmt::format("{} would not fit --cache-mib {}: decoded on the fly by "
                                                                "background threads", human_bytes(bytes), cache_mib));
  return plan;
}

std::string default_backbone(const std::vector<int64_t>& data_shape) {
  return data_shape.size() == 1 ? "mlp" : data_shape.size() == 2 ? "temporal_unet" : "conv";
}

std::string human_bytes(int64_t bytes) {
  return bytes >= (int64_t{1} << 30) ? fmt::format("{:.1f} GiB", static_cast<double>(bytes) / (1 << 30))
         : bytes >= (1 << 20)        ? fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1 << 20))
                                     : fmt::format("{:.1f} KiB", static_cast<double>(bytes) / (1 << 10));
}

LoadedData load_data(const DataPlan& plan, const DataFlags& flags) {
  using namespace diffusion::data;
  if (plan.idx) {
    auto train = load_mnist(flags.data, Split::Train, plan.num_classes);
    TORCH_CHECK(train.images.sizes().slice(1) == c10::IntArrayRef(plan.shape), "train: ", flags.data, " holds ",
                train.images.sizes().slice(1), " images; this program reads MNIST-format files of 1x28x28");
    auto images = train.images, labels = train.labels;
    if (flags.limit > 0) {
      images = images.slice(0, 0, std::min<int64_t>(flags.limit, images.size(0)));
      labels = labels.slice(0, 0, images.size(0));
    }
    std::shared_ptr<const Dataset> val;
    if (flags.val_size > 0) {
      const auto test = load_mnist(flags.data, Split::Test, plan.num_classes);
      const auto n = std::min<int64_t>(flags.val_size, test.images.size(0));
      val = std::make_shared<TensorDataset>(test.images.slice(0, 0, n), test.labels.slice(0, 0, n), plan.num_classes);
    }
    return {std::make_shared<TensorDataset>(images, labels, plan.num_classes), val, {}, nullptr};
  }
  if (plan.file) {
    // Held-out examples: a fixed random choice, the same whatever --limit says.
    const auto all = std::make_shared<TensorDataset>(plan.file->examples, plan.file->labels, plan.num_classes);
    const auto perm = torch::randperm(all->size(), diffusion::make_generator(0));
    auto rest = perm.slice(0, flags.val_size);
    if (flags.limit > 0) rest = rest.slice(0, 0, std::min<int64_t>(flags.limit, rest.size(0)));
    return {std::make_shared<Subset>(all, rest),
            flags.val_size > 0 ? std::make_shared<Subset>(all, perm.slice(0, 0, flags.val_size)) : nullptr, {}, nullptr};
  }
  auto folder = std::make_shared<ImageFolder>(*plan.index, plan.folder);
  // Held-out images: a fixed random choice, the same whatever --limit says.
  const auto perm = torch::randperm(folder->size(), diffusion::make_generator(0));
  // Checked again: files that did not decode have left the set.
  TORCH_CHECK(flags.val_size < folder->size(), "train: --val-size ", flags.val_size, " leaves no training images of the ",
              folder->size(), " that decoded in ", flags.data, "; give a smaller one (0: no validation)");
  const auto held = flags.val_size;
  auto rest = perm.slice(0, held);
  if (flags.limit > 0) rest = rest.slice(0, 0, std::min<int64_t>(flags.limit, rest.size(0)));
  // Files whose body failed to decode (their headers read at the scan).
  std::vector<SkippedFile> skipped(folder->index().skipped.begin() + static_cast<std::ptrdiff_t>(plan.index->skipped.size()),
                                   folder->index().skipped.end());
  return {std::make_shared<Subset>(folder, rest), held > 0 ? std::make_shared<Subset>(folder, perm.slice(0, 0, held)) : nullptr,
          std::move(skipped), folder};
}

void add_sampling_flags(CLI::App* cmd, SampleArgs& args) {
  cmd->add_option("--seed", args.seed, "Seed: the same seed gives the same images")->capture_default_str();
  cmd->add_option("--device", args.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_flag("--no-ema", args.no_ema, "Use the trained weights even if the checkpoint has EMA weights");
  cmd->add_option("--sampler", args.sampler,
                  "ddpm (every timestep), ddim, euler, euler-a (ancestral), heun (EDM's second-order), dpmpp-2m "
                  "(DPM-Solver++(2M)), dpmpp-2m-sde (its stochastic form: DDIM-50's quality in 15 steps with --plan "
                  "trailing) or dpmpp-3m-sde")
      ->check(CLI::IsMember(diffusion::level_sampler_names()))
      ->capture_default_str();
  cmd->add_option_function<int64_t>("--steps", [&args](const int64_t& v) { args.steps = v; },
                                    "Steps of the plan (heun calls the model twice a step, but for the last): default "
                                    "every timestep for ddpm, 50 for ddim, 20 for the others")
      ->check(at_least(1));
  auto* plan = cmd->add_option("--plan", args.plan,
                               "The noise levels visited: leading (ends at t = 0), trailing (starts at t = T-1), "
                               "linspace (both), karras (Karras et al. 2022, rho 7), exponential, or uniform (t from 1 "
                               "to 0, shifted by the checkpoint's shift); the first three only for a discrete-schedule "
                               "checkpoint, uniform only for a flow one. Default: the checkpoint's formulation's "
                               "(leading for ddpm, karras for edm, uniform for flow)")
                   ->check(CLI::IsMember({"leading", "trailing", "linspace", "karras", "exponential", "uniform"}));
  cmd->add_option("--spacing", args.plan, "Synonym of --plan for leading, trailing and linspace")
      ->check(CLI::IsMember({"leading", "trailing", "linspace"}))
      ->excludes(plan);
  cmd->add_option_function<double>("--eta", [&args](const double& v) { args.eta = v; },
                                   "The fresh noise's share for the samplers that have one: ddim (default 0), ddpm and "
                                   "euler-a, each in [0, 1]; dpmpp-2m (default 0: above it is the SDE form), dpmpp-2m-sde "
                                   "and dpmpp-3m-sde (default 1), >= 0; 0 deterministic, 1 DDPM-like noise")
      ->check(finite());
  cmd->add_option_function<std::string>(
      "--sampler-options",
      [&args](const std::string& v) {
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(v);
        } catch (const nlohmann::json::exception& e) {
          throw CLI::ValidationError("--sampler-options", fmt::format("not JSON: {}", e.what()));
        }
        if (!j.is_object()) throw CLI::ValidationError("--sampler-options", "expected a JSON object, got " + j.dump());
        for (const auto& [key, value] : j.items()) args.sampler_options[key] = value;
      },
      "The sampler's own options as a JSON object, e.g. '{\"s_churn\": 40, \"s_tmin\": 0.05}' for heun, "
      "'{\"s_noise\": 1.003}' (docs/api.md lists each sampler's)");
  cmd->add_option_function<double>("--clip-x0", [&args](const double& c) { args.clip_x0 = c; args.clip_given = true; },
                                   "Clamp each step's predicted x_0 to [-C, C]; images lie in [-1, 1] (0: off, as in the "
                                   "seed; the default for vectors and sequences, whose range is their own)")
      ->check(at_least(0))
      ->default_str("1");
  cmd->add_option("--precision", args.precision,
                  "The backbone's arithmetic: fp32, bf16 (autocast), or auto (bf16 on a CPU with AMX/AVX512-BF16)")
      ->check(CLI::IsMember({"auto", "fp32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--threads", args.threads, "CPU threads (0: all cores; at most 256)")->check(CLI::Range(0, 256))->capture_default_str();
  auto* guide = cmd->add_option("--guide", args.guide,
                                "Autoguidance (Karras et al. 2024): a weaker checkpoint of the same kind of model, e.g. "
                                "an early epoch of the same run, whose errors each step is steered away from (two model "
                                "calls per step)")
                    ->check(CLI::ExistingFile);
  cmd->add_option("--guidance", args.guidance,
                  "Autoguidance weight w with --guide: guide + w (main - guide); 1 is the main model alone")
      ->check(finite())
      ->needs(guide)
      ->capture_default_str();
  auto* cfg = cmd->add_option_function<double>(
      "--cfg", [&args](const double& w) { args.cfg = w; },
      "Classifier-free guidance weight w for a class-conditional checkpoint: null + w (class - null); 1 (the "
      "default) is the conditional model alone, 0 the unconditional one");
  cfg->check(finite())->excludes(guide);
  cmd->add_option("--cfg-rescale", args.cfg_rescale,
                  "Guidance rescale phi with --cfg (Lin et al. 2024): match the conditional prediction's spread (0: off)")
      ->check(between(0, 1))
      ->needs(cfg)
      ->capture_default_str();
}

}  // namespace cli
