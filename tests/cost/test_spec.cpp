// Model / hardware / job descriptions: parameter counts against published numbers and the HF fixtures'
// safetensors headers, FLOP sanity, input errors.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "arch/arch.hpp"
#include "common/size.hpp"
#include "cost/spec.hpp"

using namespace mmoc;
static const std::string kConfigs = MMOC_TEST_CONFIGS;
static const std::string kFixtures = MMOC_TEST_FIXTURES;

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "<no InputError>";
}
// Total element count of all tensors in a safetensors file (header only): an independent parameter count.
int64_t safetensors_params(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  std::string hdr(n, '\0');
  in.read(hdr.data(), (std::streamsize)n);
  auto j = nlohmann::json::parse(hdr);
  int64_t total = 0;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    int64_t e = 1;
    for (auto& d : (*it)["shape"]) e *= d.get<int64_t>();
    total += e;
  }
  return total;
}
}  // namespace

TEST_CASE("published parameter counts") {
  auto m7 = load_model("llama2-7b", kConfigs);
  auto m13 = load_model("llama2-13b", kConfigs);
  auto m3 = load_model("llama3-8b", kConfigs);
  // HF model cards / num_parameters(): 6,738,415,616; 13,015,864,320; 8,030,261,248.
  CHECK(std::abs(m7.total_params() / 6.738415616e9 - 1) < 0.005);
  CHECK(std::abs(m13.total_params() / 13.015864320e9 - 1) < 0.005);
  CHECK(std::abs(m3.total_params() / 8.030261248e9 - 1) < 0.005);
  CHECK(m7.total_params() == 6738415616LL);
  CHECK(m13.total_params() == 13015864320LL);
  CHECK(m3.total_params() == 8030261248LL);
  CHECK(m7.layer_params(1) == 202383360LL);  // FACTS.md: 202.4M per decoder layer
  CHECK(m7.num_model_layers() == 34);
  CHECK(arch::head_dim(m3) == 128);
}

TEST_CASE("tiny models match the HF fixtures") {
  for (auto [name, dir] : {std::pair{"tiny-gqa", "llama-gqa-fp32"}, std::pair{"tiny-tied", "llama-tied-mha-fp32"}}) {
    CAPTURE(name);
    auto m = load_model(name, kConfigs);
    std::string fx = kFixtures + "/hf-tiny/" + dir;
    auto hf = load_model(fx + "/config.json", kConfigs);  // HF config.json is accepted too
    CHECK(m.layers == hf.layers);
    CHECK(m.hidden == hf.hidden);
    CHECK(m.ffn == hf.ffn);
    CHECK(m.heads == hf.heads);
    CHECK(m.kv_heads == hf.kv_heads);
    CHECK(m.vocab == hf.vocab);
    CHECK(m.norm_eps == hf.norm_eps);
    CHECK(m.rope_theta == hf.rope_theta);
    CHECK(m.tied_embeddings == hf.tied_embeddings);
    CHECK(m.max_seq == hf.max_seq);
    CHECK(m.total_params() == safetensors_params(fx + "/model.safetensors"));
  }
  auto t8 = load_model("tiny-8l", kConfigs);
  CHECK(t8.layers == 8);
  CHECK(t8.kv_heads == 2);
}

TEST_CASE("FLOPs: ~6*N*tokens, attention grows with seq^2") {
  auto m = load_model("llama2-7b", kConfigs);
  for (int seq : {128, 1024}) {
    double total = 0;
    for (int l = 0; l < m.num_model_layers(); ++l) total += m.layer_fwd_flops(l, 2, seq) + m.layer_bwd_flops(l, 2, seq);
    double ref = 6.0 * m.total_params() * 2 * seq;
    CAPTURE(seq);
    CHECK(total / ref > 0.94);  // the embedding gather is not a matmul (3.9% of N)
    CHECK(total / ref < 1.10);  // attention adds a few % at these lengths
  }
  // attention part: fwd(2*seq) - 2*fwd(seq) = 2*mbs*(4-2)*seq^2*hidden (causal half of 4*mbs*seq^2*h)
  double a = m.layer_fwd_flops(1, 1, 2048) - 2 * m.layer_fwd_flops(1, 1, 1024);
  CHECK(a == doctest::Approx(2.0 * 2.0 * 1024.0 * 1024.0 * 4096.0));
  CHECK(m.layer_bwd_flops(5, 4, 512) == doctest::Approx(2 * m.layer_fwd_flops(5, 4, 512)));
  CHECK(m.layer_fwd_flops(0, 1, 128) == 0);
}

