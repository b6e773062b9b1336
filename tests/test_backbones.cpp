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
static_assert(!Backbone<NotAModule> && NoiseConditional<NotAModule> && !TorchModule<NotAModule>);
static_assert(PredictsNoise<NotAModule>);  // the deprecated name still says the same
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


// --- DiT ----------------------------------------------------------------------------------------------

namespace backbone_helpers {

/// A DiT with its zero-initialized layers (modulations, final Linear) drawn at random, as after training.
DiT trained_looking_dit(DiTOptions o) {
  DiT net(o);
  torch::NoGradGuard no_grad;
  torch::manual_seed(11);
  for (auto& p : net->named_parameters()) {
    if (p.key().find("modulation") != std::string::npos || p.key().rfind("final_linear", 0) == 0) p.value().normal_(0, 0.1);
  }
  return net;
}

}  // namespace backbone_helpers

static_assert(Backbone<DiT> && ConditionalBackbone<DiT>);

TEST_CASE("DiT's parameter count is the closed form of its layers", "[backbones][dit]") {
  // Per block: qkv 3w^2 + 3w, proj w^2 + w, MLP 2 w h + h + w, adaLN modulation 6w^2 + 6w.
  const auto expected = [](int64_t c, int64_t p, int64_t w, int64_t h, int64_t td, int64_t depth, int64_t classes) {
    const int64_t patch = c * p * p * w + w, time = td * w + w + w * w + w, labels = classes > 0 ? (classes + 1) * w : 0;
    const int64_t block = 3 * w * w + 3 * w + w * w + w + 2 * w * h + h + w + 6 * w * w + 6 * w;
    const int64_t final = 2 * w * w + 2 * w + w * p * p * c + p * p * c;
    return patch + time + labels + depth * block + final;
  };
  CHECK(parameter_count(*DiT()) == 1864580);
  CHECK(parameter_count(*DiT()) == expected(1, 2, 128, 512, 256, 6, 0));
  CHECK(parameter_count(*DiT(DiTOptions().channels(3).patch(4).depth(3).width(96).heads(3).mlp_ratio(2.5).num_classes(7))) ==
        expected(3, 4, 96, 240, 256, 3, 7));
}

TEST_CASE("DiT outputs exactly zero at initialization: adaLN-Zero gates and the final layer", "[backbones][dit]") {
  torch::manual_seed(0);
  DiT net(DiTOptions().channels(3).patch(4).depth(3).width(32).heads(4).num_classes(5));
  for (auto& p : net->named_parameters()) {
    INFO(p.key());
    // Biases start at zero everywhere (as in the paper's code); weights only in adaLN-Zero's layers.
    const bool zero = p.key().find("bias") != std::string::npos || p.key().find("modulation") != std::string::npos ||
                      p.key().rfind("final_linear", 0) == 0;
    CHECK((p.value().abs().max().item<double>() == 0) == zero);
  }
  const auto x = torch::randn({4, 3, 16, 20});
  const auto y = net(x, torch::tensor({0, 10, 500, 999}), torch::tensor({0, 4, -1, 2}));
  CHECK(y.sizes() == x.sizes());
  CHECK(y.abs().max().item<double>() == 0);
  // The final Linear is the only parameter with a gradient at initialization (every gate is zero), and
  // one optimizer step makes the output depend on the input.
  net->zero_grad();
  (net(x, torch::tensor({0, 10, 500, 999})) - x).pow(2).mean().backward();
  CHECK(net->final_linear->weight.grad().abs().sum().item<double>() > 0);
  CHECK(net->blocks[0]->as<DiTBlock>()->qkv->weight.grad().abs().sum().item<double>() == 0);
  torch::optim::SGD(net->parameters(), 0.1).step();
  CHECK(net(x, torch::tensor({0, 10, 500, 999})).abs().max().item<double>() > 0);
}

