#pragma once

#include <diffusion/precision.hpp>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/core/InferenceMode.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

/// The platform LibTorch runs on: what the CPU is, and whether its convolutions compute what they should.
///
/// Some machines' LibTorch computes wrong CPU convolutions through oneDNN (LibTorch 2.6 with oneDNN 3.7 on
/// some AMD Zen 5 machines: non-finite input gradients at 2 threads, a 35% error in bf16 for one output
/// channel; docs/platforms.md). The library checks once per process, the first time one of its
/// convolutional backbones, the Trainer or a sampler runs on the CPU, and on a faulty platform turns oneDNN
/// off for the whole process, so that a user's own backbone is protected as well.
namespace diffusion {

/// Whether this CPU has bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16), read once from
/// /proc/cpuinfo's flags; false where that file does not exist. With them oneDNN runs bf16 convolutions
/// and matrix products several times faster than float32; without them bf16 is emulated and slower.
inline bool cpu_has_fast_bf16() {
  static const bool has = [] {
    std::ifstream in("/proc/cpuinfo");
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("flags", 0) != 0) continue;
      line += ' ';
      return line.find(" amx_bf16 ") != std::string::npos || line.find(" avx512_bf16 ") != std::string::npos;
    }
    return false;
  }();
  return has;
}

/// The CPU as /proc/cpuinfo names it, with its family and model numbers ("AMD EPYC (family 26, model 2)"),
/// or "unknown CPU" where that file does not exist. Zen 4 is AMD family 25, Zen 5 family 26.
inline std::string cpu_description() {
  static const std::string text = [] {
    std::ifstream in("/proc/cpuinfo");
    std::string name, family, model;
    const auto value = [](const std::string& line) {
      const auto colon = line.find(':');
      auto v = colon == std::string::npos ? std::string() : line.substr(colon + 1);
      v.erase(0, v.find_first_not_of(" \t"));
      return v;
    };
    for (std::string line; std::getline(in, line) && !line.empty();) {
      if (line.rfind("model name", 0) == 0) name = value(line);
      else if (line.rfind("cpu family", 0) == 0) family = value(line);
      else if (line.rfind("model", 0) == 0 && line.rfind("model name", 0) != 0) model = value(line);
    }
    if (name.empty()) return std::string("unknown CPU");
    return family.empty() ? name : name + " (family " + family + ", model " + model + ")";
  }();
  return text;
}

/// The oneDNN (MKL-DNN) version LibTorch was built with ("3.7.2"), from at::show_config(); empty when
/// this LibTorch has none.
inline std::string onednn_version() {
  static const std::string version = [] {
    const auto config = at::show_config();
    for (const std::string_view key : {"MKL-DNN v", "oneDNN v"}) {
      const auto at = config.find(key);
      if (at == std::string::npos) continue;
      const auto start = at + key.size();
      return config.substr(start, config.find_first_of(" \n", start) - start);
    }
    return std::string();
  }();
  return version;
}

/// What the CPU convolution self-check found (check_cpu_convolutions).
struct ConvolutionCheck {
  /// False when the check was turned off (DIFFUSION_CPU_CONV_CHECK=off).
  bool ran = false;
  /// Every case agreed with its float64 reference (true too when the check did not run).
  bool healthy = true;
  /// The first case that did not, e.g. "fp32 input gradient of a 3x3 convolution 16x32x28x28 -> 1
  /// channel at 2 threads: not finite"; empty when healthy.
  std::string fault;
  /// oneDNN was turned off for the process: a fault was found, or DIFFUSION_CPU_CONV_CHECK=force.
  bool onednn_disabled = false;
  /// With oneDNN off, the cases were run again and agreed (false: still wrong, and nothing is left to turn off).
  bool fixed = true;
  /// The thread counts the cases ran at.
  std::vector<int> threads;
  /// Seconds the check took, the rerun after the workaround included.
  double seconds = 0;

  /// One line for logs: "CPU convolutions: healthy (checked at 1 and 2 threads in 12 ms)", "... oneDNN
  /// turned off: <fault>", "... not checked (DIFFUSION_CPU_CONV_CHECK=off)".
  std::string summary() const {
    if (!ran) return "CPU convolutions: not checked (DIFFUSION_CPU_CONV_CHECK=off)";
    const auto checked = fmt::format("checked at {} thread{} in {:.0f} ms", fmt::join(threads, " and "),
                                     threads.size() == 1 && threads[0] == 1 ? "" : "s", seconds * 1000);
    if (healthy && !onednn_disabled) return "CPU convolutions: healthy (" + checked + ")";
    if (healthy) return "CPU convolutions: healthy, oneDNN turned off as DIFFUSION_CPU_CONV_CHECK=force asks (" + checked + ")";
    return std::string("CPU convolutions: oneDNN turned off, ") + (fixed ? "now correct" : "STILL WRONG") + " (" +
           checked + "): " + fault;
  }
};

