// engine/data: JSONL parsing, prompt template masking, pad/pack, truncation, deterministic shuffling,
// epochs, resume, SentencePiece round trip. Expected values are written out by hand or come from the
// published splitmix64 reference outputs and an independent Python re-implementation (noted where used).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "engine/data/data.hpp"
#include "engine/data/tokenizer.hpp"

namespace fs = std::filesystem;
using namespace mmoc::engine::data;
using Ids = std::vector<int64_t>;

namespace {

const fs::path kSample = MMOC_SAMPLE_DIR;

struct TempDir {
  fs::path dir;
  TempDir() {
    static std::atomic<int> n{0};
    dir = fs::temp_directory_path() / ("mmoc_test_data_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  fs::path write(const std::string& name, const std::string& text) const {
    std::ofstream(dir / name, std::ios::binary) << text;
    return dir / name;
  }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const DataError& e) {
    return e.what();
  }
  return "<no DataError>";
}

Example ex(Ids ids, Ids labels = {}) {
  Example e;
  e.input_ids = std::move(ids);
  e.labels = labels.empty() ? e.input_ids : std::move(labels);
  return e;
}

Ids row(const Rows& r, int64_t i, bool labels = false) {
  const auto& v = labels ? r.labels : r.input_ids;
  return Ids(v.begin() + i * r.seq_len, v.begin() + (i + 1) * r.seq_len);
}

std::shared_ptr<const Rows> numbered_rows(int64_t n, int64_t seq) {
  auto r = std::make_shared<Rows>();
  r->seq_len = seq;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < seq; ++t) {
      r->input_ids.push_back(i);  // every token of row i is i: a batch shows which rows it holds
      r->labels.push_back(t == 0 ? kIgnoreIndex : i);
    }
  return r;
}

}  // namespace

// ---- pre-tokenised JSONL ----------------------------------------------------------------------
TEST_CASE("token JSONL: good lines, optional labels, blank lines and CRLF") {
  TempDir t;
  auto p = t.write("good.jsonl",
                   "{\"input_ids\": [1, 5, 7, 2], \"labels\": [-100, -100, 7, 2]}\n"
                   "\n"
                   "{\"input_ids\": [1, 9], \"id\": \"x\"}\r\n"
                   "{\"input_ids\": [100], \"labels\": null}\n");
  auto v = load_token_jsonl(p, 101);
  REQUIRE(v.size() == 3);
  CHECK(v[0].input_ids == Ids{1, 5, 7, 2});
  CHECK(v[0].labels == Ids{-100, -100, 7, 2});
  CHECK(v[1].input_ids == Ids{1, 9});
  CHECK(v[1].labels == Ids{1, 9});
  CHECK(v[2].labels == Ids{100});
  CHECK(v[0].trunc_begin == v[0].trunc_end);
}

TEST_CASE("token JSONL: the sample tiny_tokens.jsonl loads for vocab 101") {
  auto v = load_token_jsonl(kSample / "tiny_tokens.jsonl", 101);
  CHECK(v.size() == 128);
  for (const auto& e : v) {
    CHECK(e.input_ids.front() == 1);
    CHECK(e.input_ids.back() == 2);
    CHECK(e.labels.back() == 2);
  }
  CHECK(v[7].labels == v[7].input_ids);  // every 8th line has no "labels"
  CHECK(v[0].labels[0] == kIgnoreIndex);
}

