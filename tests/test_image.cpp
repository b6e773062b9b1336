// Sample grids and PNG files.
#include "helpers.hpp"


TEST_CASE("a grid PNG reads back with the right size and pixel values, bad PNGs are refused", "[image]") {
  const auto dir = scratch("png");
  // Four 1x3x2 images with values -1, 0, 0.5, 1 -> grid of 2x2 with padding 2.
  auto images = torch::stack({torch::full({1, 3, 2}, -1.0), torch::full({1, 3, 2}, 0.0), torch::full({1, 3, 2}, 0.5),
                              torch::full({1, 3, 2}, 1.0)});
  const auto grid = make_grid(to_unit_range(images), 2, 2);
  REQUIRE(grid.sizes() == torch::IntArrayRef({1, 2 + 2 * (3 + 2), 2 + 2 * (2 + 2)}));
  write_png(dir / "grid.png", grid);
  const auto back = read_png(dir / "grid.png");
  REQUIRE(back.sizes() == torch::IntArrayRef({1, 12, 10}));
  const auto at = [&](int y, int x) { return static_cast<int>(std::lround(back[0][y][x].item<float>() * 255)); };
  CHECK(at(0, 0) == 0);      // padding
  CHECK(at(2, 2) == 0);      // -1 -> 0
  CHECK(at(2, 6) == 128);    // 0 -> 0.5 -> round(127.5)
  CHECK(at(7, 2) == 191);    // 0.5 -> 0.75 -> round(191.25)
  CHECK(at(9, 7) == 255);    // 1 -> 1
  // Converted on reading: grey to RGB repeats the value.
  const auto rgb = read_png(dir / "grid.png", 3);
  CHECK(rgb.sizes() == torch::IntArrayRef({3, 12, 10}));
  CHECK(torch::equal(rgb[2], back[0]));
  write_bytes(dir / "not.png", {'n', 'o', 't', ' ', 'a', ' ', 'p', 'n', 'g'});
  CHECK_REFUSED(read_png(dir / "not.png"), "not.png is not a readable PNG");
  CHECK_REFUSED(read_png(dir / "missing.png"), "missing.png: no such file");
  CHECK_REFUSED(read_png(dir / "grid.png", 2), "channels must be 0 (as stored), 1, 3 or 4, got 2");
  CHECK_REFUSED(write_png(dir / "x.png", torch::zeros({2, 4, 4})), "expected 1, 3 or 4 channels, got 2");
  CHECK_REFUSED(make_grid(torch::zeros({4, 4})), "images must be (N, C, H, W)");
}

