#pragma once

// The few facts about zip archives (PKWARE APPNOTE 6.3) the checkpoint reader needs before LibTorch
// reads a file: where the end record is, and whether each entry still has its CRC-32.
// LibTorch's zip reader (miniz built with MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS) never checks the CRCs,
// so a changed byte in an unsealed archive reaches its unpickler. The CRC itself is zlib's.

#if !defined(DIFFUSION_NO_ZLIB)
#include <zlib.h>
#endif

#include <diffusion/errors.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace diffusion::detail {

inline constexpr size_t zip_end_record = 22;  // the end of central directory record, without its comment

inline uint64_t read_le(const std::string& b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | uint8_t(b[at + size_t(i)]);
  return v;
}
inline uint32_t read_le32(const std::string& b, size_t at) { return static_cast<uint32_t>(read_le(b, at, 4)); }

/// The offset of the zip's end record whose comment runs to the end of `bytes`, if there is one.
inline std::optional<size_t> find_zip_end(const std::string& bytes) {
  if (bytes.size() < zip_end_record) return std::nullopt;
  const size_t lowest = bytes.size() > zip_end_record + 0xFFFF ? bytes.size() - zip_end_record - 0xFFFF : 0;
  for (size_t at = bytes.size() - zip_end_record + 1; at-- > lowest;) {
    if (read_le32(bytes, at) != 0x06054b50) continue;
    const size_t comment = uint8_t(bytes[at + 20]) | size_t(uint8_t(bytes[at + 21])) << 8;
    if (at + zip_end_record + comment == bytes.size()) return at;
  }
  return std::nullopt;
}

/// Whether this build can check CRC-32s (it needs zlib; DIFFUSION_NO_ZLIB builds cannot).
inline constexpr bool can_check_zip_crcs =
#if defined(DIFFUSION_NO_ZLIB)
    false;
#else
    true;
#endif

#if !defined(DIFFUSION_NO_ZLIB)
/// Inflates `packed` bytes of raw deflate data, passing each piece to `sink`; true if they inflate to
/// exactly `size` bytes (never more are produced).
template <typename Sink>
bool inflate_raw(const char* data, uint64_t packed, uint64_t size, Sink&& sink) {
  z_stream stream{};
  if (inflateInit2(&stream, -MAX_WBITS) != Z_OK) return false;
  std::array<Bytef, 1 << 16> out{};
  uint64_t produced = 0;
  int status = Z_OK;
  while (status == Z_OK) {
    if (stream.avail_in == 0 && packed > 0) {  // fed in pieces: avail_in is 32 bits
      const auto piece = static_cast<uInt>(std::min<uint64_t>(packed, 1u << 30));
      stream.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data));
      stream.avail_in = piece;
      data += piece;
      packed -= piece;
    }
    stream.next_out = out.data();
    stream.avail_out = static_cast<uInt>(out.size());
    status = inflate(&stream, Z_NO_FLUSH);  // Z_BUF_ERROR (the input ran out early) or an error ends the loop
    const size_t got = out.size() - stream.avail_out;
    produced += got;
    if (produced > size) break;
    sink(out.data(), got);
  }
  inflateEnd(&stream);
  return status == Z_STREAM_END && produced == size;
}
#endif

/// The most a deflated entry may hold. LibTorch deflates only its TorchScript code (kilobytes); a larger
/// one is a zip bomb, which LibTorch would inflate whole.
inline constexpr uint64_t max_deflated_entry = uint64_t(256) << 20;

/// One entry of a zip's central directory, its data located.
struct ZipEntry {
  std::string name;
  uint64_t method = 0;  // 0 stored, 8 deflated
  uint32_t crc = 0;     // the CRC-32 the directory records for the data
  uint64_t data = 0;    // the offset of its (stored or deflated) bytes
  uint64_t packed = 0;  // how many bytes are there
  uint64_t size = 0;    // how many bytes they hold
};

