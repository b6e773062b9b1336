// The idx dataset loader.
#include "helpers.hpp"


TEST_CASE("the idx loader reads good files, plain and gzipped, and names the fault in bad ones", "[data]") {
  const auto dir = scratch("idx");
  write_bytes(dir / "train-images-idx3-ubyte", idx_bytes(0x803, {3, 28, 28}, 3 * 28 * 28, 255));
#if defined(DIFFUSION_NO_ZLIB)
  write_bytes(dir / "train-labels-idx1-ubyte", idx_bytes(0x801, {3}, 3, 9));
  write_bytes(dir / "gzipped", {0x1f, 0x8b, 8, 0, 0, 0, 0, 0});
  CHECK_REFUSED(data::read_idx(dir / "gzipped"), "is gzipped but this build has no zlib");
#else
  write_gz(dir / "train-labels-idx1-ubyte.gz", idx_bytes(0x801, {3}, 3, 9));
#endif
  const auto split = data::load_mnist(dir, data::Split::Train);
  CHECK(split.images.sizes() == torch::IntArrayRef({3, 1, 28, 28}));
  CHECK(split.images.max().item<float>() == 1.0f);  // 255 -> 1
  CHECK(split.labels.sizes() == torch::IntArrayRef({3}));
  CHECK(split.labels[2].item<int64_t>() == 9);
  const auto zero = data::read_idx(dir / "train-images-idx3-ubyte");
  CHECK(zero.scalar_type() == torch::kUInt8);

  write_bytes(dir / "truncated", idx_bytes(0x803, {3, 28, 28}, 100));
  CHECK_REFUSED(data::read_idx(dir / "truncated"), "truncated: header promises 2352 bytes of data, file has 100");
  write_bytes(dir / "overflow", idx_bytes(0x804, {0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 2}, 8));
  CHECK_REFUSED(data::read_idx(dir / "overflow"), "truncated: header promises more than 2^64 bytes of data, file has 8");
  write_bytes(dir / "empty", idx_bytes(0x803, {0, 28, 28}, 0));  // no images: an empty tensor, not an error
  CHECK(data::read_idx(dir / "empty").sizes() == torch::IntArrayRef({0, 28, 28}));
  write_bytes(dir / "short-header", {0, 0, 8, 3, 0, 0});
  CHECK_REFUSED(data::read_idx(dir / "short-header"), "truncated header");
  write_bytes(dir / "magic", idx_bytes(0x00000903, {1}, 1));
  CHECK_REFUSED(data::read_idx(dir / "magic"), "wrong magic number 0x903");
  write_bytes(dir / "trailing", idx_bytes(0x801, {2}, 5));
  CHECK_REFUSED(data::read_idx(dir / "trailing"), "3 unexpected trailing bytes");
  CHECK_REFUSED(data::read_idx(dir / "nope"), "nope: no such file");
  CHECK_REFUSED(data::load_mnist(dir, data::Split::Test), "t10k-images-idx3-ubyte (or .gz) not found");
  write_bytes(dir / "t10k-images-idx3-ubyte", idx_bytes(0x803, {2, 28, 28}, 2 * 28 * 28));
  write_bytes(dir / "t10k-labels-idx1-ubyte", idx_bytes(0x801, {3}, 3));
  CHECK_REFUSED(data::load_mnist(dir, data::Split::Test), "has 2 images but");
  // A label outside the classes is refused when the file is read, naming the file and the index.
  auto labels = idx_bytes(0x801, {2}, 2, 3);
  labels.back() = 200;
  write_bytes(dir / "t10k-labels-idx1-ubyte", labels);
  CHECK_REFUSED(data::load_mnist(dir, data::Split::Test),
                "t10k-labels-idx1-ubyte: label 200 at index 1 is outside the dataset's 10 classes [0, 10)");
  CHECK_NOTHROW(data::load_mnist(dir, data::Split::Test, 201));
}

// --- Image folders --------------------------------------------------------------------------------------

