#pragma once

#include <diffusion/backbones/embedding.hpp>
#include <diffusion/precision.hpp>

#include <torch/torch.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffusion {

/// Options for a UNet. The defaults (widths 16, 32, 128 at 28x28, 14x14, 7x7; self-attention at 7x7;
/// 731,729 parameters) put the channels where the pixels are few: a channel at 28x28 costs 16 times
/// one at 7x7. On 2 CPU cores they train at about 250 img/s in fp32 and 400 in bf16; wider networks
/// learn more per image but see fewer images in the same minutes. The MNIST example's main command adds
/// a second block at 7x7 (blocks({1, 1, 2})), the best samples per CPU minute in docs/results.md.
///
/// Example:
///   UNet net(UNetOptions().widths({32, 64, 128}).attention(true));
struct UNetOptions {
  /// Image channels.
  TORCH_ARG(int64_t, channels) = 1;
  /// Widths at full, half and quarter resolution.
  TORCH_ARG(std::vector<int64_t>, widths) = std::vector<int64_t>{16, 32, 128};
  /// Width of the sinusoidal time embedding and of its MLP.
  TORCH_ARG(int64_t, time_dim) = 128;
  /// GroupNorm groups; must divide every width.
  TORCH_ARG(int64_t, groups) = 8;
  /// Single-head self-attention at the lowest resolution.
  TORCH_ARG(bool, attention) = true;
  /// Residual blocks per level (28x28, 14x14, 7x7), on the way down and again on the way up; at 7x7
  /// the down blocks come before the attention and the up blocks after it. Extra depth is cheapest at
  /// the low resolutions: on a CPU a block at 7x7 with 128 channels takes about the time of one at 28x28
  /// with 16 (4x its FLOPs, but the large, thin maps are memory-bound).
  TORCH_ARG(std::vector<int64_t>, blocks) = std::vector<int64_t>{1, 1, 1};
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

/// A small U-Net (Ronneberger et al. 2015, as used by Ho et al. 2020) for 28x28 images: 28 -> 14 -> 7
/// and back, one residual block per level on each side with skip connections, GroupNorm, SiLU, the
/// sinusoidal time embedding through an MLP, and optional self-attention at 7x7. Height and width must
/// be divisible by 4.
class UNetImpl : public torch::nn::Cloneable<UNetImpl> {
 public:
  explicit UNetImpl(UNetOptions options = {}) : options(std::move(options)) { reset(); }

  void reset() override {
    using namespace torch::nn;
    const auto& o = options;
    TORCH_CHECK(o.widths().size() == 3, "UNet: widths must hold 3 entries (28x28, 14x14, 7x7), got ",
                o.widths().size());
    TORCH_CHECK(o.channels() >= 1, "UNet: channels must be >= 1, got ", o.channels());
    TORCH_CHECK(o.blocks().size() == 3, "UNet: blocks must hold 3 entries (28x28, 14x14, 7x7), got ",
                o.blocks().size());
    for (const auto b : o.blocks()) TORCH_CHECK(b >= 1, "UNet: blocks per level must be >= 1, got ", b);
    const auto w0 = o.widths()[0], w1 = o.widths()[1], w2 = o.widths()[2];
    const auto td = o.time_dim(), g = o.groups();
    time_mlp = register_module(
        "time_mlp", Sequential(SinusoidalPositionEmbeddings(td), Linear(td, td), SiLU(), Linear(td, td)));
    in_conv = register_module("in_conv", Conv2d(Conv2dOptions(o.channels(), w0, 3).padding(1)));
    down0 = register_module("down0", ResBlock(w0, w0, td, g));
    pool0 = register_module("pool0", Conv2d(Conv2dOptions(w0, w0, 3).stride(2).padding(1)));
    down1 = register_module("down1", ResBlock(w0, w1, td, g));
    pool1 = register_module("pool1", Conv2d(Conv2dOptions(w1, w1, 3).stride(2).padding(1)));
    mid1 = register_module("mid1", ResBlock(w1, w2, td, g));
    if (o.attention()) attn = register_module("attn", SelfAttention(w2, g));
    mid2 = register_module("mid2", ResBlock(w2, w2, td, g));
    up1 = register_module("up1", ResBlock(w2 + w1, w1, td, g));
    up0 = register_module("up0", ResBlock(w1 + w0, w0, td, g));
    // Blocks beyond the first keep their level's width. The first ones keep their names (down0 ... up0),
    // so a network with one block per level reads the same checkpoints as before the option existed.
    const std::array<std::pair<const char*, size_t>, 6> stages{
        {{"down0", 0}, {"down1", 1}, {"mid1", 2}, {"mid2", 2}, {"up1", 1}, {"up0", 0}}};  // name, level
    for (size_t i = 0; i < stages.size(); ++i) {
      const auto [name, level] = stages[i];
      const auto width = o.widths()[level];
      more[i].clear();
      for (int64_t k = 1; k < o.blocks()[level]; ++k) {
        more[i].push_back(register_module(std::string(name) + "_" + std::to_string(k), ResBlock(width, width, td, g)));
      }
    }
    out_norm = register_module("out_norm", GroupNorm(g, w0));
    out_conv = register_module("out_conv", Conv2d(Conv2dOptions(w0, o.channels(), 3).padding(1)));
  }

