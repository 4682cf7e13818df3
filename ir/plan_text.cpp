// The text form of a Plan (docs/plan-format.md, "Text form").
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "ir/plan.hpp"
#include "ir/ops.hpp"
#include "ir/plan_detail.hpp"
#include "ir/plan_fields.hpp"

namespace mmoc::ir {
using namespace detail;

// ============================================================================================
// text form
// ============================================================================================

static std::string bucket_suffix(const Instr& in) {
  if (in.buckets == 0 && in.bucket == 0) return "";
  return "[" + std::to_string(in.bucket + 1) + "/" + std::to_string(in.buckets) + "]";
}

std::string print_op(const Instr& in) {
  std::string s = to_string(in.op);
  for (const SyntaxToken& tok : syntax_tokens(in.op)) {
    switch (tok.part) {
      case SyntaxPart::Stage:  // an op without a buffer operand carries its bucket here (optim S3[2/8])
        s += " S" + std::to_string(in.stage) + (op_has_buf(in.op) ? std::string() : bucket_suffix(in));
        break;
      case SyntaxPart::Mb: s += " m" + std::to_string(in.mb); break;
      case SyntaxPart::Buf: s += " " + (in.buf ? in.buf->str() : std::string("?")) + bucket_suffix(in); break;
      case SyntaxPart::Peer: s += " g" + std::to_string(in.peer); break;
      case SyntaxPart::SourceTier: s += " host"; break;
      case SyntaxPart::Word: s += " " + tok.word; break;
      case SyntaxPart::ToHost: if (in.to_host) s += " -> host"; break;
    }
  }
  if (in.seg != -1) s += " seg=" + std::to_string(in.seg);  // a tensor-parallel segment or its collective
  return s;
}

std::string print_instr(const Instr& in, int index) {
  std::string s = "%" + std::to_string(index) + " = " + print_op(in);
  s += " @";
  s += to_string(in.stream);
  if (!in.after.empty()) {
    s += " after(";
    for (size_t i = 0; i < in.after.size(); ++i) s += (i ? ",%" : "%") + std::to_string(in.after[i]);
    s += ")";
  }
  if (!in.tag.empty()) s += " tag=" + text_str(in.tag);
  if (!in.group.empty()) s += " group=" + text_str(in.group);
  // Fields that this op's syntax does not carry (normally unset; kept so the text form is lossless).
  if (!op_has_stage(in.op) && in.stage != -1) s += " stage=" + std::to_string(in.stage);
  if (!op_has_mb(in.op) && in.mb != -1) s += " mb=" + std::to_string(in.mb);
  if (!op_has_buf(in.op) && in.buf) s += " buf=" + in.buf->str();
  if (!op_has_buf(in.op) && !op_has_stage(in.op) && (in.buckets != 0 || in.bucket != 0)) s += " bucket=" + bucket_suffix(in);
  if (!op_has_peer(in.op) && in.peer != -1) s += " peer=" + std::to_string(in.peer);
  if (!(op_info(in.op).operands & kOpToHost) && in.to_host) s += " to_host=1";
  return s;
}

namespace {
// " key=value" for each field of the table.
template <class S>
std::string print_fields(const S& s, const std::vector<Field<S>>& fields) {
  std::string o;
  for (const auto& f : fields)
    if (!f.is_default || !f.is_default(s)) o += std::string(" ") + f.key + "=" + f.print(s);
  return o;
}
}  // namespace

std::string print_text(const Plan& p) {
  std::string o;
  o += "plan" + print_fields(p, plan_fields()) + "\n";
  o += "model" + print_fields(p.model, model_fields()) + "\n";
  o += "train" + print_fields(p.train, train_fields()) + "\n";
  for (const auto& s : p.stages) o += "stage S" + std::to_string(s.id) + print_fields(s, stage_fields()) + "\n";
  for (const auto& b : p.buffers) o += "buffer " + decl_str(b) + print_fields(b, buffer_fields()) + "\n";
  if (p.predicted) o += "predicted" + print_fields(*p.predicted, predicted_fields()) + "\n";
  if (p.programs.empty()) o += "programs none\n";  // a plan before its programs are made (not a truncated one)
  for (int body = 0; body < num_bodies(p); ++body)  // the odd-step bodies (alternating update order): 'gpu gK odd {'
    for (const auto& pg : body ? p.odd_programs : p.programs) {
      o += "gpu g" + std::to_string(pg.gpu) + (body ? " odd {\n" : " {\n");
      for (size_t i = 0; i < pg.instrs.size(); ++i) o += "  " + print_instr(pg.instrs[i], (int)i) + "\n";
      o += "}\n";
    }
  return o;
}

namespace {
// Error inside one line; the caller adds the line number and the line text.
struct LineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Splits on blanks; a '"' starts a JSON string literal that runs to the matching unescaped '"'.
std::vector<std::string> tokenize(const std::string& line) {
  std::vector<std::string> toks;
  size_t i = 0, n = line.size();
  while (i < n) {
    while (i < n && (line[i] == ' ' || line[i] == '\t')) ++i;
    if (i >= n) break;
    std::string tok;
    while (i < n && line[i] != ' ' && line[i] != '\t') {
      if (line[i] == '"') {
        tok += line[i++];
        bool closed = false;
        while (i < n) {
          char c = line[i++];
          tok += c;
          if (c == '\\' && i < n) {
            tok += line[i++];
          } else if (c == '"') {
            closed = true;
            break;
          }
        }
        if (!closed) throw LineError("unterminated string");
      } else {
        tok += line[i++];
      }
    }
    toks.push_back(std::move(tok));
  }
  return toks;
}

template <class F>
auto to_enum(const std::string& v, const std::string& key, F parse) {
  try {
    return parse(v);
  } catch (const ParseError& e) {
    throw LineError("'" + key + "': " + e.what());
  }
}

// Parses "<prefix><int>" (the int may be negative).
int prefixed_int(const std::string& tok, const char* prefix, const char* what) {
  size_t n = std::strlen(prefix);
  int x = 0;
  if (tok.compare(0, n, prefix) != 0 || !parse_int_exact(std::string_view(tok).substr(n), x))
    throw LineError(std::string("expected ") + what + " (" + prefix + "<n>), got '" + tok + "'");
  return x;
}

// key=value fields of a header line: all of `keys` required, no others, no repeats.
class KV {
 public:
  // keys: required; optional: allowed, may be missing
  KV(const std::vector<std::string>& toks, size_t first, const std::vector<const char*>& keys, const char* line_kind,
     const std::vector<const char*>& optional = {}) {
    std::set<std::string> allowed(keys.begin(), keys.end());
    allowed.insert(optional.begin(), optional.end());
    for (size_t i = first; i < toks.size(); ++i) {
      auto eq = toks[i].find('=');
      if (eq == std::string::npos || eq == 0) throw LineError("expected key=value, got '" + toks[i] + "'");
      std::string k = toks[i].substr(0, eq);
      if (!allowed.count(k)) throw LineError(std::string("unknown key '") + k + "' in " + line_kind + " line");
      if (!map_.emplace(k, toks[i].substr(eq + 1)).second) throw LineError("key '" + k + "' given twice");
    }
    for (const char* k : keys)
      if (!map_.count(k)) throw LineError(std::string("missing key '") + k + "' in " + line_kind + " line");
  }
  const std::string& raw(const char* k) const { return map_.at(k); }
  bool has(const char* k) const { return map_.count(k) != 0; }

