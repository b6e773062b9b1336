// The idx reader (plain, and gzipped when the input is a gzip stream): any bytes are read or refused with
// an error naming the file; nothing else may happen.
#include "fuzz_common.hpp"

#include <diffusion/data/mnist.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = fuzz::write_input(data, size);
  try {
    const auto t = diffusion::data::read_idx(path);
    if (t.numel() > 0) (void)t.sum().item<int64_t>();  // the data is really there
  } catch (const c10::Error&) {
  }
  return 0;
}
