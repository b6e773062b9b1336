#pragma once

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

namespace diffusion::detail {

/// Writes `bytes` to `path` so that a crash or a failure at any point leaves the previous file intact:
/// to `path.tmp`, flushed to the disk (fsync), renamed over `path`, and the directory flushed. A failed
/// write (disk full, file too large, no permission) removes the temporary file and is refused with the
/// reason, prefixed with `who` (the public function's name).
inline void write_file_atomically(const std::filesystem::path& path, const std::string& bytes, const char* who) {
  namespace fs = std::filesystem;
  const auto dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(dir, ec);
  TORCH_CHECK(!ec, who, ": cannot create the directory ", dir.string(), ": ", ec.message());
  auto tmp = path;
  tmp += ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TORCH_CHECK(fd >= 0, who, ": cannot write ", tmp.string(), ": ", std::strerror(errno));
  const auto fail = [&](const char* what, int err) {
    ::close(fd);
    fs::remove(tmp, ec);
    TORCH_CHECK(false, who, ": ", what, " ", path.string(), " failed: ", std::strerror(err), "; the previous file ",
                "(if any) is intact");
  };
  for (size_t done = 0; done < bytes.size();) {
    const auto n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("writing", n < 0 ? errno : ENOSPC);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) fail("flushing", errno);
  if (::close(fd) != 0) {
    const int err = errno;
    fs::remove(tmp, ec);
    TORCH_CHECK(false, who, ": closing ", tmp.string(), " failed: ", std::strerror(err), "; the previous file ",
                "(if any) is intact");
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    const auto reason = ec.message();
    fs::remove(tmp, ec);
    TORCH_CHECK(false, who, ": renaming ", tmp.string(), " to ", path.string(), " failed: ", reason,
                "; the previous file (if any) is intact");
  }
  // The rename is only durable once the directory is: a failure here is reported, though the new file is
  // already in place (a crash before the directory reaches the disk could bring back the previous one).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const int derr = dfd < 0 ? errno : ::fsync(dfd) != 0 ? errno : 0;
  if (dfd >= 0) ::close(dfd);
  TORCH_CHECK(derr == 0 || derr == EINVAL, who, ": wrote ", path.string(), " but flushing its directory ", dir.string(),
              " failed: ", std::strerror(derr), "; a crash now could bring back the previous file");
}

}  // namespace diffusion::detail
