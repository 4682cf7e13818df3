#include "common/size.hpp"

#include <cctype>
#include <cmath>
#include <cstdlib>

#include "common/error.hpp"

namespace mmoc {

double parse_gib(const std::string& text, const std::string& field) {
  auto bad = [&](const std::string& why) {
    return InputError(field + ": '" + text + "' is not a memory size (" + why +
                      "; write GiB as a number, e.g. 48, 48GiB, 48 GiB, or 48GB for 10^9 bytes)");
  };
  size_t i = 0;
  while (i < text.size() && std::isspace((unsigned char)text[i])) ++i;
  const size_t num_begin = i;
  while (i < text.size() && (std::isdigit((unsigned char)text[i]) || text[i] == '.')) ++i;
  if (i == num_begin) throw bad(text.empty() ? "empty" : "no number");
  const std::string num = text.substr(num_begin, i - num_begin);
  if (num.find('.') != num.rfind('.') || num == ".") throw bad("malformed number");
  const double value = std::strtod(num.c_str(), nullptr);
  while (i < text.size() && std::isspace((unsigned char)text[i])) ++i;
  std::string unit;
  for (; i < text.size() && !std::isspace((unsigned char)text[i]); ++i) unit += (char)std::tolower((unsigned char)text[i]);
  while (i < text.size() && std::isspace((unsigned char)text[i])) ++i;
  if (i != text.size()) throw bad("trailing text");
  double bytes_per_unit = 0;
  if (unit.empty() || unit == "gib") bytes_per_unit = 1024.0 * 1024 * 1024;
  else if (unit == "mib") bytes_per_unit = 1024.0 * 1024;
  else if (unit == "tib") bytes_per_unit = 1024.0 * 1024 * 1024 * 1024;
  else if (unit == "gb") bytes_per_unit = 1e9;
  else if (unit == "mb") bytes_per_unit = 1e6;
  else if (unit == "tb") bytes_per_unit = 1e12;
  else if (unit == "g" || unit == "m" || unit == "t") throw bad("'" + unit + "' is ambiguous: say GiB or GB");
  else throw bad("unknown unit '" + unit + "'");
  const double gib = value * bytes_per_unit / (1024.0 * 1024 * 1024);
  if (!std::isfinite(gib)) throw bad("not finite");
  return gib;
}

}  // namespace mmoc