namespace folder_helpers {

/// Writes (H, W, C) uint8 pixels as PNG, BMP or JPEG (by the extension) with stb_image_write.
void write_image(const fs::path& path, const torch::Tensor& hwc, int jpeg_quality = 100) {
  fs::create_directories(path.parent_path());
  const auto p = hwc.contiguous();
  const int h = static_cast<int>(p.size(0)), w = static_cast<int>(p.size(1)), c = static_cast<int>(p.size(2));
  const auto ext = path.extension().string();
  int ok = 0;
  if (ext == ".png") ok = stbi_write_png(path.string().c_str(), w, h, c, p.data_ptr<uint8_t>(), w * c);
  else if (ext == ".bmp") ok = stbi_write_bmp(path.string().c_str(), w, h, c, p.data_ptr<uint8_t>());
  else ok = stbi_write_jpg(path.string().c_str(), w, h, c, p.data_ptr<uint8_t>(), jpeg_quality);
  REQUIRE(ok != 0);
}

/// A uniform (h, w, c) image.
torch::Tensor uniform(int64_t h, int64_t w, std::vector<int64_t> colour) {
  return torch::tensor(colour, torch::kLong).to(torch::kUInt8).view({1, 1, -1}).expand({h, w, -1}).contiguous();
}

#if !defined(DIFFUSION_NO_ZLIB)
/// A 16-bit greyscale PNG (stb_image_write writes 8 bits only): signature, IHDR, one zlib IDAT, IEND.
void write_png16(const fs::path& path, int w, int h, const std::vector<uint16_t>& values) {
  const auto be32 = [](std::string& s, uint32_t v) {
    for (int k = 24; k >= 0; k -= 8) s.push_back(static_cast<char>(v >> k));
  };
  const auto chunk = [&](std::string& out, const char* type, const std::string& data) {
    be32(out, static_cast<uint32_t>(data.size()));
    const std::string body = std::string(type, 4) + data;
    out += body;
    be32(out, static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(body.data()), static_cast<uInt>(body.size()))));
  };
  std::string ihdr;
  be32(ihdr, static_cast<uint32_t>(w));
  be32(ihdr, static_cast<uint32_t>(h));
  ihdr += std::string{16, 0, 0, 0, 0};  // bit depth 16, grey, deflate, no filter, no interlace
  std::string raw;
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);  // filter: none
    for (int x = 0; x < w; ++x) {
      raw.push_back(static_cast<char>(values[static_cast<size_t>(y * w + x)] >> 8));
      raw.push_back(static_cast<char>(values[static_cast<size_t>(y * w + x)] & 0xFF));
    }
  }
  std::string packed(compressBound(static_cast<uLong>(raw.size())), '\0');
  uLongf size = static_cast<uLongf>(packed.size());
  REQUIRE(compress(reinterpret_cast<Bytef*>(packed.data()), &size, reinterpret_cast<const Bytef*>(raw.data()),
                   static_cast<uLong>(raw.size())) == Z_OK);
  packed.resize(size);
  std::string png = "\x89PNG\r\n\x1a\n";
  chunk(png, "IHDR", ihdr);
  chunk(png, "IDAT", packed);
  chunk(png, "IEND", "");
  std::ofstream(path, std::ios::binary).write(png.data(), static_cast<std::streamsize>(png.size()));
}
#endif

}  // namespace folder_helpers
using namespace folder_helpers;

TEST_CASE("load_image cuts the centre square and averages each area, as computed by hand", "[data][images]") {
  const auto dir = scratch("load_image");
  // 8 wide, 4 high, RGB: pixel (y, x) = (10 x + y, 2 x, 255 - 3 y). The centre square is columns 2..5;
  // at size 2 each output pixel is the mean of a 2x2 block of it.
  auto pixels = torch::empty({4, 8, 3}, torch::kUInt8);
  for (int64_t y = 0; y < 4; ++y) {
    for (int64_t x = 0; x < 8; ++x) {
      pixels[y][x][0] = 10 * x + y;
      pixels[y][x][1] = 2 * x;
      pixels[y][x][2] = 255 - 3 * y;
    }
  }
  write_image(dir / "wide.png", pixels);
  const auto out = data::load_image(dir / "wide.png", data::ImageFolderOptions(2));
  REQUIRE(out.sizes() == torch::IntArrayRef({3, 2, 2}));
  REQUIRE(out.scalar_type() == torch::kUInt8);
  for (int64_t oy = 0; oy < 2; ++oy) {
    for (int64_t ox = 0; ox < 2; ++ox) {
      for (int64_t c = 0; c < 3; ++c) {
        double sum = 0;
        for (int64_t dy = 0; dy < 2; ++dy) {
          for (int64_t dx = 0; dx < 2; ++dx) sum += pixels[2 * oy + dy][2 + 2 * ox + dx][c].item<double>();
        }
        INFO("pixel " << oy << "," << ox << " channel " << c);
        CHECK(out[c][oy][ox].item<int64_t>() == static_cast<int64_t>(std::nearbyint(sum / 4)));
      }
    }
  }
  // At its own size (a 4x4 crop of it) nothing is resampled: the centre square exactly.
  CHECK(torch::equal(data::load_image(dir / "wide.png", data::ImageFolderOptions(4)), pixels.slice(1, 2, 6).permute({2, 0, 1})));
  // Grey is BT.601 luma of the composited colour; transparency goes on the background.
  write_image(dir / "rgba.png", uniform(3, 3, {200, 100, 50, 128}));
  const double a = 128.0 / 255.0;
  const auto over = [&](double c, double bg) { return a * c + (1 - a) * bg; };
  const auto grey = data::load_image(dir / "rgba.png", data::ImageFolderOptions(3).channels(1));
  const double luma = 0.299 * over(200, 255) + 0.587 * over(100, 255) + 0.114 * over(50, 255);
  CHECK(grey.sizes() == torch::IntArrayRef({1, 3, 3}));
  CHECK(grey.eq(static_cast<int64_t>(std::nearbyint(luma))).all().item<bool>());
  const auto on_black = data::load_image(dir / "rgba.png", data::ImageFolderOptions(3).background({0, 0, 0}));
  CHECK(on_black[0][1][1].item<int64_t>() == std::lround(over(200, 0)));
  CHECK(on_black[2][1][1].item<int64_t>() == std::lround(over(50, 0)));
  // Upscaling a uniform image keeps it uniform; a grey file read as RGB repeats its value.
  write_image(dir / "grey.png", uniform(2, 2, {77}));
  CHECK(data::load_image(dir / "grey.png", data::ImageFolderOptions(5)).eq(77).all().item<bool>());
  CHECK_REFUSED(data::load_image(dir / "missing.png", data::ImageFolderOptions(2)), "missing.png is not a readable image");
  CHECK_REFUSED(data::load_image(dir / "grey.png", data::ImageFolderOptions(2).channels(4)), "channels must be 1 (grey) or 3 (RGB), got 4");
  CHECK_REFUSED(data::load_image(dir / "grey.png", data::ImageFolderOptions(0)), "size must be in [1, 16384] pixels, got 0");
  CHECK_REFUSED(data::load_image(dir / "grey.png", data::ImageFolderOptions(2).background({0, 300, 0})),
                "background must be 3 values (RGB) in [0, 255]");
}

