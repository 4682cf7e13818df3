// Number formatting shared by the compiler's and the tools' messages. Torch-free, depends on nothing.
#pragma once
#include <cstdint>
#include <string>

namespace mmoc {

constexpr double GiB = 1024.0 * 1024.0 * 1024.0;

// "12.34 GiB": two decimals, rounded to nearest (reports, summaries).
std::string gib(double bytes);
// A size in GiB rounded *up*: two decimals, four below 1 GiB ("0.0123 GiB"), so that a budget named in a message
// is enough when it is passed back as --budget.
std::string gib_at_least(int64_t bytes);

}  // namespace mmoc
