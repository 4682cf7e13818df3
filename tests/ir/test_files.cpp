// load_plan_file and save_file_atomic.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "plan_fixtures.hpp"

using namespace mmoc::ir;
using namespace mmoc::ir::test;
namespace fs = std::filesystem;

namespace {
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("mmoc_ir_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  static int& counter() {
    static int c = 0;
    return c;
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
}  // namespace

TEST_CASE("save_file_atomic writes the file and leaves no temporary") {
  TempDir d;
  const std::string target = (d.path / "plan.json").string();
  save_file_atomic(target, "first");
  CHECK(slurp(target) == "first");
  CHECK(d.entries() == std::vector<std::string>{"plan.json"});
  std::string big(3 << 20, 'x');
  save_file_atomic(target, big);  // replaces
  CHECK(slurp(target) == big);
  CHECK(d.entries() == std::vector<std::string>{"plan.json"});
  save_file_atomic(target, "");
  CHECK(slurp(target).empty());
}

TEST_CASE("save_file_atomic leaves nothing when the directory does not exist") {
  TempDir d;
  const fs::path missing = d.path / "no-such-dir";
  const std::string target = (missing / "plan.json").string();
  CHECK_THROWS(save_file_atomic(target, "content"));
  try {
    save_file_atomic(target, "content");
  } catch (const std::exception& e) {
    CHECK(std::string(e.what()).find(target) != std::string::npos);
  }
  CHECK(!fs::exists(missing));
  CHECK(d.entries().empty());
}

TEST_CASE("save_file_atomic leaves the old file and no temporary when the rename fails") {
  TempDir d;
  // The target is a non-empty directory: the temporary is written, the rename fails.
  const fs::path target = d.path / "target";
  fs::create_directories(target / "inside");
  CHECK_THROWS(save_file_atomic(target.string(), "content"));
  CHECK(fs::is_directory(target / "inside"));
  CHECK(d.entries() == std::vector<std::string>{"target"});
}

TEST_CASE("load_plan_file reads both forms") {
  TempDir d;
  Plan p = hand_plan();
  const std::string js = (d.path / "p.json").string(), tx = (d.path / "p.plan").string();
  save_file_atomic(js, "\n  " + to_json_string(p));  // leading blanks: still JSON
  save_file_atomic(tx, "; text form\n" + print_text(p));
  CHECK(load_plan_file(js) == p);
  CHECK(load_plan_file(tx) == p);
}

TEST_CASE("load_plan_file errors name the path") {
  TempDir d;
  const std::string missing = (d.path / "absent.json").string();
  try {
    load_plan_file(missing);
    FAIL("no throw");
  } catch (const ParseError& e) {
    CHECK(std::string(e.what()).find(missing) != std::string::npos);
  }
  const std::string bad = (d.path / "bad.plan").string();
  std::string text = hand_plan_text();
  text.replace(text.find("forward S0 m1"), 7, "fwd");
  save_file_atomic(bad, text);
  try {
    load_plan_file(bad);
    FAIL("no throw");
  } catch (const ParseError& e) {
    std::string m = e.what();
    CAPTURE(m);
    CHECK(m.find(bad) != std::string::npos);
    CHECK(m.find("unknown op 'fwd'") != std::string::npos);
  }
  const std::string badjs = (d.path / "bad.json").string();
  save_file_atomic(badjs, "{\"format\": \"mmoc-plan\"");
  CHECK_THROWS_AS(load_plan_file(badjs), ParseError);
  CHECK_THROWS_AS(load_plan_file(d.path.string()), ParseError);  // a directory
}
