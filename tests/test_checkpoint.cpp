// Checkpoints: the file format, format 1 compatibility, integrity, failed writes, load_model.
#include "helpers.hpp"

#include <csignal>
#include <sys/resource.h>

namespace checkpoint_helpers {

/// A checkpoint of a short run of `net` (EMA on), in `dir`; returns its path.
template <class Net>
fs::path trained_checkpoint(Net net, const fs::path& dir, int64_t epochs = 1) {
  Trainer trainer(std::move(net), NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet().epochs(epochs).ema_decay(0.5));
  trainer.add_hook(std::make_shared<RunOutputs>(RunOutputsOptions(dir).grid_samples(0)));
  trainer.fit(tiny_dataset(32));
  return list_checkpoints(dir / "checkpoints").back();
}

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void put_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

const fs::path fixtures = DIFFUSION_TEST_FIXTURES;

}  // namespace checkpoint_helpers
using namespace checkpoint_helpers;

TEST_CASE("a checkpoint round trip reproduces sampling exactly, EMA weights included", "[checkpoint]") {
  const auto dir = scratch("roundtrip");
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet().epochs(1).ema_decay(0.5));
  trainer.fit(tiny_dataset(32));
  const auto path = dir / "model.pt";
  trainer.save_checkpoint(path);
  const auto expected = trainer.sample(4, DDPM(), 11);  // from the EMA weights

  const auto info = read_checkpoint_info(path);
  REQUIRE(info.has_ema);
  CHECK(info.format == checkpoint_format);
  CHECK(info.prediction == Prediction::Epsilon);
  auto model = tiny_net();
  load_weights(path, model);  // EMA by default
  const auto got = sample(model, NoiseSchedule(info.schedule), {4, 1, 8, 8}, DDPM(), SampleOptions().seed(11));
  CHECK(torch::equal(expected, got));

  auto raw = tiny_net();
  load_weights(path, raw, /*use_ema=*/false);
  CHECK(max_difference(snapshot(*trainer.model()), snapshot(*raw)) == 0.0);
}

TEST_CASE("load_model rebuilds the model a checkpoint was written for, without knowing it", "[checkpoint][registry]") {
  const auto dir = scratch("load_model");
  for (const auto& [name, path] :
       {std::pair{std::string("unet"), trained_checkpoint(UNet(UNetOptions().widths({8, 16}).blocks({1, 2}).time_dim(16)), dir / "unet")},
        std::pair{std::string("convnet"), trained_checkpoint(tiny_net(), dir / "conv")},
        std::pair{std::string("dit"), trained_checkpoint(DiT(DiTOptions().patch(2).depth(2).width(16).heads(2).time_dim(16)), dir / "dit")}}) {
    INFO(name);
    auto [model, info] = load_model(path);
    REQUIRE(info.backbone);
    CHECK(info.backbone->name == name);
    CHECK_FALSE(model->is_training());
    // The same samples as the checkpoint's own architecture, loaded by hand.
    const NoiseSchedule schedule(info.schedule);
    const auto x = sample(model, schedule, {2, 1, 8, 8}, DDIM().steps(5), SampleOptions().seed(1));
    if (name == "unet") {
      UNet by_hand(UNetOptions().widths({8, 16}).blocks({1, 2}).time_dim(16));
      load_weights(path, by_hand);
      CHECK(torch::equal(x, sample(by_hand, schedule, {2, 1, 8, 8}, DDIM().steps(5), SampleOptions().seed(1))));
    } else if (name == "dit") {
      DiT by_hand(DiTOptions().patch(2).depth(2).width(16).heads(2).time_dim(16));
      load_weights(path, by_hand);
      CHECK(torch::equal(x, sample(by_hand, schedule, {2, 1, 8, 8}, DDIM().steps(5), SampleOptions().seed(1))));
    } else {
      auto by_hand = tiny_net();
      load_weights(path, by_hand);
      CHECK(torch::equal(x, sample(by_hand, schedule, {2, 1, 8, 8}, DDIM().steps(5), SampleOptions().seed(1))));
    }
  }
  // A model whose type was never registered: weights only.
  const auto unregistered = trained_checkpoint(ScaleNet(), dir / "scale");
  CHECK_FALSE(read_checkpoint_info(unregistered).backbone);
  CHECK_REFUSED(load_model(unregistered), "records no backbone (its type was not registered");
  CHECK_REFUSED(make_backbone(BackboneConfig{"resnet", {}}), "unknown backbone 'resnet' (known: chunky_mlp, convnet, dit, mlp, smol_mlp, temporal_unet, unet)");
  CHECK_REFUSED(make_backbone(BackboneConfig{"unet", {{"widths", "wide"}}}), "make_backbone: the options of 'unet' are malformed");
  CHECK_REFUSED(make_backbone(BackboneConfig{"unet", {{"depth", 3}}}), "UNetOptions: unknown field \"depth\"");
  // `{}` in braces is a JSON null, not an empty object: the defaults, as with no options at all.
  const auto count = [](AnyBackbone m) {
    int64_t n = 0;
    for (const auto& p : m->parameters()) n += p.numel();
    return n;
  };
  CHECK(count(make_backbone(BackboneConfig{"unet", {}})) == count(make_backbone(BackboneConfig{"unet"})));
}

