// Training, checkpoints, sample grids and the idx dataset loader.
#include "catch.hpp"

#include <diffusion/diffusion.hpp>

#if !defined(DIFFUSION_NO_ZLIB)
#include <zlib.h>
#endif

#include <filesystem>
#include <stdexcept>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

using namespace diffusion;
namespace fs = std::filesystem;

namespace {

/// A fresh, empty directory under the system temp dir for one test.
fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("diffusion_tests_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

/// 64 images of 1x8x8 in [-1, 1]: a bright square at one of four positions.
torch::Tensor tiny_dataset(int64_t n = 64) {
  auto x = torch::full({n, 1, 8, 8}, -1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = (i % 2) * 4, c = ((i / 2) % 2) * 4;
    x[i][0].slice(0, r, r + 4).slice(1, c, c + 4).fill_(1.0f);
  }
  return x;
}

ConvNet tiny_net() { return ConvNet(ConvNetOptions().widths({8, 16}).time_dim(32)); }

TrainerOptions quiet() {
  return TrainerOptions().batch_size(16).lr(2e-3).progress(ProgressMode::Off).device(torch::kCPU).threads(1);
}

std::vector<uint8_t> idx_bytes(uint32_t magic, std::vector<uint32_t> dims, size_t data_bytes, uint8_t fill = 7) {
  std::vector<uint8_t> out;
  const auto be = [&](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
  };
  be(magic);
  for (auto d : dims) be(d);
  out.insert(out.end(), data_bytes, fill);
  return out;
}

void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                               static_cast<std::streamsize>(bytes.size()));
}

#if !defined(DIFFUSION_NO_ZLIB)
void write_gz(const fs::path& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}
#endif

}  // namespace

TEST_CASE("training lowers the validation loss on a tiny dataset", "[trainer]") {
  torch::manual_seed(0);
  const auto data = tiny_dataset(256);
  std::vector<double> val;
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().timesteps(100)), quiet().epochs(5).lr(3e-3));
  trainer.on_epoch = [&](const EpochInfo& e) { val.push_back(e.val_loss); };
  trainer.fit(data, data.slice(0, 0, 32));
  REQUIRE(val.size() == 5);
  // An untrained net's MSE is near 1 (eps has unit variance); the fixed validation draws make epochs
  // compare. Measured: 0.94 after the first epoch, 0.55 after the fifth.
  CHECK(val.back() < 0.7 * val.front());
  CHECK(trainer.epoch() == 5);
  CHECK(trainer.global_step() == 5 * 16);
}

TEST_CASE("training in bf16 lowers the loss like float32, keeps float32 weights and records its precision",
          "[trainer][precision]") {
  const auto data = tiny_dataset(256);
  const auto run = [&](Precision precision, const fs::path& dir) {
    torch::manual_seed(0);
    std::vector<double> val;
    Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().timesteps(100)),
                    quiet().epochs(5).lr(3e-3).precision(precision).grid_samples(4).out_dir(dir.string()));
    trainer.on_epoch = [&](const EpochInfo& e) { val.push_back(e.val_loss); };
    trainer.fit(data, data.slice(0, 0, 32));
    for (const auto& p : unwrap(trainer.model()).parameters()) CHECK(p.scalar_type() == torch::kFloat32);
    return val;
  };
  const auto dir = scratch("bf16");
  const auto v32 = run(Precision::Float32, dir / "fp32"), v16 = run(Precision::BFloat16, dir / "bf16");
  // The float32 run goes from 0.94 to 0.55 (the test above); bf16 must learn as much, up to rounding.
  CHECK(v16.back() < 0.7 * v16.front());
  CHECK_THAT(v16.back(), WithinRel(v32.back(), 0.1));
  CHECK(v16 != v32);  // it did run differently
  const auto info = read_checkpoint_info(dir / "bf16" / "checkpoints" / "checkpoint_epoch_005.pt");
  CHECK(info.training.at("precision") == "bf16");
}

