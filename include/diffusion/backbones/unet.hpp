#pragma once

#include <diffusion/backbones/embedding.hpp>
#include <diffusion/detail/json.hpp>
#include <diffusion/platform.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/registry.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffusion {

/// Options for a UNet. The defaults (widths 16, 32, 128 at 28x28, 14x14, 7x7; self-attention at 7x7;
/// 731,729 parameters) put the channels where the pixels are few: a channel at 28x28 costs 16 times
/// one at 7x7. Wider networks learn more per image but see fewer images in the same minutes:
/// docs/results.md measures which configuration gives the best samples per CPU minute (the MNIST
/// example's main command uses it), docs/performance.md how fast each trains.
///
/// Example:
///   UNet net(UNetOptions().widths({32, 64, 128}).attention(true));
///   UNet patched(UNetOptions().patch(2).widths({32, 128}).blocks({1, 2}));  // 14x14 and 7x7 for MNIST
struct UNetOptions {
  /// What the height and width must be divisible by: patch * 2^(levels - 1). (Declared before the
  /// TORCH_ARG members, which leave what follows them private.) Empty widths (refused by UNet) count as one
  /// level.
  int64_t size_multiple() const { return patch() << (widths().empty() ? 0 : widths().size() - 1); }

  /// Image channels.
  TORCH_ARG(int64_t, channels) = 1;
  /// One width per level, from the full resolution down; each level halves the height and width, so
  /// {16, 32, 128} runs at 28x28, 14x14 and 7x7 on MNIST.
  TORCH_ARG(std::vector<int64_t>, widths) = std::vector<int64_t>{16, 32, 128};
  /// Width of the sinusoidal time embedding and of its MLP.
  TORCH_ARG(int64_t, time_dim) = 128;
  /// GroupNorm groups; must divide every width.
  TORCH_ARG(int64_t, groups) = 8;
  /// Single-head self-attention at the lowest resolution.
  TORCH_ARG(bool, attention) = true;
  /// Residual blocks per level (one count per width), on the way down and again on the way up; at the
  /// lowest level the down blocks come before the attention and the up blocks after it. Extra depth is
  /// cheapest at the low resolutions: on a CPU a block at 7x7 with 128 channels takes about the time of
  /// one at 28x28 with 16 (4x its FLOPs, but the large, thin maps are memory-bound).
  TORCH_ARG(std::vector<int64_t>, blocks) = std::vector<int64_t>{1, 1, 1};
  /// Side of the square patches folded into channels before the first level and unfolded after the
  /// last (pixel unshuffle and shuffle, as in the patch embedding of Peebles & Xie 2023 but convolutional).
  /// patch(2) turns a 1x28x28 image into 4x14x14, so the network never touches the memory-bound full
  /// resolution; 1 folds nothing.
  TORCH_ARG(int64_t, patch) = 1;
  /// Class-conditional with this many classes (a learned class embedding added to the time embedding, plus
  /// a null class; see ClassEmbedding); 0: unconditional.
  TORCH_ARG(int64_t, num_classes) = 0;
};

/// GroupNorm -> SiLU -> conv3x3, twice, with the time embedding added between, and a residual path
/// (1x1 conv when the width changes) (Ho et al. 2020, appendix B; Wide ResNet blocks).
class ResBlockImpl : public torch::nn::Cloneable<ResBlockImpl> {
 public:
  ResBlockImpl(int64_t in, int64_t out, int64_t time_dim, int64_t groups)
      : in_(in), out_(out), time_dim_(time_dim), groups_(groups) {
    reset();
  }

