#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

/// What data-parallel training needs from a communication backend, without depending on one: the Trainer
/// talks to this interface; training/distributed.hpp implements it with PyTorch's c10d (Gloo, NCCL).
namespace diffusion {

/// A group of processes ("ranks") that train one model together.
class Collective {
 public:
  virtual ~Collective() = default;
  /// This process's index in [0, world_size()), and the number of processes.
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  /// Replaces each tensor by its sum over the ranks, in place, on every rank.
  virtual void all_reduce_sum(std::vector<torch::Tensor>& tensors) = 0;
  /// Copies rank `root`'s tensors to every rank, in place.
  virtual void broadcast(std::vector<torch::Tensor>& tensors, int64_t root = 0) = 0;
  /// Returns when every rank has called it.
  virtual void barrier() = 0;
};

/// Where this process stands in a group, as launchers say it.
struct DistributedEnvironment {
  int64_t rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr;
  int64_t master_port = 29500;
  /// torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE):
  /// every rank connects to it as a client, under the prefix of this restart attempt.
  bool agent_store = false;
  int64_t restart_count = 0;
};

namespace detail {

inline std::optional<int64_t> env_integer(const std::function<std::optional<std::string>(const char*)>& get,
                                          const char* name) {
  const auto text = get(name);
  if (!text) return std::nullopt;
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TORCH_CHECK(used > 0 && used == text->size(), "distributed: ", name, " must be an integer, got \"", *text, "\"");
  return value;
}

}  // namespace detail

/// The group this process belongs to, from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
/// MASTER_ADDR, MASTER_PORT), or Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR and
/// MASTER_PORT still needed) when those are absent; nothing when neither says WORLD_SIZE/SLURM_NTASKS
/// (a single process). `get` reads a variable (default: the environment). Refused, naming the variables:
/// non-integers, RANK without WORLD_SIZE, a rank outside [0, world size), a local rank outside [0, rank],
/// a world size below 1, a missing RANK (or SLURM_PROCID) or MASTER_ADDR for more than one process, a
/// port outside [1, 65535], and RANK/WORLD_SIZE disagreeing with SLURM_PROCID/SLURM_NTASKS when all four
/// are set.
inline std::optional<DistributedEnvironment> distributed_environment(
    const std::function<std::optional<std::string>(const char*)>& get = [](const char* name) -> std::optional<std::string> {
      const char* value = std::getenv(name);
      return value ? std::optional<std::string>(value) : std::nullopt;
    }) {
  auto world = detail::env_integer(get, "WORLD_SIZE");
  auto rank = detail::env_integer(get, "RANK");
  auto local = detail::env_integer(get, "LOCAL_RANK");
  const auto slurm_rank = detail::env_integer(get, "SLURM_PROCID");
  const auto slurm_world = detail::env_integer(get, "SLURM_NTASKS");
  if (rank && slurm_rank && world && slurm_world) {
    TORCH_CHECK(*rank == *slurm_rank && *world == *slurm_world, "distributed: RANK/WORLD_SIZE (", *rank, "/", *world,
                ") contradict SLURM_PROCID/SLURM_NTASKS (", *slurm_rank, "/", *slurm_world, ")");
  }
  const bool from_slurm = !world && slurm_world;
  if (from_slurm) {
    world = slurm_world;
    rank = slurm_rank;
    local = detail::env_integer(get, "SLURM_LOCALID");
  }
  if (!world) {
    TORCH_CHECK(!rank, "distributed: RANK is set but WORLD_SIZE is not");
    return std::nullopt;
  }
  TORCH_CHECK(*world >= 1, "distributed: WORLD_SIZE must be >= 1, got ", *world);
  TORCH_CHECK(rank || *world == 1, "distributed: ", from_slurm ? "SLURM_NTASKS" : "WORLD_SIZE", " is ", *world, " but ",
              from_slurm ? "SLURM_PROCID" : "RANK", " is not set");
  DistributedEnvironment env;
  env.world_size = *world;
  env.rank = rank.value_or(0);
  env.local_rank = local.value_or(env.rank);
  TORCH_CHECK(env.rank >= 0 && env.rank < env.world_size, "distributed: RANK must be in [0, WORLD_SIZE = ", env.world_size,
              "), got ", env.rank);
  TORCH_CHECK(env.local_rank >= 0 && env.local_rank <= env.rank, "distributed: LOCAL_RANK must be in [0, RANK = ",
              env.rank, "], got ", env.local_rank);
  const auto addr = get("MASTER_ADDR");
  TORCH_CHECK(addr || env.world_size == 1, "distributed: MASTER_ADDR (the address of rank 0) must be set for ",
              env.world_size, " processes");
  env.master_addr = addr.value_or("127.0.0.1");
  env.master_port = detail::env_integer(get, "MASTER_PORT").value_or(29500);
  TORCH_CHECK(env.master_port >= 1 && env.master_port <= 65535, "distributed: MASTER_PORT must be in [1, 65535], got ",
              env.master_port);
  env.agent_store = get("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  env.restart_count = detail::env_integer(get, "TORCHELASTIC_RESTART_COUNT").value_or(0);
  return env;
}


namespace detail {

/// Averages `tensors` over the ranks in place, in flattened buckets of at most `bucket_bytes` (one
/// collective call per bucket, not per tensor, as DistributedDataParallel's 25 MB buckets do). Tensors
/// of different dtypes go to different buckets.
inline void all_reduce_mean(Collective& group, const std::vector<torch::Tensor>& tensors,
                            int64_t bucket_bytes = 25 << 20) {
  const double scale = 1.0 / static_cast<double>(group.world_size());
  std::vector<torch::Tensor> bucket;
  int64_t bytes = 0;
  const auto flush = [&] {
    if (bucket.empty()) return;
    std::vector<torch::Tensor> flat{torch::cat([&] {
      std::vector<torch::Tensor> views;
      for (const auto& t : bucket) views.push_back(t.reshape({-1}));
      return views;
    }())};
    group.all_reduce_sum(flat);
    flat[0].mul_(scale);
    int64_t at = 0;
    for (auto& t : bucket) {
      t.copy_(flat[0].slice(0, at, at + t.numel()).view_as(t));
      at += t.numel();
    }
    bucket.clear();
    bytes = 0;
  };
  for (const auto& t : tensors) {
    if (!bucket.empty() && (t.scalar_type() != bucket.front().scalar_type() || t.device() != bucket.front().device() ||
                            bytes + t.numel() * static_cast<int64_t>(t.element_size()) > bucket_bytes)) {
      flush();
    }
    bucket.push_back(t);
    bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  flush();
}

}  // namespace detail
}  // namespace diffusion
