// Writes a small MNIST-format dataset (the four idx files) for the example's smoke tests, so that CI
// needs no network: make_idx DIR [N_TRAIN] [N_TEST]. Images are 28x28 bars at varying positions.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

void write_idx(const std::filesystem::path& path, uint32_t magic, const std::vector<uint32_t>& dims,
               const std::vector<uint8_t>& data) {
  std::ofstream out(path, std::ios::binary);
  const auto be = [&](uint32_t v) {
    const char b[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
    out.write(b, 4);
  };
  be(magic);
  for (auto d : dims) be(d);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

void write_split(const std::filesystem::path& dir, const std::string& prefix, uint32_t n) {
  std::vector<uint8_t> images(size_t{n} * 28 * 28, 0), labels(n);
  for (uint32_t i = 0; i < n; ++i) {
    labels[i] = static_cast<uint8_t>(i % 10);
    const uint32_t col = 4 + (i * 7) % 20;
    for (uint32_t row = 4; row < 24; ++row) images[size_t{i} * 784 + row * 28 + col] = 255;
  }
  write_idx(dir / (prefix + "-images-idx3-ubyte"), 0x803, {n, 28, 28}, images);
  write_idx(dir / (prefix + "-labels-idx1-ubyte"), 0x801, {n}, labels);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: make_idx DIR [N_TRAIN] [N_TEST]\n";
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);
  write_split(dir, "train", argc > 2 ? static_cast<uint32_t>(std::atoi(argv[2])) : 64);
  write_split(dir, "t10k", argc > 3 ? static_cast<uint32_t>(std::atoi(argv[3])) : 16);
  std::cout << "make_idx: wrote a small MNIST-format dataset to " << dir.string() << "\n";
  return 0;
}
