// The hand-written pickle walk behind load_torch_state_dict and the checkpoint reader: any bytes are
// rewritten or refused; what it returns is a pickle it can walk again (the rewrite is idempotent on its
// own output); and the check-only walk (check_pickle) refuses exactly what the rewrite refuses.
#include "fuzz_common.hpp"

#include <diffusion/detail/pickle.hpp>

#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  bool rewritten = false, checked = false;
  try {
    const auto once = diffusion::detail::rewrite_ordered_dicts(input, "input");
    rewritten = true;
    const auto twice = diffusion::detail::rewrite_ordered_dicts(once, "rewritten");
    if (twice != once) std::abort();  // a second pass must find nothing left to rewrite
  } catch (const c10::Error&) {
  }
  try {
    diffusion::detail::check_pickle(input, "input");
    checked = true;
  } catch (const c10::Error&) {
  }
  if (rewritten != checked) std::abort();  // the two walks must agree on what is a readable pickle
  return 0;
}