TEST_CASE("format-1 checkpoints (written before the JSON config) still load and resume", "[checkpoint][compat]") {
  // tests/fixtures/format1_convnet.pt: a Trainer of format 1 trained ConvNet(widths {8}, time_dim 8) on T = 50 for
  // two epochs with an EMA; format1_convnet_sample.pt holds DDPM samples (seed 0) of its EMA weights, drawn then.
  const auto path = fixtures / "format1_convnet.pt";
  const auto info = read_checkpoint_info(path);
  CHECK(info.format == 1);
  CHECK(info.epoch == 2);
  CHECK(info.global_step == 4);
  CHECK(info.has_ema);
  CHECK(info.schedule.num_timesteps() == 50);
  CHECK(info.schedule.kind() == ScheduleKind::Linear);
  CHECK(info.prediction == Prediction::Epsilon);
  CHECK(info.metadata.at("made_by").find("checkpoint format 1") != std::string::npos);
  CHECK(info.training.at("batch_size") == "8");
  CHECK_FALSE(info.backbone);
  ConvNet model(ConvNetOptions().widths({8}).time_dim(8));
  load_weights(path, model);
  torch::Tensor expected;
  torch::load(expected, (fixtures / "format1_convnet_sample.pt").string());
  const auto got = sample(model, NoiseSchedule(info.schedule), {2, 1, 8, 8}, DDPM(), SampleOptions().seed(0));
  CHECK(torch::allclose(got, expected, 1e-5, 1e-5));
  // A trainer resumes from it: optimizer, EMA (its update count from the step count) and generator.
  Trainer trainer(ConvNet(ConvNetOptions().widths({8}).time_dim(8)), NoiseSchedule(info.schedule),
                  quiet().epochs(3).batch_size(8).ema_decay(0.9));
  trainer.load_checkpoint(path);
  CHECK(trainer.epoch() == 2);
  CHECK(trainer.ema()->updates() == 4);
  auto x = torch::full({16, 1, 8, 8}, -1.0f);
  CHECK_NOTHROW(trainer.fit(x));
  CHECK(trainer.epoch() == 3);
  // The MNIST example's format-1 metadata maps to registered backbones.
  CHECK(diffusion::detail::v1_backbone({{"backbone", "unet"}, {"widths", "16,32,128"}, {"blocks", "1,1,2"}, {"patch", "1"}})->options ==
        nlohmann::json({{"widths", {16, 32, 128}}, {"blocks", {1, 1, 2}}, {"patch", 1}}));
  CHECK(diffusion::detail::v1_backbone({{"backbone", "unet"}, {"widths", "16,32"}})->options.at("blocks") == std::vector<int64_t>{1, 1});
  CHECK(diffusion::detail::v1_backbone({{"backbone", "conv-small"}, {"widths", "32,64"}})->name == "convnet");
  CHECK(diffusion::detail::v1_backbone({{"backbone", "smol"}})->name == "smol_mlp");
  CHECK_FALSE(diffusion::detail::v1_backbone({{"note", "x"}}));
  // A preset's name with a partial config keeps the preset's shape (the seed's ChunkyMLP: 20,589,584).
  const auto count = [](const AnyBackbone& m) {
    int64_t n = 0;
    for (const auto& p : m->parameters()) n += p.numel();
    return n;
  };
  CHECK(count(make_backbone(*diffusion::detail::v1_backbone({{"backbone", "chunky"}}))) == 20589584);
  CHECK(count(make_backbone(BackboneConfig{"smol_mlp", {{"time_dim", 256}}})) == 1526288);
}

