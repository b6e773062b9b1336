#pragma once

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

/// What a file is, by its first bytes: one reading, one rule, for every reader that accepts more than one
/// format (import_weights, data::load_tensor_file).
namespace diffusion::detail {

enum class FileKind {
  Missing,      ///< no regular file at the path (none, or a directory)
  Zip,          ///< "PK\3\4": torch.save since PyTorch 1.6, torch::save, a checkpoint
  Npy,          ///< "\x93NUMPY": NumPy's np.save
  Safetensors,  ///< a little-endian header length, then the header's '{' at byte 8
  LegacyPickle, ///< torch.save before PyTorch 1.6: a bare pickle, protocol 2, its magic number as a LONG1
  Unknown,      ///< none of these
};

/// The kind of the file at `path`, from its first 9 bytes (read once).
inline FileKind file_kind(const std::filesystem::path& path) {
  if (!std::filesystem::is_regular_file(path)) return FileKind::Missing;
  std::string head(9, '\0');
  std::ifstream in(path, std::ios::binary);
  in.read(head.data(), 9);
  head.resize(static_cast<size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  const auto starts = [&](const std::string& magic) { return head.compare(0, magic.size(), magic) == 0; };
  if (head.size() >= 4 && starts(std::string("PK\x03\x04", 4))) return FileKind::Zip;
  if (head.size() >= 6 && starts("\x93NUMPY")) return FileKind::Npy;
  if (head.size() == 9 && head[8] == '{') return FileKind::Safetensors;  // before the pickle: any first bytes
  if (head.size() >= 3 && starts("\x80\x02\x8a")) return FileKind::LegacyPickle;
  return FileKind::Unknown;
}

}  // namespace diffusion::detail
