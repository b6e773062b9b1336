#pragma once

#include <diffusion/data/dataset.hpp>
#include <diffusion/detail/stb.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

/// Training on a directory tree of image files (PNG, JPEG, BMP), decoded with stb_image.
namespace diffusion::data {

/// How ImageFolder reads and shapes its images.
///
/// Example:
///   auto o = ImageFolderOptions(32).channels(3).flip(true).folder_labels(true);
struct ImageFolderOptions {
  ImageFolderOptions() = default;
  /// Images are cropped and resized to size x size.
  explicit ImageFolderOptions(int64_t size) : size_(size) {}

  /// Side of the square images, in pixels (required: >= 1).
  TORCH_ARG(int64_t, size) = 0;
  /// 1 (grey: ITU-R BT.601 luma) or 3 (RGB).
  TORCH_ARG(int64_t, channels) = 3;
  /// The colour transparent pixels are composited on, RGB in [0, 255] (white).
  TORCH_ARG(std::vector<int64_t>, background) = std::vector<int64_t>{255, 255, 255};
  /// Flip each image horizontally with probability 1/2, drawn anew every epoch (AugmentationDraw).
  TORCH_ARG(bool, flip) = false;
  /// Label each image by the first folder under the root that holds it (the classes: those folders'
  /// names, sorted); images directly in the root are then refused.
  TORCH_ARG(bool, folder_labels) = false;
  /// Enlarge images whose shorter side is below size; false refuses them.
  TORCH_ARG(bool, upscale) = true;
  /// Refuse the folder at the first file that cannot be read, instead of skipping it.
  TORCH_ARG(bool, strict) = false;
  /// Decode every image once into a uint8 cache when it takes at most this many bytes; a larger set is
  /// decoded on the fly, a batch ahead, by background threads. 0: never cache.
  TORCH_ARG(int64_t, cache_limit) = int64_t{4} << 30;
  /// Threads that decode (0: the machine's hardware threads).
  TORCH_ARG(int64_t, workers) = 0;
};

/// A file that could not be used, and why.
struct SkippedFile {
  std::filesystem::path path;
  std::string reason;
};

/// What a scan of a directory tree found: the image files in sorted path order, their classes (with
/// folder_labels), and what was left out.
struct ImageIndex {
  std::filesystem::path root;
  std::vector<std::filesystem::path> files;
  /// One per file (empty without folder_labels).
  std::vector<int64_t> labels;
  /// The class names, sorted: label i is classes[i].
  std::vector<std::string> classes;
  /// Image files whose header could not be read (not an image, truncated, unsupported).
  std::vector<SkippedFile> skipped;
  /// Files that are not images by their extension (.png, .jpg, .jpeg, .bmp, any case).
  int64_t other_files = 0;

  /// The bytes a uint8 cache of every image at `size` x `size` with `channels` takes.
  int64_t cache_bytes(int64_t size, int64_t channels) const {
    return static_cast<int64_t>(files.size()) * channels * size * size;
  }
};

namespace detail {

inline bool is_image_file(const std::filesystem::path& path) {
  auto ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp";
}

/// "a, b, c and 4 more": the first few names of a list of files.
inline std::string first_names(const std::vector<SkippedFile>& files, size_t shown = 3) {
  std::string out;
  for (size_t i = 0; i < std::min(shown, files.size()); ++i) {
    out += (i ? ", " : "") + files[i].path.string() + " (" + files[i].reason + ")";
  }
  if (files.size() > shown) out += c10::str(" and ", files.size() - shown, " more");
  return out;
}

inline void check_image_options(const ImageFolderOptions& o, const char* who) {
  TORCH_CHECK(o.size() >= 1 && o.size() <= 16384, who, ": size must be in [1, 16384] pixels, got ", o.size());
  TORCH_CHECK(o.channels() == 1 || o.channels() == 3, who, ": channels must be 1 (grey) or 3 (RGB), got ", o.channels());
  const auto& bg = o.background();
  TORCH_CHECK(bg.size() == 3 && std::all_of(bg.begin(), bg.end(), [](int64_t v) { return v >= 0 && v <= 255; }), who,
              ": background must be 3 values (RGB) in [0, 255], got ", c10::IntArrayRef(bg));
  TORCH_CHECK(o.cache_limit() >= 0 && o.workers() >= 0, who, ": cache_limit and workers must be >= 0, got ", o.cache_limit(),
              " and ", o.workers());
}

/// Every directory under `dir` (following links to directories, each real directory once, so that a link
/// loop ends), and the regular files in it, in sorted order. Names starting with '.' are left out.
inline void walk(const std::filesystem::path& dir, std::set<std::filesystem::path>& seen,
                 std::vector<std::filesystem::path>& files) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto real = fs::canonical(dir, ec);
  if (ec || !seen.insert(real).second) return;
  std::vector<fs::path> entries;
  for (fs::directory_iterator it(dir, fs::directory_options::skip_permission_denied, ec), end; !ec && it != end;
       it.increment(ec)) {
    if (it->path().filename().string().rfind('.', 0) != 0) entries.push_back(it->path());
  }
  TORCH_CHECK(!ec, "ImageFolder: cannot list ", dir.string(), " (", ec.message(), ")");
  std::sort(entries.begin(), entries.end());
  for (const auto& entry : entries) {
    if (fs::is_directory(entry, ec)) walk(entry, seen, files);
    else if (fs::is_regular_file(entry, ec)) files.push_back(entry);
  }
}

}  // namespace detail