TEST_CASE("memory formulas") {
  auto m = load_model("llama2-7b", kConfigs);
  const int64_t T = 8 * 1024;
  CHECK(m.layer_output_bytes(0, 8, 1024, 2) == T * 4096 * 2);
  CHECK(m.layer_output_bytes(33, 8, 1024, 2) == 0);
  CHECK(m.layer_stash_bytes(3, 8, 1024, true, 2) == 0);
  int64_t st = m.layer_stash_bytes(3, 8, 1024, false, 2);
  CHECK(st > 13 * T * 4096 * 2);  // ~14.1 hidden-sized tensors per token (6 x hidden + 3 x ffn)
  CHECK(st < 15 * T * 4096 * 2);
  // selective recompute inside the layer: the SwiGLU's product (ffn per token) not kept; only on decoder layers, not
  // under tensor parallelism, not for GPT-2; recomputing it costs a little of the backward
  CHECK(st - m.layer_stash_bytes(3, 8, 1024, false, 2, true) == T * 11008 * 2);
  CHECK(m.layer_stash_bytes(33, 8, 1024, false, 2, true) == m.layer_stash_bytes(33, 8, 1024, false, 2));
  CHECK_FALSE(m.layer_can_select(0));
  CHECK_FALSE(m.layer_can_select(33));
  const ModelSpec m2 = with_tp(m, 2);
  CHECK_FALSE(m2.layer_can_select(3));
  CHECK(m2.layer_stash_bytes(3, 8, 1024, false, 2, true) == m2.layer_stash_bytes(3, 8, 1024, false, 2));
  CHECK_FALSE(load_model("gpt2-xl", kConfigs).layer_can_select(3));
  {
    const HardwareSpec hw = load_hardware("h200x1", kConfigs);
    CostModel cm{m, hw, 2}, cm2{m2, hw, 2};
    const double sel = cm.layer_selective_ms(3, 8, 1024);
    CHECK(sel > 0.0);
    CHECK(sel < 0.05 * cm.layer_bwd_ms(3, 8, 1024));
    CHECK(cm.layer_selective_ms(33, 8, 1024) == 0.0);
    CHECK(cm2.layer_selective_ms(3, 8, 1024) == 0.0);
  }
  CHECK(m.layer_fwd_workspace(33, 8, 1024, 2) >= T * 32000 * 4);   // fp32 logits
  CHECK(m.layer_bwd_workspace(33, 8, 1024, 2) >= 2 * T * 32000 * 4);
  auto t = load_model("tiny-tied", kConfigs);
  CHECK(t.layer_params(t.layers + 1) == t.hidden);  // tied: only the final norm
  auto a = m.arch();
  CHECK(a.name == "llama2-7b");
  CHECK(a.ffn == 11008);
}

TEST_CASE("hardware configs load") {
  for (auto name : {"l20x4", "h100x1", "h200x1", "h200x2"}) {
    CAPTURE(name);
    auto hw = load_hardware(name, kConfigs);
    CHECK(hw.name == name);
    CHECK(hw.gpus >= 1);
    for (int g = 0; g < hw.gpus; ++g) CHECK(hw.group_of(g) >= 0);
  }
  auto l20 = load_hardware("l20x4", kConfigs);
  CHECK(l20.gpus == 4);
  CHECK(l20.group_of(0) == l20.group_of(1));
  CHECK(l20.group_of(0) != l20.group_of(2));
  CHECK(l20.gpu_mem_gib == doctest::Approx(48e9 / GiB).epsilon(0.01));
  auto h2 = load_hardware("h200x2", kConfigs);
  CHECK(h2.group_of(0) != h2.group_of(1));
}

