// Helpers shared by the files of ir/ (not part of the IR's interface).
#pragma once
#include <charconv>
#include <string>
#include <string_view>

#include "ir/plan.hpp"

namespace mmoc::ir::detail {

// The whole of s is an integer / a number (C locale, no blanks).
template <class T>
bool parse_int_exact(std::string_view s, T& out) {
  if (s.empty()) return false;
  auto r = std::from_chars(s.data(), s.data() + s.size(), out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}
bool parse_double_exact(std::string_view s, double& out);

// Buffer-table names: "w(S0)", "act(S0,*)", "batch(*)".
std::string decl_str(const BufferDecl& d);
void parse_decl_name(const std::string& s, BufferDecl& d);  // throws ParseError

// Which operand fields an op carries.
bool op_has_buf(Op op);
bool op_has_stage(Op op);
bool op_has_mb(Op op);
bool op_has_peer(Op op);

}  // namespace mmoc::ir::detail