/// Scans `root` for images (ImageIndex): every PNG, JPEG and BMP file under it, in sorted path order,
/// following links to directories (each directory once: a link loop ends). Each file's header is read
/// (stbi_info) to check it is an image and how large; one that fails is skipped (ImageIndex::skipped) or,
/// with options.strict(), refused. Refused, naming the path: a root that is not a directory, a tree with
/// no readable image, an image smaller than options.size() without options.upscale(), and with
/// folder_labels an image directly in the root.
inline ImageIndex scan_images(const std::filesystem::path& root, const ImageFolderOptions& options) {
  namespace fs = std::filesystem;
  detail::check_image_options(options, "ImageFolder");
  TORCH_CHECK(fs::is_directory(root), "ImageFolder: ", root.string(),
              fs::exists(root) ? " is not a directory" : ": no such directory");
  ImageIndex index;
  index.root = root;
  std::set<fs::path> seen;
  std::vector<fs::path> all;
  detail::walk(root, seen, all);
  std::map<std::string, int64_t> class_of;
  std::vector<std::string> folder_of;
  for (const auto& path : all) {
    if (!detail::is_image_file(path)) {
      ++index.other_files;
      continue;
    }
    int w = 0, h = 0, c = 0;
    if (stbi_info(path.string().c_str(), &w, &h, &c) == 0) {
      const std::string reason = stbi_failure_reason() ? stbi_failure_reason() : "unreadable";
      TORCH_CHECK(!options.strict(), "ImageFolder: ", path.string(), " is not a readable image (", reason, ")");
      index.skipped.push_back({path, reason});
      continue;
    }
    TORCH_CHECK(options.upscale() || std::min(w, h) >= options.size(), "ImageFolder: ", path.string(), " is ", w, "x", h,
                ", smaller than the crop (", options.size(), "x", options.size(), ") and upscaling is off");
    if (options.folder_labels()) {
      const auto relative = path.lexically_relative(root);
      TORCH_CHECK(std::distance(relative.begin(), relative.end()) >= 2, "ImageFolder: ", path.string(),
                  " lies directly in ", root.string(), "; with folder labels every image must be in a class folder");
      folder_of.push_back(relative.begin()->string());
      class_of.emplace(folder_of.back(), 0);
    }
    index.files.push_back(path);
  }
  TORCH_CHECK(!index.files.empty(), "ImageFolder: ", root.string(), " holds no readable PNG, JPEG or BMP image",
              index.skipped.empty() ? std::string() : "; unreadable: " + detail::first_names(index.skipped));
  int64_t next = 0;
  for (auto& [name, label] : class_of) {
    label = next++;
    index.classes.push_back(name);
  }
  for (const auto& folder : folder_of) index.labels.push_back(class_of.at(folder));
  return index;
}