  void reset() override {
    using namespace torch::nn;
    TORCH_CHECK(in_ % groups_ == 0 && out_ % groups_ == 0, "ResBlock: groups (", groups_, ") must divide the widths (",
                in_, ", ", out_, ")");
    norm1 = register_module("norm1", GroupNorm(groups_, in_));
    conv1 = register_module("conv1", Conv2d(Conv2dOptions(in_, out_, 3).padding(1)));
    time = register_module("time", Linear(time_dim_, out_));
    norm2 = register_module("norm2", GroupNorm(groups_, out_));
    conv2 = register_module("conv2", Conv2d(Conv2dOptions(out_, out_, 3).padding(1)));
    if (in_ != out_) skip = register_module("skip", Conv2d(Conv2dOptions(in_, out_, 1)));
  }

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t_emb) {
    auto h = conv1(torch::silu(detail::group_norm(norm1, x)));
    h = h + time(t_emb).unsqueeze(-1).unsqueeze(-1);
    h = conv2(torch::silu(detail::group_norm(norm2, h)));
    return h + (skip ? skip(x) : x);
  }

  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, skip{nullptr};
  torch::nn::Linear time{nullptr};

 private:
  int64_t in_, out_, time_dim_, groups_;
};
TORCH_MODULE(ResBlock);

/// Single-head self-attention over the pixels of a feature map, with a residual connection.
class SelfAttentionImpl : public torch::nn::Cloneable<SelfAttentionImpl> {
 public:
  SelfAttentionImpl(int64_t width, int64_t groups) : width_(width), groups_(groups) { reset(); }

  void reset() override {
    using namespace torch::nn;
    norm = register_module("norm", GroupNorm(groups_, width_));
    qkv = register_module("qkv", Conv2d(Conv2dOptions(width_, 3 * width_, 1)));
    proj = register_module("proj", Conv2d(Conv2dOptions(width_, width_, 1)));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
    const auto parts = qkv(detail::group_norm(norm, x)).reshape({n, 3, c, hw}).unbind(1);  // each (n, c, hw)
    const auto weights = torch::softmax(parts[0].transpose(1, 2).bmm(parts[1]) / std::sqrt(static_cast<double>(c)), -1);
    const auto out = parts[2].bmm(weights.transpose(1, 2)).reshape(x.sizes());  // (n, c, hw) -> (n, c, h, w)
    return x + proj(out);
  }

  torch::nn::GroupNorm norm{nullptr};
  torch::nn::Conv2d qkv{nullptr}, proj{nullptr};

 private:
  int64_t width_, groups_;
};
TORCH_MODULE(SelfAttention);

/// A small U-Net (Ronneberger et al. 2015, as used by Ho et al. 2020): with the default three levels,
/// 28 -> 14 -> 7 and back, residual blocks on each side with skip connections between them, GroupNorm,
/// SiLU, the sinusoidal time embedding through an MLP, and optional self-attention at the lowest level.
/// Height and width must be divisible by patch * 2^(levels - 1).
///
/// Submodules are named down{i}, pool{i}, mid1, attn, mid2, up{i} (level i from the top), the extra
/// blocks of options.blocks down{i}_{k}, mid1_{k}, mid2_{k}, up{i}_{k}: a three-level network with one
/// block per level has the names it had before levels, blocks and patches were options, so older
/// checkpoints load.
class UNetImpl : public torch::nn::Cloneable<UNetImpl> {
 public:
  explicit UNetImpl(UNetOptions options = {}) : options(std::move(options)) { reset(); }

