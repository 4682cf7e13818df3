#include "engine/io/test_fault.hpp"

#include <cstdlib>
#include <stdexcept>

namespace mmoc::io {

namespace {
TestFault parse(const std::string& s) {
  auto bad = [&] { return std::runtime_error("MMOC_TEST_FAULT: bad entry '" + s + "' (nonfinite:<rank>:<step>[-<last>], crash-in-save:<rank>, crash-after-swap:<rank>, slow-save:<rank>:<ms>)"); };
  TestFault f;
  const auto c1 = s.find(':');
  if (c1 == std::string::npos) throw bad();
  f.kind = s.substr(0, c1);
  const auto c2 = s.find(':', c1 + 1);
  try {
    f.rank = std::stoi(s.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1));
    if (c2 != std::string::npos) {
      const std::string r = s.substr(c2 + 1);
      const auto d = r.find('-');
      f.first = std::stoll(r.substr(0, d));
      f.last = d == std::string::npos ? f.first : std::stoll(r.substr(d + 1));
    }
  } catch (const std::logic_error&) {
    throw bad();
  }
  const bool ok = (f.kind == "nonfinite" && c2 != std::string::npos) || ((f.kind == "crash-in-save" || f.kind == "crash-after-swap") && c2 == std::string::npos) ||
                  (f.kind == "slow-save" && c2 != std::string::npos);
  if (!ok) throw bad();
  return f;
}

std::vector<TestFault> read_env() {
  std::vector<TestFault> v;
  const char* e = std::getenv("MMOC_TEST_FAULT");
  const std::string all = e ? e : "";
  for (std::size_t p = 0; p < all.size();) {
    std::size_t q = all.find(',', p);
    if (q == std::string::npos) q = all.size();
    if (q > p) v.push_back(parse(all.substr(p, q - p)));
    p = q + 1;
  }
  return v;
}
}  // namespace

const std::vector<TestFault>& test_faults() {
  static const std::vector<TestFault> v = read_env();
  return v;
}

const TestFault* test_fault(const std::string& kind, int rank) {
  for (const auto& f : test_faults())
    if (f.kind == kind && f.rank == rank) return &f;
  return nullptr;
}

}  // namespace mmoc::io
