#pragma once

#include <diffusion/backbones/embedding.hpp>
#include <diffusion/detail/json.hpp>
#include <diffusion/platform.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/registry.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffusion {

/// Options for a TemporalUNet. The defaults are Janner et al.'s (2022) network at its dim 32 with
/// multipliers 1, 2, 4 (widths 32, 64, 128) and kernel 5.
///
/// Example:
///   TemporalUNet net(TemporalUNetOptions().channels(2).widths({64, 128, 256}));   // (N, 2, L), L % 4 == 0
struct TemporalUNetOptions {
  /// What the sequence length must be divisible by: 2^(levels - 1). (Declared before the TORCH_ARG
  /// members, which leave what follows them private.)
  int64_t length_multiple() const { return int64_t{1} << (widths().empty() ? 0 : widths().size() - 1); }

  /// Channels of the sequence: the features per time step (a trajectory's state and action, a sensor's axes).
  TORCH_ARG(int64_t, channels) = 1;
  /// One width per level, from the full length down; each level after the first halves the length.
  TORCH_ARG(std::vector<int64_t>, widths) = std::vector<int64_t>{32, 64, 128};
  /// Width of every 1-D convolution's kernel (odd, so the length is kept).
  TORCH_ARG(int64_t, kernel_size) = 5;
  /// Width of the sinusoidal time embedding and of its MLP (0: widths[0], as Janner et al.).
  TORCH_ARG(int64_t, time_dim) = 0;
  /// GroupNorm groups; must divide every width.
  TORCH_ARG(int64_t, groups) = 8;
  /// Class-conditional with this many classes (see ClassEmbedding); 0: unconditional.
  TORCH_ARG(int64_t, num_classes) = 0;
};

namespace detail {

/// Mish, x tanh(softplus(x)) (Misra 2019), in float32 for a bfloat16 x on the CPU, where LibTorch 1.13 has
/// no bf16 kernel for it (autocast hands it the bf16 output of a Linear); other inputs as they come.
inline torch::Tensor mish(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kBFloat16 && x.device().is_cpu()) return torch::mish(x.to(torch::kFloat32)).to(x.scalar_type());
  return torch::mish(x);
}

}  // namespace detail

/// Conv1d -> GroupNorm -> Mish, the length kept (Janner et al. 2022's Conv1dBlock).
class TemporalConvBlockImpl : public torch::nn::Cloneable<TemporalConvBlockImpl> {
 public:
  TemporalConvBlockImpl(int64_t in, int64_t out, int64_t kernel, int64_t groups)
      : in_(in), out_(out), kernel_(kernel), groups_(groups) {
    reset();
  }
  void reset() override {
    using namespace torch::nn;
    conv = register_module("conv", Conv1d(Conv1dOptions(in_, out_, kernel_).padding(kernel_ / 2)));
    norm = register_module("norm", GroupNorm(groups_, out_));
  }
  torch::Tensor forward(const torch::Tensor& x) { return detail::mish(detail::group_norm(norm, conv(x))); }

  torch::nn::Conv1d conv{nullptr};
  torch::nn::GroupNorm norm{nullptr};

 private:
  int64_t in_, out_, kernel_, groups_;
};
TORCH_MODULE(TemporalConvBlock);

/// Two TemporalConvBlocks with the time embedding (through Mish and a Linear) added to every step
/// between them, and a residual path (a 1x1 conv when the width changes): Janner et al.'s
/// ResidualTemporalBlock.
class TemporalResBlockImpl : public torch::nn::Cloneable<TemporalResBlockImpl> {
 public:
  TemporalResBlockImpl(int64_t in, int64_t out, int64_t time_dim, int64_t kernel, int64_t groups)
      : in_(in), out_(out), time_dim_(time_dim), kernel_(kernel), groups_(groups) {
    reset();
  }
  void reset() override {
    using namespace torch::nn;
    TORCH_CHECK(out_ % groups_ == 0, "TemporalUNet: groups (", groups_, ") must divide every width, got ", out_);
    block1 = register_module("block1", TemporalConvBlock(in_, out_, kernel_, groups_));
    time = register_module("time", Linear(time_dim_, out_));
    block2 = register_module("block2", TemporalConvBlock(out_, out_, kernel_, groups_));
    if (in_ != out_) skip = register_module("skip", Conv1d(Conv1dOptions(in_, out_, 1)));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t_emb) {
    auto h = block1(x) + time(detail::mish(t_emb)).unsqueeze(-1);
    return block2(h) + (skip ? skip(x) : x);
  }

  TemporalConvBlock block1{nullptr}, block2{nullptr};
  torch::nn::Linear time{nullptr};
  torch::nn::Conv1d skip{nullptr};

 private:
  int64_t in_, out_, time_dim_, kernel_, groups_;
};
TORCH_MODULE(TemporalResBlock);

