// The platform: CPU facts and the self-check of LibTorch's CPU convolutions, with faulty convolutions made
// to order (no machine at hand computes them wrong, so the check is proven on these).
#include "helpers.hpp"

namespace {

/// Restores oneDNN's process-wide switch as it was found.
struct OneDnnRestore {
  bool was = diffusion::detail::onednn_enabled();
  ~OneDnnRestore() { diffusion::detail::set_onednn_enabled(was); }
};

/// Always right, whatever this machine's oneDNN does (float64, never oneDNN), in the input's dtype: what the
/// faults below are built on, so that a real fault of the machine cannot mix into the made ones.
torch::Tensor exact_convolution(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const auto d = torch::kFloat64;
  return diffusion::detail::libtorch_convolution(x.to(d), w.to(d), b.to(d)).to(x.scalar_type());
}

/// The fault seen on some AMD Zen 5 machines: the input gradient of a convolution into one channel is not
/// finite at 2 or more threads. d/dx sqrt(0 x) = 0 / (2 sqrt(0)) = NaN, while the forward adds exactly 0.
torch::Tensor nan_input_gradient(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  auto y = exact_convolution(x, w, b);
  if (w.size(0) == 1 && at::get_num_threads() >= 2 && x.requires_grad()) y = y + (x * 0).sqrt().sum();
  return y;
}

/// The other fault seen there: a bf16 convolution into one channel 35% off, at any thread count.
torch::Tensor bf16_off(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  auto y = exact_convolution(x, w, b);
  return x.scalar_type() == torch::kBFloat16 && w.size(0) == 1 ? y * 1.35 : y;
}

/// A weight gradient off by the sum of the output gradient in every element; the forward is exact.
torch::Tensor weight_gradient_off(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  return exact_convolution(x, w, b) + (w.sum() - w.sum().detach());
}

}  // namespace

TEST_CASE("CPU facts: the model's name and family, the oneDNN version", "[platform]") {
  CHECK_FALSE(cpu_description().empty());
  if (fs::exists("/proc/cpuinfo")) CHECK(cpu_description().find("family") != std::string::npos);
  const auto dnnl = onednn_version();
  if (!dnnl.empty()) CHECK(std::isdigit(static_cast<unsigned char>(dnnl[0])));  // "3.7.2", not "v3.7.2"
  CHECK(diffusion::detail::platform_description().find(std::string("LibTorch ") + TORCH_VERSION) != std::string::npos);
}

TEST_CASE("after the process's self-check, LibTorch's convolutions agree with the float64 reference", "[platform]") {
  // On a healthy machine nothing was changed; on a faulty one oneDNN is off and the check says it helped.
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  check_cpu_convolutions();
  at::set_num_threads(2);  // a new thread count is checked too: the float32 fault shows from 2 threads on
  const auto c = check_cpu_convolutions();
  at::set_num_threads(before);
  if (!c.ran) {
    WARN("not checked: DIFFUSION_CPU_CONV_CHECK=off");
    return;
  }
  INFO(c.summary());
  CHECK(c.fixed);
  CHECK(c.onednn_disabled == !diffusion::detail::onednn_enabled());
  CHECK(c.healthy == c.fault.empty());
  CHECK_FALSE(diffusion::detail::find_convolution_fault(diffusion::detail::libtorch_convolution, c.threads).has_value());
  CHECK(std::count(c.threads.begin(), c.threads.end(), 1) == 1);
  CHECK(std::count(c.threads.begin(), c.threads.end(), 2) == 1);
  // Called again at a thread count it checked, it does not run again.
  at::set_num_threads(2);
  CHECK(check_cpu_convolutions().seconds == c.seconds);
  at::set_num_threads(before);
}

TEST_CASE("the self-check names a non-finite input gradient at 2 threads, not at 1", "[platform][faults]") {
  CHECK_FALSE(diffusion::detail::find_convolution_fault(nan_input_gradient, {1}).has_value());
  const auto fault = diffusion::detail::find_convolution_fault(nan_input_gradient, {1, 2});
  REQUIRE(fault.has_value());
  CHECK(*fault == "fp32 input gradient of a 3x3 convolution 16x32x28x28 -> 1 channel at 2 threads: not finite (NaN or inf)");
}

