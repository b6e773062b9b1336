#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

/// How a run directory names its checkpoints (RunOutputs writes them, a program resuming a run finds the
/// newest): `checkpoint_epoch_NNN.pt` after an epoch, `checkpoint_epoch_NNN_step_SSSSSS.pt` mid-epoch.
namespace diffusion {

/// The name run outputs give a checkpoint after `epoch` completed epochs and `step_in_epoch` steps of the
/// next: `checkpoint_epoch_NNN.pt`, or `checkpoint_epoch_NNN_step_SSSSSS.pt` mid-epoch. At least three and
/// six digits, so that names sort in the order they were written.
inline std::string checkpoint_filename(int64_t epoch, int64_t step_in_epoch = 0) {
  TORCH_CHECK(epoch >= 0 && step_in_epoch >= 0, "checkpoint_filename: epoch and step must be >= 0, got ", epoch, " and ",
              step_in_epoch);
  const auto padded = [](int64_t v, size_t width) {
    auto digits = std::to_string(v);
    if (digits.size() < width) digits.insert(0, width - digits.size(), '0');
    return digits;
  };
  return "checkpoint_epoch_" + padded(epoch, 3) + (step_in_epoch > 0 ? "_step_" + padded(step_in_epoch, 6) : "") + ".pt";
}

/// The checkpoints `checkpoint_epoch_NNN[_step_SSSSSS].pt` in `dir`, oldest first.
inline std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> out;
  if (!std::filesystem::is_directory(dir)) return out;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (name.starts_with("checkpoint_epoch_") && name.ends_with(".pt")) out.push_back(entry.path());
  }
  // By (epoch, step): names of different digit counts (epoch 1000 and up) sort by number, not by text.
  const auto position = [](const std::filesystem::path& p) {
    const auto name = p.filename().string();
    const auto rest = name.substr(17, name.size() - 17 - 3);  // after "checkpoint_epoch_", before ".pt"
    const auto cut = rest.find("_step_");
    try {
      return std::pair<int64_t, int64_t>{std::stoll(rest.substr(0, cut)),
                                         cut == std::string::npos ? 0 : std::stoll(rest.substr(cut + 6))};
    } catch (const std::exception&) {
      return std::pair<int64_t, int64_t>{-1, -1};
    }
  };
  std::sort(out.begin(), out.end(), [&](const auto& a, const auto& b) { return position(a) < position(b); });
  return out;
}

}  // namespace diffusion
