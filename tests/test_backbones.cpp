// The seed's backbones, the Backbone concept, subclassing, and the backbone registry.
#include "helpers.hpp"

namespace backbone_helpers {

int64_t parameter_count(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

/// Output shape == input shape for several batch sizes; t changes the output; every parameter gets a gradient.
template <Backbone B>
void check_backbone_behaviour(B& net, int64_t channels, int64_t size) {
  torch::manual_seed(0);
  for (const int64_t n : {1, 3, 8}) {
    const auto x = torch::randn({n, channels, size, size});
    CHECK(net(x, torch::randint(0, 1000, {n}, torch::kLong)).sizes() == x.sizes());
  }
  const auto x = torch::randn({4, channels, size, size});
  const auto y0 = net(x, torch::zeros({4}, torch::kLong));
  const auto y1 = net(x, torch::full({4}, 500, torch::kLong));
  CHECK((y0 - y1).abs().max().template item<double>() > 1e-4);

  net->zero_grad();
  net(x, torch::tensor({1, 10, 100, 999})).pow(2).mean().backward();
  for (const auto& p : net->named_parameters()) {
    INFO(p.key());
    REQUIRE(p.value().grad().defined());
    CHECK(p.value().grad().abs().sum().template item<double>() > 0);
  }
}

// --- The concept, checked at compile time -------------------------------------------------------------

struct NoForwardImpl : torch::nn::Module {};
TORCH_MODULE(NoForward);
struct OneArgForwardImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(OneArgForward);
struct NotAModule {
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return x; }
};
struct WrongReturnImpl : torch::nn::Module {
  int forward(const torch::Tensor&, const torch::Tensor&) { return 0; }
};

/// A user's experiment: the seed's ConvNet with a global residual connection, from subclassing.
struct ResidualConvNetImpl : ConvNetImpl {
  using ConvNetImpl::ConvNetImpl;
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& cond = {}) override {
    return ConvNetImpl::forward(x, t, cond) + x;
  }
};
TORCH_MODULE(ResidualConvNet);

static_assert(Backbone<ConvNet>);
static_assert(Backbone<ConvNetImpl>);
static_assert(Backbone<std::shared_ptr<ConvNetImpl>>);
static_assert(Backbone<SmolMLP> && Backbone<ChunkyMLP> && Backbone<MLP> && Backbone<UNet>);
static_assert(Backbone<ResidualConvNet> && Backbone<std::shared_ptr<ResidualConvNetImpl>>);
static_assert(Backbone<const ConvNet&>);
static_assert(!Backbone<NoForward> && !Backbone<NoForwardImpl>);
static_assert(!Backbone<OneArgForward>);
static_assert(!Backbone<NotAModule> && PredictsNoise<NotAModule> && !TorchModule<NotAModule>);
static_assert(!Backbone<WrongReturnImpl>);
static_assert(!Backbone<int> && !Backbone<torch::nn::Linear>);
static_assert(std::is_same_v<module_type_t<ConvNet>, ConvNetImpl>);
static_assert(std::is_same_v<module_type_t<std::shared_ptr<SmolMLPImpl>>, SmolMLPImpl>);

}  // namespace backbone_helpers
using namespace backbone_helpers;


TEST_CASE("parameter counts equal the seed's PyTorch modules", "[backbones]") {
  CHECK(parameter_count(*ConvNet()) == 3276129);
  CHECK(parameter_count(*SmolMLP()) == 1526288);
  CHECK(parameter_count(*ChunkyMLP()) == 20589584);
}

TEST_CASE("parameter names match the seed's state_dict", "[backbones]") {
  const auto conv = ConvNet()->named_parameters();
  for (const auto* name : {"time_mlp.1.weight", "enc1.conv1.weight", "enc4.norm2.bias", "bottleneck.time_mlp.weight",
                           "dec4.conv1.weight", "dec1.conv2.bias", "final.weight"}) {
    INFO(name);
    CHECK(conv.contains(name));
  }
  CHECK(conv["enc1.conv1.weight"].sizes() == torch::IntArrayRef({32, 1, 3, 3}));
  CHECK(conv["dec4.conv1.weight"].sizes() == torch::IntArrayRef({128, 256, 3, 3}));
  CHECK(conv["dec1.conv1.weight"].sizes() == torch::IntArrayRef({32, 32, 3, 3}));
  const auto chunky = ChunkyMLP()->named_parameters();
  CHECK(chunky["fc1.weight"].sizes() == torch::IntArrayRef({2048, 28 * 28 + 256}));
  CHECK(chunky["fc6.weight"].sizes() == torch::IntArrayRef({28 * 28, 2048}));
  CHECK(SmolMLP()->named_parameters()["fc4.weight"].sizes() == torch::IntArrayRef({28 * 28, 512}));
}

