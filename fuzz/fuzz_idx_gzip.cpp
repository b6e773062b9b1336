// The idx reader through zlib: each input is gzipped before it is read, so the fuzzer explores the idx
// parser behind the decompression (and zlib's handling of what it wrote).
#include "fuzz_common.hpp"

#include <diffusion/data/mnist.hpp>

#include <zlib.h>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = fuzz::write_input(nullptr, 0, ".gz");
  gzFile f = gzopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  if (size > 0) gzwrite(f, data, static_cast<unsigned>(size));
  gzclose(f);
  try {
    (void)diffusion::data::read_idx(path);
  } catch (const c10::Error&) {
  }
  return 0;
}
