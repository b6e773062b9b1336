#pragma once

#include <diffusion/backbones/embedding.hpp>
#include <diffusion/detail/json.hpp>
#include <diffusion/registry.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace diffusion {

/// Options for a DiT. The defaults are a small DiT for 28x28 images (patch 2: 196 tokens; depth 6,
/// width 128, 4 heads).
///
/// Example:
///   DiT net(DiTOptions().channels(3).patch(4).depth(12).width(384).heads(6).num_classes(10));   // DiT-S/4
struct DiTOptions {
  /// Image channels.
  TORCH_ARG(int64_t, channels) = 1;
  /// Side of the square patches that become tokens; height and width must be divisible by it.
  TORCH_ARG(int64_t, patch) = 2;
  /// Number of transformer blocks.
  TORCH_ARG(int64_t, depth) = 6;
  /// Token width (the hidden size); a multiple of heads and of 4 (the 2-D sin-cos positions use a
  /// quarter each for sin and cos of the row and of the column).
  TORCH_ARG(int64_t, width) = 128;
  /// Attention heads per block.
  TORCH_ARG(int64_t, heads) = 4;
  /// Hidden width of each block's MLP as a multiple of width (rounded down).
  TORCH_ARG(double, mlp_ratio) = 4.0;
  /// Width of the sinusoidal timestep features fed to the timestep MLP (DiT's frequency_embedding_size).
  TORCH_ARG(int64_t, time_dim) = 256;
  /// Class-conditional with this many classes (a learned embedding plus a null class, added to the
  /// timestep embedding; see ClassEmbedding); 0: unconditional.
  TORCH_ARG(int64_t, num_classes) = 0;
};

namespace detail {

/// LayerNorm without affine parameters over the last dimension (eps 1e-6, as DiT), in float32 when x is
/// in a reduced precision (what autocast does for layer_norm on CUDA; LibTorch 1.13's CPU autocast passes
/// bf16 on).
inline torch::Tensor plain_layer_norm(const torch::Tensor& x) {
  const bool reduced = x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf;
  const auto in = reduced ? x.to(torch::kFloat32) : x;
  return torch::layer_norm(in, {x.size(-1)}, {}, {}, 1e-6).to(x.scalar_type());
}

/// adaLN's modulation: x * (1 + scale) + shift, with shift and scale (N, width) broadcast over the tokens.
inline torch::Tensor modulate(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale) {
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1);
}

}  // namespace detail

/// The fixed 2-D sine-cosine position embedding of a grid of `rows` x `cols` tokens (Vaswani et al. 2017,
/// sec. 3.5, applied per axis as in MAE and DiT): (rows * cols, width), tokens in row-major order. Of each
/// token's width, the first half embeds its row and the second its column; each half is
/// [sin(p w_0), ..., sin(p w_{k-1}), cos(p w_0), ..., cos(p w_{k-1})] with k = width / 4 and
/// w_i = 10000^(-i / k). width must be a positive multiple of 4.
inline torch::Tensor sincos_positions_2d(int64_t rows, int64_t cols, int64_t width,
                                         torch::TensorOptions options = torch::kFloat32) {
  TORCH_CHECK(width >= 4 && width % 4 == 0, "sincos_positions_2d: width must be a positive multiple of 4, got ", width);
  TORCH_CHECK(rows >= 1 && cols >= 1, "sincos_positions_2d: the grid must be at least 1x1, got ", rows, "x", cols);
  const int64_t k = width / 4;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto omega = torch::pow(10000.0, -torch::arange(k, f64) / static_cast<double>(k));
  const auto axis = [&](int64_t n) {
    const auto angles = torch::arange(n, f64).unsqueeze(1) * omega.unsqueeze(0);  // (n, k)
    return torch::cat({angles.sin(), angles.cos()}, 1);                           // (n, 2k)
  };
  const auto r = axis(rows).unsqueeze(1).expand({rows, cols, 2 * k});
  const auto c = axis(cols).unsqueeze(0).expand({rows, cols, 2 * k});
  return torch::cat({r, c}, 2).reshape({rows * cols, width}).to(options);
}

