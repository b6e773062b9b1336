#pragma once

#include <diffusion/detail/atomic_file.hpp>
#include <diffusion/weights.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

/// Examples stored as arrays: vectors (N, D), sequences (N, C, L) or any (N, ...) tensor, from the files
/// NumPy and PyTorch write.
namespace diffusion::data {

namespace detail {

/// A NumPy dtype string and the LibTorch type it holds.
struct NpyType {
  const char* descr;
  torch::ScalarType type;
};
inline constexpr NpyType npy_types[] = {{"<f8", torch::kFloat64}, {"<f4", torch::kFloat32}, {"<f2", torch::kFloat16},
                                        {"<i8", torch::kInt64},   {"<i4", torch::kInt32},   {"<i2", torch::kInt16},
                                        {"|i1", torch::kInt8},    {"|u1", torch::kUInt8},   {"|b1", torch::kBool}};

/// The header of a .npy file: a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }.
/// Read by hand: the format fixes these three keys and a literal this simple (NumPy's own reader calls
/// ast.literal_eval); anything else in it is refused.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

inline NpyHeader parse_npy_header(const std::string& text, const std::string& name) {
  constexpr const char* fn = "load_npy";
  size_t i = 0;
  const auto fail = [&](const std::string& what) {
    TORCH_CHECK(false, fn, ": ", name, " has a malformed header (", what, " at character ", i, " of '", text, "')");
  };
  const auto skip = [&] {
    while (i < text.size() && (text[i] == ' ' || text[i] == '\n')) ++i;
  };
  const auto expect = [&](char c) {
    skip();
    if (i >= text.size() || text[i] != c) fail(std::string("expected '") + c + "'");
    ++i;
  };
  const auto string = [&] {
    skip();
    if (i >= text.size() || (text[i] != '\'' && text[i] != '"')) fail("expected a string");
    const char quote = text[i++];
    const auto end = text.find(quote, i);
    if (end == std::string::npos) fail("an unterminated string");
    auto s = text.substr(i, end - i);
    i = end + 1;
    return s;
  };
  NpyHeader header;
  bool seen[3] = {false, false, false};
  expect('{');
  for (;;) {
    skip();
    if (i < text.size() && text[i] == '}') break;
    const auto key = string();
    expect(':');
    skip();
    if (key == "descr" && !seen[0]) {
      if (i < text.size() && text[i] == '[') fail("a structured dtype, which holds no single array");
      header.descr = string();
      seen[0] = true;
    } else if (key == "fortran_order" && !seen[1]) {
      if (text.compare(i, 4, "True") == 0) {
        header.fortran_order = true;
        i += 4;
      } else if (text.compare(i, 5, "False") == 0) {
        i += 5;
      } else {
        fail("expected True or False");
      }
      seen[1] = true;
    } else if (key == "shape" && !seen[2]) {
      expect('(');
      for (;;) {
        skip();
        if (i < text.size() && text[i] == ')') break;
        if (i >= text.size() || !std::isdigit(static_cast<unsigned char>(text[i]))) fail("expected a dimension");
        int64_t d = 0;
        while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
          if (d > (int64_t{1} << 50)) fail("a dimension too large");
          d = d * 10 + (text[i++] - '0');
        }
        header.shape.push_back(d);
        skip();
        if (i < text.size() && text[i] == ',') ++i;
        else if (i >= text.size() || text[i] != ')') fail("expected ',' or ')'");
      }
      ++i;
      seen[2] = true;
    } else {
      fail("an unknown or repeated key '" + key + "'");
    }
    skip();
    if (i < text.size() && text[i] == ',') ++i;
    else if (i >= text.size() || text[i] != '}') fail("expected ',' or '}'");
  }
  ++i;
  skip();
  if (i != text.size()) fail("text after the dict");
  if (!(seen[0] && seen[1] && seen[2])) fail("a missing key (descr, fortran_order and shape are required)");
  return header;
}

}  // namespace detail