TEST_CASE("min-SNR weights are min(SNR_t, gamma) / SNR_t", "[trainer][min_snr]") {
  const NoiseSchedule schedule;  // linear, T = 1000
  const auto t = torch::tensor({0, 100, 500, 999}, torch::kLong);
  const auto w = min_snr_weights(schedule, t, 5.0);
  const auto& abar = schedule.host().alphas_cumprod;
  for (int64_t i = 0; i < 4; ++i) {
    const double a = abar[static_cast<size_t>(t[i].item<int64_t>())], snr = a / (1 - a);
    CHECK_THAT(w[i].item<double>(), WithinRel(std::min(snr, 5.0) / snr, 1e-4));
  }
  // t = 0: abar = 1 - 1e-4, SNR = 9999, so 5 / 9999; t = 999: SNR = 4e-5 < 5, weight 1.
  CHECK_THAT(w[0].item<double>(), WithinRel(5.0 / 9999.0, 1e-3));
  CHECK(w[3].item<double>() == 1.0);
  CHECK_REFUSED(min_snr_weights(schedule, t, 0.0), "min_snr_weights: gamma must be > 0, got 0");
  CHECK_REFUSED(min_snr_weights(schedule, torch::tensor({1000}, torch::kLong), 5.0), "min_snr_weights");
  CHECK_REFUSED(Trainer(tiny_net(), NoiseSchedule(), quiet().min_snr_gamma(-1)), "min_snr_gamma must be >= 0");
}

TEST_CASE("training with min-SNR weighting learns; a gamma above every SNR is the plain loss", "[trainer][min_snr]") {
  const auto data = tiny_dataset(256);
  const NoiseSchedule schedule(NoiseScheduleOptions().timesteps(100));
  const auto run = [&](double gamma, int64_t epochs) {
    torch::manual_seed(0);
    std::vector<double> val;
    Trainer trainer(tiny_net(), schedule, quiet().epochs(epochs).lr(3e-3).min_snr_gamma(gamma));
    trainer.on_epoch = [&](const EpochInfo& e) { val.push_back(e.val_loss); };
    trainer.fit(data, data.slice(0, 0, 32));
    return val;
  };
  const auto v5 = run(5.0, 5);
  CHECK(v5.back() < 0.8 * v5.front());
  // Every SNR of this schedule is below 1e4 (abar_0 = 1 - 1e-4), so the weights are all 1.
  const auto v_off = run(0.0, 2), v_big = run(1e6, 2);
  // The two differ only in the order of the float32 sums (per image, then over the batch).
  REQUIRE(v_big.size() == 2);
  for (size_t i = 0; i < 2; ++i) CHECK_THAT(v_big[i], WithinRel(v_off[i], 1e-3));
}

TEST_CASE("resuming gives the same weights as an uninterrupted run", "[trainer][checkpoint]") {
  const auto data = tiny_dataset();
  // With a warm-up and the cosine learning rate too: the resumed run must continue the same lr curve.
  const auto opts =
      quiet().epochs(2).ema_decay(0.9).grad_clip(1.0).grid_samples(0).lr_schedule(LRSchedule::Cosine).warmup_steps(3);
  const NoiseSchedule schedule(NoiseScheduleOptions().timesteps(100));

  torch::manual_seed(1);
  Trainer straight(tiny_net(), schedule, TrainerOptions(opts).out_dir(scratch("straight").string()));
  straight.fit(data);

  torch::manual_seed(1);  // same initial weights
  const auto dir = scratch("resumed").string();
  // Interrupted after epoch 1's checkpoint, as a killed run would be (its options, epochs included, unchanged).
  Trainer first(tiny_net(), schedule, TrainerOptions(opts).out_dir(dir));
  first.on_epoch = [](const EpochInfo& e) {
    if (e.epoch == 1) throw std::runtime_error("interrupted");
  };
  CHECK_THROWS_WITH(first.fit(data), "interrupted");
  torch::manual_seed(99);  // a different initialisation, overwritten by the checkpoint
  Trainer second(tiny_net(), schedule, TrainerOptions(opts).out_dir(dir));
  REQUIRE(second.resume());
  CHECK(second.epoch() == 1);
  second.fit(data);
  CHECK(second.epoch() == 2);
  CHECK(second.global_step() == straight.global_step());

  const auto a = straight.model()->named_parameters(), b = second.model()->named_parameters();
  for (const auto& p : a) {
    INFO(p.key());
    CHECK((p.value() - b[p.key()]).abs().max().item<double>() <= 1e-6);
    CHECK((straight.ema()[p.key()] - second.ema()[p.key()]).abs().max().item<double>() <= 1e-6);
  }
}