/// The entries of the zip in `bytes` (end record at `end`). Each must be stored or deflated (the two ways
/// LibTorch writes them) and lie inside the file behind a local header; zip64 sizes and offsets are
/// followed. The first fault is refused as damage, naming the entry; `file` names the file in messages
/// ("checkpoint: run.pt").
inline std::vector<ZipEntry> zip_entries(const std::string& bytes, size_t end, const std::string& file) {
  const auto damaged = [&file](const auto&... what) {
    DIFFUSION_CHECK(DamagedFileError, false, file, " is damaged: ", what...);
  };
  uint64_t count = read_le(bytes, end + 10, 2);
  uint64_t directory = read_le32(bytes, end + 16);
  if (count == 0xFFFF || directory == 0xFFFFFFFF) {  // zip64: the locator sits just before the end record
    if (end < 20 || read_le32(bytes, end - 20) != 0x07064b50) damaged("its zip64 end record locator is missing");
    const uint64_t at = read_le(bytes, end - 20 + 8, 8);
    if (at > end - 20 || end - 20 - at < 56 || read_le32(bytes, size_t(at)) != 0x06064b50)
      damaged("its zip64 end record is missing");
    count = read_le(bytes, size_t(at) + 32, 8);
    directory = read_le(bytes, size_t(at) + 48, 8);
  }
  if (directory > end) damaged("its zip central directory starts past its end record");
  std::vector<ZipEntry> entries;
  size_t at = size_t(directory);
  for (uint64_t i = 0; i < count; ++i) {  // each entry takes 46 bytes or more, so `count` cannot run away
    if (end - at < 46 || read_le32(bytes, at) != 0x02014b50) damaged("zip central directory entry ", i, " is missing");
    ZipEntry entry;
    entry.method = read_le(bytes, at + 10, 2);
    entry.crc = read_le32(bytes, at + 16);
    entry.packed = read_le32(bytes, at + 20);
    entry.size = read_le32(bytes, at + 24);
    const size_t name_length = read_le(bytes, at + 28, 2), extra_length = read_le(bytes, at + 30, 2),
                 comment_length = read_le(bytes, at + 32, 2);
    uint64_t local = read_le32(bytes, at + 42);
    if (end - at - 46 < name_length + extra_length + comment_length) damaged("zip central directory entry ", i, " is cut");
    entry.name = bytes.substr(at + 46, name_length);
    // Zip64: each field that reads 0xFFFFFFFF is in the extra field 0x0001, in this order.
    for (size_t e = at + 46 + name_length, stop = e + extra_length; stop - e >= 4;) {
      const auto id = read_le(bytes, e, 2), length = read_le(bytes, e + 2, 2);
      if (stop - e - 4 < length) break;
      if (id == 0x0001) {
        size_t f = e + 4;
        for (uint64_t* field : {&entry.size, &entry.packed, &local}) {
          if (*field != 0xFFFFFFFF) continue;
          if (f + 8 > e + 4 + length) damaged("entry ", entry.name, " has a cut zip64 field");
          *field = read_le(bytes, f, 8);
          f += 8;
        }
      }
      e += 4 + length;
    }
    if (entry.method != 0 && entry.method != 8)
      damaged("entry ", entry.name, " uses zip method ", entry.method, ", which LibTorch does not write");
    if (entry.method == 8 && entry.size > max_deflated_entry)
      damaged("entry ", entry.name, " is deflated to ", entry.packed, " bytes from ", entry.size,
              ", more than LibTorch ever deflates (its code: kilobytes); a zip bomb?");
    if (entry.method == 0 && entry.packed != entry.size)
      damaged("entry ", entry.name, " records ", entry.packed, " stored bytes for ", entry.size, " bytes of data");
    if (local > directory || directory - local < 30 || read_le32(bytes, size_t(local)) != 0x04034b50)
      damaged("entry ", entry.name, " has no local zip header where its directory entry points");
    entry.data = local + 30 + read_le(bytes, size_t(local) + 26, 2) + read_le(bytes, size_t(local) + 28, 2);
    if (entry.data > directory || directory - entry.data < entry.packed) damaged("entry ", entry.name, " runs past the zip's data");
    entries.push_back(std::move(entry));
    at += 46 + name_length + extra_length + comment_length;
  }
  return entries;
}

/// The data `entry` holds: its stored bytes, or its deflated ones inflated. Refused, naming `file`, when
/// they do not inflate to the recorded size. Without zlib, a deflated entry is refused.
inline std::string zip_entry_bytes(const std::string& bytes, const ZipEntry& entry, const std::string& file) {
  if (entry.method == 0) return bytes.substr(size_t(entry.data), size_t(entry.size));
  std::string out;
#if !defined(DIFFUSION_NO_ZLIB)
  out.reserve(size_t(entry.size));
  const bool whole = inflate_raw(bytes.data() + entry.data, entry.packed, entry.size,
                                 [&out](const Bytef* piece, size_t n) { out.append(reinterpret_cast<const char*>(piece), n); });
  DIFFUSION_CHECK(DamagedFileError, whole, file, " is damaged: entry ", entry.name, " does not inflate to its recorded ",
              entry.size, " bytes");
#else
  TORCH_CHECK(false, file, ": entry ", entry.name, " is deflated and this build has no zlib (DIFFUSION_NO_ZLIB)");
#endif
  return out;
}

/// Refuses the first of `entries` (from zip_entries) whose data do not have the CRC-32 the directory
/// records, naming `file` and the entry. Without zlib (DIFFUSION_NO_ZLIB) it checks nothing.
inline void check_zip_crcs(const std::string& bytes, const std::vector<ZipEntry>& entries, const std::string& file) {
#if !defined(DIFFUSION_NO_ZLIB)
  for (const auto& entry : entries) {
    const char* start = bytes.data() + entry.data;
    uLong crc = crc32_z(0L, Z_NULL, 0);
    const auto add = [&crc](const Bytef* piece, size_t n) { crc = crc32_z(crc, piece, n); };
    if (entry.method == 0) {
      add(reinterpret_cast<const Bytef*>(start), size_t(entry.size));
    } else {
      DIFFUSION_CHECK(DamagedFileError, inflate_raw(start, entry.packed, entry.size, add), file, " is damaged: entry ",
                  entry.name, " does not inflate to its recorded ", entry.size, " bytes (a changed byte)");
    }
    DIFFUSION_CHECK(DamagedFileError, static_cast<uint32_t>(crc) == entry.crc, file, " is damaged: entry ", entry.name,
                " does not match its CRC-32 (a changed byte)");
  }
#else
  (void)bytes, (void)entries, (void)file;
#endif
}

}  // namespace diffusion::detail