TEST_CASE("token JSONL: malformed lines name file:line and the problem") {
  TempDir t;
  const std::string ok = "{\"input_ids\": [1, 2]}\n{\"input_ids\": [3]}\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"input_ids\": [1, 2]", "invalid JSON"},
      {"not json", "invalid JSON"},
      {"[1, 2, 3]", "must be a JSON object"},
      {"{\"labels\": [1, 2]}", "missing \"input_ids\""},
      {"{\"input_ids\": []}", "\"input_ids\" is empty"},
      {"{\"input_ids\": 5}", "\"input_ids\" is not an array"},
      {"{\"input_ids\": [1, 2.5]}", "input_ids[1] = 2.5 is not an integer"},
      {"{\"input_ids\": [1, \"7\"]}", "input_ids[1] = \"7\" is not an integer"},
      {"{\"input_ids\": [true]}", "input_ids[0] = true is not an integer"},
      {"{\"input_ids\": [1, 2, 3], \"labels\": [1, 2]}", "\"labels\" has 2 entries but \"input_ids\" has 3"},
      {"{\"input_ids\": [1, 101]}", "input_ids[1] = 101 is outside the vocabulary [0, 101)"},
      {"{\"input_ids\": [-1]}", "input_ids[0] = -1 is outside the vocabulary"},
      {"{\"input_ids\": [1, 2], \"labels\": [-5, 2]}", "labels[0] = -5 is neither -100 nor in [0, 101)"},
      {"{\"input_ids\": [1, 2], \"labels\": [1, 0.0]}", "labels[1] = 0.0 is not an integer"},
      {"{\"input_ids\": [18446744073709551615]}", "out of range"},
  };
  for (const auto& [line, problem] : cases) {
    CAPTURE(line);
    auto p = t.write("bad.jsonl", ok + line + "\n");
    const std::string msg = error_of([&] { load_token_jsonl(p, 101); });
    CHECK(msg.find(p.string() + ":3: ") != std::string::npos);
    CHECK(msg.find(problem) != std::string::npos);
    // load_jsonl (mixed kinds) reports the same
    const std::string msg2 = error_of([&] { load_jsonl(p, 101, nullptr); });
    CHECK(msg2.find(p.string() + ":3: ") != std::string::npos);
  }
  CHECK(error_of([&] { load_token_jsonl(t.dir / "nope.jsonl", 101); }).find("cannot open") != std::string::npos);
}

TEST_CASE("text records without a tokenizer, or with missing fields, are errors naming the line") {
  TempDir t;
  auto p = t.write("text.jsonl", "{\"input_ids\": [1]}\n{\"document\": \"a\", \"summary\": \"b\"}\n");
  CHECK(error_of([&] { load_jsonl(p, 101, nullptr); }).find(":2: a text record needs a tokenizer") != std::string::npos);
  auto q = t.write("other.jsonl", "{\"title\": \"x\"}\n");
  CHECK(error_of([&] { load_jsonl(q, 101, nullptr); }).find(":1: missing \"input_ids\"") != std::string::npos);
}

// ---- fitting --------------------------------------------------------------------------------------
TEST_CASE("pad: one row per example, padding with pad id and label -100, long rows cut") {
  std::vector<Example> v = {ex({1, 10, 11, 2}, {-100, 10, 11, 2}), ex({1, 20, 21, 22, 23, 24, 25, 26, 27, 2}), ex({1, 30})};
  Rows r = fit(v, {FitMode::Pad, 6, /*pad*/ 0, /*eos*/ 2});
  REQUIRE(r.size() == 3);
  CHECK(r.input_ids.size() == 18);
  CHECK(row(r, 0) == Ids{1, 10, 11, 2, 0, 0});
  CHECK(row(r, 0, true) == Ids{-100, 10, 11, 2, -100, -100});
  CHECK(row(r, 1) == Ids{1, 20, 21, 22, 23, 24});
  CHECK(row(r, 1, true) == Ids{1, 20, 21, 22, 23, 24});
  CHECK(row(r, 2) == Ids{1, 30, 0, 0, 0, 0});
  CHECK(row(r, 2, true) == Ids{1, 30, -100, -100, -100, -100});
}