TEST_CASE("input errors name the problem") {
  CHECK(error_of([] { load_model("llama9-1b", kConfigs); }).find("llama2-7b") != std::string::npos);  // lists available
  CHECK(error_of([] { load_model("llama9-1b", kConfigs); }).find("llama9-1b") != std::string::npos);
  CHECK(error_of([] { load_hardware("nope", kConfigs); }).find("l20x4") != std::string::npos);
  CHECK(error_of([] { parse_model(R"({"layers":2,"hidden":64,"ffn":8,"heads":4,"vocab":9,"colour":1})", "m.json"); })
            .find("colour") != std::string::npos);
  CHECK(error_of([] { parse_model(R"({"layers":2,"hidden":63,"ffn":8,"heads":4,"vocab":9})", "m.json"); }).find("divisible") !=
        std::string::npos);
  CHECK(error_of([] { parse_hardware(R"({"gpus":2,"host_groups":[[0,5]]})", "hw.json"); }).find("GPU 5") != std::string::npos);
  CHECK(error_of([] { parse_hardware(R"({"gpus":2,"pcie":3})", "hw.json"); }).find("pcie") != std::string::npos);
  auto hw = parse_hardware(R"({"gpus":1,"calibrated_ms":{"model=x,layer=decoder.fwd,mbs=1,seq=8":0.5}})", "hw.json");
  CHECK(hw.calibrated_ms.size() == 1);
}

TEST_CASE("parse_job") {
  auto j = parse_job(R"({"model":"llama2-7b","hardware":"l20x4","gpus":4,"v":"auto","budget_gib":20.5,
    "micro_batch_size":8,"microbatches":8,"seq_len":128,"schedule":"grouped","recompute":"on","offload":"all",
    "cross_map":"auto","dp":1,"comment":"seed",
    "train":{"precision":"bf16","lr":2e-5,"beta1":0.9,"beta2":0.95,"eps":1e-8,"weight_decay":0.1,"max_grad_norm":1.0,
             "lr_schedule":"cosine","warmup_steps":10,"total_steps":100,"seed":7}})",
                     "job.json");
  CHECK(j.model == "llama2-7b");
  CHECK(j.gpus == 4);
  CHECK(j.v == "auto");
  CHECK(j.budget_gib == 20.5);
  CHECK(j.micro_batch_size == 8);
  CHECK(j.recompute == "on");
  CHECK(j.train.lr == 2e-5);
  CHECK(j.train.beta2 == 0.95);
  CHECK(j.train.weight_decay == 0.1);
  CHECK(j.train.max_grad_norm == 1.0);
  CHECK(j.train.lr_schedule == "cosine");
  CHECK(j.train.total_steps == 100);
  CHECK(j.train.seed == 7);
  CHECK(parse_job(R"({"v":2})", "j").v == "2");
  // data-parallel gradient buckets: MiB, default 25, 0 = one per stage, negative refused naming the key
  CHECK(parse_job(R"({})", "j").bucket_mib == 25);
  CHECK(parse_job(R"({"bucket_mib":0})", "j").bucket_mib == 0);
  CHECK(parse_job(R"({"bucket_mib":0.5})", "j").bucket_mib == 0.5);
  CHECK(error_of([] { parse_job(R"({"bucket_mib":-1})", "job.json"); }).find("'bucket_mib'") != std::string::npos);

  auto e1 = error_of([] { parse_job(R"({"gpus":2,"microbatch":4})", "job.json"); });
  CHECK(e1.find("unknown key 'microbatch'") != std::string::npos);
  CHECK(e1.find("job.json") != std::string::npos);
  auto e2 = error_of([] { parse_job(R"({"gpus":"four"})", "job.json"); });
  CHECK(e2.find("'gpus'") != std::string::npos);
  CHECK(e2.find("integer") != std::string::npos);
  auto e3 = error_of([] { parse_job(R"({"gpus":2,)", "job.json"); });
  CHECK(e3.find("invalid JSON") != std::string::npos);
  auto e4 = error_of([] { parse_job(R"({"train":{"lr":"fast"}})", "job.json"); });
  CHECK(e4.find("'lr'") != std::string::npos);
  auto e5 = error_of([] { parse_job(R"({"train":{"momentum":0.9}})", "job.json"); });
  CHECK(e5.find("momentum") != std::string::npos);
  auto e6 = error_of([] { parse_job(R"({"schedule":"zigzag"})", "job.json"); });
  CHECK(e6.find("zigzag") != std::string::npos);
  auto e7 = error_of([] { parse_job(R"({"v":"many"})", "job.json"); });
  CHECK(e7.find("'v'") != std::string::npos);
  CHECK(error_of([] { load_job("/nonexistent/job.json"); }).find("/nonexistent/job.json") != std::string::npos);
}