/// A DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, sec. 3.2 and fig. 3): from the
/// conditioning c, SiLU -> Linear gives shift, scale and gate for the attention and for the MLP;
///   x += gate_attn * Attention(modulate(LayerNorm(x), shift_attn, scale_attn))
///   x += gate_mlp  * MLP(modulate(LayerNorm(x), shift_mlp, scale_mlp))
/// The modulation Linear starts at zero, so every gate is zero and the block is the identity at
/// initialization. The MLP is Linear -> GELU (tanh approximation) -> Linear.
class DiTBlockImpl : public torch::nn::Cloneable<DiTBlockImpl> {
 public:
  DiTBlockImpl(int64_t width, int64_t heads, int64_t mlp_hidden) : width_(width), heads_(heads), mlp_hidden_(mlp_hidden) {
    reset();
  }

  void reset() override {
    using namespace torch::nn;
    qkv = register_module("qkv", Linear(width_, 3 * width_));
    proj = register_module("proj", Linear(width_, width_));
    fc1 = register_module("fc1", Linear(width_, mlp_hidden_));
    fc2 = register_module("fc2", Linear(mlp_hidden_, width_));
    modulation = register_module("modulation", Linear(width_, 6 * width_));
  }

  /// x: (N, tokens, width); c: (N, width). Returns x's shape.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& c) {
    const auto m = modulation(torch::silu(c)).chunk(6, 1);  // shift, scale, gate for attention, then MLP
    auto h = x + m[2].unsqueeze(1) * attention(detail::modulate(detail::plain_layer_norm(x), m[0], m[1]));
    const auto mlp = fc2(torch::gelu(fc1(detail::modulate(detail::plain_layer_norm(h), m[3], m[4])), "tanh"));
    return h + m[5].unsqueeze(1) * mlp;
  }

  torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr}, modulation{nullptr};

 private:
  /// Multi-head self-attention over the tokens (Vaswani et al. 2017, sec. 3.2.2).
  torch::Tensor attention(const torch::Tensor& x) {
    const int64_t n = x.size(0), tokens = x.size(1), head = width_ / heads_;
    const auto parts = qkv(x).reshape({n, tokens, 3, heads_, head}).permute({2, 0, 3, 1, 4}).unbind(0);  // (n, heads, tokens, head)
    const auto weights = torch::softmax(parts[0].matmul(parts[1].transpose(-2, -1)) / std::sqrt(static_cast<double>(head)), -1);
    return proj(weights.matmul(parts[2]).transpose(1, 2).reshape({n, tokens, width_}));
  }

  int64_t width_, heads_, mlp_hidden_;
};
TORCH_MODULE(DiTBlock);

/// A Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): the image
/// is cut into patch x patch patches, each linearly embedded as a token (a strided convolution) plus a fixed
/// 2-D sin-cos position (sincos_positions_2d, for whatever grid the input makes); `depth` adaLN-Zero blocks
/// (DiTBlock) conditioned on the timestep embedding (sinusoidal features -> Linear -> SiLU -> Linear), plus
/// the class embedding when num_classes > 0; a final adaLN LayerNorm and Linear map each token back to its
/// patch's pixels. The final layer's modulation and Linear start at zero, so the network outputs exactly
/// zero at initialization (sec. 3.2, "adaLN-Zero"). The other Linear layers start Xavier-uniform with zero
/// biases, the patch embedding likewise on its flattened kernel, the timestep MLP and the class table
/// N(0, 0.02^2), as in the paper's code. It predicts what it is trained to (noise, v, x_0, velocity) and has
/// no learned variance.
///
/// Submodules: patch_embed, time_mlp, class_embedding (when conditional), blocks.{i}.{qkv, proj, fc1, fc2,
/// modulation}, final_modulation, final_linear.
///
/// Example:
///   DiT net(DiTOptions().patch(4).depth(4));
///   auto eps = net(torch::randn({8, 1, 28, 28}), torch::randint(1000, {8}));   // (8, 1, 28, 28)
class DiTImpl : public torch::nn::Cloneable<DiTImpl> {
 public:
  explicit DiTImpl(DiTOptions options = {}) : options(options) { reset(); }

