// diffusion_bench: training throughput (the bare step and Trainer::fit's loop around it), reverse-step
// time, full-sample time and peak memory for each backbone, plus the machine's matmul ceilings. A program
// that prints numbers, never a test.
//
//   diffusion_bench                       every backbone but unet-main, 2 warm-up + 10 timed steps each
//   diffusion_bench --backbones smol,chunky --steps 20 --json
//   diffusion_bench --quick               seconds: proves the program works (CI)
//   diffusion_bench --precision fp32      float32 only (default: fp32 and bf16 rows for each backbone)
//   diffusion_bench --backbones unet-main --precision bf16 --batch 64 --profile   where a step's time goes
//
// Training is measured twice. The bare step: q_sample, forward, loss, backward and AdamW on one batch
// drawn beforehand. The loop: Trainer::fit on in-memory images as the README's main command configures
// it (EMA 0.999, Min-SNR 5, cosine learning rate with warm-up; no grids, validation or checkpoints), timed
// between its step callbacks, so it includes drawing each batch, the gradient norm, the NaN guard and the
// EMA. "loop overhead" is how much longer the loop's step takes than the bare step (within a few percent
// either way, a machine's noise can make it negative). With --warmup 0 the loop's first timed step
// includes fit()'s setup.
//
// Each measurement is the median of the timed repetitions after warm-up. On CUDA the clock is read
// after torch::cuda::synchronize(). The forward FLOPs of one image are counted by LibTorch's profiler
// (its FLOP formulas for convolutions, matrix products and elementwise adds and multiplies), once per
// backbone in fp32; a training step costs about 3x that (forward, and backward twice the forward).
#include <diffusion/diffusion.hpp>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/csrc/autograd/profiler_legacy.h>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace diffusion;

