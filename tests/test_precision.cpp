// Mixed precision: precision names, the autocast guard, bf16 backbones and samplers.
#include "helpers.hpp"


TEST_CASE("precision names parse, other names are refused", "[precision][errors]") {
  CHECK(parse_precision("fp32") == Precision::Float32);
  CHECK(parse_precision("float32") == Precision::Float32);
  CHECK(parse_precision("bf16") == Precision::BFloat16);
  CHECK(parse_precision("bfloat16") == Precision::BFloat16);
  CHECK(to_string(Precision::Float32) == "fp32");
  CHECK(to_string(Precision::BFloat16) == "bf16");
  CHECK_REFUSED(parse_precision("fp16"), "parse_precision: expected \"fp32\" or \"bf16\", got \"fp16\"");
}

TEST_CASE("AutocastGuard runs products in bf16 inside, float32 outside, and nests", "[precision]") {
  const auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  const auto mm_dtype = [&] { return torch::mm(a, b).scalar_type(); };
  CHECK(mm_dtype() == torch::kFloat32);
  {
    AutocastGuard amp(Precision::BFloat16, torch::kCPU);
    CHECK(mm_dtype() == torch::kBFloat16);
    {
      AutocastGuard fp32(Precision::Float32, torch::kCPU);  // turns it off for its scope
      CHECK(mm_dtype() == torch::kFloat32);
    }
    CHECK(mm_dtype() == torch::kBFloat16);
    {
      AutocastGuard again(Precision::BFloat16, torch::kCPU);
      CHECK(mm_dtype() == torch::kBFloat16);
    }
    CHECK(mm_dtype() == torch::kBFloat16);
  }
  CHECK(mm_dtype() == torch::kFloat32);
  CHECK_REFUSED(AutocastGuard(Precision::BFloat16, torch::Device(c10::DeviceType::Meta)),
                "AutocastGuard: bf16 autocast supports CPU and CUDA devices, got meta");
}

TEST_CASE("every backbone runs under bf16 autocast, near its float32 output, with float32 gradients",
          "[precision][backbones]") {
  torch::manual_seed(0);
  const auto x = torch::randn({4, 1, 28, 28});
  const auto t = torch::tensor({0, 10, 500, 999});
  const auto check = [&](auto net, const char* name) {
    INFO(name);
    const auto y32 = net(x, t);
    torch::Tensor y16;
    {
      AutocastGuard amp(Precision::BFloat16, torch::kCPU);
      y16 = net(x, t);
    }
    CHECK(y16.scalar_type() == torch::kBFloat16);  // the last layer really ran in bf16
    // bf16 rounds weights and activations to 8 significant bits (relative error <= 2^-8 = 0.4% each);
    // through a dozen layers with float32 accumulation that stays within a few percent of the output.
    const double rel = ((y16.to(torch::kFloat32) - y32).norm() / y32.norm()).template item<double>();
    CHECK(rel > 0);
    CHECK(rel < 0.05);
    net->zero_grad();
    y16.to(torch::kFloat32).pow(2).mean().backward();
    for (const auto& p : net->named_parameters()) {
      INFO(p.key());
      REQUIRE(p.value().grad().defined());
      CHECK(p.value().grad().scalar_type() == torch::kFloat32);
    }
  };
  check(UNet(), "UNet");
  check(ConvNet(ConvNetOptions().widths({16, 32})), "ConvNet");
  check(SmolMLP(), "SmolMLP");
  check(ChunkyMLP(), "ChunkyMLP");
}

TEST_CASE("samplers autocast the model call only, and return float32", "[sampler][precision]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100));
  const auto all = [](const std::vector<bool>& v, bool value) {
    return !v.empty() && std::all_of(v.begin(), v.end(), [&](bool b) { return b == value; });
  };
  for (const bool ddim : {false, true}) {
    INFO((ddim ? "ddim" : "ddpm"));
    const auto run = [&](Precision precision, AutocastProbe& probe) {
      const auto options = SampleOptions().precision(precision).seed(3);
      return ddim ? sample(probe, schedule, {64, 1, 4, 4}, DDIM().steps(20).eta(1), options)
                  : sample(probe, schedule, {64, 1, 4, 4}, DDPM(), options);
    };
    AutocastProbe p32(GaussianOracle(schedule, 0.5, 0.2)), p16(GaussianOracle(schedule, 0.5, 0.2));
    const auto x32 = run(Precision::Float32, p32), x16 = run(Precision::BFloat16, p16);
    CHECK(all(p32->seen, false));
    CHECK(all(p16->seen, true));
    CHECK_FALSE(diffusion::detail::autocast_enabled(c10::DeviceType::CPU));
    CHECK(x16.scalar_type() == torch::kFloat32);
    // The same bf16 answers, so the same float32 arithmetic around them: equal bit for bit.
    CHECK(torch::equal(x16, x32));
  }
}

// ---- Timestep spacing -------------------------------------------------------------------------------