TEST_CASE("load_image reads PNG (grey, RGB, RGBA, 16-bit), JPEG and BMP", "[data][images]") {
  const auto dir = scratch("formats");
  write_image(dir / "grey.png", uniform(6, 4, {90}));
  write_image(dir / "rgb.png", uniform(4, 6, {10, 20, 30}));
  write_image(dir / "rgba.png", uniform(4, 4, {10, 20, 30, 255}));
  write_image(dir / "rgb.bmp", uniform(5, 5, {40, 50, 60}));
  write_image(dir / "rgb.jpg", uniform(16, 16, {120, 60, 200}));
  const auto colour = [&](const std::string& name) { return data::load_image(dir / name, data::ImageFolderOptions(4)); };
  CHECK(colour("grey.png").eq(90).all().item<bool>());
  for (const auto* name : {"rgb.png", "rgba.png"}) {
    INFO(name);
    CHECK(torch::equal(colour(name), uniform(4, 4, {10, 20, 30}).permute({2, 0, 1})));
  }
  CHECK(torch::equal(colour("rgb.bmp"), uniform(4, 4, {40, 50, 60}).permute({2, 0, 1})));
  // JPEG is lossy: a uniform colour comes back within a few levels.
  CHECK((colour("rgb.jpg").to(torch::kInt) - uniform(4, 4, {120, 60, 200}).permute({2, 0, 1}).to(torch::kInt)).abs().max().item<int>() <= 3);
#if !defined(DIFFUSION_NO_ZLIB)
  write_png16(dir / "deep.png", 2, 2, {0x1234, 0x1234, 0xFFFF, 0x0000});
  const auto deep = data::load_image(dir / "deep.png", data::ImageFolderOptions(2).channels(1));
  CHECK(deep[0][0][0].item<int64_t>() == 0x12);  // 16 bits read at 8: the high byte
  CHECK(deep[0][1][0].item<int64_t>() == 0xFF);
  CHECK(deep[0][1][1].item<int64_t>() == 0);
#endif
}

