// engine/data/token_file: the memory-mapped token file reader against the in-memory JSONL path (fit + batches
// over the same examples must give the same rows), resume, corrupt and truncated files, ids against the
// vocabulary, SHA-256 against the FIPS 180-4 example values, and a sparse 10^9-token file: opened in under a
// second without reading it into memory.
#include <doctest/doctest.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/data/data.hpp"
#include "engine/data/token_file.hpp"

namespace fs = std::filesystem;
using namespace mmoc::engine::data;
using Ids = std::vector<int64_t>;

namespace {

struct TempDir {
  fs::path dir;
  TempDir() {
    static std::atomic<int> n{0};
    dir = fs::temp_directory_path() / ("mmoc_test_tokfile_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(dir, ec);
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

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Examples that end with eos (2) as prepare_data.py writes them; some with truncatable ranges, some long.
std::vector<Example> examples(int n, uint64_t seed, int64_t vocab) {
  SplitMix64 g(seed);
  std::vector<Example> v;
  for (int i = 0; i < n; ++i) {
    Example e;
    const int64_t len = 2 + static_cast<int64_t>(g.below(i % 5 == 0 ? 70 : 25));
    for (int64_t t = 0; t + 1 < len; ++t) {
      const int64_t id = 3 + static_cast<int64_t>(g.below(static_cast<uint64_t>(vocab - 3)));
      e.input_ids.push_back(id);
      e.labels.push_back(g.below(3) == 0 ? kIgnoreIndex : id);
    }
    e.input_ids.push_back(2);
    e.labels.push_back(2);
    if (i % 3 == 1 && len > 6) {  // a "document" in the middle
      e.trunc_begin = 1;
      e.trunc_end = len - 3;
    }
    v.push_back(std::move(e));
  }
  return v;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}
void spit(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary | std::ios::trunc) << s; }

Ids row_of(const RowSource& r, int64_t i, bool labels = false) {
  Ids ids(r.row_length()), lab(r.row_length());
  r.read_row(i, ids.data(), lab.data());
  return labels ? lab : ids;
}

DataConfig config(const fs::path& p, int64_t vocab, int64_t seq, FitMode mode = FitMode::Pad) {
  DataConfig c;
  c.path = p;
  c.vocab_size = vocab;
  c.fit = {mode, seq, 0, 2};
  return c;
}

// RssAnon of /proc/self/status: the process's own memory (RssFile, the mapped file's page-cache pages, is shared
// and reclaimable; how much of it a fault maps depends on the kernel's folio sizes).
double rss_anon_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("RssAnon:", 0) == 0) return std::stod(line.substr(8)) / 1024.0;
  return -1;
}

}  // namespace

