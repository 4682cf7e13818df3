#include "engine/model/train_checkpoint.hpp"

#include <ATen/ATen.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>

#include "engine/io/fsutil.hpp"
#include "engine/io/safetensors.hpp"
#include "engine/model/checkpoint.hpp"

namespace mmoc::engine {

void save_state_parts(const std::string& parts_dir, int rank, const std::vector<StageTensors>& stages) {
  std::vector<io::TensorToWrite> ts;
  std::vector<at::Tensor> keep;
  std::map<std::string, std::string> meta{{"format", "mmoc-parts"}, {"rank", std::to_string(rank)}};
  for (const auto& st : stages) {
    for (auto [name, t] : {std::pair<const char*, at::Tensor>{"master", st.master}, {"exp_avg", st.exp_avg}, {"exp_avg_sq", st.exp_avg_sq}}) {
      at::Tensor c = t.to(at::kCPU).contiguous();
      keep.push_back(c);
      ts.push_back({"S" + std::to_string(st.id) + "." + name, io::DType::F32, {c.numel()}, c.data_ptr(), (size_t)c.numel() * 4});
    }
    meta["S" + std::to_string(st.id) + ".step"] = std::to_string(st.step);
  }
  io::write_safetensors(parts_dir + "/rank" + std::to_string(rank) + ".safetensors", ts, meta);
}

void load_state_parts(const std::string& state_dir, std::vector<StageTensors>& stages) {
  for (auto& st : stages) {
    std::string path = state_dir + "/S" + std::to_string(st.id) + ".safetensors";
    auto f = io::SafetensorsFile::open(path);
    for (auto [name, t] : {std::pair<const char*, at::Tensor*>{"master", &st.master}, {"exp_avg", &st.exp_avg}, {"exp_avg_sq", &st.exp_avg_sq}}) {
      at::Tensor src = read_tensor(f, name);
      if (src.numel() != t->numel())
        throw std::runtime_error(path + ": " + name + " has " + std::to_string(src.numel()) + " elements, the plan's stage S" +
                                 std::to_string(st.id) + " has " + std::to_string(t->numel()) + " (checkpoint from another plan?)");
      t->copy_(src.view_as(*t));
    }
    auto it = f.metadata().find("step");
    st.step = it == f.metadata().end() ? 0 : std::stoll(it->second);
  }
}

static void rename_or_throw(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0)
    throw std::runtime_error("cannot rename " + from + " to " + to + ": " + std::strerror(errno));
}

void assemble_checkpoint(const ir::Plan& plan, const std::string& parts_dir, const std::string& dir,
                         const std::string& dtype, const std::string& extra_json) {
  // Gather the stage masters of all ranks, write the HF checkpoint into a staging folder, add the optimizer state
  // (one file per stage, so a resume under another rank count still finds them), then swap it in.
  std::vector<StageLayout> layouts;
  std::vector<at::Tensor> flats;
  std::map<int, std::string> stage_file;
  const std::string staging = dir + ".staging";
  io::remove_tree(staging);
  io::make_dirs(staging);
  const std::string hf_dir = staging + "/hf";
  io::make_dirs(staging + "/mmoc_state");
  for (int r = 0; r < plan.gpus; ++r) {
    auto f = io::SafetensorsFile::open(parts_dir + "/rank" + std::to_string(r) + ".safetensors");
    for (const auto& s : plan.stages) {
      if (s.gpu != r) continue;
      std::string p = "S" + std::to_string(s.id) + ".";
      layouts.push_back(stage_layout(plan.model, s.layer_begin, s.layer_end));
      flats.push_back(read_tensor(f, p + "master"));
      at::Tensor m = read_tensor(f, p + "exp_avg"), v = read_tensor(f, p + "exp_avg_sq");
      auto it = f.metadata().find(p + "step");
      std::map<std::string, std::string> meta{{"format", "mmoc-optim"}, {"step", it == f.metadata().end() ? "0" : it->second},
                                              {"layers", std::to_string(s.layer_begin) + "-" + std::to_string(s.layer_end)}};
      at::Tensor mm = flats.back();
      io::write_safetensors(staging + "/mmoc_state/S" + std::to_string(s.id) + ".safetensors",
                            {{"master", io::DType::F32, {mm.numel()}, mm.data_ptr(), (size_t)mm.numel() * 4},
                             {"exp_avg", io::DType::F32, {m.numel()}, m.data_ptr(), (size_t)m.numel() * 4},
                             {"exp_avg_sq", io::DType::F32, {v.numel()}, v.data_ptr(), (size_t)v.numel() * 4}},
                            meta);
    }
  }
  save_hf_checkpoint(hf_dir, plan.model, layouts, flats, dtype == "bf16" ? at::kBFloat16 : at::kFloat);
  // HF files at the top level of the checkpoint folder
  for (const auto& name : io::list_dir(hf_dir)) rename_or_throw(hf_dir + "/" + name, staging + "/" + name);
  io::remove_tree(hf_dir);
  io::write_file_atomic(staging + "/mmoc_state/trainer_state.json", extra_json);
  io::write_file_atomic(staging + "/mmoc_state/plan.json", ir::to_json_string(plan));
  io::fsync_dir(staging);
  // swap: the previous checkpoint survives until the new one is complete
  const std::string old = dir + ".old";
  io::remove_tree(old);
  if (io::path_exists(dir)) rename_or_throw(dir, old);
  rename_or_throw(staging, dir);
  io::remove_tree(old);
  io::remove_tree(parts_dir);
}

}  // namespace mmoc::engine