TEST_CASE("scan_images walks nested folders, labels by folder, and names what it skips or refuses", "[data][images]") {
  const auto root = scratch("scan");
  write_image(root / "cats" / "a.png", uniform(8, 8, {1, 2, 3}));
  write_image(root / "cats" / "deep" / "nested" / "b.jpg", uniform(8, 8, {4, 5, 6}));
  write_image(root / "dogs" / "c.bmp", uniform(9, 12, {7, 8, 9}));
  write_image(root / "Birds" / "d.PNG", uniform(8, 8, {7, 8, 9}));
  write_bytes(root / "dogs" / "notes.txt", {'h', 'i'});
  write_bytes(root / "dogs" / "broken.png", {0x89, 'P', 'N', 'G', 1, 2, 3});
  write_image(root / ".hidden" / "e.png", uniform(8, 8, {1, 1, 1}));
  fs::create_directories(root / "empty");
  fs::create_directory_symlink(root, root / "cats" / "loop");  // a link back to the root: walked once
  const auto index = data::scan_images(root, data::ImageFolderOptions(8).folder_labels(true));
  REQUIRE(index.files.size() == 4);
  CHECK(index.files[0] == root / "Birds" / "d.PNG");
  CHECK(index.files[1] == root / "cats" / "a.png");
  CHECK(index.files[2] == root / "cats" / "deep" / "nested" / "b.jpg");
  CHECK(index.files[3] == root / "dogs" / "c.bmp");
  CHECK(index.classes == std::vector<std::string>{"Birds", "cats", "dogs"});
  CHECK(index.labels == std::vector<int64_t>{0, 1, 1, 2});
  CHECK(index.other_files == 1);
  REQUIRE(index.skipped.size() == 1);
  CHECK(index.skipped[0].path == root / "dogs" / "broken.png");
  CHECK(index.cache_bytes(8, 3) == 4 * 3 * 64);
  CHECK_REFUSED(data::scan_images(root, data::ImageFolderOptions(8).strict(true)), "broken.png is not a readable image");
  CHECK_REFUSED(data::scan_images(root, data::ImageFolderOptions(9).upscale(false)),
                "d.PNG is 8x8, smaller than the crop (9x9) and upscaling is off");
  write_image(root / "loose.png", uniform(8, 8, {1, 2, 3}));
  CHECK_REFUSED(data::scan_images(root, data::ImageFolderOptions(8).folder_labels(true)),
                "loose.png lies directly in");
  CHECK(data::scan_images(root, data::ImageFolderOptions(8)).files.size() == 5);  // without labels it is one more image
  CHECK_REFUSED(data::scan_images(root / "empty", data::ImageFolderOptions(8)), "empty holds no readable PNG, JPEG or BMP image");
  const auto only_broken = scratch("scan_broken");
  write_bytes(only_broken / "x.jpg", {1, 2, 3});
  CHECK_REFUSED(data::scan_images(only_broken, data::ImageFolderOptions(8)), "holds no readable PNG, JPEG or BMP image; unreadable: ");
  CHECK_REFUSED(data::scan_images(root / "nowhere", data::ImageFolderOptions(8)), "nowhere: no such directory");
  CHECK_REFUSED(data::scan_images(root / "loose.png", data::ImageFolderOptions(8)), "loose.png is not a directory");
  CHECK_REFUSED(data::scan_images(root, data::ImageFolderOptions(0)), "size must be in [1, 16384] pixels, got 0");
}