/// Reads a NumPy .npy file (format versions 1, 2 and 3; NumPy's np.save) as a CPU tensor of its dtype
/// and shape: float64/32/16, int64/32/16/8, uint8 or bool, C or Fortran order. Refused, naming the file:
/// not a .npy file, a malformed header, a big-endian or structured or other dtype LibTorch has no
/// type for (the message names it), a file shorter or longer than its shape needs.
///
/// Example:
///   auto x = data::load_npy("points.npy");   // np.save("points.npy", np.random.randn(1000, 2))
inline torch::Tensor load_npy(const std::filesystem::path& path) {
  constexpr const char* fn = "load_npy";
  const auto name = path.string();
  const auto bytes = diffusion::detail::read_bytes(path, fn);
  TORCH_CHECK(bytes.size() >= 10 && bytes.compare(0, 6, "\x93NUMPY") == 0, fn, ": ", name,
              " is not a .npy file (it does not start with \\x93NUMPY)");
  const auto major = static_cast<unsigned char>(bytes[6]);
  TORCH_CHECK(major >= 1 && major <= 3, fn, ": ", name, " is .npy format version ", int(major), ", not 1, 2 or 3");
  const auto u8 = [&](size_t k) { return static_cast<uint64_t>(static_cast<unsigned char>(bytes[k])); };
  const size_t preamble = major == 1 ? 10 : 12;
  TORCH_CHECK(bytes.size() >= preamble, fn, ": ", name, " is truncated (", bytes.size(), " bytes, no header length)");
  const uint64_t header_len = major == 1 ? u8(8) | u8(9) << 8 : u8(8) | u8(9) << 8 | u8(10) << 16 | u8(11) << 24;
  TORCH_CHECK(header_len <= bytes.size() - preamble, fn, ": ", name, " is truncated (its header says ", header_len,
              " bytes, ", bytes.size() - preamble, " follow)");
  const auto header = detail::parse_npy_header(bytes.substr(preamble, header_len), name);
  const auto* type = std::find_if(std::begin(detail::npy_types), std::end(detail::npy_types),
                                  [&](const auto& t) { return header.descr == t.descr; });
  // A one-byte type may be spelled with any byte order.
  if (type == std::end(detail::npy_types) && header.descr.size() == 3 && header.descr[2] == '1') {
    type = std::find_if(std::begin(detail::npy_types), std::end(detail::npy_types),
                        [&](const auto& t) { return header.descr.compare(1, 2, t.descr + 1) == 0; });
  }
  TORCH_CHECK(type != std::end(detail::npy_types), fn, ": ", name, " holds dtype '", header.descr, "'",
              header.descr.size() > 1 && header.descr[0] == '>' ? " (big-endian: save it with arr.astype(arr.dtype.newbyteorder('<')))" : "",
              "; supported: float64, float32, float16, int64, int32, int16, int8, uint8 and bool, little-endian");
  int64_t count = 1;
  for (const auto d : header.shape) {
    TORCH_CHECK(!__builtin_mul_overflow(count, d, &count), fn, ": ", name, " has a shape too large to hold");
  }
  const auto item = static_cast<int64_t>(c10::elementSize(type->type));
  int64_t need = 0;
  TORCH_CHECK(!__builtin_mul_overflow(count, item, &need), fn, ": ", name, " has a shape too large to hold");
  const auto have = static_cast<int64_t>(bytes.size() - preamble - header_len);
  TORCH_CHECK(have == need, fn, ": ", name, have < need ? " is truncated" : " is longer than its shape", " (shape (",
              c10::Join(", ", header.shape), ") of ", header.descr, " takes ", need, " bytes, ", have, " follow the header)");
  auto dims = header.shape;
  if (header.fortran_order) std::reverse(dims.begin(), dims.end());
  auto x = torch::empty(dims, torch::TensorOptions().dtype(type->type));
  if (need > 0) std::memcpy(x.data_ptr(), bytes.data() + preamble + header_len, static_cast<size_t>(need));
  if (header.fortran_order) {
    std::vector<int64_t> order(dims.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int64_t>(order.size() - 1 - k);
    x = x.permute(order).contiguous();
  }
  return x;
}

/// Writes `x` as a .npy file (format 1.0, C order, little-endian) that np.load reads, atomically like
/// checkpoints. Refused: an undefined tensor, a dtype .npy has no name for here (bfloat16 among them).
inline void save_npy(const std::filesystem::path& path, const torch::Tensor& x) {
  constexpr const char* fn = "save_npy";
  TORCH_CHECK(x.defined(), fn, ": the tensor is undefined");
  const auto* type = std::find_if(std::begin(detail::npy_types), std::end(detail::npy_types),
                                  [&](const auto& t) { return t.type == x.scalar_type(); });
  TORCH_CHECK(type != std::end(detail::npy_types), fn, ": ", path.string(), ": dtype ", x.scalar_type(),
              " has no .npy type here; convert it (to float32, say) first");
  const auto data = x.detach().to(torch::kCPU).contiguous();
  // Python's tuple syntax: (), (3,), (3, 2).
  std::string shape;
  for (int64_t k = 0; k < data.dim(); ++k) shape += (k > 0 ? ", " : "") + std::to_string(data.size(k));
  if (data.dim() == 1) shape += ',';
  std::string header = std::string("{'descr': '") + type->descr + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  // Padded with spaces and ended by a newline so the data start at a multiple of 64 bytes (NumPy's alignment).
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  TORCH_CHECK(header.size() < 65536, fn, ": ", path.string(), ": the shape is too long for a version 1.0 header");
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xFF);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(static_cast<const char*>(data.data_ptr()), static_cast<size_t>(data.numel() * data.element_size()));
  diffusion::detail::write_file_atomically(path, out, fn);
}

/// Which tensors of a file are the examples and their labels.
struct TensorFileOptions {
  /// The examples' name in a .safetensors or .pt file (empty: the file's only tensor, the labels aside).
  TORCH_ARG(std::string, key) = "";
  /// Read class labels, the tensor named labels_key: (N,) integers. A .npy file holds one array, so
  /// none.
  TORCH_ARG(bool, labels) = false;
  TORCH_ARG(std::string, labels_key) = "labels";
};

