// The seed's whole job as one program: train a backbone on MNIST (or Fashion-MNIST), sample from a
// checkpoint (or from weights trained in Python), export weights, and score samples.
//
//   mnist train --backbone conv-small --epochs 2 --out runs/mnist
//   mnist sample --checkpoint runs/mnist/checkpoints/checkpoint_epoch_002.pt --out grid.png
//
// `mnist --help` and `mnist SUBCOMMAND --help` explain every flag. Each subcommand lives in its own file
// (train.cpp, sample.cpp, evaluate.cpp); this one wires them to the command line and reports errors.
#include "commands.hpp"

#include <cstdio>

int main(int argc, char** argv) {
  CLI::App app{"DDPM on MNIST-format data: train a backbone, sample from a checkpoint, score samples."};
  app.require_subcommand(1, 1);
  mnist::TrainCommand train;
  mnist::SampleCommand sample;
  mnist::ExportCommand exporting;
  mnist::ClassifierCommand classifier;
  mnist::EvaluateCommand evaluate;
  auto* train_cmd = mnist::add_train(app, train);
  auto* sample_cmd = mnist::add_sample(app, sample);
  auto* export_cmd = mnist::add_export(app, exporting);
  auto* classifier_cmd = mnist::add_classifier(app, classifier);
  auto* evaluate_cmd = mnist::add_evaluate(app, evaluate);
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
    if (train_cmd->parsed()) return mnist::run_train(train);
    if (sample_cmd->parsed()) return mnist::run_sample(sample);
    if (export_cmd->parsed()) return mnist::run_export(exporting);
    if (classifier_cmd->parsed()) return mnist::run_classifier(classifier);
    if (evaluate_cmd->parsed()) return mnist::run_evaluate(evaluate);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());  // never throws, even to a closed stderr
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