/// What check_cpu_convolutions does, from the environment variable DIFFUSION_CPU_CONV_CHECK.
enum class ConvolutionCheckMode {
  /// Unset, empty or "auto": check, and turn oneDNN off only if a case is wrong.
  Auto,
  /// "off": no check; oneDNN stays as LibTorch set it.
  Off,
  /// "force": check, and turn oneDNN off whatever the result (to measure or test the workaround).
  Force,
};

/// DIFFUSION_CPU_CONV_CHECK read as a mode; another value is refused, naming the accepted ones.
inline ConvolutionCheckMode convolution_check_mode_from_env() {
  const char* raw = std::getenv("DIFFUSION_CPU_CONV_CHECK");
  const std::string v = raw ? raw : "";
  if (v.empty() || v == "auto") return ConvolutionCheckMode::Auto;
  if (v == "off") return ConvolutionCheckMode::Off;
  if (v == "force") return ConvolutionCheckMode::Force;
  TORCH_CHECK(false, "DIFFUSION_CPU_CONV_CHECK: expected auto, off or force, got \"", v, "\"");
  return ConvolutionCheckMode::Auto;  // not reached
}

namespace detail {

/// A 2-D convolution with padding (kernel - 1) / 2 and stride 1: (N, C, H, W) x (O, C, k, k) + (O) -> (N, O, H, W).
/// The self-check runs its cases through one, so that a test can hand it a faulty one.
using Convolution = std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>;

inline torch::Tensor libtorch_convolution(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  return torch::conv2d(x, w, b, /*stride=*/1, /*padding=*/(w.size(2) - 1) / 2);
}

/// One case of the self-check: a batch of N images of `in` channels at size x size, into `out` channels.
struct ConvolutionCase {
  int64_t batch, in, out, size, kernel;
  bool bf16;  // the forward pass in bfloat16 (as autocast runs it) instead of float32 forward and backward
};

/// The cases: the shapes of an image network's last convolution (few output channels), where LibTorch 2.6's
/// oneDNN 3.7 was seen to fail on AMD Zen 5 (docs/platforms.md); the first and the last are the ones reported.
inline const std::vector<ConvolutionCase>& convolution_cases() {
  static const std::vector<ConvolutionCase> cases = {
      {16, 32, 1, 28, 3, false}, {8, 16, 1, 28, 3, false}, {8, 32, 3, 28, 3, false}, {8, 64, 1, 28, 3, true}};
  return cases;
}

/// Sets LibTorch's intra-op threads for its lifetime and restores them.
class ThreadsGuard {
 public:
  explicit ThreadsGuard(int threads) : before_(at::get_num_threads()) {
    if (threads != before_) at::set_num_threads(threads);
  }
  ~ThreadsGuard() {
    if (at::get_num_threads() != before_) at::set_num_threads(before_);
  }
  ThreadsGuard(const ThreadsGuard&) = delete;
  ThreadsGuard& operator=(const ThreadsGuard&) = delete;

