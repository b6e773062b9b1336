// diffusion sample: images from a checkpoint (or from imported weights), with any sampler, autoguidance,
// image-to-image and inpainting.
#include "commands.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>

namespace cli {

using namespace diffusion;

namespace {

/// An image file for the model's square image shape (C, S, S) as a (1, C, S, S) tensor on `device`, in
/// [0, 1], prepared as the training images were (data::load_image: transparency on white, the centre
/// square resized by area to S).
torch::Tensor read_input_image(const std::string& path, const std::vector<int64_t>& shape, const torch::Device& device) {
  const auto image = data::load_image(path, data::ImageFolderOptions(shape[1]).channels(shape[0]));
  return image.unsqueeze(0).to(device, torch::kFloat32).div(255);
}

/// What a model draws when nothing records its data: MNIST's images.
const std::vector<int64_t> mnist_shape{1, 28, 28};

/// The shape of one example an exported weights file's "data_shape" records (empty: none). Refused,
/// naming the file: JSON that does not parse, an empty shape or an empty dimension.
std::vector<int64_t> exported_shape(const std::map<std::string, std::string>& metadata, const std::string& file) {
  if (!metadata.count("data_shape")) return {};
  std::vector<int64_t> shape;
  try {
    shape = nlohmann::json::parse(metadata.at("data_shape")).get<std::vector<int64_t>>();
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "sample: ", file, " has metadata that is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(!shape.empty() && std::all_of(shape.begin(), shape.end(), [](int64_t d) { return d >= 1; }), "sample: ", file,
              " records a data shape that is empty or has an empty dimension");
  return shape;
}

/// The model to sample, and what its checkpoint says (or the seed's schedule for imported weights).
struct Source {
  AnyBackbone model{nullptr};
  FormulationConfig formulation = formulation_config(DiscreteFormulation());
  std::string description;
  /// One example's shape ((C, H, W) for images): the checkpoint's data, or MNIST's where nothing records it.
  std::vector<int64_t> shape = mnist_shape;
};

Source open_source(const SampleArgs& a, const torch::Device& device) {
  if (!a.weights.empty()) {
    const auto metadata = weights_metadata(a.weights);
    Source source;
    BackboneConfig config;
    if (metadata.count("backbone") && metadata.count("options")) {
      // Written by `diffusion export`: the file says what it is.
      TORCH_CHECK(a.backbone.empty() && a.shape.widths.empty() && a.shape.blocks.empty() && a.shape.patch == 0 &&
                      a.shape.options.empty() && a.num_classes == 0,
                  "sample: ", a.weights, " records its own network (", metadata.at("backbone"),
                  "); drop --backbone, --widths, --blocks, --patch, --options and --num-classes");
      try {
        config = {metadata.at("backbone"), nlohmann::json::parse(metadata.at("options"))};
        if (auto shape = exported_shape(metadata, a.weights); !shape.empty()) source.shape = std::move(shape);
        if (metadata.count("formulation")) {
          const auto f = nlohmann::json::parse(metadata.at("formulation"));
          source.formulation = {f.at("name").get<std::string>(), f.at("options")};
        } else {  // written before formulations were recorded
          NoiseScheduleOptions schedule;
          if (metadata.count("schedule")) schedule = nlohmann::json::parse(metadata.at("schedule")).get<NoiseScheduleOptions>();
          const auto prediction = metadata.count("prediction") ? parse_prediction(metadata.at("prediction")) : Prediction::Epsilon;
          source.formulation = formulation_config(DiscreteFormulation(NoiseSchedule(schedule), prediction));
        }
      } catch (const nlohmann::json::exception& e) {
        TORCH_CHECK(false, "sample: ", a.weights, " has metadata that is not valid JSON (", e.what(), ")");
      }
      source.description = fmt::format("{} ({}, {}, from its metadata)", a.weights, config.name,
                                       make_formulation(source.formulation)->describe());
    } else {
      const auto name = a.backbone.empty() ? std::string("conv") : a.backbone;
      config = backbone_config(name, a.shape, a.num_classes);
      source.description = fmt::format("{} (--backbone {}, the seed's schedule, epsilon prediction)", a.weights, name);
    }
    source.model = make_backbone(config);
    import_weights(source.model->module(), a.weights);
    source.model->to(device);
    source.model->eval();
    return source;
  }
  auto [model, info] = load_model(a.checkpoint, !a.no_ema, device);
  return {model, info.formulation,
          fmt::format("{} (epoch {}{}, {} weights, {})", a.checkpoint, info.epoch,
                      info.step_in_epoch > 0 ? fmt::format(" and {} steps of the next", info.step_in_epoch) : std::string(),
                      info.has_ema && !a.no_ema ? "EMA" : "trained",
                      info.formulation.name == "ddpm" ? fmt::format("{} prediction", to_string(info.prediction))
                                                      : make_formulation(info.formulation)->describe()),
          info.data_shape.empty() ? mnist_shape : info.data_shape};
}

}  // namespace

torch::Tensor generate(const SampleArgs& a, bool verbose) {
  set_threads(a.threads);
  const auto device = parse_device(a.device);
  const auto precision = resolve_precision(a.precision, device);
  auto sampler_options = a.sampler_options;
  if (a.eta) {
    TORCH_CHECK(!sampler_options.contains("eta"), "sample: eta is given twice, by --eta (", *a.eta,
                ") and by --sampler-options (", sampler_options.at("eta").dump(), "); give one");
    sampler_options["eta"] = *a.eta;
  }
  const auto sampler = make_level_sampler(a.sampler, sampler_options);
  auto source = open_source(a, device);
  AnyBackbone model = source.model;
  const auto& source_file = a.checkpoint.empty() ? a.weights : a.checkpoint;
  TORCH_CHECK(!a.cfg || a.labels.defined(), "sample: --cfg guides towards classes; give --class or --classes");
  TORCH_CHECK(!a.labels.defined() || source.model->conditional(), "sample: ", source_file,
              " is not class-conditional (trained without --conditional); --class, --classes and --cfg need one");
  if (a.cfg) model = AnyBackbone(ClassifierFreeGuidance(source.model, ClassifierFreeGuidanceOptions(*a.cfg).rescale(a.cfg_rescale)));
  if (!a.guide.empty()) {
    auto [guide, guide_info] = load_model(a.guide, !a.no_ema, device);
    // Autoguidance combines the two networks' outputs: they must mean the same thing for the same input.
    const auto& mine = source.formulation;
    TORCH_CHECK(guide_info.data_shape.empty() || guide_info.data_shape == source.shape, "sample: --guide ", a.guide,
                " was trained on ", fmt::format("{}", fmt::join(guide_info.data_shape, "x")), " images but ", source_file, " on ",
                fmt::format("{}", fmt::join(source.shape, "x")), "; autoguidance needs both to take the same images");
    check_same_formulation(guide_info.formulation, mine, "sample", "--guide " + a.guide, source_file,
                           "autoguidance needs both to predict for the same x_t");
    model = AnyBackbone(Autoguidance(source.model, guide, a.guidance));
  }
  const double clip_x0 = a.clip_given || source.shape.size() == 3 ? a.clip_x0 : 0.0;
  auto base = SampleOptions().clip_x0(clip_x0).precision(precision);
  if (!a.init.empty()) base.image(read_input_image(a.init, source.shape, device) * 2 - 1);  // the data are in [-1, 1]
  if (a.strength) base.strength(*a.strength);
  if (!a.mask.empty()) base.mask(read_input_image(a.mask, {1, source.shape[1], source.shape[2]}, device));
  const auto formulation_ptr = make_formulation(source.formulation);
  const Formulation& formulation = *formulation_ptr;
  const auto* discrete = dynamic_cast<const DiscreteFormulation*>(&formulation);
  const auto plan_name = a.plan.empty() ? formulation.default_plan() : a.plan;
  const auto steps = a.steps.value_or(a.sampler == "ddpm" && discrete ? discrete->schedule().num_timesteps()
                                      : a.sampler == "ddim"           ? 50
                                                                      : 20);
  const auto sigmas = make_plan(formulation, plan_name, steps);
  if (verbose) {
    fmt::print("sampling {} {} ({}) from {} with {}, {} steps ({}; {} model calls) on {}, {}\n", a.n,
               source.shape.size() == 3 ? "images" : "examples",
               fmt::join(source.shape, "x"), source.description,
               sampler->describe(), steps, plan_name, sampler->model_calls(sigmas), device.str(), to_string(precision));
    if (!a.guide.empty()) fmt::print("autoguidance: weight {} against {} (two model calls per step)\n", a.guidance, a.guide);
    if (a.cfg) fmt::print("classifier-free guidance: weight {}{}\n", *a.cfg, a.cfg_rescale > 0 ? fmt::format(", rescale {}", a.cfg_rescale) : "");
    if (a.labels.defined()) {
      const auto first = a.labels[0].item<int64_t>();
      const auto classes = torch::bincount(a.labels.clamp_min(0)).gt(0).sum().item<int64_t>();
      fmt::print("classes requested: {}\n", a.labels.eq(first).all().item<bool>()
                                                 ? fmt::format("{} of class {}{}", a.n, first,
                                                               a.class_name.empty() ? std::string() : " (" + a.class_name + ")")
                                                 : fmt::format("{} images over {} classes", a.n, classes));
    }
    if (clip_x0 > 0) fmt::print("predicted x_0 clamped to [-{0}, {0}] at every step\n", clip_x0);
    if (!a.init.empty()) {
      fmt::print("starting from {}{}\n", a.init,
                 a.mask.empty() ? fmt::format(" at strength {}", *a.strength)
                                : fmt::format(", keeping the pixels {} marks", a.mask));
    }
    std::fflush(stdout);
  }
  // In chunks of at most 100 images: larger batches' activations (50 MB a tensor at 500 images) are
  // mapped and unmapped by malloc at every op, and the page faults cost more than the arithmetic on a CPU.
  // Chunk k is seeded with seed + k, so a run is reproducible from its seed.
  std::vector<torch::Tensor> chunks;
  for (int64_t done = 0, k = 0; done < a.n; done += 100, ++k) {
    std::vector<int64_t> shape{std::min<int64_t>(100, a.n - done)};
    shape.insert(shape.end(), source.shape.begin(), source.shape.end());
    auto options = SampleOptions(base).seed(a.seed + static_cast<uint64_t>(k));
    if (a.labels.defined()) options.cond(a.labels.slice(0, done, done + shape[0]).to(device));
    chunks.push_back(sample(model, formulation, shape, *sampler, sigmas, options).cpu());
    // Not an image: refused rather than written as a black square or scored as one.
    TORCH_CHECK(torch::isfinite(chunks.back()).all().item<bool>(), "sample: the sampler produced non-finite values (NaN or ",
                "inf) in images ", done + 1, " to ", done + shape[0],
                a.cfg ? fmt::format("; a smaller --cfg than {}?", *a.cfg)
                      : !a.guide.empty() ? fmt::format("; a smaller --guidance than {}?", a.guidance)
                                         : std::string("; was the model trained to a finite loss?"));
  }
  return torch::cat(chunks);
}

CLI::App* add_sample(CLI::App& app, SampleCommand& s) {
  auto* cmd = app.add_subcommand("sample", "Sample from a checkpoint (no training code needed) or from imported weights");
  auto* checkpoint = cmd->add_option("--checkpoint", s.args.checkpoint, "Checkpoint written by train")->check(CLI::ExistingFile);
  auto* weights = cmd->add_option("--weights", s.args.weights,
                                  "Or: weights: a .safetensors file written by export (it records its network, "
                                  "schedule and prediction), or saved by Python (torch.save(model.state_dict()), a "
                                  "checkpoint dict like the seed's, or safetensors) for --backbone, sampled with the "
                                  "seed's noise schedule")
                      ->check(CLI::ExistingFile);
  checkpoint->excludes(weights);
  cmd->add_option("--backbone", s.args.backbone,
                  "With --weights not written by export: which network they belong to (default conv)")
      ->check(CLI::IsMember(backbone_names()))
      ->needs(weights);
  cmd->add_option("--widths", s.args.shape.widths, "With --weights not written by export: the network's widths, comma-separated")
      ->needs(weights);
  cmd->add_option("--options", s.args.shape.options, "With --weights not written by export: the network's options as JSON")
      ->needs(weights);
  cmd->add_option("--blocks", s.args.shape.blocks, "With --weights not written by export: the unet's blocks per level")
      ->needs(weights);
  cmd->add_option("--patch", s.args.shape.patch, "With --weights not written by export: the unet's patch size")
      ->check(at_least(1))
      ->needs(weights);
  cmd->add_option("--num-classes", s.args.num_classes,
                  "With --weights not written by export: the classes the network is conditioned on (0: none)")
      ->check(at_least(0))
      ->needs(weights);
  cmd->add_option("--n", s.args.n, "Number of images")->check(at_least(1))->capture_default_str();
  cmd->add_option_function<std::string>("--out", [&s](const std::string& v) { s.out = v; s.out_given = true; },
                                        "Grid PNG to write ('' for none), or FILE.npy: the samples as drawn (N, ...); a "
                                        "model of vectors or sequences writes .npy (default samples.npy)")
      ->default_str(s.out);
  cmd->add_option("--nrow", s.nrow, "Images per grid row (0: square)")->check(at_least(0))->capture_default_str();
  cmd->add_option("--singles", s.singles, "Also write each image as DIR/sample_NNNNN.png");
  add_sampling_flags(cmd, s.args);
  auto* init = cmd->add_option("--init", s.args.init,
                               "Image-to-image (SDEdit): start from this PNG, JPEG or BMP (its centre square resized to the model's images, "
                               "as training does) noised part-way (see --strength), or "
                               "inpaint it with --mask")
                   ->check(CLI::ExistingFile);
  cmd->add_option_function<double>("--strength", [&s](const double& v) { s.args.strength = v; },
                                   "With --init: how much of the sampling to run from it, 0 (return it) to 1 (ignore it)")
      ->check(between(0, 1))
      ->needs(init);
  cmd->add_option("--class", s.klass,
                  "A class-conditional checkpoint's class for every image: its number, e.g. 7, or the name of an "
                  "image folder's subfolder it was trained on");
  cmd->add_option("--classes", s.classes,
                  "'all': a grid with one row per class, --n images each (a class-conditional checkpoint)")
      ->check(CLI::IsMember({"all"}));
  cmd->add_option("--mask", s.args.mask,
                  "With --init: an image prepared the same way, white where --init's pixels are kept, black where they are generated "
                  "(inpainting)")
      ->check(CLI::ExistingFile)
      ->needs(init);
  return cmd;
}

namespace {

/// The class count of --weights: what `export` recorded in the file, else --num-classes.
int64_t weights_num_classes(const SampleArgs& a) {
  if (a.weights.empty()) return 0;
  const auto metadata = weights_metadata(a.weights);
  if (!metadata.count("options")) return a.num_classes;
  try {
    return nlohmann::json::parse(metadata.at("options")).value("num_classes", int64_t{0});
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "sample: ", a.weights, " has metadata that is not valid JSON (", e.what(), ")");
  }
  return 0;
}

/// The shape of one example the model draws: the checkpoint's data, an exported file's "data_shape", or
/// MNIST's where nothing records it.
std::vector<int64_t> recorded_shape(const SampleArgs& a) {
  const auto shape = a.checkpoint.empty() ? exported_shape(weights_metadata(a.weights), a.weights)
                                          : read_checkpoint_info(a.checkpoint).data_shape;
  return shape.empty() ? mnist_shape : shape;
}

}  // namespace