TEST_CASE("sinusoidal embedding is the seed's formula", "[backbones]") {
  SinusoidalPositionEmbeddings emb(8);  // half = 4, freq_i = 10000^(-i/3)
  const auto e = emb(torch::tensor({0, 7}));
  REQUIRE(e.sizes() == torch::IntArrayRef({2, 8}));
  for (int64_t i = 0; i < 4; ++i) {
    const double freq = std::pow(10000.0, -static_cast<double>(i) / 3.0);
    CHECK_THAT(e[0][i].item<double>(), WithinAbs(0.0, 1e-7));
    CHECK_THAT(e[0][i + 4].item<double>(), WithinAbs(1.0, 1e-7));
    CHECK_THAT(e[1][i].item<double>(), WithinAbs(std::sin(7 * freq), 1e-6));
    CHECK_THAT(e[1][i + 4].item<double>(), WithinAbs(std::cos(7 * freq), 1e-6));
  }
  CHECK_REFUSED(SinusoidalPositionEmbeddings(7), "dim must be even and >= 4, got 7");
}

TEST_CASE("ConvNet keeps the shape, depends on t and trains every parameter", "[backbones]") {
  ConvNet net;
  check_backbone_behaviour(net, 1, 28);
  ConvNet rgb(ConvNetOptions().channels(3).widths({16, 32}));  // options change the shape it takes
  check_backbone_behaviour(rgb, 3, 12);
}

TEST_CASE("SmolMLP keeps the shape, depends on t and trains every parameter", "[backbones]") {
  SmolMLP net;
  check_backbone_behaviour(net, 1, 28);
}

TEST_CASE("ChunkyMLP keeps the shape, depends on t and trains every parameter", "[backbones]") {
  ChunkyMLP net;
  check_backbone_behaviour(net, 1, 28);
  MLP small(MLPOptions().channels(2).image_size(6).hidden(32).depth(2));
  check_backbone_behaviour(small, 2, 6);
}

TEST_CASE("UNet keeps the shape, depends on t and trains every parameter", "[backbones][unet]") {
  UNet net;
  const auto params = parameter_count(*net);
  INFO("UNet parameters: " << params);
  // The defaults (widths 16, 32, 128): the count a PyTorch replica of this architecture gives.
  CHECK(params == 731729);
  CHECK(parameter_count(*UNet(UNetOptions().widths({32, 64, 128}))) == 1006881);
  check_backbone_behaviour(net, 1, 28);  // attention's parameters included
  UNet plain(UNetOptions().widths({16, 32, 64}).attention(false).channels(3));
  check_backbone_behaviour(plain, 3, 12);
  CHECK_REFUSED(net(torch::zeros({2, 1, 30, 30}), torch::tensor({1, 2})),
                "divisible by 4 (patch 1 times 2^2 for 3 levels), got 30x30");
  CHECK_REFUSED(net(torch::zeros({2, 2, 28, 28}), torch::tensor({1, 2})), "UNet: expected 1 channel(s), got 2");
  CHECK_REFUSED(UNet(UNetOptions().widths({32, 64})), "blocks must hold one count per level (2, as widths), got 3");
  CHECK_REFUSED(UNet(UNetOptions().widths({32, 64, 100})), "groups (8) must divide the widths");
}

