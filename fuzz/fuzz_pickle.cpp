// The hand-written pickle rewrite behind load_torch_state_dict: any bytes are rewritten or refused; what
// it returns is a pickle it can walk again (the rewrite is idempotent on its own output).
#include "fuzz_common.hpp"

#include <diffusion/detail/pickle.hpp>

#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  try {
    const auto once = diffusion::detail::rewrite_ordered_dicts(input, "input");
    const auto twice = diffusion::detail::rewrite_ordered_dicts(once, "rewritten");
    if (twice != once) std::abort();  // a second pass must find nothing left to rewrite
  } catch (const c10::Error&) {
  }
  return 0;
}
