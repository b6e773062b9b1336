#pragma once

#include <diffusion/platform.hpp>
#include <diffusion/precision.hpp>

#include <torch/torch.h>

#include <csignal>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>

/// Where and how a program runs: the device, the CPU threads and the backbone's arithmetic. The library
/// never changes these by itself; a program chooses them once, here.
namespace diffusion {

/// CUDA when this LibTorch has it and a GPU is present, else the CPU.
inline torch::Device auto_device() { return torch::cuda::is_available() ? torch::kCUDA : torch::kCPU; }

/// "auto" (auto_device), or any device LibTorch parses ("cpu", "cuda", "cuda:1"). A CUDA device on a
/// LibTorch or machine without one is refused.
inline torch::Device parse_device(std::string_view s) {
  if (s == "auto") return auto_device();
  std::optional<torch::Device> device;
  try {
    device = torch::Device(std::string(s));
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "parse_device: expected auto, cpu, cuda or cuda:N, got \"", std::string(s), "\"");
  }
  TORCH_CHECK(!device->is_cuda() || torch::cuda::is_available(), "parse_device: ", device->str(),
              " requested but this LibTorch sees no CUDA device");
  return *device;
}

/// Sets LibTorch's CPU intra-op threads to `threads`, or to every core when 0: Debian's LibTorch starts
/// with one, and a program that does not call this trains and samples on a single core.
inline void set_threads(int64_t threads = 0) {
  TORCH_CHECK(threads >= 0, "set_threads: threads must be >= 0 (0 = all cores), got ", threads);
  at::set_num_threads(
      static_cast<int>(threads > 0 ? threads : std::max<int64_t>(1, std::thread::hardware_concurrency())));
}

/// Makes glibc's malloc keep the memory LibTorch frees for reuse instead of handing it back to the kernel,
/// for the rest of the process: training steps stop page-faulting their activations in again.
///
/// LibTorch's CPU allocator frees every intermediate tensor at once. With glibc's defaults a block above
/// the mmap threshold (128 KiB at first) gets a mapping of its own and is unmapped on free, and the top of
/// the heap is given back once more than the trim threshold (128 KiB at first) lies free; glibc raises
/// both as it sees large blocks freed, so where they settle differs from run to run, and in the costly
/// state each step pays a page fault per 4 KiB of its activations (docs/performance.md). This fixes the
/// mmap threshold at `mmap_threshold` bytes (32 MiB, glibc's largest on 64-bit, by default: blocks up to
/// it come from the heap and are reused) and the trim threshold at `trim_threshold` (1 GiB: up to that
/// much freed memory stays with the process), which also turns glibc's adjustment off. Blocks above the
/// mmap threshold are still mapped per use. The cost is memory: the resident size stays near its peak.
/// The same as MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ in the environment; where either of
/// those (or a malloc threshold in GLIBC_TUNABLES) is set, the environment wins and this changes nothing.
///
/// Returns whether glibc took both settings: false where the environment set them, on another C library,
/// or where glibc refuses a value, as a 32-bit one does above 512 KiB (if the trim threshold is refused
/// after the mmap threshold was taken, the latter stays); a sanitizer's allocator may ignore them. The library never
/// calls it; a program calls it once at start, as the bundled ones do. Refused: an mmap threshold outside
/// (0, 32 MiB], a trim threshold outside (0, 2^31).
///
/// Example:
///   int main() {
///     diffusion::set_threads();
///     diffusion::reuse_freed_memory();
///     ...
///   }
inline bool reuse_freed_memory(int64_t mmap_threshold = int64_t{32} << 20, int64_t trim_threshold = int64_t{1} << 30) {
  TORCH_CHECK(mmap_threshold > 0 && mmap_threshold <= (int64_t{32} << 20),
              "reuse_freed_memory: mmap_threshold must be in (0, 32 MiB] (glibc's limit), got ", mmap_threshold);
  TORCH_CHECK(trim_threshold > 0 && trim_threshold <= std::numeric_limits<int>::max(),
              "reuse_freed_memory: trim_threshold must be in (0, 2^31), got ", trim_threshold);
#if defined(__GLIBC__)
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  const std::string_view t = tunables ? tunables : "";
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") || std::getenv("MALLOC_TRIM_THRESHOLD_") ||
      t.find("malloc.mmap_threshold") != std::string_view::npos || t.find("malloc.trim_threshold") != std::string_view::npos) {
    return false;
  }
  // Setting either turns off glibc's dynamic adjustment of both, so both are set.
  if (mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_threshold)) != 1) return false;
  return mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim_threshold)) == 1;
#else
  return false;
#endif
}

/// The faster precision for `device` where it is known to keep sample quality: BFloat16 on a CPU with
/// bf16 instructions (cpu_has_fast_bf16) whose oneDNN passed the convolution self-check
/// (check_cpu_convolutions, which this runs; without oneDNN, bf16 convolutions are slower than float32),
/// Float32 everywhere else. The library's own defaults stay Float32.
inline Precision auto_precision(const torch::Device& device) {
  if (!device.is_cpu() || !cpu_has_fast_bf16()) return Precision::Float32;
  check_cpu_convolutions();
  return detail::bf16_convolutions_in_use() ? Precision::BFloat16 : Precision::Float32;
}

/// "auto" (auto_precision for `device`), "fp32" or "bf16" (parse_precision).
inline Precision resolve_precision(std::string_view s, const torch::Device& device) {
  return s == "auto" ? auto_precision(device) : parse_precision(s);
}

namespace detail {
inline std::atomic<int>& stop_signals() {
  static std::atomic<int> count{0};
  return count;
}
inline void on_stop_signal(int signal) {
  // The first signal asks the run to stop after its current step (and save); a second one ends the
  // process at once. Only async-signal-safe calls here.
  if (stop_signals().fetch_add(1) >= 1) ::_exit(128 + signal);
}
}  // namespace detail

/// Makes SIGINT (Ctrl-C) and SIGTERM (what schedulers and `kill` send) request a stop instead of killing
/// the process: the Trainer finishes its current step, lets its hooks save the run (RunOutputs writes a
/// checkpoint) and throws TrainingInterrupted. A second signal ends the process at once (exit 128 + the
/// signal's number).
inline void install_stop_signals() {
  struct sigaction action {};
  action.sa_handler = detail::on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

/// Whether a stop was requested (by a signal after install_stop_signals, or by request_stop).
inline bool stop_requested() { return detail::stop_signals().load(std::memory_order_relaxed) > 0; }

/// Requests a stop, as the first signal does; clear_stop_request() takes it back.
inline void request_stop() { detail::stop_signals().store(1); }
inline void clear_stop_request() { detail::stop_signals().store(0); }

}  // namespace diffusion