TEST_CASE("default_configs_dir honours MMOC_CONFIGS") {
  const char* old = std::getenv("MMOC_CONFIGS");
  std::string saved = old ? old : "";
  setenv("MMOC_CONFIGS", "/some/where", 1);
  CHECK(default_configs_dir() == "/some/where");
  unsetenv("MMOC_CONFIGS");
  auto d = default_configs_dir();
  CHECK(std::filesystem::is_directory(std::filesystem::path(d) / "models"));
  if (old) setenv("MMOC_CONFIGS", saved.c_str(), 1);
}

TEST_CASE("model families: published parameter counts, mmoc's format, cost per layer kind") {
  // HF num_parameters() of the published checkpoints (configs/models/*.json name the config.json each comes from).
  const std::pair<const char*, int64_t> published[] = {
      {"llama3.1-8b", 8030261248LL}, {"llama3.2-3b", 3212749824LL}, {"qwen2.5-7b", 7615616512LL},
      {"qwen2.5-3b", 3085938688LL},  {"qwen3-8b", 8190735360LL},    {"mistral-7b", 7241732096LL},
      {"gpt2-xl", 1557611200LL},     {"codellama-34b", 33743970304LL}};
  for (auto [name, n] : published) {
    CAPTURE(std::string(name));
    auto m = load_model(name, kConfigs);
    CHECK(m.total_params() == n);
    // forward + backward ~ 6 N T (the embedding gather is no matmul; attention adds a little at seq 1024)
    double total = 0;
    for (int l = 0; l < m.num_model_layers(); ++l) total += m.layer_fwd_flops(l, 1, 1024) + m.layer_bwd_flops(l, 1, 1024);
    const double emb = (double)m.layer_params(0);
    CHECK(total / (6.0 * (m.total_params() - (m.tied_embeddings ? 0 : emb)) * 1024) > 0.97);
    CHECK(total / (6.0 * m.total_params() * 1024) < 1.25);
  }
  auto q = load_model("qwen2.5-7b", kConfigs);
  CHECK(q.family == "qwen2");
  CHECK(q.qkv_bias);
  CHECK(q.layer_params(1) == 233057792LL);  // 3584*(3584+2*512+3584) + 3*3584*18944 + (3584+2*512) biases + 2*3584
  auto q3 = load_model("qwen3-8b", kConfigs);
  CHECK(q3.qk_norm);
  CHECK(q3.layer_params(1) - (2LL * 4096 * 4096 + 2LL * 4096 * 1024 + 3LL * 4096 * 12288 + 2 * 4096) == 2 * 128);
  auto l3 = load_model("llama3.2-3b", kConfigs);
  CHECK(l3.tied_embeddings);
  CHECK(l3.rope_type == "llama3");
  CHECK(l3.rope_factor == 32.0);
  CHECK(l3.layer_params(l3.layers + 1) == 3072);  // tied: only the final norm
  auto g = load_model("gpt2-xl", kConfigs);
  CHECK(arch::is_gpt2(g));
  CHECK(g.layer_params(0) == (50257LL + 1024) * 1600);          // wte + wpe
  CHECK(g.layer_params(1) == 12LL * 1600 * 1600 + 13 * 1600);    // c_attn, c_proj, c_fc, mlp.c_proj + biases + 2 LayerNorms
  CHECK(g.layer_params(g.layers + 1) == 2 * 1600);              // ln_f weight and bias; lm_head tied

  // Mistral: a sliding window shorter than the sequence runs attention with an explicit mask (no causal skipping)
  auto mi = load_model("mistral-7b", kConfigs);
  CHECK(mi.sliding_window == 4096);
  auto no_window = mi;
  no_window.sliding_window = 0;
  CHECK(mi.layer_fwd_flops(1, 1, 4096) == no_window.layer_fwd_flops(1, 1, 4096));  // window = seq: causal path
  CHECK(mi.layer_fwd_flops(1, 1, 8192) - no_window.layer_fwd_flops(1, 1, 8192) == doctest::Approx(2.0 * 8192.0 * 8192 * 4096));
  CHECK(mi.layer_stash_bytes(1, 1, 8192, false, 2) - no_window.layer_stash_bytes(1, 1, 8192, false, 2) == 8192LL * 8192);
  // Qwen3's attention width is heads * head_dim, not hidden
  ModelSpec w = q3;
  w.head_dim = 256;  // q_dim 8192 = 2 x hidden
  CHECK(w.layer_fwd_flops(1, 1, 1024) > q3.layer_fwd_flops(1, 1, 1024));
  CHECK(w.layer_stash_bytes(1, 1, 1024, false, 2) > q3.layer_stash_bytes(1, 1, 1024, false, 2));

  // mmoc's own format: family keys, defaults of the family, errors naming the key
  auto t = parse_model(R"({"family":"qwen3","layers":2,"hidden":64,"ffn":128,"heads":4,"kv_heads":2,"head_dim":24,"vocab":99})", "m.json");
  CHECK(t.qk_norm);
  CHECK(t.head_dim == 24);
  CHECK(t.norm_eps == 1e-6);  // Qwen3Config's rms_norm_eps
  auto gp = parse_model(R"({"family":"gpt2","layers":2,"hidden":64,"ffn":256,"heads":4,"vocab":99,"max_seq":128})", "m.json");
  CHECK(gp.max_positions == 128);
  CHECK(gp.tied_embeddings);  // GPT2Config ties by default
  CHECK(gp.norm_eps == 1e-5);
  CHECK(error_of([] { parse_model(R"({"family":"falcon","layers":2,"hidden":64,"ffn":8,"heads":4,"vocab":9})", "m.json"); })
            .find("falcon") != std::string::npos);
  CHECK(error_of([] { parse_model(R"({"layers":2,"hidden":64,"ffn":8,"heads":4,"vocab":9,"max_positions":64})", "m.json"); })
            .find("max_positions") != std::string::npos);
  CHECK(error_of([] { parse_model(R"({"layers":2,"hidden":64,"ffn":8,"heads":4,"vocab":9,"rope_scaling":{"rope_type":"llama3"}})", "m.json"); })
            .find("llama3 needs factor") != std::string::npos);
  CHECK(error_of([] { parse_model(R"({"layers":2,"hidden":64,"ffn":8,"heads":4,"vocab":9,"rope_scaling":{"rope_type":"yarn"}})", "m.json"); })
            .find("yarn") != std::string::npos);
  // an HF config.json through the same reader as the engine's: a missing rms_norm_eps is the family's default
  auto hf = parse_model(R"({"model_type":"mistral","hidden_size":128,"intermediate_size":128,"num_hidden_layers":2,
                            "num_attention_heads":16,"vocab_size":99})", "config.json");
  CHECK(hf.norm_eps == 1e-6);
  CHECK(hf.kv_heads == 8);             // MistralConfig's num_key_value_heads default
  CHECK(hf.sliding_window == 4096);    // and its sliding_window when the key is absent
  CHECK(hf.max_seq == 4096 * 32);
}

