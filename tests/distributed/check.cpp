// Data-parallel training checked against one process: run as two processes (tests/distributed/run2.sh sets
// RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), each also trains the single-process reference itself and
// compares.
//   check step DIR   one optimizer step, 2 ranks x 32 images, against one process with the same 64
//   check run DIR    a short run (2 epochs, EMA, cosine learning rate, validation, label dropout), rank 0
//                    writing checkpoints to DIR, against one process with the same global batch
//   check dead DIR   rank 1 dies after joining; rank 0 must fail within the timeout instead of hanging
//   check bench DIR  milliseconds to average the gradients of the UNet (the main command's) and of the seed's
//                    ConvNet over the ranks (the median of 20 bucketed all-reduces), for docs/distributed.md
#include <diffusion/diffusion.hpp>
#include <diffusion/training/distributed.hpp>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <unistd.h>

using namespace diffusion;

namespace {

torch::Tensor images(int64_t n) {
  auto gen = make_generator(42);
  return torch::rand({n, 1, 8, 8}, gen) * 2 - 1;
}

UNet net() {
  torch::manual_seed(7);  // the same initial weights in both runs (rank 1's are overwritten anyway)
  return UNet(UNetOptions().widths({8, 16}).blocks({1, 1}).time_dim(16).num_classes(3));
}

double max_difference(torch::nn::Module& a, torch::nn::Module& b) {
  double worst = 0;
  const auto bp = b.named_parameters();
  for (const auto& p : a.named_parameters()) worst = std::max(worst, (p.value() - bp[p.key()]).abs().max().item<double>());
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fmt::print(stderr, "usage: check step|run|dead DIR\n");
    return 2;
  }
  const std::string mode = argv[1];
  const std::filesystem::path dir = argv[2];
  at::set_num_threads(1);
  try {
    const auto env = distributed_environment();
    if (!env) throw std::runtime_error("not launched as a group (no WORLD_SIZE)");
    auto group = std::make_shared<ProcessGroup>(*env, torch::kCPU, std::chrono::seconds(mode == "dead" ? 5 : 60));
    const int64_t rank = group->rank();
    const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(50));
    if (mode == "bench") {
      const auto time_it = [&](const char* name, torch::nn::Module& model) {
        std::vector<torch::Tensor> grads;
        int64_t bytes = 0;
        for (const auto& p : model.parameters()) {
          grads.push_back(torch::randn_like(p));
          bytes += p.numel() * 4;
        }
        std::vector<double> ms;
        for (int i = 0; i < 22; ++i) {
          group->barrier();
          const auto start = std::chrono::steady_clock::now();
          diffusion::detail::all_reduce_mean(*group, grads);
          if (i >= 2) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
        }
        std::sort(ms.begin(), ms.end());
        if (rank == 0) {
          fmt::print("{}: {:.2f} MB of gradients, all-reduce mean over {} ranks: median {:.2f} ms (min {:.2f}, max {:.2f})\n", name,
                     bytes / 1e6, group->world_size(), ms[ms.size() / 2], ms.front(), ms.back());
        }
      };
      UNet unet(UNetOptions().blocks({1, 1, 2}));
      ConvNet conv;
      time_it("unet 16,32,128 blocks 1,1,2", *unet);
      time_it("seed ConvNet", *conv);
      return 0;
    }
    if (mode == "dead") {
      if (rank == 1) ::_exit(0);  // gone without a word, as a killed process
      Trainer trainer(net(), schedule, TrainerOptions().epochs(1).batch_size(16).progress(ProgressMode::Off).device(torch::kCPU));
      trainer.distribute(group);
      const auto start = std::chrono::steady_clock::now();
      try {
        trainer.fit(images(64));
      } catch (const c10::Error& e) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        fmt::print("rank 0 stopped after {:.1f} s: {}\n", s, std::string(e.what_without_backtrace()).substr(0, 200));
        return 1;
      }
      fmt::print("rank 0 finished although rank 1 was dead\n");
      return 0;
    }
    const bool step = mode == "step";
    const int64_t n = step ? 64 : 100;
    const auto data = images(n);
    const auto labels = torch::arange(n) % 3;
    const auto per_rank = TrainerOptions()
                              .epochs(step ? 1 : 2)
                              .batch_size(step ? 32 : 16)
                              .max_steps_per_epoch(step ? 1 : 0)
                              .ema_decay(0.9)
                              .optimization(OptimizationOptions().lr(3e-3).lr_schedule(LRSchedule::Cosine).warmup_steps(2))
                              .progress(ProgressMode::Off)
                              .device(torch::kCPU);
    const Labels with_labels{labels, labels.slice(0, 0, 20)};
    // Plain SGD: parameters equal up to rounding. (Adam divides each gradient by its running magnitude, so
    // the rounding-level difference of a summed versus a whole-batch gradient of a near-zero parameter can
    // move it by a sizable share of a step; equality of the gradients is what the test is about.)
    const auto sgd = [](UNet& model) {
      return std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(3e-3).momentum(0.9));
    };
    auto parallel_net = net();
    Trainer parallel(parallel_net, schedule, per_rank, sgd(parallel_net));
    parallel.distribute(group);
    if (!step && rank == 0) {
      parallel.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0).keep_checkpoints(5)));
    }
    std::vector<double> parallel_val;
    parallel.on_epoch = [&](const TrainEpoch& e) { parallel_val.push_back(*e.val_loss); };
    parallel.fit(data, data.slice(0, 0, 20), with_labels);
    // The reference: one process, the global batch (ranks x per-rank batch).
    auto single_net = net();
    Trainer single(single_net, schedule, TrainerOptions(per_rank).batch_size(per_rank.batch_size() * group->world_size()),
                   sgd(single_net));
    std::vector<double> single_val;
    single.on_epoch = [&](const TrainEpoch& e) { single_val.push_back(*e.val_loss); };
    single.fit(data, data.slice(0, 0, 20), with_labels);
    double ema = 0;
    for (const auto& p : single.ema()->shadow()) {
      ema = std::max(ema, (p.value() - parallel.ema()->shadow()[p.key()]).abs().max().item<double>());
    }
    const double weights = max_difference(*single.model(), *parallel.model());
    double val = 0;
    for (size_t i = 0; i < single_val.size(); ++i) val = std::max(val, std::abs(single_val[i] - parallel_val[i]));
    fmt::print("rank {} of {}: {} steps; max |parallel - single|: weights {:.2e}, EMA {:.2e}, validation loss {:.2e}\n", rank,
               group->world_size(), parallel.global_step(), weights, ema, val);
    group->barrier();
    if (!(weights <= 1e-5 && ema <= 1e-5 && val <= 1e-5)) return 1;
    if (!step && rank == 0) {
      std::vector<std::string> names;
      for (const auto& p : list_checkpoints(dir / "checkpoints")) names.push_back(p.filename().string());
      fmt::print("rank 0 wrote {} checkpoints: {}\n", names.size(), fmt::join(names, " "));
      if (names != std::vector<std::string>{"checkpoint_epoch_001.pt", "checkpoint_epoch_002.pt"}) return 1;
      if (read_checkpoint_info(dir / "checkpoints" / "checkpoint_epoch_002.pt").training.at("world_size") != 2) return 1;
    }
    fmt::print("rank {}: OK\n", rank);
    return 0;
  } catch (const std::exception& e) {
    const auto* error = dynamic_cast<const c10::Error*>(&e);
    fmt::print(stderr, "error: {}\n", error ? error->what_without_backtrace() : e.what());
    return 1;
  }
}
