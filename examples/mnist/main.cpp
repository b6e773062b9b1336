// The seed's whole job as one program: train a backbone on MNIST (or Fashion-MNIST) with DDPM,
// writing a sample grid, a checkpoint and a metrics line every epoch; then sample from a checkpoint.
//
//   mnist train --backbone conv-small --epochs 2 --out runs/mnist
//   mnist sample --checkpoint runs/mnist/checkpoints/checkpoint_epoch_002.pt --out grid.png
//
// `mnist --help`, `mnist train --help` and `mnist sample --help` explain every flag.
#include <diffusion/diffusion.hpp>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace diffusion;

namespace {

/// The backbones this program knows, by name. conv-small is the seed's ConvNet at widths 32, 64: about
/// a tenth of the parameters and ~1/14 of the training cost, so an epoch fits a laptop CPU.
const std::vector<std::string> kBackbones = {"conv", "conv-small", "smol", "chunky", "unet"};

/// ConvNet widths by backbone name (none for the others).
std::vector<int64_t> default_widths(const std::string& backbone) {
  if (backbone == "conv-small") return {32, 64};
  if (backbone == "conv") return {32, 64, 128, 256};
  if (backbone == "unet") return UNetOptions().widths();
  return {};
}

/// Flag checks with plain messages (CLI11 2.1's PositiveNumber prints DBL_MAX as the upper bound).
CLI::Validator at_least(double lo) {
  return CLI::Validator(
      [lo](std::string& s) -> std::string {
        try {
          size_t used = 0;
          if (std::stod(s, &used) >= lo && used == s.size()) return "";
        } catch (const std::exception&) {
        }
        return fmt::format("must be a number >= {}, got '{}'", lo, s);
      },
      fmt::format(">={}", lo));
}

CLI::Validator positive() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        try {
          size_t used = 0;
          if (std::stod(s, &used) > 0 && used == s.size()) return "";
        } catch (const std::exception&) {
        }
        return fmt::format("must be a number > 0, got '{}'", s);
      },
      ">0");
}

std::string join(const std::vector<int64_t>& v) { return fmt::format("{}", fmt::join(v, ",")); }

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

torch::Device parse_device(const std::string& s) { return s == "auto" ? auto_device() : torch::Device(s); }

/// "auto" picks bf16 on a CPU with bf16 instructions (same sample quality, 1.5x the UNet's training
/// speed: docs/results.md), else fp32.
Precision precision_for(const std::string& s, const torch::Device& device) {
  return s == "auto" ? auto_precision(device) : parse_precision(s);
}

/// The backbone's shape beyond its name: widths (ConvNet, UNet), and for the UNet blocks per level and the
/// patch size. Empty vectors and a zero patch mean the backbone's defaults.
struct Shape {
  std::vector<int64_t> widths, blocks;
  int64_t patch = 0;
};

/// The UNet that `shape` describes: one block per level unless it says otherwise, for however many levels
/// its widths give.
UNetOptions unet_options(const Shape& shape) {
  auto options = UNetOptions();
  if (!shape.widths.empty()) options.widths(shape.widths);
  options.blocks(shape.blocks.empty() ? std::vector<int64_t>(options.widths().size(), 1) : shape.blocks);
  if (shape.patch > 0) options.patch(shape.patch);
  return options;
}

/// Calls `f` with the backbone that `name` and `shape` describe.
template <class F>
auto with_backbone(const std::string& name, const Shape& shape, F&& f) {
  if (name == "conv" || name == "conv-small") return f(ConvNet(ConvNetOptions().widths(shape.widths)));
  if (name == "smol") return f(SmolMLP());
  if (name == "chunky") return f(ChunkyMLP());
  if (name == "unet") return f(UNet(unet_options(shape)));
  throw std::invalid_argument("unknown backbone '" + name + "'");
}