TEST_CASE("GPU reserve: measured figures in the hardware files, no fraction of the card") {
  // measured outside the allocator (nvidia-h200, nvidia-h200-x2, 2026-12-01): 0.8 GiB alone, 1.9 GiB with NCCL on two
  auto h1 = load_hardware("h200x1", kConfigs);
  CHECK(h1.reserve_gib == doctest::Approx(0.8));
  CHECK(h1.reserve_fraction == 0.0);
  CHECK(h1.usable_bytes((int64_t)(48 * GiB)) == (int64_t)(48 * GiB - 0.8 * GiB));
  auto h2 = load_hardware("h200x2", kConfigs);
  CHECK(h2.reserve_gib == doctest::Approx(1.9));
  for (const auto& name : list_configs(kConfigs, "hardware")) {
    CAPTURE(name);
    auto hw = load_hardware(name, kConfigs);
    CHECK(hw.reserve_fraction == 0.0);
    CHECK(hw.reserve_gib <= 2.0);
    CHECK(hw.budget_for(hw.usable_bytes((int64_t)(20 * GiB))) <= (int64_t)(20 * GiB) + 1);
  }
  // a file that says nothing: no fraction by default
  auto bare = parse_hardware(R"({"gpus":1})", "hw.json");
  CHECK(bare.reserve_fraction == 0.0);
}