TEST_CASE("checkpoints refuse the wrong model, and every unreadable file is one error naming it",
          "[checkpoint][errors][faults]") {
  const auto dir = scratch("refuse");
  const auto path = trained_checkpoint(tiny_net(), dir / "run");
  ConvNet wider(ConvNetOptions().widths({16, 16}).time_dim(32));
  const auto before = torch::nn::utils::parameters_to_vector(wider->parameters()).clone();
  CHECK_REFUSED(load_weights(path, wider), "with shape");
  // Refused before anything changed: the model keeps its shapes and weights.
  CHECK(torch::equal(torch::nn::utils::parameters_to_vector(wider->parameters()), before));
  SmolMLP mlp;
  CHECK_REFUSED(load_weights(path, mlp), "(written for another backbone configuration?)");
  // Resuming an EMA run from another architecture's checkpoint is an error, not a crash in the EMA's scope.
  Trainer other(ConvNet(ConvNetOptions().widths({16, 16}).time_dim(32)), NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)),
                quiet().ema_decay(0.9));
  CHECK_REFUSED(other.load_checkpoint(path), "with shape");
  CHECK_REFUSED(read_checkpoint_info(dir / "missing.pt"), "missing.pt: no such file");
  CHECK_REFUSED(read_checkpoint_info(dir), " is not a regular file (a directory, a pipe?)");
  Trainer with_ema(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet().ema_decay(0.9));
  auto no_ema = dir / "no_ema.pt";
  Trainer plain(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet());
  plain.save_checkpoint(no_ema);
  CHECK_REFUSED(with_ema.load_checkpoint(no_ema), "has no EMA weights but this run keeps an EMA");
  // A file for a larger model (a second block, a class embedding) is as wrong as one for a smaller model:
  // refused by name before anything changes, not later in the optimizer's state as a "damaged" file.
  const NoiseSchedule short_schedule(NoiseScheduleOptions().num_timesteps(30));
  const auto unet = [](std::vector<int64_t> blocks, int64_t classes) {
    return UNet(UNetOptions().widths({8, 16}).blocks(std::move(blocks)).num_classes(classes));
  };
  auto larger = dir / "larger.pt";
  Trainer(unet({1, 2}, 0), short_schedule, quiet().ema_decay(0.9)).save_checkpoint(larger);
  Trainer smaller(unet({1, 1}, 0), short_schedule, quiet().ema_decay(0.9));
  CHECK_REFUSED(smaller.load_checkpoint(larger), "larger.pt holds 'mid1_1'");
  CHECK_REFUSED(smaller.load_checkpoint(larger), "which the model does not have (written for another backbone configuration?)");
  auto conditional = dir / "conditional.pt";
  Trainer(unet({1, 1}, 10), short_schedule, quiet()).save_checkpoint(conditional);
  auto model = unet({1, 1}, 0);
  CHECK_REFUSED(load_weights(conditional, model), "conditional.pt holds 'class_embedding");

  const auto good = file_bytes(path);
  const auto bad = dir / "bad.pt";
  const auto refused = [&](const std::string& bytes, const std::string& message) {
    put_bytes(bad, bytes);
    INFO(message);
    CHECK_REFUSED(read_checkpoint_info(bad), "checkpoint: " + bad.string() + message);
    auto model = tiny_net();
    CHECK_REFUSED(load_weights(bad, model), bad.string());
  };
  refused("", " is empty");
  refused(good.substr(0, good.size() / 2), " is truncated or not a checkpoint");
  refused("not a zip file at all, just text", " is truncated or not a checkpoint");
  // One byte changed anywhere (in a tensor's data, in the pickle, in the zip's directory): the checksum.
  for (const double where : {0.1, 0.5, 0.9}) {
    auto flipped = good;
    flipped[static_cast<size_t>(where * static_cast<double>(good.size()))] ^= 0x01;
    refused(flipped, " is damaged: its contents do not match the checksum written with it");
  }
  // The checksum comment stripped (the end record's comment length set to 0): refused, not read unverified.
  {
    const auto comment_at = good.rfind("diffusion-sha1:");
    REQUIRE(comment_at != std::string::npos);
    auto stripped = good.substr(0, comment_at);
    stripped[stripped.size() - 2] = stripped[stripped.size() - 1] = '\0';
    refused(stripped, " is damaged: it has format 2 but no checksum in its zip comment");
  }
  // A foreign archive: a zip LibTorch wrote that is not a checkpoint.
  torch::save(torch::ones({3}), bad.string());
  CHECK_REFUSED(read_checkpoint_info(bad), " is not a diffusion checkpoint (no format field)");
  // A format-1 file (no checksum) with a damaged pickle: still one clear error.
  auto old = file_bytes(fixtures / "format1_convnet.pt");
  const auto pkl = old.find("data.pkl");
  REQUIRE(pkl != std::string::npos);
  for (size_t i = pkl + 40; i < pkl + 80; ++i) old[i] = '\xff';
  put_bytes(bad, old);
  CHECK_REFUSED(read_checkpoint_info(bad), "checkpoint: " + bad.string() + " is damaged");
}

