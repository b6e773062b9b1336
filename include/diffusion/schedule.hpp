#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

/// The variance schedule beta_1..beta_T and every quantity the forward and reverse processes derive
/// from it.
namespace diffusion {

/// How beta_t grows with t.
enum class ScheduleKind {
  /// beta_t linear from beta_start to beta_end (Ho et al. 2020, sec. 4; the seed's schedule).
  Linear,
  /// abar_t = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2), betas clipped at
  /// max_beta (Nichol & Dhariwal 2021, eq. 17).
  Cosine,
};

inline std::string to_string(ScheduleKind kind) { return kind == ScheduleKind::Linear ? "linear" : "cosine"; }

/// "linear" or "cosine"; anything else is refused, naming it.
inline ScheduleKind parse_schedule_kind(std::string_view s) {
  if (s == "linear") return ScheduleKind::Linear;
  if (s == "cosine") return ScheduleKind::Cosine;
  TORCH_CHECK(false, "parse_schedule_kind: expected \"linear\" or \"cosine\", got \"", std::string(s), "\"");
  return ScheduleKind::Linear;
}

/// Options for a NoiseSchedule. The defaults are the seed's: linear, T = 1000, beta 1e-4 to 0.02.
///
/// Example:
///   NoiseSchedule s(NoiseScheduleOptions().num_timesteps(1000).beta_start(1e-4).beta_end(0.02));
///   NoiseSchedule c(NoiseScheduleOptions().kind(ScheduleKind::Cosine));
///   NoiseSchedule z(NoiseScheduleOptions().zero_terminal_snr(true));   // for v or sample prediction
struct NoiseScheduleOptions {
  /// Number of diffusion steps T; timesteps are indexed 0..T-1 (index i is the paper's t = i + 1).
  TORCH_ARG(int64_t, num_timesteps) = 1000;
  TORCH_ARG(ScheduleKind, kind) = ScheduleKind::Linear;
  /// Linear schedule: first beta, in (0, 1).
  TORCH_ARG(double, beta_start) = 1e-4;
  /// Linear schedule: last beta, in (0, 1) and >= beta_start.
  TORCH_ARG(double, beta_end) = 0.02;
  /// Cosine schedule: the offset s that keeps beta_1 from being vanishingly small.
  TORCH_ARG(double, cosine_s) = 0.008;
  /// Cosine schedule: betas are clipped to this, avoiding the singularity at t = T.
  TORCH_ARG(double, max_beta) = 0.999;
  /// Rescale the schedule so that its last timestep is pure noise, abar_{T-1} = 0 (Lin et al. 2024,
  /// "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1): sqrt(abar) is shifted
  /// by its last value and scaled to keep its first, so the model learns to start from pure noise as
  /// sampling does. Needs a v or sample prediction (an epsilon prediction says nothing about x_0 where
  /// abar = 0) and a plan that visits T-1 (trailing or linspace spacing).
  TORCH_ARG(bool, zero_terminal_snr) = false;
  /// Storage dtype of the tables (they are always computed in float64 first).
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
};

/// The tables of a variance schedule, one entry per timestep index 0..T-1.
///
/// Computed in float64 from the closed forms, then stored in `options.dtype()` on the CPU; `to()`
/// moves a copy to another device or dtype. Notation follows Ho et al. 2020: alpha_t = 1 - beta_t,
/// abar_t = prod_{s <= t} alpha_s.
///
/// Example:
///   NoiseSchedule schedule;                       // the seed's linear schedule
///   auto on_gpu = schedule.to(torch::kCUDA);
///   float a = schedule.alphas_cumprod[999].item<float>();
class NoiseSchedule {
 public:
  explicit NoiseSchedule(NoiseScheduleOptions options = {}) : options_(options) {
    const int64_t T = options.num_timesteps();
    TORCH_CHECK(T >= 1, "NoiseSchedule: num_timesteps must be >= 1, got ", T);
    TORCH_CHECK(at::isFloatingType(options.dtype()), "NoiseSchedule: dtype must be floating point, got ",
                options.dtype());
    const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    torch::Tensor betas64;
    if (options.kind() == ScheduleKind::Linear) {
      const double b0 = options.beta_start(), b1 = options.beta_end();
      TORCH_CHECK(b0 > 0.0 && b0 < 1.0, "NoiseSchedule: beta_start must be in (0, 1), got ", b0);
      TORCH_CHECK(b1 > 0.0 && b1 < 1.0, "NoiseSchedule: beta_end must be in (0, 1), got ", b1);
      TORCH_CHECK(b0 <= b1, "NoiseSchedule: beta_start must be <= beta_end, got beta_start = ", b0,
                  " > beta_end = ", b1);
      betas64 = torch::linspace(b0, b1, T, f64);
    } else {
      const double s = options.cosine_s(), max_beta = options.max_beta();
      TORCH_CHECK(s >= 0.0, "NoiseSchedule: cosine_s must be >= 0, got ", s);
      TORCH_CHECK(max_beta > 0.0 && max_beta < 1.0, "NoiseSchedule: max_beta must be in (0, 1), got ", max_beta);
      // Nichol & Dhariwal 2021, eq. 17: beta_t = 1 - abar(t) / abar(t - 1), clipped to max_beta.
      // f is evaluated on the grid 0, 1/T, ..., 1; index i of the tables is the step from i/T to (i+1)/T.
      const auto grid = torch::arange(T + 1, f64) / static_cast<double>(T);
      const auto f = torch::cos((grid + s) / (1.0 + s) * (std::numbers::pi / 2)).pow(2);
      betas64 = (1.0 - f.slice(0, 1) / f.slice(0, 0, T)).clamp_max(max_beta);
    }
    auto abar = torch::cumprod(1.0 - betas64, 0);
    auto sqrt_abar = abar.sqrt();
    if (options.zero_terminal_snr()) {
      TORCH_CHECK(T >= 2, "NoiseSchedule: zero_terminal_snr needs num_timesteps >= 2, got ", T);
      // Lin et al. 2024, Algorithm 1: shift sqrt(abar) so its last value is 0, scale so its first stays.
      const double first = sqrt_abar[0].item<double>(), last = sqrt_abar[T - 1].item<double>();
      sqrt_abar = (sqrt_abar - last) * (first / (first - last));
      sqrt_abar[0] = first;  // exactly, whatever the rounding of the line above
      sqrt_abar[T - 1] = 0.0;
      abar = sqrt_abar * sqrt_abar;
      const auto abar_prev = torch::cat({torch::ones({1}, abar.options()), abar.slice(0, 0, -1)});
      betas64 = 1.0 - abar / abar_prev;
    }
    build(betas64, abar, sqrt_abar);
  }