namespace detail {

/// load_image's work, for checked options: the image, or undefined with the reason in `error`.
inline torch::Tensor decode_image(const std::filesystem::path& path, const ImageFolderOptions& options, std::string& error) {
  int w = 0, h = 0, stored = 0;
  stbi_uc* pixels = stbi_load(path.string().c_str(), &w, &h, &stored, 4);
  if (pixels == nullptr) {
    error = stbi_failure_reason() ? stbi_failure_reason() : "unreadable";
    return {};
  }
  const int64_t side = std::min(w, h), x0 = (w - side) / 2, y0 = (h - side) / 2, c = options.channels();
  std::vector<float> square(static_cast<size_t>(side * side * c));
  const auto& bg = options.background();
  for (int64_t y = 0; y < side; ++y) {
    for (int64_t x = 0; x < side; ++x) {
      const stbi_uc* p = pixels + 4 * ((y + y0) * w + (x + x0));
      const float a = static_cast<float>(p[3]) / 255.0f;
      float rgb[3];
      for (int k = 0; k < 3; ++k) rgb[k] = a * static_cast<float>(p[k]) + (1 - a) * static_cast<float>(bg[k]);
      float* out = square.data() + (y * side + x) * c;
      if (c == 1) out[0] = 0.299f * rgb[0] + 0.587f * rgb[1] + 0.114f * rgb[2];
      else std::copy(rgb, rgb + 3, out);
    }
  }
  stbi_image_free(pixels);
  const int64_t size = options.size();
  std::vector<float> resized(static_cast<size_t>(size * size * c));
  if (side == size) {
    resized = std::move(square);
  } else if (stbir_resize_float_generic(square.data(), static_cast<int>(side), static_cast<int>(side), 0, resized.data(),
                                        static_cast<int>(size), static_cast<int>(size), 0, static_cast<int>(c),
                                        STBIR_ALPHA_CHANNEL_NONE, 0, STBIR_EDGE_CLAMP, STBIR_FILTER_BOX,
                                        STBIR_COLORSPACE_LINEAR, nullptr) == 0) {
    error = c10::str("resizing ", side, "x", side, " to ", size, "x", size, " failed");
    return {};
  }
  // Interleaved (H, W, C) to planes (C, H, W) by hand: no LibTorch kernel (and its thread pool) runs on the
  // decoding threads.
  auto out = torch::empty({c, size, size}, torch::kUInt8);
  auto* dst = out.data_ptr<uint8_t>();
  const int64_t plane = size * size;
  for (int64_t i = 0; i < plane; ++i) {
    for (int64_t k = 0; k < c; ++k) {
      dst[k * plane + i] = static_cast<uint8_t>(std::clamp(std::nearbyint(resized[static_cast<size_t>(i * c + k)]), 0.0f, 255.0f));
    }
  }
  return out;
}

}  // namespace detail

/// Decodes one image file to `options.size()` x `options.size()` with `options.channels()` channels,
/// as uint8 (C, size, size):
/// 1. transparent pixels are composited on options.background() (out = a c + (1 - a) b, a in [0, 1]);
/// 2. grey (channels 1) is ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B;
/// 3. the centred square of side min(W, H) is cut out (offsets floor((W - side) / 2), floor((H - side) / 2)),
///    which is a resize of the shorter side followed by a centre crop;
/// 4. it is resized to size x size with stb_image_resize's box filter (the area average for integer
///    ratios; a trapezoid otherwise), clamped at the edges, in linear values;
/// 5. rounded to the nearest integer.
/// 16-bit files are read at 8 bits. Refused, naming the file: one that stb_image cannot decode.
inline torch::Tensor load_image(const std::filesystem::path& path, const ImageFolderOptions& options) {
  detail::check_image_options(options, "load_image");
  std::string error;
  auto image = detail::decode_image(path, options, error);
  TORCH_CHECK(image.defined(), "load_image: ", path.string(), " is not a readable image (", error, ")");
  return image;
}

/// The images of a directory tree (scan_images), each as load_image makes it, as a Dataset of
/// (channels, size, size) float32 images in [-1, 1] (x / 127.5 - 1), labelled by folder when asked, and
/// flipped at random when asked. Decoded once into a uint8 cache when options.cache_limit() allows
/// (cache_bytes(); files that fail to decode then are skipped, or refused with strict), else decoded on the
/// fly: the Trainer's prefetch hands the next batch to background threads while a step trains, and
/// wait_seconds() says how long batches waited for them.
///
/// Example:
///   auto index = data::scan_images("emoji", data::ImageFolderOptions(32));
///   fmt::print("{} images, {} MB\n", index.files.size(), index.cache_bytes(32, 3) >> 20);
///   auto train = std::make_shared<data::ImageFolder>(index, data::ImageFolderOptions(32));
class ImageFolder : public Dataset {
 public:
  ImageFolder(const std::filesystem::path& root, ImageFolderOptions options)
      : ImageFolder(scan_images(root, options), options) {}

