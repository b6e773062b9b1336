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
