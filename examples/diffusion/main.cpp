// The whole job as one program, on any data: train a backbone on MNIST-format files (the default: the seed's
// job), a folder of images or a file of vectors or sequences; sample from a checkpoint (or from weights
// trained in Python); export weights; and score MNIST samples.
//
//   diffusion train --backbone conv-small --epochs 2 --out runs/mnist
//   diffusion train --data ~/sprites --size 32 --backbone dit --options '{"depth": 6}' --out runs/sprites
//   diffusion sample --checkpoint runs/mnist/checkpoints/checkpoint_epoch_002.pt --out grid.png
//
// `diffusion --help` and `diffusion SUBCOMMAND --help` explain every flag. Each subcommand lives in its own
// file (train.cpp, sample.cpp, evaluate.cpp); this one wires them to the command line and reports errors.
#include "commands.hpp"

#include <cstdio>

int main(int argc, char** argv) {
  CLI::App app{"Diffusion models on your data (MNIST-format files by default, folders of images, .npy/.safetensors files "
               "of vectors or sequences): train a backbone, sample from a checkpoint, export weights, score MNIST samples."};
  app.require_subcommand(1, 1);
  cli::TrainCommand train;
  cli::SampleCommand sample;
  cli::ExportCommand exporting;
  cli::ClassifierCommand classifier;
  cli::EvaluateCommand evaluate;
  auto* train_cmd = cli::add_train(app, train);
  auto* sample_cmd = cli::add_sample(app, sample);
  auto* export_cmd = cli::add_export(app, exporting);
  auto* classifier_cmd = cli::add_classifier(app, classifier);
  auto* evaluate_cmd = cli::add_evaluate(app, evaluate);
  CLI11_PARSE(app, argc, argv);
  // The command line as the shell takes it back (the resume hint): words with other characters than these
  // are single-quoted, a single quote inside as '\''.
  const auto shell_word = [](const std::string& w) {
    const bool plain = !w.empty() && w.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                          "0123456789_./:=,+-@%") == std::string::npos;
    if (plain) return w;
    std::string quoted = "'";
    for (const char c : w) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return quoted + "'";
  };
  for (int i = 0; i < argc; ++i) train.command_line += (i ? " " : "") + shell_word(argv[i]);
  // Freed tensors' memory stays with the process for the next step (docs/performance.md).
  diffusion::reuse_freed_memory();
  try {
    if (train_cmd->parsed()) return cli::run_train(train);
    if (sample_cmd->parsed()) return cli::run_sample(sample);
    if (export_cmd->parsed()) return cli::run_export(exporting);
    if (classifier_cmd->parsed()) return cli::run_classifier(classifier);
    if (evaluate_cmd->parsed()) return cli::run_evaluate(evaluate);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());  // never throws, even to a closed stderr
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