  /// x: (N, channels, H, W) with H, W divisible by 4; t: (N,). Returns the predicted noise, x's shape.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    detail::check_image_batch("UNet", x, t, options.channels(), 0);
    TORCH_CHECK(x.size(2) % 4 == 0 && x.size(3) % 4 == 0, "UNet: height and width must be divisible by 4, got ",
                x.size(2), "x", x.size(3));
    const auto e = time_mlp->forward(t.to(x.scalar_type()));
    const auto up = [](const torch::Tensor& h) {
      return torch::nn::functional::interpolate(
          h, torch::nn::functional::InterpolateFuncOptions().scale_factor(std::vector<double>{2, 2}).mode(torch::kNearest));
    };
    // Runs the extra blocks of stage i (0 down0, 1 down1, 2 mid1, 3 mid2, 4 up1, 5 up0) after its first.
    const auto then = [&](size_t i, torch::Tensor h) {
      for (auto& block : more[i]) h = block(h, e);
      return h;
    };
    const auto s0 = then(0, down0(in_conv(x), e));   // w0 at full size
    const auto s1 = then(1, down1(pool0(s0), e));    // w1 at half size
    auto h = then(2, mid1(pool1(s1), e));            // w2 at quarter size
    if (attn) h = attn(h);
    h = then(3, mid2(h, e));
    // Nearest-neighbour upsampling straight into the skip concatenation: the up block's first conv mixes
    // them. A 3x3 conv after upsampling (as in Ho et al.'s code) would run at 4x the pixels and cost a
    // third of this network's FLOPs for little gain at this size.
    h = then(4, up1(torch::cat({up(h), s1}, 1), e));   // back to half size, w1
    h = then(5, up0(torch::cat({up(h), s0}, 1), e));   // back to full size, w0
    return out_conv(torch::silu(detail::group_norm(out_norm, h)));
  }

  UNetOptions options;
  torch::nn::Sequential time_mlp{nullptr};
  torch::nn::Conv2d in_conv{nullptr}, pool0{nullptr}, pool1{nullptr}, out_conv{nullptr};
  ResBlock down0{nullptr}, down1{nullptr}, mid1{nullptr}, mid2{nullptr}, up1{nullptr}, up0{nullptr};
  /// The blocks after the first of each stage, in the order of the names above (options.blocks()).
  std::array<std::vector<ResBlock>, 6> more;
  SelfAttention attn{nullptr};
  torch::nn::GroupNorm out_norm{nullptr};
};
TORCH_MODULE(UNet);

}  // namespace diffusion
