// mmoc-profile --device cpu --quick on the tiny model: exit codes, the written file, the cost model's view of it.
// --nvme / --storage-only: the "storage" entries of the NVMe tier's paths, and their parsing.
#include <doctest/doctest.h>

#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
  static std::string nvme = [] {
    const std::string d = tmp_dir() + "/nvme";
    ::mkdir(d.c_str(), 0755);
    return d;
  }();
  static Run r = run(kProfile + " --device cpu --quick --base " + kBase + " --model tiny-8l --mbs 2 --seq 32 --configs " +
                     kConfigs + " --nvme " + nvme + " --nvme-mib 8 -o " + path);
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

// --recompute: every round also times the forward without autograd and the backward with recompute (the engine's
// recompute path: output_unused), after --warm-s seconds of untimed rounds; the header says how long the warm-up was.
TEST_CASE("--recompute times the four decoder figures after the sustained warm-up") {
  const std::string out = tmp_dir() + "/rc.json";
  const auto t0 = std::chrono::steady_clock::now();
  Run r = run(kProfile + " --device cpu --quick --base " + kBase + " --model tiny-8l --mbs 2 --seq 32 --configs " + kConfigs +
              " --recompute --warm-s 1 --adam-params 100000 --transfer-mib 1 -o " + out);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(r.out);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("layers after 1.0 s of sustained warm-up") != std::string::npos);
  CHECK(secs >= 3.0);  // three layer kinds, each warmed up for 1 s (without: ~1 s in all on the dev machine)
  for (const char* what : {"decoder fwd 2x32", "decoder bwd 2x32", "decoder fwd no-grad 2x32", "decoder bwd recompute 2x32"}) {
    const size_t at = r.out.find(std::string("  ") + what + " ");
    REQUIRE_MESSAGE(at != std::string::npos, what);
    double ms = std::strtod(r.out.c_str() + r.out.find_first_not_of(' ', at + 2 + std::strlen(what)), nullptr);
    CHECK_MESSAGE(ms > 0, what);
  }
  CHECK(r.out.find("SM clock") == std::string::npos);  // NVML is only read for a CUDA device
  r = run(kProfile + " --device cpu --quick --base " + kBase + " --model tiny-8l --warm-s -1 --configs " + kConfigs + " -o " + out + ".bad");
  CHECK(r.rc == 2);
  CHECK(r.out.find("--warm-s") != std::string::npos);
}

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

TEST_CASE("--nvme adds each path's measured bandwidth as \"storage\"") {
  std::string path;
  const Run& r = profiled(&path);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("nvme write") != std::string::npos);
  mmoc::HardwareSpec hw = mmoc::load_hardware(path, kConfigs);
  REQUIRE(hw.storage.size() == 1);
  CHECK(hw.storage[0].path == tmp_dir() + "/nvme");
  CHECK(hw.storage[0].read_gbps > 0);
  CHECK(hw.storage[0].write_gbps > 0);
  CHECK(!hw.storage[0].device.empty());
  CHECK(slurp(path).find("Measured by --nvme: storage (") != std::string::npos);
}

