// Training: the loss, the EMA, the Trainer, run outputs, and faults during a run.
#include "helpers.hpp"

#include <numeric>

#include <thread>

namespace training_helpers {

/// Trains `net` on the tiny dataset and returns the validation loss of each epoch.
template <class Net>
std::vector<double> validation_curve(Net net, const NoiseSchedule& schedule, const TrainerOptions& options,
                                     int64_t n = 256) {
  const auto data = tiny_dataset(n);
  std::vector<double> val;
  Trainer trainer(std::move(net), schedule, options);
  trainer.on_epoch = [&](const TrainEpoch& e) { val.push_back(*e.val_loss); };
  trainer.fit(data, data.slice(0, 0, 32));
  return val;
}

std::vector<std::string> lines_of(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& p : list_checkpoints(dir)) out.push_back(p.filename().string());
  return out;
}

}  // namespace training_helpers
using namespace training_helpers;

// ---- The loss --------------------------------------------------------------------------------------

TEST_CASE("diffusion_loss is each sample's mean squared error against the prediction's target", "[loss]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().dtype(torch::kFloat64));
  ScaleNet net(0.5);
  net->to(torch::kFloat64);
  auto gen = make_generator(1);
  const auto x0 = torch::randn({3, 2, 2}, gen, torch::kFloat64), eps = torch::randn({3, 2, 2}, gen, torch::kFloat64);
  const auto t = torch::tensor({0, 400, 999}, torch::kLong);
  const auto& h = schedule.host();
  for (const auto prediction : {Prediction::Epsilon, Prediction::V, Prediction::Sample}) {
    for (const double gamma : {0.0, 5.0}) {
      INFO(to_string(prediction) << ", gamma " << gamma);
      const auto loss = diffusion_loss(net, schedule, x0, t, eps, LossOptions().prediction(prediction).min_snr_gamma(gamma));
      REQUIRE(loss.sizes() == torch::IntArrayRef({3}));
      for (int64_t i = 0; i < 3; ++i) {
        const auto k = static_cast<size_t>(t[i].item<int64_t>());
        const double a = h.sqrt_alphas_cumprod[k], b = h.sqrt_one_minus_alphas_cumprod[k], snr = a * a / (b * b);
        const auto x_t = x0[i] * a + eps[i] * b;
        const auto target = prediction == Prediction::Epsilon ? eps[i] : prediction == Prediction::V ? eps[i] * a - x0[i] * b : x0[i];
        double expected = (x_t * 0.5 - target).pow(2).mean().item<double>();
        if (gamma > 0) {
          const double clipped = std::min(snr, gamma);
          expected *= prediction == Prediction::Epsilon ? clipped / snr : prediction == Prediction::V ? clipped / (snr + 1) : clipped;
        }
        CHECK_THAT(loss[i].item<double>(), WithinRel(expected, 1e-9));
      }
    }
  }
  // The gradient reaches the model.
  diffusion_loss(net, schedule, x0, t, eps).mean().backward();
  CHECK(net->scale.grad().abs().item<double>() > 0);
  CHECK_REFUSED(diffusion_loss(net, schedule, x0, torch::tensor({0, 1}), eps), "t has 2 timesteps but the batch has 3");
  CHECK_REFUSED(diffusion_loss(net, schedule, x0, t, eps.slice(0, 0, 2)), "noise must have x0's shape [3, 2, 2]");
  CHECK_REFUSED(diffusion_loss(net, schedule, x0, t, eps.to(torch::kFloat32)), "noise has dtype Float but x0 has Double");
  CHECK_REFUSED(diffusion_loss(net, schedule, x0, t, eps, LossOptions().min_snr_gamma(-1)), "min_snr_gamma must be >= 0");
}

TEST_CASE("min-SNR weights per prediction type, never NaN, also where SNR = 0", "[loss][min_snr]") {
  const NoiseSchedule schedule;  // linear, T = 1000
  const auto t = torch::tensor({0, 100, 500, 999}, torch::kLong);
  const auto& abar = schedule.host().alphas_cumprod;
  for (const auto prediction : {Prediction::Epsilon, Prediction::V, Prediction::Sample}) {
    INFO(to_string(prediction));
    const auto w = min_snr_weights(schedule, t, 5.0, prediction);
    for (int64_t i = 0; i < 4; ++i) {
      const double a = abar[static_cast<size_t>(t[i].item<int64_t>())], snr = a / (1 - a), c = std::min(snr, 5.0);
      const double expected = prediction == Prediction::Epsilon ? c / snr : prediction == Prediction::V ? c / (snr + 1) : c;
      CHECK_THAT(w[i].item<double>(), WithinRel(expected, 1e-4));
    }
  }
  // t = 0: abar = 1 - 1e-4, SNR = 9999, so 5 / 9999 for epsilon; t = 999: SNR = 4e-5 < 5, weight 1.
  const auto eps_w = min_snr_weights(schedule, t, 5.0);
  CHECK_THAT(eps_w[0].item<double>(), WithinRel(5.0 / 9999.0, 1e-3));
  CHECK(eps_w[3].item<double>() == 1.0);
  // Zero terminal SNR: at T-1 the epsilon weight is its limit 1, the v and sample weights 0.
  const NoiseSchedule zero(NoiseScheduleOptions().zero_terminal_snr(true));
  const auto last = torch::tensor({999}, torch::kLong);
  CHECK(min_snr_weights(zero, last, 5.0, Prediction::Epsilon).item<double>() == 1.0);
  CHECK(min_snr_weights(zero, last, 5.0, Prediction::V).item<double>() == 0.0);
  CHECK(min_snr_weights(zero, last, 5.0, Prediction::Sample).item<double>() == 0.0);
  for (const auto p : {Prediction::Epsilon, Prediction::V, Prediction::Sample}) {
    CHECK(torch::isfinite(min_snr_weights(zero, torch::arange(1000), 5.0, p)).all().item<bool>());
  }
  CHECK_REFUSED(min_snr_weights(schedule, t, 0.0), "min_snr_weights: gamma must be > 0, got 0");
  CHECK_REFUSED(min_snr_weights(schedule, torch::tensor({1000}, torch::kLong), 5.0), "min_snr_weights");
}

TEST_CASE("an epsilon prediction on a zero-terminal-SNR schedule is refused", "[loss][errors]") {
  const NoiseSchedule zero(NoiseScheduleOptions().num_timesteps(50).zero_terminal_snr(true));
  ScaleNet net;
  const auto x0 = torch::zeros({2, 3});
  CHECK_REFUSED(diffusion_loss(net, zero, x0, torch::tensor({1, 49}), x0),
                "an epsilon prediction cannot be trained for a zero-terminal-SNR schedule");
  CHECK_NOTHROW(diffusion_loss(net, zero, x0, torch::tensor({1, 49}), x0, LossOptions().prediction(Prediction::V)));
  CHECK_REFUSED(Trainer(tiny_net(), zero, quiet()), "Trainer: an epsilon prediction cannot be trained");
}

// ---- The EMA ---------------------------------------------------------------------------------------

