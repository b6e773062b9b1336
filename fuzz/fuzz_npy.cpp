// The .npy reader and load_tensor_file on it: any bytes are read or refused with an error naming the file.
#include "fuzz_common.hpp"

#include <diffusion/data/tensor_file.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = fuzz::write_input(data, size, ".npy");
  try {
    (void)diffusion::data::load_npy(path).sum();
  } catch (const c10::Error&) {
  }
  try {
    (void)diffusion::data::load_tensor_file(path).examples.sum();
  } catch (const c10::Error&) {
  }
  return 0;
}
