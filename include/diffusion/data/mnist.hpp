#pragma once

#include <torch/torch.h>

// zlib reads gzipped idx files (Debian's Fashion-MNIST ships them so). A build without it
// (DIFFUSION_NO_ZLIB, which CMake sets when zlib is not found) reads plain files and refuses gzipped ones.
#if !defined(DIFFUSION_NO_ZLIB)
#include <zlib.h>
#endif

#include <array>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

/// MNIST-format datasets (MNIST, Fashion-MNIST) from the raw idx files, plain or gzipped.
namespace diffusion::data {

namespace detail {

/// Reads a whole file, transparently gunzipping it (zlib reads uncompressed files as they are).
inline std::vector<uint8_t> read_file(const std::filesystem::path& path) {
  TORCH_CHECK(std::filesystem::is_regular_file(path), "read_idx: ", path.string(), ": no such file");
#if defined(DIFFUSION_NO_ZLIB)
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "read_idx: ", path.string(), ": cannot open");
  std::vector<uint8_t> out((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TORCH_CHECK(out.size() < 2 || out[0] != 0x1f || out[1] != 0x8b, "read_idx: ", path.string(),
              " is gzipped but this build has no zlib (DIFFUSION_NO_ZLIB); gunzip it first");
  return out;
#else
  gzFile f = gzopen(path.string().c_str(), "rb");
  TORCH_CHECK(f != nullptr, "read_idx: ", path.string(), ": cannot open");
  std::vector<uint8_t> out;
  std::array<uint8_t, 1 << 16> buf{};
  int n = 0;
  while ((n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()))) > 0) out.insert(out.end(), buf.data(), buf.data() + n);
  int err = 0;
  const char* msg = n < 0 ? gzerror(f, &err) : nullptr;
  const std::string error = msg ? msg : "";
  gzclose(f);
  TORCH_CHECK(n >= 0, "read_idx: ", path.string(), ": read error (", error, ")");
  return out;
#endif
}

inline uint32_t big_endian(const std::vector<uint8_t>& b, size_t at) {
  return (uint32_t{b[at]} << 24) | (uint32_t{b[at + 1]} << 16) | (uint32_t{b[at + 2]} << 8) | uint32_t{b[at + 3]};
}

}  // namespace detail

/// Reads an idx file of unsigned bytes (magic 0x0000080D with D dimensions: 0x803 images, 0x801 labels)
/// into a uint8 tensor of the shape its header gives. Refuses, naming the file and the fault, a missing
/// file, a wrong magic number, a header or body shorter than the header promises, or trailing bytes.
inline torch::Tensor read_idx(const std::filesystem::path& path) {
  const auto bytes = detail::read_file(path);
  const auto name = path.string();
  TORCH_CHECK(bytes.size() >= 4, "read_idx: ", name, ": truncated: ", bytes.size(), " bytes, too short for a header");
  const uint32_t magic = detail::big_endian(bytes, 0);
  const uint32_t dims = magic & 0xFF;
  TORCH_CHECK((magic >> 8) == 0x08 && dims >= 1 && dims <= 4, "read_idx: ", name,
              ": wrong magic number 0x", c10::str(std::hex, magic),
              " (expected 0x00000801..0x00000804: unsigned bytes, 1 to 4 dimensions)");
  const size_t header = 4 + 4 * size_t{dims};
  TORCH_CHECK(bytes.size() >= header, "read_idx: ", name, ": truncated header (", bytes.size(), " of ", header, " bytes)");
  std::vector<int64_t> shape;
  size_t count = 1;
  for (uint32_t d = 0; d < dims; ++d) {
    shape.push_back(detail::big_endian(bytes, 4 + 4 * d));
    TORCH_CHECK(!__builtin_mul_overflow(count, static_cast<size_t>(shape.back()), &count), "read_idx: ", name,
                ": truncated: header promises more than 2^64 bytes of data, file has ", bytes.size() - header);
  }
  TORCH_CHECK(bytes.size() - header >= count, "read_idx: ", name, ": truncated: header promises ", count,
              " bytes of data, file has ", bytes.size() - header);
  TORCH_CHECK(bytes.size() - header == count, "read_idx: ", name, ": ", bytes.size() - header - count,
              " unexpected trailing bytes after the data");
  auto out = torch::empty(shape, torch::kUInt8);
  if (count > 0) std::memcpy(out.data_ptr<uint8_t>(), bytes.data() + header, count);
  return out;
}

/// One split of an MNIST-format dataset, in memory.
struct MnistSplit {
  /// (N, 1, H, W) float32 in [-1, 1] (H and W from the file: 28 for MNIST): x / 255 normalized with mean
  /// 0.5, std 0.5, as the seed does.
  torch::Tensor images;
  /// (N,) int64 class labels.
  torch::Tensor labels;
};

/// Which split to read.
enum class Split { Train, Test };

/// Reads `train-images-idx3-ubyte` / `train-labels-idx1-ubyte` (or the `t10k-` pair) from `dir`, each
/// plain or with a `.gz` suffix, checks they agree, and returns the images normalized to [-1, 1]. Labels
/// must lie in [0, num_classes): one outside is refused, naming the file and the first such index (a
/// label of 200 would otherwise surface much later as LibTorch's "Target 200 is out of bounds").
///
/// Example:
///   auto train = diffusion::data::load_mnist("data/mnist", Split::Train);   // 60,000 images
inline MnistSplit load_mnist(const std::filesystem::path& dir, Split split, int64_t num_classes = 10) {
  TORCH_CHECK(num_classes >= 1, "load_mnist: num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(!std::filesystem::exists(dir) || std::filesystem::is_directory(dir), "load_mnist: ", dir.string(),
              " is not a directory (give the directory that holds the four idx files)");
  const std::string prefix = split == Split::Train ? "train" : "t10k";
  const auto find = [&](const std::string& stem) {
    for (const auto& candidate : {dir / stem, dir / (stem + ".gz")}) {
      if (std::filesystem::exists(candidate)) return candidate;
    }
    TORCH_CHECK(false, "load_mnist: ", (dir / stem).string(), " (or .gz) not found; fetch the dataset first");
    return std::filesystem::path{};
  };
  const auto images_path = find(prefix + "-images-idx3-ubyte");
  const auto labels_path = find(prefix + "-labels-idx1-ubyte");
  const auto images = read_idx(images_path);
  const auto labels = read_idx(labels_path);
  TORCH_CHECK(images.dim() == 3, "load_mnist: ", images_path.string(), ": expected 3 dimensions (N, H, W), got ",
              images.dim());
  TORCH_CHECK(labels.dim() == 1, "load_mnist: ", labels_path.string(), ": expected 1 dimension (N), got ", labels.dim());
  TORCH_CHECK(images.size(0) == labels.size(0), "load_mnist: ", images_path.string(), " has ", images.size(0),
              " images but ", labels_path.string(), " has ", labels.size(0), " labels");
  const auto out_of_range = labels.to(torch::kLong).ge(num_classes).nonzero();
  TORCH_CHECK(out_of_range.numel() == 0, "load_mnist: ", labels_path.string(), ": label ",
              out_of_range.numel() ? labels[out_of_range[0][0].item<int64_t>()].item<int64_t>() : 0, " at index ",
              out_of_range.numel() ? out_of_range[0][0].item<int64_t>() : 0, " is outside the dataset's ", num_classes,
              " classes [0, ", num_classes, ")");
  return {images.unsqueeze(1).to(torch::kFloat32).div_(255).sub_(0.5).div_(0.5), labels.to(torch::kLong)};
}

}  // namespace diffusion::data