TEST_CASE("the EMA follows its warmed-up decay, swaps in for a scope, and round-trips", "[ema]") {
  ScaleNet net(1.0);
  EMA ema(*net, 0.9);
  CHECK(ema.shadow()["scale"].item<double>() == 1.0);
  double expected = 1.0;
  for (int64_t n = 0; n < 30; ++n) {
    const double d = std::min(0.9, (1.0 + n) / (10.0 + n));
    CHECK_THAT(ema.current_decay(), WithinRel(d, 1e-12));
    torch::NoGradGuard no_grad;
    net->scale.fill_(static_cast<double>(n));
    ema.update(*net);
    expected = d * expected + (1 - d) * static_cast<double>(n);
  }
  CHECK(ema.updates() == 30);
  CHECK_THAT(ema.shadow()["scale"].item<double>(), WithinRel(expected, 1e-6));
  {
    auto scope = ema.scope(*net);
    CHECK_THAT(net->scale.item<double>(), WithinRel(expected, 1e-6));
  }
  CHECK(net->scale.item<double>() == 29.0);  // its own weights back
  // Saved as a model's weights: a fresh model loads it as its own; another EMA reads it back.
  torch::serialize::OutputArchive out;
  ema.save(out, "ema", *net);
  std::stringstream bytes;
  out.save_to(bytes);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  ScaleNet fresh(0.0);
  EMA restored(*fresh, 0.9);
  restored.load(in, "ema", *fresh, "memory", 0);
  CHECK(restored.updates() == 30);
  CHECK_THAT(restored.shadow()["scale"].item<double>(), WithinRel(expected, 1e-6));
  CHECK(fresh->scale.item<double>() == 0.0);  // loading an EMA leaves the model's own weights
  CHECK_REFUSED(EMA(*net, 1.0), "EMA: decay must be in (0, 1), got 1");
  CHECK_REFUSED(EMA(*net, 0.0), "EMA: decay must be in (0, 1), got 0");
}

// ---- The Trainer -----------------------------------------------------------------------------------

TEST_CASE("training lowers the validation loss on a tiny dataset", "[trainer]") {
  torch::manual_seed(0);
  const auto val = validation_curve(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(100)), quiet(3e-3).epochs(5));
  REQUIRE(val.size() == 5);
  // An untrained net's MSE is near 1 (eps has unit variance); the fixed validation draws make epochs
  // compare. Measured: 0.94 after the first epoch, 0.55 after the fifth.
  CHECK(val.back() < 0.7 * val.front());
}

TEST_CASE("v and sample prediction train too, also on a zero-terminal-SNR schedule", "[trainer][prediction]") {
  for (const bool zero : {false, true}) {
    for (const auto prediction : {Prediction::V, Prediction::Sample}) {
      INFO(to_string(prediction) << (zero ? ", zero terminal SNR" : ""));
      torch::manual_seed(0);
      const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100).zero_terminal_snr(zero));
      const auto val = validation_curve(tiny_net(), schedule, quiet(3e-3).epochs(4).loss(LossOptions().prediction(prediction)));
      CHECK(val.back() < 0.8 * val.front());
    }
  }
}

TEST_CASE("training in bf16 lowers the loss like float32, keeps float32 weights and records its precision",
          "[trainer][precision]") {
  const auto dir = scratch("bf16");
  const auto run = [&](Precision precision) {
    torch::manual_seed(0);
    const auto data = tiny_dataset(256);
    std::vector<double> val;
    Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(100)),
                    quiet(3e-3).epochs(5).loss(LossOptions().precision(precision)));
    trainer.on_epoch = [&](const TrainEpoch& e) { val.push_back(*e.val_loss); };
    trainer.fit(data, data.slice(0, 0, 32));
    for (const auto& p : unwrap(trainer.model()).parameters()) CHECK(p.scalar_type() == torch::kFloat32);
    trainer.save_checkpoint(dir / (std::string(to_string(precision)) + ".pt"));
    return val;
  };
  const auto v32 = run(Precision::Float32), v16 = run(Precision::BFloat16);
  // The float32 run goes from 0.94 to 0.55 (the test above); bf16 must learn as much, up to rounding.
  CHECK(v16.back() < 0.7 * v16.front());
  CHECK_THAT(v16.back(), WithinRel(v32.back(), 0.1));
  CHECK(v16 != v32);  // it did run differently
  CHECK(read_checkpoint_info(dir / "bf16.pt").training.at("loss").at("precision") == "bf16");
}

TEST_CASE("training with min-SNR weighting learns, a gamma above every SNR is the plain loss", "[trainer][min_snr]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100));
  const auto run = [&](double gamma, int64_t epochs) {
    torch::manual_seed(0);
    return validation_curve(tiny_net(), schedule, quiet(3e-3).epochs(epochs).loss(LossOptions().min_snr_gamma(gamma)));
  };
  const auto v5 = run(5.0, 5);
  CHECK(v5.back() < 0.8 * v5.front());
  // Every SNR of this schedule is below 1e4 (abar_0 = 1 - 1e-4), so the weights are all 1.
  const auto v_off = run(0.0, 2), v_big = run(1e6, 2);
  REQUIRE(v_big.size() == 2);
  for (size_t i = 0; i < 2; ++i) CHECK_THAT(v_big[i], WithinRel(v_off[i], 1e-3));
}

TEST_CASE("the trainer takes any optimizer, and sets no process-wide state", "[trainer]") {
  torch::manual_seed(2);
  const int before = at::get_num_threads();
  auto net = tiny_net();
  auto sgd = std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.1));
  Trainer trainer(net, NoiseSchedule(NoiseScheduleOptions().num_timesteps(20)),
                  quiet(0.05).epochs(1).max_steps_per_epoch(1), sgd);
  CHECK(at::get_num_threads() == before);
  CHECK(&trainer.optimizer() == sgd.get());
  const auto w0 = snapshot(*net);
  trainer.fit(tiny_dataset(16));
  // One plain SGD step at the trainer's learning rate (0.05, which it sets on the optimizer): w - lr g.
  for (const auto& p : net->named_parameters()) {
    INFO(p.key());
    CHECK(torch::allclose(p.value(), w0.at(p.key()) - 0.05 * p.value().grad(), 1e-6, 1e-7));
  }
}

TEST_CASE("resuming gives the same weights as an uninterrupted run", "[trainer][checkpoint]") {
  const auto data = tiny_dataset();
  // With a warm-up and the cosine learning rate too: the resumed run must continue the same lr curve.
  const auto opts = quiet().epochs(2).ema_decay(0.9).optimization(
      OptimizationOptions().lr(2e-3).grad_clip(1.0).lr_schedule(LRSchedule::Cosine).warmup_steps(3));
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100));
  const auto outputs = [](const fs::path& dir) { return std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0)); };

  torch::manual_seed(1);
  Trainer straight(tiny_net(), schedule, opts);
  straight.fit(data);

  torch::manual_seed(1);  // same initial weights
  const auto dir = scratch("resumed");
  {
    // Interrupted after epoch 1's checkpoint, as a killed run would be (its options, epochs included, unchanged).
    Trainer first(tiny_net(), schedule, opts);
    first.add_hook(outputs(dir));
    first.on_epoch = [](const TrainEpoch& e) {
      if (e.epoch == 1) throw std::runtime_error("interrupted");
    };
    CHECK_THROWS_WITH(first.fit(data), "interrupted");
  }
  torch::manual_seed(99);  // a different initialisation, overwritten by the checkpoint
  Trainer second(tiny_net(), schedule, opts);
  auto out = outputs(dir);
  second.add_hook(out);
  REQUIRE(out->latest_checkpoint());
  second.load_checkpoint(*out->latest_checkpoint());
  CHECK(second.epoch() == 1);
  {
    // Another objective or schedule would change the run half-way: refused before anything changes.
    const auto latest = *out->latest_checkpoint();
    auto v_opts = opts;
    v_opts.loss(LossOptions(opts.loss()).prediction(Prediction::V));
    Trainer v_run(tiny_net(), schedule, v_opts);
    const auto before = snapshot(*v_run.model());
    CHECK_REFUSED(v_run.load_checkpoint(latest), "was trained with epsilon prediction, this run's is v");
    Trainer cosine_run(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(100).kind(ScheduleKind::Cosine)), opts);
    CHECK_REFUSED(cosine_run.load_checkpoint(latest), "was trained with another noise schedule");
    CHECK(max_difference(before, snapshot(*v_run.model())) == 0.0);
    CHECK(v_run.epoch() == 0);
  }
  second.fit(data);
  CHECK(second.epoch() == 2);
  CHECK(second.global_step() == straight.global_step());
  CHECK(max_difference(snapshot(*straight.model()), snapshot(*second.model())) <= 1e-6);
  for (const auto& p : straight.ema()->shadow()) {
    INFO(p.key());
    CHECK((p.value() - second.ema()->shadow()[p.key()]).abs().max().item<double>() <= 1e-6);
  }
}

