// Writes a small folder of images for the example's smoke tests, so that CI needs no download:
// make_images DIR [N]. N RGBA PNGs of 20x16 in two class folders (circle/, square/: a disc or a square of
// varying colour and place on a transparent ground), one JPEG and one BMP among them, one file with a PNG
// name whose body is cut short (header intact, as a damaged download), and a text file.
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#if __has_include(<stb/stb_image_write.h>)
#include <stb/stb_image_write.h>
#else
#include <stb_image_write.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: make_images DIR [N]\n";
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  const int n = argc > 2 ? std::atoi(argv[2]) : 24;
  const int w = 20, h = 16;
  for (int i = 0; i < n; ++i) {
    const bool disc = i % 2 == 0;
    const auto folder = dir / (disc ? "circle" : "square");
    std::filesystem::create_directories(folder);
    std::vector<uint8_t> rgba(size_t{w} * h * 4, 0);
    const int cx = 6 + i % 8, cy = 5 + i % 6, r = 4;
    for (int y = 0; y < h; ++y) {
      for (int x = 0; x < w; ++x) {
        const bool inside = disc ? (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r : std::abs(x - cx) <= r && std::abs(y - cy) <= r;
        if (!inside) continue;
        uint8_t* p = &rgba[(size_t{static_cast<size_t>(y)} * w + x) * 4];
        p[0] = static_cast<uint8_t>(40 * (i % 6));
        p[1] = static_cast<uint8_t>(disc ? 200 : 60);
        p[2] = static_cast<uint8_t>(255 - 30 * (i % 8));
        p[3] = 255;
      }
    }
    const auto stem = (folder / ("image_" + std::to_string(i))).string();
    int ok = 0;
    if (i == 1) ok = stbi_write_jpg((stem + ".jpg").c_str(), w, h, 4, rgba.data(), 95);
    else if (i == 2) ok = stbi_write_bmp((stem + ".bmp").c_str(), w, h, 4, rgba.data());
    else ok = stbi_write_png((stem + ".png").c_str(), w, h, 4, rgba.data(), w * 4);
    if (!ok) {
      std::cerr << "make_images: could not write " << stem << "\n";
      return 1;
    }
  }
  // A damaged file: a good PNG cut in half (its header still reads).
  std::ifstream in(dir / "circle" / "image_0.png", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(dir / "square" / "damaged.png", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  std::ofstream(dir / "README.txt") << "smoke-test images\n";
  std::cout << "make_images: wrote " << n << " images to " << dir.string() << "\n";
  return 0;
}