TEST_CASE("on CUDA, when present: the CPU's noise, training, and checkpoints that load on the CPU", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device: nothing to check here (scripts/gpu-check.sh runs this on a GPU machine)");
    return;
  }
  const torch::Device cuda(torch::kCUDA);
  // A seed draws every noise tensor on the CPU, so CUDA samples match the CPU's up to arithmetic.
  const NoiseSchedule schedule(NoiseScheduleOptions().timesteps(50));
  torch::manual_seed(0);
  auto net = tiny_net();
  const auto on_cpu = sample(net, schedule, {4, 1, 8, 8}, DDPM(), SampleOptions().seed(3));
  const auto ddim_cpu = sample(net, schedule, {4, 1, 8, 8}, DDIM().steps(10), SampleOptions().seed(3));
  net->to(cuda);
  const auto on_cuda = sample(net, schedule.to(cuda), {4, 1, 8, 8}, DDPM(), SampleOptions().seed(3));
  const auto ddim_cuda = sample(net, schedule.to(cuda), {4, 1, 8, 8}, DDIM().steps(10), SampleOptions().seed(3));
  CHECK(on_cuda.device().is_cuda());
  CHECK((on_cuda.cpu() - on_cpu).abs().max().item<double>() < 1e-2);
  CHECK((ddim_cuda.cpu() - ddim_cpu).abs().max().item<double>() < 1e-2);

  // The trainer on CUDA lowers the loss; its checkpoint loads into a CPU model with equal weights.
  const auto dir = scratch("cuda");
  Trainer trainer(tiny_net(), schedule, quiet().device(cuda).epochs(4).ema_decay(0.9).out_dir(dir.string()));
  std::vector<double> losses;
  trainer.on_epoch = [&](const EpochInfo& e) { losses.push_back(e.train_loss); };
  trainer.fit(tiny_dataset());
  CHECK(losses.back() < losses.front());
  auto cpu_model = tiny_net();
  load_weights(list_checkpoints(dir / "checkpoints").back(), cpu_model, /*use_ema=*/false);
  const auto trained = trainer.model()->named_parameters();
  for (const auto& p : cpu_model->named_parameters()) {
    INFO(p.key());
    CHECK(torch::equal(p.value(), trained[p.key()].cpu()));
  }
  // Resuming on CUDA continues with the optimizer state on the device.
  Trainer again(tiny_net(), schedule, quiet().device(cuda).epochs(5).ema_decay(0.9).out_dir(dir.string()));
  REQUIRE(again.resume());
  CHECK_NOTHROW(again.fit(tiny_dataset()));
  CHECK(again.epoch() == 5);
}

TEST_CASE("the learning rate warms up linearly, then follows the cosine to zero at the last step", "[trainer][lr]") {
  const auto o = TrainerOptions().lr(1e-3).warmup_steps(4).lr_schedule(LRSchedule::Cosine);
  CHECK_THAT(learning_rate_at(o, 0, 21), WithinRel(2.5e-4, 1e-12));
  CHECK_THAT(learning_rate_at(o, 3, 21), WithinRel(1e-3, 1e-12));
  CHECK_THAT(learning_rate_at(o, 4, 21), WithinRel(1e-3, 1e-12));   // cosine starts at p = 0
  CHECK_THAT(learning_rate_at(o, 12, 21), WithinRel(5e-4, 1e-12));  // p = 8 / 16 = 0.5
  CHECK_THAT(learning_rate_at(o, 20, 21), WithinAbs(0.0, 1e-15));   // the last step
  const auto constant = TrainerOptions().lr(2e-3).warmup_steps(2);
  CHECK_THAT(learning_rate_at(constant, 0, 10), WithinRel(1e-3, 1e-12));
  CHECK_THAT(learning_rate_at(constant, 9, 10), WithinRel(2e-3, 1e-12));
  CHECK_THAT(learning_rate_at(TrainerOptions().lr(3e-4), 0, 10), WithinRel(3e-4, 1e-12));  // the seed's: constant

  // The trainer steps with exactly these values, and leaves AdamW at the last one.
  const auto data = tiny_dataset(32);
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().timesteps(10)),
                  quiet().epochs(2).batch_size(8).lr(1e-3).warmup_steps(2).lr_schedule(LRSchedule::Cosine).grid_samples(0));
  std::vector<double> seen;
  trainer.on_step = [&](const StepInfo& s) { seen.push_back(s.lr); };
  trainer.fit(data);
  REQUIRE(seen.size() == 8);
  for (size_t i = 0; i < seen.size(); ++i) {
    CHECK_THAT(seen[i], WithinAbs(learning_rate_at(trainer.options(), static_cast<int64_t>(i), 8), 1e-15));
  }
  CHECK(seen.back() == 0.0);
  const auto& group = trainer.optimizer().param_groups().front();
  CHECK(static_cast<const torch::optim::AdamWOptions&>(group.options()).lr() == 0.0);
}