TEST_CASE("a run stopped mid-epoch resumes from its mid-epoch checkpoint and equals the uninterrupted one",
          "[trainer][checkpoint][faults]") {
  // 64 images at batch 16: 4 steps an epoch. Checkpoints every 3 steps; the stop comes after step 6
  // (epoch 2, step 2), so the run resumes from "1 epoch + 2 steps" and must redraw epoch 2's shuffle.
  const auto data = tiny_dataset(64);
  const auto opts = quiet().epochs(3).ema_decay(0.9);
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100));
  torch::manual_seed(1);
  Trainer straight(tiny_net(), schedule, opts);
  straight.fit(data);

  const auto dir = scratch("midepoch");
  torch::manual_seed(1);
  {
    Trainer first(tiny_net(), schedule, opts);
    auto outputs = std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0).checkpoint_every_steps(3).keep_checkpoints(5));
    first.add_hook(outputs);
    first.on_step = [](const TrainStep& s) {
      if (s.global_step == 6) request_stop();
    };
    try {
      first.fit(data);
      FAIL("the stop request was ignored");
    } catch (const TrainingInterrupted& e) {
      REQUIRE(e.checkpoint);
      CHECK(e.checkpoint->filename() == "checkpoint_epoch_001_step_000002.pt");
      CHECK_THAT(std::string(e.what()), diffusion_test::contains("stopped on request at epoch 2, step 2 (global step 6)"));
    }
    clear_stop_request();
  }
  CHECK(names_in(dir / "checkpoints") ==
        std::vector<std::string>{"checkpoint_epoch_000_step_000003.pt", "checkpoint_epoch_001.pt",
                                 "checkpoint_epoch_001_step_000002.pt"});
  const auto info = read_checkpoint_info(dir / "checkpoints" / "checkpoint_epoch_001_step_000002.pt");
  CHECK(info.epoch == 1);
  CHECK(info.global_step == 6);
  CHECK(info.step_in_epoch == 2);
  CHECK(read_checkpoint_info(dir / "checkpoints" / "checkpoint_epoch_001.pt").step_in_epoch == 0);

  torch::manual_seed(7);
  Trainer second(tiny_net(), schedule, opts);
  second.load_checkpoint(dir / "checkpoints" / "checkpoint_epoch_001_step_000002.pt");
  CHECK(second.step_in_epoch() == 2);
  second.fit(data);
  CHECK(second.global_step() == straight.global_step());
  CHECK(max_difference(snapshot(*straight.model()), snapshot(*second.model())) <= 1e-6);
  for (const auto& p : straight.ema()->shadow()) {
    CHECK((p.value() - second.ema()->shadow()[p.key()]).abs().max().item<double>() <= 1e-6);
  }
}

TEST_CASE("a stop on an epoch's last step ends that epoch first, a mid-epoch resume refuses other data",
          "[trainer][checkpoint][faults]") {
  const auto data = tiny_dataset(64);  // 4 steps an epoch at batch 16
  const auto opts = quiet().epochs(3).ema_decay(0.9);
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(100));
  const auto dir = scratch("stoplast");
  Trainer first(tiny_net(), schedule, opts);
  first.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0).checkpoint_every_steps(3).keep_checkpoints(5)));
  std::vector<int64_t> epochs_ended;
  first.on_epoch = [&](const TrainEpoch& e) { epochs_ended.push_back(e.epoch); };
  first.on_step = [](const TrainStep& s) {
    if (s.global_step == 4) request_stop();
  };
  try {
    first.fit(data);
    FAIL("the stop request was ignored");
  } catch (const TrainingInterrupted& e) {
    REQUIRE(e.checkpoint);
    CHECK(e.checkpoint->filename() == "checkpoint_epoch_001.pt");  // the epoch's own, with its validation and losses
    CHECK_THAT(std::string(e.what()), diffusion_test::contains("stopped on request after epoch 1 (global step 4)"));
  }
  clear_stop_request();
  CHECK(epochs_ended == std::vector<int64_t>{1});
  CHECK(names_in(dir / "checkpoints") == std::vector<std::string>{"checkpoint_epoch_000_step_000003.pt", "checkpoint_epoch_001.pt"});
  // Epoch-end checkpoints resume with any data; mid-epoch ones only with the same data (any batch size).
  const auto mid = dir / "checkpoints" / "checkpoint_epoch_000_step_000003.pt";
  Trainer other_data(tiny_net(), schedule, opts);
  other_data.load_checkpoint(mid);
  try {
    other_data.fit(tiny_dataset(48));
    FAIL("another training set was taken mid-epoch");
  } catch (const IncompatibleFileError& e) {
    CHECK_THAT(std::string(e.what()), diffusion_test::contains("stopped mid-epoch in a training set of 64 examples, but this one has 48"));
  }
  Trainer any_data(tiny_net(), schedule, opts);
  any_data.load_checkpoint(dir / "checkpoints" / "checkpoint_epoch_001.pt");
  CHECK_NOTHROW(any_data.fit(tiny_dataset(48)));
}

namespace resume_helpers {
/// tiny_dataset's examples, recording the indices of every batch read.
struct RecordingDataset : data::TensorDataset {
  using data::TensorDataset::TensorDataset;
  mutable std::vector<int64_t> seen;
  torch::Tensor batch(const torch::Tensor& idx, const std::optional<data::AugmentationDraw>& draw) const override {
    const auto i = idx.contiguous();
    seen.insert(seen.end(), i.data_ptr<int64_t>(), i.data_ptr<int64_t>() + i.numel());
    return data::TensorDataset::batch(idx, draw);
  }
};
}  // namespace resume_helpers