  /// Number of diffusion steps T.
  int64_t num_timesteps() const noexcept { return options_.num_timesteps(); }
  const NoiseScheduleOptions& options() const noexcept { return options_; }

  /// The float64 values of the tables on the host, for scalar reads that must not wait on a device.
  struct HostTables {
    std::vector<double> betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod,
        sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas, posterior_variance;
    /// sigma_t = sqrt(1 - abar_t) / sqrt(abar_t) (see sigma()); +inf where abar_t = 0.
    std::vector<double> sigmas;
  };
  const HostTables& host() const noexcept { return *host_; }
  torch::Device device() const { return betas.device(); }
  torch::Dtype dtype() const { return betas.scalar_type(); }

  /// A copy of this schedule with every table on `device` in `dtype` (default: the current dtype).
  NoiseSchedule to(torch::Device device, std::optional<torch::Dtype> dtype = std::nullopt) const {
    NoiseSchedule out = *this;
    const auto target = dtype.value_or(this->dtype());
    TORCH_CHECK(at::isFloatingType(target), "NoiseSchedule::to: dtype must be floating point, got ", target);
    out.options_.dtype(target);
    for (auto* table : out.tables()) *table = table->to(device, target);
    return out;
  }

  /// The noise level of timestep index t: sigma_t = sqrt((1 - abar_t) / abar_t), the standard deviation of
  /// the noise in x_t / sqrt(abar_t) (the variance-exploding view of the same process, Karras et al. 2022,
  /// sec. 2 and Table 1). Between integer timesteps, log sigma is interpolated linearly, as k-diffusion's
  /// DiscreteSchedule does, so a model trained on the T integer timesteps can be asked at any noise level
  /// in [sigma(0), sigma(T-1)]. t: in [0, T-1]; anything else, NaN included, is refused. Increasing in t;
  /// +inf at a zero-terminal-SNR schedule's last index (and for any t above T-2 there).
  double sigma(double t) const {
    const int64_t T = num_timesteps();
    TORCH_CHECK(t >= 0.0 && t <= static_cast<double>(T - 1), "NoiseSchedule::sigma: t must be in [0, ", T - 1,
                "], got ", t);
    const auto& s = host().sigmas;
    const auto low = static_cast<size_t>(std::floor(t));
    const double w = t - static_cast<double>(low);
    if (w == 0.0) return s[low];
    return std::exp((1.0 - w) * std::log(s[low]) + w * std::log(s[low + 1]));
  }