TEST_CASE("pack: examples joined with eos separators into full rows, labels aligned with ids") {
  std::vector<Example> v = {ex({1, 10, 11, 2}, {-100, 10, 11, 2}), ex({1, 20, 21}, {-100, -100, 21}), ex({1, 30, 31, 32, 33})};
  Rows r = fit(v, {FitMode::Pack, 5, /*pad*/ 0, /*eos*/ 2});
  // stream: 1 10 11 2 | 1 20 21 [2] | 1 30 31 32 33 [2]  = 4 + 4 + 6 = 14 -> 3 rows of 5, last padded by 1
  REQUIRE(r.size() == 3);
  CHECK(row(r, 0) == Ids{1, 10, 11, 2, 1});
  CHECK(row(r, 0, true) == Ids{-100, 10, 11, 2, -100});
  CHECK(row(r, 1) == Ids{20, 21, 2, 1, 30});
  CHECK(row(r, 1, true) == Ids{-100, 21, 2, 1, 30});
  CHECK(row(r, 2) == Ids{31, 32, 33, 2, 0});
  CHECK(row(r, 2, true) == Ids{31, 32, 33, 2, -100});
  // exactly divisible: no padding row
  Rows r2 = fit({ex({1, 2}), ex({1, 5, 2})}, {FitMode::Pack, 5, 0, 2});
  CHECK(r2.size() == 1);
  CHECK(row(r2, 0) == Ids{1, 2, 1, 5, 2});
  CHECK(parse_fit_mode("pack") == FitMode::Pack);
  CHECK(error_of([] { parse_fit_mode("wrap"); }).find("unknown sequence fit mode") != std::string::npos);
  CHECK(error_of([] { fit({}, {FitMode::Pad, 0, 0, 2}); }).find("sequence length must be positive") != std::string::npos);
}

TEST_CASE("truncate_example drops the document range from its end first, then the tail") {
  Example e = ex({1, 50, 51, 52, 53, 54, 60, 70, 71, 2}, {-100, -100, -100, -100, -100, -100, -100, 70, 71, 2});
  e.trunc_begin = 2;  // document = 51..54
  e.trunc_end = 6;
  Example a = truncate_example(e, 8);
  CHECK(a.input_ids == Ids{1, 50, 51, 52, 60, 70, 71, 2});
  CHECK(a.labels == Ids{-100, -100, -100, -100, -100, 70, 71, 2});
  CHECK(a.trunc_begin == 2);
  CHECK(a.trunc_end == 4);
  Example b = truncate_example(e, 5);  // whole document gone (6 tokens), then one more from the tail
  CHECK(b.input_ids == Ids{1, 50, 60, 70, 71});
  CHECK(b.labels == Ids{-100, -100, -100, 70, 71});
  CHECK(truncate_example(e, 10).input_ids == e.input_ids);
}

// ---- shuffling and batches ---------------------------------------------------------------------
TEST_CASE("splitmix64 matches the published reference outputs; epoch permutations match a Python re-implementation") {
  SplitMix64 g(1234567);
  CHECK(g.next() == 6457827717110365317ULL);
  CHECK(g.next() == 3203168211198807973ULL);
  CHECK(g.next() == 9817491932198370423ULL);
  CHECK(g.next() == 4593380528125082431ULL);
  CHECK(g.next() == 16408922859458223821ULL);
  CHECK(epoch_permutation(10, 42, 0) == Ids{4, 6, 7, 0, 9, 5, 1, 2, 3, 8});
  CHECK(epoch_permutation(10, 42, 1) == Ids{0, 3, 4, 6, 1, 5, 9, 2, 7, 8});
  CHECK(epoch_permutation(10, 7, 0) == Ids{7, 6, 9, 2, 8, 4, 0, 3, 5, 1});
  SplitMix64 h(9);
  for (int i = 0; i < 1000; ++i) CHECK(h.below(7) < 7);
}

