#pragma once

// What the subcommands share: flag checks, the backbone names of this program, and the sampling
// flags. The library checks everything else and its messages reach the user as they are.
#include <diffusion/diffusion.hpp>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace cli {

/// A finite number flag of at least `lo`, with a plain message (CLI11 2.1's PositiveNumber prints DBL_MAX as
/// the upper bound).
CLI::Validator at_least(double lo);
/// A number flag above 0.
CLI::Validator positive();
/// A number flag that is finite (no nan, no inf, nothing a float cannot hold).
CLI::Validator finite();
/// A finite number flag in [lo, hi] (CLI::Range lets nan through).
CLI::Validator between(double lo, double hi);
/// Refuses the output file `out` of flag `flag` up front, before any long work: one without `extension`
/// (when given), a directory, one in a directory that cannot be made or written, and one that is one of
/// the command's `inputs` (which writing would destroy).
void check_output(const std::string& flag, const std::string& out, const std::string& extension,
                  const std::vector<std::string>& inputs);
/// The same for an output directory `dir` of flag `flag`: made now (refused when it cannot be, or is a
/// file), and refused when it holds one of `inputs`.
void check_output_dir(const std::string& flag, const std::string& dir, const std::vector<std::string>& inputs);
/// "1,2,3" -> {1, 2, 3}; anything else is refused.
std::vector<int64_t> parse_ints(const std::string& s);

/// The backbones this program trains: its own short names, conv (the seed's ConvNet), conv-small (its
/// widths 32, 64: about a tenth of the parameters), smol and chunky (the seed's MLPs) and unet, then
/// every other backbone registered with the library by its registered name (dit, mlp, ...).
std::vector<std::string> backbone_names();

/// The shape of a backbone beyond its name (empty: the backbone's defaults).
struct Shape {
  std::string widths, blocks;
  int64_t patch = 0;
  /// --options: a JSON object of the backbone's options, over the name's and the other flags' defaults.
  std::string options;
};

/// The library's registered backbone for one of this program's names and shape flags, class-conditional
/// with `num_classes` > 0; the library refuses options that do not make a network. A registered name
/// takes its options from --options alone (and the classes from --conditional). With `data_shape`, a
/// backbone whose options have "channels" (and "image_size", for square images) takes them from images
/// (C, H, W), "channels" from sequences (C, L), "features" from vectors (D), unless --options sets them,
/// which must then agree.
diffusion::BackboneConfig backbone_config(const std::string& name, const Shape& shape, int64_t num_classes = 0,
                                          const std::vector<int64_t>& data_shape = {});

/// The training data's flags: an MNIST-format directory (the four idx files), a folder of images, or a
/// file of examples (.npy, .safetensors, .pt).
struct DataFlags {
  std::string data = "data/mnist";
  /// A file of examples: the examples' tensor in a .safetensors or .pt file (empty: its only one).
  std::string key;
  /// Image folders: side and channels of the images (0: 32 and 3), random horizontal flips, refusing
  /// unreadable files.
  int64_t size = 0, channels = 0;
  bool flip = false, strict = false;
  /// Image folders: decode once into memory when the images take at most this many MiB, else on the fly
  /// (-1: 4096).
  int64_t cache_mib = -1;
  /// Train on the first N images only (0: all); hold out N for validation (0: none).
  int64_t limit = 0, val_size = 1000;
};