TEST_CASE("ImageFolder gives the same batches cached and decoded on the fly, flips by its draw, and skips bad bodies", "[data][images]") {
  const auto root = scratch("folder");
  torch::manual_seed(4);
  for (int i = 0; i < 7; ++i) {
    write_image(root / (i < 4 ? "a" : "b") / c10::str("img", i, ".png"), torch::randint(0, 256, {6, 5, 3}).to(torch::kUInt8));
  }
  const auto o = data::ImageFolderOptions(4).folder_labels(true).flip(true).workers(2);
  data::ImageFolder cached(root, o);
  data::ImageFolder streamed(root, data::ImageFolderOptions(o).cache_limit(0));
  REQUIRE(cached.cached());
  REQUIRE_FALSE(streamed.cached());
  CHECK(cached.size() == 7);
  CHECK(cached.shape() == std::vector<int64_t>{3, 4, 4});
  CHECK(cached.num_classes() == 2);
  const auto idx = torch::tensor({6, 0, 3, 3}, torch::kLong);
  CHECK(torch::equal(cached.labels(idx), torch::tensor({1, 0, 0, 0}, torch::kLong)));
  // Unaugmented: each image is load_image's, mapped to [-1, 1].
  const auto plain = cached.batch(idx, std::nullopt);
  for (int64_t k = 0; k < 4; ++k) {
    const auto expected = data::load_image(cached.index().files[static_cast<size_t>(idx[k].item<int64_t>())], o);
    CHECK(torch::allclose(plain[k], expected.to(torch::kFloat32) / 127.5 - 1));
  }
  CHECK(plain.min().item<double>() >= -1);
  CHECK(plain.max().item<double>() <= 1);
  CHECK(torch::equal(streamed.batch(idx, std::nullopt), plain));
  const auto strided = torch::tensor({6, 9, 0, 9, 3, 9, 3, 9}, torch::kLong).slice(0, 0, 8, 2);  // not contiguous
  REQUIRE_FALSE(strided.is_contiguous());
  CHECK(torch::equal(streamed.batch(strided, data::AugmentationDraw{9, 0}), cached.batch(idx, data::AugmentationDraw{9, 0})));
  // Flips follow augmentation_bits of (seed, epoch, index): the same image in any batch, another per epoch.
  int flips_seen = 0;
  for (int64_t epoch = 0; epoch < 6; ++epoch) {
    const data::AugmentationDraw draw{9, epoch};
    const auto x = cached.batch(idx, draw);
    streamed.prefetch(idx, draw);
    CHECK(torch::equal(streamed.batch(idx, draw), x));  // the prefetched batch is the same
    for (int64_t k = 0; k < 4; ++k) {
      const bool flip = data::augmentation_bits(draw, idx[k].item<int64_t>(), 1) & 1;
      flips_seen += flip;
      CHECK(torch::equal(x[k], flip ? plain[k].flip({2}) : plain[k]));
    }
  }
  CHECK(flips_seen > 0);
  CHECK(flips_seen < 24);
  CHECK(streamed.wait_seconds() >= 0);
  // A prefetch for other indices is dropped; the batch asked for is decoded then.
  streamed.prefetch(torch::tensor({1, 2}, torch::kLong), std::nullopt);
  CHECK(torch::equal(streamed.batch(idx, std::nullopt), plain));
  CHECK_REFUSED(cached.batch(torch::tensor({7}, torch::kLong), std::nullopt), "indices must be in [0, 7)");
  // A file whose header reads but whose body does not: the cache skips it, or strict refuses it.
  std::ifstream in(root / "b" / "img6.png", std::ios::binary);
  auto bytes = std::string(std::istreambuf_iterator<char>(in), {});
  in.close();
  bytes.resize(bytes.size() / 2);
  std::ofstream(root / "b" / "img6.png", std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  data::ImageFolder skipping(root, o);
  CHECK(skipping.size() == 6);
  REQUIRE(skipping.index().skipped.size() == 1);
  CHECK(skipping.index().skipped[0].path == root / "b" / "img6.png");
  CHECK(torch::equal(skipping.labels(torch::arange(6)), torch::tensor({0, 0, 0, 0, 1, 1}, torch::kLong)));
  CHECK_REFUSED(data::ImageFolder(root, data::ImageFolderOptions(o).strict(true)), "img6.png is not a readable image");
  // On the fly, the damaged body surfaces when its batch is read, naming the file.
  data::ImageFolder streaming_damaged(root, data::ImageFolderOptions(o).cache_limit(0));
  CHECK_REFUSED(streaming_damaged.batch(torch::tensor({0, 6}, torch::kLong), std::nullopt), "img6.png is not a readable image");
}

TEST_CASE("TensorDataset checks its examples and labels", "[data]") {
  const data::TensorDataset set(torch::zeros({3, 1, 2, 2}), torch::tensor({0, 2, 1}));
  CHECK(set.num_classes() == 3);
  CHECK(set.shape() == std::vector<int64_t>{1, 2, 2});
  CHECK(data::TensorDataset(torch::zeros({3, 4}), torch::tensor({0, 2, 1}), 5).num_classes() == 5);
  CHECK(data::TensorDataset(torch::zeros({3, 4})).num_classes() == 0);
  CHECK_REFUSED(data::TensorDataset(torch::zeros({0, 4})), "examples must be a non-empty floating-point (N, ...) tensor");
  CHECK_REFUSED(data::TensorDataset(torch::zeros({3, 4}, torch::kLong)), "examples must be a non-empty floating-point");
  CHECK_REFUSED(data::TensorDataset(torch::zeros({3, 4}), torch::tensor({0, 1})), "labels must be 1-D integers, one per example (3)");
  CHECK_REFUSED(data::TensorDataset(torch::zeros({3, 4}), torch::tensor({0, 1, 5}), 3), "labels must be in [0, 3), got values in [0, 5]");
  CHECK_REFUSED(data::TensorDataset(torch::zeros({3, 4}), torch::tensor({0, -1, 1})), "labels must be in");
}

TEST_CASE("Subset reads the examples it names, with their labels and augmentation indices", "[data]") {
  const auto examples = torch::arange(10, torch::kFloat32).view({10, 1, 1, 1});
  auto all = std::make_shared<data::TensorDataset>(examples, torch::arange(10).remainder(3));
  const data::Subset odd(all, torch::tensor({9, 7, 5, 3, 1}));
  CHECK(odd.size() == 5);
  CHECK(odd.shape() == std::vector<int64_t>{1, 1, 1});
  CHECK(odd.num_classes() == 3);
  CHECK(torch::equal(odd.batch(torch::tensor({0, 4}, torch::kLong), std::nullopt).flatten(), torch::tensor({9.0f, 1.0f})));
  CHECK(torch::equal(odd.labels(torch::tensor({0, 1}, torch::kLong)), torch::tensor({0, 1}, torch::kLong)));
  CHECK_REFUSED(data::Subset(all, torch::tensor({0, 10})), "Subset: indices must be in [0, 10), got values in [0, 10]");
  CHECK_REFUSED(data::Subset(all, torch::tensor(std::vector<int64_t>{})), "Subset: indices must be a non-empty 1-D integer tensor");
  CHECK_REFUSED(data::Subset(all, torch::tensor({0.5})), "Subset: indices must be a non-empty 1-D integer tensor");
  CHECK_REFUSED(data::Subset(nullptr, torch::tensor({0})), "Subset: the dataset must be given");
}

namespace {
/// A .npy file by hand: the preamble of version `major`, the header text as given, then `body`.
void write_npy_by_hand(const fs::path& path, const std::string& header, const std::string& body, int major = 1) {
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  const auto len = header.size();
  out += static_cast<char>(len & 0xFF);
  out += static_cast<char>((len >> 8) & 0xFF);
  if (major > 1) out += std::string("\0\0", 2);
  out += header + body;
  std::ofstream(path, std::ios::binary) << out;
}
std::string bytes_of(const torch::Tensor& x) {
  const auto c = x.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel() * c.element_size()));
}
}  // namespace

