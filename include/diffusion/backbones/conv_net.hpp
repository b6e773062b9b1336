#pragma once

#include <diffusion/backbones/embedding.hpp>
#include <diffusion/detail/json.hpp>
#include <diffusion/platform.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/registry.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffusion {

/// Options for a ConvBlock.
///
/// Example:
///   ConvBlock block(ConvBlockOptions(32, 64, 256));
struct ConvBlockOptions {
  ConvBlockOptions(int64_t in_channels, int64_t out_channels, int64_t time_dim)
      : in_channels_(in_channels), out_channels_(out_channels), time_dim_(time_dim) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, time_dim);
  /// GroupNorm groups; must divide out_channels.
  TORCH_ARG(int64_t, groups) = 8;
};

/// The seed's block: conv3x3 -> GroupNorm -> ReLU, add a per-channel time projection, then
/// conv3x3 -> GroupNorm -> ReLU. Spatial size is kept (padding 1).
class ConvBlockImpl : public torch::nn::Cloneable<ConvBlockImpl> {
 public:
  explicit ConvBlockImpl(ConvBlockOptions options) : options(options) { reset(); }

  void reset() override {
    const auto& o = options;
    TORCH_CHECK(o.in_channels() >= 1 && o.out_channels() >= 1 && o.time_dim() >= 1,
                "ConvBlock: channels and time_dim must be >= 1, got in = ", o.in_channels(),
                ", out = ", o.out_channels(), ", time_dim = ", o.time_dim());
    TORCH_CHECK(o.groups() >= 1 && o.out_channels() % o.groups() == 0, "ConvBlock: groups (", o.groups(),
                ") must divide out_channels (", o.out_channels(), ")");
    using namespace torch::nn;
    conv1 = register_module("conv1", Conv2d(Conv2dOptions(o.in_channels(), o.out_channels(), 3).padding(1)));
    conv2 = register_module("conv2", Conv2d(Conv2dOptions(o.out_channels(), o.out_channels(), 3).padding(1)));
    time_mlp = register_module("time_mlp", Linear(o.time_dim(), o.out_channels()));
    norm1 = register_module("norm1", GroupNorm(GroupNormOptions(o.groups(), o.out_channels())));
    norm2 = register_module("norm2", GroupNorm(GroupNormOptions(o.groups(), o.out_channels())));
  }

  /// x: (N, in_channels, H, W); t_emb: (N, time_dim). Returns (N, out_channels, H, W).
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t_emb) {
    auto h = torch::relu(detail::group_norm(norm1, conv1(x)));
    h = h + time_mlp(t_emb).unsqueeze(-1).unsqueeze(-1);
    return torch::relu(detail::group_norm(norm2, conv2(h)));
  }

  ConvBlockOptions options;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear time_mlp{nullptr};
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
};
TORCH_MODULE(ConvBlock);

/// Options for a ConvNet. The defaults build the seed's 3,276,129-parameter network for 1x28x28 images.
///
/// Example:
///   ConvNet net(ConvNetOptions().channels(3).widths({16, 32}));
struct ConvNetOptions {
  /// Image channels (1 for MNIST).
  TORCH_ARG(int64_t, channels) = 1;
  /// Encoder widths; the decoder mirrors them (the seed: 1->32->64->128->256, bottleneck 256, then
  /// 256->128->64->32->32, and a 1x1 conv back to `channels`).
  TORCH_ARG(std::vector<int64_t>, widths) = std::vector<int64_t>{32, 64, 128, 256};
  /// Width of the sinusoidal time embedding and of its MLP.
  TORCH_ARG(int64_t, time_dim) = 256;
  /// GroupNorm groups in every block.
  TORCH_ARG(int64_t, groups) = 8;
  /// Class-conditional with this many classes (a learned class embedding added to the time embedding, plus
  /// a null class; see ClassEmbedding); 0: unconditional, the seed's.
  TORCH_ARG(int64_t, num_classes) = 0;
};

/// The seed's CNN backbone: nine ConvBlocks at full resolution (four encoder blocks, a bottleneck,
/// four decoder blocks), each fed the same time embedding, and a final 1x1 convolution. It is fully
/// convolutional, so any image size works. Submodule names match the seed's state_dict.
///
/// Subclass it for experiments: `forward` is virtual and every block is a public member that
/// `replace_module` can swap.
///
/// Example:
///   ConvNet net;                                    // the seed's network
///   auto eps = net(x_t, t);                         // x_t: (N, 1, 28, 28), t: (N,)
class ConvNetImpl : public torch::nn::Cloneable<ConvNetImpl> {
 public:
  explicit ConvNetImpl(ConvNetOptions options = {}) : options(std::move(options)) { reset(); }

