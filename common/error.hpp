// The error type of bad user input (a config, a job, a command-line value): the CLIs print its message and exit
// with code 2. Torch-free.
#pragma once
#include <stdexcept>
#include <string>

namespace mmoc {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// No plan fits the GPU memory budget: `smallest_budget` (bytes per GPU, 0 if unknown) is the smallest budget with
// which the refused choice would fit (the compiler's search takes the smallest over its candidates).
struct BudgetError : InputError {
  BudgetError(const std::string& what, long long smallest) : InputError(what), smallest_budget(smallest) {}
  long long smallest_budget = 0;
};

// A plan needs more host memory than the node has (needed and available bytes).
struct HostMemoryError : InputError {
  HostMemoryError(const std::string& what, long long need, long long have) : InputError(what), needed(need), available(have) {}
  long long needed = 0, available = 0;
};

// The NVMe tier's paths lack the space a plan's placement needs there (`missing` bytes on the fullest file system).
struct NvmeSpaceError : InputError {
  NvmeSpaceError(const std::string& what, long long miss) : InputError(what), missing(miss) {}
  long long missing = 0;
};

}  // namespace mmoc