TEST_CASE("micro-batches accumulate the same gradient as the whole batch", "[trainer]") {
  // GroupNorm has no batch statistics, so the micro-batch losses, weighted by their share of the batch,
  // sum to the batch's mean loss and their gradients to its gradient. One step from the same weights on
  // the same draws; the gradients stay in .grad() after fit. (Weights after several AdamW steps are no
  // fair comparison: Adam scales rounding-level gradients of near-zero parameters up to lr-sized steps.)
  const auto data = tiny_dataset(64);
  const NoiseSchedule schedule(NoiseScheduleOptions().timesteps(50));
  const auto one_step = quiet().epochs(1).max_steps_per_epoch(1);
  torch::manual_seed(5);
  Trainer whole(tiny_net(), schedule, one_step);
  torch::manual_seed(5);
  Trainer micro(tiny_net(), schedule, TrainerOptions(one_step).micro_batch(5));  // 16 = 5 + 5 + 5 + 1
  double loss_whole = 0, loss_micro = 0;
  whole.on_step = [&](const StepInfo& s) { loss_whole = s.loss; };
  micro.on_step = [&](const StepInfo& s) { loss_micro = s.loss; };
  whole.fit(data);
  micro.fit(data);
  CHECK_THAT(loss_micro, WithinRel(loss_whole, 1e-5));
  const auto b = micro.model()->named_parameters();
  for (const auto& p : whole.model()->named_parameters()) {
    INFO(p.key());
    const auto& ga = p.value().grad();
    const auto& gb = b[p.key()].grad();
    REQUIRE(ga.defined());
    REQUIRE(gb.defined());
    CHECK(torch::allclose(ga, gb, /*rtol=*/1e-4, /*atol=*/1e-6));
  }
  CHECK_REFUSED(Trainer(tiny_net(), schedule, quiet().micro_batch(-1)), "micro_batch must be >= 0");
}

TEST_CASE("checkpoints are written atomically, the newest N kept, with metrics and grids", "[trainer][checkpoint]") {
  const auto dir = scratch("outputs");
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().timesteps(20)),
                  quiet().epochs(3).keep_checkpoints(2).grid_samples(4).out_dir(dir.string()));
  trainer.metadata["backbone"] = "conv";
  trainer.fit(tiny_dataset(32), tiny_dataset(16));
  const auto kept = list_checkpoints(dir / "checkpoints");
  REQUIRE(kept.size() == 2);
  CHECK(kept[0].filename() == "checkpoint_epoch_002.pt");
  CHECK(kept[1].filename() == "checkpoint_epoch_003.pt");
  for (const auto& entry : fs::directory_iterator(dir / "checkpoints")) CHECK(entry.path().extension() != ".tmp");
  for (const auto* name : {"epoch_001.png", "epoch_002.png", "epoch_003.png"}) CHECK(fs::exists(dir / "samples" / name));

  std::ifstream metrics(dir / "metrics.jsonl");
  std::vector<std::string> lines;
  for (std::string line; std::getline(metrics, line);) lines.push_back(line);
  REQUIRE(lines.size() == 3);
  CHECK(lines[2].find("\"epoch\": 3") != std::string::npos);
  CHECK(lines[2].find("\"val_loss\": ") != std::string::npos);
  CHECK(lines[2].find("\"val_loss\": null") == std::string::npos);

  const auto info = read_checkpoint_info(kept[1]);
  CHECK(info.epoch == 3);
  CHECK(info.global_step == 6);
  CHECK(info.schedule.timesteps() == 20);
  CHECK_FALSE(info.has_ema);
  CHECK(info.metadata.at("backbone") == "conv");
  CHECK(info.training.at("batch_size") == "16");
  CHECK(info.training.at("lr") == "0.002");
  CHECK(info.training.at("epochs") == "3");
  CHECK(info.training.at("ema_decay") == "0");
  CHECK(info.training.at("device") == "cpu");
}

