#pragma once

// Data-parallel training on PyTorch's own distributed engine, c10d: a TCPStore rendezvous, Gloo for CPU
// tensors and NCCL for CUDA ones (where the LibTorch has it). Needs the c10d headers' switches and Gloo's
// headers: link diffusion::distributed (CMake), which defines USE_C10D_GLOO (and USE_C10D_NCCL with a CUDA
// LibTorch) and finds Gloo's headers (Debian: libgloo-dev). Not in the umbrella header for that reason.
#include <diffusion/training/collective.hpp>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(USE_C10D_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>
#include <torch/version.h>

#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <string>
#include <vector>

namespace diffusion {

namespace detail {
// LibTorch 2.0 split the communication backends (ProcessGroupGloo, ProcessGroupNCCL) out of ProcessGroup
// into c10d::Backend.
#if TORCH_VERSION_MAJOR >= 2
using C10dBackend = c10d::Backend;
#else
using C10dBackend = c10d::ProcessGroup;
#endif
}  // namespace detail

/// A c10d process group as a Collective: a TCPStore rendezvous at MASTER_ADDR:MASTER_PORT (rank 0 serves
/// it), then Gloo for CPU tensors, or NCCL for CUDA tensors where this LibTorch has it (else Gloo, which
/// also reduces CUDA tensors, slower). Every wait is bounded by `timeout`: an unreachable master, or a
/// rank that died or hangs, becomes an error on the others within it rather than a hang.
///
/// Example (each process of `torchrun --nproc-per-node 2 ...`):
///   if (auto env = distributed_environment()) trainer.distribute(std::make_shared<ProcessGroup>(*env, torch::kCPU));
class ProcessGroup final : public Collective {
 public:
  ProcessGroup(const DistributedEnvironment& env, const torch::Device& device,
               std::chrono::milliseconds timeout = std::chrono::minutes(5))
      : rank_(env.rank), world_(env.world_size), device_(device) {
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(env.master_port);
    options.isServer = env.rank == 0 && !env.agent_store;  // under torchrun its agent serves the store
    options.numWorkers = static_cast<std::size_t>(env.world_size);
    options.waitWorkers = true;
    options.timeout = timeout;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
    options.useLibUV = false;  // Debian builds LibTorch 2.x without libuv
#endif
    try {
      store_ = c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
      if (env.agent_store) {
        store_ = c10::make_intrusive<c10d::PrefixStore>("/worker/attempt_" + std::to_string(env.restart_count), store_);
      }
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "distributed: rank ", env.rank, " could not meet the others at ", env.master_addr, ":",
                  env.master_port, " within ", timeout.count() / 1000.0, " s (", first_line(e.what()), ")");
    }
#if defined(USE_C10D_NCCL)
    if (device.is_cuda()) {
      auto nccl = c10d::ProcessGroupNCCL::Options::create();
      nccl->timeout = timeout;
      try {
        group_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(store_, static_cast<int>(env.rank),
                                                             static_cast<int>(env.world_size), nccl);
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "distributed: rank ", env.rank, " could not create its NCCL group (", first_line(e.what()), ")");
      }
      backend_ = "nccl";
      return;
    }
#endif
    auto gloo = c10d::ProcessGroupGloo::Options::create(timeout);
    // As PyTorch does: GLOO_SOCKET_IFNAME names the network interface to use (one name here); otherwise the
    // address the hostname resolves to (on Debian often 127.0.1.1: set it for several machines).
    const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
    try {
      gloo->devices.push_back(interface && *interface ? c10d::ProcessGroupGloo::createDeviceForInterface(interface)
                                                      : c10d::ProcessGroupGloo::createDefaultDevice());
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "distributed: rank ", env.rank, " could not open a Gloo device",
                  interface && *interface ? c10::str(" on GLOO_SOCKET_IFNAME=", interface) : std::string(), " (",
                  first_line(e.what()), ")");
    }
    try {
      group_ = c10::make_intrusive<c10d::ProcessGroupGloo>(store_, static_cast<int>(env.rank),
                                                           static_cast<int>(env.world_size), gloo);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "distributed: rank ", env.rank, " could not connect to the other ranks (", first_line(e.what()), ")");
    }
    backend_ = "gloo";
  }

  int64_t rank() const override { return rank_; }
  int64_t world_size() const override { return world_; }
  /// "gloo" or "nccl".
  const std::string& backend() const noexcept { return backend_; }
  /// The device the group was made for (CUDA: NCCL when built with it; otherwise Gloo).
  const torch::Device& device() const noexcept { return device_; }

  void all_reduce_sum(std::vector<torch::Tensor>& tensors) override {
    run("all_reduce", [&] { return group_->allreduce(tensors, c10d::AllreduceOptions()); });
  }
  void broadcast(std::vector<torch::Tensor>& tensors, int64_t root) override {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    for (auto& t : tensors) {  // one call per tensor: Gloo broadcasts a list of one tensor per process
      std::vector<torch::Tensor> one{t};
      run("broadcast", [&] { return group_->broadcast(one, options); });
    }
  }
  void barrier() override {
    run("barrier", [&] { return group_->barrier(c10d::BarrierOptions()); });
  }

 private:
  static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

  template <class Start>
  void run(const char* what, Start&& start) {
    try {
      start()->wait();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "distributed: ", what, " on rank ", rank_, " of ", world_, " failed (another rank died, hung or ",
                  "stopped?): ", first_line(e.what()));
    }
  }

  int64_t rank_, world_;
  torch::Device device_;
  std::string backend_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<detail::C10dBackend> group_;
};

}  // namespace diffusion