TEST_CASE("the self-check names a bf16 forward 35% off, where the CPU runs bf16", "[platform][faults]") {
  // Only where bf16 is a fast path (bf16 instructions, oneDNN on) are the bf16 cases run.
  CHECK_FALSE(diffusion::detail::find_convolution_fault(bf16_off, {1}, false).has_value());
  if (!cpu_has_fast_bf16()) return;
  const auto fault = diffusion::detail::find_convolution_fault(bf16_off, {1}, true);
  REQUIRE(fault.has_value());
  const std::string head = "bf16 forward of a 3x3 convolution 8x64x28x28 -> 1 channel at 1 thread: off by ";
  const std::string tail = "% (relative norm against float64; at most 1% expected)";
  INFO(*fault);
  REQUIRE(fault->rfind(head, 0) == 0);
  REQUIRE(fault->size() > head.size() + tail.size());
  CHECK(fault->substr(fault->size() - tail.size()) == tail);
  // 35% and the output's own bf16 rounding (at most 2^-9 relative, twice).
  CHECK_THAT(std::stod(fault->substr(head.size())), WithinAbs(35, 0.5));
}

TEST_CASE("the self-check names a wrong weight gradient with an exact forward", "[platform][faults]") {
  const auto fault = diffusion::detail::find_convolution_fault(weight_gradient_off, {1});
  REQUIRE(fault.has_value());
  CHECK(fault->rfind("fp32 weight gradient of a 3x3 convolution 16x32x28x28 -> 1 channel at 1 thread: off by ", 0) == 0);
}

TEST_CASE("a fault turns oneDNN off for the process, reruns, and reports once what it found", "[platform][faults]") {
  OneDnnRestore restore;
  diffusion::detail::set_onednn_enabled(true);
  // A fault that turning oneDNN off cannot fix (it is not in oneDNN): found, oneDNN off, still wrong.
  const auto c = diffusion::detail::run_convolution_check(ConvolutionCheckMode::Auto, nan_input_gradient, {2});
  CHECK(c.ran);
  CHECK_FALSE(c.healthy);
  CHECK(c.onednn_disabled);
  CHECK_FALSE(diffusion::detail::onednn_enabled());
  CHECK_FALSE(c.fixed);
  CHECK(c.seconds > 0);
  CHECK(c.summary().find("CPU convolutions: oneDNN turned off, STILL WRONG (checked at ") == 0);
  const auto report = diffusion::detail::convolution_check_report(c);
  CHECK(report.find("computes wrong CPU convolutions through oneDNN (" + diffusion::detail::platform_description() + ")") != std::string::npos);
  CHECK(report.find(c.fault) != std::string::npos);
  CHECK(report.find("Turning oneDNN off did not fix it") != std::string::npos);
  // Auto on healthy convolutions changes nothing and reports nothing.
  diffusion::detail::set_onednn_enabled(true);
  const auto healthy = diffusion::detail::run_convolution_check(ConvolutionCheckMode::Auto);
  CHECK(healthy.healthy == healthy.fault.empty());
  if (healthy.healthy) {
    CHECK_FALSE(healthy.onednn_disabled);
    CHECK(diffusion::detail::onednn_enabled());
    CHECK(diffusion::detail::convolution_check_report(healthy).empty());
    CHECK(healthy.summary().find("CPU convolutions: healthy (checked at ") == 0);
  }
}

