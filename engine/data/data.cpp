#include "engine/data/data.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <system_error>

#include <nlohmann/json.hpp>

#include "engine/data/token_file.hpp"
#include "engine/data/tokenizer.hpp"

namespace mmoc::engine::data {
using nlohmann::json;

namespace {

std::string range_str(int64_t vocab) { return "[0, " + std::to_string(vocab) + ")"; }

// Reads an integer array field; `what` names it in messages.
std::vector<int64_t> int_array(const json& j, const char* what, const std::string& where) {
  if (!j.is_array()) throw DataError(where + ": \"" + what + "\" is not an array");
  std::vector<int64_t> out;
  out.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    const json& v = j[i];
    if (!v.is_number_integer())
      throw DataError(where + ": " + what + "[" + std::to_string(i) + "] = " + v.dump() + " is not an integer");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw DataError(where + ": " + what + "[" + std::to_string(i) + "] = " + v.dump() + " is out of range");
    out.push_back(v.get<int64_t>());
  }
  return out;
}

Example token_record(const json& j, int64_t vocab_size, const std::string& where) {
  auto it = j.find("input_ids");
  if (it == j.end()) throw DataError(where + ": missing \"input_ids\"");
  Example e;
  e.input_ids = int_array(*it, "input_ids", where);
  if (e.input_ids.empty()) throw DataError(where + ": \"input_ids\" is empty");
  for (size_t i = 0; i < e.input_ids.size(); ++i)
    if (e.input_ids[i] < 0 || e.input_ids[i] >= vocab_size)
      throw DataError(where + ": input_ids[" + std::to_string(i) + "] = " + std::to_string(e.input_ids[i]) +
                      " is outside the vocabulary " + range_str(vocab_size));
  auto lt = j.find("labels");
  if (lt == j.end() || lt->is_null()) {
    e.labels = e.input_ids;
  } else {
    e.labels = int_array(*lt, "labels", where);
    if (e.labels.size() != e.input_ids.size())
      throw DataError(where + ": \"labels\" has " + std::to_string(e.labels.size()) + " entries but \"input_ids\" has " +
                      std::to_string(e.input_ids.size()));
    for (size_t i = 0; i < e.labels.size(); ++i)
      if (e.labels[i] != kIgnoreIndex && (e.labels[i] < 0 || e.labels[i] >= vocab_size))
        throw DataError(where + ": labels[" + std::to_string(i) + "] = " + std::to_string(e.labels[i]) +
                        " is neither -100 nor in " + range_str(vocab_size));
  }
  auto tt = j.find("truncate");
  if (tt != j.end() && !tt->is_null()) {
    const std::vector<int64_t> r = int_array(*tt, "truncate", where);
    const auto n = static_cast<int64_t>(e.input_ids.size());
    if (r.size() != 2 || r[0] < 0 || r[0] > r[1] || r[1] > n)
      throw DataError(where + ": \"truncate\" must be [begin, end] with 0 <= begin <= end <= " + std::to_string(n) +
                      " (the number of input_ids), got " + tt->dump());
    e.trunc_begin = r[0];
    e.trunc_end = r[1];
  }
  return e;
}

json parse_line(std::string_view line, const std::string& where) {
  json j;
  try {
    j = json::parse(line.begin(), line.end());
  } catch (const json::parse_error& ex) {
    throw DataError(where + ": invalid JSON (" + std::string(ex.what()) + ")");
  }
  if (!j.is_object()) throw DataError(where + ": a line must be a JSON object, got " + std::string(j.type_name()));
  return j;
}

const std::string* string_field(const json& j, const std::string& key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) return nullptr;
  if (!it->is_string()) throw DataError(where + ": \"" + key + "\" is not a string");
  return it->get_ptr<const std::string*>();
}

bool blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; });
}

template <class F>
std::vector<Example> for_each_line(const std::filesystem::path& path, F&& per_line) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path.string() + ": cannot open data file");
  std::vector<Example> out;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (blank(line)) continue;
    out.push_back(per_line(line, path.string() + ":" + std::to_string(lineno)));
  }
  if (in.bad()) throw DataError(path.string() + ": read error after line " + std::to_string(lineno));
  return out;
}

void append(Example& e, int64_t id, int64_t label) {
  e.input_ids.push_back(id);
  e.labels.push_back(label);
}

}  // namespace

