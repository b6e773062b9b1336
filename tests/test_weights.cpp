// Weights that Python reads, and the other way: safetensors and torch.save files.
#include "helpers.hpp"

#include <cstdlib>

namespace weights_helpers {

std::string read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// A safetensors file with `header` (JSON text) and `data` bytes.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  return out + header + data;
}

void put(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace weights_helpers
using namespace weights_helpers;

TEST_CASE("safetensors round trip every dtype, shape and the metadata", "[weights]") {
  const auto dir = scratch("safetensors");
  auto gen = make_generator(4);
  const NamedTensors tensors = {
      {"f32", torch::randn({2, 3}, gen)},
      {"f64", torch::randn({4}, gen, torch::kFloat64)},
      {"bf16", torch::randn({3, 1}, gen).to(torch::kBFloat16)},
      {"f16", torch::randn({2}, gen).to(torch::kFloat16)},
      {"i64", torch::arange(6).reshape({2, 3})},
      {"u8", torch::arange(5).to(torch::kUInt8)},
      {"bool", torch::tensor({true, false, true})},
      {"scalar", torch::full({}, 2.5)},
      {"empty", torch::zeros({0, 3})},
      {"strided", torch::arange(12, torch::kFloat32).reshape({3, 4}).t()},  // non-contiguous
  };
  save_safetensors(dir / "all.safetensors", tensors, {{"format", "pt"}, {"made_by", "test"}});
  std::map<std::string, std::string> metadata;
  const auto back = load_safetensors(dir / "all.safetensors", &metadata);
  REQUIRE(back.size() == tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    INFO(tensors[i].first);
    CHECK(back[i].first == tensors[i].first);  // file order is the writer's
    CHECK(back[i].second.scalar_type() == tensors[i].second.scalar_type());
    CHECK(torch::equal(back[i].second, tensors[i].second));
  }
  CHECK(metadata == std::map<std::string, std::string>{{"format", "pt"}, {"made_by", "test"}});
  CHECK(weights_metadata(dir / "all.safetensors") == metadata);
  // The layout: an 8-byte length, then a JSON header padded to 8 bytes.
  const auto bytes = read_all(dir / "all.safetensors");
  uint64_t n = 0;
  for (size_t i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  CHECK(n % 8 == 0);
  CHECK(bytes[8] == '{');
  CHECK(nlohmann::json::parse(bytes.substr(8, n)).at("f32").at("dtype") == "F32");
  CHECK_REFUSED(save_safetensors(dir / "x.safetensors", {{"a", torch::ones({1})}, {"a", torch::ones({1})}}),
                "the name 'a' appears twice");
  CHECK_REFUSED(save_safetensors(dir / "x.safetensors", {{"c", torch::ones({1}, torch::kComplexFloat)}}),
                "which safetensors cannot hold");
}

TEST_CASE("a bad safetensors file is refused, naming the file and the fault", "[weights][errors]") {
  const auto dir = scratch("safetensors_bad");
  const auto path = dir / "bad.safetensors";
  const auto refused = [&](const std::string& bytes, const std::string& message) {
    put(path, bytes);
    INFO(message);
    CHECK_REFUSED(load_safetensors(path), path.string() + message);
  };
  refused("abc", " is truncated (3 bytes, no header length)");
  refused(std::string("\xff\xff\xff\xff\x00\x00\x00\x00{}", 10), " is truncated or not safetensors");
  refused(safetensors_bytes("{not json", ""), " has a header that is not JSON");
  refused(safetensors_bytes("[1, 2]", ""), "'s header is not a JSON object");
  refused(safetensors_bytes(R"({"w": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}})", "x"),
          ": 'w' has dtype F8, which this library does not read");
  refused(safetensors_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", "abcd"),
          ": 'w' has shape [2] of F32 (8 bytes) but 4 bytes of data");
  refused(safetensors_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", "abcd"),
          ": 'w' has data_offsets outside the file's 4 bytes of data");
  refused(safetensors_bytes(R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}})", "abc"),
          "'s tensors overlap at byte 1 of the data");
  refused(safetensors_bytes(R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})", "ab"),
          "'s tensors leave a hole at byte 1 of the data");
  refused(safetensors_bytes(R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})", "ab"),
          " has 1 bytes after its last tensor");
  refused(safetensors_bytes(R"({"a": {"dtype": "U8", "shape": "x", "data_offsets": [0, 1]}})", "a"), " has a malformed header");
  // Dimensions whose product overflows 64 bits (2^32 x 2^32 x 2 x 4 bytes) cannot pass for a small range.
  refused(safetensors_bytes(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 2], "data_offsets": [0, 0]}})", ""),
          ": 'w' has shape [4294967296, 4294967296, 2] of F32 (more than 2^64 bytes) but 0 bytes of data");
  CHECK_REFUSED(load_safetensors(dir / "none.safetensors"), "none.safetensors: no such file");
}