/// What --data holds, scanned but not yet decoded: enough to build the backbone and to say what the run
/// trains on before the long work.
struct DataPlan {
  bool idx = false;
  /// A file of examples, read whole (any shape (N, ...)).
  std::optional<diffusion::data::TensorFile> file;
  /// One example's shape (C, H, W), the classes (0: none) and their names, the examples in all.
  std::vector<int64_t> shape;
  int64_t num_classes = 0, count = 0;
  std::vector<std::string> classes;
  /// For a folder: the scan, and the bytes its cache takes (0 when decoded on the fly).
  std::optional<diffusion::data::ImageIndex> index;
  diffusion::data::ImageFolderOptions folder;
  std::string description;
};
/// Scans --data: a directory holding train-images-idx3-ubyte (plain or .gz) is MNIST-format (10 classes,
/// its test split for validation); any other directory is a folder of images (classes: its subfolders,
/// with --conditional); a file is a file of examples (data::load_tensor_file; classes: its "labels"
/// tensor, with --conditional). Refused as the library refuses it, naming the path.
DataPlan plan_data(const DataFlags& flags, bool labels);

/// The training and validation sets of a plan, and the files decoding skipped (a folder's cache is filled
/// now): the folder's validation images are a fixed random choice of val_size (seed 0), left out of
/// training.
struct LoadedData {
  std::shared_ptr<const diffusion::data::Dataset> train, val;
  std::vector<diffusion::data::SkippedFile> skipped;
  /// The folder both come from (null for MNIST files).
  std::shared_ptr<const diffusion::data::ImageFolder> folder;
};
LoadedData load_data(const DataPlan& plan, const DataFlags& flags);

/// The backbone trained when --backbone is not given: conv for images, mlp for vectors (D), temporal_unet for
/// sequences (C, L).
std::string default_backbone(const std::vector<int64_t>& data_shape);

/// "12.3 MiB", "4.0 KiB": a byte count for people.
std::string human_bytes(int64_t bytes);

/// The number of classes a checkpoint's model is conditioned on (0: unconditional).
int64_t num_classes_of(const diffusion::CheckpointInfo& info);
/// The class names `train` recorded in a checkpoint's metadata (an image folder's subfolders; empty for
/// MNIST files). Malformed metadata is refused, naming the file.
std::vector<std::string> class_names_of(const diffusion::CheckpointInfo& info);
/// The metadata key they are recorded under.
inline constexpr const char* class_names_key = "classes";

/// The sampling flags sample and evaluate share.
struct SampleArgs {
  std::string checkpoint, device = "auto", sampler = "ddpm", precision = "auto";
  int64_t n = 25, threads = 0;
  uint64_t seed = 0;
  /// Images only, unless --clip-x0 is given: vectors and sequences are not clamped.
  double clip_x0 = 1.0;
  bool clip_given = false;
  bool no_ema = false;
  /// Model-call steps of the plan (unset: ddpm's every timestep, ddim's 50, the others' 20), the plan's
  /// name (empty: the formulation's default), the method's own options (JSON), and --eta (its "eta",
  /// which the JSON must then leave out).
  std::optional<int64_t> steps;
  std::string plan;
  nlohmann::json sampler_options = nlohmann::json::object();
  std::optional<double> eta;
  /// Autoguidance: a second, weaker checkpoint and its weight.
  std::string guide;
  double guidance = 2.0;
  /// Classifier-free guidance weight and rescale, for a class-conditional checkpoint.
  std::optional<double> cfg;
  double cfg_rescale = 0.0;
  /// The class of each of the n images (undefined: unconditional), and the one class's name when known.
  torch::Tensor labels;
  std::string class_name;
  /// Weights from elsewhere (a torch.save state_dict or safetensors) instead of a checkpoint. A file
  /// written by `diffusion export` records its network, schedule and prediction; for others, this program's
  /// backbone of that name (empty: conv), shape and class count.
  std::string weights, backbone;
  Shape shape;
  int64_t num_classes = 0;
  /// Image-to-image and inpainting (sample only).
  std::string init, mask;
  std::optional<double> strength;
};

void add_sampling_flags(CLI::App* cmd, SampleArgs& args);

/// `args.n` images in [-1, 1] on the CPU, from a checkpoint (or imported weights), guided by a second
/// checkpoint when asked, with the chosen sampler; prints what it does when `verbose`.
torch::Tensor generate(const SampleArgs& args, bool verbose);

}  // namespace cli
