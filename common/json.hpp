// Strict JSON reading over nlohmann::json: every key of an object is known, every value has the expected type and
// range, and an error names where the value is, in one of two styles:
//   JsonNaming::Path  "stages[1].gpu: expected integer, got string \"2\""          (documents of fixed layout: plans)
//   JsonNaming::Key   "job.json: train: key 'lr': expected number, got string \"fast\""   (config files)
// Errors are JsonError, an InputError. Also the lenient getters for documents written
// by other tools (Chrome traces): a value of the wrong type counts as absent. Torch-free.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.hpp"

namespace mmoc {

// A document that is not what it should be is bad user input (callers reading mmoc's own formats turn it into
// their parse error).
struct JsonError : InputError {
  using InputError::InputError;
};

enum class JsonNaming { Path, Key };

// "integer 2", "number 2.5", "string \"x\"", or the type ("null", "boolean", "array", "object").
template <class J>
std::string json_describe(const J& v) {
  if (v.is_number_integer()) return "integer " + v.dump();
  if (v.is_number_float()) return "number " + v.dump();
  if (v.is_string()) return "string " + v.dump();
  return v.type_name();
}

[[noreturn]] inline void json_fail(const std::string& where, const std::string& msg) {
  throw JsonError((where.empty() ? std::string("(top level)") : where) + ": " + msg);
}

// ---- values (`where` names the value in messages) ---------------------------------------------
template <class J>
int64_t json_int(const J& v, const std::string& where, int64_t lo = std::numeric_limits<int64_t>::min(),
                 int64_t hi = std::numeric_limits<int64_t>::max()) {
  if (!v.is_number_integer()) json_fail(where, "expected integer, got " + json_describe(v));
  if (v.is_number_unsigned() && v.template get<uint64_t>() > (uint64_t)std::numeric_limits<int64_t>::max())
    json_fail(where, "integer " + v.dump() + " out of range");
  const int64_t x = v.template get<int64_t>();
  auto is_type_limit = [](int64_t b) {
    return b == INT_MIN || b == INT_MAX || b == std::numeric_limits<int64_t>::min() ||
           b == std::numeric_limits<int64_t>::max();
  };
  if (x < lo) json_fail(where, "integer " + v.dump() + " out of range" + (is_type_limit(lo) ? "" : " (minimum " + std::to_string(lo) + ")"));
  if (x > hi) json_fail(where, "integer " + v.dump() + " out of range" + (is_type_limit(hi) ? "" : " (maximum " + std::to_string(hi) + ")"));
  return x;
}
template <class J>
int json_int32(const J& v, const std::string& where, int lo = INT_MIN) {
  return (int)json_int(v, where, lo, INT_MAX);
}

struct JsonNumberRule {
  double min = -std::numeric_limits<double>::infinity();
  bool finite = false;             // reject inf/nan
  bool nonfinite_strings = false;  // accept "inf", "-inf", "nan" (how mmoc writes non-finite numbers)
};
template <class J>
double json_number(const J& v, const std::string& where, const JsonNumberRule& rule = {}) {
  double x = 0;
  if (v.is_number()) {
    x = v.template get<double>();
  } else if (rule.nonfinite_strings && v.is_string() && (v == "inf" || v == "-inf" || v == "nan")) {
    const auto& s = v.template get_ref<const std::string&>();
    x = s == "nan" ? std::numeric_limits<double>::quiet_NaN()
                   : (s == "inf" ? 1.0 : -1.0) * std::numeric_limits<double>::infinity();
  } else {
    json_fail(where, "expected number, got " + json_describe(v));
  }
  if ((rule.finite && !std::isfinite(x)) || x < rule.min)
    json_fail(where, "number " + v.dump() + " out of range" +
                         (std::isinf(rule.min) ? std::string() : " (minimum " + J(rule.min).dump() + ")"));
  return x;
}
template <class J>
bool json_bool(const J& v, const std::string& where) {
  if (!v.is_boolean()) json_fail(where, "expected true/false, got " + json_describe(v));
  return v.template get<bool>();
}
template <class J>
std::string json_string(const J& v, const std::string& where, std::initializer_list<const char*> allowed = {}) {
  if (!v.is_string()) json_fail(where, "expected string, got " + json_describe(v));
  std::string s = v.template get<std::string>();
  if (allowed.size() == 0) return s;
  std::string list;
  for (const char* a : allowed) {
    if (s == a) return s;
    list += (list.empty() ? "" : ", ") + std::string(a);
  }
  json_fail(where, v.dump() + " is not one of: " + list);
}
// elem(value, where) -> T for each element; where of element i is where + "[i]".
template <class T, class J, class F>
std::vector<T> json_array(const J& v, const std::string& where, F elem) {
  if (!v.is_array()) json_fail(where, "expected array, got " + json_describe(v));
  std::vector<T> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) out.push_back(elem(v[i], where + "[" + std::to_string(i) + "]"));
  return out;
}