TEST_CASE("save_npy and load_npy round-trip every dtype and shape, and read Fortran order and versions 2 and 3", "[data][npy]") {
  const auto dir = scratch("npy");
  for (const auto type : {torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kInt64, torch::kInt32, torch::kInt16,
                          torch::kInt8, torch::kUInt8, torch::kBool}) {
    for (const auto& shape : std::vector<std::vector<int64_t>>{{5}, {3, 2}, {2, 3, 4}, {0, 3}, {}}) {
      const auto x = (torch::arange(std::max<int64_t>(1, c10::multiply_integers(shape)), torch::kFloat64) * 1.5 - 4)
                         .slice(0, 0, c10::multiply_integers(shape)).reshape(shape).to(type);
      data::save_npy(dir / "x.npy", x);
      const auto y = data::load_npy(dir / "x.npy");
      CHECK(y.scalar_type() == type);
      CHECK(y.sizes() == x.sizes());
      CHECK(torch::equal(y, x));
    }
  }
  // The data start at a multiple of 64 bytes, as NumPy writes them.
  data::save_npy(dir / "x.npy", torch::zeros({7, 2}));
  CHECK((fs::file_size(dir / "x.npy") - 7 * 2 * 4) % 64 == 0);
  // Fortran order: the bytes are column-major.
  const auto m = torch::arange(6, torch::kFloat32).reshape({2, 3});
  write_npy_by_hand(dir / "f.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }\n", bytes_of(m.t()));
  CHECK(torch::equal(data::load_npy(dir / "f.npy"), m));
  // Versions 2 and 3 have a 4-byte header length; a one-byte type may say '<' or '='.
  write_npy_by_hand(dir / "v2.npy", "{\"descr\": \"<u1\", \"fortran_order\": False, \"shape\": (2,)}", std::string("\x07\x09", 2), 2);
  CHECK(torch::equal(data::load_npy(dir / "v2.npy"), torch::tensor({7, 9}, torch::kUInt8)));
  write_npy_by_hand(dir / "v3.npy", "{'shape': (1, 1), 'fortran_order': False, 'descr': '<f8'}", bytes_of(torch::tensor({2.5}, torch::kFloat64)), 3);
  CHECK(data::load_npy(dir / "v3.npy").item<double>() == 2.5);
}

TEST_CASE("load_npy refuses what is not a .npy file it can read, naming the file", "[data][npy][errors]") {
  const auto dir = scratch("npy_bad");
  const auto four = bytes_of(torch::ones({4}, torch::kFloat32));
  const auto bad = [&](const std::string& header, const std::string& body, const std::string& message, int major = 1) {
    write_npy_by_hand(dir / "bad.npy", header, body, major);
    CHECK_REFUSED(data::load_npy(dir / "bad.npy"), message);
  };
  std::ofstream(dir / "text.npy") << "not numpy";
  CHECK_REFUSED(data::load_npy(dir / "text.npy"), "text.npy is not a .npy file");
  CHECK_REFUSED(data::load_npy(dir / "missing.npy"), "missing.npy: no such file");
  bad("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", four, "format version 4", 4);
  bad("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }", four, "dtype '>f4' (big-endian");
  bad("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", four, "dtype '<c8'");
  bad("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4,), }", four, "a structured dtype");
  bad("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", four, "bad.npy is truncated (shape (5) of <f4 takes 20 bytes, 16 follow");
  bad("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", four, "bad.npy is longer than its shape");
  bad("{'descr': '<f4', 'fortran_order': False}", four, "a missing key");
  bad("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (4,)}", four, "expected True or False");
  bad("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'extra': 1}", four, "an unknown or repeated key 'extra'");
  bad("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (4,)}", four, "an unknown or repeated key 'descr'");
  bad("{'descr': '<f4', 'fortran_order': False, 'shape': (-4,)}", four, "expected a dimension");
  bad("{'descr': '<f4', 'fortran_order': False, 'shape': (4,)} trailing", four, "text after the dict");
  bad("{'descr': '<f4, 'fortran_order': False, 'shape': (4,)}", four, "malformed header");
  bad("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296)}", four, "too large to hold");
  // A header length past the end of the file.
  std::ofstream(dir / "short.npy", std::ios::binary) << std::string("\x93NUMPY\x01\x00\xff\x00{", 11);
  CHECK_REFUSED(data::load_npy(dir / "short.npy"), "short.npy is truncated (its header says 255 bytes, 1 follow)");
  CHECK_REFUSED(data::save_npy(dir / "b.npy", torch::zeros({2}, torch::kBFloat16)), "has no .npy type here");
  CHECK_REFUSED(data::save_npy(dir / "u.npy", torch::Tensor()), "the tensor is undefined");
}