/// Examples read from a file, as training takes them.
struct TensorFile {
  /// (N, ...) float32 on the CPU, as stored (no scaling: diffusion assumes data of about unit scale).
  torch::Tensor examples;
  /// (N,) int64, or undefined when not asked for.
  torch::Tensor labels;
};

/// Reads training examples from a .npy file (np.save), a .safetensors file or a .pt file (torch.save of
/// a dict of tensors), told apart by their first bytes: vectors (N, D), sequences (N, C, L), images
/// (N, C, H, W) or any (N, ...), converted to float32. Refused, naming the file: what load_npy,
/// load_safetensors and load_torch_state_dict refuse; no tensor of that key, or several and no key (the
/// message lists them); fewer than 2 dimensions or an empty dimension; a non-numeric dtype; non-finite
/// values (the first one's example is named); labels asked of a .npy file, or missing, or not one
/// integer per example.
///
/// Example:
///   auto file = data::load_tensor_file("moons.npy");
///   auto train = std::make_shared<data::TensorDataset>(file.examples);
inline TensorFile load_tensor_file(const std::filesystem::path& path, const TensorFileOptions& options = {}) {
  constexpr const char* fn = "load_tensor_file";
  const auto name = path.string();
  using diffusion::detail::FileKind;
  const auto kind = diffusion::detail::file_kind(path);
  TORCH_CHECK(kind != FileKind::Missing, fn, ": ", name, ": no such file");
  TORCH_CHECK(kind != FileKind::Unknown, fn, ": ", name, " is not a .npy, .safetensors or .pt (torch.save) file: its "
              "first bytes are none of theirs");
  const bool npy = kind == FileKind::Npy;
  TensorFile file;
  if (npy) {
    TORCH_CHECK(options.key().empty(), fn, ": ", name, " is a .npy file, which holds one array with no name; drop the key ('",
                options.key(), "')");
    TORCH_CHECK(!options.labels(), fn, ": ", name, " is a .npy file, which holds one array and no labels; give the "
                "examples and their '", options.labels_key(), "' together in a .safetensors or .pt file");
    file.examples = load_npy(path);
  } else {
    const auto tensors = diffusion::detail::read_weights_file(path, fn);  // a legacy pickle: how to save it again
    std::vector<std::string> names;
    for (const auto& [n, t] : tensors) names.push_back(n);
    const auto find = [&](const std::string& key) {
      const auto it = std::find_if(tensors.begin(), tensors.end(), [&](const auto& p) { return p.first == key; });
      return it == tensors.end() ? torch::Tensor() : it->second;
    };
    if (!options.key().empty()) {
      file.examples = find(options.key());
      TORCH_CHECK(file.examples.defined(), fn, ": ", name, " has no tensor '", options.key(), "'; it has ", c10::Join(", ", names));
    } else {
      std::vector<std::string> candidates;
      for (const auto& n : names) {
        if (n != options.labels_key()) candidates.push_back(n);
      }
      TORCH_CHECK(candidates.size() == 1, fn, ": ", name, candidates.empty() ? " holds no examples" : " holds several tensors (",
                  c10::Join(", ", candidates), candidates.empty() ? "" : "); name the examples' (the key)");
      file.examples = find(candidates[0]);
    }
    if (options.labels()) {
      file.labels = find(options.labels_key());
      TORCH_CHECK(file.labels.defined(), fn, ": ", name, " has no labels: no tensor '", options.labels_key(), "' (it has ",
                  c10::Join(", ", names), ")");
    }
  }
  auto& x = file.examples;
  TORCH_CHECK(x.dim() >= 2 && x.numel() >= 1, fn, ": ", name, " holds shape ", x.sizes(),
              "; expected (N, ...) examples with N >= 1 and at least one value each: (N, D) vectors, (N, C, L) sequences, "
              "(N, C, H, W) images");
  TORCH_CHECK(x.scalar_type() != torch::kBool && !x.is_complex(), fn, ": ", name, " holds ", x.scalar_type(),
              " values; expected real numbers");
  x = x.to(torch::kFloat32).contiguous();
  const auto finite = torch::isfinite(x).reshape({x.size(0), -1}).all(1);
  if (!finite.all().item<bool>()) {
    const auto first = finite.logical_not().nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, fn, ": ", name, " holds non-finite values (NaN or inf), the first in example ", first, " (of ", x.size(0), ")");
  }
  if (file.labels.defined()) {
    const auto& y = file.labels;
    TORCH_CHECK(y.dim() == 1 && y.size(0) == x.size(0) && !y.is_floating_point() && y.scalar_type() != torch::kBool, fn, ": ",
                name, ": '", options.labels_key(), "' must hold one integer per example (", x.size(0), "), got ", y.scalar_type(),
                " of shape ", y.sizes());
    TORCH_CHECK(y.min().item<int64_t>() >= 0, fn, ": ", name, ": '", options.labels_key(), "' holds negative classes (",
                y.min().item<int64_t>(), ")");
    file.labels = y.to(torch::kLong);
  }
  return file;
}

}  // namespace diffusion::data