struct TrainArgs {
  std::string backbone = "conv";
  std::string widths, blocks, keep_epochs;
  int64_t patch = 0;
  std::string data = "data/mnist";
  std::string out = "runs/mnist";
  std::string device = "auto";
  std::string schedule = "linear", lr_schedule = "constant", precision = "auto";
  int64_t warmup = 0;
  int64_t epochs = 100, batch_size = 128, micro_batch = 0, threads = 0, limit = 0, val_size = 1000, max_steps = 0, grid = 25, grid_steps = 0, keep = 1;
  double lr = 1e-3, ema = 0.0, grad_clip = 0.0, min_snr_gamma = 0.0;
  uint64_t seed = 0;
  bool resume = false;
};

struct SampleArgs {
  std::string checkpoint, out = "samples.png", singles, device = "auto", sampler = "ddpm", precision = "auto";
  int64_t n = 25, nrow = 0;
  double clip_x0 = 1.0;
  /// Set only when given: each method has its own defaults and refuses what it does not use.
  SamplerSettings settings;
  /// Image-to-image and inpainting (sample only): a PNG to start from, how much of it to change, and a PNG
  /// mask of the pixels to keep (white).
  std::string init, mask;
  std::optional<double> strength;
  /// Autoguidance: a second, weaker checkpoint and the weight (1: the main model alone).
  std::string guide;
  double guidance = 2.0;
  int64_t threads = 0;
  uint64_t seed = 0;
  bool no_ema = false;
};

int train(const TrainArgs& a) {
  const Shape shape{a.widths.empty() ? default_widths(a.backbone) : parse_ints(a.widths),
                    a.blocks.empty() ? std::vector<int64_t>{} : parse_ints(a.blocks), a.patch};
  auto train_split = data::load_mnist(a.data, data::Split::Train);
  auto images = train_split.images;
  if (a.limit > 0) images = images.slice(0, 0, std::min<int64_t>(a.limit, images.size(0)));
  torch::Tensor val;
  if (a.val_size > 0) {
    const auto test = data::load_mnist(a.data, data::Split::Test);
    val = test.images.slice(0, 0, std::min<int64_t>(a.val_size, test.images.size(0)));
  }
  const NoiseSchedule schedule(
      NoiseScheduleOptions().kind(a.schedule == "cosine" ? ScheduleKind::Cosine : ScheduleKind::Linear));
  const auto device = parse_device(a.device);
  const auto options = TrainerOptions()
                           .epochs(a.epochs)
                           .batch_size(a.batch_size)
                           .micro_batch(a.micro_batch)
                           .lr(a.lr)
                           .lr_schedule(a.lr_schedule == "cosine" ? LRSchedule::Cosine : LRSchedule::Constant)
                           .warmup_steps(a.warmup)
                           .ema_decay(a.ema)
                           .grad_clip(a.grad_clip)
                           .min_snr_gamma(a.min_snr_gamma)
                           .seed(a.seed)
                           .out_dir(a.out)
                           .keep_checkpoints(a.keep)
                           .keep_epochs(a.keep_epochs.empty() ? std::vector<int64_t>{} : parse_ints(a.keep_epochs))
                           .grid_samples(a.grid)
                           .grid_ddim_steps(a.grid_steps)
                           .max_steps_per_epoch(a.max_steps)
                           .device(device)
                           .precision(precision_for(a.precision, device))
                           .threads(a.threads);
  return with_backbone(a.backbone, shape, [&](auto model) {
    Trainer trainer(std::move(model), schedule, options);
    trainer.metadata = {{"backbone", a.backbone}, {"widths", join(shape.widths)}, {"image_shape", "1,28,28"}};
    if (a.backbone == "unet") {
      // In full, defaults included, so the sampler rebuilds exactly this network.
      const auto unet = unet_options(shape);
      trainer.metadata["blocks"] = join(unet.blocks());
      trainer.metadata["patch"] = std::to_string(unet.patch());
    }
    if (a.resume && trainer.resume()) {
      fmt::print("resumed from epoch {} (step {}) of {}\n", trainer.epoch(), trainer.global_step(), a.out);
    }
    int64_t params = 0;
    for (const auto& p : unwrap(trainer.model()).parameters()) params += p.numel();
    fmt::print("training {} ({} parameters) on {} images from {} for {} epochs on {} with {} threads, {}\n",
               a.backbone, params, images.size(0), a.data, a.epochs, trainer.device().str(), at::get_num_threads(),
               to_string(trainer.options().precision()));
    std::fflush(stdout);  // before the progress bar starts on stderr
    trainer.on_epoch = [](const EpochInfo& e) {
      // Without validation (--val-size 0) the loss is NaN and without a grid (--grid 0) the path is empty:
      // print only what this epoch produced.
      const auto val = std::isnan(e.val_loss) ? std::string() : fmt::format(", val loss {:.4f}", e.val_loss);
      const auto wrote = e.grid.empty() ? e.checkpoint.string() : e.grid.string() + " and " + e.checkpoint.string();
      fmt::print("epoch {}/{}: train loss {:.4f}{}, {:.1f} s, {:.1f} img/s; wrote {}\n", e.epoch, e.epochs,
                 e.train_loss, val, e.seconds, e.images_per_second, wrote);
      std::fflush(stdout);
    };
    trainer.fit(images, val);
    return 0;
  });
}