TEST_CASE("batches: shape, content, determinism per seed, difference across seeds") {
  auto rows = numbered_rows(50, 4);
  BatchIterator a(rows, 123), b(rows, 123), c(rows, 124);
  std::vector<int64_t> ra, rc;
  for (int s = 0; s < 5; ++s) {
    StepBatch x = a.next_step(3, 2), y = b.next_step(3, 2), z = c.next_step(3, 2);
    REQUIRE(x.input_ids.size() == 3);
    REQUIRE(x.labels.size() == 3);
    for (int m = 0; m < 3; ++m) {
      REQUIRE(x.input_ids[m].size() == 8);
      REQUIRE(x.labels[m].size() == 8);
      for (int k = 0; k < 2; ++k) {  // sequence k of micro-batch m is row rows[m*2+k], ids and labels together
        const int64_t r = x.rows[m * 2 + k];
        CHECK(x.input_ids[m][k * 4] == r);
        CHECK(x.input_ids[m][k * 4 + 3] == r);
        CHECK(x.labels[m][k * 4] == kIgnoreIndex);
        CHECK(x.labels[m][k * 4 + 1] == r);
      }
    }
    CHECK(x.input_ids == y.input_ids);
    CHECK(x.labels == y.labels);
    ra.insert(ra.end(), x.rows.begin(), x.rows.end());
    rc.insert(rc.end(), z.rows.begin(), z.rows.end());
  }
  CHECK(ra != rc);
  std::vector<int64_t> sorted = ra;
  std::sort(sorted.begin(), sorted.end());
  CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());  // 30 distinct rows within epoch 0
  CHECK(error_of([&] { a.next_step(0, 2); }).find("must be positive") != std::string::npos);
}

TEST_CASE("epochs wrap: every row once per epoch, a new order each epoch") {
  auto rows = numbered_rows(5, 3);
  BatchIterator it(rows, 99);
  std::vector<int64_t> seen;
  std::vector<int64_t> epochs;
  for (int s = 0; s < 5; ++s) {  // 4 rows per step, 20 rows = 4 epochs
    StepBatch b = it.next_step(2, 2);
    epochs.push_back(b.epoch);
    seen.insert(seen.end(), b.rows.begin(), b.rows.end());
  }
  CHECK(epochs == Ids{0, 0, 1, 2, 3});  // step 2 starts with the last row of epoch 0
  CHECK(it.epoch() == 3);
  CHECK(it.position() == 5);
  for (int e = 0; e < 4; ++e) {
    Ids ep(seen.begin() + e * 5, seen.begin() + (e + 1) * 5);
    CHECK(ep == epoch_permutation(5, 99, e));
  }
  CHECK(epoch_permutation(5, 99, 0) != epoch_permutation(5, 99, 1));
}

TEST_CASE("resume: a restored iterator yields the same next batches; wrong data or seed is refused") {
  TempDir t;
  auto rows = numbered_rows(13, 4);
  BatchIterator a(rows, 5);
  for (int s = 0; s < 4; ++s) a.next_step(2, 2);  // 16 rows: into epoch 1
  a.save_state(t.dir / "data_state.json");
  const nlohmann::json js = to_json(a.state());
  std::vector<StepBatch> expect;
  for (int s = 0; s < 6; ++s) expect.push_back(a.next_step(2, 2));

  BatchIterator b(rows, 5);
  b.load_state(t.dir / "data_state.json");
  BatchIterator c(rows, 5);
  c.restore(iterator_state_from_json(nlohmann::json::parse(js.dump())));
  for (int s = 0; s < 6; ++s) {
    StepBatch x = b.next_step(2, 2), y = c.next_step(2, 2);
    CHECK(x.input_ids == expect[s].input_ids);
    CHECK(x.labels == expect[s].labels);
    CHECK(y.rows == expect[s].rows);
  }
  CHECK(js["epoch"] == 1);
  CHECK(js["position"] == 3);
  CHECK(!fs::exists(t.dir / "data_state.json.tmp"));

  BatchIterator other_seed(rows, 6);
  CHECK(error_of([&] { other_seed.load_state(t.dir / "data_state.json"); }).find("seed") != std::string::npos);
  BatchIterator other_n(numbered_rows(12, 4), 5);
  CHECK(error_of([&] { other_n.load_state(t.dir / "data_state.json"); }).find("rows") != std::string::npos);
  auto changed = std::make_shared<Rows>(*rows);
  changed->labels[5] = 7;
  BatchIterator other_data(changed, 5);
  CHECK(error_of([&] { other_data.load_state(t.dir / "data_state.json"); }).find("fingerprint") != std::string::npos);
  t.write("bad_state.json", "{\"version\": 1}");
  CHECK(error_of([&] { b.load_state(t.dir / "bad_state.json"); }).find("bad_state.json") != std::string::npos);
}