 private:
  int before_;
};

/// Relative error of `got` against `want` in Frobenius norm, or nullopt when `got` is not finite.
inline std::optional<double> relative_error(const torch::Tensor& got, const torch::Tensor& want) {
  const auto g = got.to(torch::kFloat64);
  if (!torch::isfinite(g).all().item<bool>()) return std::nullopt;
  return ((g - want).norm() / want.norm().clamp_min(1e-30)).item<double>();
}

/// Turns oneDNN off for the whole process (what torch.backends.mkldnn.enabled = False does): LibTorch's
/// own convolution kernels run instead, and bf16 matrix products no longer go through oneDNN.
inline void set_onednn_enabled(bool on) { at::globalContext().setUserEnabledMkldnn(on); }
inline bool onednn_enabled() { return at::globalContext().userEnabledMkldnn(); }

/// Whether bf16 convolutions are a fast path here, and so checked: the CPU has bf16 instructions and oneDNN
/// is on (LibTorch's own bf16 kernels are many times slower than float32, and 1.13's accumulate in bf16).
inline bool bf16_convolutions_in_use() { return cpu_has_fast_bf16() && onednn_enabled(); }

/// Runs every case of convolution_cases() through `conv` at each of `threads` (the bf16 ones only where
/// `bf16` is true) and compares it with a float64 convolution of the same inputs (which LibTorch computes
/// with its own kernels, never oneDNN). Returns the first disagreement, described, or nullopt when all
/// agree: float32 within 1e-4 (rounding gives about 2e-7), bf16 within 1e-2 (rounding the output to 8
/// significant bits gives at most 2^-9). Independent of the caller's autocast, grad and inference modes,
/// and draws from its own generator.
inline std::optional<std::string> find_convolution_fault(const Convolution& conv, const std::vector<int>& threads,
                                                        bool bf16 = bf16_convolutions_in_use()) {
  c10::InferenceMode not_inference(false);
  torch::AutoGradMode grad(true);
  AutocastGuard no_autocast(Precision::Float32, torch::kCPU);
  auto gen = at::detail::createCPUGenerator(20260412);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  struct Prepared {
    ConvolutionCase c;
    torch::Tensor x, w, b, gy, y, dx, dw;  // inputs, output gradient, float64 reference
  };
  std::vector<Prepared> cases;
  {  // the references, at every core: one switch of the thread count per phase, not per case
    ThreadsGuard all_cores(threads.empty() ? at::get_num_threads() : *std::max_element(threads.begin(), threads.end()));
    for (const auto& c : convolution_cases()) {
      if (c.bf16 && !bf16) continue;
      Prepared p{c};
      p.x = torch::randn({c.batch, c.in, c.size, c.size}, gen, f32);
      p.w = torch::randn({c.out, c.in, c.kernel, c.kernel}, gen, f32) / std::sqrt(static_cast<double>(c.in * c.kernel * c.kernel));
      p.b = torch::randn({c.out}, gen, f32);
      if (c.bf16) {  // the reference sees the same rounded inputs, so only the arithmetic is compared
        for (auto* t : {&p.x, &p.w, &p.b}) *t = t->to(torch::kBFloat16).to(torch::kFloat32);
      }
      const auto xd = p.x.to(torch::kFloat64).requires_grad_(!c.bf16), wd = p.w.to(torch::kFloat64).requires_grad_(!c.bf16);
      p.y = libtorch_convolution(xd, wd, p.b.to(torch::kFloat64));
      if (!c.bf16) {
        p.gy = torch::randn(p.y.sizes(), gen, f32);
        p.y.backward(p.gy.to(torch::kFloat64));
        p.dx = xd.grad();
        p.dw = wd.grad();
      }
      p.y = p.y.detach();
      cases.push_back(std::move(p));
    }
  }
  for (const int n : threads) {
    ThreadsGuard at_n(n);
    for (const auto& p : cases) {
      const auto& c = p.c;
      const auto judge = [&](const char* what, const torch::Tensor& got, const torch::Tensor& want,
                             double bound) -> std::optional<std::string> {
        const auto err = relative_error(got, want);
        if (err && *err <= bound) return std::nullopt;
        const auto verdict = err ? fmt::format("off by {:.3g}% (relative norm against float64; at most {:g}% expected)",
                                               *err * 100, bound * 100)
                                 : std::string("not finite (NaN or inf)");
        return fmt::format("{} {} of a {}x{} convolution {}x{}x{}x{} -> {} channel{} at {} thread{}: {}",
                           c.bf16 ? "bf16" : "fp32", what, c.kernel, c.kernel, c.batch, c.in, c.size, c.size, c.out,
                           c.out == 1 ? "" : "s", n, n == 1 ? "" : "s", verdict);
      };
      if (c.bf16) {
        torch::NoGradGuard no_grad;
        const auto y = conv(p.x.to(torch::kBFloat16), p.w.to(torch::kBFloat16), p.b.to(torch::kBFloat16));
        if (auto fault = judge("forward", y, p.y, 1e-2)) return fault;
        continue;
      }
      const auto xf = p.x.clone().requires_grad_(), wf = p.w.clone().requires_grad_();
      const auto y = conv(xf, wf, p.b);
      y.backward(p.gy);
      if (auto fault = judge("forward", y, p.y, 1e-4)) return fault;
      if (auto fault = judge("input gradient", xf.grad(), p.dx, 1e-4)) return fault;
      if (auto fault = judge("weight gradient", wf.grad(), p.dw, 1e-4)) return fault;
    }
  }
  return std::nullopt;
}

/// The check itself, uncached, at the given thread counts: runs the cases through `conv`, turns oneDNN off
/// when one fails (or when `mode` is Force) and runs them again to see whether that helped.
inline ConvolutionCheck run_convolution_check(ConvolutionCheckMode mode, const Convolution& conv = libtorch_convolution,
                                              std::vector<int> threads = {at::get_num_threads()}) {
  ConvolutionCheck result;
  if (mode == ConvolutionCheckMode::Off) return result;
  const auto start = std::chrono::steady_clock::now();
  result.ran = true;
  result.threads = std::move(threads);
  if (auto fault = find_convolution_fault(conv, result.threads)) {
    result.healthy = false;
    result.fault = *fault;
  }
  if (!result.healthy || mode == ConvolutionCheckMode::Force) {
    set_onednn_enabled(false);
    result.onednn_disabled = true;
    if (!result.healthy) result.fixed = !find_convolution_fault(conv, result.threads).has_value();
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

/// The platform in one line: "AMD EPYC (family 26, model 2), LibTorch 2.6.0, oneDNN 3.7.2".
inline std::string platform_description() {
  const auto dnnl = onednn_version();
  return cpu_description() + ", LibTorch " + TORCH_VERSION + (dnnl.empty() ? std::string() : ", oneDNN " + dnnl);
}

/// What is printed once on stderr when the check turned oneDNN off.
inline std::string convolution_check_report(const ConvolutionCheck& c) {
  if (!c.onednn_disabled) return {};
  if (c.healthy) {
    return "diffusion: oneDNN is off for this process, as DIFFUSION_CPU_CONV_CHECK=force asks (" + platform_description() +
           "); convolutions run LibTorch's own kernels\n";
  }
  return "diffusion: this platform computes wrong CPU convolutions through oneDNN (" + platform_description() + "):\n  " +
         c.fault + ".\n" +
         (c.fixed ? "  oneDNN is now off for this process (as torch.backends.mkldnn.enabled = False): convolutions run "
                    "LibTorch's own float32 kernels, which agree with the reference. \"auto\" precision is now float32 "
                    "(bf16 without oneDNN is many times slower).\n"
                  : "  Turning oneDNN off did not fix it: results on this CPU are wrong. Use another machine or LibTorch.\n") +
         "  See docs/platforms.md; DIFFUSION_CPU_CONV_CHECK=off skips this check.\n";
}

}  // namespace detail

namespace detail {

/// The process's check: what was found so far, and the thread count last checked (the fast path).
struct ProcessConvolutionCheck {
  std::mutex mutex;
  std::optional<ConvolutionCheckMode> mode;
  ConvolutionCheck result;
  std::atomic<int> last_threads{0};
};
inline ProcessConvolutionCheck& process_convolution_check() {
  static ProcessConvolutionCheck state;
  return state;
}

/// Checks at the current thread count unless that count was checked already: a load and a compare after that.
inline void ensure_cpu_convolutions_checked() {
  auto& s = process_convolution_check();
  const int n = at::get_num_threads();
  if (s.last_threads.load(std::memory_order_acquire) == n) return;
  std::lock_guard<std::mutex> lock(s.mutex);
  auto& r = s.result;
  if (std::find(r.threads.begin(), r.threads.end(), n) == r.threads.end()) {
    if (!s.mode) s.mode = convolution_check_mode_from_env();  // a bad value throws, and the next call reads it again
    if (*s.mode != ConvolutionCheckMode::Off) {
      const bool first = r.threads.empty();
      auto found = run_convolution_check(r.onednn_disabled ? ConvolutionCheckMode::Auto : *s.mode, libtorch_convolution, {n});
      if (r.onednn_disabled) {
        // Already worked around: this count only says whether the workaround holds here too.
        if (!found.healthy) r.fixed = false;
      } else if (!found.healthy || (first && found.onednn_disabled)) {
        r.healthy = found.healthy;
        r.fault = found.fault;
        r.fixed = found.fixed;
        r.onednn_disabled = true;
        std::cerr << convolution_check_report(r) << std::flush;
      }
      r.ran = true;
      r.seconds += found.seconds;
    }
    r.threads.insert(std::upper_bound(r.threads.begin(), r.threads.end(), n), n);
  }
  s.last_threads.store(n, std::memory_order_release);
}

/// Runs the check the first time a convolution is about to run on the CPU (x on the CPU) at this thread count.
inline void check_cpu_convolutions_for(const torch::Tensor& x) {
  if (x.defined() && x.device().is_cpu()) ensure_cpu_convolutions_checked();
}

}  // namespace detail

/// Checks that LibTorch's CPU convolutions agree with a float64 reference computed without oneDNN, once per
/// process and thread count: float32 forward, input and weight gradients, and the bf16 forward where bf16 is
/// a fast path (bf16 instructions, oneDNN on), on the small shapes of a network's last layer
/// (convolution_cases: 3x3, 28x28, 1 or 3 output channels; tens of milliseconds on 2 cores). Where one
/// disagrees, oneDNN is turned off for the whole process, the cases run again, and the reason is printed
/// once on stderr. UNet, ConvNet and LeNet's forward, Trainer::fit and sample call it on the CPU, so a
/// user's own backbone is covered when it trains or samples through the library; a program that runs its
/// own convolutions first may call it itself. Returns what was found at every thread count so far.
/// DIFFUSION_CPU_CONV_CHECK=off skips it, =force turns oneDNN off whatever it finds; another value is
/// refused (an exception; the next call reads the variable again).
inline ConvolutionCheck check_cpu_convolutions() {
  detail::ensure_cpu_convolutions_checked();
  auto& s = detail::process_convolution_check();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.result;
}

}  // namespace diffusion