TEST_CASE("a checkpoint without a checksum (format 1) is verified by its zip CRC-32s", "[checkpoint][faults]") {
  const auto dir = scratch("crc");
  const auto old = file_bytes(fixtures / "format1_convnet.pt");
  const auto bad = dir / "old.pt";
  const auto end = diffusion::detail::find_zip_end(old);
  REQUIRE(end);
  CHECK_NOTHROW(diffusion::detail::check_zip_crcs(old, diffusion::detail::zip_entries(old, *end, "checkpoint: old.pt"), "checkpoint: old.pt"));
  // A changed byte in the first and the third tensor's data, and in the pickle. LibTorch itself reads all of these without a word (or, for the pickle,
  // with an internal assert or a 68 GB allocation: fuzz/seeds/checkpoint/regression-format1-*).
  // Each local header's name is followed by padding (up to 64 bytes), then the entry's data (256, 288
  // and 14,933 bytes).
  const auto name_end = [&](const std::string& name) { return old.find(name) + name.size(); };
  const auto directory = old.find("PK\x01\x02");
  REQUIRE(directory != std::string::npos);
  for (const size_t at : {name_end("data/0") + 100, name_end("data/2") + 100, name_end("data.pkl") + 100}) {
    auto changed = old;
    changed[at] ^= 0x10;
    put_bytes(bad, changed);
    INFO(at);
    if (diffusion::detail::can_check_zip_crcs) {
      CHECK_REFUSED(read_checkpoint_info(bad), "checkpoint: " + bad.string() + " is damaged: entry ");
      CHECK_REFUSED(read_checkpoint_info(bad), " does not match its CRC-32 (a changed byte)");
      auto model = ConvNet(ConvNetOptions().widths({8}).time_dim(8));
      CHECK_REFUSED(load_weights(bad, model), " does not match its CRC-32");
    }
  }
  // The directory's structure: an entry pointing past the data, a method LibTorch never writes, a cut directory.
  const auto directory_field = [&](size_t offset, uint32_t value, int bytes) {
    auto changed = old;
    for (int i = 0; i < bytes; ++i) changed[directory + offset + size_t(i)] = static_cast<char>(value >> (8 * i));
    put_bytes(bad, changed);
  };
  directory_field(42, uint32_t(directory - 10), 4);
  CHECK_REFUSED(read_checkpoint_info(bad), "has no local zip header where its directory entry points");
  directory_field(24, 0x7FFFFFFF, 4);
  CHECK_REFUSED(read_checkpoint_info(bad), "stored bytes for 2147483647 bytes of data");
  directory_field(10, 12, 2);
  CHECK_REFUSED(read_checkpoint_info(bad), "uses zip method 12, which LibTorch does not write");
  directory_field(10, 8, 2);  // stored bytes read as deflate data
  if (diffusion::detail::can_check_zip_crcs) CHECK_REFUSED(read_checkpoint_info(bad), "does not inflate to its recorded 256 bytes");
  {
    auto changed = old;
    changed.replace(*end + 10, 2, std::string("\xff\x7f", 2));  // 32,767 entries claimed
    put_bytes(bad, changed);
    CHECK_REFUSED(read_checkpoint_info(bad), "is damaged: zip central directory entry ");
  }
  // A checksum that matches does not make a crafted pickle safe: a string length of about 4 GB (what
  // fuzz_checkpoint found LibTorch's unpickler allocating and filling before it noticed the missing bytes)
  // in a resealed format-2 file is refused before LibTorch reads it.
  {
    Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet());
    const auto sealed = dir / "sealed.pt";
    trainer.save_checkpoint(sealed);
    auto bytes = file_bytes(sealed);
    // The attribute's name, then (after its memo PUT) the BINUNICODE that holds the JSON config.
    const auto config = bytes.find('X', bytes.find(std::string("X\x06\x00\x00\x00" "config", 11)) + 11);
    REQUIRE(config + 5 < bytes.size());
    REQUIRE(bytes[config + 5] == '{');
    bytes.replace(config + 1, 4, std::string("\x0d\x00\xff\xf6", 4));
    auto end = diffusion::detail::find_zip_end(bytes);
    REQUIRE(end);
    bytes.resize(*end + diffusion::detail::zip_end_record + std::string(diffusion::detail::checksum_tag).size());
    bytes.replace(*end + diffusion::detail::zip_end_record + diffusion::detail::checksum_tag.size(), std::string::npos,
                  diffusion::detail::archive_digest(bytes, *end));
    put_bytes(bad, bytes);
    CHECK_REFUSED(read_checkpoint_info(bad), "checkpoint: " + bad.string() + " is damaged: its entry ");
    CHECK_REFUSED(read_checkpoint_info(bad), "data.pkl: not a pickle this library can read (an opcode's argument runs past the end");
  }
  // An archive the running LibTorch writes (zip64 where it writes zip64) passes, and its changed byte does not.
  torch::serialize::OutputArchive archive;
  archive.write("x", torch::arange(1000, torch::kFloat32));
  std::string bytes;
  archive.save_to([&bytes](const void* data, size_t size) -> size_t {
    bytes.append(static_cast<const char*>(data), size);
    return size;
  });
  const auto bytes_end = diffusion::detail::find_zip_end(bytes);
  REQUIRE(bytes_end);
  const auto check = [&] {
    diffusion::detail::check_zip_crcs(bytes, diffusion::detail::zip_entries(bytes, *bytes_end, "checkpoint: fresh.pt"),
                                       "checkpoint: fresh.pt");
  };
  CHECK_NOTHROW(check());
  if (diffusion::detail::can_check_zip_crcs) {
    bytes[bytes.find("x/data/0") + 200] ^= 0x01;  // inside the 4,000 bytes of data behind its local header
    CHECK_REFUSED(check(), "checkpoint: fresh.pt is damaged: entry ");
  }
}