TEST_CASE("UNet blocks per level add width-keeping blocks and keep the one-block names", "[backbones][unet]") {
  // A ResBlock(c, c) with a 128-wide time embedding holds 18c^2 + 135c parameters (two 3x3 convs with
  // biases, two GroupNorms, the time projection), so {1, 2, 2} adds two at 32 and two at 128 channels.
  const auto block = [](int64_t c) { return 18 * c * c + 135 * c; };
  UNet deeper(UNetOptions().blocks({1, 2, 2}));
  CHECK(parameter_count(*deeper) == 731729 + 2 * block(32) + 2 * block(128));
  CHECK(parameter_count(*UNet(UNetOptions().blocks({3, 1, 1}))) == 731729 + 4 * block(16));
  check_backbone_behaviour(deeper, 1, 28);  // every extra block is on the path and trains
  // One block per level names its parameters as before the option existed, so older checkpoints load.
  UNet one;
  for (const auto& p : one->named_parameters()) CHECK(deeper->named_parameters().contains(p.key()));
  CHECK(deeper->named_parameters().contains("mid1_1.conv1.weight"));
  // The registration order is the order of the parameters in a checkpoint's optimizer state, so it is
  // the one the network had before levels, blocks and patches were options: extra blocks come last.
  std::vector<std::string> order;
  for (const auto& child : deeper->named_children()) order.push_back(child.key());
  CHECK(order == std::vector<std::string>{"time_mlp", "in_conv", "down0", "pool0", "down1", "pool1", "mid1", "attn",
                                          "mid2", "up1", "up0", "down1_1", "mid1_1", "mid2_1", "up1_1", "out_norm",
                                          "out_conv"});
  // Clones rebuild the extra blocks rather than sharing them.
  auto copy = std::dynamic_pointer_cast<UNetImpl>(deeper->clone());
  REQUIRE(copy);
  REQUIRE(copy->mid1.size() == 2);
  CHECK(copy->mid1[1]->conv1->weight.data_ptr() != deeper->mid1[1]->conv1->weight.data_ptr());
  CHECK(torch::equal(copy->mid1[1]->conv1->weight, deeper->mid1[1]->conv1->weight));
  CHECK_REFUSED(UNet(UNetOptions().blocks({1, 2})), "blocks must hold one count per level (3, as widths), got 2");
  CHECK_REFUSED(UNet(UNetOptions().blocks({1, 0, 1})), "blocks per level must be >= 1, got 0");
}

TEST_CASE("UNet takes any number of levels, named as the three-level one", "[backbones][unet]") {
  UNet one_level(UNetOptions().widths({16}).blocks({2}));  // mid1, attention, mid2 at full resolution
  check_backbone_behaviour(one_level, 1, 6);
  CHECK(one_level->down.empty());
  CHECK(one_level->named_parameters().contains("mid2_1.conv2.weight"));
  UNet four(UNetOptions().widths({8, 16, 16, 32}).blocks({1, 1, 2, 1}));
  check_backbone_behaviour(four, 1, 16);  // 16 -> 8 -> 4 -> 2
  for (const auto* name : {"down2.conv1.weight", "down2_1.conv1.weight", "pool2.weight", "up2_1.conv2.weight",
                           "up0.skip.weight", "mid1.skip.weight"}) {
    INFO(name);
    CHECK(four->named_parameters().contains(name));
  }
  CHECK(UNetOptions().size_multiple() == 4);
  CHECK(four->options.size_multiple() == 8);
  CHECK(UNetOptions().patch(2).widths({32, 128}).size_multiple() == 4);
  CHECK_REFUSED(four(torch::zeros({1, 1, 12, 12}), torch::tensor({1})),
                "divisible by 8 (patch 1 times 2^3 for 4 levels), got 12x12");
  CHECK_REFUSED(UNet(UNetOptions().widths({}).blocks({})), "widths must hold at least one level, got none");
}

TEST_CASE("UNet with patches is the unpatched network on pixel-unshuffled images", "[backbones][unet]") {
  const auto options = UNetOptions().widths({32, 128}).blocks({1, 2});
  UNet patched(UNetOptions(options).patch(2));
  // Folding 2x2 patches changes only the convolutions at the ends: in_conv reads 4 channels instead of 1
  // (3 * 32 * 9 more weights), out_conv writes 4 (3 * (32 * 9 + 1) more weights and biases).
  CHECK(parameter_count(*patched) == parameter_count(*UNet(options)) + 3 * 32 * 9 + 3 * (32 * 9 + 1));
  CHECK(parameter_count(*patched) == 1340964);  // the configuration of docs/results.md
  check_backbone_behaviour(patched, 1, 28);
  // Same weights, by name, in a network of 4 channels that never folds: patch(2) is exactly
  // pixel_shuffle(flat(pixel_unshuffle(x))).
  UNet flat(UNetOptions(options).channels(4));
  {
    torch::NoGradGuard no_grad;
    const auto from = patched->named_parameters();
    for (auto& p : flat->named_parameters()) p.value().copy_(from[p.key()]);
  }
  torch::manual_seed(1);
  const auto x = torch::randn({3, 1, 28, 28});
  const auto t = torch::tensor({0, 250, 999});
  const auto expected = torch::pixel_shuffle(flat(torch::pixel_unshuffle(x, 2), t), 2);
  CHECK(torch::allclose(patched(x, t), expected, 1e-5, 1e-6));
  // Each output pixel keeps its place: output (i, j) comes from channel 2 * (i % 2) + j % 2 at (i / 2, j / 2).
  CHECK(torch::equal(expected.index({0, 0, 5, 8}), flat(torch::pixel_unshuffle(x, 2), t).index({0, 2, 2, 4})));
  CHECK_REFUSED(patched(torch::zeros({1, 1, 26, 26}), torch::tensor({1})),
                "divisible by 4 (patch 2 times 2^1 for 2 levels), got 26x26");
  CHECK_REFUSED(UNet(UNetOptions().patch(0)), "UNet: patch must be >= 1, got 0");
}