// ---- SentencePiece ---------------------------------------------------------------------------------
TEST_CASE("missing or unreadable tokenizer is a clear error") {
  TempDir t;
  const std::string m = error_of([&] { Tokenizer tok(t.dir / "no_such_tokenizer.model"); });
  CHECK(m.find("no_such_tokenizer.model") != std::string::npos);
#ifdef MMOC_TEST_HAVE_SENTENCEPIECE
  CHECK(m.find("file not found") != std::string::npos);
  auto junk = t.write("junk.model", "this is not a protobuf");
  const std::string j = error_of([&] { Tokenizer tok(junk); });
  CHECK(j.find("junk.model") != std::string::npos);
  CHECK(j.find("cannot load SentencePiece model") != std::string::npos);
  DataConfig cfg;
  cfg.path = kSample / "xsum_sample.jsonl";
  cfg.tokenizer = t.dir / "gone.model";
  cfg.vocab_size = 1000;
  cfg.fit.seq_len = 64;
  CHECK(error_of([&] { load_rows(cfg); }).find("gone.model: file not found") != std::string::npos);
#endif
}

#ifdef MMOC_TEST_HAVE_SENTENCEPIECE
TEST_CASE("tokenizer: LLaMA special ids and exact encode/decode round trip on the sample") {
  Tokenizer tok(kSample / "tokenizer.model");
  CHECK(tok.vocab_size() == 1000);
  CHECK(tok.unk_id() == 0);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.pad_id() == -1);
  CHECK(tok.id_to_piece(1) == "<s>");
  CHECK(tok.id_to_piece(2) == "</s>");
  std::ifstream in(kSample / "xsum_sample.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    for (const char* k : {"document", "summary"}) {
      const std::string s = j[k];
      const Ids ids = tok.encode(s);
      CHECK(!ids.empty());
      CHECK(tok.decode(ids) == s);
      for (int64_t id : ids) CHECK((id >= 0 && id < 1000 && id != 0));  // byte fallback: no <unk>
    }
    ++n;
  }
  CHECK(n == 300);
  CHECK(tok.decode(tok.encode("Zürich 2031 — naïve ✓\nnew line")) == "Zürich 2031 — naïve ✓\nnew line");
  const Ids digits = tok.encode("489");  // split_digits: "▁" then one piece per digit, as LLaMA
  REQUIRE(digits.size() == 4);
  CHECK(tok.id_to_piece(digits[0]) == "\u2581");
  CHECK(tok.id_to_piece(digits[1]) == "4");
  CHECK(tok.id_to_piece(digits[2]) == "8");
  CHECK(tok.id_to_piece(digits[3]) == "9");
}

