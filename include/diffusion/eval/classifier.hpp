#pragma once

#include <diffusion/detail/check.hpp>
#include <diffusion/platform.hpp>
#include <diffusion/random.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>

/// A small MNIST classifier whose penultimate features stand in for Inception's in FID: Inception
/// features mean little on 28x28 grayscale digits.
namespace diffusion::eval {

/// LeNet-style: conv5x5(32) -> ReLU -> maxpool2 -> conv5x5(64) -> ReLU -> maxpool2 -> Linear(1024, 128)
/// -> ReLU (the features) -> dropout 0.25 -> Linear(128, 10). Takes (N, 1, 28, 28) in [-1, 1].
class LeNetImpl : public torch::nn::Cloneable<LeNetImpl> {
 public:
  LeNetImpl() { reset(); }

  void reset() override {
    using namespace torch::nn;
    conv1 = register_module("conv1", Conv2d(Conv2dOptions(1, 32, 5)));
    conv2 = register_module("conv2", Conv2d(Conv2dOptions(32, 64, 5)));
    fc1 = register_module("fc1", Linear(64 * 4 * 4, 128));
    fc2 = register_module("fc2", Linear(128, 10));
  }

  /// The 128-d penultimate features.
  torch::Tensor features(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 4 && x.size(1) == 1 && x.size(2) == 28 && x.size(3) == 28,
                "LeNet: expected (N, 1, 28, 28) images, got ", detail::shape_str(x));
    detail::check_cpu_convolutions_for(x);
    auto h = torch::max_pool2d(torch::relu(conv1(x)), 2);
    h = torch::max_pool2d(torch::relu(conv2(h)), 2);
    return torch::relu(fc1(h.flatten(1)));
  }

  /// Class logits (N, 10).
  torch::Tensor forward(const torch::Tensor& x) {
    return fc2(torch::dropout(features(x), 0.25, is_training()));
  }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(LeNet);

/// Applies `f` to `x` in batches under InferenceMode with the model in eval mode, concatenating results.
inline torch::Tensor batched(LeNet& model, const torch::Tensor& x, int64_t batch,
                             const std::function<torch::Tensor(const torch::Tensor&)>& f) {
  const bool was_training = model->is_training();
  model->eval();
  c10::InferenceMode no_autograd;
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < x.size(0); i += batch) out.push_back(f(x.slice(0, i, std::min(x.size(0), i + batch))));
  model->train(was_training);
  return torch::cat(out).clone();
}

/// Share of `images` whose predicted class equals `labels`.
inline double accuracy(LeNet& model, const torch::Tensor& images, const torch::Tensor& labels) {
  const auto logits = batched(model, images, 1000, [&](const torch::Tensor& x) { return model(x); });
  return logits.argmax(1).eq(labels).to(torch::kFloat64).mean().item<double>();
}

/// Trains the classifier with Adam (lr 1e-3, batch 128) for `epochs` epochs; `on_epoch(epoch, loss)`
/// reports progress. One or two epochs reach ~99% on MNIST's test set.
inline void train_classifier(LeNet& model, const torch::Tensor& images, const torch::Tensor& labels, int64_t epochs,
                             uint64_t seed = 0, const std::function<void(int64_t, double)>& on_epoch = nullptr) {
  TORCH_CHECK(images.dim() == 4 && labels.dim() == 1 && images.size(0) == labels.size(0),
              "train_classifier: need images (N, 1, 28, 28) and labels (N,), got ", detail::shape_str(images),
              " and ", detail::shape_str(labels));
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  auto gen = make_generator(seed);
  model->train();
  for (int64_t epoch = 1; epoch <= epochs; ++epoch) {
    const auto perm = torch::randperm(images.size(0), gen, torch::kLong);
    double total = 0;
    int64_t steps = 0;
    for (int64_t i = 0; i < images.size(0); i += 128) {
      const auto idx = perm.slice(0, i, std::min(images.size(0), i + 128));
      const auto loss = torch::cross_entropy_loss(model(images.index_select(0, idx)), labels.index_select(0, idx));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      total += loss.item<double>();
      ++steps;
    }
    if (on_epoch) on_epoch(epoch, total / static_cast<double>(steps));
  }
  model->eval();
}

}  // namespace diffusion::eval