TEST_CASE("export_weights and import_weights move a backbone's weights by name, a misfit changes nothing",
          "[weights]") {
  const auto dir = scratch("export");
  torch::manual_seed(1);
  auto source = tiny_net();
  export_weights(*source, dir / "conv.safetensors");
  torch::manual_seed(2);
  auto target = tiny_net();
  REQUIRE(max_difference(snapshot(*source), snapshot(*target)) > 0);
  import_weights(*target, dir / "conv.safetensors");
  CHECK(max_difference(snapshot(*source), snapshot(*target)) == 0.0);
  const auto names = load_safetensors(dir / "conv.safetensors");
  CHECK(names.front().first == "time_mlp.1.weight");  // the seed's parameter names

  // Another architecture: refused with the names, and the model keeps its weights.
  auto wider = ConvNet(ConvNetOptions().widths({8, 24}).time_dim(32));
  const auto before = snapshot(*wider);
  CHECK_REFUSED(import_weights(*wider, dir / "conv.safetensors"), "does not fit this model: other shapes enc2.conv1.weight");
  CHECK(max_difference(before, snapshot(*wider)) == 0.0);
  SmolMLP mlp;
  CHECK_REFUSED(import_weights(*mlp, dir / "conv.safetensors"), "missing fc1.weight");
  CHECK_REFUSED(import_weights(*mlp, dir / "conv.safetensors"), "not in the model ");
  CHECK_REFUSED(import_weights(*mlp, dir / "nothing.pt"), "nothing.pt: no such file");
  write_bytes(dir / "junk.pt", {'P', 'K', 3, 4, 0, 0});
  CHECK_REFUSED(import_weights(*mlp, dir / "junk.pt"), "junk.pt is not a file torch.save wrote, or is damaged");
  write_bytes(dir / "legacy.pt", {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc});  // a pre-1.6 torch.save: a bare pickle
  CHECK_REFUSED(import_weights(*mlp, dir / "legacy.pt"), "legacy.pt is a legacy torch.save file (a bare pickle, not a zip)");
  // A safetensors file whose header length's low byte is 0x80 (the legacy pickle's first byte) is safetensors.
  std::string header = R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  header.resize(0x80, ' ');
  std::vector<uint8_t> st{0x80, 0, 0, 0, 0, 0, 0, 0};
  st.insert(st.end(), header.begin(), header.end());
  st.insert(st.end(), {0, 0, 0x80, 0x3f});  // 1.0f
  write_bytes(dir / "low80.safetensors", st);
  CHECK(weights_metadata(dir / "low80.safetensors").empty());
  CHECK(load_safetensors(dir / "low80.safetensors").front().second.item<float>() == 1.0f);
  write_bytes(dir / "text.txt", {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '\n'});  // neither format
  CHECK_REFUSED(import_weights(*mlp, dir / "text.txt"), "text.txt is neither safetensors (a header length, then '{' at "
                "byte 8) nor a torch.save file (a zip), the two formats import_weights reads");
  CHECK_REFUSED(weights_metadata(dir / "text.txt"), "the two formats weights_metadata reads");
  // A write that cannot happen is an error naming the file, and leaves no temporary file behind.
  CHECK_REFUSED(export_weights(*source, dir / "conv.safetensors" / "inside.safetensors"), "save_safetensors: cannot create the directory");
  fs::create_directories(dir / "a_directory.safetensors");
  CHECK_REFUSED(export_weights(*source, dir / "a_directory.safetensors"), "a_directory.safetensors failed");
  CHECK_FALSE(fs::exists(dir / "a_directory.safetensors.tmp"));
  // A torch.save file of this library's own writing that is not a dict of tensors.
  torch::save(torch::ones({2}), (dir / "tensor.pt").string());
  CHECK_REFUSED(load_torch_state_dict(dir / "tensor.pt"), "tensor.pt");
  CHECK(weights_metadata(dir / "tensor.pt").empty());  // torch.save files carry none
}