namespace {

struct Config {
  std::vector<std::string> backbones = {"conv", "conv-small", "smol", "chunky"};
  std::vector<Precision> precisions = {Precision::Float32, Precision::BFloat16};
  std::string device = "cpu", data;
  int64_t threads = 0, batch = 128, micro_batch = 0, sample_batch = 25, warmup = 2, steps = 10, reverse_steps = 5;
  bool json = false, quick = false, full_sample = false, ceiling = true, default_malloc = false, profile = false;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const auto n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // Linux reports KiB
}

/// A flag's value must be an integer >= lo (CLI11's own range checks print their bounds as doubles).
CLI::Validator at_least(int64_t lo) {
  return CLI::Validator(
      [lo](std::string& s) {
        try {
          size_t used = 0;
          const auto v = std::stoll(s, &used);
          if (used == s.size() && v >= lo) return std::string();
        } catch (const std::exception&) {
        }
        return fmt::format("expected an integer >= {}, got '{}'", lo, s);
      },
      fmt::format("INT>={}", lo));
}

/// Median seconds of `reps` calls of f after `warmup` calls, synchronizing CUDA around each.
double time_median(const torch::Device& device, int64_t warmup, int64_t reps, const std::function<void()>& f) {
  const auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  for (int64_t i = 0; i < warmup; ++i) f();
  std::vector<double> times;
  for (int64_t i = 0; i < reps; ++i) {
    sync();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    sync();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(times);
}

struct Result {
  std::string backbone;
  Precision precision = Precision::Float32;
  int64_t parameters = 0;
  double forward_gflop = 0;  // per image
  double step_img_s = 0, train_img_s = 0, reverse_step_s = 0, full_sample_s = 0, peak_rss_mib = 0;
  /// The loop's step time over the bare step's, minus 1.
  double loop_overhead() const { return step_img_s / train_img_s - 1; }
  bool full_sample_measured = false;
};

/// FLOPs of one forward pass of one image (shape (1, C, H, W)), as LibTorch's profiler counts them.
template <Backbone B>
double forward_flops(B& model, const std::vector<int64_t>& image, const torch::Device& device) {
  namespace profiler = torch::autograd::profiler;
  diffusion::detail::EvalModeGuard eval(unwrap(model));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn(image, torch::TensorOptions().device(device));
  const auto t = torch::full({1}, 500, torch::TensorOptions().dtype(torch::kLong).device(device));
  profiler::enableProfilerLegacy(profiler::ProfilerConfig(profiler::ProfilerState::CPU, /*report_input_shapes=*/true,
                                                          /*profile_memory=*/false, /*with_stack=*/false,
                                                          /*with_flops=*/true));
  (void)unwrap(model).forward(x, t);
  uint64_t flops = 0;
  for (auto& thread : profiler::disableProfilerLegacy()) {
    for (auto& event : thread) flops += event.flops();
  }
  return static_cast<double>(flops);
}

/// Self CPU time per operator (LibTorch's profiler; an op's time minus the ops it called) over the runs of
/// `f`, printed as a table of the `top` largest with their share of the total.
void print_profile(const std::string& title, int64_t runs, const std::function<void()>& f, int top = 18) {
  namespace profiler = torch::autograd::profiler;
  profiler::enableProfilerLegacy(profiler::ProfilerConfig(profiler::ProfilerState::CPU, /*report_input_shapes=*/false,
                                                          /*profile_memory=*/false));
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < runs; ++i) f();
  const double wall_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  std::map<std::string, std::pair<double, int64_t>> self;  // name -> (self us, calls)
  for (auto& thread : profiler::disableProfilerLegacy()) {
    struct Open {
      std::string name;
      double start, children;
    };
    std::vector<Open> stack;
    for (auto& e : thread) {
      if (e.kind() == profiler::EventKind::PushRange) {
        stack.push_back({e.name(), e.cpuUs(), 0.0});
      } else if (e.kind() == profiler::EventKind::PopRange && !stack.empty()) {
        const auto open = stack.back();
        stack.pop_back();
        const double total = e.cpuUs() - open.start;
        auto& entry = self[open.name];
        entry.first += total - open.children;
        entry.second += 1;
        if (!stack.empty()) stack.back().children += total;
      }
    }
  }
  std::vector<std::pair<std::string, std::pair<double, int64_t>>> rows(self.begin(), self.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  double in_ops = 0;
  for (const auto& r : rows) in_ops += r.second.first;
  fmt::print("{}: {} runs, {:.1f} ms each; self CPU time by operator ({:.0f}% of the wall time is inside operators)\n",
             title, runs, wall_us / 1e3 / static_cast<double>(runs), 100.0 * in_ops / wall_us);
  for (size_t i = 0; i < rows.size() && i < static_cast<size_t>(top); ++i) {
    const auto& [name, v] = rows[i];
    fmt::print("  {:<44} {:>9.2f} ms/run {:>6.1f}% {:>7} calls/run\n", name.substr(0, 44), v.first / 1e3 / static_cast<double>(runs),
               100.0 * v.first / wall_us, v.second / runs);
  }
}

/// The loop's options: the README's main command (EMA, Min-SNR, cosine learning rate with warm-up).
TrainerOptions loop_options(const Config& c, Precision precision, const torch::Device& device, int64_t steps) {
  return TrainerOptions()
      .epochs(1)
      .batch_size(c.batch)
      .micro_batch(c.micro_batch)
      .device(device)
      .loss(LossOptions().precision(precision).min_snr_gamma(5))
      .optimization(OptimizationOptions().lr(2e-3).lr_schedule(LRSchedule::Cosine).warmup_steps(200))
      .ema_decay(0.999)
      .max_steps_per_epoch(steps)
      .progress(ProgressMode::Off);
}

/// `make()` returns a new backbone; it is called with the global seed at 0 for each model measured, so
/// that the bare step and the loop start from the same weights.
template <typename Make>
Result bench_backbone(const std::string& name, const Make& make, Precision precision, const Config& c,
                      const torch::Tensor& dataset, const torch::Device& device) {
  Result r;
  r.backbone = name;
  r.precision = precision;
  torch::manual_seed(0);
  auto model = make();
  for (const auto& p : unwrap(model).parameters()) r.parameters += p.numel();
  unwrap(model).to(device);
  r.forward_gflop = forward_flops(model, {1, dataset.size(1), dataset.size(2), dataset.size(3)}, device) / 1e9;
  const NoiseSchedule schedule = NoiseSchedule().to(device);

  // The bare step: one batch drawn beforehand, the loss's forward and backward, AdamW.
  const auto options = loop_options(c, precision, device, c.warmup + c.steps);
  {
    auto gen = make_generator(1);
    const int64_t n = c.batch;
    const auto x0 = dataset.slice(0, 0, n).to(device);
    const auto t = torch::randint(0, schedule.num_timesteps(), {n}, gen, torch::kLong).to(device);
    const auto noise = torch::randn(x0.sizes(), gen).to(device);
    auto optimizer = diffusion::detail::default_optimizer(unwrap(model), options.optimization());
    unwrap(model).train();
    const DiscreteObjective objective(schedule, options.loss().prediction(), options.loss().min_snr_gamma());
    const auto network = [&](const torch::Tensor& cond) -> NetworkCall {
      return [&, cond](const torch::Tensor& x, const torch::Tensor& c_noise) {
        return diffusion::detail::predict("bench", model, x, c_noise, options.loss().precision(), cond);
      };
    };
    const auto step = [&] {
      optimizer->zero_grad();
      (void)diffusion::detail::accumulate_gradients(objective, network, x0, t, noise, {}, c.micro_batch);
      optimizer->step();
    };
    r.step_img_s = static_cast<double>(n) / time_median(device, c.warmup, c.steps, step);
    if (c.profile) print_profile(fmt::format("{} {} bare step, batch {}", name, to_string(precision), n), c.steps, step);
  }

  // The loop: Trainer::fit on a fresh copy of the same initial weights, timed between step callbacks.
  {
    torch::manual_seed(0);
    Trainer trainer(make(), NoiseSchedule(), options);
    std::vector<double> times;
    auto last = std::chrono::steady_clock::now();
    trainer.on_step = [&](const TrainStep& s) {
      if (device.is_cuda()) torch::cuda::synchronize();
      const auto now = std::chrono::steady_clock::now();
      if (s.step > c.warmup) times.push_back(std::chrono::duration<double>(now - last).count());
      last = now;
    };
    trainer.fit(dataset);
    r.train_img_s = static_cast<double>(c.batch) / median(times);
  }

  // One reverse step (model call + ddpm_step) on sample_batch images, as the sampler runs it (the model
  // call autocast under bf16, the step's arithmetic in float32).
  {
    diffusion::detail::EvalModeGuard eval(unwrap(model));
    c10::InferenceMode no_autograd;
    auto x = torch::randn({c.sample_batch, dataset.size(1), dataset.size(2), dataset.size(3)},
                          torch::TensorOptions().device(device));
    const auto t = torch::full({c.sample_batch}, 500, torch::TensorOptions().dtype(torch::kLong).device(device));
    r.reverse_step_s = time_median(device, 1, c.reverse_steps, [&] {
      x = ddpm_step(schedule, x, 500, diffusion::detail::forward_in(precision, model, x, t), torch::randn_like(x));
    });
  }
  if (c.full_sample) {
    r.full_sample_s = time_median(device, 0, 1, [&] {
      sample(model, schedule, {c.sample_batch, dataset.size(1), dataset.size(2), dataset.size(3)}, DDPM(),
             SampleOptions().precision(precision).seed(0));
    });
    r.full_sample_measured = true;
  } else {
    r.full_sample_s = r.reverse_step_s * static_cast<double>(schedule.num_timesteps());
  }
  r.peak_rss_mib = peak_rss_mib();
  return r;
}

/// GFLOP/s of an n x n matmul in `dtype`: the machine's practical ceiling for it.
double matmul_gflops(const torch::Device& device, int64_t n, torch::Dtype dtype) {
  const auto a = torch::randn({n, n}, torch::TensorOptions().device(device).dtype(dtype));
  const auto b = torch::randn({n, n}, torch::TensorOptions().device(device).dtype(dtype));
  const double s = time_median(device, 1, 5, [&] { (void)torch::mm(a, b); });
  return 2.0 * static_cast<double>(n * n * n) / s / 1e9;
}

/// The backbones the bench knows, by the name --backbones takes: the seed's four (ConvNet at the seed's
/// widths and at 32, 64; SmolMLP; ChunkyMLP), the default UNet and the README's main command's UNet. Each
/// entry measures its concrete type (no type erasure in the timed step).
struct BenchBackbone {
  std::string name;
  std::function<Result(const std::string&, Precision, const Config&, const torch::Tensor&, const torch::Device&)> run;
};

template <typename Make>
BenchBackbone entry(std::string name, Make make) {
  return {std::move(name), [make](const std::string& n, Precision p, const Config& c, const torch::Tensor& data,
                                  const torch::Device& device) { return bench_backbone(n, make, p, c, data, device); }};
}

const std::vector<BenchBackbone>& backbone_table() {
  static const std::vector<BenchBackbone> table = {
      entry("conv", [] { return ConvNet(); }),
      entry("conv-small", [] { return ConvNet(ConvNetOptions().widths({32, 64})); }),
      entry("smol", [] { return SmolMLP(); }),
      entry("chunky", [] { return ChunkyMLP(); }),
      entry("unet", [] { return UNet(); }),
      entry("unet-main", [] { return UNet(UNetOptions().blocks({1, 1, 2})); }),
  };
  return table;
}

const BenchBackbone* find_backbone(const std::string& name) {
  const auto& t = backbone_table();
  const auto it = std::find_if(t.begin(), t.end(), [&](const BenchBackbone& e) { return e.name == name; });
  return it == t.end() ? nullptr : &*it;
}

std::string bench_backbone_names() {
  std::string names;
  for (const auto& e : backbone_table()) names += (names.empty() ? "" : ", ") + e.name;
  return names;
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  std::string backbones = "conv,conv-small,smol,chunky,unet", precisions = "fp32,bf16";
  CLI::App app{"Benchmark diffusion's backbones: training throughput, sampling time, memory"};
  app.add_option("--backbones", backbones, "Comma-separated: " + bench_backbone_names() + " (unet-main: the main command's, blocks 1,1,2)")
      ->capture_default_str();
  app.add_option("--device", c.device, "cpu, cuda or cuda:N")->capture_default_str();
  app.add_option("--precision", precisions,
                 "Comma-separated: fp32 (the seed's arithmetic), bf16 (autocast; fast with AMX/AVX512-BF16), auto")
      ->capture_default_str();
  app.add_option("--threads", c.threads, "CPU threads (0: all cores)")->capture_default_str();
  app.add_option("--batch", c.batch, "Training batch size")->check(at_least(1))->capture_default_str();
  app.add_option("--micro-batch", c.micro_batch, "Accumulate gradients over micro-batches of this size (0: off)")
      ->check(at_least(0))->capture_default_str();
  app.add_option("--sample-batch", c.sample_batch, "Images per reverse step")->check(at_least(1))->capture_default_str();
  app.add_option("--warmup", c.warmup, "Untimed warm-up repetitions")->check(at_least(0))->capture_default_str();
  app.add_option("--steps", c.steps, "Timed training steps (median)")->check(at_least(1))->capture_default_str();
  app.add_option("--reverse-steps", c.reverse_steps, "Timed reverse steps (median)")->check(at_least(1))->capture_default_str();
  app.add_option("--data", c.data, "MNIST idx directory for the training batches (default: random images)");
  app.add_flag("--full-sample", c.full_sample, "Measure the 1000-step sample instead of extrapolating it");
  app.add_flag("--default-malloc", c.default_malloc, "Leave glibc's malloc thresholds as they are (default: reuse_freed_memory)");
  app.add_flag("--profile", c.profile, "Also print where the bare step's time goes: self CPU time per operator (LibTorch's profiler)");
  app.add_flag("--json", c.json, "Also print one JSON object per measurement");
  app.add_flag("--quick", c.quick, "Tiny settings that finish in seconds (for CI)");
  CLI11_PARSE(app, argc, argv);

  c.backbones.clear();
  std::stringstream ss(backbones);
  for (std::string b; std::getline(ss, b, ',');) {
    if (std::find(c.backbones.begin(), c.backbones.end(), b) != c.backbones.end()) {
      fmt::print(stderr, "--backbones: '{}' is named twice\n", b);
      return 2;
    }
    if (!find_backbone(b)) {
      fmt::print(stderr, "--backbones: unknown backbone '{}' (expected {})\n", b, bench_backbone_names());
      return 2;
    }
    c.backbones.push_back(b);
  }
  if (c.backbones.empty()) {
    fmt::print(stderr, "--backbones: expected at least one backbone\n");
    return 2;
  }
  c.precisions.clear();
  std::stringstream ps(precisions);
  if (c.quick) {
    c.batch = 8;
    c.sample_batch = 2;
    c.warmup = 1;
    c.steps = 2;
    c.reverse_steps = 2;
    c.full_sample = false;
  }
  try {
    const auto device = parse_device(c.device);
    for (std::string p; std::getline(ps, p, ',');) {
      const auto resolved = resolve_precision(p, device);
      TORCH_CHECK(std::find(c.precisions.begin(), c.precisions.end(), resolved) == c.precisions.end(), "--precision: '", p,
                  "' asks for ", to_string(resolved), " a second time");
      c.precisions.push_back(resolved);
    }
    TORCH_CHECK(!c.precisions.empty(), "--precision: expected fp32, bf16, auto, or a comma-separated list of them, got nothing");
    set_threads(c.threads);
    if (!c.default_malloc) reuse_freed_memory();
    const auto dataset = c.data.empty() ? torch::rand({c.quick ? 64 : 4096, 1, 28, 28}) * 2 - 1
                                        : data::load_mnist(c.data, data::Split::Train).images;
    TORCH_CHECK(dataset.size(0) >= (c.warmup + c.steps) * c.batch, "the loop needs (warmup + steps) x batch = ",
                (c.warmup + c.steps) * c.batch, " training images, the data has ", dataset.size(0));
    fmt::print("diffusion {}.{}.{}, LibTorch {}.{}, device {}, {} threads, batch {} (micro-batch {}), {} timed steps "
               "(median)\n", version_major, version_minor, version_patch, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
               device.str(), at::get_num_threads(), c.batch, c.micro_batch > 0 ? std::to_string(c.micro_batch) : "off",
               c.steps);
    // Whether oneDNN runs the convolutions (on a platform whose oneDNN failed the self-check it does not).
    if (device.is_cpu()) fmt::print("{}; {}\n", diffusion::detail::platform_description(), check_cpu_convolutions().summary());
    if (!c.quick) {
      for (const auto p : c.precisions) {
        const auto dtype = p == Precision::BFloat16 ? torch::kBFloat16 : torch::kFloat32;
        const double g = matmul_gflops(device, device.is_cuda() ? 8192 : 2048, dtype);
        fmt::print("{} matmul ceiling: {:.1f} GFLOP/s\n", to_string(p), g);
        if (c.json) {
          fmt::print("{{\"measure\": \"matmul_gflops\", \"device\": \"{}\", \"precision\": \"{}\", \"value\": {:.2f}}}\n",
                     device.str(), to_string(p), g);
        }
      }
    }
    fmt::print("{:<11} {:>9} {:>11} {:>14} {:>11} {:>11} {:>9} {:>16} {:>18} {:>14}\n", "backbone", "precision", "parameters",
               "fwd GFLOP/img", "step img/s", "loop img/s", "overhead",
               fmt::format("reverse step {}", c.sample_batch), "1000-step sample", "peak RSS MiB");
    for (const auto& name : c.backbones) for (const auto precision : c.precisions) {
      // A fresh, identically seeded model for every row and measurement (bench_backbone seeds).
      const Result r = find_backbone(name)->run(name, precision, c, dataset, device);
      fmt::print("{:<11} {:>9} {:>11} {:>14.4f} {:>11.1f} {:>11.1f} {:>8.1f}% {:>14.4f} s {:>14.1f} s{} {:>14.0f}\n", r.backbone,
                 to_string(r.precision), r.parameters, r.forward_gflop, r.step_img_s, r.train_img_s, 100 * r.loop_overhead(),
                 r.reverse_step_s, r.full_sample_s, r.full_sample_measured ? " " : "*", r.peak_rss_mib);
      if (c.json) {
        fmt::print("{{\"backbone\": \"{}\", \"precision\": \"{}\", \"device\": \"{}\", \"threads\": {}, \"batch\": {}, \"micro_batch\": {}, \"parameters\": {}, "
                   "\"forward_gflop_per_img\": {:.6f}, \"step_img_per_s\": {:.3f}, \"train_img_per_s\": {:.3f}, \"loop_overhead\": {:.4f}, "
                   "\"reverse_step_s\": {:.6f}, \"sample_batch\": {}, "
                   "\"full_sample_s\": {:.3f}, \"full_sample\": \"{}\", \"peak_rss_mib\": {:.1f}}}\n",
                   r.backbone, to_string(r.precision), device.str(), at::get_num_threads(), c.batch, c.micro_batch, r.parameters,
                   r.forward_gflop, r.step_img_s, r.train_img_s, r.loop_overhead(), r.reverse_step_s, c.sample_batch, r.full_sample_s,
                   r.full_sample_measured ? "measured" : "extrapolated", r.peak_rss_mib);
      }
    }
    fmt::print("step: the bare training step; loop: Trainer::fit's step (the README's main command's settings); overhead: loop "
               "step time / bare step time - 1.\n* extrapolated: 1000 x the median reverse step. Peak RSS is the process's so far.\n");
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what_without_backtrace());
    return 1;
  }
  return 0;
}
