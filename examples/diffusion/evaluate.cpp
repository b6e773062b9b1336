// diffusion classifier and diffusion evaluate: the LeNet feature classifier, and sample quality as numbers.
#include "commands.hpp"

#include <cmath>
#include <filesystem>
#include <optional>

namespace cli {

using namespace diffusion;

CLI::App* add_classifier(CLI::App& app, ClassifierCommand& c) {
  auto* cmd = app.add_subcommand("classifier", "Train the LeNet feature classifier that evaluate uses");
  cmd->add_option("--data", c.data, "MNIST directory")->capture_default_str();
  cmd->add_option("--out", c.out, "Where to save it")->capture_default_str();
  cmd->add_option("--epochs", c.epochs, "Epochs")->check(at_least(1))->capture_default_str();
  cmd->add_option("--seed", c.seed, "Seed")->capture_default_str();
  cmd->add_option("--threads", c.threads, "CPU threads (0: all cores; at most 256)")->check(CLI::Range(0, 256))->capture_default_str();
  return cmd;
}

int run_classifier(const ClassifierCommand& c) {
  check_output("--out", c.out, ".pt", {});  // before training, not after
  // Not over a diffusion checkpoint (also .pt): a classifier file is a plain module archive. A damaged
  // zip may have been one: it is not overwritten either, but the message says what to do.
  bool checkpoint = false;
  try {
    checkpoint = is_checkpoint(c.out);
  } catch (const DamagedFileError& e) {
    TORCH_CHECK(false, "classifier: --out ", c.out, " is a damaged zip, perhaps a checkpoint, so it is not overwritten (",
                e.what_without_backtrace(), "); move it away or choose another --out");
  }
  TORCH_CHECK(!checkpoint, "classifier: --out ", c.out, " is a diffusion checkpoint; writing it would destroy it");
  set_threads(c.threads);
  const auto train = data::load_mnist(c.data, data::Split::Train);
  const auto test = data::load_mnist(c.data, data::Split::Test);
  eval::LeNet net;
  eval::train_classifier(net, train.images, train.labels, c.epochs, c.seed, [](int64_t epoch, double loss) {
    fmt::print("classifier epoch {}: loss {:.4f}\n", epoch, loss);
    std::fflush(stdout);
  });
  const double acc = eval::accuracy(net, test.images, test.labels);
  save_module_file(c.out, net, "classifier");  // atomically: an interrupted save keeps the previous file
  fmt::print("test accuracy {:.2f}%; wrote {}\n", 100 * acc, c.out);
  if (acc < 0.99) fmt::print("note: below 99%; more --epochs usually help\n");
  return 0;
}

CLI::App* add_evaluate(CLI::App& app, EvaluateCommand& e) {
  e.sample.n = 10000;  // the usual size for FID-style scores; --n 1000 for a quick run
  auto* cmd = app.add_subcommand("evaluate", "Score samples: Frechet and kernel distances in the classifier's "
                                             "features (with their floor from held-out test images), digit rate, "
                                             "class histogram and entropy");
  cmd->add_option("--checkpoint", e.sample.checkpoint, "Checkpoint to sample from")->check(CLI::ExistingFile);
  cmd->add_option("--images", e.images, "Or: a tensor file (torch::save) of (N, 1, 28, 28) images in [-1, 1]")
      ->check(CLI::ExistingFile);
  cmd->add_option("--classifier", e.classifier, "Classifier from the classifier subcommand")->capture_default_str();
  cmd->add_option("--data", e.data, "MNIST directory (its test set, split in two, gives the reference and the floor)")->capture_default_str();
  cmd->add_option("--n", e.sample.n, "Samples to draw")->check(at_least(3))->capture_default_str();
  cmd->add_flag("--unconditional", e.unconditional,
                "For a class-conditional checkpoint: sample without labels (by default the classes are requested "
                "in turn, and the classifier's agreement with them is scored)");
  add_sampling_flags(cmd, e.sample);
  return cmd;
}

namespace {

/// The test set in two parts, split by a fixed permutation (seed 0, so every run scores against the same
/// images): `held_out`, as many images as the samples (at most half the test set), gives the floor;
/// `reference` is the rest. Neither the classifier nor the diffusion model saw either part: training
/// images make no floor, since the classifier, trained on them, maps their features differently.
struct TestSplit {
  data::MnistSplit held_out, reference;
};

TestSplit split_test_set(const data::MnistSplit& test, int64_t samples, const std::string& data_dir) {
  const int64_t n = test.images.size(0);
  const int64_t held = std::min(samples, n / 2);
  TORCH_CHECK(held >= 3, "evaluate: the test set in ", data_dir, " holds ", n, " images; at least 6 are needed (3 for ",
              "the floor, 3 for the reference)");
  const auto order = torch::randperm(n, make_generator(0), torch::kLong);
  const auto part = [&](int64_t from, int64_t to) {
    const auto idx = order.slice(0, from, to);
    return data::MnistSplit{test.images.index_select(0, idx), test.labels.index_select(0, idx)};
  };
  return {part(0, held), part(held, n)};
}

std::string kernel_str(const eval::KernelDistance& k) {
  return fmt::format("{:.5f} +- {:.5f}", k.value, k.standard_error);
}

/// For samples drawn with requested classes: how often the classifier names the requested class (overall
/// and per class), and the Frechet distance of each class's samples to the reference images of that class,
/// beside its floor (as many held-out test images of the class).
void report_requested_classes(eval::LeNet& net, const torch::Tensor& samples, const torch::Tensor& labels, int64_t classes,
                              const TestSplit& split) {
  const auto x = samples.clamp(-1, 1);
  const auto predicted = eval::batched(net, x, 1000, [&](const torch::Tensor& b) { return net(b).argmax(1); });
  const auto agree = predicted.eq(labels);
  std::vector<std::string> per_class, per_class_fd;
  std::optional<double> worst;  // none when no class has 2 samples
  for (int64_t k = 0; k < classes; ++k) {
    const auto mine = labels.eq(k);
    const auto n = mine.sum().item<int64_t>();
    if (n < 2) {  // a column per class whatever --n is: the class's place says "too few samples"
      per_class.push_back("-");
      per_class_fd.push_back("-");
      continue;
    }
    const double acc = agree.masked_select(mine).to(torch::kDouble).mean().item<double>();
    worst = std::min(worst.value_or(1.0), acc);
    per_class.push_back(fmt::format("{:.3f}", acc));
    const auto references = split.reference.images.index({split.reference.labels.eq(k)});
    const auto real = split.held_out.images.index({split.held_out.labels.eq(k)}).slice(0, 0, n);
    if (references.size(0) < 2 || real.size(0) < 2) {
      per_class_fd.push_back("n/a");  // too few real images of the class to fit a Gaussian to
      continue;
    }
    const auto reference = eval::feature_statistics(eval::features_of(net, references));
    const auto own = eval::feature_statistics(eval::features_of(net, x.index({mine})));
    const auto floor = eval::feature_statistics(eval::features_of(net, real));
    per_class_fd.push_back(fmt::format("{:.1f} ({:.1f})", eval::frechet_distance(own, reference),
                                       eval::frechet_distance(floor, reference)));
  }
  fmt::print("requested class:  {:.4f}   (share the classifier assigns to the class asked for; worst class {})\n",
             agree.to(torch::kDouble).mean().item<double>(), worst ? fmt::format("{:.3f}", *worst) : "-");
  fmt::print("per class:        {}   (class 0 first; -: fewer than 2 samples of it)\n", fmt::join(per_class, " "));
  fmt::print("per-class FD:     {}   (each class's samples vs its reference images; floor, held-out images, in "
             "brackets)\n", fmt::join(per_class_fd, " "));
}

}  // namespace

int run_evaluate(const EvaluateCommand& e) {
  TORCH_CHECK(e.sample.checkpoint.empty() != e.images.empty(), "evaluate: give exactly one of --checkpoint or --images");
  if (!e.sample.checkpoint.empty()) {
    const auto shape = read_checkpoint_info(e.sample.checkpoint).data_shape;
    TORCH_CHECK((shape.empty() || shape == std::vector<int64_t>{1, 28, 28}), "evaluate: the MNIST classifier scores 1x28x28 "
                "images, but ", e.sample.checkpoint, " was trained on ", fmt::format("{}", fmt::join(shape, "x")), " images");
  }
  set_threads(e.sample.threads);
  eval::LeNet net;
  load_module_file(e.classifier, net, "classifier");  // refuses a damaged file, or one of another network
  net->eval();
  const auto test = data::load_mnist(e.data, data::Split::Test);
  torch::Tensor samples;
  auto args = e.sample;
  int64_t classes = 0;
  TORCH_CHECK(!args.cfg || (!args.checkpoint.empty() && !e.unconditional), "evaluate: --cfg guides a class-conditional "
              "checkpoint towards the classes evaluate requests in turn; it cannot apply with --images or --unconditional");
  if (!args.checkpoint.empty() && !e.unconditional) {
    classes = num_classes_of(read_checkpoint_info(args.checkpoint));
    if (classes > 0) args.labels = torch::arange(args.n) % classes;  // every class in turn
  }
  if (!e.images.empty()) {
    samples = load_tensor_file(e.images, "images");
    TORCH_CHECK(samples.is_floating_point() && samples.dim() == 4 && samples.size(1) == 1 && samples.size(2) == 28 &&
                    samples.size(3) == 28,
                "evaluate: ", e.images, " must hold an (N, 1, 28, 28) floating-point tensor in [-1, 1], got ",
                samples.scalar_type(), " of shape ", samples.sizes());
    TORCH_CHECK(samples.size(0) >= 3, "evaluate: ", e.images, " holds ", samples.size(0),
                " image(s); the kernel distance needs at least 3");
    const auto nonfinite = samples.isfinite().logical_not().sum().item<int64_t>();
    TORCH_CHECK(nonfinite == 0, "evaluate: ", e.images, " holds ", nonfinite, " NaN or infinite value(s); images must be "
                "in [-1, 1]");
    TORCH_CHECK(samples.abs().max().item<double>() <= 1.0 + 1e-3, "evaluate: ", e.images, " must hold images in [-1, 1], "
                "got values from ", samples.min().item<double>(), " to ", samples.max().item<double>());
  }
  // The floor: held-out test images, as many as the samples (at most half the test set), against the
  // rest; the ceiling: as many images of uniform noise. The held-out images' digit rate gives the scale:
  // the classifier is not certain of every real digit either. Split before sampling: a test set too
  // small for it is refused before the minutes of sampling.
  const auto split = split_test_set(test, e.images.empty() ? args.n : samples.size(0), e.data);
  const auto reference = eval::reference_features(net, split.reference.images);
  if (e.images.empty()) {
    TORCH_CHECK(!args.cfg || classes > 0, "evaluate: --cfg needs a class-conditional checkpoint; ", args.checkpoint,
                " was trained without --conditional");
    samples = generate(args, true);
  }
  const int64_t m = split.held_out.images.size(0);
  const auto real = eval::evaluate_samples(net, split.held_out.images, reference);
  const auto noise = torch::rand({samples.size(0), 1, 28, 28}, make_generator(e.sample.seed + 1)) * 2 - 1;
  const double ceiling =
      eval::frechet_distance(eval::feature_statistics(eval::features_of(net, noise)), reference.statistics);
  const auto q = eval::evaluate_samples(net, samples, reference);
  fmt::print("samples:          {}   (scored against {} test images; {} other test images held out for the floor)\n",
             samples.size(0), split.reference.images.size(0), m);
  fmt::print("Frechet distance: {:.3f}   (floor, {} held-out test images: {:.3f}; ceiling, noise: {:.3f})\n", q.frechet, m,
             real.frechet, ceiling);
  fmt::print("kernel distance:  {}   (KID, unbiased at any count; floor {})\n", kernel_str(*q.kernel),
             kernel_str(*real.kernel));
  fmt::print("digit rate:       {:.3f}   (share classified with probability >= 0.9; {} held-out test images: {:.3f})\n",
             q.digit_rate, m, real.digit_rate);
  fmt::print("class histogram:  {}\n", fmt::join(q.histogram, " "));
  fmt::print("class entropy:    {:.3f} nats (uniform: {:.3f}); smallest class share {:.3f}\n", q.class_entropy,
             std::log(10.0), q.min_class_share);
  if (classes > 0) report_requested_classes(net, samples, args.labels, classes, split);
  return 0;
}

}  // namespace cli