/// Calls `f(model, info)` with the backbone that the checkpoint at `path` describes, its weights loaded (the
/// EMA weights if it has them and `ema`) and moved to `device`.
template <class F>
auto with_checkpoint(const std::string& path, bool ema, const torch::Device& device, F&& f) {
  const auto info = read_checkpoint_info(path);
  const auto backbone = info.metadata.count("backbone") ? info.metadata.at("backbone") : "";
  TORCH_CHECK(std::find(kBackbones.begin(), kBackbones.end(), backbone) != kBackbones.end(), "sample: ", path,
              " names backbone '", backbone, "', which this program does not know");
  // Checkpoints from before --blocks and --patch existed have one block per level and no patches.
  const auto& m = info.metadata;
  const Shape shape{parse_ints(m.at("widths")), m.count("blocks") ? parse_ints(m.at("blocks")) : std::vector<int64_t>{},
                    m.count("patch") ? std::stoll(m.at("patch")) : 0};
  return with_backbone(backbone, shape, [&](auto model) {
    load_weights(path, model, ema);
    model->to(device);
    return f(model, info);
  });
}

bool same_schedule(const NoiseScheduleOptions& a, const NoiseScheduleOptions& b) {
  return a.timesteps() == b.timesteps() && a.kind() == b.kind() && a.beta_start() == b.beta_start() &&
         a.beta_end() == b.beta_end() && a.cosine_s() == b.cosine_s() && a.max_beta() == b.max_beta();
}

/// A 28x28 PNG as a (1, 1, 28, 28) tensor on `device`, in [0, 1].
torch::Tensor read_mnist_png(const std::string& path, const torch::Device& device) {
  const auto image = read_png(path, 1);
  TORCH_CHECK(image.size(1) == 28 && image.size(2) == 28, path, " is ", image.size(2), "x", image.size(1),
              "; this program's models take 28x28 images");
  return image.unsqueeze(0).to(device);
}