TEST_CASE("DiT keeps the shape, depends on t and on the class, and trains every parameter", "[backbones][dit]") {
  auto net = trained_looking_dit(DiTOptions().patch(4).depth(2).width(32).heads(2));
  check_backbone_behaviour(net, 1, 28);
  auto rgb = trained_looking_dit(DiTOptions().channels(3).patch(2).depth(1).width(16).heads(4).mlp_ratio(2));
  check_backbone_behaviour(rgb, 3, 8);
  auto conditional = trained_looking_dit(DiTOptions().patch(4).depth(2).width(32).heads(2).num_classes(3));
  const auto x = torch::randn({3, 1, 8, 12});  // not square: a 2x3 grid of patches
  const auto t = torch::tensor({5, 5, 5});
  const auto by_class = conditional(x, t, torch::tensor({0, 1, -1}));
  CHECK(by_class.sizes() == x.sizes());
  CHECK((by_class - conditional(x, t, torch::tensor({2, 1, -1}))).abs()[0].max().item<double>() > 1e-4);
  // Undefined labels mean the null class for every sample.
  CHECK(torch::allclose(conditional(x, t), conditional(x, t, torch::full({3}, null_class, torch::kLong))));
  CHECK_REFUSED(net(x, t, torch::tensor({0, 1, 2})), "DiT: class labels given to an unconditional model");
  CHECK_REFUSED(conditional(x, t, torch::tensor({0, 3, 1})), "DiT: class labels must be in [0, 3) or null_class (-1)");
}

TEST_CASE("DiT maps each patch's token back to that patch", "[backbones][dit]") {
  // With every gate at zero the blocks are the identity, so no token sees another: a change of one pixel
  // moves the output of its own patch only (patchify and unpatchify agree on where a patch is).
  DiT net(DiTOptions().channels(2).patch(4).depth(2).width(16).heads(2));
  {
    torch::NoGradGuard no_grad;
    net->final_linear->weight.normal_(0, 0.3);
  }
  const auto x = torch::randn({1, 2, 12, 8});
  auto moved = x.clone();
  moved[0][1][6][5] += 1;  // patch row 1, column 1
  const auto changed = (net(moved, torch::tensor({7})) - net(x, torch::tensor({7}))).abs().sum(1)[0] > 0;  // (12, 8)
  auto expected = torch::zeros({12, 8}, torch::kBool);
  expected.slice(0, 4, 8).slice(1, 4, 8).fill_(true);
  CHECK(torch::equal(changed, expected));
}

TEST_CASE("a DiT block is equivariant to permuting its tokens", "[backbones][dit]") {
  torch::manual_seed(2);
  DiTBlock block(16, 4, 40);
  {
    torch::NoGradGuard no_grad;
    block->modulation->weight.normal_(0, 0.2);
    block->modulation->bias.normal_(0, 0.2);
  }
  const auto x = torch::randn({2, 9, 16}), c = torch::randn({2, 16});
  const auto perm = torch::randperm(9, torch::kLong);
  const auto y = block(x, c);
  CHECK(torch::allclose(block(x.index_select(1, perm), c), y.index_select(1, perm), 1e-5, 1e-6));
  CHECK((y - x).abs().max().item<double>() > 1e-3);  // and it is not the identity once its gates open
}

TEST_CASE("2-D sin-cos positions are the closed form per axis", "[backbones][dit]") {
  const auto e = sincos_positions_2d(3, 4, 8, torch::kFloat64);  // k = 2, w = {1, 1/100}
  REQUIRE(e.sizes() == torch::IntArrayRef({12, 8}));
  const int64_t r = 1, c = 2;
  const std::vector<double> expected{std::sin(r), std::sin(r / 100.0), std::cos(r), std::cos(r / 100.0),
                                     std::sin(c), std::sin(c / 100.0), std::cos(c), std::cos(c / 100.0)};
  for (int64_t i = 0; i < 8; ++i) CHECK_THAT(e[r * 4 + c][i].item<double>(), WithinAbs(expected[i], 1e-15));
  CHECK(e[0].slice(0, 0, 2).abs().max().item<double>() == 0);  // position (0, 0): sin 0
  CHECK_REFUSED(sincos_positions_2d(2, 2, 6), "width must be a positive multiple of 4, got 6");
}

