// Where and how a program runs: threads, devices, precision choice, stop requests.
#include "helpers.hpp"

#include <cstdint>
#if defined(__GLIBC__)
#include <malloc.h>
// glibc's own malloc with mallinfo2 (2.33 and later), 64-bit, no sanitizer's allocator in its place.
#if __GLIBC_PREREQ(2, 33) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && UINTPTR_MAX > 0xFFFFFFFFu
#define DIFFUSION_TEST_GLIBC_MALLINFO2 1
#endif
#endif
#ifndef DIFFUSION_TEST_GLIBC_MALLINFO2
#define DIFFUSION_TEST_GLIBC_MALLINFO2 0
#endif

#include <cstdlib>
#include <cstring>


TEST_CASE("auto precision is bf16 only on a CPU with bf16 instructions", "[precision]") {
  CHECK(auto_precision(torch::Device(torch::kCUDA)) == Precision::Float32);
  // bf16 where the CPU has bf16 instructions and oneDNN runs them (the self-check may have turned it off).
  const auto p = auto_precision(torch::kCPU);
  CHECK(p == (cpu_has_fast_bf16() && diffusion::detail::onednn_enabled() ? Precision::BFloat16 : Precision::Float32));
}
TEST_CASE("reuse_freed_memory keeps a freed block in the heap for the next allocation instead of unmapping it", "[runtime]") {
  CHECK_REFUSED(reuse_freed_memory(0), "reuse_freed_memory: mmap_threshold must be in (0, 32 MiB] (glibc's limit), got 0");
  CHECK_REFUSED(reuse_freed_memory((int64_t{32} << 20) + 1), "reuse_freed_memory: mmap_threshold must be in (0, 32 MiB]");
  CHECK_REFUSED(reuse_freed_memory(1 << 20, 0), "reuse_freed_memory: trim_threshold must be in (0, 2^31), got 0");
  CHECK_REFUSED(reuse_freed_memory(1 << 20, int64_t{1} << 31), "reuse_freed_memory: trim_threshold must be in (0, 2^31), got 2147483648");
  CHECK_REFUSED(reuse_freed_memory(-1), "reuse_freed_memory: mmap_threshold must be in (0, 32 MiB] (glibc's limit), got -1");
#if DIFFUSION_TEST_GLIBC_MALLINFO2
  // With glibc's defaults (each test case runs in a fresh process, whose threshold starts at 128 KiB) a
  // 24 MiB block is mapped on its own and unmapped on free, so its pages fault in again at every use
  // (6,144 faults each time, measured in docs/performance.md). Afterwards it comes from the heap and stays.
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") || std::getenv("MALLOC_TRIM_THRESHOLD_") || std::getenv("GLIBC_TUNABLES")) {
    WARN("glibc's malloc thresholds come from this environment: reuse_freed_memory leaves them alone");
    return;
  }
  REQUIRE(reuse_freed_memory());
  constexpr size_t n = size_t{24} << 20;
  const auto before = mallinfo2();
  auto* p = static_cast<char*>(std::malloc(n));
  REQUIRE(p != nullptr);
  std::memset(p, 1, n);
  asm volatile("" : : "r"(p) : "memory");  // the writes must happen
  const auto held = mallinfo2();
  CHECK(held.hblkhd == before.hblkhd);        // not a mapping of its own
  CHECK(held.uordblks >= before.uordblks + n);  // but heap memory in use
  CHECK(held.arena >= n);
  std::free(p);
  const auto after = mallinfo2();
  CHECK(after.arena == held.arena);               // the heap was not trimmed back
  CHECK(after.fordblks >= held.fordblks + n);     // the block is free in it, for the next allocation
#else
  // An older glibc (no mallinfo2), a 32-bit one, or a sanitizer's allocator (which takes the settings or
  // not): only that the call returns is checked.
  WARN("not glibc's malloc here (or a sanitizer's): reuse_freed_memory returned " << reuse_freed_memory());
#endif
}

TEST_CASE("reuse_freed_memory leaves glibc's thresholds to the environment where it sets them", "[runtime]") {
  for (const char* name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}) {
    if (std::getenv(name)) continue;  // set by whoever runs the tests: it wins anyway
    ::setenv(name, "65536", 1);
    CHECK_FALSE(reuse_freed_memory());
    ::unsetenv(name);
  }
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  const std::string saved = tunables ? tunables : "";
  ::setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=65536", 1);
  CHECK_FALSE(reuse_freed_memory());
  if (tunables) ::setenv("GLIBC_TUNABLES", saved.c_str(), 1);
  else ::unsetenv("GLIBC_TUNABLES");
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

