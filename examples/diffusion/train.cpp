// diffusion train: a backbone on MNIST-format data, with the run's files written by RunOutputs.
#include "commands.hpp"

#if defined(DIFFUSION_CLI_DATA_PARALLEL)
#include <diffusion/training/distributed.hpp>
#endif

#include <chrono>
#include <cmath>
#include <thread>

namespace cli {

using namespace diffusion;

CLI::App* add_train(CLI::App& app, TrainCommand& t) {
  auto* cmd = app.add_subcommand("train", "Train a backbone; writes OUT/samples/epoch_NNN.png, "
                                          "OUT/checkpoints/checkpoint_epoch_NNN.pt and OUT/metrics.jsonl every epoch");
  // A flag given twice takes its last value: scripts/run-example.sh passes its recipe, then the user's flags.
  cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->add_option("--backbone", t.backbone,
                  "Backbone: conv (the seed's), conv-small (widths 32,64), smol, chunky, unet, or any registered "
                  "backbone by name (dit, mlp, temporal_unet, convnet, ...) with --options. Default: conv for images, "
                  "mlp for vectors (N, D), temporal_unet for sequences (N, C, L)")
      ->check(CLI::IsMember(backbone_names()));
  cmd->add_option("--options", t.shape.options,
                  "The backbone's options as a JSON object, e.g. '{\"patch\": 4, \"depth\": 6}' for dit (over the "
                  "defaults and the other shape flags; the names are the options' JSON fields in docs/api.md)");
  cmd->add_option("--widths", t.shape.widths,
                  "ConvNet encoder widths, or the UNet's widths per level (each level halves the resolution), "
                  "comma-separated (default: the backbone's)");
  cmd->add_option("--blocks", t.shape.blocks, "UNet residual blocks per level, one count per width, comma-separated (default: 1 each)");
  cmd->add_option("--patch", t.shape.patch,
                  "UNet patch size: fold PxP pixels into channels first, e.g. 2 runs the levels at 14x14 and 7x7 "
                  "with --widths 32,128 (default: 1, none)")
      ->check(CLI::Range(1, 28));
  cmd->add_option("--data", t.data.data,
                  "Directory with the four idx files (plain or .gz), e.g. /usr/share/datasets/fashion-mnist, or any "
                  "folder of PNG, JPEG and BMP images (searched through its subfolders; with --conditional each image's "
                  "class is the subfolder of --data it lies in), or a file of examples: .npy (np.save), .safetensors or "
                  ".pt (torch.save of a dict of tensors) holding vectors (N, D), sequences (N, C, L) or images "
                  "(N, C, H, W), as they are trained on (about unit scale); with --conditional, its 'labels' tensor")
      ->capture_default_str();
  cmd->add_option("--key", t.data.key, "A .safetensors or .pt file of examples: the examples' tensor (default: its only one "
                  "besides 'labels')");
  cmd->add_option("--size", t.data.size,
                  "Image folders: the side of the square images trained on (the centre square of each image, resized "
                  "by area; default 32)")
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--channels", t.data.channels, "Image folders: 1 (grey) or 3 (RGB; transparency on white; the default)")
      ->check(CLI::IsMember({1, 3}));
  cmd->add_flag("--flip", t.data.flip, "Image folders: flip each image horizontally at random, anew every epoch");
  cmd->add_flag("--strict", t.data.strict, "Image folders: refuse an unreadable image file instead of skipping it");
  cmd->add_option("--cache-mib", t.data.cache_mib,
                  "Image folders: decode every image once into memory when they take at most this many MiB; larger "
                  "sets (or 0) are decoded on the fly by background threads, a batch ahead (default 4096)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  cmd->add_option("--out", t.out, "Output directory")->capture_default_str();
  cmd->add_option("--epochs", t.epochs, "Epochs to train (in total, counting resumed ones)")->check(at_least(1))->capture_default_str();
  cmd->add_option("--batch-size", t.batch_size, "Batch size")->check(at_least(1))->capture_default_str();
  cmd->add_option("--micro-batch", t.micro_batch,
                  "Accumulate gradients over micro-batches of this size: same gradient, faster on a CPU (0: off)")
      ->check(at_least(0))->capture_default_str();
  cmd->add_option("--lr", t.lr, "AdamW learning rate")->check(positive())->capture_default_str();
  cmd->add_option("--lr-schedule", t.lr_schedule, "constant (the seed's) or cosine (decays to 0 at the last step)")
      ->check(CLI::IsMember({"constant", "cosine"}))->capture_default_str();
  cmd->add_option("--warmup", t.warmup, "Steps of linear learning-rate warm-up (0: off)")->check(at_least(0))->capture_default_str();
  cmd->add_option("--ema", t.ema, "EMA decay of the weights, e.g. 0.999 (0: off)")->check(between(0, 0.999999))->capture_default_str();
  cmd->add_option("--grad-clip", t.grad_clip, "Clip the gradient norm to this (0: off)")->check(at_least(0))->capture_default_str();
  cmd->add_option("--min-snr-gamma", t.min_snr_gamma,
                  "Weight each image's loss by Min-SNR-gamma (Hang et al. 2023; 5 in the paper; 0: off)")
      ->check(at_least(0))->capture_default_str();
  cmd->add_option("--prediction", t.prediction, "What the network predicts: epsilon (the seed's), v or sample (x_0)")
      ->check(CLI::IsMember({"epsilon", "v", "sample"}))->capture_default_str();
  cmd->add_option("--formulation", t.formulation,
                  "ddpm: the discrete schedule of Ho et al. 2020 (the seed's; --schedule, --prediction, --min-snr-gamma "
                  "and --zero-terminal-snr shape it); edm: Karras et al. 2022's preconditioned denoiser, trained at "
                  "log-normal noise levels (--sigma-data); flow: rectified flow matching, the network predicting the "
                  "velocity (--shift, --t-distribution)")
      ->check(CLI::IsMember(formulation_names()))->capture_default_str();
  cmd->add_option("--sigma-data", t.sigma_data, "With --formulation edm: the data's standard deviation")
      ->check(positive())->capture_default_str();
  cmd->add_option("--shift", t.shift,
                  "With --formulation flow: the timestep shift s of Esser et al. 2024, t' = s t / (1 + (s - 1) t), for "
                  "training and sampling (1: none)")
      ->check(positive())->capture_default_str();
  cmd->add_option("--t-distribution", t.t_distribution,
                  "With --formulation flow: the training times, uniform or logit-normal (Esser et al. 2024: m 0, s 1)")
      ->check(CLI::IsMember({"uniform", "logit-normal"}))->capture_default_str();
  cmd->add_option("--schedule", t.schedule, "Noise schedule")->check(CLI::IsMember({"linear", "cosine"}))->capture_default_str();
  cmd->add_flag("--zero-terminal-snr", t.zero_terminal_snr,
                "Rescale the schedule so its last timestep is pure noise (Lin et al. 2024); needs --prediction v or "
                "sample, and sampling with --spacing trailing or linspace");
  cmd->add_option("--device", t.device, "auto (CUDA if available), cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_option("--threads", t.threads, "CPU threads (0: all cores; at most 256)")->check(CLI::Range(0, 256))->capture_default_str();
  cmd->add_option("--precision", t.precision,
                  "fp32 (the seed's), bf16 (autocast the backbone to bfloat16), or auto: bf16 on a CPU with "
                  "AMX/AVX512-BF16, else fp32")
      ->check(CLI::IsMember({"auto", "fp32", "bf16"}))->capture_default_str();
  cmd->add_option("--seed", t.seed, "Seed for the weights' initialization, shuffling, timesteps and noise")->capture_default_str();
  cmd->add_option("--limit", t.data.limit, "Train on the first N images only (0: all)")->check(at_least(0))->capture_default_str();
  cmd->add_option("--val-size", t.data.val_size,
                  "Validation images: from the test split, or held out of an image folder at random (0: none)")
      ->check(at_least(0))->capture_default_str();
  cmd->add_option("--max-steps", t.max_steps, "Stop each epoch after N steps (0: whole epochs)")->check(at_least(0))->capture_default_str();
  cmd->add_option("--grid", t.grid, "Images in each epoch's sample grid (0: none; at most 1024, sampled in one batch)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  cmd->add_option("--grid-steps", t.grid_steps,
                  "Sample each epoch's grid with DDIM in this many steps at eta 1, trailing spacing (0: DDPM over all T "
                  "steps, the seed's); with --formulation edm or flow, over its default plan (Karras levels; uniform t) "
                  "(0: Heun over 18)")
      ->check(at_least(0))->capture_default_str();
  cmd->add_option("--keep", t.keep, "Checkpoints to keep")->check(at_least(1))->capture_default_str();
  cmd->add_option("--keep-epochs", t.keep_epochs,
                  "Also keep these epochs' checkpoints, comma-separated, e.g. 2: an early one to --guide sampling with");
  cmd->add_option("--checkpoint-every", t.checkpoint_every,
                  "Also write a checkpoint every N steps within an epoch, so that a kill loses at most N steps (0: off)")
      ->check(at_least(0))->capture_default_str();
  cmd->add_option("--checkpoint-minutes", t.checkpoint_minutes,
                  "Also write a checkpoint every M minutes within an epoch (0: off)")
      ->check(at_least(0))->capture_default_str();
  cmd->add_option("--skip-nonfinite", t.skip_nonfinite,
                  "Skip up to N steps whose loss or gradients are not finite before stopping (0: stop at the first)")
      ->check(at_least(0))->capture_default_str();
  cmd->add_flag("--conditional", t.conditional,
                "Class-conditional: the network learns each image's label (MNIST's 10 classes, or the subfolder of an "
                "image folder) and, with --cond-dropout, "
                "the unconditional prediction too, for classifier-free guidance (sample --class / --classes, --cfg)");
  cmd->add_option("--cond-dropout", t.cond_dropout, "With --conditional: share of labels dropped to the null class")
      ->needs("--conditional")
      ->check(between(0, 1))
      ->capture_default_str();
  cmd->add_flag("--resume", t.resume, "Continue from the newest checkpoint in OUT/checkpoints");
  cmd->add_option("--dist-timeout", t.dist_timeout,
                  "Launched as several ranks (torchrun, or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set): seconds a "
                  "rank waits for the others before failing (a rank that exits is noticed at once; the others wait "
                  "while rank 0 samples each epoch's grid)")
      ->check(at_least(1))
      ->capture_default_str();
  return cmd;
}

int run_train(const TrainCommand& t) {
  // Launched as several ranks (torchrun sets the variables; see docs/distributed.md): each takes its share
  // of the cores unless --threads says otherwise, and only rank 0 prints and writes files.
  const auto env = distributed_environment();
  const char* local_world = std::getenv("LOCAL_WORLD_SIZE");
  const int64_t local_ranks = env && local_world ? std::max(1, std::atoi(local_world)) : 1;
  set_threads(t.threads > 0 ? t.threads
                            : std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()) / local_ranks));
  const bool main_rank = !env || env->rank == 0;
  check_cpu_convolutions();  // before anything is written or printed: on a faulty platform, oneDNN goes off
  auto device = parse_device(t.device);
  // Each rank on a machine takes its own GPU (LOCAL_RANK), unless --device names one.
  if (env && device.is_cuda() && !device.has_index()) device = torch::Device(torch::kCUDA, static_cast<int8_t>(env->local_rank));
  const NoiseSchedule schedule(NoiseScheduleOptions().kind(parse_schedule_kind(t.schedule)).zero_terminal_snr(t.zero_terminal_snr));
  const bool discrete = t.formulation == "ddpm";
  TORCH_CHECK(discrete || (t.schedule == "linear" && t.prediction == "epsilon" && t.min_snr_gamma == 0 && !t.zero_terminal_snr),
              "train: --schedule, --prediction, --min-snr-gamma and --zero-terminal-snr shape --formulation ddpm; "
              "--formulation ", t.formulation, " has its own preconditioning and noise levels");
  TORCH_CHECK(t.formulation == "edm" || t.sigma_data == 0.5, "train: --sigma-data shapes --formulation edm, not ",
              t.formulation);
  TORCH_CHECK(t.formulation == "flow" || (t.shift == 1.0 && t.t_distribution == "uniform"),
              "train: --shift and --t-distribution shape --formulation flow, not ", t.formulation);
  // Checked here, not after the first epoch has trained: the grid's plan must fit the schedule.
  TORCH_CHECK(!discrete || t.grid_steps <= schedule.num_timesteps(), "train: --grid-steps must be at most the schedule's ",
              schedule.num_timesteps(), " timesteps, got ", t.grid_steps);
  const auto options =
      TrainerOptions()
          .epochs(t.epochs)
          .batch_size(t.batch_size)
          .micro_batch(t.micro_batch)
          .max_steps_per_epoch(t.max_steps)
          .seed(t.seed)
          .loss(LossOptions()
                    .prediction(parse_prediction(t.prediction))
                    .min_snr_gamma(t.min_snr_gamma)
                    .precision(resolve_precision(t.precision, device)))
          .optimization(OptimizationOptions()
                            .lr(t.lr)
                            .lr_schedule(parse_lr_schedule(t.lr_schedule))
                            .warmup_steps(t.warmup)
                            .grad_clip(t.grad_clip))
          .ema_decay(t.ema)
          .cond_dropout(t.cond_dropout)
          .skip_nonfinite(t.skip_nonfinite)
          .device(device);
  // The backbone's flags are checked first (a network of them is built and dropped), then the data are
  // scanned, before any long work: the backbone takes the images' channels and classes from them.
  if (!t.backbone.empty() || !t.shape.widths.empty() || !t.shape.blocks.empty() || t.shape.patch > 0) {
    make_backbone(backbone_config(t.backbone.empty() ? "conv" : t.backbone, t.shape));
  }
  const auto data_plan = plan_data(t.data, t.conditional);
  const auto backbone_name = t.backbone.empty() ? default_backbone(data_plan.shape) : t.backbone;
  const char* examples = data_plan.shape.size() == 3 ? "images" : "examples";
  const int64_t classes = data_plan.num_classes;
  // LibTorch seeds its default generator differently in every process: without this the same flags would
  // start from other weights each time. (A resumed run's weights come from its checkpoint.)
  torch::manual_seed(t.seed);
  auto backbone = make_backbone(backbone_config(backbone_name, t.shape, t.conditional ? classes : 0, data_plan.shape));
  {
    // One forward of a blank image of the data's shape, before any decoding or training: a network that
    // cannot take it (a size its levels or patches do not divide, other channels) is refused now.
    torch::NoGradGuard no_grad;
    auto blank = data_plan.shape;
    blank.insert(blank.begin(), 1);
    backbone->forward(torch::zeros(blank), torch::zeros({1}, torch::kLong));
  }
  auto trainer = [&] {
    if (discrete) return Trainer(backbone, schedule, options);
    // The objective carries the prediction and weighting that LossOptions gives the discrete schedule.
    auto own = TrainerOptions(options).loss(LossOptions().precision(options.loss().precision()));
    if (t.formulation == "flow") {
      const auto times = t.t_distribution == "uniform" ? TimeDistribution::Uniform : TimeDistribution::LogitNormal;
      return Trainer(backbone, std::make_shared<FlowObjective>(Flow(FlowOptions().shift(t.shift)),
                                                               FlowObjectiveOptions().distribution(times)), own);
    }
    return Trainer(backbone, std::make_shared<EDMObjective>(EDM(EDMOptions().sigma_data(t.sigma_data))), own);
  }();
  // Only rank 0 writes (and locks the directory); the others train alongside.
  const auto outputs = !main_rank ? nullptr : std::make_shared<RunOutputs>(
      RunOutputsOptions(t.out)
          .keep_checkpoints(t.keep)
          .keep_epochs(t.keep_epochs.empty() ? std::vector<int64_t>{} : parse_ints(t.keep_epochs))
          .grid_samples(t.grid)
          // Trailing spacing starts at t = T-1, which a zero-terminal-SNR schedule needs (and costs nothing else).
          .grid_sampler(discrete && t.grid_steps > 0 ? make_sampler("ddim", SamplerSettings().steps(t.grid_steps).eta(1).spacing(
                                                                    TimestepSpacing::Trailing))
                                         : nullptr)
          // Other formulations: DDIM at eta 1 over their default plan (Heun over 18 levels without --grid-steps).
          .grid_level_sampler(!discrete && t.grid_steps > 0 ? make_level_sampler("ddim", {{"eta", 1.0}}) : nullptr)
          .grid_plan([steps = t.grid_steps](const Formulation& f) { return make_plan(f, f.default_plan(), steps > 0 ? steps : 18); })
          .grid_seed(t.seed + 1)
          .grid_labels(t.conditional && t.grid > 0 ? torch::arange(t.grid) % classes : torch::Tensor())
          .checkpoint_every_steps(t.checkpoint_every)
          .checkpoint_every_minutes(t.checkpoint_minutes));
  if (env) {
#if defined(DIFFUSION_CLI_DATA_PARALLEL)
    trainer.distribute(std::make_shared<ProcessGroup>(*env, device, std::chrono::seconds(t.dist_timeout)));
#else
    TORCH_CHECK(false, "train: launched as ", env->world_size, " ranks, but this build has no c10d (install libgloo-dev)");
#endif
  }
  if (main_rank) trainer.add_hook(outputs);
  const auto saved = list_checkpoints(std::filesystem::path(t.out) / "checkpoints");  // the same files on every rank
  // A fresh run beside another run's checkpoints would mix the two (its epoch 1 beside their epoch 3, one
  // metrics.jsonl), and a later --resume would pick up either. (After the lock: a run still writing there
  // is reported as such.)
  TORCH_CHECK(t.resume || saved.empty(), "train: ", t.out, " already holds a run (newest: ", saved.empty() ? "" : saved.back().filename().string(),
              "); add --resume to continue it, or choose another --out");
  if (t.resume) {
    if (!saved.empty()) {
      try {
        // The same data as the run's, said plainly (the weights would be refused by their shapes): its image
        // shape, and for a class-conditional run its classes by name, whose order is their labels.
        const auto info = read_checkpoint_info(saved.back());
        DIFFUSION_CHECK(IncompatibleFileError, info.data_shape.empty() || info.data_shape == data_plan.shape, "train: ", saved.back().string(),
                    " was trained on ", examples, " of shape ", fmt::format("({})", fmt::join(info.data_shape, ", ")), "; ",
                    t.data.data, " gives ", fmt::format("({})", fmt::join(data_plan.shape, ", ")));
        const auto trained_on = class_names_of(info);
        DIFFUSION_CHECK(IncompatibleFileError, trained_on.empty() || trained_on == data_plan.classes, "train: ", saved.back().string(),
                    " was trained on the classes ", fmt::format("{}", fmt::join(trained_on, ", ")), "; ", t.data.data, " has ",
                    data_plan.classes.empty() ? std::string("none") : fmt::format("{}", fmt::join(data_plan.classes, ", ")));
        trainer.load_checkpoint(saved.back());
      } catch (const DamagedFileError& e) {  // the one before may do
        TORCH_CHECK(false, e.what_without_backtrace(), saved.size() > 1 ? "\nmove it away to resume from the one before, " +
                                                                              saved[saved.size() - 2].filename().string()
                                                                        : std::string());
      } catch (const IncompatibleFileError& e) {  // a sound file of another run: the flags differ from the run's
        TORCH_CHECK(false, e.what_without_backtrace(), "\nresume with the flags the run was started with");
      }
      if (main_rank) fmt::print("resumed from epoch {} (step {}) of {}\n", trainer.epoch(), trainer.global_step(), saved.back().string());
      if (trainer.epoch() >= t.epochs) {  // every rank read the same checkpoint: all return here
        if (main_rank) fmt::print("nothing to do: the run has {} epochs and --epochs is {}\n", trainer.epoch(), t.epochs);
        return 0;
      }
    }
  }
  if (main_rank && !data_plan.idx) {
    fmt::print("data {}\n", data_plan.description);
    std::fflush(stdout);
  }
  const auto [train_set, val_set, skipped, folder] = load_data(data_plan, t.data);
  if (main_rank && !skipped.empty()) {
    fmt::print("skipped {} image(s) that did not decode: {}\n", skipped.size(), data::detail::first_names(skipped));
  }
  // What a sampler needs to name the classes (the checkpoint records the data's shape itself).
  if (!data_plan.classes.empty()) trainer.metadata[class_names_key] = nlohmann::json(data_plan.classes).dump();
  int64_t params = 0;
  for (const auto& p : unwrap(trainer.model()).parameters()) params += p.numel();
  if (main_rank && env) {
    fmt::print("data parallel: {} ranks of batch {} (global batch {}), {} threads each\n", env->world_size, t.batch_size,
               env->world_size * t.batch_size, at::get_num_threads());
  }
  if (main_rank) fmt::print("training {} ({} parameters, {}{}) on {} {} from {} for {} epochs on {} with {} threads, {}\n",
             backbone_name, params, discrete ? fmt::format("{} prediction", t.prediction) : trainer.objective().describe(),
             t.conditional ? fmt::format(", conditional on {} class{}, label dropout {}", classes, classes == 1 ? "" : "es", t.cond_dropout) : "",
             train_set->size(), examples, t.data.data, t.epochs, trainer.device().str(),
             at::get_num_threads(), to_string(options.loss().precision()));
  std::fflush(stdout);  // before the progress bar starts on stderr
  trainer.on_epoch = [main_rank](const TrainEpoch& e) {
    if (!main_rank) return;
    // Print only what this epoch produced: no validation (--val-size 0) and no grid (--grid 0) say nothing.
    const auto val = e.val_loss ? fmt::format(", val loss {:.4f}", *e.val_loss) : std::string();
    const auto skipped = e.skipped_steps > 0 ? fmt::format(", {} non-finite steps skipped", e.skipped_steps) : std::string();
    const auto wrote = e.grid.empty() ? e.checkpoint.string() : e.grid.string() + " and " + e.checkpoint.string();
    fmt::print("epoch {}/{}: train loss {:.4f}{}{}, {:.1f} s, {:.1f} img/s; wrote {}\n", e.epoch, e.epochs, e.train_loss,
               val, skipped, e.seconds, e.images_per_second, wrote);
    std::fflush(stdout);
  };
  install_stop_signals();
  try {
    trainer.fit(train_set, val_set);
    if (main_rank && folder && !folder->cached()) {
      fmt::print("decoded on the fly: the steps waited {:.2f} s in all for prefetched images; {} batches were decoded "
                 "when read (each epoch's first, validation)\n", folder->wait_seconds(), folder->unannounced_batches());
    }
  } catch (const TrainingInterrupted& e) {
    if (main_rank) fmt::print(stderr, "\n{}\nresume with: {}{}\n", e.what(), t.command_line, t.resume ? "" : " --resume");
    return 130;
  }
  return 0;
}

}  // namespace cli
