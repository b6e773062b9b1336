// What data-parallel training needs without a backend: the launch variables, and averaging in buckets.
#include "helpers.hpp"

#include <diffusion/training/collective.hpp>

namespace collective_helpers {

/// Variables from a map instead of the environment.
auto from(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const char* name) -> std::optional<std::string> {
    const auto it = vars.find(name);
    return it == vars.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
}

/// A group of `world` ranks inside one process, for the arithmetic: every rank's tensors are given at
/// once, and all_reduce_sum adds them up.
struct LocalGroup : Collective {
  explicit LocalGroup(std::vector<std::vector<torch::Tensor>*> ranks) : ranks_(std::move(ranks)) {}
  int64_t rank() const override { return 0; }
  int64_t world_size() const override { return static_cast<int64_t>(ranks_.size()); }
  void all_reduce_sum(std::vector<torch::Tensor>& tensors) override {
    ++calls;
    sizes.push_back(tensors.front().numel());
    auto sum = tensors.front().clone();
    for (size_t r = 1; r < ranks_.size(); ++r) sum += (*ranks_[r])[calls - 1];
    tensors.front().copy_(sum);
  }
  void broadcast(std::vector<torch::Tensor>&, int64_t) override {}
  void barrier() override {}
  std::vector<std::vector<torch::Tensor>*> ranks_;
  size_t calls = 0;
  std::vector<int64_t> sizes;
};

}  // namespace collective_helpers
using namespace collective_helpers;

TEST_CASE("the launch variables of torchrun and Slurm, and their refusals", "[distributed][errors]") {
  CHECK_FALSE(distributed_environment(from({})));
  const auto env = distributed_environment(
      from({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29512"}}));
  REQUIRE(env);
  CHECK(env->rank == 3);
  CHECK(env->world_size == 4);
  CHECK(env->local_rank == 1);
  CHECK(env->master_addr == "10.0.0.1");
  CHECK(env->master_port == 29512);
  const auto slurm = distributed_environment(
      from({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "1"}, {"MASTER_ADDR", "node1"}}));
  REQUIRE(slurm);
  CHECK(slurm->rank == 1);
  CHECK(slurm->world_size == 2);
  CHECK(slurm->master_port == 29500);
  CHECK(distributed_environment(from({{"WORLD_SIZE", "1"}}))->rank == 0);  // one process needs no master
  CHECK_REFUSED(distributed_environment(from({{"RANK", "1"}})), "RANK is set but WORLD_SIZE is not");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}})), "WORLD_SIZE is 2 but RANK is not set");
  CHECK_REFUSED(distributed_environment(from({{"SLURM_NTASKS", "2"}, {"MASTER_ADDR", "a"}})),
                "SLURM_NTASKS is 2 but SLURM_PROCID is not set");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "two"}})), "WORLD_SIZE must be an integer, got \"two\"");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "2"}, {"RANK", "2"}, {"MASTER_ADDR", "a"}})),
                "RANK must be in [0, WORLD_SIZE = 2), got 2");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "0"}})), "WORLD_SIZE must be >= 1, got 0");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "2"}, {"RANK", "1"}})), "MASTER_ADDR (the address of rank 0) must be set");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "70000"}})),
                "MASTER_PORT must be in [1, 65535], got 70000");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"LOCAL_RANK", "2"}, {"MASTER_ADDR", "a"}})),
                "LOCAL_RANK must be in [0, RANK = 1], got 2");
  CHECK_REFUSED(distributed_environment(from({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_PROCID", "0"},
                                              {"MASTER_ADDR", "a"}})),
                "RANK/WORLD_SIZE (1/2) contradict SLURM_PROCID/SLURM_NTASKS (0/2)");
}

TEST_CASE("gradients are averaged in flattened buckets, one call per bucket", "[distributed]") {
  // Two ranks' "gradients": 3 float tensors and a double one; rank 1 holds twice rank 0's values.
  std::vector<torch::Tensor> rank0 = {torch::ones({100}), torch::full({2, 50}, 2.0), torch::full({10}, 3.0),
                                      torch::full({}, 4.0, torch::kFloat64)};
  std::vector<torch::Tensor> rank1_buckets;  // what rank 1 contributes to each call, in order
  LocalGroup group({&rank0, &rank1_buckets});
  // Buckets of at most 800 bytes: [100 floats + 100 floats] = 800 bytes, [10 floats], [1 double].
  rank1_buckets = {torch::cat({torch::full({100}, 2.0), torch::full({100}, 4.0)}), torch::full({10}, 6.0),
                   torch::full({1}, 8.0, torch::kFloat64)};
  diffusion::detail::all_reduce_mean(group, rank0, 800);
  CHECK(group.calls == 3);
  CHECK(group.sizes == std::vector<int64_t>{200, 10, 1});
  CHECK(torch::allclose(rank0[0], torch::full({100}, 1.5)));
  CHECK(torch::allclose(rank0[1], torch::full({2, 50}, 3.0)));
  CHECK(torch::allclose(rank0[2], torch::full({10}, 4.5)));
  CHECK(rank0[3].item<double>() == 6.0);
}

TEST_CASE("an epoch is dealt out as DistributedSampler does, and a global batch shared by rank", "[distributed]") {
  const auto order = torch::arange(10);
  CHECK(torch::equal(diffusion::detail::shard(order, 1, 0), order));
  // 10 for 4 ranks: padded to 12 with the first two, then every 4th.
  CHECK(torch::equal(diffusion::detail::shard(order, 4, 0), torch::tensor({0, 4, 8})));
  CHECK(torch::equal(diffusion::detail::shard(order, 4, 3), torch::tensor({3, 7, 1})));
  // Padded from another tensor (a resumed epoch's rest wraps to the whole shuffle's start).
  CHECK(torch::equal(diffusion::detail::shard(torch::arange(5, 10), 4, 0, order), torch::tensor({5, 9})));
  CHECK(torch::equal(diffusion::detail::shard(torch::arange(5, 10), 4, 1, order), torch::tensor({6, 0})));
  CHECK(torch::equal(diffusion::detail::take_share(torch::arange(6), 2, 1), torch::tensor({1, 3, 5})));
}