  /// The inverse of sigma(t): the continuous timestep whose noise level is `sigma`, by linear interpolation
  /// in log sigma between the two timesteps around it (k-diffusion's DiscreteSchedule.sigma_to_t). sigma: in
  /// [sigma(0), sigma(T-1)] (a relative 1e-9 beyond either end is taken as that end, for plans computed from
  /// the ends); anything else, 0 and NaN included, is refused. Returns a value in [0, T-1]. On a
  /// zero-terminal-SNR schedule sigma(t) is +inf for every t above T-2, so there every finite sigma above
  /// sigma(T-2) gives T-2 and only +inf gives T-1: the two are inverses up to T-2.
  double timestep(double sigma) const {
    const auto& s = host().sigmas;
    const double lo = s.front(), hi = s.back();
    TORCH_CHECK(sigma > 0.0 && sigma >= lo * (1 - 1e-9) && (sigma <= hi * (1 + 1e-9) || std::isinf(hi)),
                "NoiseSchedule::timestep: sigma must be in the schedule's range [", lo, ", ", hi, "], got ", sigma);
    if (sigma <= lo) return 0.0;
    if (sigma >= hi) return static_cast<double>(s.size() - 1);
    // The first index whose sigma is >= the given one; the sigmas increase strictly (abar decreases).
    const auto high = static_cast<size_t>(std::lower_bound(s.begin(), s.end(), sigma) - s.begin());
    if (s[high] == sigma) return static_cast<double>(high);
    const size_t low = high - 1;
    if (std::isinf(s[high]) || s[high] == s[low]) return static_cast<double>(low);  // only +inf reaches T-1
    const double w = (std::log(sigma) - std::log(s[low])) / (std::log(s[high]) - std::log(s[low]));
    return static_cast<double>(low) + w;
  }

  /// sigma(0) and sigma(T-1): the range of noise levels the schedule trained on.
  double sigma_min() const { return host().sigmas.front(); }
  double sigma_max() const { return host().sigmas.back(); }

  /// beta_t.
  torch::Tensor betas;
  /// alpha_t = 1 - beta_t.
  torch::Tensor alphas;
  /// abar_t = prod_{s <= t} alpha_s (Ho et al. 2020, eq. 4).
  torch::Tensor alphas_cumprod;
  /// abar_{t-1}, with abar_{-1} = 1 at index 0.
  torch::Tensor alphas_cumprod_prev;
  /// sqrt(abar_t): the signal scale of x_t.
  torch::Tensor sqrt_alphas_cumprod;
  /// sqrt(1 - abar_t): the noise scale of x_t.
  torch::Tensor sqrt_one_minus_alphas_cumprod;
  /// 1 / sqrt(alpha_t) (Ho et al. 2020, eq. 11); inf at a zero-terminal-SNR schedule's last timestep.
  torch::Tensor sqrt_recip_alphas;
  /// beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t): the variance of q(x_{t-1} | x_t, x_0)
  /// (Ho et al. 2020, eq. 7). Exactly 0 at index 0.
  torch::Tensor posterior_variance;