int run_sample(const SampleCommand& given) {
  auto s = given;
  auto& a = s.args;
  TORCH_CHECK(s.klass.empty() || s.classes.empty(), "sample: give --class or --classes, not both");
  int64_t nrow = s.nrow;
  if (!s.klass.empty()) {
    const auto& file = a.checkpoint.empty() ? a.weights : a.checkpoint;
    int64_t classes = a.checkpoint.empty() ? weights_num_classes(a) : 0;
    std::vector<std::string> names;
    if (!a.checkpoint.empty()) {
      const auto info = read_checkpoint_info(a.checkpoint);
      classes = num_classes_of(info);
      names = class_names_of(info);
    }
    int64_t k = -1;
    if (std::all_of(s.klass.begin(), s.klass.end(), [](unsigned char c) { return std::isdigit(c); }) && s.klass.size() <= 9) {
      k = std::stoll(s.klass);
    } else {
      const auto it = std::find(names.begin(), names.end(), s.klass);
      TORCH_CHECK(it != names.end(), "sample: --class '", s.klass, "' is not a class of ", file,
                  names.empty() ? std::string(", which names none: give its number")
                                : fmt::format(" (its classes: {})", fmt::join(names, ", ")));
      k = it - names.begin();
    }
    TORCH_CHECK(classes == 0 || k < classes, "sample: --class ", k, " is not a class of ", file, ", which has ", classes,
                " (0 to ", classes - 1, ")");
    a.labels = torch::full({a.n}, k, torch::kLong);
    if (k < static_cast<int64_t>(names.size())) a.class_name = names[static_cast<size_t>(k)];
  }
  if (!s.classes.empty()) {
    const auto classes = a.checkpoint.empty() ? weights_num_classes(a) : num_classes_of(read_checkpoint_info(a.checkpoint));
    TORCH_CHECK(classes > 0, "sample: ", a.checkpoint.empty() ? a.weights : a.checkpoint,
                " is not class-conditional (trained without --conditional), or its class count is not recorded");
    a.labels = torch::arange(classes).repeat_interleave(a.n);  // one row of n per class
    if (nrow == 0) nrow = a.n;
    a.n *= classes;
  }
  TORCH_CHECK(a.checkpoint.empty() != a.weights.empty(), "sample: give --checkpoint or --weights");
  TORCH_CHECK(a.init.empty() || a.strength || !a.mask.empty(),
              "sample: --init needs --strength S (how much of it to change, 0 to 1) or --mask (which pixels to keep)");
  // What the model draws: images are written as PNG (or .npy with --out *.npy), other examples as .npy.
  const auto shape = recorded_shape(a);
  const bool images = shape.size() == 3 && (shape[0] == 1 || shape[0] == 3 || shape[0] == 4);
  const auto suffix = [](const std::string& path) {  // lowercased, as check_output compares it
    auto e = std::filesystem::path(path).extension().string();
    std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return e;
  };
  const bool npy = suffix(s.out) == ".npy";
  if (!images && !given.out_given) s.out = "samples.npy";
  if (!s.out.empty()) {
    TORCH_CHECK(images || suffix(s.out) != ".png" || !given.out_given, "sample: ",
                a.checkpoint.empty() ? a.weights : a.checkpoint, " draws examples of shape (", fmt::format("{}", fmt::join(shape, ", ")),
                "), not images; write them with --out FILE.npy");
    check_output("--out", s.out, images && !npy ? ".png" : ".npy", {a.checkpoint, a.weights, a.guide, a.init, a.mask});
  }
  TORCH_CHECK(images || (s.singles.empty() && a.init.empty()), "sample: --singles, --init and --mask take images; ",
              a.checkpoint.empty() ? a.weights : a.checkpoint, " draws examples of shape (", fmt::format("{}", fmt::join(shape, ", ")), ")");
  const auto normal = [](const std::filesystem::path& p) {  // "./s.png/" and "s.png" alike
    auto n = std::filesystem::weakly_canonical(std::filesystem::absolute(p)).lexically_normal();
    return n.has_filename() ? n : n.parent_path();
  };
  TORCH_CHECK(s.out.empty() || s.singles.empty() || normal(s.out) != normal(s.singles),
              "sample: --out and --singles name the same path, ", s.out, "; give the grid a file name of its own");
  if (!s.singles.empty()) check_output_dir("--singles", s.singles, {a.checkpoint, a.weights, a.guide, a.init, a.mask});
  const auto drawn = generate(a, true);
  if (!s.out.empty() && (!images || npy)) {
    data::save_npy(s.out, drawn.to(torch::kFloat32));
    fmt::print("wrote {} ({} samples of shape ({}), as drawn)\n", s.out, a.n, fmt::join(shape, ", "));
    return 0;
  }
  const auto x = to_unit_range(drawn);
  if (!s.out.empty()) {
    if (nrow == 0) nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(a.n))));
    write_png(s.out, make_grid(x, nrow, 2));
    fmt::print("wrote {}\n", s.out);
  }
  if (!s.singles.empty()) {
    for (int64_t i = 0; i < a.n; ++i) write_png(std::filesystem::path(s.singles) / fmt::format("sample_{:05d}.png", i), x[i]);
    fmt::print("wrote {} images to {}\n", a.n, s.singles);
  }
  return 0;
}

}  // namespace cli