// ---- records ----------------------------------------------------------------------------------
Example parse_token_record(std::string_view line, int64_t vocab_size, const std::string& where) {
  return token_record(parse_line(line, where), vocab_size, where);
}

std::vector<Example> load_token_jsonl(const std::filesystem::path& path, int64_t vocab_size) {
  if (vocab_size <= 0) throw DataError(path.string() + ": vocab_size must be positive");
  return for_each_line(path, [&](std::string_view line, const std::string& where) {
    return parse_token_record(line, vocab_size, where);
  });
}

Example make_summary_example(const Tokenizer& tok, std::string_view document, std::string_view summary,
                             const TextTemplate& tmpl) {
  static constexpr std::string_view kDoc = "{document}";
  const auto at = tmpl.prompt.find(kDoc);
  if (at == std::string::npos || tmpl.prompt.find(kDoc, at + 1) != std::string::npos)
    throw DataError("prompt template must contain \"{document}\" exactly once: \"" + tmpl.prompt + "\"");
  std::string prompt = tmpl.prompt.substr(0, at);
  const auto doc_begin = static_cast<uint32_t>(prompt.size());
  prompt += document;
  const auto doc_end = static_cast<uint32_t>(prompt.size());
  prompt += tmpl.prompt.substr(at + kDoc.size());

  Example e;
  if (tmpl.add_bos && tok.bos_id() >= 0) append(e, tok.bos_id(), kIgnoreIndex);
  int64_t tb = -1, te = -1;
  for (const TokenSpan& t : tok.encode_with_offsets(prompt)) {
    if (t.begin >= doc_begin && t.begin < doc_end) {
      if (tb < 0) tb = static_cast<int64_t>(e.input_ids.size());
      te = static_cast<int64_t>(e.input_ids.size()) + 1;
    }
    append(e, t.id, kIgnoreIndex);
  }
  if (tb >= 0) {
    e.trunc_begin = tb;
    e.trunc_end = te;
  }
  for (int64_t id : tok.encode(summary)) append(e, id, id);
  if (tmpl.add_eos && tok.eos_id() >= 0) append(e, tok.eos_id(), tok.eos_id());
  return e;
}

Example make_text_example(const Tokenizer& tok, std::string_view text, const TextTemplate& tmpl) {
  Example e;
  if (tmpl.add_bos && tok.bos_id() >= 0) append(e, tok.bos_id(), kIgnoreIndex);
  for (int64_t id : tok.encode(text)) append(e, id, id);
  if (tmpl.add_eos && tok.eos_id() >= 0) append(e, tok.eos_id(), tok.eos_id());
  return e;
}

std::vector<Example> load_jsonl(const std::filesystem::path& path, int64_t vocab_size, const Tokenizer* tokenizer,
                                const TextTemplate& tmpl) {
  if (vocab_size <= 0) throw DataError(path.string() + ": vocab_size must be positive");
  if (tokenizer && tokenizer->vocab_size() > vocab_size)
    throw DataError("tokenizer " + tokenizer->path().string() + " has " + std::to_string(tokenizer->vocab_size()) +
                    " pieces, more than the model's vocab_size " + std::to_string(vocab_size));
  return for_each_line(path, [&](std::string_view line, const std::string& where) {
    const json j = parse_line(line, where);
    if (j.contains("input_ids")) return token_record(j, vocab_size, where);
    const std::string* doc = string_field(j, tmpl.document_key, where);
    const std::string* sum = string_field(j, tmpl.summary_key, where);
    const std::string* text = string_field(j, tmpl.text_key, where);
    if (!doc && !sum && !text)
      throw DataError(where + ": missing \"input_ids\" (or text fields \"" + tmpl.document_key + "\"+\"" +
                      tmpl.summary_key + "\" or \"" + tmpl.text_key + "\")");
    if (!tokenizer) throw DataError(where + ": a text record needs a tokenizer (none configured)");
    if (doc || sum) {
      if (!doc) throw DataError(where + ": \"" + tmpl.summary_key + "\" without \"" + tmpl.document_key + "\"");
      if (!sum) throw DataError(where + ": \"" + tmpl.document_key + "\" without \"" + tmpl.summary_key + "\"");
      return make_summary_example(*tokenizer, *doc, *sum, tmpl);
    }
    return make_text_example(*tokenizer, *text, tmpl);
  });
}

