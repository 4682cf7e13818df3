// engine/io: safetensors reader/writer, sharded checkpoints, HF config.json. Torch-free.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "engine/io/hf_config.hpp"
#include "engine/io/safetensors.hpp"

using namespace mmoc::io;
namespace fs = std::filesystem;

namespace {
const std::string kFix = std::string(MMOC_FIXTURES_DIR) + "/hf-tiny/";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

std::vector<std::byte> image(const std::string& header, std::size_t data_bytes, uint64_t claimed_len = UINT64_MAX) {
  uint64_t n = claimed_len == UINT64_MAX ? header.size() : claimed_len;
  std::vector<std::byte> v(8 + header.size() + data_bytes, std::byte{0x5a});
  std::memcpy(v.data(), &n, 8);
  std::memcpy(v.data() + 8, header.data(), header.size());
  return v;
}
std::string corrupt(const std::string& header, std::size_t data_bytes, uint64_t claimed_len = UINT64_MAX) {
  return error_of([&] { SafetensorsFile::from_bytes(image(header, data_bytes, claimed_len), "bad.safetensors"); });
}

struct TmpDir {
  fs::path p;
  TmpDir() {
    p = fs::temp_directory_path() / ("mmoc_io_test." + std::to_string(::getpid()) + "." + std::to_string(rand()));
    fs::create_directories(p);
  }
  ~TmpDir() { fs::remove_all(p); }
};
std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
}  // namespace

TEST_CASE("safetensors: write then read back every dtype, metadata, atomic rename") {
  TmpDir d;
  std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, 1e-30f, -7.0f};
  std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x7f80};
  std::vector<uint16_t> f16 = {0x3c00, 0x4000};
  std::vector<int64_t> i64 = {1, -2, 1LL << 40};
  std::vector<int32_t> i32 = {7, -8};
  std::vector<TensorToWrite> t = {
      {"a.f32", DType::F32, {2, 3}, f32.data(), f32.size() * 4},
      {"b.bf16", DType::BF16, {3}, bf16.data(), bf16.size() * 2},
      {"c.f16", DType::F16, {2, 1}, f16.data(), f16.size() * 2},
      {"d.i64", DType::I64, {3}, i64.data(), i64.size() * 8},
      {"e.i32", DType::I32, {2}, i32.data(), i32.size() * 4},
      {"f.empty", DType::F32, {0, 4}, nullptr, 0},
      {"g.scalar", DType::F32, {}, f32.data(), 4},
  };
  const auto path = (d.p / "x.safetensors").string();
  write_safetensors(path, t);
  for (auto& e : fs::directory_iterator(d.p)) CHECK(e.path().filename() == "x.safetensors");  // no temporaries left
  auto f = SafetensorsFile::open(path);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.tensors().size() == t.size());
  for (auto& w : t) {
    const auto& ti = f.at(w.name);
    CHECK(ti.dtype == w.dtype);
    CHECK(ti.shape == w.shape);
    auto bytes = f.data(ti);
    REQUIRE(bytes.size() == w.nbytes);
    if (w.nbytes) CHECK(std::memcmp(bytes.data(), w.data, w.nbytes) == 0);
  }
  CHECK(f.at("g.scalar").numel() == 1);
  CHECK(f.at("f.empty").numel() == 0);
  // header padded to 8 bytes like the reference writer
  uint64_t n = 0;
  std::memcpy(&n, slurp(path).data(), 8);
  CHECK(n % 8 == 0);
  // in-memory serialisation is the same bytes
  auto img = serialize_safetensors(t);
  std::string s = slurp(path);
  CHECK(img.size() == s.size());
  CHECK(std::memcmp(img.data(), s.data(), s.size()) == 0);
  // overwrite in place works (rename over)
  write_safetensors(path, {t[0]}, {});
  auto g = SafetensorsFile::open(path);
  CHECK(g.tensors().size() == 1);
  CHECK(g.metadata().empty());
  CHECK(has(error_of([&] { g.at("nope"); }), "nope"));
  // writer refuses inconsistent input
  CHECK(has(error_of([&] { write_safetensors(path, {{"z", DType::F32, {3}, f32.data(), 8}}); }), "'z'"));
  CHECK(has(error_of([&] { write_safetensors(path, {t[0], t[0]}); }), "twice"));
}