/// n images from a checkpoint (guided by a second one if a.guide is set) with the chosen sampler, in
/// [-1, 1] on the CPU.
torch::Tensor generate(const SampleArgs& a, bool verbose) {
  set_threads(a.threads);
  const auto device = parse_device(a.device);
  const auto precision = precision_for(a.precision, device);
  const auto method = make_sampler(a.sampler, a.settings);
  auto base = SampleOptions().clip_x0(a.clip_x0).precision(precision);
  if (!a.init.empty()) base.image(read_mnist_png(a.init, device) * 2 - 1);  // data are in [-1, 1]
  if (a.strength) base.strength(*a.strength);
  if (!a.mask.empty()) base.mask(read_mnist_png(a.mask, device));
  const auto run = [&](auto& model, const CheckpointInfo& info) {
    const NoiseSchedule schedule = NoiseSchedule(info.schedule).to(device);
    if (verbose) {
      fmt::print("sampling {} images from {} (epoch {}, {} weights) with {} on {}, {}\n", a.n, a.checkpoint,
                 info.epoch, info.has_ema && !a.no_ema ? "EMA" : "trained", method->describe(), device.str(),
                 to_string(precision));
      if (!a.init.empty()) {
        fmt::print("starting from {}{}\n", a.init,
                   a.mask.empty() ? fmt::format(" at strength {}", *a.strength)
                                  : fmt::format(", keeping the pixels {} marks", a.mask));
      }
      if (!a.guide.empty()) {
        fmt::print("autoguidance: weight {} against {} (two model calls per step)\n", a.guidance, a.guide);
      }
      if (a.clip_x0 > 0) fmt::print("predicted x_0 clamped to [-{0}, {0}] at every step\n", a.clip_x0);
      std::fflush(stdout);
    }
    // In chunks of at most 100 images: larger batches' activations (50 MB a tensor at 500 images) are
    // mapped and unmapped by malloc at every op, and the page faults cost more than the arithmetic on a CPU.
    // Chunk k is seeded with seed + k, so a run is reproducible from its seed.
    std::vector<torch::Tensor> chunks;
    for (int64_t done = 0, k = 0; done < a.n; done += 100, ++k) {
      const std::vector<int64_t> shape{std::min<int64_t>(100, a.n - done), 1, 28, 28};
      const uint64_t seed = a.seed + static_cast<uint64_t>(k);
      chunks.push_back(sample(model, schedule, shape, *method, SampleOptions(base).seed(seed)).cpu());
    }
    return torch::cat(chunks);
  };
  if (a.guide.empty()) return with_checkpoint(a.checkpoint, !a.no_ema, device, run);
  // One Guided type whatever the two backbones are, so the samplers are compiled once more, not per pair.
  return with_checkpoint(a.checkpoint, !a.no_ema, device, [&](auto model, const CheckpointInfo& info) {
    return with_checkpoint(a.guide, !a.no_ema, device, [&](auto guide, const CheckpointInfo& guide_info) {
      TORCH_CHECK(same_schedule(info.schedule, guide_info.schedule), "sample: --guide ", a.guide,
                  " was trained with another noise schedule than ", a.checkpoint,
                  "; autoguidance needs both to predict the noise of the same x_t");
      Guided guided(model, guide, a.guidance);
      return run(guided, info);
    });
  });
}

int sample(const SampleArgs& a) {
  const auto x = to_unit_range(generate(a, true));
  if (!a.out.empty()) {
    const auto nrow = a.nrow > 0 ? a.nrow : static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(a.n))));
    write_png(a.out, make_grid(x, nrow, 2));
    fmt::print("wrote {}\n", a.out);
  }
  if (!a.singles.empty()) {
    for (int64_t i = 0; i < a.n; ++i) write_png(fs::path(a.singles) / fmt::format("sample_{:05d}.png", i), x[i]);
    fmt::print("wrote {} images to {}\n", a.n, a.singles);
  }
  return 0;
}

struct ClassifierArgs {
  std::string data = "data/mnist", out = "runs/classifier.pt";
  int64_t epochs = 3, threads = 0;
  uint64_t seed = 0;
};

int classifier(const ClassifierArgs& a) {
  set_threads(a.threads);
  const auto train = data::load_mnist(a.data, data::Split::Train);
  const auto test = data::load_mnist(a.data, data::Split::Test);
  eval::LeNet net;
  eval::train_classifier(net, train.images, train.labels, a.epochs, a.seed, [](int64_t epoch, double loss) {
    fmt::print("classifier epoch {}: loss {:.4f}\n", epoch, loss);
    std::fflush(stdout);
  });
  const double acc = eval::accuracy(net, test.images, test.labels);
  if (fs::path(a.out).has_parent_path()) fs::create_directories(fs::path(a.out).parent_path());
  torch::save(net, a.out);
  fmt::print("test accuracy {:.2f}%; wrote {}\n", 100 * acc, a.out);
  if (acc < 0.99) fmt::print("note: below 99%; more --epochs usually help\n");
  return 0;
}