TEST_CASE("DiT refuses options and inputs it cannot take", "[backbones][dit][errors]") {
  CHECK_REFUSED(DiT(DiTOptions().width(130)), "width must be a positive multiple of 4 and of heads, got width 130 and heads 4");
  CHECK_REFUSED(DiT(DiTOptions().width(64).heads(5)), "width must be a positive multiple of 4 and of heads");
  CHECK_REFUSED(DiT(DiTOptions().patch(0)), "DiT: channels, patch and depth must be >= 1, got 1, 0 and 6");
  CHECK_REFUSED(DiT(DiTOptions().depth(0)), "DiT: channels, patch and depth must be >= 1");
  CHECK_REFUSED(DiT(DiTOptions().mlp_ratio(0)), "DiT: mlp_ratio must make an MLP width in [1, 2^24], got 0");
  CHECK_REFUSED(DiT(DiTOptions().mlp_ratio(std::nan(""))), "DiT: mlp_ratio must make an MLP width");
  CHECK_REFUSED(DiT(DiTOptions().time_dim(5)), "DiT: time_dim must be even and >= 4, got 5");
  CHECK_REFUSED(DiT(DiTOptions().num_classes(-1)), "DiT: num_classes must be >= 0");
  DiT net(DiTOptions().patch(4).depth(1).width(16).heads(2));
  CHECK_REFUSED(net(torch::zeros({2, 1, 28, 30}), torch::tensor({1, 2})), "DiT: height and width must be divisible by the patch (4), got 28x30");
  CHECK_REFUSED(net(torch::zeros({2, 3, 28, 28}), torch::tensor({1, 2})), "DiT: expected 1 channel(s), got 3");
  CHECK_REFUSED(make_backbone(BackboneConfig{"dit", {{"blocks", 3}}}), "DiTOptions: unknown field \"blocks\"");
  CHECK_REFUSED(make_backbone(BackboneConfig{"dit", {{"patch", 4.5}}}), "\"patch\" must be an integer, got 4.5");
  CHECK_REFUSED(make_backbone(BackboneConfig{"dit", {{"depth", 1e10}}}), "\"depth\" must be an integer");
  CHECK_REFUSED(make_backbone(BackboneConfig{"unet", {{"widths", {8, 16.5}}}}), "\"widths\" must be an integer, got [8,16.5]");
  CHECK_REFUSED(DiT(DiTOptions().depth(100000)), "DiT: at most 65536 channels, patch 4096, depth 1024");
  // Its options round-trip through JSON, as a checkpoint records them.
  const auto o = DiTOptions().channels(3).patch(4).depth(3).width(48).heads(3).mlp_ratio(2.5).time_dim(64).num_classes(9);
  auto rebuilt = make_backbone(BackboneConfig{"dit", nlohmann::json(o)});
  const auto config = backbone_config(*rebuilt);
  REQUIRE(config);
  CHECK(config->name == "dit");
  CHECK(config->options == nlohmann::json(o));
  CHECK(rebuilt->conditional());
}