TEST_CASE("keep_epochs pins early checkpoints besides the newest N", "[trainer][checkpoint]") {
  CHECK(checkpoint_filename(7) == "checkpoint_epoch_007.pt");
  CHECK(checkpoint_filename(1234) == "checkpoint_epoch_1234.pt");
  const auto dir = scratch("pinned");
  const NoiseSchedule schedule(NoiseScheduleOptions().timesteps(20));
  Trainer trainer(tiny_net(), schedule,
                  quiet().epochs(5).keep_checkpoints(1).keep_epochs({2, 9}).grid_samples(0).out_dir(dir.string()));
  trainer.fit(tiny_dataset(16));
  const auto kept = list_checkpoints(dir / "checkpoints");
  REQUIRE(kept.size() == 2);
  CHECK(kept[0].filename() == "checkpoint_epoch_002.pt");
  CHECK(kept[1].filename() == "checkpoint_epoch_005.pt");
  CHECK(read_checkpoint_info(kept[0]).epoch == 2);
  CHECK_REFUSED(Trainer(tiny_net(), schedule, quiet().keep_epochs({3, 0})), "keep_epochs must hold epochs >= 1, got 0");
}

TEST_CASE("set_threads sets the intra-op threads, every core at 0", "[trainer]") {
  const int before = at::get_num_threads();
  set_threads(1);
  CHECK(at::get_num_threads() == 1);
  set_threads(0);
  CHECK(at::get_num_threads() == static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  CHECK_REFUSED(set_threads(-1), "set_threads: threads must be >= 0 (0 = all cores), got -1");
  at::set_num_threads(before);
}

TEST_CASE("grid_ddim_steps samples the grids with DDIM at eta 1", "[trainer]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().timesteps(20));
  const auto dir = scratch("ddim_grid");
  Trainer trainer(tiny_net(), schedule, quiet().epochs(1).grid_samples(4).grid_ddim_steps(5).out_dir(dir.string()));
  trainer.fit(tiny_dataset(16));
  CHECK(fs::exists(dir / "samples" / "epoch_001.png"));
  const auto grid = trainer.sample({4, 1, 8, 8}, 3);
  CHECK(torch::equal(grid, sample(trainer.model(), trainer.schedule(), {4, 1, 8, 8}, DDIM().steps(5).eta(1.0),
                                  SampleOptions().seed(3))));
  Trainer ddpm(tiny_net(), schedule, quiet());
  CHECK(torch::equal(ddpm.sample({4, 1, 8, 8}, 3), sample(ddpm.model(), ddpm.schedule(), {4, 1, 8, 8}, DDPM(),
                                                            SampleOptions().seed(3))));
  CHECK_REFUSED(Trainer(tiny_net(), schedule, quiet().grid_ddim_steps(21)),
                "grid_ddim_steps must be in [0, 20] (0: DDPM), got 21");
  CHECK_REFUSED(Trainer(tiny_net(), schedule, quiet().grid_ddim_steps(-1)), "grid_ddim_steps must be in [0, 20]");
}

TEST_CASE("a checkpoint round trip reproduces sampling exactly, EMA weights included", "[checkpoint]") {
  const auto dir = scratch("roundtrip");
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().timesteps(30)),
                  quiet().epochs(1).ema_decay(0.5).grid_samples(0).out_dir(dir.string()));
  trainer.fit(tiny_dataset(32));
  const auto path = list_checkpoints(dir / "checkpoints").back();
  const auto expected = trainer.sample({4, 1, 8, 8}, 11);  // from the EMA weights

  const auto info = read_checkpoint_info(path);
  REQUIRE(info.has_ema);
  auto model = tiny_net();
  load_weights(path, model);  // EMA by default
  const auto got = sample(model, NoiseSchedule(info.schedule), {4, 1, 8, 8}, DDPM(), SampleOptions().seed(11));
  CHECK(torch::equal(expected, got));

  auto raw = tiny_net();
  load_weights(path, raw, /*use_ema=*/false);
  for (const auto& p : trainer.model()->named_parameters()) CHECK(torch::equal(p.value(), raw->named_parameters()[p.key()]));
}