TEST_CASE("backbones refuse inputs of the wrong shape", "[backbones][errors]") {
  ConvNet conv;
  SmolMLP smol;
  const auto t2 = torch::tensor({1, 2});
  CHECK_REFUSED(conv(torch::zeros({2, 3, 28, 28}), t2), "ConvNet: expected 1 channel(s), got 3");
  CHECK_REFUSED(conv(torch::zeros({2, 28, 28}), t2), "ConvNet: x must be (N, C, H, W), got shape [2, 28, 28]");
  CHECK_REFUSED(conv(torch::zeros({2, 1, 28, 28}), torch::tensor({1, 2, 3})), "t must be (N,) with N = 2");
  CHECK_REFUSED(conv(torch::zeros({2, 1, 28, 28}, torch::kLong), t2), "x must be a floating-point tensor");
  CHECK_REFUSED(smol(torch::zeros({2, 1, 32, 32}), t2), "SmolMLP: expected 28x28 images, got 32x32");
  CHECK_REFUSED(smol(torch::zeros({2, 2, 28, 28}), t2), "SmolMLP: expected 1 channel(s), got 2");
  CHECK_REFUSED(ChunkyMLP()(torch::zeros({2, 1, 27, 28}), t2), "ChunkyMLP: expected 28x28 images");
  CHECK_REFUSED(ConvNet(ConvNetOptions().widths({})), "widths must not be empty");
  CHECK_REFUSED(ConvNet(ConvNetOptions().widths({12})), "groups (8) must divide out_channels (12)");
  CHECK_REFUSED(MLP(MLPOptions().depth(0)), "depth must be >= 1");
}

TEST_CASE("MLP backbones accept non-contiguous input", "[backbones]") {
  SmolMLP net;
  const auto x = torch::randn({28, 28, 1, 3}).permute({3, 2, 0, 1});  // (3, 1, 28, 28), not contiguous
  REQUIRE_FALSE(x.is_contiguous());
  const auto t = torch::tensor({1, 2, 3});
  CHECK(torch::allclose(net(x, t), net(x.contiguous(), t)));
}

TEST_CASE("a subclassed backbone trains and samples", "[backbones][subclass]") {
  // Two experiments a researcher runs: override forward (a residual connection), and swap a block.
  torch::manual_seed(3);
  ResidualConvNet residual(ConvNetOptions().widths({8, 16}));
  auto swapped = std::make_shared<ConvNetImpl>(ConvNetOptions().widths({8, 16}));
  swapped->bottleneck = swapped->replace_module("bottleneck", ConvBlock(ConvBlockOptions(16, 16, 256).groups(4)));
  swapped->final = swapped->replace_module(
      "final", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 1, 3).padding(1)));
  CHECK(swapped->named_parameters()["final.weight"].sizes() == torch::IntArrayRef({1, 8, 3, 3}));

  NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(50));
  // Data: one fixed 8x8 pattern; the loss of predicting its noise must fall.
  const auto pattern = torch::linspace(-1, 1, 64).reshape({1, 1, 8, 8});
  const auto train = [&](auto& net) {
    torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(3e-3));
    const auto loss_at = [&](int64_t step) {
      torch::manual_seed(100 + step % 4);  // four fixed batches, so the losses compare
      const auto x0 = pattern.expand({16, 1, 8, 8});
      const auto t = torch::randint(0, 50, {16}, torch::kLong);
      const auto eps = torch::randn_like(x0);
      return torch::mse_loss(unwrap(net).forward(q_sample(schedule, x0, t, eps), t), eps);
    };
    double first = 0, last = 0;
    for (int64_t step = 0; step < 60; ++step) {
      const auto loss = loss_at(step);
      if (step < 4) first += loss.template item<double>() / 4;
      if (step >= 56) last += loss.template item<double>() / 4;
      opt.zero_grad();
      loss.backward();
      opt.step();
    }
    CHECK(last < 0.5 * first);
    const auto x = sample(net, schedule, {4, 1, 8, 8}, DDPM(), SampleOptions().seed(1));
    CHECK(x.sizes() == torch::IntArrayRef({4, 1, 8, 8}));
    CHECK(torch::isfinite(x).all().template item<bool>());
  };
  train(residual);
  train(swapped);
}

// --- Mixed precision -----------------------------------------------------------------------------------

