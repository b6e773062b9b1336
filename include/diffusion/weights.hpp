#pragma once

#include <diffusion/detail/file_kind.hpp>
#include <diffusion/detail/atomic_file.hpp>
#include <diffusion/detail/pickle.hpp>

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/in_memory_adapter.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/jit/serialization/unpickler.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

/// Weights that Python reads, and the other way: safetensors files (the format diffusers and the
/// Hugging Face hub use) and files written by Python's torch.save, by the modules' parameter names (the
/// library's backbones use the seed's names, so its PyTorch classes load them and the other way).
namespace diffusion {

/// Named tensors, in file order.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

namespace detail {

struct SafetensorsType {
  const char* name;
  torch::ScalarType type;
};
inline constexpr SafetensorsType safetensors_types[] = {
    {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16},
    {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},   {"I8", torch::kInt8},
    {"U8", torch::kUInt8},    {"BOOL", torch::kBool}};

inline std::string read_bytes(const std::filesystem::path& path, const char* fn) {
  TORCH_CHECK(std::filesystem::is_regular_file(path), fn, ": ", path.string(), ": no such file");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), fn, ": ", path.string(), ": cannot open it");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace detail

/// Writes `tensors` as a safetensors file: an 8-byte little-endian header length, a JSON header
/// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with spaces to
/// a multiple of 8 bytes, then each tensor's bytes (contiguous, little-endian) in order. Written
/// atomically like checkpoints (a temporary file, fsync, rename), so a failed write (a full disk, no
/// permission) leaves the previous file intact and is refused with the reason. Also refused: a duplicate or empty
/// name, an undefined tensor, a dtype safetensors has no name for.
///
/// Example:
///   save_safetensors("weights.safetensors", {{"w", torch::ones({2, 3})}}, {{"format", "pt"}});
inline void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  constexpr const char* fn = "save_safetensors";
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> data;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(!name.empty() && name != "__metadata__", fn, ": tensor names must be non-empty and not __metadata__");
    TORCH_CHECK(names.insert(name).second, fn, ": the name '", name, "' appears twice");
    TORCH_CHECK(tensor.defined(), fn, ": '", name, "' is an undefined tensor");
    const auto* type = std::find_if(std::begin(detail::safetensors_types), std::end(detail::safetensors_types),
                                    [&](const auto& t) { return t.type == tensor.scalar_type(); });
    TORCH_CHECK(type != std::end(detail::safetensors_types), fn, ": '", name, "' has dtype ", tensor.scalar_type(),
                ", which safetensors cannot hold");
    auto bytes = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t size = static_cast<uint64_t>(bytes.numel()) * bytes.element_size();
    header[name] = {{"dtype", type->name}, {"shape", tensor.sizes().vec()}, {"data_offsets", {offset, offset + size}}};
    offset += size;
    data.push_back(bytes);
  }
  auto text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<char>((uint64_t(text.size()) >> (8 * i)) & 0xFF);
  out += text;
  for (const auto& t : data) out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  detail::write_file_atomically(path, out, fn);
}

