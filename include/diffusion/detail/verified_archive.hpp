#pragma once

#include <diffusion/detail/atomic_file.hpp>
#include <diffusion/detail/pickle.hpp>
#include <diffusion/detail/zip.hpp>
#include <diffusion/errors.hpp>

#include <c10/util/hash.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

/// Integrity: what stands between LibTorch's archive reader and bytes that are damaged or crafted. A
/// LibTorch archive (a zip) is written with a checksum in its zip comment ("diffusion-sha1:" and the SHA-1
/// of every byte up to the comment, the end record included with its comment length counted as 0), and
/// read only after the checksum (or, in a file without one, each entry's CRC-32, which LibTorch skips), a
/// walk of its pickles (detail::check_pickle) and, after LibTorch has read it, of its tensors' bounds. What
/// the archive holds is the schema's business (checkpoint.hpp), not this file's.
namespace diffusion::detail {

inline constexpr std::string_view checksum_tag = "diffusion-sha1:";

/// SHA-1 (c10's) of `bytes` up to the end record, with the comment length counted as 0.
inline std::string archive_digest(const std::string& bytes, size_t end) {
  auto covered = bytes.substr(0, end + zip_end_record);
  covered[end + 20] = covered[end + 21] = '\0';
  return c10::sha1(covered).str();
}

/// Serializes `archive`, adds the checksum comment, and writes it atomically; `kind` names the file in
/// messages.
inline void save_archive(torch::serialize::OutputArchive& archive, const std::filesystem::path& path,
                         const std::string& kind = "checkpoint") {
  std::string bytes;
  archive.save_to([&bytes](const void* data, size_t size) -> size_t {
    bytes.append(static_cast<const char*>(data), size);
    return size;
  });
  const auto end = find_zip_end(bytes);
  TORCH_CHECK(end && bytes.size() == *end + zip_end_record, kind, ": LibTorch wrote an archive without a plain zip "
              "end record; cannot add the checksum to ", path.string());
  const std::string comment = std::string(checksum_tag) + archive_digest(bytes, *end);
  bytes[*end + 20] = static_cast<char>(comment.size() & 0xFF);
  bytes[*end + 21] = static_cast<char>(comment.size() >> 8);
  bytes += comment;
  write_file_atomically(path, bytes, kind.c_str());
}

/// Refuses as damaged, naming `file` ("checkpoint: run.pt"), a tensor anywhere in `archive` (nested
/// archives, lists and dicts included) whose view reaches past its storage: LibTorch rebuilds each tensor
/// from the pickle's offset, sizes and strides without checking them against the record, which a crafted
/// file makes point anywhere.
inline void check_tensor_bounds(torch::serialize::InputArchive& archive, const std::string& file) {
  const std::function<void(const c10::IValue&, const std::string&)> visit = [&](const c10::IValue& v, const std::string& key) {
    if (v.isTensor()) {
      const auto& t = v.toTensor();
      if (!t.defined() || t.numel() == 0 || !t.has_storage()) return;
      int64_t last = t.storage_offset();
      bool ok = last >= 0;
      for (int64_t d = 0; d < t.dim(); ++d) {
        ok = ok && t.stride(d) >= 0;
        last += (t.size(d) - 1) * t.stride(d);
      }
      DIFFUSION_CHECK(DamagedFileError, ok && last >= 0 && static_cast<uint64_t>(last) < t.storage().nbytes() / t.element_size(),
                      file, " is damaged: tensor '", key, "' reaches past its data (offset ", t.storage_offset(),
                      ", sizes ", t.sizes(), ", strides ", t.strides(), ", ", t.storage().nbytes(), " bytes stored)");
    } else if (v.isList()) {
      for (const auto& e : v.toListRef()) visit(e, key);
    } else if (v.isGenericDict()) {
      for (const auto& e : v.toGenericDict()) visit(e.value(), key);
    } else if (v.isTuple()) {
      for (const auto& e : v.toTupleRef().elements()) visit(e, key);
    }
  };
  const std::function<void(torch::serialize::InputArchive&, const std::string&)> walk =
      [&](torch::serialize::InputArchive& a, const std::string& prefix) {
        for (const auto& key : a.keys()) {
          torch::serialize::InputArchive nested;
          if (a.try_read(key, nested)) {
            walk(nested, prefix + key + ".");
            continue;
          }
          c10::IValue value;
          if (a.try_read(key, value)) visit(value, prefix + key);
        }
      };
  try {
    walk(archive, "");
  } catch (const DamagedFileError&) {
    throw;  // from visit
  } catch (const std::exception& e) {
    DIFFUSION_CHECK(DamagedFileError, false, file, " is damaged or not a LibTorch archive (", libtorch_reason(e.what()), ")");
  }
}

/// A LibTorch archive read and verified (open_archive), and whether it carried a diffusion checksum.
struct VerifiedArchive {
  torch::serialize::InputArchive archive;
  bool sealed = false;
};

/// Reads and verifies a LibTorch archive (a zip that torch::save or save_checkpoint wrote) into an
/// archive whose tensors land on `device`, naming the file as `kind` in messages ("checkpoint: run.pt
/// ..."). A missing file is a plain c10::Error; every way an existing file can be unreadable is a
/// DamagedFileError: not a regular file, empty, truncated or not a zip, a checksum that does not match (a
/// changed byte), in a file without one a zip entry that does not match its CRC-32, a zip entry outside
/// the file, a pickle that would make LibTorch's unpickler allocate far more than its size
/// (detail::check_pickle), an archive LibTorch cannot read, a tensor that reaches past its data.
inline VerifiedArchive open_archive(const std::filesystem::path& path, std::optional<torch::Device> device,
                                    const std::string& kind) {
  const auto name = path.string(), file = kind + ": " + name;
  TORCH_CHECK(std::filesystem::exists(path), file, ": no such file");
  DIFFUSION_CHECK(DamagedFileError, std::filesystem::is_regular_file(path), file, " is not a regular file (a directory, a pipe?)");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), file, ": cannot open it");
  const auto size = static_cast<size_t>(std::filesystem::file_size(path));
  DIFFUSION_CHECK(DamagedFileError, size > 0, file, " is empty (a save that never finished?)");
  // The end record lies in the last 64 kB: a large file that is no zip is refused before it is read.
  std::string bytes(std::min(size, zip_end_record + 0xFFFF), '\0');
  const size_t tail_at = size - bytes.size();
  in.seekg(static_cast<std::streamoff>(tail_at));
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  const auto tail_end = in ? find_zip_end(bytes) : std::nullopt;
  DIFFUSION_CHECK(DamagedFileError, tail_end, file, " is truncated or not a ",
                  kind == "checkpoint" ? "checkpoint" : "LibTorch archive", " (no zip end record)");
  const size_t end = tail_at + *tail_end;  // in the whole file
  bytes.assign(size, '\0');
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  TORCH_CHECK(in && in.peek() == std::char_traits<char>::eof(), file, ": cannot read it (", std::strerror(errno),
              "; did it change while being read?)");
  const std::string comment = bytes.substr(end + zip_end_record);
  VerifiedArchive out;
  out.sealed = comment.rfind(checksum_tag, 0) == 0;
  if (out.sealed) {
    DIFFUSION_CHECK(DamagedFileError, comment.substr(checksum_tag.size()) == archive_digest(bytes, end), file,
                    " is damaged: its contents do not match the checksum written with it");
  }
  const auto entries = zip_entries(bytes, end, file);
  if (!out.sealed) check_zip_crcs(bytes, entries, file);  // no checksum: the zip's own, which LibTorch skips
  // A checksum proves the file is as it was written, not that its writer was sound: the pickles are walked
  // before LibTorch's unpickler, which believes their lengths (a 4 GB string in 15 kB) and memo slots.
  // LibTorch finds entries by name ignoring case, so any "*.pkl" (data.PKL too), stored or deflated.
  for (const auto& entry : entries) {
    std::string lower = entry.name;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    if (lower.ends_with(".pkl") || lower.ends_with(".debug_pkl"))
      check_pickle(zip_entry_bytes(bytes, entry, file), file + " is damaged: its entry " + entry.name);
  }
  try {
    c10::optional<torch::Device> to;  // c10::optional is std::optional only from LibTorch 2.x
    if (device) to = *device;
    out.archive.load_from(bytes.data(), bytes.size(), to);
  } catch (const std::exception& e) {
    DIFFUSION_CHECK(DamagedFileError, false, file, " is damaged or not a LibTorch archive (", libtorch_reason(e.what()), ")");
  }
  check_tensor_bounds(out.archive, file);
  return out;
}

/// The value under `key`, refused as damage (naming `file`) when absent: a field the archive's format requires.
inline c10::IValue required_value(torch::serialize::InputArchive& a, const std::string& key, const std::string& file) {
  c10::IValue v;
  DIFFUSION_CHECK(DamagedFileError, a.try_read(key, v), file, " has no '", key, "' field");
  return v;
}

}  // namespace diffusion::detail
