// MMOC_TEST_FAULT: faults that tests inject into the engine, a comma-separated list (torch-free):
//   nonfinite:<rank>:<step>[-<last step>]  that rank's gradients become NaN at those steps (1-based)
//   crash-in-save:<rank>                   that rank's process ends after its first data chunk of a save
//   crash-after-swap:<rank>                rank 0 ends once a save is in place, before the previous one is removed
//   slow-save:<rank>:<ms>                  each of that rank's chunk writes takes <ms> longer (a slow disk)
// Not for users: it exists so that tests can reach the paths that guard against divergence, slow disks and crashes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mmoc::io {

struct TestFault {
  std::string kind;
  int rank = -1;
  int64_t first = 0, last = 0;  // nonfinite: the steps; slow-save: first = the milliseconds
};

// The parsed list (read once); std::runtime_error naming the entry when it is malformed.
const std::vector<TestFault>& test_faults();
// The fault of that kind for this rank, or nullptr.
const TestFault* test_fault(const std::string& kind, int rank);

}  // namespace mmoc::io