  ImageFolder(ImageIndex index, ImageFolderOptions options) : index_(std::move(index)), options_(std::move(options)) {
    detail::check_image_options(options_, "ImageFolder");
    TORCH_CHECK(!index_.files.empty(), "ImageFolder: the index holds no images");
    TORCH_CHECK(index_.labels.empty() || index_.labels.size() == index_.files.size(), "ImageFolder: the index has ",
                index_.labels.size(), " labels for ", index_.files.size(), " files");
    workers_ = options_.workers() > 0 ? options_.workers() : std::max<int64_t>(1, std::thread::hardware_concurrency());
    const auto bytes = index_.cache_bytes(options_.size(), options_.channels());
    if (bytes <= options_.cache_limit()) fill_cache();
    if (!index_.labels.empty()) labels_ = torch::tensor(index_.labels, torch::kLong);
  }

  ~ImageFolder() override {
    std::lock_guard lock(mutex_);
    if (pending_ && pending_->images.valid()) pending_->images.wait();
  }

  int64_t size() const override { return static_cast<int64_t>(index_.files.size()); }
  std::vector<int64_t> shape() const override { return {options_.channels(), options_.size(), options_.size()}; }

  torch::Tensor batch(const torch::Tensor& indices, const std::optional<AugmentationDraw>& draw) const override {
    check_indices(indices);
    const auto idx = indices.contiguous();  // read through data_ptr below
    torch::Tensor bytes;
    if (cache_.defined()) {
      bytes = cache_.index_select(0, idx);
    } else {
      std::optional<Pending> ready;
      {
        std::lock_guard lock(mutex_);
        if (pending_ && torch::equal(pending_->idx, idx)) ready.emplace(std::move(*pending_));
        pending_.reset();
      }
      if (ready) {
        const auto start = std::chrono::steady_clock::now();
        bytes = ready->images.get();
        wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } else {
        bytes = decode(index_.files, idx, options_, workers_);
        ++unannounced_;
      }
    }
    auto x = bytes.to(torch::kFloat32).div_(127.5).sub_(1);
    if (options_.flip() && draw) {
      const auto* i = idx.data_ptr<int64_t>();
      std::vector<int64_t> flipped;
      for (int64_t k = 0; k < idx.size(0); ++k) {
        if (augmentation_bits(*draw, i[k], /*stream=*/1) & 1) flipped.push_back(k);
      }
      if (!flipped.empty()) {
        const auto rows = torch::tensor(flipped, torch::kLong);
        x.index_copy_(0, rows, x.index_select(0, rows).flip({3}));
      }
    }
    return x;
  }

  torch::Tensor labels(const torch::Tensor& idx) const override {
    return labels_.defined() ? labels_.index_select(0, idx) : torch::Tensor();
  }
  int64_t num_classes() const override { return static_cast<int64_t>(index_.classes.size()); }

  void prefetch(const torch::Tensor& idx, const std::optional<AugmentationDraw>&) const override {
    if (cache_.defined()) return;
    check_indices(idx);
    auto copy = idx.contiguous().clone();
    auto future = std::async(std::launch::async, [files = &index_.files, copy, o = options_, n = workers_] {
      return decode(*files, copy, o, n);
    });
    std::lock_guard lock(mutex_);
    pending_.emplace(Pending{copy, std::move(future)});
  }

  /// The scan this folder was built from (files, labels, classes, what was skipped).
  const ImageIndex& index() const noexcept { return index_; }
  const ImageFolderOptions& options() const noexcept { return options_; }
  /// Whether the images sit decoded in memory.
  bool cached() const noexcept { return cache_.defined(); }
  /// Decoding on the fly: the seconds batch() waited for prefetched batches still being decoded (0 when
  /// the background threads kept ahead), and the batches read without a prefetch (decoded then: each
  /// epoch's first, validation).
  double wait_seconds() const noexcept { return wait_seconds_; }
  int64_t unannounced_batches() const noexcept { return unannounced_; }

 private:
  struct Pending {
    torch::Tensor idx;
    std::future<torch::Tensor> images;
  };