/// Reads a safetensors file into named tensors (file order) and its metadata. Refused, naming the file:
/// a file shorter than its header says, a header that is not JSON or not safetensors' (unknown dtype,
/// a shape that does not match its byte range, ranges that overlap, leave holes or run past the end).
inline NamedTensors load_safetensors(const std::filesystem::path& path,
                                     std::map<std::string, std::string>* metadata = nullptr) {
  constexpr const char* fn = "load_safetensors";
  const auto name = path.string();
  const auto bytes = detail::read_bytes(path, fn);
  TORCH_CHECK(bytes.size() >= 8, fn, ": ", name, " is truncated (", bytes.size(), " bytes, no header length)");
  uint64_t header_size = 0;
  for (size_t i = 0; i < 8; ++i) header_size |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  TORCH_CHECK(header_size <= bytes.size() - 8, fn, ": ", name, " is truncated or not safetensors (a header of ",
              header_size, " bytes in a file of ", bytes.size(), ")");
  nlohmann::ordered_json header;
  try {
    header = nlohmann::ordered_json::parse(bytes.substr(8, header_size));
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, fn, ": ", name, " has a header that is not JSON (", e.what(), ")");
  }
  TORCH_CHECK(header.is_object(), fn, ": ", name, "'s header is not a JSON object");
  const auto data_start = 8 + header_size;
  const auto data_size = bytes.size() - data_start;
  NamedTensors out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  try {
    for (const auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        if (metadata) *metadata = entry.get<std::map<std::string, std::string>>();
        continue;
      }
      const auto dtype = entry.at("dtype").get<std::string>();
      const auto* type = std::find_if(std::begin(detail::safetensors_types), std::end(detail::safetensors_types),
                                      [&](const auto& t) { return dtype == t.name; });
      TORCH_CHECK(type != std::end(detail::safetensors_types), fn, ": ", name, ": '", key, "' has dtype ", dtype,
                  ", which this library does not read");
      const auto shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto range = entry.at("data_offsets").get<std::vector<uint64_t>>();
      TORCH_CHECK(range.size() == 2 && range[0] <= range[1] && range[1] <= data_size, fn, ": ", name, ": '", key,
                  "' has data_offsets outside the file's ", data_size, " bytes of data");
      uint64_t count = 1;
      const uint64_t element = c10::elementSize(type->type);
      bool overflow = false;
      for (const auto d : shape) {
        TORCH_CHECK(d >= 0, fn, ": ", name, ": '", key, "' has a negative dimension");
        overflow |= __builtin_mul_overflow(count, static_cast<uint64_t>(d), &count);
      }
      overflow |= __builtin_mul_overflow(count, element, &count);
      TORCH_CHECK(!overflow && count == range[1] - range[0], fn, ": ", name, ": '", key, "' has shape ",
                  torch::IntArrayRef(shape), " of ", dtype, " (", overflow ? std::string("more than 2^64") : std::to_string(count),
                  " bytes) but ", range[1] - range[0], " bytes of data");
      count /= element;
      auto tensor = torch::empty(shape, torch::TensorOptions().dtype(type->type));
      if (count > 0) std::memcpy(tensor.data_ptr(), bytes.data() + data_start + range[0], range[1] - range[0]);
      out.emplace_back(key, tensor);
      ranges.emplace_back(range[0], range[1]);
    }
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, fn, ": ", name, " has a malformed header (", e.what(), ")");
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t covered = 0;
  for (const auto& [begin, end] : ranges) {
    TORCH_CHECK(begin == covered, fn, ": ", name, "'s tensors ", begin < covered ? "overlap" : "leave a hole",
                " at byte ", begin, " of the data");
    covered = end;
  }
  TORCH_CHECK(covered == data_size, fn, ": ", name, " has ", data_size - covered, " bytes after its last tensor");
  return out;
}

/// Reads a file written by Python's torch.save: a dict of tensors (a state_dict, the OrderedDict that
/// `model.state_dict()` returns included), or a training checkpoint dict holding one under
/// "model_state_dict", "state_dict" or "model" (as the seed writes: {'epoch', 'model_state_dict',
/// 'optimizer_state_dict'}). Returns the tensors by name, on the CPU. Refused, naming the file: a file
/// that is not a torch.save zip, and one whose contents are not such a dict.
inline NamedTensors load_torch_state_dict(const std::filesystem::path& path) {
  constexpr const char* fn = "load_torch_state_dict";
  const auto name = path.string();
  const auto bytes = detail::read_bytes(path, fn);
  c10::IValue value;
  try {
    caffe2::serialize::PyTorchStreamReader reader(
        std::make_shared<caffe2::serialize::MemoryReadAdapter>(bytes.data(), bytes.size()));
    auto [pickle_data, pickle_size] = reader.getRecord("data.pkl");
    const auto pickle = detail::rewrite_ordered_dicts(
        std::string(static_cast<const char*>(pickle_data.get()), pickle_size), name);
    size_t at = 0;
    torch::jit::Unpickler unpickler(
        [&](char* out, size_t n) {
          n = std::min(n, pickle.size() - at);
          std::memcpy(out, pickle.data() + at, n);
          at += n;
          return n;
        },
        nullptr, nullptr, [&](const std::string& record) { return std::get<0>(reader.getRecord("data/" + record)); },
        c10::optional<at::Device>(at::kCPU));
    unpickler.set_version(reader.version());
    value = unpickler.parse_ivalue();
  } catch (const std::exception& e) {
    const auto* error = dynamic_cast<const c10::Error*>(&e);
    const std::string what = error ? error->what_without_backtrace() : e.what();
    TORCH_CHECK(false, fn, ": ", name, " is not a file torch.save wrote, or is damaged (", detail::libtorch_reason(what), ")");
  }
  TORCH_CHECK(value.isGenericDict(), fn, ": ", name, " holds a ", value.tagKind(), ", not a dict of tensors");
  auto dict = value.toGenericDict();
  for (const auto* key : {"model_state_dict", "state_dict", "model"}) {
    const auto it = dict.find(c10::IValue(std::string(key)));
    if (it != dict.end() && it->value().isGenericDict()) {
      dict = it->value().toGenericDict();
      break;
    }
  }
  NamedTensors out;
  for (const auto& item : dict) {
    if (item.key().isString() && item.key().toStringRef().rfind(detail::pickle_junk_prefix, 0) == 0) continue;
    TORCH_CHECK(item.key().isString() && item.value().isTensor(), fn, ": ", name, " is not a dict of tensors (entry ",
                item.key().isString() ? item.key().toStringRef() : std::string("?"), " holds a ", item.value().tagKind(),
                "); save `model.state_dict()` or a dict with one under 'model_state_dict'");
    out.emplace_back(item.key().toStringRef(), item.value().toTensor());
  }
  return out;
}