TEST_CASE("sha256: FIPS 180-4 example messages") {
  auto sha = [](const std::string& s) {
    Sha256 h;
    h.update(s.data(), s.size());
    return hex(h.digest());
  };
  CHECK(sha("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  Sha256 m;  // one million 'a', fed in uneven pieces
  const std::string a(997, 'a');
  size_t left = 1000000;
  while (left) {
    const size_t k = std::min(left, a.size());
    m.update(a.data(), k);
    left -= k;
  }
  CHECK(hex(m.digest()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("truncation_ranges is truncate_example's selection") {
  for (int64_t n : {1, 5, 9, 20})
    for (int64_t tb = 0; tb <= n; ++tb)
      for (int64_t te = tb; te <= n; ++te)
        for (int64_t m : {1, 3, 5, 8, 25}) {
          Example e;
          for (int64_t i = 0; i < n; ++i) {
            e.input_ids.push_back(i);
            e.labels.push_back(i);
          }
          e.trunc_begin = tb;
          e.trunc_end = te;
          const Example t = truncate_example(e, m);
          const KeptRanges k = truncation_ranges(n, tb, te, m);
          Ids kept;
          for (int64_t i = 0; i < k.first_end; ++i) kept.push_back(i);
          for (int64_t i = k.second_begin; i < k.second_end; ++i) kept.push_back(i);
          CAPTURE(n);
          CAPTURE(tb);
          CAPTURE(te);
          CAPTURE(m);
          CHECK(kept == t.input_ids);
          CHECK(k.size() == std::min(n, m));
        }
}

TEST_CASE("token file rows equal fit() over the same examples (pad and pack, several lengths), and so do batches") {
  TempDir t;
  const int64_t vocab = 300;
  const auto ex = examples(57, 11, vocab);
  TokenFileWriteOptions o;
  o.vocab_size = vocab;
  o.eos_id = 2;
  o.bos_id = 1;
  write_token_file(t.dir / "a.bin", ex, o);
  CHECK(is_token_file(t.dir / "a.bin"));
  auto f = TokenFile::open(t.dir / "a.bin");
  const TokenFileHeader& h = f->header();
  CHECK(h.token_bytes == 2);
  CHECK(h.num_docs == 57);
  CHECK(h.vocab_size == vocab);
  CHECK(h.file_bytes == fs::file_size(t.dir / "a.bin"));
  CHECK(h.tokens_offset % 4096 == 0);
  CHECK(h.mask_offset % 4096 == 0);
  CHECK(h.offsets_offset % 4096 == 0);
  CHECK(h.docinfo_offset % 4096 == 0);
  const TokenFileCheck c = check_token_file(*f);
  CHECK(c.sha256_checked);
  int64_t ntok = 0, nlab = 0;
  for (const auto& e : ex) {
    ntok += static_cast<int64_t>(e.input_ids.size());
    for (int64_t l : e.labels) nlab += l != kIgnoreIndex;
  }
  CHECK(c.num_tokens == ntok);
  CHECK(c.num_labelled == nlab);
  for (FitMode mode : {FitMode::Pad, FitMode::Pack})
    for (int64_t seq : {1, 7, 16, 64, 200}) {
      CAPTURE(seq);
      CAPTURE(to_string(mode));
      const FitOptions fo{mode, seq, 0, 2};
      auto mem = std::make_shared<const Rows>(fit(ex, fo));
      auto file = open_rows(config(t.dir / "a.bin", vocab, seq, mode));
      REQUIRE(file->num_rows() == mem->num_rows());
      for (int64_t i = 0; i < mem->num_rows(); ++i) {
        CHECK(row_of(*file, i) == row_of(*mem, i));
        CHECK(row_of(*file, i, true) == row_of(*mem, i, true));
      }
      BatchIterator a(mem, 7), b(file, 7);
      for (int s = 0; s < 9; ++s) {
        const StepBatch x = a.next_step(2, 3), y = b.next_step(2, 3);
        CHECK(x.rows == y.rows);
        CHECK(x.input_ids == y.input_ids);
        CHECK(x.labels == y.labels);
        CHECK(x.epoch == y.epoch);
      }
    }
  // load_rows reads a token file whole: the same rows
  auto whole = load_rows(config(t.dir / "a.bin", vocab, 16));
  auto mapped = open_rows(config(t.dir / "a.bin", vocab, 16));
  REQUIRE(whole->size() == mapped->num_rows());
  for (int64_t i = 0; i < whole->size(); ++i) CHECK(row_of(*whole, i) == row_of(*mapped, i));
}

TEST_CASE("the fit mode stored in the file is the default; uint32 tokens; a JSONL \"truncate\" range") {
  TempDir t;
  const int64_t vocab = 70000;  // needs uint32
  auto ex = examples(9, 3, vocab);
  ex[0].input_ids[0] = 69999;
  TokenFileWriteOptions o;
  o.vocab_size = vocab;
  o.eos_id = 2;
  o.fit = FitMode::Pack;
  write_token_file(t.dir / "b.bin", ex, o);
  auto f = TokenFile::open(t.dir / "b.bin");
  CHECK(f->header().token_bytes == 4);
  CHECK(f->header().max_token_id == 69999);
  DataConfig c = config(t.dir / "b.bin", vocab, 8);
  c.fit_from_file = true;
  CHECK(open_rows(c)->num_rows() == (f->header().num_tokens + 7) / 8);  // pack
  c.fit_from_file = false;
  CHECK(open_rows(c)->num_rows() == 9);  // pad, as asked
  CHECK(row_of(*open_rows(c), 0)[0] == 69999);

  // the same examples as pre-tokenised JSONL with "truncate": the JSONL path keeps the document-first cut
  std::string jl;
  for (const auto& e : ex) {
    nlohmann::json j = {{"input_ids", e.input_ids}, {"labels", e.labels}};
    if (e.trunc_end > e.trunc_begin) j["truncate"] = {e.trunc_begin, e.trunc_end};
    jl += j.dump() + "\n";
  }
  spit(t.dir / "b.jsonl", jl);
  for (int64_t seq : {5, 12}) {
    auto a = open_rows(config(t.dir / "b.jsonl", vocab, seq)), b = open_rows(config(t.dir / "b.bin", vocab, seq));
    REQUIRE(a->num_rows() == b->num_rows());
    for (int64_t i = 0; i < a->num_rows(); ++i) {
      CHECK(row_of(*a, i) == row_of(*b, i));
      CHECK(row_of(*a, i, true) == row_of(*b, i, true));
    }
  }
  spit(t.dir / "bad.jsonl", "{\"input_ids\": [1, 2, 3], \"truncate\": [2, 5]}\n");
  CHECK(contains(error_of([&] { load_token_jsonl(t.dir / "bad.jsonl", 10); }), "bad.jsonl:1: \"truncate\" must be [begin, end]"));
  spit(t.dir / "bad.jsonl", "{\"input_ids\": [1, 2, 3], \"truncate\": [1]}\n");
  CHECK(contains(error_of([&] { load_token_jsonl(t.dir / "bad.jsonl", 10); }), "bad.jsonl:1: \"truncate\""));
}

TEST_CASE("resume over a token file: the restored iterator continues exactly; other data, seq or fit is refused") {
  TempDir t;
  const auto ex = examples(23, 5, 200);
  TokenFileWriteOptions o;
  o.vocab_size = 200;
  o.eos_id = 2;
  write_token_file(t.dir / "c.bin", ex, o);
  for (FitMode mode : {FitMode::Pad, FitMode::Pack}) {
    auto rows = open_rows(config(t.dir / "c.bin", 200, 16, mode));
    BatchIterator a(rows, 3);
    for (int s = 0; s < 5; ++s) a.next_step(2, 2);
    a.save_state(t.dir / "state.json");
    std::vector<StepBatch> expect;
    for (int s = 0; s < 8; ++s) expect.push_back(a.next_step(2, 2));
    BatchIterator b(open_rows(config(t.dir / "c.bin", 200, 16, mode)), 3);  // a fresh open, as a resumed run does
    b.load_state(t.dir / "state.json");
    for (int s = 0; s < 8; ++s) {
      const StepBatch y = b.next_step(2, 2);
      CHECK(y.rows == expect[s].rows);
      CHECK(y.input_ids == expect[s].input_ids);
      CHECK(y.labels == expect[s].labels);
    }
    // another seq_len or fit mode is other data
    BatchIterator other_seq(open_rows(config(t.dir / "c.bin", 200, 17, mode)), 3);
    CHECK(error_of([&] { other_seq.load_state(t.dir / "state.json"); }) != "<no DataError>");
    BatchIterator other_fit(open_rows(config(t.dir / "c.bin", 200, 16, mode == FitMode::Pad ? FitMode::Pack : FitMode::Pad)), 3);
    CHECK(error_of([&] { other_fit.load_state(t.dir / "state.json"); }) != "<no DataError>");
  }
  // same shape, different content: the fingerprint (content SHA-256) differs
  auto ex2 = ex;
  ex2[4].labels[0] = ex2[4].labels[0] == kIgnoreIndex ? ex2[4].input_ids[0] : kIgnoreIndex;
  write_token_file(t.dir / "d.bin", ex2, o);
  BatchIterator a(open_rows(config(t.dir / "c.bin", 200, 16)), 3);
  a.next_step(1, 1);
  a.save_state(t.dir / "state.json");
  BatchIterator d(open_rows(config(t.dir / "d.bin", 200, 16)), 3);
  CHECK(contains(error_of([&] { d.load_state(t.dir / "state.json"); }), "fingerprint"));
}

TEST_CASE("bad token files: truncated, extended, wrong magic or version, corrupt sections, ids against the vocabulary") {
  TempDir t;
  const auto ex = examples(10, 9, 120);
  TokenFileWriteOptions o;
  o.vocab_size = 120;
  o.eos_id = 2;
  o.meta_json = R"({"tokenizer":{"name":"tiny-bpe"}})";
  const fs::path good = t.dir / "good.bin";
  write_token_file(good, ex, o);
  const std::string bytes = slurp(good);
  const fs::path p = t.dir / "bad.bin";
  auto open_err = [&](const std::string& content) {
    spit(p, content);
    return error_of([&] { open_rows(config(p, 120, 16)); });
  };
  // truncated anywhere: in the header, in a section, one byte short
  for (size_t keep : {size_t{9}, size_t{100}, size_t{256}, size_t{5000}, bytes.size() - 1}) {
    CAPTURE(keep);
    const std::string m = open_err(bytes.substr(0, keep));
    CHECK(contains(m, p.string()));
    CHECK(contains(m, "truncated"));
  }
  CHECK(contains(open_err(bytes + "x"), "more than the"));
  std::string v = bytes;
  v[8] = 2;  // version 2
  CHECK(contains(open_err(v), "version 2 is not supported"));
  v = bytes;
  v[16] = 3;  // token size 3
  CHECK(contains(open_err(v), "corrupt header: token size 3"));
  v = bytes;
  v[34] += 1;  // num_tokens + 65536: the layout no longer matches
  CHECK(contains(open_err(v), "corrupt header: section offsets"));
  v = bytes;
  v[32] += 1;  // num_tokens one more, same layout: the document offsets do not end at it
  CHECK(contains(open_err(v), "corrupt: document offsets"));
  // a file that is not a token file goes the JSONL way
  v = bytes;
  v[0] = 'X';
  spit(t.dir / "notmagic.bin", v);
  CHECK(!is_token_file(t.dir / "notmagic.bin"));
  CHECK(contains(error_of([&] { open_rows(config(t.dir / "notmagic.bin", 120, 16)); }), "invalid JSON"));

  // the model's vocabulary is smaller than the file's: refused at open, naming both and the tokenizer
  const std::string m = error_of([&] { open_rows(config(good, 100, 16)); });
  CHECK(contains(m, good.string()));
  CHECK(contains(m, "vocabulary of 120"));
  CHECK(contains(m, "tiny-bpe"));
  CHECK(contains(m, "vocab_size 100"));
  // --tokenizer with a token file
  DataConfig c = config(good, 120, 16);
  c.tokenizer = t.dir / "tokenizer.model";
  CHECK(contains(error_of([&] { open_rows(c); }), "already tokenised"));

  // corrupt sections are found where they are read (opening stays O(1)) and by check_token_file
  auto f = TokenFile::open(good);
  const TokenFileHeader h = f->header();
  v = bytes;
  const uint16_t big = 119;  // a token id above max_token_id (the header says less)
  int64_t maxid = 0;
  for (const auto& e : ex)
    for (int64_t id : e.input_ids) maxid = std::max(maxid, id);
  REQUIRE(maxid < 119);
  std::memcpy(&v[h.tokens_offset + 2 * 3], &big, 2);  // token 3 (document 0)
  spit(p, v);
  {
    auto rows = open_rows(config(p, 120, 16, FitMode::Pack));
    const std::string r = error_of([&] { row_of(*rows, 0); });
    CHECK(contains(r, p.string() + ": token 3 = 119"));
    CHECK(contains(error_of([&] { check_token_file(*TokenFile::open(p)); }), "largest id is 119"));
  }
  const uint16_t huge = 60000;  // an id beyond the vocabulary
  std::memcpy(&v[h.tokens_offset + 2 * 3], &huge, 2);
  spit(p, v);
  {
    auto rows = open_rows(config(p, 120, 16, FitMode::Pack));
    CHECK(contains(error_of([&] { row_of(*rows, 0); }), "token 3 = 60000 is outside the model's vocabulary [0, 120)"));
    CHECK(contains(error_of([&] { check_token_file(*TokenFile::open(p)); }), "token 3 = 60000 is outside the vocabulary"));
  }
  v = bytes;  // document 4's end offset moved before its start
  const uint64_t off = 1;
  std::memcpy(&v[h.offsets_offset + 8 * 5], &off, 8);
  spit(p, v);
  {
    auto rows = open_rows(config(p, 120, 16, FitMode::Pad));
    CHECK(contains(error_of([&] { row_of(*rows, 4); }), "corrupt: document 4 has offsets"));
    CHECK(contains(error_of([&] { check_token_file(*TokenFile::open(p)); }), "corrupt"));
  }
  v = bytes;  // a flipped mask bit: only the content hash tells
  v[h.mask_offset] ^= 1;
  spit(p, v);
  CHECK(contains(error_of([&] { check_token_file(*TokenFile::open(p)); }), "labelled tokens"));
  v = bytes;  // one set bit cleared and one clear bit set: the count is unchanged
  int64_t on = -1, off_bit = -1;
  for (int64_t i = 0; i < h.num_tokens; ++i) ((v[h.mask_offset + i / 8] >> (i % 8)) & 1 ? on : off_bit) = i;
  REQUIRE(on >= 0);
  REQUIRE(off_bit >= 0);
  v[h.mask_offset + on / 8] ^= static_cast<char>(1 << (on % 8));
  v[h.mask_offset + off_bit / 8] ^= static_cast<char>(1 << (off_bit % 8));
  spit(p, v);
  CHECK(contains(error_of([&] { check_token_file(*TokenFile::open(p)); }), "SHA-256 does not match"));
  CHECK(contains(error_of([&] { TokenFile::open(t.dir / "missing.bin"); }), "missing.bin: cannot open"));
}

TEST_CASE("a sparse 10^9-token file opens in under a second and is not read into memory") {
  TempDir t;
  const int64_t n = 1000000000, doc = 1000;
  const auto t0 = std::chrono::steady_clock::now();
  write_synthetic_token_file(t.dir / "big.bin", n, doc, 128256, /*labelled*/ false);  // Llama-3's vocabulary: uint32
  const double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(fs::file_size(t.dir / "big.bin") > uint64_t(n) * 4);
  const double rss0 = rss_anon_mib();
  for (FitMode mode : {FitMode::Pack, FitMode::Pad}) {
    const auto t1 = std::chrono::steady_clock::now();
    auto rows = open_rows(config(t.dir / "big.bin", 128256, 1024, mode));
    const double open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    CHECK(open_s < 1.0);
    CHECK(rows->num_rows() == (mode == FitMode::Pack ? (n + 1023) / 1024 : n / doc));
    BatchIterator it(rows, 1);
    const double iter_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count() - open_s;
    for (int s = 0; s < 20; ++s) {
      const StepBatch b = it.next_step(4, 2);
      REQUIRE(b.input_ids[0].size() == 2048);
      CHECK(b.input_ids[3][5] == 0);
      if (mode == FitMode::Pad) CHECK(b.input_ids[0][1000] == 0);  // padding after a 1000-token document
    }
    MESSAGE("10^9 tokens, " << to_string(mode) << ": open " << open_s << " s, iterator (permutation of "
                            << rows->num_rows() << " rows) " << iter_s << " s; sparse file written in " << write_s << " s");
  }
  const double grown = rss_anon_mib() - rss0;
  MESSAGE("anonymous resident memory grew by " << grown << " MiB (the file is " << fs::file_size(t.dir / "big.bin") / (1 << 20)
                                                << " MiB; the permutations of 10^6 rows are 8 MB each)");
  CHECK(rss0 >= 0);
  CHECK(grown < 64);
}
