// mmoc-eval: the mean next-token loss of an HF checkpoint on a dataset, computed with mmoc's own model (the same
// code the trainer runs), on the CPU or one GPU, in fp32 or bf16. Optionally writes the logits of the evaluated rows
// to a safetensors file, so they can be compared with another implementation's (tests/gpu/hf_gpu_check.py).
//
//   mmoc-eval <checkpoint dir> --data rows.jsonl --seq-len 1024 [--batch 8] [--max-rows N] [--device cpu|cuda]
//             [--precision fp32|bf16] [--logits out.safetensors] [--tokenizer tokenizer.model] [--fit pad|pack]
//
// Prints one line: rows, tokens, mean loss and perplexity. Exit codes: 0 done, 2 bad input, 3 anything else.
// Linked with LibTorch: no std::filesystem here (engine/io/fsutil.hpp).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <cuda_runtime_api.h>

#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "engine/data/data.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/io/hf_config.hpp"
#include "engine/io/safetensors.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"

using namespace mmoc;
using namespace mmoc::engine;

namespace {
struct BadInput : std::runtime_error { using std::runtime_error::runtime_error; };
}

int main(int argc, char** argv) {
  CLI::App app{"mmoc-eval: mean next-token loss (and logits) of an HF checkpoint with mmoc's model"};
  std::string dir, data_path, device = "cpu", precision = "fp32", logits_path, tokenizer, fit = "pad";
  int64_t seq_len = 0, batch = 8, max_rows = 0;
  app.add_option("checkpoint", dir, "HF checkpoint folder (config.json + safetensors)")->required();
  app.add_option("--data", data_path, "JSONL: {input_ids[,labels]}, {text} or {document,summary}")->required();
  app.add_option("--seq-len", seq_len, "row length")->required();
  app.add_option("--batch", batch, "rows per forward pass");
  app.add_option("--max-rows", max_rows, "evaluate at most this many rows (0: all)");
  app.add_option("--device", device, "cpu or cuda");
  app.add_option("--precision", precision, "fp32 or bf16 (weights and compute; the loss is fp32)");
  app.add_option("--logits", logits_path, "write the logits of the evaluated rows (fp32 [rows, seq, vocab]) here");
  app.add_option("--tokenizer", tokenizer, "SentencePiece tokenizer.model for raw-text records");
  app.add_option("--fit", fit, "pad or pack examples to --seq-len");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    if (device != "cpu" && device != "cuda") throw BadInput("--device must be cpu or cuda (got '" + device + "')");
    if (precision != "fp32" && precision != "bf16") throw BadInput("--precision must be fp32 or bf16 (got '" + precision + "')");
    if (seq_len < 2) throw BadInput("--seq-len must be at least 2");
    if (batch < 1) throw BadInput("--batch must be at least 1");
    if (max_rows < 0) throw BadInput("--max-rows must be >= 0");
    if (!io::is_directory(dir)) throw BadInput(dir + ": not a checkpoint folder");
    if (!io::path_exists(dir + "/config.json")) throw BadInput(dir + ": no config.json");
    if (!io::path_exists(data_path)) throw BadInput("--data " + data_path + ": no such file");
    if (device == "cuda") {
      int n = 0;
      if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) throw BadInput("--device cuda: no CUDA GPU is visible");
    }
    ir::ModelArch arch = io::read_hf_config(dir).arch;
    const at::Device dev = device == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
    const auto dtype = precision == "bf16" ? at::kBFloat16 : at::kFloat;

    data::DataConfig dc;
    dc.path = data_path;
    if (!tokenizer.empty()) dc.tokenizer = tokenizer;
    dc.vocab_size = arch.vocab;
    dc.fit.mode = data::parse_fit_mode(fit);
    dc.fit.seq_len = seq_len;
    auto rows = data::load_rows(dc);
    int64_t n_rows = rows->size();
    if (max_rows > 0) n_rows = std::min(n_rows, max_rows);

    // the whole model as one stage: embedding, decoder layers, head
    const StageLayout layout = stage_layout(arch, 0, arch.layers + 2);
    std::vector<StageLayout> layouts{layout};
    std::vector<at::Tensor> flats{at::zeros({layout.numel}, at::TensorOptions().dtype(dtype).device(dev))};
    load_hf_weights(dir, arch, layouts, flats);
    const Rope rope = make_rope(arch, seq_len, dev);

    at::NoGradGuard ng;
    double loss_sum = 0;
    int64_t tokens = 0;
    std::vector<at::Tensor> all_logits;
    for (int64_t r0 = 0; r0 < n_rows; r0 += batch) {
      const int64_t b = std::min(batch, n_rows - r0);
      auto ids = at::from_blob(const_cast<int64_t*>(rows->input_ids.data() + r0 * seq_len), {b, seq_len}, at::kLong).to(dev);
      auto labels = at::from_blob(const_cast<int64_t*>(rows->labels.data() + r0 * seq_len), {b, seq_len}, at::kLong).to(dev);
      at::Tensor logits = stage_forward(arch, layout, flats[0], ids, rope);
      loss_sum += lm_loss_sum(logits, labels).item<double>();
      tokens += count_tokens(labels);
      if (!logits_path.empty()) all_logits.push_back(logits.to(at::kCPU, at::kFloat));
    }
    const double loss = tokens > 0 ? loss_sum / double(tokens) : std::nan("");
    if (!logits_path.empty()) {
      at::Tensor l = all_logits.empty() ? at::zeros({0, seq_len, arch.vocab}) : at::cat(all_logits).contiguous();
      io::write_safetensors(logits_path,
                            {{"logits", io::DType::F32, {l.size(0), l.size(1), l.size(2)}, l.data_ptr(), (size_t)l.numel() * 4}},
                            {{"format", "mmoc-eval"}, {"precision", precision}, {"device", device}});
    }
    std::printf("mmoc-eval: %lld rows, %lld tokens, loss %.6f, perplexity %.4f (%s, %s)\n", (long long)n_rows, (long long)tokens,
                loss, std::exp(loss), device.c_str(), precision.c_str());
    return 0;
  } catch (const BadInput& e) {
    std::cerr << "mmoc-eval: error: " << e.what() << "\n";
    return 2;
  } catch (const data::DataError& e) {
    std::cerr << "mmoc-eval: error: " << e.what() << "\n";
    return 2;
  } catch (const io::FormatError& e) {
    std::cerr << "mmoc-eval: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "mmoc-eval: error: " << e.what() << "\n";
    return 3;
  }
}