namespace {
/// TemporalUNet's parameter count from its layers: Conv1d in*out*k + out, GroupNorm 2c, Linear a*b + b.
int64_t temporal_unet_parameters(const TemporalUNetOptions& o, int64_t td) {
  const auto conv = [](int64_t in, int64_t out, int64_t k) { return in * out * k + out; };
  const auto block = [&](int64_t in, int64_t out) { return conv(in, out, o.kernel_size()) + 2 * out; };
  const auto res = [&](int64_t in, int64_t out) {
    return block(in, out) + td * out + out + block(out, out) + (in != out ? conv(in, out, 1) : 0);
  };
  const auto& w = o.widths();
  int64_t n = td * 4 * td + 4 * td + 4 * td * td + td;  // the time MLP
  for (size_t i = 0; i < w.size(); ++i) {
    n += res(i == 0 ? o.channels() : w[i - 1], w[i]) + res(w[i], w[i]);
    if (i + 1 < w.size()) n += conv(w[i], w[i], 3);                                  // downsample
    if (i + 1 < w.size()) n += conv(w[i + 1], w[i + 1], 4) + res(w[i + 1] + w[i], w[i]) + res(w[i], w[i]);  // the way up
  }
  n += 2 * res(w.back(), w.back()) + block(w[0], w[0]) + conv(w[0], o.channels(), 1);
  return n + (o.num_classes() > 0 ? (o.num_classes() + 1) * td : 0);
}
}  // namespace

TEST_CASE("TemporalUNet's parameter count is the closed form of its layers", "[backbones][temporal]") {
  for (const auto& o : {TemporalUNetOptions(), TemporalUNetOptions().channels(3).widths({16, 24}).kernel_size(3).time_dim(12).groups(4),
                        TemporalUNetOptions().channels(2).widths({8}).num_classes(5).groups(4)}) {
    TemporalUNet net(o);
    int64_t count = 0;
    for (const auto& p : net->parameters()) count += p.numel();
    CHECK(count == temporal_unet_parameters(o, net->time_dim()));
  }
  CHECK(TemporalUNet()->time_dim() == 32);
}

TEST_CASE("TemporalUNet keeps (N, C, L) at any length its levels divide, depends on t and the class", "[backbones][temporal]") {
  torch::manual_seed(0);
  TemporalUNet net(TemporalUNetOptions().channels(2).widths({8, 16, 16}).groups(4).num_classes(3));
  const auto t = torch::tensor({5, 500});
  for (const int64_t length : {4, 16, 36}) {
    const auto x = torch::randn({2, 2, length});
    const auto y = net(x, t, torch::tensor({0, 2}));
    CHECK(y.sizes() == x.sizes());
    CHECK(torch::isfinite(y).all().item<bool>());
  }
  const auto x = torch::randn({2, 2, 16});
  CHECK_FALSE(torch::allclose(net(x, t), net(x, torch::tensor({6, 900}))));
  CHECK_FALSE(torch::allclose(net(x, t, torch::tensor({0, 0})), net(x, t, torch::tensor({1, 1}))));
  // An undefined cond is the null class for every sample.
  CHECK(torch::allclose(net(x, t), net(x, t, torch::tensor({-1, -1}))));
  // Each sample is computed alone (GroupNorm normalizes per sample).
  CHECK(torch::allclose(net(x, t)[1], net(x.slice(0, 1), t.slice(0, 1))[0], 1e-5, 1e-6));
  // Under bf16 autocast (what --precision auto picks on a CPU with bf16 instructions): LibTorch 1.13 has
  // no bf16 Mish on the CPU, so it runs in float32 there; the result is close to the float32 network's.
  {
    const auto fp32 = net(x, t, torch::tensor({0, 2}));
    AutocastGuard amp(Precision::BFloat16, torch::kCPU);
    const auto y = net(x, t, torch::tensor({0, 2})).to(torch::kFloat32);
    CHECK(torch::allclose(y, fp32, 0.1, 0.1));
  }
  CHECK(torch::allclose(diffusion::detail::mish(torch::tensor({-1.0, 0.5}, torch::kBFloat16)).to(torch::kFloat32),
                        torch::mish(torch::tensor({-1.0, 0.5})), 1e-2, 1e-2));
  // Registered by name; the options round-trip through JSON as a checkpoint records them.
  const auto o = TemporalUNetOptions().channels(3).widths({8, 16}).kernel_size(3).time_dim(16).groups(4).num_classes(2);
  auto rebuilt = make_backbone(BackboneConfig{"temporal_unet", nlohmann::json(o)});
  const auto config = backbone_config(*rebuilt);
  REQUIRE(config);
  CHECK(config->name == "temporal_unet");
  CHECK(config->options == nlohmann::json(o));
  CHECK(rebuilt->conditional());
}