TEST_CASE("template: prompt and document masked, summary and eos labelled") {
  Tokenizer tok(kSample / "tokenizer.model");
  const std::string doc = "Heavy rain has caused flooding in parts of York.\nAbout 12 homes lost power.";
  const std::string sum = "Flooding in York left about 12 homes without power.";
  Example e = make_summary_example(tok, doc, sum);
  const Ids sum_ids = tok.encode(sum);
  const size_t n = e.input_ids.size(), ns = sum_ids.size();
  REQUIRE(n == e.labels.size());
  REQUIRE(n > ns + 2);
  CHECK(e.input_ids.front() == 1);
  CHECK(e.input_ids.back() == 2);
  CHECK(e.labels.back() == 2);  // eos labelled
  const size_t np = n - ns - 1;  // bos + prompt tokens
  for (size_t i = 0; i < np; ++i) CHECK(e.labels[i] == kIgnoreIndex);
  for (size_t i = 0; i < ns; ++i) {
    CHECK(e.input_ids[np + i] == sum_ids[i]);
    CHECK(e.labels[np + i] == sum_ids[i]);
  }
  // The prompt part decodes to the template text with the document in it (an independent check of the ids).
  CHECK(tok.decode(Ids(e.input_ids.begin(), e.input_ids.begin() + np)) == "Summarize:\n" + doc + "\nSummary:");
  CHECK(tok.decode(e.input_ids) == "Summarize:\n" + doc + "\nSummary: " + sum);
  // The truncatable range is the document.
  REQUIRE(e.trunc_begin > 1);
  REQUIRE(e.trunc_end > e.trunc_begin);
  CHECK(static_cast<size_t>(e.trunc_end) < np);
  const std::string d = tok.decode(Ids(e.input_ids.begin() + e.trunc_begin, e.input_ids.begin() + e.trunc_end));
  CHECK(d == doc);
  // plain text: everything but bos labelled
  Example p = make_text_example(tok, "York is a city.");
  CHECK(p.labels.front() == kIgnoreIndex);
  CHECK(Ids(p.labels.begin() + 1, p.labels.end()) == Ids(p.input_ids.begin() + 1, p.input_ids.end()));
  TextTemplate bad;
  bad.prompt = "no placeholder";
  CHECK(error_of([&] { make_summary_example(tok, doc, sum, bad); }).find("{document}") != std::string::npos);
}

TEST_CASE("truncation to seq_len keeps the whole summary and the prompt's frame") {
  Tokenizer tok(kSample / "tokenizer.model");
  std::string doc;
  for (int i = 0; i < 40; ++i) doc += "The council said the scheme would make a real difference to people in Leeds. ";
  const std::string sum = "The council has announced plans for 40 new homes in Leeds.";
  Example e = make_summary_example(tok, doc, sum);
  const int64_t seq = 48;
  REQUIRE(static_cast<int64_t>(e.input_ids.size()) > 4 * seq);
  Rows r = fit({e}, {FitMode::Pad, seq, 0, 2});
  REQUIRE(r.size() == 1);
  const Ids ids = row(r, 0), labels = row(r, 0, true);
  const Ids sum_ids = tok.encode(sum);
  Ids labelled;
  for (int64_t l : labels)
    if (l != kIgnoreIndex) labelled.push_back(l);
  Ids want = sum_ids;
  want.push_back(2);
  CHECK(labelled == want);  // the whole summary and eos survive
  const std::string text = tok.decode(ids);
  CHECK(text.rfind("Summarize:\nThe council said", 0) == 0);
  CHECK(text.find("\nSummary: " + sum) != std::string::npos);
  CHECK(ids.back() == 2);  // the row is exactly full: nothing was padded
}

TEST_CASE("load_rows: the sample XSum file end to end (pad and pack)") {
  DataConfig cfg;
  cfg.path = kSample / "xsum_sample.jsonl";
  cfg.tokenizer = kSample / "tokenizer.model";
  cfg.vocab_size = 1000;
  cfg.fit = {FitMode::Pad, 128, 0, 2};
  auto pad = load_rows(cfg);
  CHECK(pad->size() == 300);
  for (int64_t i = 0; i < pad->size(); ++i) {
    const Ids l = row(*pad, i, true);
    CHECK(std::count(l.begin(), l.end(), int64_t{2}) == 1);  // every row keeps its summary's eos
  }
  cfg.fit.mode = FitMode::Pack;
  auto pack = load_rows(cfg);
  CHECK(pack->size() < pad->size());
  CHECK(static_cast<int64_t>(std::count(pack->input_ids.begin(), pack->input_ids.end(), int64_t{2})) == 300);
  BatchIterator it(pack, 1);
  StepBatch b = it.next_step(4, 2);
  CHECK(b.input_ids.size() == 4);
  CHECK(b.input_ids[0].size() == 256);
  cfg.vocab_size = 500;  // tokenizer larger than the model's vocabulary
  CHECK(error_of([&] { load_rows(cfg); }).find("more than the model's vocab_size 500") != std::string::npos);
}
#endif