TEST_CASE("force turns oneDNN off whatever the check finds, and LibTorch's own kernels are then right", "[platform]") {
  OneDnnRestore restore;
  diffusion::detail::set_onednn_enabled(true);
  const auto c = diffusion::detail::run_convolution_check(ConvolutionCheckMode::Force);
  CHECK(c.onednn_disabled);
  CHECK_FALSE(diffusion::detail::onednn_enabled());
  CHECK(c.fixed);
  // The workaround's own arithmetic: every case, oneDNN off, against the float64 reference.
  CHECK_FALSE(diffusion::detail::find_convolution_fault(diffusion::detail::libtorch_convolution, c.threads).has_value());
  if (c.healthy) CHECK(diffusion::detail::convolution_check_report(c).find("as DIFFUSION_CPU_CONV_CHECK=force asks") != std::string::npos);
  // With oneDNN off, bf16 is not checked: auto precision no longer picks it (LibTorch's own bf16
  // convolutions are many times slower than float32).
  CHECK_FALSE(diffusion::detail::bf16_convolutions_in_use());
  // Off: nothing runs, nothing changes.
  diffusion::detail::set_onednn_enabled(true);
  const auto off = diffusion::detail::run_convolution_check(ConvolutionCheckMode::Off);
  CHECK_FALSE(off.ran);
  CHECK(off.healthy);
  CHECK(diffusion::detail::onednn_enabled());
  CHECK(off.summary() == "CPU convolutions: not checked (DIFFUSION_CPU_CONV_CHECK=off)");
}

TEST_CASE("the self-check leaves threads, the global generator, grad mode and autocast as it found them", "[platform]") {
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  torch::manual_seed(5);
  const auto expected = torch::randn({4});
  torch::manual_seed(5);
  {
    torch::NoGradGuard no_grad;
    AutocastGuard amp(Precision::BFloat16, torch::kCPU);
    CHECK_FALSE(diffusion::detail::find_convolution_fault(exact_convolution, {1, 2}).has_value());
    CHECK_FALSE(torch::GradMode::is_enabled());
    CHECK(diffusion::detail::autocast_enabled(c10::DeviceType::CPU));
  }
  {
    c10::InferenceMode inference;  // sampling code may run the first forward in inference mode
    CHECK_FALSE(diffusion::detail::find_convolution_fault(exact_convolution, {1}).has_value());
  }
  CHECK(at::get_num_threads() == 1);
  CHECK(torch::equal(torch::randn({4}), expected));
  at::set_num_threads(before);
}

TEST_CASE("DIFFUSION_CPU_CONV_CHECK reads auto, off and force, and refuses anything else", "[platform][errors]") {
  const char* raw = std::getenv("DIFFUSION_CPU_CONV_CHECK");
  const std::optional<std::string> saved = raw ? std::optional<std::string>(raw) : std::nullopt;
  const auto mode_for = [](const char* v) {
    ::setenv("DIFFUSION_CPU_CONV_CHECK", v, 1);
    return convolution_check_mode_from_env();
  };
  CHECK(mode_for("") == ConvolutionCheckMode::Auto);
  CHECK(mode_for("auto") == ConvolutionCheckMode::Auto);
  CHECK(mode_for("off") == ConvolutionCheckMode::Off);
  CHECK(mode_for("force") == ConvolutionCheckMode::Force);
  CHECK_REFUSED(mode_for("0"), "DIFFUSION_CPU_CONV_CHECK: expected auto, off or force, got \"0\"");
  ::unsetenv("DIFFUSION_CPU_CONV_CHECK");
  CHECK(convolution_check_mode_from_env() == ConvolutionCheckMode::Auto);
  if (saved) ::setenv("DIFFUSION_CPU_CONV_CHECK", saved->c_str(), 1);
}

TEST_CASE("the NaN guard's message names both causes and what the self-check found", "[platform][trainer][faults]") {
  const auto cpu = diffusion::detail::nonfinite_causes(true);
  CHECK(cpu.find("Either the run diverged (lower the learning rate, clip gradients (grad_clip), or allow skipping a few "
                 "such steps (skip_nonfinite)) or the platform computes wrong results: ") == 0);
  const auto c = check_cpu_convolutions();
  if (!c.ran) CHECK(cpu.find("self-check was turned off") != std::string::npos);
  else if (c.healthy) CHECK(cpu.find("passed the library's self-check") != std::string::npos);
  else CHECK(cpu.find(c.fault) != std::string::npos);
  CHECK(diffusion::detail::nonfinite_causes(false).find("a wrong kernel in the device's libraries") != std::string::npos);
}