TEST_CASE("crafted checkpoints with a matching checksum are refused before LibTorch misreads them", "[checkpoint][faults]") {
  // tests/fixtures/crafted/make.py: a small format-2 checkpoint with one hostile edit each, rebuilt with
  // right CRC-32s and resealed. rebuilt.pt, the same without an edit, loads: the refusals are the edits'.
  const auto crafted = fixtures / "crafted";
  const auto refused = [&](const char* file, const std::string& message) {
    INFO(file);
    CHECK_REFUSED(read_checkpoint_info(crafted / file), "checkpoint: " + (crafted / file).string() + message);
  };
  CHECK(read_checkpoint_info(crafted / "rebuilt.pt").backbone.has_value());
  CHECK_NOTHROW(load_model(crafted / "rebuilt.pt"));
  // A 4 GB string length in a pickle LibTorch would allocate and fill first: deflated, or named data.PKL
  // (LibTorch finds entries ignoring case).
  refused("deflated_pickle.pt", " is damaged: its entry archive/data.pkl: not a pickle this library can read (an opcode's "
          "argument runs past the end at byte 31)");
  refused("pickle_name_case.pt", " is damaged: its entry archive/data.PKL: not a pickle");
  // Storage offsets of 20,000 elements: LibTorch would hand out views past each tensor's data.
  refused("tensor_offset.pt", " is damaged: tensor 'model.");
  CHECK_REFUSED(read_checkpoint_info(crafted / "tensor_offset.pt"), "' reaches past its data (offset 20000,");
  // A deflated record claiming 2 GiB, refused from the directory before anything is inflated.
  refused("zip_bomb.pt", " is damaged: entry archive/data/0 is deflated to ");
  CHECK_REFUSED(read_checkpoint_info(crafted / "zip_bomb.pt"), "from 2147483648, more than LibTorch ever deflates");
  // A persistent id LibTorch checks with an internal assert: reported without the "report a bug" text.
  refused("internal_assert.pt", " is damaged or not a LibTorch archive (LibTorch's reader found an inconsistency: ");
  CHECK_THROWS_WITH(read_checkpoint_info(crafted / "internal_assert.pt"),
                    !diffusion_test::contains("please report a bug"));
  // LibTorch's error texts as the reader reports them.
  CHECK(diffusion::detail::libtorch_reason("\n  \nUnexpected end of pickler archive.\nmore") == "Unexpected end of pickler archive.");
  CHECK(diffusion::detail::libtorch_reason("isTuple() INTERNAL ASSERT FAILED at \"x.cpp\":1, please report a bug to PyTorch.") ==
        "LibTorch's reader found an inconsistency: isTuple()");
  CHECK(diffusion::detail::libtorch_reason("") == "LibTorch gave no reason");
}