TEST_CASE("--storage-only measures the paths and keeps the rest of the base") {
  const std::string d1 = tmp_dir() + "/s1", d2 = "/dev/shm/mmoc_profile_test_" + std::to_string(::getpid());
  ::mkdir(d1.c_str(), 0755);
  const bool shm = ::mkdir(d2.c_str(), 0755) == 0;
  const std::string out = tmp_dir() + "/storage.json";
  Run r = run(kProfile + " --storage-only --base " + kBase + " --configs " + kConfigs + " --nvme " + d1 +
              (shm ? "," + d2 : std::string()) + " --nvme-mib 4 --nvme-request-kib 256 --nvme-qd 4 -o " + out);
  INFO(r.out);
  REQUIRE(r.rc == 0);
  mmoc::HardwareSpec hw = mmoc::load_hardware(out, kConfigs);
  mmoc::HardwareSpec base = mmoc::load_hardware(kBase, kConfigs);
  REQUIRE(hw.storage.size() == (shm ? 2u : 1u));
  CHECK(hw.storage[0].path == d1);
  CHECK_FALSE(hw.storage[0].virtual_tier);
  if (shm) {
    CHECK(hw.storage[1].path == d2);
    CHECK(hw.storage[1].virtual_tier);  // tmpfs
    CHECK(r.out.find("all paths striped") != std::string::npos);
    ::rmdir(d2.c_str());
  }
  for (const auto& s : hw.storage) {
    CHECK(s.read_gbps > 0);
    CHECK(s.write_gbps > 0);
  }
  CHECK(hw.name == base.name);  // nothing else measured, nothing else changed
  CHECK(hw.gpu_tflops == base.gpu_tflops);
  CHECK(hw.h2d_gbps == base.h2d_gbps);
  CHECK(hw.calibrated_ms == base.calibrated_ms);

  // Errors: a missing path names it (exit 2, nothing written); --storage-only without --nvme.
  const std::string bad = tmp_dir() + "/bad-storage.json";
  r = run(kProfile + " --storage-only --base " + kBase + " --configs " + kConfigs + " --nvme " + tmp_dir() + "/missing -o " + bad);
  CHECK(r.rc == 2);
  CHECK(r.out.find(tmp_dir() + "/missing") != std::string::npos);
  CHECK(r.out.find("no such directory") != std::string::npos);
  CHECK(slurp(bad).empty());
  r = run(kProfile + " --storage-only --base " + kBase + " --configs " + kConfigs + " -o " + bad);
  CHECK(r.rc == 2);
  CHECK(r.out.find("--nvme") != std::string::npos);
  r = run(kProfile + " --storage-only --base " + kBase + " --configs " + kConfigs + " --nvme " + d1 + " --nvme-request-kib 5 -o " + bad);
  CHECK(r.rc == 2);
  CHECK(r.out.find("multiple of 4096") != std::string::npos);
  r = run(kProfile + " --base " + kBase + " --configs " + kConfigs + " -o " + bad);
  CHECK(r.rc == 2);
  CHECK(r.out.find("--model") != std::string::npos);
}

TEST_CASE("\"storage\" in a hardware file: parsed, and errors name the entry") {
  auto hw = mmoc::parse_hardware(R"({"gpus":1,"storage":[{"path":"/a","read_gbps":2.3,"write_gbps":2.2,"device":"259:0"},
                                     {"path":"/dev/shm/t","read_gbps":9,"write_gbps":8,"virtual":true}]})", "hw.json");
  REQUIRE(hw.storage.size() == 2);
  CHECK(hw.storage[0].path == "/a");
  CHECK(hw.storage[0].read_gbps == 2.3);
  CHECK(hw.storage[0].write_gbps == 2.2);
  CHECK(hw.storage[0].device == "259:0");
  CHECK_FALSE(hw.storage[0].virtual_tier);
  CHECK(hw.storage[1].virtual_tier);
  CHECK(mmoc::parse_hardware(R"({"gpus":1})", "hw.json").storage.empty());
  auto err = [](const char* text) {
    try {
      mmoc::parse_hardware(text, "hw.json");
    } catch (const mmoc::InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(err(R"({"gpus":1,"storage":{"path":"/a"}})").find("'storage'") != std::string::npos);
  CHECK(err(R"({"gpus":1,"storage":[{"path":"/a","read_gbps":2}]})").find("storage[0]: missing required key 'write_gbps'") !=
        std::string::npos);
  CHECK(err(R"({"gpus":1,"storage":[{"path":"/a","read_gbps":2,"write_gbps":0}]})").find("write_gbps") != std::string::npos);
  CHECK(err(R"({"gpus":1,"storage":[{"path":"/a","read_gbps":2,"write_gbps":1,"iops":5}]})").find("unknown key 'iops'") !=
        std::string::npos);
  CHECK(err(R"({"gpus":1,"storage":[{"path":"/a","read_gbps":2,"write_gbps":1},{"path":"/a","read_gbps":2,"write_gbps":1}]})")
            .find("listed twice") != std::string::npos);
}