TEST_CASE("a run resumed mid-epoch with another batch size takes exactly the examples not yet seen, its schedule in examples",
          "[trainer][checkpoint][faults]") {
  using resume_helpers::RecordingDataset;
  // 60 examples, batch 8: the first run stops after 3 steps (24 examples) of epoch 1; the second goes on
  // at batch 5 (36 left: 8 steps, the last of 1) and finishes 2 epochs.
  const auto opts = quiet().epochs(2).ema_decay(0.9).batch_size(8);
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(50));
  auto cosine = opts;
  cosine.optimization().lr_schedule(LRSchedule::Cosine).warmup_steps(2);
  const auto dir = scratch("resume_batch");
  auto first_data = std::make_shared<RecordingDataset>(tiny_dataset(60));
  std::vector<double> first_lrs;
  {
    Trainer first(tiny_net(), schedule, cosine);
    first.on_step = [&](const TrainStep& s) {
      first_lrs.push_back(s.lr);
      if (s.global_step == 3) request_stop();
    };
    first.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0).checkpoint_every_steps(100)));
    CHECK_THROWS_AS(first.fit(first_data), TrainingInterrupted);
    clear_stop_request();
  }
  REQUIRE(first_data->seen.size() == 24);
  const auto mid = dir / "checkpoints" / "checkpoint_epoch_000_step_000003.pt";
  REQUIRE(fs::exists(mid));
  auto second_cfg = cosine;
  second_cfg.batch_size(5);
  Trainer second(tiny_net(), schedule, second_cfg);
  second.load_checkpoint(mid);
  auto second_data = std::make_shared<RecordingDataset>(tiny_dataset(60));
  std::vector<TrainStep> steps;
  second.on_step = [&](const TrainStep& s) { steps.push_back(s); };
  second.fit(second_data);
  // Epoch 1's rest is the 36 examples the first run did not take, each once, in 8 steps numbered 4 to 11.
  std::vector<int64_t> epoch1(first_data->seen);
  epoch1.insert(epoch1.end(), second_data->seen.begin(), second_data->seen.begin() + 36);
  std::sort(epoch1.begin(), epoch1.end());
  std::vector<int64_t> all(60);
  std::iota(all.begin(), all.end(), 0);
  CHECK(epoch1 == all);
  REQUIRE(steps.size() == 8 + 12);
  CHECK(steps.front().step == 4);
  CHECK(steps[7].step == 11);
  CHECK(steps[7].steps == 11);
  CHECK(steps[8].step == 1);  // epoch 2 at batch 5: 12 steps
  CHECK(steps.back().steps == 12);
  // The schedule counts examples in the run's first global batch (8): 24 seen, 36 + 60 to go; warm-up over
  // 2 x 8 examples (over by now); cosine from warm-up's end to 0 at the last step. The first run's steps
  // and the second's lie on one curve: the learning rate does not jump at the resume.
  const auto& o = second.options().optimization();
  CHECK(RunLayout::read(read_checkpoint_info(mid).training).schedule_batch == 8);
  int64_t seen = 24;
  for (size_t i = 0; i < steps.size(); ++i) {
    INFO("step " << i);
    CHECK_THAT(steps[i].lr, WithinRel(learning_rate_at_example(o, seen, 8, 120), 1e-12));
    seen += i == 7 ? 1 : 5;
  }
  CHECK(steps.front().lr < first_lrs.back());  // on the falling cosine, one step of 5 after the first run's last
  CHECK(steps.front().lr > learning_rate_at_example(o, 32, 8, 120));
  CHECK_THAT(steps.back().lr, WithinAbs(0.0, 1e-15));
  CHECK(seen == 120);
  // The EMA's warm-up goes on from as many updates as batch 5 takes for 24 examples (3 x 8 / 5, rounded).
  CHECK(second.ema()->updates() == 5 + 20);
}

TEST_CASE("an epoch resumed at a position deals out exactly the examples not yet seen, to any number of ranks", "[trainer]") {
  torch::manual_seed(3);
  const auto perm = torch::randperm(61, torch::kLong);  // an epoch's shuffle
  const auto values = [](const torch::Tensor& t) {
    const auto c = t.contiguous();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  };
  for (const int64_t world : {1, 2, 3}) {
    for (const int64_t batch : {4, 5}) {
      for (const int64_t from : {0, 24, 36, 60}) {
        INFO("world " << world << ", batch " << batch << ", from " << from);
        std::vector<int64_t> dealt;
        int64_t counted = 0;
        for (int64_t rank = 0; rank < world; ++rank) {
          const diffusion::detail::EpochLayout layout(world, rank, 61, batch, 0, from);
          const auto share = layout.share(perm);
          for (int64_t step = 0; step < layout.steps; ++step) {
            const auto idx = values(layout.batch_indices(share, step));
            dealt.insert(dealt.end(), idx.begin(), idx.end());
            if (rank == 0) counted += layout.examples_in_step(step);
          }
        }
        // Each position from `from` on once, and the wrap-around (from the shuffle's start) that fills the
        // ranks' last batches alike.
        auto expected = values(perm.slice(0, from, 61));
        const int64_t pad = (61 - from + world - 1) / world * world - (61 - from);
        const auto wrap = values(perm.slice(0, 0, pad));
        expected.insert(expected.end(), wrap.begin(), wrap.end());
        std::sort(dealt.begin(), dealt.end());
        std::sort(expected.begin(), expected.end());
        CHECK(dealt == expected);
        CHECK(counted == static_cast<int64_t>(expected.size()));
      }
    }
    // Resumed with the layout unchanged, at step k's position: the batches k, k+1, ... of the whole pass.
    for (int64_t rank = 0; rank < world; ++rank) {
      const diffusion::detail::EpochLayout whole(world, rank, 61, 4, 0), rest(world, rank, 61, 4, 0, 2 * 4 * world);
      REQUIRE(rest.steps == whole.steps - 2);
      for (int64_t step = 0; step < rest.steps; ++step) {
        CHECK(values(rest.batch_indices(rest.share(perm), step)) == values(whole.batch_indices(whole.share(perm), step + 2)));
      }
    }
  }
}

TEST_CASE("the learning rate in examples is the schedule in steps for full batches", "[trainer]") {
  auto o = OptimizationOptions().lr(1e-3).lr_schedule(LRSchedule::Cosine).warmup_steps(4);
  for (int64_t step = 0; step < 21; ++step) {
    CHECK_THAT(learning_rate_at_example(o, step * 12, 12, 21 * 12), WithinRel(learning_rate_at(o, step, 21), 1e-12));
  }
  // One example per step is learning_rate_at itself.
  CHECK(learning_rate_at_example(o, 7, 1, 21) == learning_rate_at(o, 7, 21));
}

TEST_CASE("a non-finite loss stops the run naming epoch and step, no checkpoint is written from it",
          "[trainer][faults]") {
  const auto dir = scratch("nonfinite");
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(50));
  torch::manual_seed(0);
  Trainer trainer(tiny_net(), schedule, quiet().epochs(3));
  auto outputs = std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0));
  trainer.add_hook(outputs);
  // Divergence, as a too-large learning rate causes it: the weights turn non-finite once epoch 1 is saved.
  trainer.on_epoch = [&](const TrainEpoch& e) {
    if (e.epoch == 1) {
      torch::NoGradGuard no_grad;
      unwrap(trainer.model()).parameters().front().fill_(std::nan(""));
    }
  };
  CHECK_REFUSED(trainer.fit(tiny_dataset(32)), "Trainer: non-finite loss at epoch 2, step 1 (global step 3; loss nan");
  CHECK(names_in(dir / "checkpoints") == std::vector<std::string>{"checkpoint_epoch_001.pt"});
  auto good = tiny_net();
  load_weights(dir / "checkpoints" / "checkpoint_epoch_001.pt", good);
  for (const auto& p : good->parameters()) CHECK(torch::isfinite(p).all().item<bool>());
  // A checkpoint of non-finite weights is refused outright.
  CHECK_REFUSED(trainer.save_checkpoint(dir / "bad.pt"), "holds non-finite values");
  CHECK_FALSE(fs::exists(dir / "bad.pt"));
}

TEST_CASE("skip_nonfinite skips up to N bad steps, counts them, then stops", "[trainer][faults]") {
  const auto dir = scratch("skip");
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(50));
  // Every third batch is poisoned with a NaN image: its loss is NaN and the step must not update.
  auto data = tiny_dataset(48);
  const auto poison = [&](int64_t every) {
    auto d = data.clone();
    for (int64_t i = 0; i < d.size(0); i += every) d[i][0][0][0] = std::nan("");
    return d;
  };
  torch::manual_seed(0);
  Trainer skipping(tiny_net(), schedule, quiet().epochs(2).batch_size(48).skip_nonfinite(5));
  skipping.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0)));
  std::vector<bool> skipped;
  skipping.on_step = [&](const TrainStep& s) { skipped.push_back(s.skipped); };
  const auto before = snapshot(*skipping.model());
  skipping.fit(poison(48));  // one poisoned image per (whole-set) batch: every step is bad
  CHECK(skipped == std::vector<bool>{true, true});
  CHECK(max_difference(before, snapshot(*skipping.model())) == 0.0);  // nothing was applied
  const auto metrics = lines_of(dir / "metrics.jsonl");
  REQUIRE(metrics.size() == 2);
  CHECK(nlohmann::json::parse(metrics[1]).at("skipped_steps") == 2);
  Trainer strict(tiny_net(), schedule, quiet().epochs(5).batch_size(48).skip_nonfinite(1));
  CHECK_REFUSED(strict.fit(poison(48)), "Trainer: non-finite loss at epoch 2, step 1");
  // One bad batch of three per epoch: the epoch's train loss is the mean of the other two, not NaN.
  Trainer some(tiny_net(), schedule, quiet().epochs(2).batch_size(16).skip_nonfinite(5));
  std::vector<double> losses;
  int64_t skipped_so_far = 0;
  some.on_epoch = [&](const TrainEpoch& e) {
    losses.push_back(e.train_loss);
    skipped_so_far = e.skipped_steps;
  };
  some.fit(poison(48));
  REQUIRE(losses.size() == 2);
  CHECK(std::isfinite(losses[0]));
  CHECK(std::isfinite(losses[1]));
  CHECK(skipped_so_far == 2);
}