TEST_CASE("the pickle rewrite refuses lengths past the end, even ones that wrap around", "[weights][errors]") {
  // BINBYTES8 with a length of 2^64 - 9: at + n wrapped to 0 and the walk started over, forever (found by
  // fuzz_pickle; fuzz/seeds/pickle/regression-binbytes8-length-wraps).
  const std::string wraps("\x8e\xf7\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x54", 13);
  CHECK_REFUSED(diffusion::detail::rewrite_ordered_dicts(wraps, "w.pt"),
                "w.pt: not a pickle this library can read (an opcode's argument runs past the end at byte 9)");
  const std::string short_binunicode("\x80\x02X\x05\x00\x00\x00" "abc.", 11);
  CHECK_REFUSED(diffusion::detail::rewrite_ordered_dicts(short_binunicode, "s.pt"), "an opcode's argument runs past the end");
  const std::string fine("\x80\x02X\x03\x00\x00\x00" "abc.", 11);
  CHECK(diffusion::detail::rewrite_ordered_dicts(fine, "f.pt") == fine);
  // LONG_BINPUT into slot 2^32 - 1: LibTorch's unpickler would fill every slot below it (68 GB).
  const std::string far_memo("\x80\x02X\x03\x00\x00\x00" "abcr\xff\xff\xff\xff.", 16);
  CHECK_REFUSED(diffusion::detail::check_pickle(far_memo, "m.pt"),
                "m.pt: not a pickle this library can read (a memo slot (4294967295) past those a pickle of this size can fill");
  // Lists nested 20,000 deep: LibTorch's unpickler would build and free them recursively.
  std::string deep("\x80\x02");
  for (int i = 0; i < 20000; ++i) deep += "](";
  CHECK_REFUSED(diffusion::detail::check_pickle(deep + "]", "d.pt"), "d.pt: not a pickle this library can read (values nested more than 10000 deep");
  const std::string near_memo("\x80\x02X\x03\x00\x00\x00" "abcr\x00\x00\x00\x00.", 16);
  CHECK_NOTHROW(diffusion::detail::check_pickle(near_memo, "n.pt"));
  // Lists nested 5,000 deep by single APPENDs: the rewrite inserts a MARK before each appended value, ever
  // further back (quadratic in the nesting); the check walks it once, writing nothing. Both must agree on
  // every input above.
  const std::string appends = "\x80\x02" + std::string(5000, ']') + std::string(4999, 'a') + ".";
  CHECK_NOTHROW(diffusion::detail::check_pickle(appends, "a.pt"));
  const auto rewritten = diffusion::detail::rewrite_ordered_dicts(appends, "a.pt");
  CHECK(rewritten.size() == appends.size() + 4999);  // each APPEND 'a' became MARK ... APPENDS 'e'
  const auto accepts = [](const auto& walk, const std::string& pickle) {
    try {
      walk(pickle);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  };
  for (const auto& pickle : {wraps, short_binunicode, fine, far_memo, deep + "]", near_memo, appends}) {
    CHECK(accepts([](const std::string& p) { diffusion::detail::check_pickle(p, "x"); }, pickle) ==
          accepts([](const std::string& p) { (void)diffusion::detail::rewrite_ordered_dicts(p, "x"); }, pickle));
  }
}

TEST_CASE("python interop: the seed's PyTorch weights load into the C++ ConvNet and give its output", "[python]") {
  // Run by the CTest python.cpp after tests/python/interop.py wrote the files (DIFFUSION_INTEROP_DIR).
  const char* dir_env = std::getenv("DIFFUSION_INTEROP_DIR");
  REQUIRE(dir_env != nullptr);
  const fs::path dir(dir_env);
  const auto io = load_safetensors(dir / "io.safetensors");
  REQUIRE(io.size() == 3);
  const auto& x = io[0].second;
  const auto& t = io[1].second;
  const auto& y = io[2].second;
  for (const auto* file : {"seed_sd.pt", "seed_ckpt.pt", "seed.safetensors"}) {
    INFO(file);
    ConvNet model;  // the seed's architecture, C++ initialization
    import_weights(*model, dir / file);
    model->eval();
    torch::NoGradGuard no_grad;
    CHECK((model(x, t) - y).abs().max().item<double>() <= 1e-5);
  }
  // And the other way: C++ weights and the C++ output, for interop.py check.
  torch::manual_seed(5);
  ConvNet cpp;
  cpp->eval();
  export_weights(*cpp, dir / "cpp.safetensors");
  torch::NoGradGuard no_grad;
  save_safetensors(dir / "cpp_io.safetensors", {{"x", x}, {"t", t}, {"y", cpp(x, t)}});
  // NumPy's .npy files and a torch.save dict of training data; and a .npy file for np.load.
  const auto values = torch::arange(24, torch::kFloat64).reshape({4, 2, 3}) * 0.25 - 3;
  for (const auto* dtype : {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8"}) {
    INFO(dtype);
    const auto file = data::load_tensor_file(dir / (std::string("points_") + dtype + ".npy"));
    const bool integer = std::string(dtype).find("int") != std::string::npos;
    CHECK(torch::equal(file.examples, (integer ? torch::arange(24, torch::kFloat64).reshape({4, 2, 3}) : values).to(torch::kFloat32)));
  }
  CHECK(torch::equal(data::load_npy(dir / "points_fortran.npy"), values));
  const auto pt = data::load_tensor_file(dir / "points.pt", data::TensorFileOptions().labels(true));
  CHECK(torch::equal(pt.examples, values.to(torch::kFloat32)));
  CHECK(torch::equal(pt.labels, torch::tensor({0, 1, 1, 2}, torch::kLong)));
  data::save_npy(dir / "cpp_points.npy", torch::arange(12, torch::kFloat32).reshape({3, 4}) / 8);
}
