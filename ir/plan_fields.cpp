// The header field tables (plan_fields.hpp) and the value forms both plan forms share.
#include "ir/plan_fields.hpp"

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/json.hpp"
#include "ir/plan_detail.hpp"

namespace mmoc::ir::detail {

// ============================================================================================
// text values
// ============================================================================================
// Strings print bare when they consist of printable ASCII without '"' and '\\'; otherwise (spaces,
// quotes, control or non-ASCII bytes) as a JSON string literal.
std::string text_str(const std::string& s) {
  bool bare = true;
  for (unsigned char c : s)
    if (c <= 0x20 || c >= 0x7f || c == '"' || c == '\\') bare = false;
  return bare ? s : ojson(s).dump();
}

std::string decode_text_str(const std::string& v, const std::string& key) {
  if (v.empty() || v[0] != '"') return v;
  try {
    auto j = ojson::parse(v);
    if (j.is_string()) return j.get<std::string>();
  } catch (const nlohmann::json::exception&) {
  }
  throw ParseError("bad quoted string for '" + key + "': " + v);
}

int text_int(const std::string& v, const std::string& key) {
  int x = 0;
  if (!parse_int_exact(v, x)) throw ParseError("'" + key + "': expected integer, got '" + v + "'");
  return x;
}
int64_t text_int64(const std::string& v, const std::string& key) {
  int64_t x = 0;
  if (!parse_int_exact(v, x)) throw ParseError("'" + key + "': expected integer, got '" + v + "'");
  return x;
}
double text_double(const std::string& v, const std::string& key) {
  double x = 0;
  if (!parse_double_exact(v, x)) throw ParseError("'" + key + "': expected number, got '" + v + "'");
  return x;
}
bool text_bool(const std::string& v, const std::string& key) {
  if (v == "1") return true;
  if (v == "0") return false;
  throw ParseError("'" + key + "': expected 0 or 1, got '" + v + "'");
}
template <class T>
std::vector<T> text_ints(const std::string& v, const std::string& key) {
  std::vector<T> out;
  if (v.empty()) return out;
  size_t b = 0;
  for (;;) {
    auto c = v.find(',', b);
    std::string part = v.substr(b, c == std::string::npos ? std::string::npos : c - b);
    T x{};
    if (!parse_int_exact(part, x)) throw ParseError("'" + key + "': expected comma-separated integers, got '" + v + "'");
    out.push_back(x);
    if (c == std::string::npos) break;
    b = c + 1;
  }
  return out;
}
template std::vector<int> text_ints<int>(const std::string&, const std::string&);
template std::vector<int64_t> text_ints<int64_t>(const std::string&, const std::string&);

template <class T>
std::string join_ints(const std::vector<T>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}
template std::string join_ints<int>(const std::vector<int>&);
template std::string join_ints<int64_t>(const std::vector<int64_t>&);

ojson json_double(double d) {
  if (std::isfinite(d)) return ojson(d);
  if (std::isnan(d)) return ojson("nan");
  return ojson(d > 0 ? "inf" : "-inf");
}

namespace {
// ============================================================================================
// how each member type reads and writes (Codec<T>)
// ============================================================================================
template <class T>
struct Codec;

template <>
struct Codec<int> {
  static ojson to_json(int x) { return x; }
  static int from_json(const ojson& v, const std::string& where) { return json_int32(v, where); }
  static std::string print(int x) { return std::to_string(x); }
  static int parse(const std::string& v, const char* key) { return text_int(v, key); }
};
template <>
struct Codec<int64_t> {
  static ojson to_json(int64_t x) { return x; }
  static int64_t from_json(const ojson& v, const std::string& where) { return json_int(v, where); }
  static std::string print(int64_t x) { return std::to_string(x); }
  static int64_t parse(const std::string& v, const char* key) { return text_int64(v, key); }
};
template <>
struct Codec<double> {
  static ojson to_json(double x) { return json_double(x); }
  static double from_json(const ojson& v, const std::string& where) {
    return json_number(v, where, JsonNumberRule{.nonfinite_strings = true});
  }
  static std::string print(double x) { return format_double(x); }
  static double parse(const std::string& v, const char* key) { return text_double(v, key); }
};
template <>
struct Codec<bool> {
  static ojson to_json(bool x) { return x; }
  static bool from_json(const ojson& v, const std::string& where) { return json_bool(v, where); }
  static std::string print(bool x) { return x ? "1" : "0"; }
  static bool parse(const std::string& v, const char* key) { return text_bool(v, key); }
};
template <>
struct Codec<std::string> {
  static ojson to_json(const std::string& x) { return x; }
  static std::string from_json(const ojson& v, const std::string& where) { return json_string(v, where); }
  static std::string print(const std::string& x) { return text_str(x); }
  static std::string parse(const std::string& v, const char* key) { return decode_text_str(v, key); }
};
template <class I>
struct IntsCodec {
  static ojson to_json(const std::vector<I>& x) { return x; }
  static std::vector<I> from_json(const ojson& v, const std::string& where) {
    return json_array<I>(v, where, [](const ojson& e, const std::string& w) { return Codec<I>::from_json(e, w); });
  }
  static std::string print(const std::vector<I>& x) { return join_ints(x); }
  static std::vector<I> parse(const std::string& v, const char* key) { return text_ints<I>(v, key); }
};
template <>
struct Codec<std::vector<int>> : IntsCodec<int> {};
template <>
struct Codec<std::vector<int64_t>> : IntsCodec<int64_t> {};
// Lists of paths and of numbers: JSON arrays; text comma-separated (a path holding a comma cannot be listed, as on
// the command line's --nvme A,B).
std::vector<std::string> split_commas(const std::string& v) {
  std::vector<std::string> out;
  if (v.empty()) return out;
  size_t b = 0;
  for (;;) {
    auto c = v.find(',', b);
    out.push_back(v.substr(b, c == std::string::npos ? std::string::npos : c - b));
    if (c == std::string::npos) break;
    b = c + 1;
  }
  return out;
}
template <>
struct Codec<std::vector<std::string>> {
  static ojson to_json(const std::vector<std::string>& x) { return x; }
  static std::vector<std::string> from_json(const ojson& v, const std::string& where) {
    return json_array<std::string>(v, where, [](const ojson& e, const std::string& w) { return json_string(e, w); });
  }
  static std::string print(const std::vector<std::string>& x) {
    std::string s;
    for (size_t i = 0; i < x.size(); ++i) s += (i ? "," : "") + x[i];
    return text_str(s);
  }
  static std::vector<std::string> parse(const std::string& v, const char* key) { return split_commas(decode_text_str(v, key)); }
};
template <>
struct Codec<std::vector<double>> {
  static ojson to_json(const std::vector<double>& x) {
    ojson a = ojson::array();
    for (double d : x) a.push_back(json_double(d));
    return a;
  }
  static std::vector<double> from_json(const ojson& v, const std::string& where) {
    return json_array<double>(v, where, [](const ojson& e, const std::string& w) { return Codec<double>::from_json(e, w); });
  }
  static std::string print(const std::vector<double>& x) {
    std::string s;
    for (size_t i = 0; i < x.size(); ++i) s += (i ? "," : "") + format_double(x[i]);
    return s;
  }
  static std::vector<double> parse(const std::string& v, const char* key) {
    std::vector<double> out;
    for (const auto& part : split_commas(v)) out.push_back(text_double(part, key));
    return out;
  }
};
// Enums: by name (ir::to_string / ir::parse_*).
template <class E, E (*Parse)(const std::string&)>
struct EnumCodec {
  static ojson to_json(E x) { return to_string(x); }
  static E from_json(const ojson& v, const std::string& where) {
    std::string s = json_string(v, where);
    try {
      return Parse(s);
    } catch (const ParseError& e) {
      json_fail(where, e.what());
    }
  }
  static std::string print(E x) { return to_string(x); }
  static E parse(const std::string& v, const char* key) {
    try {
      return Parse(v);
    } catch (const ParseError& e) {
      throw ParseError("'" + std::string(key) + "': " + e.what());
    }
  }
};
template <>
struct Codec<Residency> : EnumCodec<Residency, parse_residency> {};
template <>
struct Codec<OptimPlace> : EnumCodec<OptimPlace, parse_optim_place> {};
template <>
struct Codec<Tier> : EnumCodec<Tier, parse_tier> {};

template <class M>
struct MemberOf;
template <class S, class T>
struct MemberOf<T S::*> {
  using Struct = S;
  using Type = T;
};

// A field bound to member M (a pointer to member), read and written by Codec<its type>.
template <auto M>
Field<typename MemberOf<decltype(M)>::Struct> field(const char* key) {
  using S = typename MemberOf<decltype(M)>::Struct;
  using C = Codec<typename MemberOf<decltype(M)>::Type>;
  return Field<S>{key,
                  [](const S& s, ojson& o, const char* k) { o[k] = C::to_json(s.*M); },
                  [](S& s, const ojson& v, const std::string& where) { s.*M = C::from_json(v, where); },
                  [](const S& s) { return C::print(s.*M); },
                  [](S& s, const std::string& v, const char* k) { s.*M = C::parse(v, k); }};
}

// A field written only when it differs from the struct's default.
template <auto M>
Field<typename MemberOf<decltype(M)>::Struct> optional_field(const char* key) {
  using S = typename MemberOf<decltype(M)>::Struct;
  auto f = field<M>(key);
  f.is_default = [](const S& s) { return s.*M == S{}.*M; };
  return f;
}

// A stage's layer range: JSON [begin, end], text <begin>-<end>.
Field<Stage> layers_field() {
  return Field<Stage>{
      "layers",
      [](const Stage& s, ojson& o, const char* k) { o[k] = {s.layer_begin, s.layer_end}; },
      [](Stage& s, const ojson& v, const std::string& where) {
        auto layers = json_array<int>(v, where, [](const ojson& e, const std::string& w) { return json_int32(e, w); });
        if (layers.size() != 2) json_fail(where, "expected [begin, end], got " + std::to_string(layers.size()) + " values");
        s.layer_begin = layers[0];
        s.layer_end = layers[1];
      },
      [](const Stage& s) { return std::to_string(s.layer_begin) + "-" + std::to_string(s.layer_end); },
      [](Stage& s, const std::string& v, const char* k) {
        auto dash = v.find('-', 1);
        if (dash == std::string::npos) throw ParseError("'layers': expected <begin>-<end>, got '" + v + "'");
        s.layer_begin = text_int(v.substr(0, dash), k);
        s.layer_end = text_int(v.substr(dash + 1), k);
      }};
}
// A stage's recompute choice (after "layers", which it reads): JSON false | true | <k>, text 0 | 1 | <k>/<layers>, where
// k (0 < k < layers) is the number of the stage's first layers that recompute; the others keep their stash
// (Stage::keep_layers). Whole-stage choices print as before partial recompute existed.
void set_recompute_layers(Stage& s, int64_t k, int64_t n, const std::string& what) {
  if (n != s.layers()) throw ParseError(what + ": " + std::to_string(n) + " layers, but the stage has " + std::to_string(s.layers()));
  if (k < 0 || k > n) throw ParseError(what + ": recomputed layers " + std::to_string(k) + " outside 0.." + std::to_string(n));
  s.recompute = k > 0;
  s.keep_layers = k > 0 ? (int)(n - k) : 0;
}
Field<Stage> recompute_field() {
  return Field<Stage>{
      "recompute",
      [](const Stage& s, ojson& o, const char* k) {
        if (s.recompute && s.keep_layers != 0) o[k] = s.recompute_layers();
        else o[k] = s.recompute;
      },
      [](Stage& s, const ojson& v, const std::string& where) {
        if (v.is_boolean()) {
          s.recompute = v.get<bool>();
          s.keep_layers = 0;
          return;
        }
        if (!v.is_number_integer()) json_fail(where, "expected true, false or the number of recomputed layers, got " + json_describe(v));
        try {
          set_recompute_layers(s, v.get<int64_t>(), s.layers(), "recompute");
        } catch (const ParseError& e) {
          json_fail(where, e.what());
        }
      },
      [](const Stage& s) {
        if (!s.recompute) return std::string("0");
        if (s.keep_layers == 0) return std::string("1");
        return std::to_string(s.recompute_layers()) + "/" + std::to_string(s.layers());
      },
      [](Stage& s, const std::string& v, const char* k) {
        auto slash = v.find('/');
        if (slash == std::string::npos) {
          s.recompute = text_bool(v, k);
          s.keep_layers = 0;
          return;
        }
        const std::string what = std::string("'") + k + "'";
        set_recompute_layers(s, text_int(v.substr(0, slash), k), text_int(v.substr(slash + 1), k), what);
      }};
}
}  // namespace

// ============================================================================================
// the tables (key order = the order both forms write them)
// ============================================================================================
const std::vector<Field<Plan>>& plan_fields() {
  static const std::vector<Field<Plan>> f = {
      field<&Plan::hardware>("hardware"),     field<&Plan::schedule>("schedule"),
      field<&Plan::gpus>("gpus"),             field<&Plan::v>("v"),
      field<&Plan::dp>("dp"),                 field<&Plan::microbatches>("microbatches"),
      field<&Plan::micro_batch_size>("mbs"),  field<&Plan::seq_len>("seq"),
      field<&Plan::budget_bytes>("budget"),   field<&Plan::gpu_order>("order"),
      optional_field<&Plan::tp>("tp"),
      optional_field<&Plan::host_bytes>("host"),  // absent in plans made before it: they load with none
      // the NVMe tier (written only when used, so other plans print as before)
      optional_field<&Plan::host_budget_bytes>("host_budget"),
      optional_field<&Plan::nvme>("nvme"),
      optional_field<&Plan::nvme_weights>("nvme_weights"),
      // the alternating update order (two step bodies): written only then
      optional_field<&Plan::carry_even>("carry_even"),
      optional_field<&Plan::carry_odd>("carry_odd"),
  };
  return f;
}

const std::vector<Field<ModelArch>>& model_fields() {
  static const std::vector<Field<ModelArch>> f = {
      field<&ModelArch::name>("name"),         field<&ModelArch::layers>("layers"),
      field<&ModelArch::hidden>("hidden"),     field<&ModelArch::ffn>("ffn"),
      field<&ModelArch::heads>("heads"),       field<&ModelArch::kv_heads>("kv_heads"),
      field<&ModelArch::vocab>("vocab"),       field<&ModelArch::rope_theta>("rope_theta"),
      field<&ModelArch::norm_eps>("norm_eps"), field<&ModelArch::tied_embeddings>("tied"),
      // family and features (arch/arch.hpp): written only where they differ from the default, so LLaMA plans print as before
      optional_field<&ModelArch::family>("family"),
      optional_field<&ModelArch::head_dim>("head_dim"),
      optional_field<&ModelArch::max_positions>("max_positions"),
      optional_field<&ModelArch::sliding_window>("sliding_window"),
      optional_field<&ModelArch::qkv_bias>("qkv_bias"),
      optional_field<&ModelArch::qk_norm>("qk_norm"),
      optional_field<&ModelArch::rope_type>("rope_type"),
      optional_field<&ModelArch::rope_factor>("rope_factor"),
      optional_field<&ModelArch::rope_low_freq_factor>("rope_low_freq_factor"),
      optional_field<&ModelArch::rope_high_freq_factor>("rope_high_freq_factor"),
      optional_field<&ModelArch::rope_original_max_positions>("rope_original_max_positions"),
  };
  return f;
}

const std::vector<Field<TrainConfig>>& train_fields() {
  static const std::vector<Field<TrainConfig>> f = {
      field<&TrainConfig::precision>("precision"),     field<&TrainConfig::lr>("lr"),
      field<&TrainConfig::beta1>("beta1"),             field<&TrainConfig::beta2>("beta2"),
      field<&TrainConfig::eps>("eps"),                 field<&TrainConfig::weight_decay>("wd"),
      field<&TrainConfig::max_grad_norm>("clip"),      field<&TrainConfig::lr_schedule>("lr_schedule"),
      field<&TrainConfig::warmup_steps>("warmup"),     field<&TrainConfig::total_steps>("total"),
      field<&TrainConfig::seed>("seed"),               optional_field<&TrainConfig::on_nonfinite>("on_nonfinite"),
  };
  return f;
}

const std::vector<Field<Stage>>& stage_fields() {
  static const std::vector<Field<Stage>> f = {
      field<&Stage::gpu>("gpu"),         layers_field(),
      recompute_field(),                 optional_field<&Stage::selective>("selective"),
      field<&Stage::weights>("weights"),
      field<&Stage::optim>("optim"),     field<&Stage::params>("params"),
      field<&Stage::fwd_ws>("fwd_ws"),   field<&Stage::bwd_ws>("bwd_ws"),
      field<&Stage::fwd_ms>("fwd_ms"),   field<&Stage::bwd_ms>("bwd_ms"),
  };
  return f;
}

const std::vector<Field<BufferDecl>>& buffer_fields() {
  static const std::vector<Field<BufferDecl>> f = {
      field<&BufferDecl::bytes>("bytes"),
      field<&BufferDecl::home>("home"),
  };
  return f;
}

const std::vector<Field<Predicted>>& predicted_fields() {
  static const std::vector<Field<Predicted>> f = {
      field<&Predicted::step_s>("step_s"),       field<&Predicted::tokens_per_s>("tokens_per_s"),
      field<&Predicted::bubble>("bubble"),       field<&Predicted::peak_bytes>("peak"),
      field<&Predicted::bound_bytes>("bound"),
  };
  return f;
}

}  // namespace mmoc::ir::detail

namespace mmoc::ir {
std::vector<std::pair<std::string, std::string>> header_fields(const Plan& p) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& f : detail::plan_fields()) out.emplace_back(f.key, f.print(p));
  return out;
}
}  // namespace mmoc::ir