  void reset() override {
    const auto& o = options;
    TORCH_CHECK(!o.widths().empty(), "ConvNet: widths must not be empty");
    for (const auto w : o.widths()) TORCH_CHECK(w >= 1 && w <= 65536, "ConvNet: widths must be in [1, 65536], got ", w);
    TORCH_CHECK(o.channels() >= 1, "ConvNet: channels must be >= 1, got ", o.channels());
    encoder.clear();
    decoder.clear();
    time_mlp = register_module("time_mlp", detail::make_time_mlp(o.time_dim()));
    const auto& w = o.widths();
    const auto n = static_cast<int64_t>(w.size());
    const auto block = [&](int64_t in, int64_t out) {
      return ConvBlock(ConvBlockOptions(in, out, o.time_dim()).groups(o.groups()));
    };
    for (int64_t i = 0; i < n; ++i) {
      encoder.push_back(register_module("enc" + std::to_string(i + 1), block(i == 0 ? o.channels() : w[i - 1], w[i])));
    }
    bottleneck = register_module("bottleneck", block(w.back(), w.back()));
    // The decoder runs dec_n .. dec_1: dec_i maps widths[i-1] -> widths[i-2] (dec_1 keeps widths[0]).
    for (int64_t i = n; i >= 1; --i) {
      decoder.push_back(register_module("dec" + std::to_string(i), block(w[i - 1], w[i >= 2 ? i - 2 : 0])));
    }
    final = register_module("final", torch::nn::Conv2d(torch::nn::Conv2dOptions(w.front(), o.channels(), 1)));
    TORCH_CHECK(o.num_classes() >= 0, "ConvNet: num_classes must be >= 0 (0: unconditional), got ", o.num_classes());
    class_embedding = o.num_classes() > 0 ? register_module("class_embedding", ClassEmbedding(o.num_classes(), o.time_dim()))
                                          : ClassEmbedding(nullptr);
  }

  /// x: (N, channels, H, W) noisy images; t: (N,) timesteps; cond: (N,) class labels (null_class: none;
  /// undefined: none for all) when num_classes > 0. Returns the prediction (noise, v or x_0, as trained), x's shape.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    detail::check_image_batch("ConvNet", x, t, options.channels(), 0);
    detail::check_cpu_convolutions_for(x);
    auto t_emb = time_mlp->forward(t.to(x.scalar_type()));
    if (class_embedding) {
      t_emb = t_emb + class_embedding->forward(cond, x.size(0), "ConvNet").to(t_emb.scalar_type());
    } else {
      detail::check_no_labels("ConvNet", cond);
    }
    auto h = x;
    for (auto& block : encoder) h = block(h, t_emb);
    h = bottleneck(h, t_emb);
    for (auto& block : decoder) h = block(h, t_emb);
    return final(h);
  }

  ConvNetOptions options;
  torch::nn::Sequential time_mlp{nullptr};
  /// enc1 .. enc_n, in the order they run.
  std::vector<ConvBlock> encoder;
  ConvBlock bottleneck{nullptr};
  /// dec_n .. dec1, in the order they run.
  std::vector<ConvBlock> decoder;
  torch::nn::Conv2d final{nullptr};
  /// Present when num_classes > 0.
  ClassEmbedding class_embedding{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(ConvNet);

/// ConvNetOptions as JSON, every field by name (how checkpoints record them); unknown fields are refused.
inline void to_json(nlohmann::json& j, const ConvNetOptions& o) {
  j = {{"channels", o.channels()}, {"widths", o.widths()}, {"time_dim", o.time_dim()}, {"groups", o.groups()},
       {"num_classes", o.num_classes()}};
}
inline void from_json(const nlohmann::json& j, ConvNetOptions& o) {
  detail::check_json_fields(j, {"channels", "widths", "time_dim", "groups", "num_classes"}, "ConvNetOptions");
  detail::read_json_field<int64_t>(j, "num_classes", [&](auto v) { o.num_classes(v); });
  detail::read_json_field<int64_t>(j, "channels", [&](auto v) { o.channels(v); });
  detail::read_json_field<std::vector<int64_t>>(j, "widths", [&](auto v) { o.widths(v); });
  detail::read_json_field<int64_t>(j, "time_dim", [&](auto v) { o.time_dim(v); });
  detail::read_json_field<int64_t>(j, "groups", [&](auto v) { o.groups(v); });
}

namespace detail {
inline const bool conv_net_registered = (register_backbone<ConvNetImpl>("convnet"), true);
}  // namespace detail

}  // namespace diffusion