TEST_CASE("on CUDA, when present: the CPU's noise, training, and checkpoints that load on the CPU", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device: nothing to check here (scripts/gpu-check.sh runs this on a GPU machine)");
    return;
  }
  const torch::Device cuda(torch::kCUDA);
  // A seed draws every noise tensor on the CPU, so CUDA samples match the CPU's up to arithmetic.
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(50));
  torch::manual_seed(0);
  auto net = tiny_net();
  const auto on_cpu = sample(net, schedule, {4, 1, 8, 8}, DDPM(), SampleOptions().seed(3));
  const auto dpm_cpu = sample(net, schedule, {4, 1, 8, 8}, DPMSolverPP().steps(10), SampleOptions().seed(3));
  net->to(cuda);
  const auto on_cuda = sample(net, schedule.to(cuda), {4, 1, 8, 8}, DDPM(), SampleOptions().seed(3));
  const auto dpm_cuda = sample(net, schedule.to(cuda), {4, 1, 8, 8}, DPMSolverPP().steps(10), SampleOptions().seed(3));
  CHECK(on_cuda.device().is_cuda());
  CHECK((on_cuda.cpu() - on_cpu).abs().max().item<double>() < 1e-2);
  CHECK((dpm_cuda.cpu() - dpm_cpu).abs().max().item<double>() < 1e-2);

  // The trainer on CUDA lowers the loss; its checkpoint loads into a CPU model with equal weights.
  const auto dir = scratch("cuda");
  std::vector<double> losses;
  {
    Trainer trainer(tiny_net(), schedule, quiet().device(cuda).epochs(4).ema_decay(0.9));
    trainer.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(4)));
    trainer.on_epoch = [&](const TrainEpoch& e) { losses.push_back(e.train_loss); };
    trainer.fit(tiny_dataset());
    CHECK(losses.back() < losses.front());
    auto cpu_model = tiny_net();
    load_weights(list_checkpoints(dir / "checkpoints").back(), cpu_model, /*use_ema=*/false);
    const auto trained = trainer.model()->named_parameters();
    for (const auto& p : cpu_model->named_parameters()) CHECK(torch::equal(p.value(), trained[p.key()].cpu()));
  }
  // Resuming on CUDA continues with the optimizer state on the device.
  Trainer again(tiny_net(), schedule, quiet().device(cuda).epochs(5).ema_decay(0.9));
  again.load_checkpoint(list_checkpoints(dir / "checkpoints").back());
  CHECK_NOTHROW(again.fit(tiny_dataset()));
  CHECK(again.epoch() == 5);
  // A deferred non-finite check still names the step, and nothing non-finite is written.
  Trainer poisoned(tiny_net(), schedule, quiet().device(cuda).epochs(2));
  poisoned.on_epoch = [&](const TrainEpoch&) {
    torch::NoGradGuard no_grad;
    unwrap(poisoned.model()).parameters().front().fill_(std::nan(""));
  };
  CHECK_REFUSED(poisoned.fit(tiny_dataset()), "non-finite loss at epoch 2, step 1");
}

TEST_CASE("the learning rate warms up linearly, then follows the cosine to zero at the last step", "[trainer][lr]") {
  const auto o = OptimizationOptions().lr(1e-3).warmup_steps(4).lr_schedule(LRSchedule::Cosine);
  CHECK_THAT(learning_rate_at(o, 0, 21), WithinRel(2.5e-4, 1e-12));
  CHECK_THAT(learning_rate_at(o, 3, 21), WithinRel(1e-3, 1e-12));
  CHECK_THAT(learning_rate_at(o, 4, 21), WithinRel(1e-3, 1e-12));   // cosine starts at p = 0
  CHECK_THAT(learning_rate_at(o, 12, 21), WithinRel(5e-4, 1e-12));  // p = 8 / 16 = 0.5
  CHECK_THAT(learning_rate_at(o, 20, 21), WithinAbs(0.0, 1e-15));   // the last step
  const auto constant = OptimizationOptions().lr(2e-3).warmup_steps(2);
  CHECK_THAT(learning_rate_at(constant, 0, 10), WithinRel(1e-3, 1e-12));
  CHECK_THAT(learning_rate_at(constant, 9, 10), WithinRel(2e-3, 1e-12));
  CHECK_THAT(learning_rate_at(OptimizationOptions().lr(3e-4), 0, 10), WithinRel(3e-4, 1e-12));  // the seed's: constant
  CHECK(parse_lr_schedule("cosine") == LRSchedule::Cosine);
  CHECK_REFUSED(parse_lr_schedule("linear"), "expected \"constant\" or \"cosine\", got \"linear\"");

  // The trainer steps with exactly these values, and leaves the optimizer at the last one.
  const auto data = tiny_dataset(32);
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(10)),
                  quiet().epochs(2).batch_size(8).optimization(OptimizationOptions(o).warmup_steps(2)));
  std::vector<double> seen;
  trainer.on_step = [&](const TrainStep& s) { seen.push_back(s.lr); };
  trainer.fit(data);
  REQUIRE(seen.size() == 8);
  for (size_t i = 0; i < seen.size(); ++i) {
    CHECK_THAT(seen[i], WithinAbs(learning_rate_at(trainer.options().optimization(), static_cast<int64_t>(i), 8), 1e-15));
  }
  CHECK(seen.back() == 0.0);
  CHECK(trainer.optimizer().param_groups().front().options().get_lr() == 0.0);
}

TEST_CASE("micro-batches accumulate the same gradient as the whole batch", "[trainer]") {
  // GroupNorm has no batch statistics, so the micro-batch losses, weighted by their share of the batch,
  // sum to the batch's mean loss and their gradients to its gradient. One step from the same weights on
  // the same draws; the gradients stay in .grad() after fit.
  const auto data = tiny_dataset(64);
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(50));
  const auto one_step = quiet().epochs(1).max_steps_per_epoch(1);
  torch::manual_seed(5);
  Trainer whole(tiny_net(), schedule, one_step);
  torch::manual_seed(5);
  Trainer micro(tiny_net(), schedule, TrainerOptions(one_step).micro_batch(5));  // 16 = 5 + 5 + 5 + 1
  double loss_whole = 0, loss_micro = 0;
  whole.on_step = [&](const TrainStep& s) { loss_whole = s.loss.item<double>(); };
  micro.on_step = [&](const TrainStep& s) { loss_micro = s.loss.item<double>(); };
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