TEST_CASE("TemporalUNet refuses options and inputs it cannot take", "[backbones][temporal][errors]") {
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().widths({})), "TemporalUNet: widths must hold 1 to 16 levels, got 0");
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().widths({8, 0})), "widths must be in [1, 65536], got 0");
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().kernel_size(4)), "kernel_size must be odd and in [1, 255]");
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().channels(0)), "channels must be in [1, 65536], got 0");
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().time_dim(6).widths({12})), "groups (8) must divide every width, got 12");
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().time_dim(7)), "time_dim must be 0 (widths[0]) or even and in [4, 65536], got 7");
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().widths({8}).groups(1).time_dim(0).widths({3})), "when time_dim is 0");
  CHECK_REFUSED(TemporalUNet(TemporalUNetOptions().num_classes(-2)), "num_classes must be >= 0");
  CHECK_REFUSED(make_backbone(BackboneConfig{"temporal_unet", {{"length", 16}}}), "TemporalUNetOptions: unknown field \"length\"");
  TemporalUNet net(TemporalUNetOptions().widths({8, 8, 8}).groups(4));
  const auto t = torch::tensor({1, 2});
  CHECK_REFUSED(net(torch::zeros({2, 1, 18}), t), "TemporalUNet: the length must be divisible by 4 (2^2 for 3 levels), got 18");
  CHECK_REFUSED(net(torch::zeros({2, 2, 16}), t), "TemporalUNet: expected 1 channel(s), got 2");
  CHECK_REFUSED(net(torch::zeros({2, 16}), t), "x must be a floating-point (N, C, L) tensor, got Float of shape [2, 16]");
  CHECK_REFUSED(net(torch::zeros({2, 1, 16}), torch::tensor({1})), "t must be (N,) with N = 2");
  CHECK_REFUSED(net(torch::zeros({2, 1, 16}), t, torch::tensor({0, 1})), "class labels given to an unconditional model");
}

TEST_CASE("MLP takes vectors of any width with features, and reads options written before it had them", "[backbones]") {
  MLP net(MLPOptions().features(3).hidden(16).depth(2).time_dim(8));
  const auto x = torch::randn({5, 3});
  CHECK(net(x, torch::arange(5)).sizes() == x.sizes());
  int64_t count = 0;
  for (const auto& p : net->parameters()) count += p.numel();
  CHECK(count == (8 * 8 + 8) + (11 * 16 + 16) + (16 * 16 + 16) + (16 * 3 + 3));
  CHECK_REFUSED(net(torch::randn({5, 4}), torch::arange(5)), "MLP: x must be floating-point vectors (N, 3), got Float of shape [5, 4]");
  CHECK_REFUSED(net(torch::randn({5, 1, 3}), torch::arange(5)), "x must be floating-point vectors (N, 3)");
  CHECK_REFUSED(net(x, torch::arange(4)), "t must be (N,) with N = 5");
  CHECK_REFUSED(MLP(MLPOptions().features(-1)), "features must be >= 0 (0: images), got -1");
  CHECK_REFUSED(MLP(MLPOptions().hidden(int64_t{1} << 21)), "a layer this wide or this deep is refused");
  auto rebuilt = make_backbone(BackboneConfig{"mlp", nlohmann::json(MLPOptions().features(3))});
  CHECK(backbone_config(*rebuilt)->options.at("features") == 3);
  // A checkpoint written before features existed records images.
  auto old = make_backbone(BackboneConfig{"smol_mlp", {{"channels", 1}, {"image_size", 28}, {"hidden", 512}, {"depth", 3}, {"time_dim", 256}}});
  CHECK(backbone_config(*old)->options.at("features") == 0);
}