TEST_CASE("checkpoints refuse the wrong model or file", "[checkpoint][errors]") {
  const auto dir = scratch("refuse");
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().timesteps(10)),
                  quiet().epochs(1).grid_samples(0).out_dir(dir.string()));
  trainer.fit(tiny_dataset(16));
  const auto path = list_checkpoints(dir / "checkpoints").back();
  ConvNet wider(ConvNetOptions().widths({16, 16}).time_dim(32));
  CHECK_REFUSED(load_weights(path, wider), "with shape");
  SmolMLP mlp;
  CHECK_REFUSED(load_weights(path, mlp), "does not fit this model");
  CHECK_REFUSED(read_checkpoint_info(dir / "missing.pt"), "no such file");
  write_bytes(dir / "junk.pt", {1, 2, 3});
  CHECK_THROWS(read_checkpoint_info(dir / "junk.pt"));
  Trainer with_ema(tiny_net(), NoiseSchedule(NoiseScheduleOptions().timesteps(10)), quiet().ema_decay(0.9));
  CHECK_REFUSED(with_ema.load_checkpoint(path), "has no EMA weights");
}

TEST_CASE("trainer refuses bad options and data", "[trainer][errors]") {
  const NoiseSchedule s(NoiseScheduleOptions().timesteps(10));
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().epochs(0)), "epochs must be >= 1, got 0");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().batch_size(0)), "batch_size must be >= 1");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().lr(0)), "lr must be > 0");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().warmup_steps(-1)), "warmup_steps must be >= 0 (0 = off), got -1");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().ema_decay(1.0)), "ema_decay must be in [0, 1)");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().grad_clip(-1)), "grad_clip must be >= 0");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().keep_checkpoints(0)), "keep_checkpoints must be >= 1");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().threads(-1)), "threads must be >= 0");
  Trainer ok(tiny_net(), s, quiet().epochs(1));
  CHECK_REFUSED(ok.fit(torch::zeros({4, 8, 8})), "train must be a non-empty floating-point (N, C, H, W) tensor");
  CHECK_REFUSED(ok.fit(torch::zeros({4, 1, 8, 8}, torch::kUInt8)), "train must be a non-empty floating-point");
  CHECK_REFUSED(ok.fit(tiny_dataset(4), torch::zeros({0, 1, 8, 8})), "val must be a non-empty");
}

TEST_CASE("progress shows epoch, percent, steps, rate and loss", "[trainer]") {
  ProgressBar bar("Epoch 3/100", 469, ProgressMode::Off);
  bar.update(212, 0.0412);
  const auto line = bar.line();
  CHECK(line.find("Epoch 3/100") == 0);
  CHECK(line.find(" 45%|#########") != std::string::npos);
  CHECK(line.find("212/469 [") != std::string::npos);
  CHECK(line.find("it/s, loss=0.0412]") != std::string::npos);
}