TEST_CASE("run outputs: checkpoints atomically, the newest N kept, metrics as JSON lines, grids", "[run_outputs]") {
  const auto dir = scratch("outputs");
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(20)), quiet().epochs(3));
  trainer.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).keep_checkpoints(2).grid_samples(4)));
  trainer.metadata["backbone_note"] = "tiny";
  std::vector<TrainEpoch> epochs;
  trainer.on_epoch = [&](const TrainEpoch& e) { epochs.push_back(e); };
  trainer.fit(tiny_dataset(32), tiny_dataset(16));
  CHECK(names_in(dir / "checkpoints") == std::vector<std::string>{"checkpoint_epoch_002.pt", "checkpoint_epoch_003.pt"});
  for (const auto& entry : fs::directory_iterator(dir / "checkpoints")) CHECK(entry.path().extension() != ".tmp");
  for (const auto* name : {"epoch_001.png", "epoch_002.png", "epoch_003.png"}) CHECK(fs::exists(dir / "samples" / name));
  REQUIRE(epochs.size() == 3);
  CHECK(epochs[2].checkpoint == dir / "checkpoints" / "checkpoint_epoch_003.pt");
  CHECK(epochs[2].grid == dir / "samples" / "epoch_003.png");

  const auto lines = lines_of(dir / "metrics.jsonl");
  REQUIRE(lines.size() == 3);
  const auto last = nlohmann::json::parse(lines[2]);
  CHECK(last.at("epoch") == 3);
  CHECK(last.at("step") == 6);
  CHECK_THAT(last.at("val_loss").get<double>(), WithinRel(*epochs[2].val_loss, 1e-12));
  CHECK(last.at("skipped_steps") == 0);

  const auto info = read_checkpoint_info(dir / "checkpoints" / "checkpoint_epoch_003.pt");
  CHECK(info.epoch == 3);
  CHECK(info.global_step == 6);
  CHECK(info.schedule.num_timesteps() == 20);
  CHECK_FALSE(info.has_ema);
  CHECK(info.metadata.at("backbone_note") == "tiny");
  CHECK(info.training.at("batch_size") == 16);
  CHECK(info.training.at("optimization").at("lr") == 2e-3);
  CHECK(info.training.at("epochs") == 3);
  CHECK(info.training.at("device") == "cpu");
  REQUIRE(info.backbone);
  CHECK(info.backbone->name == "convnet");
  CHECK(info.backbone->options.at("widths") == std::vector<int64_t>{8, 16});
  // Without validation the metrics line has no val_loss at all (not a null that reads like "nan").
  const auto quiet_dir = scratch("outputs_noval");
  Trainer no_val(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(20)), quiet().epochs(1));
  no_val.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(quiet_dir).grid_samples(0)));
  no_val.fit(tiny_dataset(16));
  CHECK_FALSE(nlohmann::json::parse(lines_of(quiet_dir / "metrics.jsonl").at(0)).contains("val_loss"));
}

TEST_CASE("keep_epochs pins early checkpoints besides the newest N", "[run_outputs]") {
  CHECK(checkpoint_filename(7) == "checkpoint_epoch_007.pt");
  CHECK(checkpoint_filename(1234) == "checkpoint_epoch_1234.pt");
  CHECK(checkpoint_filename(3, 25) == "checkpoint_epoch_003_step_000025.pt");
  const auto dir = scratch("pinned");
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(20));
  Trainer trainer(tiny_net(), schedule, quiet().epochs(5));
  trainer.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).keep_checkpoints(1).keep_epochs({2, 9}).grid_samples(0)));
  trainer.fit(tiny_dataset(16));
  CHECK(names_in(dir / "checkpoints") == std::vector<std::string>{"checkpoint_epoch_002.pt", "checkpoint_epoch_005.pt"});
  CHECK(read_checkpoint_info(dir / "checkpoints" / "checkpoint_epoch_002.pt").epoch == 2);
  CHECK_REFUSED(RunOutputs(RunOutputsOptions(scratch("pin_bad")).keep_epochs({3, 0})), "keep_epochs must hold epochs >= 1, got 0");
  CHECK_REFUSED(RunOutputs(RunOutputsOptions(scratch("keep_bad")).keep_checkpoints(0)), "keep_checkpoints must be >= 1");
  CHECK_REFUSED(RunOutputs(RunOutputsOptions(scratch("grid_bad")).grid_samples(4).grid_labels(torch::arange(3))),
                "RunOutputs: grid_labels must be 1-D integer labels, one per grid image (4), got Long of shape [3]");
}

TEST_CASE("list_checkpoints orders by epoch and step, past 999 epochs too", "[run_outputs]") {
  const auto dir = scratch("listing");
  for (const auto* name : {"checkpoint_epoch_1000.pt", "checkpoint_epoch_999.pt", "checkpoint_epoch_999_step_000010.pt",
                           "checkpoint_epoch_002_step_000003.pt", "checkpoint_epoch_002.pt", "other.pt"}) {
    write_bytes(dir / name, {1});
  }
  CHECK(names_in(dir) == std::vector<std::string>{"checkpoint_epoch_002.pt", "checkpoint_epoch_002_step_000003.pt",
                                                  "checkpoint_epoch_999.pt", "checkpoint_epoch_999_step_000010.pt",
                                                  "checkpoint_epoch_1000.pt"});
}

TEST_CASE("the grid sampler draws the per-epoch grids, from the EMA weights", "[run_outputs]") {
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(20));
  const auto dir = scratch("ddim_grid");
  Trainer trainer(tiny_net(), schedule, quiet().epochs(1).ema_decay(0.5));
  const auto grid = make_sampler("ddim", SamplerSettings().steps(5).eta(1));
  trainer.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(4).grid_sampler(grid).grid_seed(3)));
  trainer.fit(tiny_dataset(16));
  CHECK(fs::exists(dir / "samples" / "epoch_001.png"));
  const auto from_trainer = trainer.sample(4, *grid, 3);
  auto averaged = tiny_net();
  load_weights(dir / "checkpoints" / "checkpoint_epoch_001.pt", averaged);  // the EMA weights
  CHECK(torch::equal(from_trainer, sample(averaged, schedule, {4, 1, 8, 8}, *grid, SampleOptions().seed(3))));
}

TEST_CASE("a second run into the same directory is refused while the first holds it", "[run_outputs][faults]") {
  const auto dir = scratch("locked");
  {
    RunOutputs first{RunOutputsOptions(dir)};
    CHECK_REFUSED(RunOutputs(RunOutputsOptions(dir)), "another training run (pid " + std::to_string(::getpid()) + ") is writing to");
  }
  CHECK_NOTHROW(RunOutputs(RunOutputsOptions(dir)));  // released with its owner (and with a crashed process)
}

TEST_CASE("trainer refuses bad options and data", "[trainer][errors]") {
  const NoiseSchedule s(NoiseScheduleOptions().num_timesteps(10));
  const auto with = [](OptimizationOptions o) { return quiet().optimization(o); };
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().epochs(0)), "epochs must be >= 1, got 0");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().batch_size(0)), "batch_size must be >= 1");
  CHECK_REFUSED(Trainer(tiny_net(), s, with(OptimizationOptions().lr(0))), "lr must be > 0");
  CHECK_REFUSED(Trainer(tiny_net(), s, with(OptimizationOptions().warmup_steps(-1))), "warmup_steps must be >= 0 (0 = off), got -1");
  CHECK_REFUSED(Trainer(tiny_net(), s, with(OptimizationOptions().grad_clip(-1))), "grad_clip must be >= 0");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().ema_decay(1.0)), "ema_decay must be in [0, 1)");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().skip_nonfinite(-1)), "skip_nonfinite must be >= 0");
  CHECK_REFUSED(Trainer(tiny_net(), s, quiet().loss(LossOptions().min_snr_gamma(-1))), "min_snr_gamma must be >= 0");
  Trainer ok(tiny_net(), s, quiet().epochs(1));
  CHECK_REFUSED(ok.fit(torch::zeros({4})), "train must be a non-empty floating-point (N, ...) tensor");
  CHECK_REFUSED(ok.fit(torch::zeros({4, 0})), "train must be a non-empty floating-point (N, ...) tensor");
  CHECK_REFUSED(ok.fit(torch::zeros({4, 1, 8, 8}, torch::kUInt8)), "train must be a non-empty floating-point");
  CHECK_REFUSED(ok.fit(tiny_dataset(4), torch::zeros({0, 1, 8, 8})), "val must be a non-empty");
  CHECK_REFUSED(RunOutputs(RunOutputsOptions("")), "RunOutputs: dir must not be empty");
  CHECK_REFUSED(RunOutputs(RunOutputsOptions(scratch("every")).checkpoint_every_steps(-1)), "checkpoint_every_steps must be >= 0");
}