struct EvaluateArgs {
  SampleArgs sample;
  std::string classifier = "runs/classifier.pt", data = "data/mnist", images;
};

int evaluate(const EvaluateArgs& a) {
  set_threads(a.sample.threads);
  eval::LeNet net;
  torch::load(net, a.classifier);
  net->eval();
  const auto test = data::load_mnist(a.data, data::Split::Test);
  const auto train = data::load_mnist(a.data, data::Split::Train);
  const auto reference = eval::feature_statistics(eval::features_of(net, test.images));
  torch::Tensor samples;
  if (!a.images.empty()) {
    torch::load(samples, a.images);
    TORCH_CHECK(samples.dim() == 4 && samples.size(1) == 1 && samples.size(2) == 28 && samples.size(3) == 28,
                "evaluate: ", a.images, " must hold an (N, 1, 28, 28) tensor in [-1, 1], got ", samples.sizes());
  } else {
    samples = generate(a.sample, true);
  }
  // The bounds, on as many images as the samples: train vs test (the floor) and uniform noise vs test.
  // The real images' scores also give the digit rate for scale: the classifier is not certain of every
  // real digit either.
  const int64_t m = std::min<int64_t>(samples.size(0), train.images.size(0));
  const auto real = eval::evaluate_samples(net, train.images.slice(0, 0, m), reference);
  const double floor = real.frechet;
  const auto noise = torch::rand({m, 1, 28, 28}, make_generator(a.sample.seed + 1)) * 2 - 1;
  const double ceiling = eval::frechet_distance(eval::feature_statistics(eval::features_of(net, noise)), reference);
  const auto q = eval::evaluate_samples(net, samples, reference);
  fmt::print("samples:          {}\n", samples.size(0));
  fmt::print("Frechet distance: {:.3f}   (floor, {} train images vs test: {:.3f}; ceiling, noise vs test: {:.3f})\n",
             q.frechet, m, floor, ceiling);
  fmt::print("digit rate:       {:.3f}   (share classified with probability >= 0.9; {} train images: {:.3f})\n",
             q.digit_rate, m, real.digit_rate);
  fmt::print("class histogram:  {}\n", fmt::join(q.histogram, " "));
  fmt::print("class entropy:    {:.3f} nats (uniform: {:.3f}); smallest class share {:.3f}\n", q.class_entropy,
             std::log(10.0), q.min_class_share);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"DDPM on MNIST-format data: train a backbone, or sample from a checkpoint."};
  app.require_subcommand(1, 1);

  TrainArgs t;
  auto* tr = app.add_subcommand("train", "Train a backbone; writes OUT/samples/epoch_NNN.png, "
                                         "OUT/checkpoints/checkpoint_epoch_NNN.pt and OUT/metrics.jsonl every epoch");
  tr->add_option("--backbone", t.backbone, "Backbone: conv (the seed's), conv-small (widths 32,64), smol, chunky, unet")
      ->check(CLI::IsMember(kBackbones))
      ->capture_default_str();
  tr->add_option("--widths", t.widths,
                 "ConvNet encoder widths, or the UNet's widths per level (each level halves the resolution), "
                 "comma-separated (default: the backbone's)");
  tr->add_option("--blocks", t.blocks, "UNet residual blocks per level, one count per width, comma-separated (default: 1 each)");
  tr->add_option("--patch", t.patch,
                 "UNet patch size: fold PxP pixels into channels first, e.g. 2 runs the levels at 14x14 and 7x7 "
                 "with --widths 32,128 (default: 1, none)")
      ->check(CLI::Range(1, 28));
  tr->add_option("--data", t.data, "Directory with the four idx files (plain or .gz), e.g. "
                                    "/usr/share/datasets/fashion-mnist")
      ->capture_default_str();
  tr->add_option("--out", t.out, "Output directory")->capture_default_str();
  tr->add_option("--epochs", t.epochs, "Epochs to train (in total, counting resumed ones)")
      ->check(at_least(1))->capture_default_str();
  tr->add_option("--batch-size", t.batch_size, "Batch size")->check(at_least(1))->capture_default_str();
  tr->add_option("--micro-batch", t.micro_batch,
                 "Accumulate gradients over micro-batches of this size: same gradient, faster on a CPU (0: off)")
      ->check(at_least(0))->capture_default_str();
  tr->add_option("--lr", t.lr, "AdamW learning rate")->check(positive())->capture_default_str();
  tr->add_option("--lr-schedule", t.lr_schedule, "constant (the seed's) or cosine (decays to 0 at the last step)")
      ->check(CLI::IsMember({"constant", "cosine"}))->capture_default_str();
  tr->add_option("--warmup", t.warmup, "Steps of linear learning-rate warm-up (0: off)")->check(at_least(0))
      ->capture_default_str();
  tr->add_option("--ema", t.ema, "EMA decay of the weights, e.g. 0.999 (0: off)")
      ->check(CLI::Range(0.0, 0.999999))->capture_default_str();
  tr->add_option("--grad-clip", t.grad_clip, "Clip the gradient norm to this (0: off)")
      ->check(at_least(0))->capture_default_str();
  tr->add_option("--min-snr-gamma", t.min_snr_gamma,
                 "Weight each image's loss by min(SNR, gamma) / SNR (Hang et al. 2023; 5 in the paper; 0: off)")
      ->check(at_least(0))->capture_default_str();
  tr->add_option("--schedule", t.schedule, "Noise schedule")->check(CLI::IsMember({"linear", "cosine"}))
      ->capture_default_str();
  tr->add_option("--device", t.device, "auto (CUDA if available), cpu, cuda or cuda:N")->capture_default_str();
  tr->add_option("--threads", t.threads, "CPU threads (0: all cores)")->check(at_least(0))
      ->capture_default_str();
  tr->add_option("--precision", t.precision,
                 "fp32 (the seed's), bf16 (autocast the backbone to bfloat16), or auto: bf16 on a CPU with "
                 "AMX/AVX512-BF16, else fp32")
      ->check(CLI::IsMember({"auto", "fp32", "bf16"}))->capture_default_str();
  tr->add_option("--seed", t.seed, "Seed for shuffling, timesteps and noise")->capture_default_str();
  tr->add_option("--limit", t.limit, "Train on the first N images only (0: all)")->check(at_least(0))
      ->capture_default_str();
  tr->add_option("--val-size", t.val_size, "Validation images from the test split (0: no validation)")
      ->check(at_least(0))->capture_default_str();
  tr->add_option("--max-steps", t.max_steps, "Stop each epoch after N steps (0: whole epochs)")
      ->check(at_least(0))->capture_default_str();
  tr->add_option("--grid", t.grid, "Images in each epoch's sample grid (0: none)")->check(at_least(0))
      ->capture_default_str();
  tr->add_option("--grid-steps", t.grid_steps,
                 "Sample each epoch's grid with DDIM in this many steps at eta 1 (0: DDPM over all T steps, the seed's)")
      ->check(at_least(0))->capture_default_str();
  tr->add_option("--keep", t.keep, "Checkpoints to keep")->check(at_least(1))->capture_default_str();
  tr->add_option("--keep-epochs", t.keep_epochs,
                 "Also keep these epochs' checkpoints, comma-separated, e.g. 2: an early one to --guide sampling with");
  tr->add_flag("--resume", t.resume, "Continue from the newest checkpoint in OUT/checkpoints");

  SampleArgs s;
  auto* sa = app.add_subcommand("sample", "Sample from a checkpoint (no training code needed)");
  sa->add_option("--checkpoint", s.checkpoint, "Checkpoint written by train")->required()->check(CLI::ExistingFile);
  sa->add_option("--n", s.n, "Number of images")->check(at_least(1))->capture_default_str();
  sa->add_option("--out", s.out, "Grid PNG to write ('' for none)")->capture_default_str();
  sa->add_option("--nrow", s.nrow, "Images per grid row (0: square)")->check(at_least(0))
      ->capture_default_str();
  sa->add_option("--singles", s.singles, "Also write each image as DIR/sample_NNNNN.png");
  sa->add_option("--seed", s.seed, "Seed: the same seed gives the same images")->capture_default_str();
  sa->add_option("--device", s.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  sa->add_flag("--no-ema", s.no_ema, "Use the trained weights even if the checkpoint has EMA weights");
  const auto sampler_flags = [](CLI::App* cmd, SampleArgs& args) {
    cmd->add_option("--sampler", args.sampler,
                    "ddpm (all T steps), ddim, or dpmpp-2m (DPM-Solver++(2M): DDIM-50's quality in fewer steps)")
        ->check(CLI::IsMember(sampler_names()))
        ->capture_default_str();
    cmd->add_option_function<int64_t>("--steps", [&args](const int64_t& v) { args.settings.steps(v); },
                                      "Model evaluations for ddim (default 50) and dpmpp-2m (default 20)")
        ->check(at_least(1));
    cmd->add_option_function<double>("--eta", [&args](const double& v) { args.settings.eta(v); },
                                     "DDIM eta: 0 deterministic (default), 1 DDPM-like noise")
        ->check(at_least(0));
    cmd->add_option_function<std::string>("--spacing", [&args](const std::string& v) { args.settings.spacing(parse_spacing(v)); },
                                          "Which timesteps ddim and dpmpp-2m visit: leading (default; ends at 0), "
                                          "trailing (starts at T-1) or linspace (both)")
        ->check(CLI::IsMember({"leading", "trailing", "linspace"}));
    cmd->add_option("--clip-x0", args.clip_x0,
                    "Clamp each step's predicted x_0 to [-C, C]; the data lie in [-1, 1] (0: off, as in the seed)")
        ->check(at_least(0))->capture_default_str();
    cmd->add_option("--precision", args.precision,
                    "The backbone's arithmetic: fp32, bf16 (autocast), or auto (bf16 on a CPU with AMX/AVX512-BF16)")
        ->check(CLI::IsMember({"auto", "fp32", "bf16"}))->capture_default_str();
    cmd->add_option("--threads", args.threads, "CPU threads (0: all cores)")->check(at_least(0))->capture_default_str();
    auto* guide = cmd->add_option("--guide", args.guide,
                    "Autoguidance (Karras et al. 2024): a weaker checkpoint of the same kind of model, e.g. an early "
                    "epoch of the same run, whose errors each step is steered away from (two model calls per step)")
        ->check(CLI::ExistingFile);
    cmd->add_option("--guidance", args.guidance,
                    "Autoguidance weight w with --guide: guide + w (main - guide); 1 is the main model alone")
        ->needs(guide)
        ->capture_default_str();
  };
  sampler_flags(sa, s);
  auto* init = sa->add_option("--init", s.init,
                              "Image-to-image (SDEdit): start from this 28x28 PNG noised part-way (see --strength), "
                              "or inpaint it with --mask")
                   ->check(CLI::ExistingFile);
  sa->add_option_function<double>("--strength", [&s](const double& v) { s.strength = v; },
                                  "With --init: how much of the sampling to run from it, 0 (return it) to 1 (ignore it)")
      ->check(CLI::Range(0.0, 1.0))
      ->needs(init);
  sa->add_option("--mask", s.mask, "With --init: a 28x28 PNG, white where --init's pixels are kept, black where "
                                   "they are generated (inpainting)")
      ->check(CLI::ExistingFile)
      ->needs(init);

  ClassifierArgs c;
  auto* cl = app.add_subcommand("classifier", "Train the LeNet feature classifier that evaluate uses");
  cl->add_option("--data", c.data, "MNIST directory")->capture_default_str();
  cl->add_option("--out", c.out, "Where to save it")->capture_default_str();
  cl->add_option("--epochs", c.epochs, "Epochs")->check(at_least(1))->capture_default_str();
  cl->add_option("--seed", c.seed, "Seed")->capture_default_str();
  cl->add_option("--threads", c.threads, "CPU threads (0: all cores)")->check(at_least(0))->capture_default_str();

  EvaluateArgs e;
  e.sample.n = 10000;  // the usual size for FID-style scores; --n 1000 for a quick run
  auto* ev = app.add_subcommand("evaluate", "Score samples: Frechet distance in the classifier's features (with "
                                            "its floor and ceiling), digit rate, class histogram and entropy");
  ev->add_option("--checkpoint", e.sample.checkpoint, "Checkpoint to sample from")->check(CLI::ExistingFile);
  ev->add_option("--images", e.images, "Or: a tensor file (torch::save) of (N, 1, 28, 28) images in [-1, 1]")
      ->check(CLI::ExistingFile);
  ev->add_option("--classifier", e.classifier, "Classifier from the classifier subcommand")->capture_default_str();
  ev->add_option("--data", e.data, "MNIST directory (the reference is its test set)")->capture_default_str();
  ev->add_option("--n", e.sample.n, "Samples to draw")->check(at_least(2))->capture_default_str();
  ev->add_option("--seed", e.sample.seed, "Seed")->capture_default_str();
  ev->add_option("--device", e.sample.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  ev->add_flag("--no-ema", e.sample.no_ema, "Use the trained weights even if the checkpoint has EMA weights");
  sampler_flags(ev, e.sample);

  CLI11_PARSE(app, argc, argv);
  try {
    if (tr->parsed()) {
      if (!t.widths.empty()) {
        TORCH_CHECK(t.backbone == "conv" || t.backbone == "conv-small" || t.backbone == "unet",
                    "--widths applies to the conv and unet backbones only");
        for (const auto w : parse_ints(t.widths)) TORCH_CHECK(w >= 8 && w % 8 == 0, "--widths: each width must be a multiple of 8, got ", w);
      }
      const auto levels = t.widths.empty() ? UNetOptions().widths().size() : parse_ints(t.widths).size();
      if (!t.blocks.empty()) {
        TORCH_CHECK(t.backbone == "unet", "--blocks applies to the unet backbone only, got --backbone ", t.backbone);
        const auto blocks = parse_ints(t.blocks);
        TORCH_CHECK(blocks.size() == levels, "--blocks: expected one count per UNet level (", levels, "), got '",
                    t.blocks, "'");
        for (const auto b : blocks) TORCH_CHECK(b >= 1 && b <= 8, "--blocks: each count must be in [1, 8], got ", b);
      }
      if (!t.keep_epochs.empty()) {
        for (const auto e : parse_ints(t.keep_epochs)) TORCH_CHECK(e >= 1, "--keep-epochs: each epoch must be >= 1, got ", e);
      }
      if (t.patch != 0) {
        TORCH_CHECK(t.backbone == "unet", "--patch applies to the unet backbone only, got --backbone ", t.backbone);
      }
      if (t.backbone == "unet") {
        // Refused here rather than at the first training step, after MNIST has loaded.
        const auto unet = unet_options({t.widths.empty() ? std::vector<int64_t>{} : parse_ints(t.widths), {}, t.patch});
        TORCH_CHECK(28 % unet.size_multiple() == 0, "--patch ", unet.patch(), " with ", levels,
                    " UNet levels needs images divisible by ", unet.size_multiple(), "; MNIST's 28x28 are not");
      }
      return train(t);
    }
    if (sa->parsed() && !s.init.empty()) {
      TORCH_CHECK(s.strength || !s.mask.empty(), "sample: --init needs --strength S (how much of it to change, "
                                                 "0 to 1) or --mask (which pixels to keep)");
    }
    if (cl->parsed()) return classifier(c);
    if (ev->parsed()) {
      TORCH_CHECK(e.sample.checkpoint.empty() != e.images.empty(), "evaluate: give exactly one of --checkpoint or --images");
      return evaluate(e);
    }
    return sample(s);
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
  }
  return 1;
}