TEST_CASE("load_tensor_file reads examples and labels from .npy, .safetensors and .pt files", "[data][npy]") {
  const auto dir = scratch("tensor_file");
  const auto x = torch::randn({6, 2, 8}, make_generator(0)).to(torch::kFloat64);
  const auto y = torch::tensor({0, 1, 2, 0, 1, 2}, torch::kInt32);
  data::save_npy(dir / "x.npy", x);
  auto file = data::load_tensor_file(dir / "x.npy");
  CHECK(file.examples.scalar_type() == torch::kFloat32);
  CHECK(torch::equal(file.examples, x.to(torch::kFloat32)));
  CHECK(!file.labels.defined());
  save_safetensors(dir / "xy.safetensors", {{"trajectories", x}, {"labels", y}});
  file = data::load_tensor_file(dir / "xy.safetensors", data::TensorFileOptions().labels(true));
  CHECK(torch::equal(file.examples, x.to(torch::kFloat32)));
  CHECK(torch::equal(file.labels, y.to(torch::kLong)));
  CHECK(file.labels.scalar_type() == torch::kLong);
  // Unlabelled reading leaves the labels out; a key picks one of several tensors.
  CHECK(!data::load_tensor_file(dir / "xy.safetensors").labels.defined());
  save_safetensors(dir / "two.safetensors", {{"a", x}, {"b", x * 2}});
  CHECK(torch::equal(data::load_tensor_file(dir / "two.safetensors", data::TensorFileOptions().key("b")).examples, (x * 2).to(torch::kFloat32)));
  // torch.save's files (a dict of tensors) are read by the [python] test, which Python writes.
}

TEST_CASE("load_tensor_file refuses what cannot be trained on, naming the file", "[data][npy][errors]") {
  const auto dir = scratch("tensor_file_bad");
  data::save_npy(dir / "one.npy", torch::zeros({5}));
  CHECK_REFUSED(data::load_tensor_file(dir / "one.npy"), "one.npy holds shape [5]; expected (N, ...) examples");
  data::save_npy(dir / "empty.npy", torch::zeros({0, 2}));
  CHECK_REFUSED(data::load_tensor_file(dir / "empty.npy"), "empty.npy holds shape [0, 2]");
  data::save_npy(dir / "bool.npy", torch::zeros({3, 2}, torch::kBool));
  CHECK_REFUSED(data::load_tensor_file(dir / "bool.npy"), "bool.npy holds Bool values; expected real numbers");
  auto nan = torch::zeros({4, 2});
  nan[2][1] = std::numeric_limits<float>::quiet_NaN();
  data::save_npy(dir / "nan.npy", nan);
  CHECK_REFUSED(data::load_tensor_file(dir / "nan.npy"), "nan.npy holds non-finite values (NaN or inf), the first in example 2 (of 4)");
  data::save_npy(dir / "x.npy", torch::zeros({4, 2}));
  CHECK_REFUSED(data::load_tensor_file(dir / "x.npy", data::TensorFileOptions().labels(true)), "x.npy is a .npy file, which holds one array and no labels");
  CHECK_REFUSED(data::load_tensor_file(dir / "x.npy", data::TensorFileOptions().key("x")), "drop the key ('x')");
  save_safetensors(dir / "two.safetensors", {{"a", torch::zeros({4, 2})}, {"b", torch::zeros({4, 2})}});
  CHECK_REFUSED(data::load_tensor_file(dir / "two.safetensors"), "two.safetensors holds several tensors (a, b); name the examples'");
  CHECK_REFUSED(data::load_tensor_file(dir / "two.safetensors", data::TensorFileOptions().key("c")), "has no tensor 'c'; it has a, b");
  CHECK_REFUSED(data::load_tensor_file(dir / "two.safetensors", data::TensorFileOptions().key("a").labels(true)),
                "two.safetensors has no labels: no tensor 'labels' (it has a, b)");
  save_safetensors(dir / "labels.safetensors", {{"x", torch::zeros({4, 2})}, {"labels", torch::tensor({0.5, 1.0, 0.0, 1.0})}});
  CHECK_REFUSED(data::load_tensor_file(dir / "labels.safetensors", data::TensorFileOptions().labels(true)),
                "'labels' must hold one integer per example (4), got Float");
  save_safetensors(dir / "neg.safetensors", {{"x", torch::zeros({2, 2})}, {"labels", torch::tensor({0, -1})}});
  CHECK_REFUSED(data::load_tensor_file(dir / "neg.safetensors", data::TensorFileOptions().labels(true)), "holds negative classes (-1)");
  save_safetensors(dir / "only_labels.safetensors", {{"labels", torch::tensor({0, 1})}});
  CHECK_REFUSED(data::load_tensor_file(dir / "only_labels.safetensors"), "only_labels.safetensors holds no examples");
  std::ofstream(dir / "text.txt") << "1 2\n3 4\n";
  CHECK_REFUSED(data::load_tensor_file(dir / "text.txt"), "text.txt is not a .npy, .safetensors or .pt (torch.save) file");
  CHECK_REFUSED(data::load_tensor_file(dir / "missing.npy"), "missing.npy: no such file");
}