TEST_CASE("safetensors: reads HF's files; sharded index equals the single file") {
  auto single = Checkpoint::open(kFix + "llama-gqa-fp32");
  auto sharded = Checkpoint::open(kFix + "llama-gqa-fp32-sharded");
  CHECK_FALSE(single.sharded());
  CHECK(sharded.sharded());
  CHECK(single.names().size() == 4 * 9 + 3);
  CHECK(single.names() == sharded.names());
  for (auto& n : single.names()) {
    auto a = single.data(n), b = sharded.data(n);
    REQUIRE(a.size() == b.size());
    CHECK(std::memcmp(a.data(), b.data(), a.size()) == 0);
    CHECK(single.info(n).shape == sharded.info(n).shape);
  }
  CHECK(single.info("model.embed_tokens.weight").shape == std::vector<int64_t>{101, 64});
  auto bf = Checkpoint::open(kFix + "llama-gqa-bf16");
  CHECK(bf.info("lm_head.weight").dtype == DType::BF16);
  CHECK(bf.file_of("lm_head.weight").metadata().at("format") == "pt");
  auto tied = Checkpoint::open(kFix + "llama-tied-mha-fp32");
  CHECK_FALSE(tied.contains("lm_head.weight"));
  CHECK(has(error_of([&] { single.info("model.nope"); }), "model.nope"));
}

TEST_CASE("safetensors: corrupt files throw clear errors") {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  CHECK(corrupt(ok, 8).empty());
  CHECK(has(corrupt(ok, 7), "extend past the data section"));                     // truncated data
  CHECK(has(corrupt(ok, 7), "bad.safetensors"));                                   // names the file
  CHECK(has(corrupt(ok, 0, 1000), "header length 1000 extends past the end"));    // header length past EOF
  CHECK(has(corrupt(ok, 0, uint64_t(1) << 63), "extends past the end"));          // huge length, no overflow
  CHECK(has(error_of([] { SafetensorsFile::from_bytes(std::vector<std::byte>(5), "tiny"); }), "truncated"));
  CHECK(has(corrupt("", 0), "header length is 0"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8), "not valid JSON"));  // bad JSON
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}, "a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16), "twice"));
  CHECK(has(corrupt(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), "unsupported dtype 'Q4'"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12"));  // wrong size
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8), "non-negative"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", 8), "overflow"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "not ordered"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "pair"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8), "pair"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
            "overlap"));
  CHECK(has(corrupt(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "'dtype'"));
  CHECK(has(corrupt(R"({"a":[1,2]})", 8), "not an object"));
  CHECK(has(corrupt(R"({"__metadata__":{"format":3}})", 0), "__metadata__"));
  CHECK(has(corrupt(R"([1,2,3])", 0), "does not start with '{'"));
  CHECK(has(corrupt(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}})", 8), "extend past"));
}

TEST_CASE("safetensors: truncated file on disk, missing shard, index inconsistencies") {
  TmpDir d;
  std::vector<float> x(16, 1.0f);
  auto p = (d.p / "model.safetensors").string();
  write_safetensors(p, {{"w", DType::F32, {16}, x.data(), 64}});
  fs::resize_file(p, fs::file_size(p) - 3);
  auto e = error_of([&] { SafetensorsFile::open(p); });
  CHECK(has(e, p));
  CHECK(has(e, "truncated"));
  fs::resize_file(p, 4);
  CHECK(has(error_of([&] { SafetensorsFile::open(p); }), "shorter than the 8-byte header"));
  CHECK(has(error_of([&] { SafetensorsFile::open((d.p / "missing.safetensors").string()); }), "cannot open"));
  // sharded: index names a missing shard / a tensor its shard lacks / shard holds an unlisted tensor
  fs::remove(p);
  write_safetensors((d.p / "s1.safetensors").string(), {{"w", DType::F32, {16}, x.data(), 64}, {"v", DType::F32, {1}, x.data(), 4}});
  auto idx = d.p / "model.safetensors.index.json";
  write_file_atomic(idx.string(), R"({"weight_map":{"w":"s1.safetensors","u":"s2.safetensors"}})");
  CHECK(has(error_of([&] { Checkpoint::open(d.p.string()); }), "shard 's2.safetensors'"));
  write_file_atomic(idx.string(), R"({"weight_map":{"w":"s1.safetensors","u":"s1.safetensors","v":"s1.safetensors"}})");
  CHECK(has(error_of([&] { Checkpoint::open(d.p.string()); }), "'u'"));
  write_file_atomic(idx.string(), R"({"weight_map":{"w":"s1.safetensors"}})");
  CHECK(has(error_of([&] { Checkpoint::open(d.p.string()); }), "'v' is not listed"));
  write_file_atomic(idx.string(), R"({"weight_map":{"w":"../s1.safetensors"}})");
  CHECK(has(error_of([&] { Checkpoint::open(d.p.string()); }), "not a file in the checkpoint folder"));
  write_file_atomic(idx.string(), R"({"weight_map":)");
  CHECK(has(error_of([&] { Checkpoint::open(d.p.string()); }), "not valid JSON"));
  write_file_atomic(idx.string(), R"({"weight_map":{"w":"s1.safetensors","v":"s1.safetensors"}})");
  CHECK(Checkpoint::open(d.p.string()).names() == std::vector<std::string>{"v", "w"});
  fs::remove(idx);
  fs::remove(d.p / "s1.safetensors");
  CHECK(has(error_of([&] { Checkpoint::open(d.p.string()); }), "no model.safetensors"));
}