 private:
  /// Every table, from beta_t, abar_t and sqrt(abar_t) in float64 (sqrt(abar) given apart, so that a
  /// rescaled schedule's end values are kept exactly).
  void build(const torch::Tensor& betas64, const torch::Tensor& abar, const torch::Tensor& sqrt_abar) {
    const auto alphas64 = 1.0 - betas64;
    const auto abar_prev = torch::cat({torch::ones({1}, abar.options()), abar.slice(0, 0, -1)});
    const auto dtype = options_.dtype();
    betas = betas64.to(dtype);
    alphas = alphas64.to(dtype);
    alphas_cumprod = abar.to(dtype);
    alphas_cumprod_prev = abar_prev.to(dtype);
    sqrt_alphas_cumprod = sqrt_abar.to(dtype);
    sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt().to(dtype);
    sqrt_recip_alphas = alphas64.rsqrt().to(dtype);
    const auto posterior64 = betas64 * (1.0 - abar_prev) / (1.0 - abar);
    posterior_variance = posterior64.to(dtype);
    const auto vec = [](const torch::Tensor& x) {
      const auto c = x.contiguous();
      return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    };
    host_ = std::make_shared<const HostTables>(HostTables{vec(betas64), vec(abar), vec(abar_prev), vec(sqrt_abar),
                                                          vec((1.0 - abar).sqrt()), vec(alphas64.rsqrt()),
                                                          vec(posterior64), vec((1.0 - abar).sqrt() / sqrt_abar)});
  }

  std::array<torch::Tensor*, 8> tables() {
    return {&betas,      &alphas, &alphas_cumprod, &alphas_cumprod_prev, &sqrt_alphas_cumprod,
            &sqrt_one_minus_alphas_cumprod, &sqrt_recip_alphas, &posterior_variance};
  }

  NoiseScheduleOptions options_;
  std::shared_ptr<const HostTables> host_;
};

/// NoiseScheduleOptions as JSON (how checkpoints record a schedule): every field by name, the kind as
/// "linear" or "cosine". Reading refuses unknown fields and kinds, naming them; absent fields keep their
/// defaults. The dtype is not recorded (the tables are always rebuilt from the closed forms).
inline void to_json(nlohmann::json& j, const NoiseScheduleOptions& o) {
  j = {{"num_timesteps", o.num_timesteps()}, {"kind", to_string(o.kind())}, {"beta_start", o.beta_start()},
       {"beta_end", o.beta_end()}, {"cosine_s", o.cosine_s()}, {"max_beta", o.max_beta()},
       {"zero_terminal_snr", o.zero_terminal_snr()}};
}

inline void from_json(const nlohmann::json& j, NoiseScheduleOptions& o) {
  TORCH_CHECK(j.is_object(), "NoiseScheduleOptions: expected a JSON object, got ", j.dump());
  for (const auto& [key, value] : j.items()) {
    if (key == "num_timesteps") o.num_timesteps(value.get<int64_t>());
    else if (key == "kind") o.kind(parse_schedule_kind(value.get<std::string>()));
    else if (key == "beta_start") o.beta_start(value.get<double>());
    else if (key == "beta_end") o.beta_end(value.get<double>());
    else if (key == "cosine_s") o.cosine_s(value.get<double>());
    else if (key == "max_beta") o.max_beta(value.get<double>());
    else if (key == "zero_terminal_snr") o.zero_terminal_snr(value.get<bool>());
    else TORCH_CHECK(false, "NoiseScheduleOptions: unknown field \"", key, "\"");
  }
}

}  // namespace diffusion