// ---- fitting ----------------------------------------------------------------------------------
FitMode parse_fit_mode(std::string_view s) {
  if (s == "pad") return FitMode::Pad;
  if (s == "pack") return FitMode::Pack;
  throw DataError("unknown sequence fit mode \"" + std::string(s) + "\" (expected pad or pack)");
}
std::string_view to_string(FitMode m) { return m == FitMode::Pad ? "pad" : "pack"; }

uint64_t Rows::fingerprint() const {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&h](uint64_t v) {
    h ^= v;
    h *= 1099511628211ULL;
    h ^= h >> 29;
  };
  mix(static_cast<uint64_t>(seq_len));
  for (int64_t v : input_ids) mix(static_cast<uint64_t>(v));
  for (int64_t v : labels) mix(static_cast<uint64_t>(v));
  return h;
}

KeptRanges truncation_ranges(int64_t n, int64_t trunc_begin, int64_t trunc_end, int64_t max_len) {
  if (n <= max_len) return {n, n, n};
  const int64_t tb = std::clamp<int64_t>(trunc_begin, 0, n), te = std::clamp<int64_t>(trunc_end, tb, n);
  const int64_t drop = std::min(n - max_len, te - tb);
  KeptRanges k{te - drop, te, n};
  if (k.size() > max_len) {  // still too long: cut the tail
    if (k.first_end >= max_len) {
      k.first_end = max_len;
      k.second_end = k.second_begin;
    } else {
      k.second_end = k.second_begin + (max_len - k.first_end);
    }
  }
  return k;
}

Example truncate_example(const Example& e, int64_t max_len) {
  const int64_t n = static_cast<int64_t>(e.input_ids.size());
  if (n <= max_len) return e;
  const KeptRanges k = truncation_ranges(n, e.trunc_begin, e.trunc_end, max_len);
  Example out;
  out.input_ids.reserve(k.size());
  out.labels.reserve(k.size());
  auto copy = [&](int64_t a, int64_t b) {
    out.input_ids.insert(out.input_ids.end(), e.input_ids.begin() + a, e.input_ids.begin() + b);
    out.labels.insert(out.labels.end(), e.labels.begin() + a, e.labels.begin() + b);
  };
  copy(0, k.first_end);
  copy(k.second_begin, k.second_end);
  // the truncatable range of the result: what is left of it
  const int64_t tb = std::clamp<int64_t>(e.trunc_begin, 0, n), te = std::clamp<int64_t>(e.trunc_end, tb, n);
  out.trunc_begin = tb;
  out.trunc_end = te - (k.second_begin - k.first_end);
  if (n - (k.second_begin - k.first_end) > max_len) {
    out.trunc_end = std::min(out.trunc_end, max_len);
    out.trunc_begin = std::min(out.trunc_begin, out.trunc_end);
  }
  return out;
}

void Rows::read_row(int64_t row, int64_t* ids, int64_t* lab) const {
  if (row < 0 || row >= size()) throw DataError("data: row " + std::to_string(row) + " out of range");
  const auto off = static_cast<size_t>(row * seq_len);
  std::copy_n(input_ids.begin() + off, seq_len, ids);
  std::copy_n(labels.begin() + off, seq_len, lab);
}

Rows fit(const std::vector<Example>& examples, const FitOptions& opt) {
  if (opt.seq_len <= 0) throw DataError("sequence length must be positive, got " + std::to_string(opt.seq_len));
  Rows r;
  r.seq_len = opt.seq_len;
  const auto S = static_cast<size_t>(opt.seq_len);
  auto pad_to_row = [&] {
    while (r.input_ids.size() % S != 0) {
      r.input_ids.push_back(opt.pad_id);
      r.labels.push_back(kIgnoreIndex);
    }
  };
  if (opt.mode == FitMode::Pad) {
    r.input_ids.reserve(examples.size() * S);
    r.labels.reserve(examples.size() * S);
    for (const Example& e0 : examples) {
      if (e0.input_ids.empty()) continue;
      const Example e = truncate_example(e0, opt.seq_len);
      r.input_ids.insert(r.input_ids.end(), e.input_ids.begin(), e.input_ids.end());
      r.labels.insert(r.labels.end(), e.labels.begin(), e.labels.end());
      pad_to_row();
    }
  } else {
    for (const Example& e : examples) {
      if (e.input_ids.empty()) continue;
      r.input_ids.insert(r.input_ids.end(), e.input_ids.begin(), e.input_ids.end());
      r.labels.insert(r.labels.end(), e.labels.begin(), e.labels.end());
      if (e.input_ids.back() != opt.eos_id) {
        r.input_ids.push_back(opt.eos_id);
        r.labels.push_back(opt.eos_id);
      }
    }
    pad_to_row();
  }
  return r;
}