TEST_CASE("a grid PNG reads back with the right size and pixel values; bad PNGs are refused", "[image]") {
  const auto dir = scratch("png");
  // Four 1x3x2 images with values -1, 0, 0.5, 1 -> grid of 2x2 with padding 2.
  auto images = torch::stack({torch::full({1, 3, 2}, -1.0), torch::full({1, 3, 2}, 0.0), torch::full({1, 3, 2}, 0.5),
                              torch::full({1, 3, 2}, 1.0)});
  const auto grid = make_grid(to_unit_range(images), 2, 2);
  REQUIRE(grid.sizes() == torch::IntArrayRef({1, 2 + 2 * (3 + 2), 2 + 2 * (2 + 2)}));
  write_png(dir / "grid.png", grid);
  const auto back = read_png(dir / "grid.png");
  REQUIRE(back.sizes() == torch::IntArrayRef({1, 12, 10}));
  const auto at = [&](int y, int x) { return static_cast<int>(std::lround(back[0][y][x].item<float>() * 255)); };
  CHECK(at(0, 0) == 0);      // padding
  CHECK(at(2, 2) == 0);      // -1 -> 0
  CHECK(at(2, 6) == 128);    // 0 -> 0.5 -> round(127.5)
  CHECK(at(7, 2) == 191);    // 0.5 -> 0.75 -> round(191.25)
  CHECK(at(9, 7) == 255);    // 1 -> 1
  // Converted on reading: grey to RGB repeats the value.
  const auto rgb = read_png(dir / "grid.png", 3);
  CHECK(rgb.sizes() == torch::IntArrayRef({3, 12, 10}));
  CHECK(torch::equal(rgb[2], back[0]));
  write_bytes(dir / "not.png", {'n', 'o', 't', ' ', 'a', ' ', 'p', 'n', 'g'});
  CHECK_REFUSED(read_png(dir / "not.png"), "not.png is not a readable PNG");
  CHECK_REFUSED(read_png(dir / "missing.png"), "missing.png: no such file");
  CHECK_REFUSED(read_png(dir / "grid.png", 2), "channels must be 0 (as stored), 1, 3 or 4, got 2");
  CHECK_REFUSED(write_png(dir / "x.png", torch::zeros({2, 4, 4})), "expected 1, 3 or 4 channels, got 2");
  CHECK_REFUSED(make_grid(torch::zeros({4, 4})), "images must be (N, C, H, W)");
}

TEST_CASE("the idx loader reads good files, plain and gzipped, and names the fault in bad ones", "[data]") {
  const auto dir = scratch("idx");
  write_bytes(dir / "train-images-idx3-ubyte", idx_bytes(0x803, {3, 28, 28}, 3 * 28 * 28, 255));
#if defined(DIFFUSION_NO_ZLIB)
  write_bytes(dir / "train-labels-idx1-ubyte", idx_bytes(0x801, {3}, 3, 9));
  write_bytes(dir / "gzipped", {0x1f, 0x8b, 8, 0, 0, 0, 0, 0});
  CHECK_REFUSED(data::read_idx(dir / "gzipped"), "is gzipped but this build has no zlib");
#else
  write_gz(dir / "train-labels-idx1-ubyte.gz", idx_bytes(0x801, {3}, 3, 9));
#endif
  const auto split = data::load_mnist(dir, data::Split::Train);
  CHECK(split.images.sizes() == torch::IntArrayRef({3, 1, 28, 28}));
  CHECK(split.images.max().item<float>() == 1.0f);  // 255 -> 1
  CHECK(split.labels.sizes() == torch::IntArrayRef({3}));
  CHECK(split.labels[2].item<int64_t>() == 9);
  const auto zero = data::read_idx(dir / "train-images-idx3-ubyte");
  CHECK(zero.scalar_type() == torch::kUInt8);

  write_bytes(dir / "truncated", idx_bytes(0x803, {3, 28, 28}, 100));
  CHECK_REFUSED(data::read_idx(dir / "truncated"), "truncated: header promises 2352 bytes of data, file has 100");
  write_bytes(dir / "short-header", {0, 0, 8, 3, 0, 0});
  CHECK_REFUSED(data::read_idx(dir / "short-header"), "truncated header");
  write_bytes(dir / "magic", idx_bytes(0x00000903, {1}, 1));
  CHECK_REFUSED(data::read_idx(dir / "magic"), "wrong magic number 0x903");
  write_bytes(dir / "trailing", idx_bytes(0x801, {2}, 5));
  CHECK_REFUSED(data::read_idx(dir / "trailing"), "3 unexpected trailing bytes");
  CHECK_REFUSED(data::read_idx(dir / "nope"), "nope: no such file");
  CHECK_REFUSED(data::load_mnist(dir, data::Split::Test), "t10k-images-idx3-ubyte (or .gz) not found");
  write_bytes(dir / "t10k-images-idx3-ubyte", idx_bytes(0x803, {2, 28, 28}, 2 * 28 * 28));
  write_bytes(dir / "t10k-labels-idx1-ubyte", idx_bytes(0x801, {3}, 3));
  CHECK_REFUSED(data::load_mnist(dir, data::Split::Test), "has 2 images but");
}
