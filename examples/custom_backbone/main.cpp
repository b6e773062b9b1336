// Bring your own backbone: any torch::nn::Module with forward(x, t) trains and samples.
//
//   custom_backbone [DATA_DIR] [IMAGES]     (defaults: data/mnist, 4096 training images)
//
// Trains two backbones for one short epoch each on MNIST and writes their sample grids:
//   1. TinyResNet, written from scratch below;
//   2. GatedConvNet, the library's ConvNet with its forward overridden.
#include <diffusion/diffusion.hpp>

#include <fmt/core.h>

#include <cstdlib>
#include <string>

using namespace diffusion;

/// 1. From scratch: a few residual conv layers at full resolution, with a learned time embedding added
/// to every layer. Nothing here comes from the library except the sinusoidal embedding.
struct TinyResNetImpl : torch::nn::Module {
  explicit TinyResNetImpl(int64_t width = 32, int64_t depth = 4) {
    time = register_module("time", torch::nn::Sequential(SinusoidalPositionEmbeddings(64), torch::nn::Linear(64, width),
                                                         torch::nn::SiLU()));
    in = register_module("in", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, width, 3).padding(1)));
    for (int64_t i = 0; i < depth; ++i) {
      layers->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(width, width, 3).padding(1)));
      norms->push_back(torch::nn::GroupNorm(8, width));
    }
    register_module("layers", layers);
    register_module("norms", norms);
    out = register_module("out", torch::nn::Conv2d(torch::nn::Conv2dOptions(width, 1, 3).padding(1)));
  }

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    const auto emb = time->forward(t).unsqueeze(-1).unsqueeze(-1);
    auto h = in(x);
    for (size_t i = 0; i < layers->size(); ++i) {
      h = h + layers[i]->as<torch::nn::Conv2d>()->forward(
                  torch::silu(norms[i]->as<torch::nn::GroupNorm>()->forward(h + emb)));
    }
    return out(h);
  }

  torch::nn::Sequential time{nullptr};
  torch::nn::Conv2d in{nullptr}, out{nullptr};
  torch::nn::ModuleList layers, norms;
};
TORCH_MODULE(TinyResNet);

/// 2. Derived from a library backbone: the seed's ConvNet, with its prediction gated by a learned
/// per-timestep scale (an experiment in a dozen lines).
struct GatedConvNetImpl : ConvNetImpl {
  explicit GatedConvNetImpl(ConvNetOptions options) : ConvNetImpl(std::move(options)) {
    gate = register_module("gate", torch::nn::Embedding(1000, 1));
    torch::nn::init::ones_(gate->weight);
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) override {
    return ConvNetImpl::forward(x, t) * gate(t).view({-1, 1, 1, 1});
  }
  torch::nn::Embedding gate{nullptr};
};
TORCH_MODULE(GatedConvNet);

static_assert(Backbone<TinyResNet> && Backbone<GatedConvNet>);

template <Backbone B>
void train_and_sample(const std::string& name, B model, const torch::Tensor& images) {
  Trainer trainer(std::move(model), NoiseSchedule(),
                  TrainerOptions().epochs(1).lr(2e-3).grid_samples(16).out_dir("runs/custom/" + name));
  trainer.on_epoch = [&](const EpochInfo& e) {
    fmt::print("{}: loss {:.4f}, {:.0f} img/s, grid {}\n", name, e.train_loss, e.images_per_second, e.grid.string());
  };
  trainer.fit(images);
}

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "data/mnist";
  const int64_t n = argc > 2 ? std::atoll(argv[2]) : 4096;
  try {
    const auto images = data::load_mnist(dir, data::Split::Train).images.slice(0, 0, n);
    train_and_sample("tiny_resnet", TinyResNet(), images);
    train_and_sample("gated_convnet", GatedConvNet(ConvNetOptions().widths({16, 32})), images);
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what_without_backtrace());
    return 1;
  }
  return 0;
}