/// A 1-D convolutional U-Net over sequences (N, C, L): Janner et al. 2022, "Planning with Diffusion for
/// Flexible Behavior Synthesis" (Diffuser's TemporalUnet), the backbone Chi et al. 2023's Diffusion
/// Policy also builds on. Each level has two residual blocks (Conv1d, GroupNorm, Mish; the time
/// embedding added between), then a strided Conv1d halves the length (but at the last level); the middle
/// has two more blocks; on the way up a transposed Conv1d doubles the length, the level's skip is
/// concatenated, and two blocks follow; a conv block and a 1x1 conv map back to the channels. Convolving
/// along time only, it takes any length divisible by 2^(levels - 1).
///
/// Submodules: time_mlp, down{i}_{0,1}, downsample{i}, mid_{0,1}, up{i}_{0,1}, upsample{i}, out_block, out_conv.
class TemporalUNetImpl : public torch::nn::Cloneable<TemporalUNetImpl> {
 public:
  explicit TemporalUNetImpl(TemporalUNetOptions options = {}) : options(std::move(options)) { reset(); }

  void reset() override {
    using namespace torch::nn;
    const auto& o = options;
    const auto& w = o.widths();
    TORCH_CHECK(!w.empty() && w.size() <= 16, "TemporalUNet: widths must hold 1 to 16 levels, got ", w.size());
    for (const auto width : w) TORCH_CHECK(width >= 1 && width <= 65536, "TemporalUNet: widths must be in [1, 65536], got ", width);
    TORCH_CHECK(o.channels() >= 1 && o.channels() <= 65536, "TemporalUNet: channels must be in [1, 65536], got ", o.channels());
    TORCH_CHECK(o.kernel_size() >= 1 && o.kernel_size() % 2 == 1 && o.kernel_size() <= 255,
                "TemporalUNet: kernel_size must be odd and in [1, 255] (so the length is kept), got ", o.kernel_size());
    TORCH_CHECK(o.time_dim() == 0 || (o.time_dim() >= 4 && o.time_dim() % 2 == 0 && o.time_dim() <= 65536),
                "TemporalUNet: time_dim must be 0 (widths[0]) or even and in [4, 65536], got ", o.time_dim());
    TORCH_CHECK(o.groups() >= 1, "TemporalUNet: groups must be >= 1, got ", o.groups());
    TORCH_CHECK(o.num_classes() >= 0, "TemporalUNet: num_classes must be >= 0 (0: unconditional), got ", o.num_classes());
    const int64_t td = time_dim(), k = o.kernel_size(), g = o.groups();
    TORCH_CHECK(td >= 4 && td % 2 == 0, "TemporalUNet: the time embedding takes widths[0] (", td,
                ") when time_dim is 0, which must then be even and >= 4; set time_dim");
    time_mlp = register_module("time_mlp", Sequential(SinusoidalPositionEmbeddings(td), Linear(td, 4 * td), Functional(detail::mish),
                                                      Linear(4 * td, td)));
    const size_t levels = w.size();
    down.clear();
    up.clear();
    downsample.clear();
    upsample.clear();
    for (size_t i = 0; i < levels; ++i) {
      const int64_t in = i == 0 ? o.channels() : w[i - 1];
      const auto name = "down" + std::to_string(i);
      down.push_back({register_module(name + "_0", TemporalResBlock(in, w[i], td, k, g)),
                      register_module(name + "_1", TemporalResBlock(w[i], w[i], td, k, g))});
      if (i + 1 < levels) {
        downsample.push_back(register_module("downsample" + std::to_string(i),
                                             Conv1d(Conv1dOptions(w[i], w[i], 3).stride(2).padding(1))));
      }
    }
    mid = {register_module("mid_0", TemporalResBlock(w.back(), w.back(), td, k, g)),
           register_module("mid_1", TemporalResBlock(w.back(), w.back(), td, k, g))};
    // Level i on the way up: the length doubled (a transposed conv at the width from below, w[i + 1]),
    // the skip of level i beside it, two blocks back to w[i].
    for (size_t i = levels - 1; i-- > 0;) {
      const auto name = "up" + std::to_string(i);
      upsample.push_back(register_module("upsample" + std::to_string(i),
                                         ConvTranspose1d(ConvTranspose1dOptions(w[i + 1], w[i + 1], 4).stride(2).padding(1))));
      up.push_back({register_module(name + "_0", TemporalResBlock(w[i + 1] + w[i], w[i], td, k, g)),
                    register_module(name + "_1", TemporalResBlock(w[i], w[i], td, k, g))});
    }
    out_block = register_module("out_block", TemporalConvBlock(w[0], w[0], k, g));
    out_conv = register_module("out_conv", Conv1d(Conv1dOptions(w[0], o.channels(), 1)));
    class_embedding = o.num_classes() > 0 ? register_module("class_embedding", ClassEmbedding(o.num_classes(), td))
                                          : ClassEmbedding(nullptr);
  }