  void reset() override {
    using namespace torch::nn;
    const auto& o = options;
    TORCH_CHECK(o.channels() >= 1 && o.patch() >= 1 && o.depth() >= 1, "DiT: channels, patch and depth must be >= 1, got ",
                o.channels(), ", ", o.patch(), " and ", o.depth());
    TORCH_CHECK(o.channels() <= 65536 && o.patch() <= 4096 && o.depth() <= 1024 && o.width() <= 65536 && o.time_dim() <= 65536,
                "DiT: at most 65536 channels, patch 4096, depth 1024, width 65536 and time_dim 65536, got ", o.channels(), ", ",
                o.patch(), ", ", o.depth(), ", ", o.width(), " and ", o.time_dim());
    TORCH_CHECK(o.heads() >= 1 && o.width() >= 4 && o.width() % 4 == 0 && o.width() % o.heads() == 0,
                "DiT: width must be a positive multiple of 4 and of heads, got width ", o.width(), " and heads ", o.heads());
    TORCH_CHECK(std::isfinite(o.mlp_ratio()) && o.mlp_ratio() > 0 && o.width() * o.mlp_ratio() >= 1 &&
                    o.width() * o.mlp_ratio() <= 1 << 24,
                "DiT: mlp_ratio must make an MLP width in [1, 2^24], got ", o.mlp_ratio(), " of width ", o.width());
    TORCH_CHECK(o.time_dim() >= 4 && o.time_dim() % 2 == 0, "DiT: time_dim must be even and >= 4, got ", o.time_dim());
    TORCH_CHECK(o.num_classes() >= 0, "DiT: num_classes must be >= 0 (0: unconditional), got ", o.num_classes());
    const auto w = o.width(), p = o.patch();
    patch_embed = register_module("patch_embed", Conv2d(Conv2dOptions(o.channels(), w, p).stride(p)));
    time_mlp = register_module("time_mlp", Sequential(SinusoidalPositionEmbeddings(o.time_dim()), Linear(o.time_dim(), w), SiLU(),
                                                      Linear(w, w)));
    class_embedding = o.num_classes() > 0 ? register_module("class_embedding", ClassEmbedding(o.num_classes(), w))
                                          : ClassEmbedding(nullptr);
    blocks = register_module("blocks", ModuleList());
    for (int64_t i = 0; i < o.depth(); ++i) {
      blocks->push_back(DiTBlock(w, o.heads(), static_cast<int64_t>(static_cast<double>(w) * o.mlp_ratio())));
    }
    final_modulation = register_module("final_modulation", Linear(w, 2 * w));
    final_linear = register_module("final_linear", Linear(w, p * p * o.channels()));
    initialize();
  }