// ---- shuffling --------------------------------------------------------------------------------
uint64_t SplitMix64::next() {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::below(uint64_t n) {
  if (n <= 1) return 0;
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: reject the biased low values
  for (;;) {
    const uint64_t r = next();
    if (r >= threshold) return r % n;
  }
}

std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> p(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  // Seed from (seed, epoch): hash the seed first so that (s, e+1) and (s+1, e) give unrelated orders.
  SplitMix64 g(SplitMix64(seed).next() + static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[g.below(static_cast<uint64_t>(i) + 1)]);
  return p;
}

// ---- iterator ---------------------------------------------------------------------------------
json to_json(const IteratorState& s) {
  char fp[17];
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(s.fingerprint));
  return json{{"version", 1},       {"seed", s.seed},         {"epoch", s.epoch},
              {"position", s.position}, {"num_rows", s.num_rows}, {"fingerprint", std::string(fp)}};
}

IteratorState iterator_state_from_json(const json& j) {
  if (!j.is_object()) throw DataError("data iterator state: not a JSON object");
  auto get_int = [&](const char* k) -> const json& {
    auto it = j.find(k);
    if (it == j.end() || !it->is_number_integer())
      throw DataError(std::string("data iterator state: missing or non-integer \"") + k + "\"");
    return *it;
  };
  if (get_int("version").get<int64_t>() != 1) throw DataError("data iterator state: unsupported version");
  IteratorState s;
  s.seed = get_int("seed").get<uint64_t>();
  s.epoch = get_int("epoch").get<int64_t>();
  s.position = get_int("position").get<int64_t>();
  s.num_rows = get_int("num_rows").get<int64_t>();
  auto fp = j.find("fingerprint");
  if (fp == j.end() || !fp->is_string()) throw DataError("data iterator state: missing \"fingerprint\"");
  try {
    size_t used = 0;
    const std::string& f = fp->get_ref<const std::string&>();
    s.fingerprint = std::stoull(f, &used, 16);
    if (used != f.size()) throw std::invalid_argument(f);
  } catch (const std::exception&) {
    throw DataError("data iterator state: bad \"fingerprint\" " + fp->dump());
  }
  return s;
}

BatchIterator::BatchIterator(std::shared_ptr<const RowSource> rows, uint64_t seed) : rows_(std::move(rows)), seed_(seed) {
  if (!rows_ || rows_->num_rows() == 0) throw DataError("data: no rows to iterate over");
  fingerprint_ = rows_->data_fingerprint();
  perm_ = epoch_permutation(rows_->num_rows(), seed_, epoch_);
}

StepBatch BatchIterator::next_step(int64_t microbatches, int64_t micro_batch_size) {
  if (microbatches <= 0 || micro_batch_size <= 0)
    throw DataError("data: microbatches and micro_batch_size must be positive (got " + std::to_string(microbatches) +
                    ", " + std::to_string(micro_batch_size) + ")");
  const int64_t n = rows_->num_rows(), S = rows_->row_length();
  StepBatch b;
  b.seq_len = S;
  b.micro_batch_size = micro_batch_size;
  b.input_ids.resize(microbatches);
  b.labels.resize(microbatches);
  for (int64_t m = 0; m < microbatches; ++m) {
    b.input_ids[m].resize(micro_batch_size * S);
    b.labels[m].resize(micro_batch_size * S);
    for (int64_t k = 0; k < micro_batch_size; ++k) {
      if (position_ >= n) {
        ++epoch_;
        position_ = 0;
        perm_ = epoch_permutation(n, seed_, epoch_);
      }
      if (m == 0 && k == 0) b.epoch = epoch_;
      const int64_t row = perm_[position_++];
      b.rows.push_back(row);
      rows_->read_row(row, b.input_ids[m].data() + k * S, b.labels[m].data() + k * S);
    }
  }
  return b;
}

IteratorState BatchIterator::state() const { return {seed_, epoch_, position_, rows_->num_rows(), fingerprint_}; }

