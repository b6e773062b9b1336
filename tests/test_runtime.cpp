// Where and how a program runs: threads, devices, precision choice, stop requests.
#include "helpers.hpp"


TEST_CASE("auto precision is bf16 only on a CPU with bf16 instructions", "[precision]") {
  CHECK(auto_precision(torch::Device(torch::kCUDA)) == Precision::Float32);
  // bf16 where the CPU has bf16 instructions and oneDNN runs them (the self-check may have turned it off).
  const auto p = auto_precision(torch::kCPU);
  CHECK(p == (cpu_has_fast_bf16() && diffusion::detail::onednn_enabled() ? Precision::BFloat16 : Precision::Float32));
}
TEST_CASE("set_threads sets the intra-op threads, every core at 0", "[trainer]") {
  const int before = at::get_num_threads();
  set_threads(1);
  CHECK(at::get_num_threads() == 1);
  set_threads(0);
  CHECK(at::get_num_threads() == static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  CHECK_REFUSED(set_threads(-1), "set_threads: threads must be >= 0 (0 = all cores), got -1");
  at::set_num_threads(before);
}