TEST_CASE("the toy distributions' densities integrate to 1 and score their own samples at their entropy", "[data][toy]") {
  for (const auto& name : {"eight_gaussians", "two_moons"}) {
    const auto dist = data::make_toy_distribution(name);
    CHECK(dist->name() == name);
    // The density on a grid over [-5, 5]^2 (mass outside is below 1e-12) sums to 1 (midpoint rule).
    const int64_t n = 400;
    const double h = 10.0 / n;
    const auto axis = (torch::arange(n, torch::kFloat64) + 0.5) * h - 5;
    const auto grid = torch::stack(torch::meshgrid({axis, axis}, "ij"), -1).reshape({-1, 2});
    CHECK_THAT(dist->log_prob(grid).exp().sum().item<double>() * h * h, WithinRel(1.0, 1e-6));
    const auto a = dist->sample(4000, 1);
    CHECK(a.sizes() == c10::IntArrayRef{4000, 2});
    CHECK(torch::equal(a, dist->sample(4000, 1)));
    CHECK_FALSE(torch::equal(a, dist->sample(4000, 2)));
  }
  // Eight Gaussians: at a centre, the closed form (the other seven contribute e^{-d^2/2s^2} each).
  const data::EightGaussians eight;
  const auto c = eight.centers();
  double sum = 0;
  for (int64_t k = 0; k < 8; ++k) sum += std::exp(-(c[k] - c[0]).pow(2).sum().item<double>() / (2 * 0.25 * 0.25));
  CHECK_THAT(eight.log_prob(c.slice(0, 0, 1)).item<double>(), WithinRel(std::log(sum / 8 / (2 * std::numbers::pi * 0.0625)), 1e-12));
  // Two moons: the quadrature has converged: 16x the intervals change log p by less than 1e-8 on its
  // samples and 1e-4 anywhere in [-4, 4]^2 (far from the arcs the integrand is narrow beside the intervals).
  const auto near = data::TwoMoons().sample(1000, 3);
  const auto anywhere = torch::rand({1000, 2}, make_generator(4), torch::kFloat64) * 8 - 4;
  const data::TwoMoons fine(0.1, 2.0, 16 * data::TwoMoons::default_intervals);
  const auto error = [&](const torch::Tensor& x) { return (data::TwoMoons().log_prob(x) - fine.log_prob(x)).abs().max().item<double>(); };
  CHECK(error(near) < 1e-8);
  CHECK(error(anywhere) < 1e-4);
  // Samples score at the entropy: for well separated Gaussians log 8 + log(2 pi e s^2), up to the overlap.
  const auto nll = -eight.log_prob(eight.sample(20000, 5)).mean().item<double>();
  CHECK_THAT(nll, WithinAbs(std::log(8.0) + std::log(2 * std::numbers::pi * std::exp(1.0) * 0.0625), 0.03));
  CHECK_REFUSED(data::make_toy_distribution("swiss_roll"), "unknown distribution 'swiss_roll'; known: eight_gaussians, two_moons");
  CHECK_REFUSED(eight.log_prob(torch::zeros({3, 3})), "expected floating-point points (N, 2)");
  CHECK_REFUSED(eight.sample(0, 1), "n must be >= 1");
  CHECK_REFUSED(data::EightGaussians(2, 0), "std > 0");
  CHECK_REFUSED(data::TwoMoons(0.1, 2, 3), "intervals even in [2, 2^24]");
}