 private:
  std::map<std::string, std::string> map_;
};

// The key=value tokens from `first` on: every key of the table once, no other (KV), each parsed by its field.
template <class S>
void parse_fields(const std::vector<std::string>& toks, size_t first, S& s, const std::vector<Field<S>>& fields,
                  const char* line_kind) {
  std::vector<const char*> required, optional;
  for (const auto& f : fields) (f.is_default ? optional : required).push_back(f.key);
  KV kv(toks, first, required, line_kind, optional);
  for (const auto& f : fields)
    if (kv.has(f.key)) f.parse(s, kv.raw(f.key), f.key);
}

BufRef to_buf(const std::string& tok) {
  try {
    return BufRef::parse(tok);
  } catch (const ParseError& e) {
    throw LineError(e.what());
  }
}

// "[k/n]" (1-based k) into in.bucket (0-based) and in.buckets
void parse_bucket(const std::string& v, Instr& in) {
  auto slash = v.find('/');
  if (v.size() < 5 || v.front() != '[' || v.back() != ']' || slash == std::string::npos)
    throw LineError("bad bucket '" + v + "' (expected [<k>/<n>], e.g. [2/4])");
  try {
    in.bucket = text_int(v.substr(1, slash - 1), "bucket") - 1;
    in.buckets = text_int(v.substr(slash + 1, v.size() - slash - 2), "bucket");
  } catch (const ParseError& e) {
    throw LineError(e.what());
  }
}

Instr parse_instr_tokens(const std::vector<std::string>& t, int expect_index) {
  if (t.size() < 3 || t[1] != "=") throw LineError("expected '%<i> = <op> ...'");
  int idx = prefixed_int(t[0], "%", "instruction index");
  if (idx != expect_index)
    throw LineError("instruction index %" + std::to_string(idx) + " out of sequence (expected %" +
                    std::to_string(expect_index) + ")");
  Instr in;
  try {
    in.op = parse_op(t[2]);
  } catch (const ParseError& e) {
    throw LineError(e.what());
  }
  size_t k = 3;
  auto next = [&](const char* what) -> const std::string& {
    if (k >= t.size()) throw LineError(std::string("missing ") + what + " for " + to_string(in.op));
    return t[k++];
  };
  auto expect = [&](const char* word) {
    const std::string& w = next(word);
    if (w != word) throw LineError(std::string("expected '") + word + "', got '" + w + "'");
  };
  for (const SyntaxToken& tok : syntax_tokens(in.op)) {
    switch (tok.part) {
      case SyntaxPart::Stage: {
        std::string st = next("stage");
        if (auto br = st.find('['); br != std::string::npos && !op_has_buf(in.op)) {  // optim S3[2/8]
          parse_bucket(st.substr(br), in);
          st.resize(br);
        }
        in.stage = prefixed_int(st, "S", "stage");
        break;
      }
      case SyntaxPart::Mb: in.mb = prefixed_int(next("micro-batch"), "m", "micro-batch"); break;
      case SyntaxPart::Buf: {
        std::string b = next("buffer");
        if (auto br = b.find('['); br != std::string::npos) {  // a bucket of the buffer: wgrad(S8)[2/4]
          parse_bucket(b.substr(br), in);
          b.resize(br);
        }
        if (b != "?") in.buf = to_buf(b);
        break;
      }
      case SyntaxPart::Peer: in.peer = prefixed_int(next("peer"), "g", "peer gpu"); break;
      case SyntaxPart::SourceTier:  // informational: the buffer table's home decides
        to_enum(next("source tier"), std::string(to_string(in.op)) + " source", parse_tier);
        break;
      case SyntaxPart::Word: expect(tok.word.c_str()); break;
      case SyntaxPart::ToHost:
        if (k < t.size() && t[k] == "->") {
          ++k;
          expect("host");
          in.to_host = true;
        }
        break;
    }
  }
  bool have_stream = false, have_after = false;
  std::set<std::string> seen;
  for (; k < t.size(); ++k) {
    const std::string& w = t[k];
    if (w.size() > 1 && w[0] == '@') {
      if (have_stream) throw LineError("stream given twice");
      in.stream = to_enum(w.substr(1), "stream", parse_stream);
      have_stream = true;
    } else if (w.rfind("after(", 0) == 0) {
      if (have_after) throw LineError("after(...) given twice");
      if (w.back() != ')') throw LineError("bad dependency list '" + w + "'");
      std::string inner = w.substr(6, w.size() - 7);
      size_t b = 0;
      while (b <= inner.size() && !inner.empty()) {
        auto c = inner.find(',', b);
        std::string part = inner.substr(b, c == std::string::npos ? std::string::npos : c - b);
        in.after.push_back(prefixed_int(part, "%", "instruction reference"));
        if (c == std::string::npos) break;
        b = c + 1;
      }
      have_after = true;
    } else if (auto eq = w.find('='); eq != std::string::npos && eq > 0) {
      std::string key = w.substr(0, eq), val = w.substr(eq + 1);
      if (!seen.insert(key).second) throw LineError("'" + key + "' given twice");
      if (key == "tag") {
        in.tag = decode_text_str(val, key);
      } else if (key == "group") {
        in.group = decode_text_str(val, key);
      } else if (key == "seg") {
        in.seg = text_int(val, key);
      } else if (key == "stage" && !op_has_stage(in.op)) {
        in.stage = text_int(val, key);
      } else if (key == "mb" && !op_has_mb(in.op)) {
        in.mb = text_int(val, key);
      } else if (key == "buf" && !op_has_buf(in.op)) {
        in.buf = to_buf(val);
      } else if (key == "bucket" && !op_has_buf(in.op) && !op_has_stage(in.op)) {
        parse_bucket(val, in);
      } else if (key == "peer" && !op_has_peer(in.op)) {
        in.peer = text_int(val, key);
      } else if (key == "to_host" && !(op_info(in.op).operands & kOpToHost)) {
        in.to_host = text_bool(val, key);
      } else {
        throw LineError("unexpected '" + w + "' for " + to_string(in.op));
      }
    } else {
      throw LineError("unexpected '" + w + "'");
    }
  }
  if (!have_stream) throw LineError("missing @<stream>");
  return in;
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}
}  // namespace

Plan parse_text(const std::string& text) {
  Plan p;
  bool have_plan = false, have_model = false, have_train = false, no_programs = false;
  Program* cur = nullptr;
  int cur_open_line = 0;
  int lineno = 0;
  size_t pos = 0;
  std::string line;
  auto fail = [&](const std::string& msg) -> ParseError {
    std::string hint;
    if (pos >= text.size() && !text.empty() && text.back() != '\n') hint = " (the text ends inside this line: truncated?)";
    return ParseError("line " + std::to_string(lineno) + ": " + msg + " (in: `" + line + "`)" + hint);
  };
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string raw = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
    ++lineno;
    line = trim(raw);
    if (line.empty() || line[0] == ';') continue;
    try {
      auto t = tokenize(line);
      const std::string& head = t[0];
      if (cur) {
        if (t.size() == 1 && head == "}") {
          cur = nullptr;
          continue;
        }
        if (head.empty() || head[0] != '%')
          throw LineError("expected an instruction or '}' closing gpu g" + std::to_string(cur->gpu) + " (opened on line " +
                          std::to_string(cur_open_line) + ")");
        cur->instrs.push_back(parse_instr_tokens(t, (int)cur->instrs.size()));
        continue;
      }
      if (head == "plan") {
        if (have_plan) throw LineError("second 'plan' line");
        parse_fields(t, 1, p, plan_fields(), "plan");
        have_plan = true;
      } else if (head == "model") {
        if (have_model) throw LineError("second 'model' line");
        parse_fields(t, 1, p.model, model_fields(), "model");
        have_model = true;
      } else if (head == "train") {
        if (have_train) throw LineError("second 'train' line");
        parse_fields(t, 1, p.train, train_fields(), "train");
        have_train = true;
      } else if (head == "stage") {
        if (t.size() < 2) throw LineError("expected 'stage S<i> ...'");
        Stage s;
        s.id = prefixed_int(t[1], "S", "stage id");
        parse_fields(t, 2, s, stage_fields(), "stage");
        p.stages.push_back(s);
      } else if (head == "buffer") {
        if (t.size() < 2) throw LineError("expected 'buffer <name> bytes=... home=...'");
        BufferDecl d;
        try {
          parse_decl_name(t[1], d);
        } catch (const ParseError& e) {
          throw LineError(e.what());
        }
        parse_fields(t, 2, d, buffer_fields(), "buffer");
        p.buffers.push_back(d);
      } else if (head == "predicted") {
        if (p.predicted) throw LineError("second 'predicted' line");
        Predicted pr;
        parse_fields(t, 1, pr, predicted_fields(), "predicted");
        p.predicted = std::move(pr);
      } else if (head == "programs") {
        if (t.size() != 2 || t[1] != "none") throw LineError("expected 'programs none'");
        if (no_programs || !p.programs.empty()) throw LineError("'programs none' with gpu blocks");
        no_programs = true;
      } else if (head == "gpu") {
        if (no_programs) throw LineError("'gpu' block after 'programs none'");
        const bool odd = t.size() == 4 && t[2] == "odd";
        if (!(t.size() == 3 || odd) || t.back() != "{") throw LineError("expected 'gpu g<k> {' or 'gpu g<k> odd {'");
        if (!odd && !p.odd_programs.empty()) throw LineError("'gpu g<k> {' after the odd-step blocks");
        Program pg;
        pg.gpu = prefixed_int(t[1], "g", "gpu");
        auto& list = odd ? p.odd_programs : p.programs;
        list.push_back(std::move(pg));
        cur = &list.back();
        cur_open_line = lineno;
      } else {
        throw LineError("unknown line kind '" + head + "'");
      }
    } catch (const LineError& e) {
      throw fail(e.what());
    } catch (const ParseError& e) {
      throw fail(e.what());
    }
  }
  line.clear();
  if (cur)
    throw ParseError("line " + std::to_string(lineno) + ": unexpected end of text: gpu g" + std::to_string(cur->gpu) +
                     " opened on line " + std::to_string(cur_open_line) + " is not closed with '}' (truncated?)");
  if (!have_plan) throw ParseError("missing 'plan' line");
  if (!have_model) throw ParseError("missing 'model' line");
  if (!have_train) throw ParseError("missing 'train' line");
  if (!no_programs && (int)p.programs.size() != p.gpus)
    throw ParseError("line " + std::to_string(lineno) + ": expected " + std::to_string(p.gpus) +
                     " 'gpu' blocks (gpus=" + std::to_string(p.gpus) + "), found " + std::to_string(p.programs.size()) +
                     " (truncated?)");
  if (!p.odd_programs.empty() && (int)p.odd_programs.size() != p.gpus)
    throw ParseError("line " + std::to_string(lineno) + ": expected " + std::to_string(p.gpus) + " 'gpu ... odd' blocks (gpus=" +
                     std::to_string(p.gpus) + "), found " + std::to_string(p.odd_programs.size()) + " (truncated?)");
  return p;
}


}  // namespace mmoc::ir