  /// x: (N, channels, H, W) with H and W divisible by patch; t: (N,) the noise conditioning; cond: (N,)
  /// class labels (null_class: none; undefined: none for all) when num_classes > 0. Returns x's shape.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) {
    detail::check_image_batch("DiT", x, t, options.channels(), 0);
    const int64_t p = options.patch(), n = x.size(0), rows = x.size(2) / p, cols = x.size(3) / p;
    TORCH_CHECK(x.size(2) % p == 0 && x.size(3) % p == 0, "DiT: height and width must be divisible by the patch (", p,
                "), got ", x.size(2), "x", x.size(3));
    auto c = time_mlp->forward(t.to(x.scalar_type()));
    if (class_embedding) {
      c = c + class_embedding->forward(cond, n, "DiT").to(c.scalar_type());
    } else {
      detail::check_no_labels("DiT", cond);
    }
    auto h = patch_embed(x).flatten(2).transpose(1, 2);  // (N, tokens, width)
    h = h + sincos_positions_2d(rows, cols, options.width(), h.options()).unsqueeze(0);
    for (auto& block : *blocks) h = block->as<DiTBlock>()->forward(h, c);
    const auto m = final_modulation(torch::silu(c)).chunk(2, 1);
    h = final_linear(detail::modulate(detail::plain_layer_norm(h), m[0], m[1]));  // (N, tokens, p * p * channels)
    // Unpatchify: token (r, c) holds its patch as (p, p, channels).
    return h.reshape({n, rows, cols, p, p, options.channels()}).permute({0, 5, 1, 3, 2, 4}).reshape(x.sizes());
  }

  DiTOptions options;
  torch::nn::Conv2d patch_embed{nullptr};
  torch::nn::Sequential time_mlp{nullptr};
  /// Present when num_classes > 0.
  ClassEmbedding class_embedding{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::Linear final_modulation{nullptr}, final_linear{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())})

 private:
  /// The paper code's initialization, then adaLN-Zero: every modulation and the final Linear at zero.
  void initialize() {
    torch::NoGradGuard no_grad;
    for (auto& module : modules(/*include_self=*/false)) {
      if (auto* linear = module->as<torch::nn::Linear>()) {
        torch::nn::init::xavier_uniform_(linear->weight);
        torch::nn::init::zeros_(linear->bias);
      }
    }
    const auto kernel = patch_embed->weight.view({patch_embed->weight.size(0), -1});
    torch::nn::init::xavier_uniform_(kernel);
    torch::nn::init::zeros_(patch_embed->bias);
    for (auto& module : time_mlp->modules(/*include_self=*/false)) {
      if (auto* linear = module->as<torch::nn::Linear>()) torch::nn::init::normal_(linear->weight, 0, 0.02);
    }
    if (class_embedding) torch::nn::init::normal_(class_embedding->table->weight, 0, 0.02);
    for (auto& block : *blocks) {
      auto& b = *block->as<DiTBlock>();
      torch::nn::init::zeros_(b.modulation->weight);
      torch::nn::init::zeros_(b.modulation->bias);
    }
    for (auto* linear : {&final_modulation, &final_linear}) {
      torch::nn::init::zeros_((*linear)->weight);
      torch::nn::init::zeros_((*linear)->bias);
    }
  }
};
TORCH_MODULE(DiT);

/// DiTOptions as JSON, every field by name (how checkpoints record them); unknown fields are refused.
inline void to_json(nlohmann::json& j, const DiTOptions& o) {
  j = {{"channels", o.channels()}, {"patch", o.patch()},         {"depth", o.depth()},       {"width", o.width()},
       {"heads", o.heads()},       {"mlp_ratio", o.mlp_ratio()}, {"time_dim", o.time_dim()}, {"num_classes", o.num_classes()}};
}
inline void from_json(const nlohmann::json& j, DiTOptions& o) {
  detail::check_json_fields(j, {"channels", "patch", "depth", "width", "heads", "mlp_ratio", "time_dim", "num_classes"},
                            "DiTOptions");
  detail::read_json_field<int64_t>(j, "channels", [&](auto v) { o.channels(v); });
  detail::read_json_field<int64_t>(j, "patch", [&](auto v) { o.patch(v); });
  detail::read_json_field<int64_t>(j, "depth", [&](auto v) { o.depth(v); });
  detail::read_json_field<int64_t>(j, "width", [&](auto v) { o.width(v); });
  detail::read_json_field<int64_t>(j, "heads", [&](auto v) { o.heads(v); });
  detail::read_json_field<double>(j, "mlp_ratio", [&](auto v) { o.mlp_ratio(v); });
  detail::read_json_field<int64_t>(j, "time_dim", [&](auto v) { o.time_dim(v); });
  detail::read_json_field<int64_t>(j, "num_classes", [&](auto v) { o.num_classes(v); });
}

namespace detail {
inline const bool dit_registered = (register_backbone<DiTImpl>("dit"), true);
}  // namespace detail

}  // namespace diffusion
