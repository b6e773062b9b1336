// mnist classifier and mnist evaluate: the LeNet feature classifier, and sample quality as numbers.
#include "commands.hpp"

#include <cmath>
#include <filesystem>

namespace mnist {

using namespace diffusion;

CLI::App* add_classifier(CLI::App& app, ClassifierCommand& c) {
  auto* cmd = app.add_subcommand("classifier", "Train the LeNet feature classifier that evaluate uses");
  cmd->add_option("--data", c.data, "MNIST directory")->capture_default_str();
  cmd->add_option("--out", c.out, "Where to save it")->capture_default_str();
  cmd->add_option("--epochs", c.epochs, "Epochs")->check(at_least(1))->capture_default_str();
  cmd->add_option("--seed", c.seed, "Seed")->capture_default_str();
  cmd->add_option("--threads", c.threads, "CPU threads (0: all cores)")->check(at_least(0))->capture_default_str();
  return cmd;
}

int run_classifier(const ClassifierCommand& c) {
  set_threads(c.threads);
  const auto train = data::load_mnist(c.data, data::Split::Train);
  const auto test = data::load_mnist(c.data, data::Split::Test);
  eval::LeNet net;
  eval::train_classifier(net, train.images, train.labels, c.epochs, c.seed, [](int64_t epoch, double loss) {
    fmt::print("classifier epoch {}: loss {:.4f}\n", epoch, loss);
    std::fflush(stdout);
  });
  const double acc = eval::accuracy(net, test.images, test.labels);
  if (std::filesystem::path(c.out).has_parent_path()) std::filesystem::create_directories(std::filesystem::path(c.out).parent_path());
  torch::save(net, c.out);
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
  add_sampling_flags(cmd, e.sample);
  return cmd;
}

int run_evaluate(const EvaluateCommand& e) {
  TORCH_CHECK(e.sample.checkpoint.empty() != e.images.empty(), "evaluate: give exactly one of --checkpoint or --images");
  set_threads(e.sample.threads);
  eval::LeNet net;
  torch::load(net, e.classifier);
  net->eval();
  const auto test = data::load_mnist(e.data, data::Split::Test);
  const auto train = data::load_mnist(e.data, data::Split::Train);
  const auto reference = eval::feature_statistics(eval::features_of(net, test.images));
  torch::Tensor samples;
  if (!e.images.empty()) {
    torch::load(samples, e.images);
    TORCH_CHECK(samples.dim() == 4 && samples.size(1) == 1 && samples.size(2) == 28 && samples.size(3) == 28,
                "evaluate: ", e.images, " must hold an (N, 1, 28, 28) tensor in [-1, 1], got ", samples.sizes());
  } else {
    samples = generate(e.sample, true);
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
  return 0;
}

}  // namespace mnist