TEST_CASE("progress shows epoch, percent, steps, rate and loss", "[trainer]") {
  ProgressBar bar("Epoch 3/100", 469, ProgressMode::Off);
  bar.update(212, 0.0412);
  const auto line = bar.line();
  CHECK(line.find("Epoch 3/100") == 0);
  CHECK(line.find(" 45%|#########") != std::string::npos);
  CHECK(line.find("212/469 [") != std::string::npos);
  CHECK(line.find("it/s, loss=0.0412]") != std::string::npos);
  CHECK_FALSE(bar.due(469));  // Off never prints
  ProgressBar lines("Epoch 1/1", 10, ProgressMode::Lines, 3600);
  CHECK_FALSE(lines.due(5));  // not before its interval
  CHECK(lines.due(10));       // but always at the end
}

// ---- Class labels ----------------------------------------------------------------------------------

namespace label_helpers {
/// A conditional backbone with one weight that records every label it is given in training.
struct LabelProbeImpl : torch::nn::Module {
  LabelProbeImpl() { w = register_parameter("w", torch::ones({1})); }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&, const torch::Tensor& cond = {}) {
    if (is_training() && cond.defined()) seen.push_back(cond.clone());
    if (!is_training() && cond.defined()) seen_eval.push_back(cond.clone());
    return x * w;
  }
  torch::Tensor w;
  std::vector<torch::Tensor> seen, seen_eval;
};
TORCH_MODULE(LabelProbe);
}  // namespace label_helpers
using namespace label_helpers;

TEST_CASE("condition dropout replaces labels by the null class at its rate, never in validation", "[trainer][cfg]") {
  // 4,000 labels (class 3) at p = 0.1: the null count is Binomial(4000, 0.1), mean 400, sd 19; 5 sd bound it.
  const auto data = tiny_dataset(400);
  const auto labels = torch::full({400}, 3, torch::kLong);
  LabelProbe probe;
  Trainer trainer(probe, NoiseSchedule(NoiseScheduleOptions().num_timesteps(20)), quiet().epochs(10).batch_size(100).cond_dropout(0.1));
  trainer.fit(data, data.slice(0, 0, 50), Labels{labels, labels.slice(0, 0, 50)});
  const auto all = torch::cat(probe->seen);
  REQUIRE(all.numel() == 4000);
  const auto nulls = all.eq(null_class).sum().item<int64_t>();
  CHECK(std::abs(nulls - 400) < 5 * 19);
  CHECK(all.ne(null_class).logical_and(all.ne(3)).sum().item<int64_t>() == 0);  // the others kept their class
  for (const auto& v : probe->seen_eval) CHECK(v.eq(3).all().item<bool>());     // validation: never dropped
  // p = 0: the conditional prediction only.
  LabelProbe none;
  Trainer kept(none, NoiseSchedule(NoiseScheduleOptions().num_timesteps(20)), quiet().epochs(1).cond_dropout(0));
  kept.fit(data.slice(0, 0, 32), {}, Labels{labels.slice(0, 0, 32), {}});
  CHECK(torch::cat(none->seen).eq(3).all().item<bool>());
}

TEST_CASE("a class-conditional UNet trains with labels, its checkpoint rebuilds a conditional model", "[trainer][cfg]") {
  torch::manual_seed(0);
  const auto dir = scratch("conditional");
  // Two classes: the square at the left (class 0) or at the right (class 1).
  const auto data = tiny_dataset(128);
  const auto labels = torch::div(torch::arange(128), 2, "floor").remainder(2);  // tiny_dataset's column: (i / 2) % 2
  Trainer trainer(UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16).num_classes(2)),
                  NoiseSchedule(NoiseScheduleOptions().num_timesteps(50)), quiet(3e-3).epochs(3).ema_decay(0.9));
  auto outputs = std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(4).grid_labels(torch::tensor({0, 1, 0, 1})));
  trainer.add_hook(outputs);
  std::vector<double> val;
  trainer.on_epoch = [&](const TrainEpoch& e) { val.push_back(*e.val_loss); };
  trainer.fit(data, data.slice(0, 0, 32), Labels{labels, labels.slice(0, 0, 32)});
  CHECK(val.back() < val.front());
  const auto info = read_checkpoint_info(*outputs->latest_checkpoint());
  CHECK(info.backbone->options.at("num_classes") == 2);
  CHECK(info.training.at("cond_dropout") == 0.1);
  auto [model, loaded] = load_model(*outputs->latest_checkpoint());
  CHECK(model->conditional());
  const auto x = sample(model, NoiseSchedule(loaded.schedule), {2, 1, 8, 8}, DDIM().steps(5),
                        SampleOptions().seed(1).cond(torch::tensor({0, 1})));
  CHECK(torch::isfinite(x).all().item<bool>());
  // A ConvNet without num_classes takes labels in type but not as built, and a backbone type that takes
  // none: both refused before training starts.
  CHECK_REFUSED(Trainer(tiny_net(), NoiseSchedule(), quiet()).fit(data, {}, Labels{labels, {}}),
                "labels given for a backbone that takes none (num_classes 0, or not a ConditionalBackbone)");
  // Validation of a conditional run needs its labels too.
  CHECK_REFUSED(trainer.fit(data, data, Labels{labels, {}}), "training labels but no validation labels");
  CHECK_REFUSED(Trainer(ScaleNet(), NoiseSchedule(), quiet()).fit(data, {}, Labels{labels, {}}), "labels given for a backbone that takes none");
  CHECK_REFUSED(trainer.fit(data, {}, Labels{labels.slice(0, 0, 5), {}}), "train labels must be 1-D integers, one per image (128)");
  CHECK_REFUSED(Trainer(tiny_net(), NoiseSchedule(), quiet().cond_dropout(1.5)), "cond_dropout must be in [0, 1], got 1.5");
}

namespace dataset_helpers {

/// A dataset over tensors that records every call: which batches were read and which were announced.
struct RecordingDataset : data::TensorDataset {
  using data::TensorDataset::TensorDataset;
  mutable std::vector<torch::Tensor> read, announced;
  mutable std::vector<int64_t> epochs;
  torch::Tensor batch(const torch::Tensor& idx, const std::optional<data::AugmentationDraw>& draw) const override {
    read.push_back(idx.clone());
    epochs.push_back(draw ? draw->epoch : -1);
    return data::TensorDataset::batch(idx, draw);
  }
  void prefetch(const torch::Tensor& idx, const std::optional<data::AugmentationDraw>&) const override {
    announced.push_back(idx.clone());
  }
};

}  // namespace dataset_helpers