  /// The time embedding's width: options.time_dim, or widths[0] when that is 0.
  int64_t time_dim() const { return options.time_dim() > 0 ? options.time_dim() : options.widths().front(); }

  /// x: (N, channels, L) floating point with L divisible by 2^(levels - 1); t: (N,) on x's device; cond:
  /// (N,) class labels (null_class: none; undefined: none for all) when num_classes > 0. Returns the
  /// prediction (noise, v or x_0, as trained), x's shape.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    TORCH_CHECK(x.defined() && x.is_floating_point() && x.dim() == 3, "TemporalUNet: x must be a floating-point (N, C, L) "
                "tensor, got ", x.defined() ? c10::str(x.scalar_type(), " of shape ", x.sizes()) : std::string("an undefined tensor"));
    TORCH_CHECK(x.size(1) == options.channels(), "TemporalUNet: expected ", options.channels(), " channel(s), got ", x.size(1),
                " (shape ", x.sizes(), ")");
    const auto m = options.length_multiple();
    TORCH_CHECK(x.size(2) >= 1 && x.size(2) % m == 0, "TemporalUNet: the length must be divisible by ", m, " (2^",
                options.widths().size() - 1, " for ", options.widths().size(), " levels), got ", x.size(2),
                "; fewer widths (levels) take other lengths");
    TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == x.size(0) && t.device() == x.device(), "TemporalUNet: t must be (N,) "
                "with N = ", x.size(0), " on ", x.device(), ", got ", t.defined() ? c10::str(t.sizes(), " on ", t.device()) : "none");
    detail::check_cpu_convolutions_for(x);
    auto e = time_mlp->forward(t.to(x.scalar_type()));
    if (class_embedding) {
      e = e + class_embedding->forward(cond, x.size(0), "TemporalUNet").to(e.scalar_type());
    } else {
      detail::check_no_labels("TemporalUNet", cond);
    }
    auto h = x;
    std::vector<torch::Tensor> skips;
    for (size_t i = 0; i < down.size(); ++i) {
      h = down[i][1](down[i][0](h, e), e);
      if (i < downsample.size()) {
        skips.push_back(h);
        h = downsample[i](h);
      }
    }
    h = mid[1](mid[0](h, e), e);
    // up[j] is level levels - 2 - j, from the bottom up. Unlike Janner et al. (who take the skip of the
    // deepest level too and upsample after a level's blocks), the length is doubled first and each
    // level's blocks run at its skip's length, as in the 2-D UNet.
    for (size_t j = 0; j < up.size(); ++j) {
      h = torch::cat({upsample[j](h), skips[skips.size() - 1 - j]}, 1);
      h = up[j][1](up[j][0](h, e), e);
    }
    return out_conv(out_block(h));
  }

  TemporalUNetOptions options;
  torch::nn::Sequential time_mlp{nullptr};
  /// down[i]: level i's two blocks; downsample[i] halves the length after level i (but the last);
  /// up[j] and upsample[j]: level levels - 2 - j on the way up (from the bottom).
  std::vector<std::vector<TemporalResBlock>> down, up;
  std::vector<TemporalResBlock> mid;
  std::vector<torch::nn::Conv1d> downsample;
  std::vector<torch::nn::ConvTranspose1d> upsample;
  TemporalConvBlock out_block{nullptr};
  torch::nn::Conv1d out_conv{nullptr};
  /// Present when num_classes > 0.
  ClassEmbedding class_embedding{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(TemporalUNet);

/// TemporalUNetOptions as JSON, every field by name (how checkpoints record them); unknown fields are refused.
inline void to_json(nlohmann::json& j, const TemporalUNetOptions& o) {
  j = {{"channels", o.channels()}, {"widths", o.widths()}, {"kernel_size", o.kernel_size()}, {"time_dim", o.time_dim()},
       {"groups", o.groups()},     {"num_classes", o.num_classes()}};
}
inline void from_json(const nlohmann::json& j, TemporalUNetOptions& o) {
  detail::check_json_fields(j, {"channels", "widths", "kernel_size", "time_dim", "groups", "num_classes"}, "TemporalUNetOptions");
  detail::read_json_field<int64_t>(j, "channels", [&](auto v) { o.channels(v); });
  detail::read_json_field<std::vector<int64_t>>(j, "widths", [&](auto v) { o.widths(v); });
  detail::read_json_field<int64_t>(j, "kernel_size", [&](auto v) { o.kernel_size(v); });
  detail::read_json_field<int64_t>(j, "time_dim", [&](auto v) { o.time_dim(v); });
  detail::read_json_field<int64_t>(j, "groups", [&](auto v) { o.groups(v); });
  detail::read_json_field<int64_t>(j, "num_classes", [&](auto v) { o.num_classes(v); });
}

namespace detail {
inline const bool temporal_unet_registered = (register_backbone<TemporalUNetImpl>("temporal_unet"), true);
}  // namespace detail

}  // namespace diffusion
