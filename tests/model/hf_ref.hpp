// Shared by the model tests against HF transformers' outputs (test_model.cpp, test_families.cpp): the fixtures'
// folder (tools/scripts/make_hf_fixtures.py), HF's reference batch, logits and loss, and small comparison helpers.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/model/checkpoint.hpp"

namespace mmoc::test {

inline const std::string kFix = std::string(MMOC_FIXTURES_DIR) + "/hf-tiny/";

// The exception text of f(), or "" when it does not throw.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
inline bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }
inline double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }
inline double rel_diff(const at::Tensor& a, const at::Tensor& ref) {
  return max_abs(a.to(at::kDouble) - ref.to(at::kDouble)) / std::max(max_abs(ref.to(at::kDouble)), 1e-12);
}

// A fixture's hf_reference.safetensors (batch, logits, gradients, the AdamW step) and its loss.
struct Ref {
  at::Tensor ids, labels, logits;
  double loss = 0;
  io::SafetensorsFile file;
};
inline Ref read_ref(const std::string& folder) {
  Ref r{{}, {}, {}, 0, io::SafetensorsFile::open(kFix + folder + "/hf_reference.safetensors")};
  r.ids = engine::read_tensor(r.file, "input_ids");
  r.labels = engine::read_tensor(r.file, "labels");
  r.logits = engine::read_tensor(r.file, "logits");
  std::ifstream in(kFix + folder + "/hf_reference.json");
  r.loss = nlohmann::json::parse(in)["loss"].get<double>();
  return r;
}

}  // namespace mmoc::test
