#pragma once

#include <fmt/core.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#if defined(_WIN32)
#include <io.h>
#define DIFFUSION_ISATTY(f) _isatty(_fileno(f))
#else
#include <unistd.h>
#define DIFFUSION_ISATTY(f) isatty(fileno(f))
#endif

/// A tqdm-style progress display for training epochs.
namespace diffusion {

/// How progress is shown.
enum class ProgressMode {
  /// A bar redrawn in place when stderr is a terminal, else plain lines.
  Auto,
  /// Always the bar.
  Bar,
  /// Plain lines, one every `interval` seconds and one at the end (CI logs, pipes).
  Lines,
  /// Nothing.
  Off,
};

/// Shows `Epoch 3/100  45%|#####     | 212/469 [00:12<00:14, 17.3it/s, loss=0.0412]` on stderr.
class ProgressBar {
 public:
  ProgressBar(std::string description, int64_t total, ProgressMode mode = ProgressMode::Auto,
              double interval_seconds = 10.0)
      : description_(std::move(description)),
        total_(total),
        interval_(interval_seconds),
        start_(std::chrono::steady_clock::now()),
        last_(start_) {
    mode_ = mode == ProgressMode::Auto ? (DIFFUSION_ISATTY(stderr) ? ProgressMode::Bar : ProgressMode::Lines) : mode;
  }

  /// Whether update(done, ...) would print now: a caller can skip computing the loss (a wait for the
  /// device) when it would not.
  bool due(int64_t done) const {
    if (mode_ == ProgressMode::Off) return false;
    const double since_last = std::chrono::duration<double>(std::chrono::steady_clock::now() - last_).count();
    return done >= total_ || since_last >= (mode_ == ProgressMode::Bar ? 0.1 : interval_);
  }

  /// Reports `done` of `total` steps finished, with the running mean loss.
  void update(int64_t done, double loss) {
    done_ = done;
    loss_ = loss;
    const auto now = std::chrono::steady_clock::now();
    const double since_last = std::chrono::duration<double>(now - last_).count();
    const bool final = done >= total_;
    if (mode_ == ProgressMode::Bar && (since_last >= 0.1 || final)) {
      write("\r" + line() + "\x1b[K");
      last_ = now;
    } else if (mode_ == ProgressMode::Lines && (since_last >= interval_ || final)) {
      write(line() + "\n");
      last_ = now;
    }
  }

  /// Ends the bar's line (a no-op in the other modes).
  void finish() {
    if (mode_ == ProgressMode::Bar) write("\n");
  }

  /// The current text, e.g. for a callback.
  std::string line() const {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0.0;
    const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0.0;
    const double frac = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1.0;
    constexpr int width = 20;
    const int filled = static_cast<int>(frac * width);
    return fmt::format("{}  {:3.0f}%|{}{}| {}/{} [{}<{}, {:.2f}it/s, loss={:.4f}]", description_, frac * 100,
                       std::string(static_cast<size_t>(filled), '#'), std::string(static_cast<size_t>(width - filled), ' '),
                       done_, total_, clock(elapsed), clock(eta), rate, loss_);
  }

  ProgressMode mode() const noexcept { return mode_; }

 private:
  // Progress is a display: a stderr that cannot be written (a closed pipe, a full disk) must not stop the
  // work it reports on, so errors are ignored here (fmt::print would throw).
  static void write(const std::string& text) {
    (void)std::fwrite(text.data(), 1, text.size(), stderr);
    (void)std::fflush(stderr);
  }

  static std::string clock(double seconds) {
    const auto s = static_cast<int64_t>(seconds);
    return s >= 3600 ? fmt::format("{}:{:02d}:{:02d}", s / 3600, s / 60 % 60, s % 60)
                     : fmt::format("{:02d}:{:02d}", s / 60, s % 60);
  }

  std::string description_;
  int64_t total_;
  double interval_;
  ProgressMode mode_;
  std::chrono::steady_clock::time_point start_, last_;
  int64_t done_ = 0;
  double loss_ = 0;
};

}  // namespace diffusion
