// Bring your own backbone: any torch::nn::Module with forward(x, t) trains and samples.
//
//   custom_backbone [DATA_DIR] [IMAGES]     (defaults: data/mnist, 4096 training images)
//
// Trains two backbones for one short epoch each on MNIST and writes their sample grids:
//   1. TinyResNet, written from scratch below;
//   2. GatedConvNet, the library's ConvNet with its forward overridden.
// Both are registered (one line each), so their checkpoints record what they are and load_model rebuilds
// them from the file alone, as the last lines show.
#include <diffusion/diffusion.hpp>

#include <fmt/core.h>

#include <cstdlib>
#include <string>

using namespace diffusion;

/// TinyResNet's options, and their JSON form (how a checkpoint records them).
struct TinyResNetOptions {
  TORCH_ARG(int64_t, width) = 32;
  TORCH_ARG(int64_t, depth) = 4;
};
void to_json(nlohmann::json& j, const TinyResNetOptions& o) { j = {{"width", o.width()}, {"depth", o.depth()}}; }
void from_json(const nlohmann::json& j, TinyResNetOptions& o) {
  o.width(j.at("width").get<int64_t>()).depth(j.at("depth").get<int64_t>());
}

/// 1. From scratch: a few residual conv layers at full resolution, with a learned time embedding added
/// to every layer. Nothing here comes from the library except the sinusoidal embedding.
struct TinyResNetImpl : torch::nn::Module {
  explicit TinyResNetImpl(TinyResNetOptions options = {}) : options(options) {
    const int64_t width = options.width(), depth = options.depth();
    time = register_module("time", torch::nn::Sequential(SinusoidalPositionEmbeddings(64), torch::nn::Linear(64, width),
                                                         torch::nn::SiLU()));
    stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, width, 3).padding(1)));
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
    auto h = stem(x);
    for (size_t i = 0; i < layers->size(); ++i) {
      h = h + layers[i]->as<torch::nn::Conv2d>()->forward(
                  torch::silu(norms[i]->as<torch::nn::GroupNorm>()->forward(h + emb)));
    }
    return out(h);
  }

  TinyResNetOptions options;
  torch::nn::Sequential time{nullptr};
  torch::nn::Conv2d stem{nullptr}, out{nullptr};
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
  // ConvNet's forward takes optional class labels (cond) too; an override keeps that signature.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) override {
    return ConvNetImpl::forward(x, t, cond) * gate(t).view({-1, 1, 1, 1});
  }
  torch::nn::Embedding gate{nullptr};
};
TORCH_MODULE(GatedConvNet);

static_assert(Backbone<TinyResNet> && Backbone<GatedConvNet>);

template <Backbone B>
void train_and_sample(const std::string& name, B model, const torch::Tensor& images) {
  Trainer trainer(std::move(model), NoiseSchedule(),
                  TrainerOptions().epochs(1).optimization(OptimizationOptions().lr(2e-3)));
  // The grid is drawn with DPM-Solver++ in 20 steps rather than the default 1000-step DDPM.
  trainer.add_hook(std::make_shared<RunOutputs>(
      RunOutputsOptions("runs/custom/" + name).grid_samples(16).grid_sampler(std::make_shared<DPMSolverPP>(DPMSolverPP().steps(20)))));
  trainer.on_epoch = [&](const TrainEpoch& e) {
    fmt::print("{}: loss {:.4f}, {:.0f} img/s, grid {}\n", name, e.train_loss, e.images_per_second, e.grid.string());
    // The checkpoint alone rebuilds the model: no architecture in this code.
    auto [loaded, info] = load_model(e.checkpoint);
    const auto x = sample(loaded, NoiseSchedule(info.schedule), {4, 1, 28, 28}, DPMSolverPP().steps(10), SampleOptions().seed(0));
    fmt::print("{}: load_model rebuilt '{}' from {} and drew {} samples\n", name, info.backbone->name,
               e.checkpoint.string(), x.size(0));
  };
  trainer.fit(images);
}

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "data/mnist";
  const int64_t n = argc > 2 ? std::atoll(argv[2]) : 4096;
  set_threads();         // every core: Debian's LibTorch starts with one intra-op thread
  reuse_freed_memory();  // no page faults on the memory each step frees and takes again
  // One line per backbone: the name its checkpoints record.
  register_backbone<TinyResNetImpl>("tiny_resnet");
  register_backbone<GatedConvNetImpl>("gated_convnet");
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