// ---- objects ---------------------------------------------------------------------------------
// One object being read: records which keys were asked for; done() rejects the others.
template <class J>
class JsonObject {
 public:
  // `where`: Path naming: the object's JSON path ("" = the document); Key naming: the document's name and the keys
  // leading here ("job.json", "job.json: train").
  JsonObject(const J& j, std::string where, JsonNaming naming = JsonNaming::Path)
      : j_(j), where_(std::move(where)), naming_(naming) {
    if (!j_.is_object()) json_fail(where_, "expected object, got " + json_describe(j_));
  }
  const std::string& where() const { return where_; }
  // Where member `key` is named in messages.
  std::string at(const std::string& key) const {
    if (naming_ == JsonNaming::Key) return where_ + ": key '" + key + "'";
    return where_.empty() ? key : where_ + "." + key;
  }
  const J* get(const char* key) {
    used_.insert(key);
    auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }
  bool has(const char* key) { return get(key) != nullptr; }
  const J& req(const char* key) {
    const J* v = get(key);
    if (!v) json_fail(where_, std::string(naming_ == JsonNaming::Key ? "missing required key '" : "missing key '") + key + "'");
    return *v;
  }
  void done() const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (used_.count(it.key())) continue;
      if (naming_ == JsonNaming::Key) json_fail(where_, "unknown key '" + it.key() + "'");
      json_fail(at(it.key()), "unknown key");
    }
  }
  // Optional members of a config: leave `out` as it is when the key is absent.
  void read(const char* key, int& out, int lo = INT_MIN) {
    if (const J* v = get(key)) out = json_int32(*v, at(key), lo);
  }
  void read(const char* key, double& out, const JsonNumberRule& rule = {}) {
    if (const J* v = get(key)) out = json_number(*v, at(key), rule);
  }
  void read(const char* key, bool& out) {
    if (const J* v = get(key)) out = json_bool(*v, at(key));
  }
  void read(const char* key, std::string& out, std::initializer_list<const char*> allowed = {}) {
    if (const J* v = get(key)) out = json_string(*v, at(key), allowed);
  }

 private:
  const J& j_;
  std::string where_;
  JsonNaming naming_;
  std::set<std::string> used_;
};

// ---- lenient getters (documents of other tools: a missing or mistyped value gives the default) ----
template <class J>
double json_number_or(const J& o, const char* key, double dflt) {
  if (!o.is_object()) return dflt;
  auto it = o.find(key);
  if (it == o.end() || !it->is_number()) return dflt;
  return it->template get<double>();
}
template <class J>
int64_t json_int_or(const J& o, const char* key, int64_t dflt) {
  if (!o.is_object()) return dflt;
  auto it = o.find(key);
  if (it == o.end() || !it->is_number()) return dflt;
  return it->is_number_float() ? (int64_t)std::llround(it->template get<double>()) : it->template get<int64_t>();
}
// A string, or an integer written as a string; else the default.
template <class J>
std::string json_string_or(const J& o, const char* key, const std::string& dflt = "") {
  if (!o.is_object()) return dflt;
  auto it = o.find(key);
  if (it == o.end()) return dflt;
  if (it->is_string()) return it->template get<std::string>();
  if (it->is_number_integer()) return std::to_string(it->template get<int64_t>());
  return dflt;
}

// Parses JSON text; a syntax error is a JsonError "<origin>: <prefix><parser message>".
template <class J = nlohmann::json>
J json_parse(const std::string& text, const std::string& origin, const std::string& prefix = "invalid JSON: ") {
  try {
    return J::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw JsonError((origin.empty() ? std::string() : origin + ": ") + prefix + e.what());
  }
}

}  // namespace mmoc