  void reset() override {
    using namespace torch::nn;
    const auto& o = options;
    const auto& w = o.widths();
    const auto levels = w.size();
    TORCH_CHECK(levels >= 1, "UNet: widths must hold at least one level, got none");
    TORCH_CHECK(o.channels() >= 1, "UNet: channels must be >= 1, got ", o.channels());
    TORCH_CHECK(o.patch() >= 1, "UNet: patch must be >= 1, got ", o.patch());
    TORCH_CHECK(o.blocks().size() == levels, "UNet: blocks must hold one count per level (", levels,
                ", as widths), got ", o.blocks().size());
    for (const auto b : o.blocks()) TORCH_CHECK(b >= 1, "UNet: blocks per level must be >= 1, got ", b);
    for (const auto w : o.widths()) TORCH_CHECK(w >= 1 && w <= 65536, "UNet: widths must be in [1, 65536], got ", w);
    const auto td = o.time_dim(), g = o.groups(), folded = o.channels() * o.patch() * o.patch();
    const auto top = levels - 1;  // the lowest resolution
    time_mlp = register_module(
        "time_mlp", Sequential(SinusoidalPositionEmbeddings(td), Linear(td, td), SiLU(), Linear(td, td)));
    in_conv = register_module("in_conv", Conv2d(Conv2dOptions(folded, w[0], 3).padding(1)));
    // Registration order (first blocks top to bottom and back, then the extra blocks) is the order of the
    // parameters in a checkpoint's optimizer state, so it stays what the three-level network always had.
    down.assign(top, {});
    up.assign(top, {});
    pools.clear();
    for (size_t i = 0; i < top; ++i) {
      const auto name = std::to_string(i);
      down[i].push_back(register_module("down" + name, ResBlock(i == 0 ? w[0] : w[i - 1], w[i], td, g)));
      pools.push_back(register_module("pool" + name, Conv2d(Conv2dOptions(w[i], w[i], 3).stride(2).padding(1))));
    }
    mid1 = {register_module("mid1", ResBlock(top == 0 ? w[0] : w[top - 1], w[top], td, g))};
    attn = nullptr;
    if (o.attention()) attn = register_module("attn", SelfAttention(w[top], g));
    mid2 = {register_module("mid2", ResBlock(w[top], w[top], td, g))};
    for (size_t i = top; i-- > 0;) {
      up[i].push_back(register_module("up" + std::to_string(i), ResBlock(w[i + 1] + w[i], w[i], td, g)));
    }
    // Blocks beyond the first keep their level's width.
    const auto extra = [&](std::vector<ResBlock>& stage, const std::string& name, size_t level) {
      for (int64_t k = 1; k < o.blocks()[level]; ++k) {
        stage.push_back(register_module(name + "_" + std::to_string(k), ResBlock(w[level], w[level], td, g)));
      }
    };
    for (size_t i = 0; i < top; ++i) extra(down[i], "down" + std::to_string(i), i);
    extra(mid1, "mid1", top);
    extra(mid2, "mid2", top);
    for (size_t i = top; i-- > 0;) extra(up[i], "up" + std::to_string(i), i);
    out_norm = register_module("out_norm", GroupNorm(g, w[0]));
    out_conv = register_module("out_conv", Conv2d(Conv2dOptions(w[0], folded, 3).padding(1)));
    TORCH_CHECK(o.num_classes() >= 0, "UNet: num_classes must be >= 0 (0: unconditional), got ", o.num_classes());
    class_embedding = o.num_classes() > 0 ? register_module("class_embedding", ClassEmbedding(o.num_classes(), td))
                                          : ClassEmbedding(nullptr);
  }