TEST_CASE("training on a dataset equals training on its tensors, and each step announces the next batch", "[trainer][data]") {
  using dataset_helpers::RecordingDataset;
  const auto data = tiny_dataset(40);
  const auto labels = torch::arange(40).remainder(2);
  const auto net = [] { return UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16).num_classes(2)); };
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(30));
  torch::manual_seed(5);
  Trainer from_tensors(net(), schedule, quiet().epochs(2).ema_decay(0.9).batch_size(16));
  from_tensors.fit(data, data.slice(0, 0, 8), Labels{labels, labels.slice(0, 0, 8)});
  torch::manual_seed(5);
  Trainer from_dataset(net(), schedule, quiet().epochs(2).ema_decay(0.9).batch_size(16));
  auto recorder = std::make_shared<RecordingDataset>(data, labels);
  std::vector<double> val;
  from_dataset.on_epoch = [&](const TrainEpoch& e) { val.push_back(*e.val_loss); };
  from_dataset.fit(recorder, std::make_shared<data::TensorDataset>(data.slice(0, 0, 8), labels.slice(0, 0, 8)));
  CHECK(max_difference(snapshot(*from_tensors.model()), snapshot(*from_dataset.model())) == 0.0);
  CHECK(from_dataset.image_shape() == std::vector<int64_t>{1, 8, 8});
  // 3 steps an epoch: every step but an epoch's last announces the batch the next step reads.
  REQUIRE(recorder->read.size() == 6);
  REQUIRE(recorder->announced.size() == 4);
  CHECK(torch::equal(recorder->announced[0], recorder->read[1]));
  CHECK(torch::equal(recorder->announced[1], recorder->read[2]));
  CHECK(torch::equal(recorder->announced[2], recorder->read[4]));
  CHECK(torch::equal(recorder->announced[3], recorder->read[5]));
  CHECK(recorder->epochs == std::vector<int64_t>{0, 0, 0, 1, 1, 1});
  // An unconditional backbone trains on a labelled dataset without its labels; a conditional one on an
  // unlabelled dataset without labels (the null class); validation of a labelled run needs labels.
  Trainer unconditional(tiny_net(), schedule, quiet().epochs(1));
  CHECK_NOTHROW(unconditional.fit(std::make_shared<data::TensorDataset>(data, labels)));
  Trainer conditional(net(), schedule, quiet().epochs(1));
  CHECK_REFUSED(conditional.fit(std::make_shared<data::TensorDataset>(data, labels), std::make_shared<data::TensorDataset>(data)),
                "training labels but no validation labels");
  CHECK_REFUSED(conditional.fit(std::make_shared<data::TensorDataset>(data, labels),
                                std::make_shared<data::TensorDataset>(torch::zeros({4, 1, 4, 4}), torch::zeros({4}, torch::kLong))),
                "validation images are [1, 4, 4], training images [1, 8, 8]");
  CHECK_REFUSED(conditional.fit(std::make_shared<data::TensorDataset>(torch::zeros({4, 8}))),
                "UNet: x must be (N, C, H, W), got shape [4, 8]");
  CHECK_REFUSED(conditional.fit(std::shared_ptr<const data::Dataset>()), "the training set must be given");
}

TEST_CASE("a class-conditional model trains on a folder of images, labelled by folder and flipped", "[trainer][data][images]") {
  const auto root = scratch("trainer_folder");
  // Class "left": a dark left half; class "right": a dark right half. Flips would swap them, so this
  // set is trained without flips first, then with them (which must still run and learn something).
  for (int i = 0; i < 12; ++i) {
    auto img = torch::full({8, 8, 1}, 255, torch::kUInt8);
    const bool left = i % 2 == 0;
    img.slice(1, left ? 0 : 4, left ? 4 : 8).fill_(i * 10);
    const auto path = root / (left ? "left" : "right") / c10::str("i", i, ".png");
    fs::create_directories(path.parent_path());
    REQUIRE(stbi_write_png(path.string().c_str(), 8, 8, 1, img.data_ptr<uint8_t>(), 8) != 0);
  }
  auto train = std::make_shared<data::ImageFolder>(root, data::ImageFolderOptions(8).channels(1).folder_labels(true));
  REQUIRE(train->num_classes() == 2);
  const auto dir = scratch("trainer_folder_run");
  Trainer trainer(UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16).num_classes(2)),
                  NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet(3e-3).epochs(2).batch_size(4));
  trainer.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0)));
  std::vector<double> losses;
  trainer.on_epoch = [&](const TrainEpoch& e) { losses.push_back(e.train_loss); };
  trainer.fit(train, train);
  REQUIRE(losses.size() == 2);
  CHECK(std::isfinite(losses.back()));
  const auto info = read_checkpoint_info(list_checkpoints(dir / "checkpoints").back());
  CHECK(info.training.at("train_size") == 12);
  CHECK(info.data_shape == std::vector<int64_t>{1, 8, 8});  // what a program samples
  // A resume must train on examples of that shape.
  Trainer resumed(UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16).num_classes(2)),
                  NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet(3e-3).epochs(3).batch_size(4));
  resumed.load_checkpoint(list_checkpoints(dir / "checkpoints").back());
  CHECK_REFUSED(resumed.fit(std::make_shared<data::TensorDataset>(torch::zeros({8, 1, 4, 4}), torch::zeros({8}, torch::kLong))),
                "the checkpoint was trained on examples of shape [1, 8, 8], this training set's are [1, 4, 4]");
  auto flipped = std::make_shared<data::ImageFolder>(root, data::ImageFolderOptions(8).channels(1).folder_labels(true).flip(true).cache_limit(0));
  Trainer streamed(UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16).num_classes(2)),
                   NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet(3e-3).epochs(1).batch_size(4));
  CHECK_NOTHROW(streamed.fit(flipped));
}

TEST_CASE("an MLP learns 2-D points and a TemporalUNet sequences, and their run outputs are .npy samples", "[trainer][data][vectors]") {
  // Eight Gaussians: N(0, I) noise is far from them in sliced Wasserstein; 25 epochs of flow matching on
  // a small MLP must bring Heun's samples within half that distance (it reaches about a fifth).
  torch::manual_seed(0);
  const data::EightGaussians truth;
  const auto points = truth.sample(2048, 0);
  const auto dir = scratch("vectors");
  Trainer trainer(MLP(MLPOptions().features(2).hidden(128).depth(3).time_dim(32)), std::make_shared<FlowObjective>(),
                  quiet(3e-3).batch_size(128).epochs(25));
  trainer.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(16).keep_checkpoints(1)));
  trainer.fit(points);
  const auto grid = data::load_npy(dir / "samples" / "epoch_025.npy");
  CHECK(grid.sizes() == c10::IntArrayRef{16, 2});
  CHECK_FALSE(fs::exists(dir / "samples" / "epoch_025.png"));
  CHECK(read_checkpoint_info(dir / "checkpoints" / "checkpoint_epoch_025.pt").data_shape == std::vector<int64_t>{2});
  const auto samples = trainer.sample(2000, Heun(), make_plan(trainer.formulation(), "uniform", 20), 7);
  const auto reference = truth.sample(2000, 8);
  const double trained = eval::sliced_wasserstein(samples, reference);
  const double noise = eval::sliced_wasserstein(torch::randn({2000, 2}, make_generator(9)), reference);
  CHECK(trained < 0.5 * noise);
  const NoiseSchedule schedule;
  // Sequences: a TemporalUNet on sine waves of random phase, (N, 2, 16): sin and cos channels.
  const auto phase = torch::rand({256, 1}, make_generator(1)) * 2 * std::numbers::pi;
  const auto time = torch::arange(16, torch::kFloat32) * (2 * std::numbers::pi / 16);
  const auto waves = torch::stack({(time + phase).sin(), (time + phase).cos()}, 1);
  Trainer sequences(TemporalUNet(TemporalUNetOptions().channels(2).widths({16, 32}).groups(4)), schedule, quiet(2e-3).epochs(3));
  std::vector<double> losses;
  sequences.on_epoch = [&](const TrainEpoch& e) { losses.push_back(e.train_loss); };
  sequences.fit(waves);
  REQUIRE(losses.size() == 3);
  CHECK(losses.back() < losses.front());
  CHECK(sequences.sample(3, *make_sampler("ddim", SamplerSettings().steps(5)), 1).sizes() == c10::IntArrayRef{3, 2, 16});
}
