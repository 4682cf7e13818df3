// One table per header struct of a Plan: its keys, in the order both forms write them, each bound to a member and
// to how that member reads and writes in JSON and in text. The JSON form (plan_json.cpp) and the text form
// (plan_text.cpp) iterate these tables, so adding a header field is one line here (and one in docs/plan-format.md).
// Internal to ir/.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ir/plan.hpp"

namespace mmoc::ir::detail {

using ojson = nlohmann::ordered_json;

// ---- the value forms of the text form (errors are ParseError "'<key>': ...") ----------------
std::string text_str(const std::string& s);  // bare, or a JSON string literal when it must be quoted
std::string decode_text_str(const std::string& v, const std::string& key);
int text_int(const std::string& v, const std::string& key);
int64_t text_int64(const std::string& v, const std::string& key);
double text_double(const std::string& v, const std::string& key);
bool text_bool(const std::string& v, const std::string& key);  // 0 | 1
template <class T>
std::vector<T> text_ints(const std::string& v, const std::string& key);  // comma-separated, empty = none
template <class T>
std::string join_ints(const std::vector<T>& v);

// ---- JSON values (errors are common/json.hpp's JsonError naming the JSON path) ----------------
ojson json_double(double d);  // non-finite as "inf", "-inf", "nan"

// ---- the tables -------------------------------------------------------------------------------
template <class S>
struct Field {
  const char* key;  // the same key in JSON and in text
  void (*write_json)(const S&, ojson& obj, const char* key);
  void (*read_json)(S&, const ojson& value, const std::string& where);
  std::string (*print)(const S&);                                  // the text value
  void (*parse)(S&, const std::string& value, const char* key);    // throws ParseError
  // Optional fields only: true when the member has its default value; both forms then leave the key out, and a
  // missing key leaves the default (so plans that do not use the field print as before).
  bool (*is_default)(const S&) = nullptr;
};

const std::vector<Field<Plan>>& plan_fields();            // the `plan` line / "plan" object
const std::vector<Field<ModelArch>>& model_fields();      // `model` / "model"
const std::vector<Field<TrainConfig>>& train_fields();    // `train` / "train"
const std::vector<Field<Stage>>& stage_fields();          // `stage S<id> ...` / "stages"[i] after "id"
const std::vector<Field<BufferDecl>>& buffer_fields();    // `buffer <name> ...` / "buffers"[i] after "buf"
const std::vector<Field<Predicted>>& predicted_fields();  // `predicted` / "predicted"

template <class S>
std::vector<const char*> field_keys(const std::vector<Field<S>>& fs) {
  std::vector<const char*> k;
  for (const auto& f : fs) k.push_back(f.key);
  return k;
}

}  // namespace mmoc::ir::detail
