#pragma once

#include <diffusion/backbones/embedding.hpp>
#include <diffusion/detail/json.hpp>
#include <diffusion/registry.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffusion {

/// Options for an MLP backbone. The defaults are the seed's SmolMLP (hidden 512, depth 3) for 1x28x28
/// images; ChunkyMLP uses hidden 2048, depth 5. With features > 0 it takes vectors (N, features) instead.
///
/// Example:
///   MLP net(MLPOptions().hidden(1024).depth(4).image_size(32).channels(3));
///   MLP points(MLPOptions().features(2).hidden(256));   // 2-D points (N, 2)
struct MLPOptions {
  /// Vectors of this many features (N, features); 0: images (N, channels, image_size, image_size).
  TORCH_ARG(int64_t, features) = 0;
  /// Image channels.
  TORCH_ARG(int64_t, channels) = 1;
  /// Images are image_size x image_size.
  TORCH_ARG(int64_t, image_size) = 28;
  /// Width of every hidden layer.
  TORCH_ARG(int64_t, hidden) = 512;
  /// Number of hidden Linear+ReLU layers (fc1..fc_depth); fc_{depth+1} maps back to pixels.
  TORCH_ARG(int64_t, depth) = 3;
  /// Width of the sinusoidal time embedding and of its MLP.
  TORCH_ARG(int64_t, time_dim) = 256;
};

/// The seed's MLP backbone: flatten the image, concatenate the time embedding, `depth` Linear+ReLU
/// layers, a final Linear back to the image's pixel count, reshape. Submodule names (time_mlp, fc1, ...)
/// match the seed's state_dict.
class MLPImpl : public torch::nn::Cloneable<MLPImpl> {
 public:
  explicit MLPImpl(MLPOptions options = {}) : options(options) { reset(); }

  void reset() override {
    const auto& o = options;
    TORCH_CHECK(o.channels() >= 1 && o.image_size() >= 1 && o.hidden() >= 1 && o.depth() >= 1,
                "MLP: channels, image_size, hidden and depth must be >= 1, got channels = ", o.channels(),
                ", image_size = ", o.image_size(), ", hidden = ", o.hidden(), ", depth = ", o.depth());
    TORCH_CHECK(o.features() >= 0, "MLP: features must be >= 0 (0: images), got ", o.features());
    TORCH_CHECK(o.features() <= (int64_t{1} << 24) && o.hidden() <= (int64_t{1} << 20) && o.depth() <= 1024 &&
                    o.channels() <= 65536 && o.image_size() <= 4096 && o.channels() * o.image_size() * o.image_size() <= (int64_t{1} << 24),
                "MLP: a layer this wide or this deep is refused (features <= 2^24, hidden <= 2^20, depth <= 1024, ",
                "channels * image_size^2 <= 2^24)");
    layers.clear();
    time_mlp = register_module("time_mlp", detail::make_time_mlp(o.time_dim()));
    const int64_t pixels = o.features() > 0 ? o.features() : o.channels() * o.image_size() * o.image_size();
    for (int64_t i = 0; i <= o.depth(); ++i) {
      const int64_t in = i == 0 ? pixels + o.time_dim() : o.hidden();
      const int64_t out = i == o.depth() ? pixels : o.hidden();
      layers.push_back(register_module("fc" + std::to_string(i + 1), torch::nn::Linear(in, out)));
    }
  }

  /// x: (N, channels, image_size, image_size), or (N, features) when features > 0; t: (N,). Returns the
  /// prediction (noise, v or x_0, as trained), x's shape.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    if (options.features() > 0) {
      TORCH_CHECK(x.defined() && x.is_floating_point() && x.dim() == 2 && x.size(1) == options.features(), name_,
                  ": x must be floating-point vectors (N, ", options.features(), "), got ",
                  x.defined() ? c10::str(x.scalar_type(), " of shape ", x.sizes()) : std::string("an undefined tensor"));
      TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == x.size(0) && t.device() == x.device(), name_,
                  ": t must be (N,) with N = ", x.size(0), " on ", x.device());
    } else {
      detail::check_image_batch(name_.c_str(), x, t, options.channels(), options.image_size());
    }
    const auto t_emb = time_mlp->forward(t.to(x.scalar_type()));
    auto h = torch::cat({x.reshape({x.size(0), -1}), t_emb}, 1);
    for (size_t i = 0; i + 1 < layers.size(); ++i) h = torch::relu(layers[i](h));
    return layers.back()(h).reshape(x.sizes());
  }

  MLPOptions options;
  torch::nn::Sequential time_mlp{nullptr};
  /// fc1 .. fc_{depth+1}.
  std::vector<torch::nn::Linear> layers;

 protected:
  MLPImpl(MLPOptions options, std::string name) : options(options), name_(std::move(name)) { reset(); }

 private:
  std::string name_ = "MLP";
};
TORCH_MODULE(MLP);

/// The seed's ~1.5M-parameter MLP (1,526,288 parameters): hidden 512, depth 3.
class SmolMLPImpl : public MLPImpl {
 public:
  static MLPOptions preset() { return MLPOptions().hidden(512).depth(3); }
  explicit SmolMLPImpl(MLPOptions options = preset()) : MLPImpl(options, "SmolMLP") {}
};
TORCH_MODULE(SmolMLP);

/// The seed's ~20.6M-parameter MLP (20,589,584 parameters): hidden 2048, depth 5. Options given to the
/// constructor replace the preset whole (ChunkyMLP(preset().time_dim(128)) changes one field).
class ChunkyMLPImpl : public MLPImpl {
 public:
  static MLPOptions preset() { return MLPOptions().hidden(2048).depth(5); }
  explicit ChunkyMLPImpl(MLPOptions options = preset()) : MLPImpl(options, "ChunkyMLP") {}
};
TORCH_MODULE(ChunkyMLP);

/// MLPOptions as JSON, every field by name (how checkpoints record them); unknown fields are refused.
inline void to_json(nlohmann::json& j, const MLPOptions& o) {
  j = {{"features", o.features()}, {"channels", o.channels()}, {"image_size", o.image_size()}, {"hidden", o.hidden()},
       {"depth", o.depth()}, {"time_dim", o.time_dim()}};
}
inline void from_json(const nlohmann::json& j, MLPOptions& o) {
  detail::check_json_fields(j, {"features", "channels", "image_size", "hidden", "depth", "time_dim"}, "MLPOptions");
  detail::read_json_field<int64_t>(j, "features", [&](auto v) { o.features(v); });
  detail::read_json_field<int64_t>(j, "channels", [&](auto v) { o.channels(v); });
  detail::read_json_field<int64_t>(j, "image_size", [&](auto v) { o.image_size(v); });
  detail::read_json_field<int64_t>(j, "hidden", [&](auto v) { o.hidden(v); });
  detail::read_json_field<int64_t>(j, "depth", [&](auto v) { o.depth(v); });
  detail::read_json_field<int64_t>(j, "time_dim", [&](auto v) { o.time_dim(v); });
}

namespace detail {
inline const bool mlp_registered = (register_backbone<MLPImpl>("mlp"), register_backbone<SmolMLPImpl>("smol_mlp", SmolMLPImpl::preset()),
                                    register_backbone<ChunkyMLPImpl>("chunky_mlp", ChunkyMLPImpl::preset()), true);
}  // namespace detail

}  // namespace diffusion