TEST_CASE("files torch::save wrote load with a checkpoint's checks (load_module_file, load_tensor_file)",
          "[checkpoint][faults]") {
  const auto dir = scratch("torch_save");
  torch::manual_seed(5);
  eval::LeNet saved;
  const auto net_path = (dir / "net.pt").string();
  torch::save(saved, net_path);
  eval::LeNet loaded;
  load_module_file(net_path, loaded, "classifier");
  CHECK(max_difference(snapshot(*saved), snapshot(*loaded)) == 0.0);

  const auto images = torch::rand({3, 1, 28, 28}) * 2 - 1;
  const auto images_path = (dir / "images.pt").string();
  torch::save(images, images_path);
  CHECK(torch::equal(load_tensor_file(images_path, "images"), images));

  // Another network's file, the wrong kind of file, a damaged one, none: each refused, naming the file as
  // what was asked for, and the module left as it was.
  const auto before = snapshot(*loaded);
  auto other = tiny_net();
  const auto other_path = (dir / "convnet.pt").string();
  torch::save(other, other_path);
  CHECK_REFUSED(load_module_file(other_path, loaded, "classifier"),
                "classifier: " + other_path + " holds 'time_mlp', which the model does not have");
  CHECK_REFUSED(load_module_file(images_path, loaded, "classifier"),
                "classifier: " + images_path + " holds '0', which the model does not have");
  CHECK_REFUSED(load_tensor_file(net_path, "images"), "images: " + net_path + " holds no tensor");
  auto changed = file_bytes(images_path);
  changed[changed.find("data/0") + 200] ^= 0x10;  // in the tensor's data
  const auto bad = dir / "bad.pt";
  put_bytes(bad, changed);
  if (diffusion::detail::can_check_zip_crcs) {
    CHECK_REFUSED(load_tensor_file(bad, "images"), "images: " + bad.string() + " is damaged: entry ");
  }
  put_bytes(bad, file_bytes(net_path).substr(0, 1000));
  CHECK_REFUSED(load_module_file(bad, loaded, "classifier"), "classifier: " + bad.string() +
                                                                " is truncated or not a LibTorch archive (no zip end record)");
  CHECK_REFUSED(load_tensor_file(dir / "missing.pt", "images"), "images: " + (dir / "missing.pt").string() + ": no such file");
  CHECK_REFUSED(load_tensor_file(dir, "images"), "is not a regular file");
  CHECK(max_difference(snapshot(*loaded), before) == 0.0);
}

TEST_CASE("a failed save keeps the previous checkpoint and leaves no temporary file", "[checkpoint][faults]") {
  const auto dir = scratch("fsize");
  Trainer trainer(tiny_net(), NoiseSchedule(NoiseScheduleOptions().num_timesteps(30)), quiet().ema_decay(0.9));
  const auto path = dir / "model.pt";
  trainer.save_checkpoint(path);
  const auto before = file_bytes(path);
  // A file-size limit below the checkpoint's size (what a full disk does to a write), SIGXFSZ ignored so
  // the write fails with EFBIG instead of killing the process.
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit old_limit{};
  getrlimit(RLIMIT_FSIZE, &old_limit);
  rlimit small = old_limit;
  small.rlim_cur = before.size() / 2;
  setrlimit(RLIMIT_FSIZE, &small);
  CHECK_REFUSED(trainer.save_checkpoint(path), "failed: File too large; the previous file (if any) is intact");
  setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  CHECK(file_bytes(path) == before);
  CHECK_FALSE(fs::exists(dir / "model.pt.tmp"));
  CHECK_NOTHROW(read_checkpoint_info(path));
  // A directory that cannot be created.
  write_bytes(dir / "a_file", {1});
  CHECK_REFUSED(trainer.save_checkpoint(dir / "a_file" / "model.pt"), "checkpoint: cannot create the directory");
}