namespace cli {

CLI::App* add_export(CLI::App& app, ExportCommand& e) {
  auto* cmd = app.add_subcommand("export", "Write a checkpoint's weights as safetensors, by the seed's parameter names "
                                           "(Python: model.load_state_dict(safetensors.torch.load_file(path)))");
  cmd->add_option("--checkpoint", e.checkpoint, "Checkpoint written by train")->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", e.out, "The .safetensors file to write")->required();
  cmd->add_flag("--no-ema", e.no_ema, "Export the trained weights even if the checkpoint has EMA weights");
  return cmd;
}

int run_export(const ExportCommand& e) {
  check_output("--out", e.out, ".safetensors", {e.checkpoint});
  auto [model, info] = diffusion::load_model(e.checkpoint, !e.no_ema);
  std::map<std::string, std::string> metadata{{"format", "pt"},
                             {"backbone", info.backbone->name},
                             {"options", info.backbone->options.dump()},
                             {"formulation", nlohmann::json{{"name", info.formulation.name},
                                                            {"options", info.formulation.options}}.dump()},
                             {"prediction", std::string(diffusion::to_string(info.prediction))},
                             {"schedule", nlohmann::json(info.schedule).dump()}};
  if (!info.data_shape.empty()) metadata["data_shape"] = nlohmann::json(info.data_shape).dump();
  diffusion::export_weights(model->module(), e.out, metadata);
  fmt::print("wrote the {} weights of {} ({}) to {}\n", info.has_ema && !e.no_ema ? "EMA" : "trained", e.checkpoint,
             info.backbone->name, e.out);
  return 0;
}

}  // namespace cli
