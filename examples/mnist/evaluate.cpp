// mnist classifier and mnist evaluate: the LeNet feature classifier, and sample quality as numbers.
#include "commands.hpp"

#include <cmath>
#include <filesystem>
#include <optional>

namespace mnist {

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
  // Not over a diffusion checkpoint (also .pt): a classifier file is a plain module archive.
  bool is_checkpoint = false;
  try {
    is_checkpoint = std::filesystem::exists(c.out) && read_checkpoint_info(c.out).format > 0;
  } catch (const c10::Error&) {
  }
  TORCH_CHECK(!is_checkpoint, "classifier: --out ", c.out, " is a diffusion checkpoint; writing it would destroy it");
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
  auto* cmd = app.add_subcommand("evaluate", "Score samples: Frechet distance in the classifier's features (with "
                                             "its floor and ceiling), digit rate, class histogram and entropy");
  cmd->add_option("--checkpoint", e.sample.checkpoint, "Checkpoint to sample from")->check(CLI::ExistingFile);
  cmd->add_option("--images", e.images, "Or: a tensor file (torch::save) of (N, 1, 28, 28) images in [-1, 1]")
      ->check(CLI::ExistingFile);
  cmd->add_option("--classifier", e.classifier, "Classifier from the classifier subcommand")->capture_default_str();
  cmd->add_option("--data", e.data, "MNIST directory (the reference is its test set)")->capture_default_str();
  cmd->add_option("--n", e.sample.n, "Samples to draw")->check(at_least(2))->capture_default_str();
  cmd->add_flag("--unconditional", e.unconditional,
                "For a class-conditional checkpoint: sample without labels (by default the classes are requested "
                "in turn, and the classifier's agreement with them is scored)");
  add_sampling_flags(cmd, e.sample);
  return cmd;
}

namespace {

/// For samples drawn with requested classes: how often the classifier names the requested class (overall
/// and per class), and the Frechet distance of each class's samples to the test images of that class,
/// beside its floor (as many training images of the class).
void report_requested_classes(eval::LeNet& net, const torch::Tensor& samples, const torch::Tensor& labels, int64_t classes,
                              const data::MnistSplit& test, const data::MnistSplit& train) {
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
    const auto references = test.images.index({test.labels.eq(k)});
    const auto real = train.images.index({train.labels.eq(k)}).slice(0, 0, n);
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
  fmt::print("per-class FD:     {}   (each class's samples vs its test images; floor in brackets)\n",
             fmt::join(per_class_fd, " "));
}

}  // namespace

int run_evaluate(const EvaluateCommand& e) {
  TORCH_CHECK(e.sample.checkpoint.empty() != e.images.empty(), "evaluate: give exactly one of --checkpoint or --images");
  set_threads(e.sample.threads);
  eval::LeNet net;
  load_module_file(e.classifier, net, "classifier");  // refuses a damaged file, or one of another network
  net->eval();
  const auto test = data::load_mnist(e.data, data::Split::Test);
  const auto train = data::load_mnist(e.data, data::Split::Train);
  const auto reference = eval::feature_statistics(eval::features_of(net, test.images));
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
    TORCH_CHECK(samples.size(0) >= 2, "evaluate: ", e.images, " holds ", samples.size(0),
                " image(s); the Frechet distance needs at least 2");
    TORCH_CHECK(samples.isfinite().all().item<bool>() && samples.abs().max().item<double>() <= 1.0 + 1e-3,
                "evaluate: ", e.images, " must hold images in [-1, 1], "
                "got values from ", samples.min().item<double>(), " to ", samples.max().item<double>());
  } else {
    TORCH_CHECK(!args.cfg || classes > 0, "evaluate: --cfg needs a class-conditional checkpoint; ", args.checkpoint,
                " was trained without --conditional");
    samples = generate(args, true);
  }
  // The bounds, on as many images as the samples: train vs test (the floor) and uniform noise vs test.
  // The real images' scores also give the digit rate for scale: the classifier is not certain of every
  // real digit either.
  const int64_t m = std::min<int64_t>(samples.size(0), train.images.size(0));
  const auto real = eval::evaluate_samples(net, train.images.slice(0, 0, m), reference);
  const auto noise = torch::rand({m, 1, 28, 28}, make_generator(e.sample.seed + 1)) * 2 - 1;
  const double ceiling = eval::frechet_distance(eval::feature_statistics(eval::features_of(net, noise)), reference);
  const auto q = eval::evaluate_samples(net, samples, reference);
  fmt::print("samples:          {}\n", samples.size(0));
  fmt::print("Frechet distance: {:.3f}   (floor, {} train images vs test: {:.3f}; ceiling, noise vs test: {:.3f})\n",
             q.frechet, m, real.frechet, ceiling);
  fmt::print("digit rate:       {:.3f}   (share classified with probability >= 0.9; {} train images: {:.3f})\n",
             q.digit_rate, m, real.digit_rate);
  fmt::print("class histogram:  {}\n", fmt::join(q.histogram, " "));
  fmt::print("class entropy:    {:.3f} nats (uniform: {:.3f}); smallest class share {:.3f}\n", q.class_entropy,
             std::log(10.0), q.min_class_share);
  if (classes > 0) report_requested_classes(net, samples, args.labels, classes, test, train);
  return 0;
}

}  // namespace mnist