TEST_CASE("option records refuse unknown kinds and fields, naming them", "[checkpoint][errors]") {
  CHECK_REFUSED(nlohmann::json({{"kind", "quadratic"}}).get<NoiseScheduleOptions>(),
                "parse_schedule_kind: expected \"linear\" or \"cosine\", got \"quadratic\"");
  CHECK_REFUSED(nlohmann::json({{"steps", 3}}).get<NoiseScheduleOptions>(), "NoiseScheduleOptions: unknown field \"steps\"");
  CHECK_REFUSED(nlohmann::json({{"width", 3}}).get<ConvNetOptions>(), "ConvNetOptions: unknown field \"width\"");
  CHECK_REFUSED(nlohmann::json({{"hiden", 3}}).get<MLPOptions>(), "MLPOptions: unknown field \"hiden\"");
  const auto s = nlohmann::json(NoiseScheduleOptions().kind(ScheduleKind::Cosine).num_timesteps(7).zero_terminal_snr(true))
                     .get<NoiseScheduleOptions>();
  CHECK(s.kind() == ScheduleKind::Cosine);
  CHECK(s.num_timesteps() == 7);
  CHECK(s.zero_terminal_snr());
  const auto u = nlohmann::json(UNetOptions().widths({8, 16}).blocks({2, 3}).patch(2).attention(false)).get<UNetOptions>();
  CHECK(u.widths() == std::vector<int64_t>{8, 16});
  CHECK(u.blocks() == std::vector<int64_t>{2, 3});
  CHECK(u.patch() == 2);
  CHECK_FALSE(u.attention());
}

namespace checkpoint_names {
// A backbone with a submodule whose name LibTorch's archives write but cannot read back.
struct KeywordNetImpl : torch::nn::Module {
  explicit KeywordNetImpl(std::string name) {
    block = register_module("block", torch::nn::Sequential());
    block->register_module(name, torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 1, 3).padding(1)));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor&) { return block->forward(x); }
  torch::nn::Sequential block{nullptr};
};
TORCH_MODULE(KeywordNet);
}  // namespace checkpoint_names

TEST_CASE("a model with a TorchScript keyword for a name is refused before training or writing", "[checkpoint][errors]") {
  using checkpoint_names::KeywordNet;
  const auto dir = scratch("keywords");
  const NoiseSchedule schedule(NoiseScheduleOptions().num_timesteps(30));
  // What LibTorch 1.13 writes for such a name and then fails to parse ("expected ident but found 'in'").
  for (const std::string name : {"in", "def", "class", "None", "return"}) {
    INFO(name);
    KeywordNet net(name);
    CheckpointContents c;
    c.model = net.ptr().get();
    c.schedule = schedule.options();
    CHECK_REFUSED(save_checkpoint(dir / "kw.pt", c), "the submodule 'block." + name + "' has the name '" + name +
                                                         "', a TorchScript keyword");
    CHECK_FALSE(fs::exists(dir / "kw.pt"));
    CHECK_REFUSED(Trainer(KeywordNet(name), schedule, quiet()), "Trainer: the submodule 'block." + name + "'");
  }
  // Parameters are held to the same rule; names that only look like keywords are fine, and load back.
  torch::nn::Module with_param;
  with_param.register_parameter("pass", torch::ones({2}));
  CHECK_REFUSED(diffusion::detail::check_archive_names(with_param, "save"), "save: the parameter 'pass'");
  for (const std::string name : {"lambda", "stem", "input", "in_"}) {
    INFO(name);
    KeywordNet net(name);
    CheckpointContents c;
    c.model = net.ptr().get();
    c.schedule = schedule.options();
    save_checkpoint(dir / "ok.pt", c);
    KeywordNet again(name);
    CHECK_NOTHROW(load_weights(dir / "ok.pt", again));
  }
}
