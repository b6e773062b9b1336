#pragma once

#include <torch/torch.h>

#include <cmath>
#include <cstdint>

namespace diffusion {

/// Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, appendix B),
/// exactly as the seed computes it:
///   freq_i = exp(-i * ln(10000) / (dim/2 - 1)),  i = 0 .. dim/2 - 1
///   emb(t) = [sin(t freq_0), ..., sin(t freq_{dim/2-1}), cos(t freq_0), ..., cos(t freq_{dim/2-1})]
/// It has no parameters.
///
/// Example:
///   SinusoidalPositionEmbeddings emb(256);
///   auto e = emb(torch::arange(4));   // (4, 256)
class SinusoidalPositionEmbeddingsImpl : public torch::nn::Cloneable<SinusoidalPositionEmbeddingsImpl> {
 public:
  explicit SinusoidalPositionEmbeddingsImpl(int64_t dim) : dim(dim) { reset(); }

  void reset() override {
    TORCH_CHECK(dim >= 4 && dim % 2 == 0, "SinusoidalPositionEmbeddings: dim must be even and >= 4, got ", dim);
  }

  /// t: (N,) timesteps. Returns (N, dim) in t's dtype when t is floating point, else in float32.
  torch::Tensor forward(const torch::Tensor& t) {
    TORCH_CHECK(t.dim() == 1, "SinusoidalPositionEmbeddings: t must be 1-D (N,), got ", t.sizes());
    const int64_t half = dim / 2;
    const double scale = std::log(10000.0) / static_cast<double>(half - 1);
    const auto dtype = t.is_floating_point() ? t.scalar_type() : torch::kFloat32;
    const auto opts = torch::TensorOptions().dtype(dtype).device(t.device());
    const auto freqs = torch::exp(torch::arange(half, opts) * -scale);
    const auto args = t.to(dtype).unsqueeze(1) * freqs.unsqueeze(0);
    return torch::cat({args.sin(), args.cos()}, /*dim=*/-1);
  }

  void pretty_print(std::ostream& os) const override { os << "diffusion::SinusoidalPositionEmbeddings(" << dim << ")"; }

  int64_t dim;
};
TORCH_MODULE(SinusoidalPositionEmbeddings);

/// A learned embedding of class labels for conditional backbones: num_classes classes plus one "null"
/// class (null_class, -1) that stands for no condition (Ho & Salimans 2022, "Classifier-Free Diffusion
/// Guidance": one network learns both when training drops labels to it). Its output is added to the time
/// embedding.
///
/// Example:
///   ClassEmbedding emb(10, 128);
///   auto e = emb->forward(torch::tensor({3, -1}), 2);   // (2, 128): class 3, and no class
class ClassEmbeddingImpl : public torch::nn::Cloneable<ClassEmbeddingImpl> {
 public:
  ClassEmbeddingImpl(int64_t num_classes, int64_t dim) : num_classes(num_classes), dim(dim) { reset(); }

  void reset() override {
    TORCH_CHECK(num_classes >= 1 && dim >= 1, "ClassEmbedding: num_classes and dim must be >= 1, got ", num_classes,
                " and ", dim);
    table = register_module("table", torch::nn::Embedding(num_classes + 1, dim));
  }

  /// cond: (n,) integer labels in [0, num_classes) or null_class; undefined means null for all n. `who`
  /// names the backbone in messages.
  torch::Tensor forward(const torch::Tensor& cond, int64_t n, const char* who = "ClassEmbedding") {
    auto index = torch::full({n}, num_classes, torch::TensorOptions().dtype(torch::kLong).device(table->weight.device()));
    if (cond.defined()) {
      TORCH_CHECK(!cond.is_floating_point() && !cond.is_complex() && cond.scalar_type() != torch::kBool && cond.dim() == 1,
                  who, ": cond must be a 1-D integer tensor of class labels, got ", cond.scalar_type(), " of shape ",
                  cond.sizes());
      TORCH_CHECK(cond.size(0) == n, who, ": cond has ", cond.size(0), " labels but the batch has ", n, " samples");
      const auto lo = cond.min().item<int64_t>(), hi = cond.max().item<int64_t>();
      TORCH_CHECK(lo >= -1 && hi < num_classes, who, ": class labels must be in [0, ", num_classes,
                  ") or null_class (-1), got values in [", lo, ", ", hi, "]");
      const auto labels = cond.to(index.device(), torch::kLong);
      index = torch::where(labels < 0, index, labels);
    }
    return table(index);
  }

  void pretty_print(std::ostream& os) const override {
    os << "diffusion::ClassEmbedding(" << num_classes << " classes + null, " << dim << ")";
  }

  int64_t num_classes, dim;
  torch::nn::Embedding table{nullptr};
};
TORCH_MODULE(ClassEmbedding);

namespace detail {

/// Refuses class labels for an unconditional backbone (num_classes 0).
inline void check_no_labels(const char* who, const torch::Tensor& cond) {
  TORCH_CHECK(!cond.defined(), who, ": class labels given to an unconditional model (num_classes is 0); train it with "
              "num_classes to condition it");
}

/// The seed's time MLP: Sequential(SinusoidalPositionEmbeddings(dim), Linear(dim, dim), ReLU).
/// Kept as a Sequential so parameter names ("time_mlp.1.weight") match the seed's state_dict.
inline torch::nn::Sequential make_time_mlp(int64_t dim) {
  return torch::nn::Sequential(SinusoidalPositionEmbeddings(dim), torch::nn::Linear(dim, dim), torch::nn::ReLU());
}

/// Checks an image batch (N, C, H, W) against a backbone's expected channels (and size when > 0).
inline void check_image_batch(const char* fn, const torch::Tensor& x, const torch::Tensor& t, int64_t channels,
                              int64_t image_size) {
  TORCH_CHECK(x.defined() && x.is_floating_point(), fn, ": x must be a floating-point tensor, got ",
              x.defined() ? c10::toString(x.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(x.dim() == 4, fn, ": x must be (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == channels, fn, ": expected ", channels, " channel(s), got ", x.size(1), " (shape ",
              x.sizes(), ")");
  if (image_size > 0) {
    TORCH_CHECK(x.size(2) == image_size && x.size(3) == image_size, fn, ": expected ", image_size, "x", image_size,
                " images, got ", x.size(2), "x", x.size(3));
  }
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == x.size(0), fn, ": t must be (N,) with N = ", x.size(0),
              ", got shape ", t.defined() ? t.sizes() : torch::IntArrayRef{});
  TORCH_CHECK(t.device() == x.device(), fn, ": t is on ", t.device(), " but x is on ", x.device());
}

}  // namespace detail
}  // namespace diffusion
