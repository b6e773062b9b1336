#pragma once

// What the fuzz targets share: the readers take paths, so each input is written to a scratch file first.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

namespace fuzz {

/// A per-process scratch file holding `data`.
inline std::filesystem::path write_input(const uint8_t* data, size_t size, const char* suffix = "") {
  static const auto path = std::filesystem::temp_directory_path() /
                            ("diffusion_fuzz_" + std::to_string(::getpid()) + suffix);
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data),
                                                                 static_cast<std::streamsize>(size));
  return path;
}

}  // namespace fuzz