TEST_CASE("memory sizes: a plain number is GiB; GiB, GB (10^9 bytes) with or without a space; anything else names the field") {
  CHECK(parse_gib("48", "--budget") == 48.0);
  CHECK(parse_gib("48GiB", "--budget") == 48.0);
  CHECK(parse_gib("48 GiB", "--budget") == 48.0);
  CHECK(parse_gib("48gib", "--budget") == 48.0);
  CHECK(parse_gib(" 1.5 GiB ", "--budget") == 1.5);
  CHECK(parse_gib("48GB", "--budget") == doctest::Approx(48e9 / GiB));
  CHECK(parse_gib("512MiB", "--budget") == 0.5);
  CHECK(parse_gib("1TiB", "--budget") == 1024.0);
  CHECK(parse_gib("1000MB", "--budget") == doctest::Approx(1e9 / GiB));
  for (const char* bad : {"", "48G", "abc", "-3", "48 GiBs", "4 8", "1e3", "1.2.3", ".", "GiB", "nan", "inf"}) {
    CAPTURE(bad);
    const std::string e = error_of([&] { parse_gib(bad, "--host-budget"); });
    CHECK(e.find("--host-budget") != std::string::npos);
  }
  // the job's budget_gib: a number or such a string; anything else names the key
  CHECK(parse_job(R"({"budget_gib": 48})", "j.json").budget_gib == 48.0);
  CHECK(parse_job(R"({"budget_gib": "48GiB"})", "j.json").budget_gib == 48.0);
  CHECK(parse_job(R"({"budget_gib": "48GB"})", "j.json").budget_gib == doctest::Approx(48e9 / GiB));
  for (const char* bad : {R"({"budget_gib": "lots"})", R"({"budget_gib": true})", R"({"budget_gib": -1})", R"({"budget_gib": [48]})"}) {
    CAPTURE(bad);
    const std::string e = error_of([&] { parse_job(bad, "j.json"); });
    CHECK(e.find("j.json") != std::string::npos);
    CHECK(e.find("budget_gib") != std::string::npos);
  }
}

TEST_CASE("job defaults: v, schedule, recompute and offload are auto") {
  JobConfig d;
  CHECK(d.v == "auto");
  CHECK(d.schedule == "auto");
  CHECK(d.recompute == "auto");
  CHECK(d.offload == "auto");
  auto j = parse_job(R"({"model":"llama2-7b"})", "j.json");
  CHECK(j.v == "auto");
  CHECK(j.schedule == "auto");
  auto k = parse_job(R"({"v": 2, "schedule": "grouped"})", "j.json");  // a fixed value is the user's override
  CHECK(k.v == "2");
  CHECK(k.schedule == "grouped");
}

