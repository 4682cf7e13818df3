// The error type of bad user input (a config, a job, a command-line value): the CLIs print its message and exit
// with code 2. Torch-free.
#pragma once
#include <stdexcept>

namespace mmoc {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace mmoc
