#pragma once

#include <diffusion/detail/atomic_file.hpp>
#include <diffusion/detail/check.hpp>

#include <torch/torch.h>

#include <diffusion/detail/stb.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>

/// Sample grids and PNG files (written and read with stb, Debian's libstb-dev).
namespace diffusion {

/// Tiles a batch (N, C, H, W) into one image (C, rows * (H + padding) + padding, nrow * (W + padding) +
/// padding), `nrow` images per row, separated and framed by `padding` pixels of `pad_value`, like
/// torchvision's make_grid.
///
/// Example:
///   auto grid = make_grid(to_unit_range(samples), 5);   // 25 samples -> 5x5 grid
inline torch::Tensor make_grid(const torch::Tensor& images, int64_t nrow = 8, int64_t padding = 2,
                               double pad_value = 0.0) {
  TORCH_CHECK(images.defined() && images.dim() == 4, "make_grid: images must be (N, C, H, W), got ",
              images.defined() ? detail::shape_str(images) : "an undefined tensor");
  TORCH_CHECK(images.size(0) >= 1, "make_grid: need at least one image");
  TORCH_CHECK(nrow >= 1, "make_grid: nrow must be >= 1, got ", nrow);
  TORCH_CHECK(padding >= 0, "make_grid: padding must be >= 0, got ", padding);
  const int64_t n = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3);
  const int64_t cols = std::min(nrow, n), rows = (n + cols - 1) / cols;
  auto grid = torch::full({c, rows * (h + padding) + padding, cols * (w + padding) + padding}, pad_value,
                          images.options());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = (i / cols) * (h + padding) + padding, x = (i % cols) * (w + padding) + padding;
    grid.slice(1, y, y + h).slice(2, x, x + w).copy_(images[i]);
  }
  return grid;
}

/// Maps model outputs in [-1, 1] to [0, 1] and clamps, as the seed does before saving: (x + 1) / 2.
inline torch::Tensor to_unit_range(const torch::Tensor& x) { return ((x + 1) / 2).clamp(0, 1); }

/// Writes an image (C, H, W) or (H, W) with values in [0, 1] as an 8-bit PNG (C = 1 grey, 3 RGB,
/// 4 RGBA). Values are clamped to [0, 1] and rounded: v -> round(255 v). Written atomically (see
/// save_checkpoint): a failed write keeps the previous file and is refused with the reason.
inline void write_png(const std::filesystem::path& path, const torch::Tensor& image) {
  TORCH_CHECK(image.defined() && (image.dim() == 2 || image.dim() == 3), "write_png: image must be (C, H, W) or (H, W), got ",
              image.defined() ? detail::shape_str(image) : "an undefined tensor");
  const auto chw = image.dim() == 2 ? image.unsqueeze(0) : image;
  const int64_t c = chw.size(0);
  TORCH_CHECK(c == 1 || c == 3 || c == 4, "write_png: expected 1, 3 or 4 channels, got ", c);
  const auto bytes = chw.detach().to(torch::kCPU, torch::kFloat32).clamp(0, 1).mul(255).round().to(torch::kUInt8)
                         .permute({1, 2, 0}).contiguous();
  std::string png;  // encoded in memory, then written atomically (a failed write keeps the previous file)
  const int ok = stbi_write_png_to_func(
      [](void* context, void* data, int size) { static_cast<std::string*>(context)->append(static_cast<const char*>(data), size); },
      &png, static_cast<int>(bytes.size(1)), static_cast<int>(bytes.size(0)), static_cast<int>(c), bytes.data_ptr<uint8_t>(),
      static_cast<int>(bytes.size(1) * c));
  TORCH_CHECK(ok != 0, "write_png: could not encode ", path.string());
  detail::write_file_atomically(path, png, "write_png");
}

/// Reads a PNG into a float32 tensor (C, H, W) with values in [0, 1] (v / 255 for 8-bit files, v / 65535
/// for 16-bit ones). `channels` 0 keeps the file's (1 grey, 2 grey and alpha, 3 RGB, 4 RGBA); 1, 3 or 4
/// converts (RGB to grey by stb's luma weights). Refused, naming the file: a missing or unreadable file,
/// and one that is not a PNG or is damaged (stb's reason).
///
/// Example:
///   auto digit = read_png("seven.png", 1);            // (1, 28, 28) in [0, 1]
///   auto x = digit.unsqueeze(0) * 2 - 1;              // a batch of one in [-1, 1]
inline torch::Tensor read_png(const std::filesystem::path& path, int channels = 0) {
  TORCH_CHECK(channels >= 0 && channels <= 4 && channels != 2, "read_png: channels must be 0 (as stored), 1, 3 or 4, got ",
              channels);
  TORCH_CHECK(std::filesystem::is_regular_file(path), "read_png: ", path.string(), ": no such file");
  int w = 0, h = 0, stored = 0;
  const bool wide = stbi_is_16_bit(path.string().c_str()) != 0;
  void* data = wide ? static_cast<void*>(stbi_load_16(path.string().c_str(), &w, &h, &stored, channels))
                    : static_cast<void*>(stbi_load(path.string().c_str(), &w, &h, &stored, channels));
  TORCH_CHECK(data != nullptr, "read_png: ", path.string(), " is not a readable PNG (", stbi_failure_reason(), ")");
  const int c = channels > 0 ? channels : stored;
  const auto pixels = torch::from_blob(data, {h, w, c}, wide ? torch::kInt16 : torch::kUInt8);
  // 16-bit values arrive as uint16; read them as int32 without the sign.
  const auto values = wide ? pixels.to(torch::kInt32).bitwise_and(0xFFFF) : pixels.to(torch::kInt32);
  auto out = values.permute({2, 0, 1}).to(torch::kFloat32).div(wide ? 65535.0 : 255.0).contiguous();
  stbi_image_free(data);
  return out;
}

}  // namespace diffusion