TEST_CASE("p2p_links: per-pair GPU links override p2p_gbps; bad entries name the field") {
  auto hw = parse_hardware(R"({"gpus":4,"p2p_gbps":10,"p2p_links":[{"gpus":[2,0],"gbps":100,"kind":"nvlink"},
                                                                   {"gpus":[1,3],"gbps":40}]})", "hw.json");
  REQUIRE(hw.p2p_links.size() == 2);
  CHECK(hw.p2p_links[0].a == 0);  // stored as an unordered pair, a < b
  CHECK(hw.p2p_links[0].b == 2);
  CHECK(hw.p2p_links[0].kind == "nvlink");
  CHECK(hw.link_gbps(0, 2) == 100);
  CHECK(hw.link_gbps(2, 0) == 100);
  CHECK(hw.link_gbps(3, 1) == 40);
  CHECK(hw.link_gbps(0, 1) == 10);  // not listed: p2p_gbps
  REQUIRE(hw.link(1, 3) != nullptr);
  CHECK(hw.link(1, 3)->kind.empty());
  CHECK(hw.link(0, 3) == nullptr);
  // a ring in the given order, bounded by its slowest link (the last GPU back to the first)
  CHECK(hw.ring_gbps({0, 2}) == 100);
  CHECK(hw.ring_gbps({0, 2, 1, 3}) == 10);
  CHECK(hw.ring_gbps({0}) == 10);
  // without p2p_links every pair is at p2p_gbps (the existing files)
  for (auto name : {"l20x4", "h200x2", "h200x4"}) {
    auto h = load_hardware(name, kConfigs);
    CHECK(h.p2p_links.empty());
    CHECK(h.link_gbps(0, 1) == h.p2p_gbps);
  }
  auto err = [](const char* links) {
    return error_of([&] { parse_hardware(std::string(R"({"gpus":4,"p2p_links":)") + links + "}", "hw.json"); });
  };
  CHECK(err(R"([{"gpus":[0,4],"gbps":1}])").find("hw.json: p2p_links[0].gpus: names GPU 4 but gpus = 4") != std::string::npos);
  CHECK(err(R"([{"gpus":[-1,2],"gbps":1}])").find("p2p_links[0].gpus: names GPU -1") != std::string::npos);
  CHECK(err(R"([{"gpus":[0,1],"gbps":1},{"gpus":[1,0],"gbps":2}])").find("p2p_links[1].gpus: the pair [0, 1] is listed twice") !=
        std::string::npos);
  CHECK(err(R"([{"gpus":[1,1],"gbps":1}])").find("p2p_links[0].gpus: a link joins two different GPUs") != std::string::npos);
  CHECK(err(R"([{"gpus":[0,1],"gbps":0}])").find("p2p_links[0].gbps: must be > 0") != std::string::npos);
  CHECK(err(R"([{"gpus":[0,1],"gbps":-3}])").find("p2p_links[0]") != std::string::npos);
  CHECK(err(R"([{"gpus":[0,1]}])").find("p2p_links[0]: missing required key 'gbps'") != std::string::npos);
  CHECK(err(R"([{"gbps":5}])").find("p2p_links[0]: missing required key 'gpus'") != std::string::npos);
  CHECK(err(R"([{"gpus":[0,1,2],"gbps":5}])").find("p2p_links[0].gpus: expected two GPU ids") != std::string::npos);
  CHECK(err(R"([{"gpus":[0,1],"gbps":5,"speed":1}])").find("speed") != std::string::npos);
  CHECK(err(R"({"gpus":[0,1]})").find("p2p_links") != std::string::npos);
  // the test hardware file of the golden plan
  auto pairs = load_hardware(std::string(kConfigs) + "/../tests/golden/hardware/pairs4.json", kConfigs);
  CHECK(pairs.link_gbps(0, 2) == 100);
  CHECK(pairs.link_gbps(1, 3) == 100);
  CHECK(pairs.link_gbps(0, 1) == 10);
}
