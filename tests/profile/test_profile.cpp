// mmoc-profile --device cpu --quick on the tiny model: exit codes, the written file, the cost model's view of it.
#include <doctest/doctest.h>

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "cost/spec.hpp"

namespace {

struct Run { int rc = -1; std::string out; };

std::string slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const std::string& tmp_dir() {
  static std::string dir = [] {
    char tmpl[] = "/tmp/mmoc_profile_test.XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    REQUIRE(d != nullptr);
    return std::string(d);
  }();
  return dir;
}

// Runs a command; returns its exit code and stdout+stderr.
Run run(const std::string& cmd) {
  const std::string log = tmp_dir() + "/log.txt";
  int st = std::system((cmd + " > " + log + " 2>&1").c_str());
  Run r;
  r.rc = st == -1 ? -1 : (WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
  r.out = slurp(log);
  return r;
}

const std::string kProfile = MMOC_PROFILE_BIN;
const std::string kConfigs = MMOC_CONFIGS_DIR;
const std::string kBase = kConfigs + "/hardware/cpu8.json";

// One profile run shared by the test cases (it is the slow part).
const Run& profiled(std::string* path_out = nullptr) {
  static std::string path = tmp_dir() + "/hw.json";
  static Run r = run(kProfile + " --device cpu --quick --base " + kBase + " --model tiny-8l --mbs 2 --seq 32 --configs " +
                     kConfigs + " -o " + path);
  if (path_out) *path_out = path;
  return r;
}

}  // namespace

TEST_CASE("mmoc-profile --device cpu --quick writes a hardware file mmoc loads") {
  std::string path;
  const Run& r = profiled(&path);
  INFO(r.out);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("CPU AdamW") != std::string::npos);
  CHECK(r.out.find("GB/s") != std::string::npos);
  mmoc::HardwareSpec hw = mmoc::load_hardware(path, kConfigs);
  mmoc::HardwareSpec base = mmoc::load_hardware(kBase, kConfigs);
  CHECK(hw.name == "cpu8-calibrated");
  CHECK(hw.gpus == base.gpus);                 // kept from the base
  CHECK(hw.host_groups == base.host_groups);
  CHECK(hw.adam_bytes_per_param == 28);
  CHECK(hw.h2d_gbps > 0);
  CHECK(hw.d2h_gbps > 0);
  CHECK(hw.duplex_gbps > 0);
  CHECK(hw.host_mem_gbps > 0);
  CHECK(hw.gpu_tflops > 0);
  CHECK(hw.cpu_cores >= 1);
  // No temporary file is left next to the output.
  if (DIR* d = ::opendir(tmp_dir().c_str())) {
    while (dirent* e = ::readdir(d)) CHECK(std::string(e->d_name).rfind("hw.json.tmp", 0) == std::string::npos);
    ::closedir(d);
  }
}

TEST_CASE("calibrated_ms holds the layer kinds' keys and the cost model returns them exactly") {
  std::string path;
  const Run& r = profiled(&path);
  REQUIRE(r.rc == 0);
  mmoc::HardwareSpec hw = mmoc::load_hardware(path, kConfigs);
  mmoc::ModelSpec m = mmoc::load_model("tiny-8l", kConfigs);
  CHECK(hw.calibrated_ms.size() == 6);
  for (int kind = 0; kind < 3; ++kind)
    for (bool fwd : {true, false}) {
      const std::string key = mmoc::calibration_key(m.name, kind, fwd, 2, 32);
      INFO(key);
      REQUIRE(hw.calibrated_ms.count(key) == 1);
      CHECK(hw.calibrated_ms.at(key) > 0);
    }
  mmoc::CostModel cm{m, hw};
  for (int layer = 0; layer < m.num_model_layers(); ++layer) {
    const int kind = cm.layer_kind(layer);
    CHECK(cm.layer_fwd_ms(layer, 2, 32) == hw.calibrated_ms.at(mmoc::calibration_key(m.name, kind, true, 2, 32)));
    CHECK(cm.layer_bwd_ms(layer, 2, 32) == hw.calibrated_ms.at(mmoc::calibration_key(m.name, kind, false, 2, 32)));
  }
  // Another shape is not calibrated: the formula answers (and differs from nothing in particular, but is positive).
  CHECK(cm.layer_fwd_ms(1, 4, 32) > 0);
}

#ifdef MMOC_COMPILE_BIN
TEST_CASE("mmoc-compile accepts the profiled hardware") {
  std::string path;
  REQUIRE(profiled(&path).rc == 0);
  Run c = run(std::string(MMOC_COMPILE_BIN) + " --configs " + kConfigs + " --model tiny-8l --hardware " + path +
              " --gpus 2 --micro-batch-size 2 --microbatches 4 --seq-len 32 -o " + tmp_dir() + "/plan.json");
  INFO(c.out);
  CHECK(c.rc == 0);
}
#endif

TEST_CASE("bad arguments exit 2 with a message and write nothing") {
  const std::string out = tmp_dir() + "/bad.json";
  Run r = run(kProfile + " --device cpu --quick --base " + kBase + " --model no-such-model --configs " + kConfigs + " -o " + out);
  INFO(r.out);
  CHECK(r.rc == 2);
  CHECK(r.out.find("unknown model 'no-such-model'") != std::string::npos);

  r = run(kProfile + " --device cpu --quick --model tiny-8l --configs " + kConfigs + " -o " + out);
  INFO(r.out);
  CHECK(r.rc == 2);
  CHECK(r.out.find("--base") != std::string::npos);

  r = run(kProfile + " --device cpu --quick --base no-such-hw --model tiny-8l --configs " + kConfigs + " -o " + out);
  CHECK(r.rc == 2);
  CHECK(r.out.find("unknown hardware 'no-such-hw'") != std::string::npos);

  r = run(kProfile + " --device cpu --quick --base " + kBase + " --model tiny-8l --seq 1 --configs " + kConfigs + " -o " + out);
  CHECK(r.rc == 2);

  r = run(kProfile + " --device tpu --base " + kBase + " --model tiny-8l -o " + out);
  CHECK(r.rc == 2);
  CHECK(slurp(out).empty());
}