  /// x: (N, channels, H, W) with H, W divisible by patch * 2^(levels - 1); t: (N,); cond: (N,) class labels
  /// (null_class: none; undefined: none for all) when num_classes > 0. Returns the prediction (noise, v or x_0, as trained), x's shape.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    detail::check_image_batch("UNet", x, t, options.channels(), 0);
    detail::check_cpu_convolutions_for(x);
    const int64_t factor = options.size_multiple();
    TORCH_CHECK(x.size(2) % factor == 0 && x.size(3) % factor == 0, "UNet: height and width must be divisible by ",
                factor, " (patch ", options.patch(), " times 2^", options.widths().size() - 1, " for ",
                options.widths().size(), " levels), got ", x.size(2), "x", x.size(3));
    auto e = time_mlp->forward(t.to(x.scalar_type()));
    if (class_embedding) {
      e = e + class_embedding->forward(cond, x.size(0), "UNet").to(e.scalar_type());
    } else {
      detail::check_no_labels("UNet", cond);
    }
    const auto run = [&](std::vector<ResBlock>& stage, torch::Tensor h) {
      for (auto& block : stage) h = block(h, e);
      return h;
    };
    const auto p = options.patch();
    auto h = in_conv(p > 1 ? torch::pixel_unshuffle(x, p) : x);
    std::vector<torch::Tensor> skips;
    for (size_t i = 0; i < down.size(); ++i) {
      skips.push_back(run(down[i], h));
      h = pools[i](skips.back());
    }
    h = run(mid1, h);
    if (attn) h = attn(h);
    h = run(mid2, h);
    // Nearest-neighbour upsampling straight into the skip concatenation: the up block's first conv mixes
    // them. A 3x3 conv after upsampling (as in Ho et al.'s code) would run at 4x the pixels and cost a
    // third of this network's FLOPs for little gain at this size.
    for (size_t i = up.size(); i-- > 0;) {
      const auto upsampled = torch::nn::functional::interpolate(
          h, torch::nn::functional::InterpolateFuncOptions().scale_factor(std::vector<double>{2, 2}).mode(torch::kNearest));
      h = run(up[i], torch::cat({upsampled, skips[i]}, 1));
    }
    h = out_conv(torch::silu(detail::group_norm(out_norm, h)));
    return p > 1 ? torch::pixel_shuffle(h, p) : h;
  }

  UNetOptions options;
  torch::nn::Sequential time_mlp{nullptr};
  torch::nn::Conv2d in_conv{nullptr}, out_conv{nullptr};
  /// down[i] and up[i]: the blocks of level i (its first block, then the extras options.blocks asks
  /// for); pools[i] halves level i's resolution; mid1 and mid2 are the lowest level's blocks before and
  /// after the attention.
  std::vector<std::vector<ResBlock>> down, up;
  std::vector<torch::nn::Conv2d> pools;
  std::vector<ResBlock> mid1, mid2;
  SelfAttention attn{nullptr};
  torch::nn::GroupNorm out_norm{nullptr};
  /// Present when num_classes > 0.
  ClassEmbedding class_embedding{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(UNet);

/// UNetOptions as JSON, every field by name (how checkpoints record them); unknown fields are refused.
inline void to_json(nlohmann::json& j, const UNetOptions& o) {
  j = {{"channels", o.channels()}, {"widths", o.widths()}, {"time_dim", o.time_dim()}, {"groups", o.groups()},
       {"attention", o.attention()}, {"blocks", o.blocks()}, {"patch", o.patch()}, {"num_classes", o.num_classes()}};
}
inline void from_json(const nlohmann::json& j, UNetOptions& o) {
  detail::check_json_fields(j, {"channels", "widths", "time_dim", "groups", "attention", "blocks", "patch", "num_classes"},
                            "UNetOptions");
  detail::read_json_field<int64_t>(j, "num_classes", [&](auto v) { o.num_classes(v); });
  detail::read_json_field<int64_t>(j, "channels", [&](auto v) { o.channels(v); });
  detail::read_json_field<std::vector<int64_t>>(j, "widths", [&](auto v) { o.widths(v); });
  detail::read_json_field<int64_t>(j, "time_dim", [&](auto v) { o.time_dim(v); });
  detail::read_json_field<int64_t>(j, "groups", [&](auto v) { o.groups(v); });
  detail::read_json_field<bool>(j, "attention", [&](auto v) { o.attention(v); });
  detail::read_json_field<std::vector<int64_t>>(j, "blocks", [&](auto v) { o.blocks(v); });
  detail::read_json_field<int64_t>(j, "patch", [&](auto v) { o.patch(v); });
}

namespace detail {
inline const bool unet_registered = (register_backbone<UNetImpl>("unet"), true);
}  // namespace detail

}  // namespace diffusion
