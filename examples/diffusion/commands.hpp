#pragma once

// The program's subcommands: each adds its flags to the command line and runs from what was parsed.
#include "common.hpp"

#include <string>
#include <vector>

namespace cli {

struct TrainCommand {
  /// Empty: default_backbone of the data.
  std::string backbone;
  Shape shape;
  DataFlags data;
  std::string out = "runs/mnist", device = "auto", schedule = "linear", lr_schedule = "constant",
              precision = "auto", prediction = "epsilon", keep_epochs, formulation = "ddpm", t_distribution = "uniform";
  int64_t epochs = 100, batch_size = 128, micro_batch = 0, threads = 0, max_steps = 0,
          grid = 25, grid_steps = 0, keep = 1, warmup = 0, checkpoint_every = 0, skip_nonfinite = 0;
  double lr = 1e-3, ema = 0.0, grad_clip = 0.0, min_snr_gamma = 0.0, checkpoint_minutes = 0.0, sigma_data = 0.5,
         shift = 1.0;
  int64_t dist_timeout = 1800;  // PyTorch's default for collectives; rank 0 samples the grids alone
  uint64_t seed = 0;
  bool resume = false, zero_terminal_snr = false, conditional = false;
  double cond_dropout = 0.1;
  /// The command line, for the message that says how to resume.
  std::string command_line;
};
CLI::App* add_train(CLI::App& app, TrainCommand& t);
int run_train(const TrainCommand& t);

struct SampleCommand {
  SampleArgs args;
  std::string out = "samples.png", singles, classes;
  /// Whether --out was given (a model of vectors writes samples.npy by default).
  bool out_given = false;
  int64_t nrow = 0;
  /// --class: a number, or a name the checkpoint records (an image folder's subfolder).
  std::string klass;
};
CLI::App* add_sample(CLI::App& app, SampleCommand& s);
int run_sample(const SampleCommand& s);

struct ExportCommand {
  std::string checkpoint, out;
  bool no_ema = false;
};
CLI::App* add_export(CLI::App& app, ExportCommand& e);
int run_export(const ExportCommand& e);

struct ClassifierCommand {
  std::string data = "data/mnist", out = "runs/classifier.pt";
  int64_t epochs = 3, threads = 0;
  uint64_t seed = 0;
};
CLI::App* add_classifier(CLI::App& app, ClassifierCommand& c);
int run_classifier(const ClassifierCommand& c);

struct EvaluateCommand {
  SampleArgs sample;
  std::string classifier = "runs/classifier.pt", data = "data/mnist", images;
  bool unconditional = false;
};
CLI::App* add_evaluate(CLI::App& app, EvaluateCommand& e);
int run_evaluate(const EvaluateCommand& e);

}  // namespace cli