TEST_CASE("hf config: parse fixtures, both rope spellings, round trip, rejects unsupported") {
  auto c = read_hf_config(kFix + "llama-gqa-fp32");
  CHECK(c.arch.layers == 4);
  CHECK(c.arch.hidden == 64);
  CHECK(c.arch.ffn == 176);
  CHECK(c.arch.heads == 4);
  CHECK(c.arch.kv_heads == 2);
  CHECK(c.arch.vocab == 101);
  CHECK(c.arch.norm_eps == 1e-6);
  CHECK(c.arch.rope_theta == 10000.0);
  CHECK_FALSE(c.arch.tied_embeddings);
  CHECK(c.dtype == "float32");
  CHECK(c.arch.name == "llama-gqa-fp32");
  CHECK(c.max_position_embeddings == 64);
  auto t = read_hf_config(kFix + "llama-tied-mha-fp32/config.json");
  CHECK(t.arch.tied_embeddings);
  CHECK(t.arch.kv_heads == 4);
  CHECK(read_hf_config(kFix + "llama-gqa-bf16").dtype == "bfloat16");

  // LLaMA-2 style: top-level rope_theta, torch_dtype, no num_key_value_heads
  auto l2 = parse_hf_config(R"({"model_type":"llama","hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,
      "num_attention_heads":32,"vocab_size":32000,"rms_norm_eps":1e-05,"rope_theta":500000.0,"rope_scaling":null,
      "torch_dtype":"float16","tie_word_embeddings":false,"eos_token_id":[2,3]})");
  CHECK(l2.arch.kv_heads == 32);
  CHECK(l2.arch.rope_theta == 500000.0);
  CHECK(l2.arch.norm_eps == 1e-5);
  CHECK(l2.dtype == "float16");
  CHECK(l2.eos_token_id == 2);
  // transformers 5 wins when both are present
  auto both = parse_hf_config(R"({"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,
      "vocab_size":5,"rope_theta":1.0,"rope_parameters":{"rope_theta":77.0,"rope_type":"default"}})");
  CHECK(both.arch.rope_theta == 77.0);

  // round trip
  auto text = hf_config_json(c);
  auto back = parse_hf_config(text);
  back.arch.name = c.arch.name;
  CHECK(back.arch == c.arch);
  CHECK(back.dtype == c.dtype);
  CHECK(back.max_position_embeddings == 64);
  auto j = nlohmann::json::parse(text);
  CHECK(j["rope_parameters"]["rope_theta"] == 10000.0);
  CHECK(j["rope_theta"] == 10000.0);
  CHECK(j["architectures"][0] == "LlamaForCausalLM");
  TmpDir d;
  write_hf_config(d.p.string(), t);
  CHECK(read_hf_config(d.p.string()).arch.tied_embeddings);
  CHECK(fs::exists(d.p / "generation_config.json"));

  const std::string base = R"("hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":5)";
  auto err = [&](const std::string& extra) { return error_of([&] { parse_hf_config("{" + base + extra + "}", "cfg.json"); }); };
  CHECK(err("").empty());
  CHECK(has(err(R"(,"rope_scaling":{"rope_type":"llama3","factor":8.0})"), "llama3"));
  CHECK(has(err(R"(,"rope_parameters":{"rope_type":"yarn","rope_theta":1.0})"), "yarn"));
  CHECK(has(err(R"(,"num_key_value_heads":3)"), "num_key_value_heads"));
  CHECK(has(err(R"(,"head_dim":7)"), "head_dim"));                 // odd: no rotary halves
  CHECK(has(err(R"(,"model_type":"gemma")"), "model_type 'gemma'"));  // families: arch/hf_config.hpp, tests/model/test_families.cpp
  CHECK(has(err(R"(,"hidden_act":"gelu")"), "gelu"));
  CHECK(has(err(R"(,"attention_bias":true)"), "attention_bias"));
  CHECK(has(err(R"(,"vocab_size":"x")"), "vocab_size"));
  CHECK(has(error_of([] { parse_hf_config(R"({"hidden_size":8})", "cfg.json"); }), "cfg.json: missing 'intermediate_size'"));
  CHECK(has(error_of([] { parse_hf_config("{", "cfg.json"); }), "not valid JSON"));
}
