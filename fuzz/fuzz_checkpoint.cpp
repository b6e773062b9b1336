// The checkpoint reader: any bytes are read (info, then the weights) or refused with one error naming the
// file. A format-2 file carries a SHA-1 of its contents, so a mutation would almost always end at the
// checksum; inputs whose last byte is odd (a digit of the checksum they carry, replaced anyway) are
// therefore resealed (their checksum recomputed) before they are read, which sends the mutations into the zip, the JSON config, the registry and the tensor reader
// behind it, as a file written by a buggy or hostile program would. The format-1 seed has no checksum.
#include "fuzz_common.hpp"

#include <diffusion/backbones/conv_net.hpp>
#include <diffusion/checkpoint.hpp>

namespace {

/// `bytes` with the checksum in its zip comment replaced by the one its contents have now.
std::string reseal(std::string bytes) {
  using namespace diffusion::detail;
  const auto end = find_zip_end(bytes);
  if (!end) return bytes;
  const std::string comment = std::string(checksum_tag) + archive_digest(bytes, *end);
  bytes.resize(*end + zip_end_record);
  bytes[*end + 20] = static_cast<char>(comment.size() & 0xFF);
  bytes[*end + 21] = static_cast<char>(comment.size() >> 8);
  return bytes + comment;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string input(reinterpret_cast<const char*>(data), size);
  if (size > 0 && (data[size - 1] & 1)) input = reseal(std::move(input));
  const auto path = fuzz::write_input(reinterpret_cast<const uint8_t*>(input.data()), input.size(), ".pt");
  try {
    const auto info = diffusion::read_checkpoint_info(path);
    if (info.backbone) {
      (void)diffusion::load_model(path);  // the architecture from the file itself
    } else {
      diffusion::ConvNet model(diffusion::ConvNetOptions().widths({8}).time_dim(8));  // the format-1 seed's
      diffusion::load_weights(path, model);
    }
  } catch (const c10::Error&) {
  }
  return 0;
}