void BatchIterator::restore(const IteratorState& s) {
  if (s.num_rows != rows_->num_rows())
    throw DataError("data iterator state is for " + std::to_string(s.num_rows) + " rows, the data has " +
                    std::to_string(rows_->num_rows()) + " (different data file, seq_len or fit mode?)");
  if (s.fingerprint != fingerprint_)
    throw DataError("data iterator state was saved for different data (fingerprint mismatch)");
  if (s.seed != seed_)
    throw DataError("data iterator state has seed " + std::to_string(s.seed) + ", this run uses " +
                    std::to_string(seed_));
  if (s.epoch < 0 || s.position < 0 || s.position > rows_->num_rows())
    throw DataError("data iterator state: epoch/position out of range");
  epoch_ = s.epoch;
  position_ = s.position;
  perm_ = epoch_permutation(rows_->num_rows(), seed_, epoch_);
}

void BatchIterator::save_state(const std::filesystem::path& file) const {
  const std::filesystem::path tmp = file.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw DataError(file.string() + ": cannot write data iterator state");
    out << to_json(state()).dump(2) << "\n";
    if (!out.flush()) throw DataError(file.string() + ": cannot write data iterator state");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, file, ec);
  if (ec) throw DataError(file.string() + ": cannot rename data iterator state: " + ec.message());
}

void BatchIterator::load_state(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw DataError(file.string() + ": cannot open data iterator state");
  std::stringstream ss;
  ss << in.rdbuf();
  json j;
  try {
    j = json::parse(ss.str());
  } catch (const json::parse_error& ex) {
    throw DataError(file.string() + ": invalid JSON (" + std::string(ex.what()) + ")");
  }
  try {
    restore(iterator_state_from_json(j));
  } catch (const DataError& ex) {
    throw DataError(file.string() + ": " + ex.what());
  }
}

// ---- engine entry point -----------------------------------------------------------------------
bool is_token_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  char m[sizeof kTokenFileMagic] = {};
  if (!in.read(m, sizeof m)) return false;
  return std::equal(m, m + sizeof m, kTokenFileMagic);
}

std::shared_ptr<const RowSource> open_rows(const DataConfig& cfg) {
  FitOptions fo = cfg.fit;
  if (cfg.vocab_size <= 0) throw DataError("data: vocab_size must be positive");
  if (fo.pad_id < 0 || fo.pad_id >= cfg.vocab_size)
    throw DataError("data: pad id " + std::to_string(fo.pad_id) + " outside the vocabulary " + range_str(cfg.vocab_size));
  if (is_token_file(cfg.path)) {
    auto file = TokenFile::open(cfg.path);
    if (!cfg.tokenizer.empty())
      throw DataError(cfg.path.string() + ": a prepared token file is already tokenised (" + file->tokenizer_name() +
                      "); --tokenizer is only for JSONL text records");
    if (cfg.fit_from_file) fo.mode = file->header().fit;
    return std::make_shared<const TokenFileRows>(std::move(file), cfg.vocab_size, fo);
  }
  std::vector<Example> ex;
  if (!cfg.tokenizer.empty()) {
    const Tokenizer tok(cfg.tokenizer);
    if (tok.eos_id() >= 0) fo.eos_id = tok.eos_id();
    ex = load_jsonl(cfg.path, cfg.vocab_size, &tok, cfg.tmpl);
  } else {
    ex = load_jsonl(cfg.path, cfg.vocab_size, nullptr, cfg.tmpl);
  }
  if (ex.empty()) throw DataError(cfg.path.string() + ": no examples");
  return std::make_shared<const Rows>(fit(ex, fo));
}

std::shared_ptr<const Rows> load_rows(const DataConfig& cfg) {
  auto src = open_rows(cfg);
  if (auto rows = std::dynamic_pointer_cast<const Rows>(src)) return rows;
  auto r = std::make_shared<Rows>();
  r->seq_len = src->row_length();
  const auto total = static_cast<size_t>(src->num_rows() * r->seq_len);
  r->input_ids.resize(total);
  r->labels.resize(total);
  for (int64_t i = 0; i < src->num_rows(); ++i)
    src->read_row(i, r->input_ids.data() + i * r->seq_len, r->labels.data() + i * r->seq_len);
  return r;
}

}  // namespace mmoc::engine::data
