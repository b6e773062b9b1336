// The safetensors reader: any bytes are read or refused with an error naming the file.
#include "fuzz_common.hpp"

#include <diffusion/weights.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = fuzz::write_input(data, size, ".safetensors");
  try {
    std::map<std::string, std::string> metadata;
    for (const auto& [name, tensor] : diffusion::load_safetensors(path, &metadata)) (void)tensor.numel();
  } catch (const c10::Error&) {
  }
  return 0;
}