  void check_indices(const torch::Tensor& idx) const {
    TORCH_CHECK(idx.defined() && idx.dim() == 1 && idx.scalar_type() == torch::kLong && idx.device().is_cpu(),
                "ImageFolder: indices must be a 1-D int64 CPU tensor");
    TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < size()),
                "ImageFolder: indices must be in [0, ", size(), ")");
  }

  /// The images `idx` of `files` as uint8 (B, C, size, size), decoded by `workers` threads.
  static torch::Tensor decode(const std::vector<std::filesystem::path>& files, const torch::Tensor& idx,
                              const ImageFolderOptions& o, int64_t workers) {
    const int64_t n = idx.size(0), each = o.channels() * o.size() * o.size();
    auto out = torch::empty({n, o.channels(), o.size(), o.size()}, torch::kUInt8);
    const auto* i = idx.data_ptr<int64_t>();
    auto* dst = out.data_ptr<uint8_t>();
    std::atomic<int64_t> next{0};
    const auto work = [&] {
      for (int64_t k = next++; k < n; k = next++) {
        const auto& path = files[static_cast<size_t>(i[k])];
        std::string error;
        const auto image = detail::decode_image(path, o, error);
        TORCH_CHECK(image.defined(), "ImageFolder: ", path.string(), " is not a readable image (", error, "); decoding on "
                    "the fly cannot leave it out mid-run: remove it, or decode into memory (a cache_limit that holds the "
                    "set), which skips it");
        std::copy(image.data_ptr<uint8_t>(), image.data_ptr<uint8_t>() + each, dst + k * each);
      }
    };
    std::vector<std::future<void>> threads;
    for (int64_t t = 1; t < std::min(workers, n); ++t) threads.push_back(std::async(std::launch::async, work));
    std::exception_ptr failure;
    try {
      work();
    } catch (...) {
      failure = std::current_exception();
      next = n;
    }
    for (auto& thread : threads) {
      try {
        thread.get();
      } catch (...) {
        if (!failure) failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
    return out;
  }

  /// Decodes every file into the cache; those that fail are dropped (recorded as skipped) or, with strict,
  /// refused.
  void fill_cache() {
    const int64_t n = size(), each = options_.channels() * options_.size() * options_.size();
    auto cache = torch::empty({n, options_.channels(), options_.size(), options_.size()}, torch::kUInt8);
    std::vector<std::string> failures(static_cast<size_t>(n));
    std::atomic<int64_t> next{0};
    auto* dst = cache.data_ptr<uint8_t>();
    const auto work = [&] {
      for (int64_t k = next++; k < n; k = next++) {
        const auto image = detail::decode_image(index_.files[static_cast<size_t>(k)], options_, failures[static_cast<size_t>(k)]);
        if (image.defined()) std::copy(image.data_ptr<uint8_t>(), image.data_ptr<uint8_t>() + each, dst + k * each);
      }
    };
    std::vector<std::future<void>> threads;
    for (int64_t t = 1; t < std::min(workers_, n); ++t) threads.push_back(std::async(std::launch::async, work));
    work();
    for (auto& thread : threads) thread.get();
    std::vector<int64_t> kept;
    ImageIndex index = index_;
    index.files.clear();
    index.labels.clear();
    for (int64_t k = 0; k < n; ++k) {
      const auto& reason = failures[static_cast<size_t>(k)];
      if (reason.empty()) {
        kept.push_back(k);
        index.files.push_back(index_.files[static_cast<size_t>(k)]);
        if (!index_.labels.empty()) index.labels.push_back(index_.labels[static_cast<size_t>(k)]);
        continue;
      }
      TORCH_CHECK(!options_.strict(), "ImageFolder: ", index_.files[static_cast<size_t>(k)].string(),
                  " is not a readable image (", reason, ")");
      index.skipped.push_back({index_.files[static_cast<size_t>(k)], reason});
    }
    TORCH_CHECK(!kept.empty(), "ImageFolder: ", index_.root.string(), " holds no readable image; unreadable: ",
                detail::first_names(index.skipped));
    cache_ = static_cast<int64_t>(kept.size()) == n ? cache : cache.index_select(0, torch::tensor(kept, torch::kLong));
    index_ = std::move(index);
  }

  ImageIndex index_;
  ImageFolderOptions options_;
  int64_t workers_ = 1;
  torch::Tensor cache_, labels_;
  mutable std::mutex mutex_;
  mutable std::optional<Pending> pending_;
  mutable double wait_seconds_ = 0;
  mutable int64_t unannounced_ = 0;
};

}  // namespace diffusion::data