/// `module`'s parameters and buffers by their names, as safetensors (see save_safetensors). The
/// library's backbones use the seed's names, so its PyTorch classes load the file with
/// `model.load_state_dict(safetensors.torch.load_file(path))`.
inline void export_weights(const torch::nn::Module& module, const std::filesystem::path& path,
                           const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  NamedTensors tensors;
  for (const auto& p : module.named_parameters()) tensors.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers()) tensors.emplace_back(b.key(), b.value());
  save_safetensors(path, tensors, metadata);
}

namespace detail {

/// The named tensors of a weights file of either format `fn` reads, told apart by their first bytes
/// (file_kind): a torch.save zip (load_torch_state_dict) or safetensors (load_safetensors, whose metadata
/// lands in `metadata` when given). Refused, naming the file: a missing file, torch.save's format before
/// PyTorch 1.6 (a bare pickle), and a file of neither format.
inline NamedTensors read_weights_file(const std::filesystem::path& path, const char* fn,
                                      std::map<std::string, std::string>* metadata = nullptr) {
  switch (file_kind(path)) {
    case FileKind::Zip:
      return load_torch_state_dict(path);
    case FileKind::Safetensors:
      return load_safetensors(path, metadata);
    case FileKind::Missing:
      TORCH_CHECK(false, fn, ": ", path.string(), ": no such file");
    case FileKind::LegacyPickle:
      TORCH_CHECK(false, fn, ": ", path.string(), " is a legacy torch.save file (a bare pickle, not a zip); save it again "
                  "with torch.save in PyTorch 1.6 or later (the default zip format), or as safetensors");
    default:
      TORCH_CHECK(false, fn, ": ", path.string(), " is neither safetensors (a header length, then '{' at byte 8) nor a "
                  "torch.save file (a zip), the two formats ", fn, " reads");
  }
}

}  // namespace detail

/// The metadata of a weights file import_weights reads: a safetensors file's "__metadata__" (what
/// export_weights was given), empty for a torch.save file, which has none. Refused as import_weights
/// refuses the file.
inline std::map<std::string, std::string> weights_metadata(const std::filesystem::path& path) {
  std::map<std::string, std::string> metadata;
  if (detail::file_kind(path) != detail::FileKind::Zip) detail::read_weights_file(path, "weights_metadata", &metadata);
  return metadata;
}

/// Loads weights by name into `module` from a safetensors file or a torch.save file (told apart by
/// their first bytes), converting dtypes to the module's. Every parameter and buffer must be present
/// with its shape, and nothing else: refused, naming the file and the missing, extra or mismatched
/// names.
///
/// Example:
///   ConvNet model;                              // the seed's architecture
///   import_weights(*model, "seed_model.pt");    // torch.save(model.state_dict(), ...) in Python
inline void import_weights(torch::nn::Module& module, const std::filesystem::path& path) {
  constexpr const char* fn = "import_weights";
  const auto loaded = detail::read_weights_file(path, fn);
  std::map<std::string, torch::Tensor> by_name(loaded.begin(), loaded.end());
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;  // checked first, copied only if all fit
  std::vector<std::string> missing, mismatched;
  const auto match = [&](const std::string& key, const torch::Tensor& target) {
    const auto it = by_name.find(key);
    if (it == by_name.end()) {
      missing.push_back(key);
      return;
    }
    if (it->second.sizes() != target.sizes()) {
      mismatched.push_back(c10::str(key, " (file ", it->second.sizes(), ", model ", target.sizes(), ")"));
    } else {
      copies.emplace_back(target, it->second);
    }
    by_name.erase(it);
  };
  for (const auto& p : module.named_parameters()) match(p.key(), p.value());
  for (const auto& b : module.named_buffers()) match(b.key(), b.value());
  const auto list = [](const auto& names) {
    std::string s;
    for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
    return s;
  };
  std::vector<std::string> extra;
  for (const auto& [key, value] : by_name) extra.push_back(key);
  TORCH_CHECK(missing.empty() && mismatched.empty() && extra.empty(), fn, ": ", path.string(),
              " does not fit this model:", missing.empty() ? "" : " missing " + list(missing) + ";",
              mismatched.empty() ? "" : " other shapes " + list(mismatched) + ";",
              extra.empty() ? "" : " not in the model " + list(extra) + ";");
  torch::NoGradGuard no_grad;
  for (auto& [target, value] : copies) target.copy_(value.to(target.device(), target.scalar_type()));
}

}  // namespace diffusion
