// mmoc-data: look into training data the way mmoc-run reads it (torch-free).
//   mmoc-data info FILE                       header and metadata of a prepared token file (JSON)
//   mmoc-data check FILE [--vocab N]          read every section: offsets, ranges, ids, mask, SHA-256
//   mmoc-data batches DATA --seq S --microbatches M --mbs B --steps K [--vocab V] [--fit pad|pack] [--seed N]
//             [--tokenizer spm.model] [--state-in F] [--state-out F]
//                                             the batches mmoc-run would train on, one JSON line per step
//   mmoc-data bench FILE --vocab V --seq S [--steps K]   open time, first batches, resident memory
//   mmoc-data synth OUT --tokens N [--doc-len L] [--vocab V] [--unlabelled]   a sparse test file
// Exit code 2 on bad input (the message names the file and the problem).
#include <CLI/CLI.hpp>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "engine/data/data.hpp"
#include "engine/data/token_file.hpp"

using namespace mmoc::engine::data;
using json = nlohmann::json;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

double max_rss_mib() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}

// The current resident set split as Linux reports it: RssAnon (the process's own memory) and RssFile (mapped file
// pages: the page cache a mapped token file shares with every reader; reclaimable).
double rss_mib(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(std::string(key).size())) / 1024.0;
  return -1;
}

json header_json(const TokenFile& f) {
  const TokenFileHeader& h = f.header();
  json meta = json::parse(f.meta_json(), nullptr, false);
  return {{"path", f.path()},
          {"version", h.version},
          {"token_dtype", h.token_bytes == 2 ? "uint16" : "uint32"},
          {"fit", std::string(to_string(h.fit))},
          {"vocab_size", h.vocab_size},
          {"num_tokens", h.num_tokens},
          {"num_docs", h.num_docs},
          {"num_labelled", h.num_labelled},
          {"max_token_id", h.max_token_id},
          {"bos_id", h.bos_id},
          {"eos_id", h.eos_id},
          {"file_bytes", h.file_bytes},
          {"content_sha256", hex(h.content_sha256)},
          {"tokenizer_sha256", hex(h.tokenizer_sha256)},
          {"meta", meta}};
}

struct BatchArgs {
  std::string data, tokenizer, fit, state_in, state_out;
  int64_t seq = 0, microbatches = 1, mbs = 1, steps = 1, vocab = 0;
  uint64_t seed = 0;
};

// The same DataConfig as mmoc-run builds from its flags; vocab 0 = the token file's own.
DataConfig config_of(const BatchArgs& a) {
  DataConfig dc;
  dc.path = a.data;
  if (!a.tokenizer.empty()) dc.tokenizer = a.tokenizer;
  dc.vocab_size = a.vocab;
  if (dc.vocab_size <= 0) {
    if (!is_token_file(a.data)) throw DataError("--vocab is required for JSONL data");
    dc.vocab_size = TokenFile::open(a.data)->header().vocab_size;
  }
  dc.fit.mode = parse_fit_mode(a.fit.empty() ? "pad" : a.fit);
  dc.fit_from_file = a.fit.empty();
  dc.fit.seq_len = a.seq;
  dc.seed = a.seed;
  return dc;
}

int cmd_batches(const BatchArgs& a) {
  BatchIterator it(open_rows(config_of(a)), a.seed);
  int64_t first = 0;
  if (!a.state_in.empty()) {
    it.load_state(a.state_in);
    std::ifstream f(a.state_in);
    first = json::parse(f).value("steps_done", int64_t{0});
  }
  for (int64_t s = 0; s < a.steps; ++s) {
    const StepBatch b = it.next_step(a.microbatches, a.mbs);
    std::cout << json{{"step", first + s + 1}, {"epoch", b.epoch}, {"rows", b.rows}, {"input_ids", b.input_ids}, {"labels", b.labels}}.dump()
              << "\n";
  }
  if (!a.state_out.empty()) {
    it.save_state(a.state_out);
    std::ifstream in(a.state_out);
    json st = json::parse(in);
    st["steps_done"] = first + a.steps;
    std::ofstream(a.state_out) << st.dump(2) << "\n";
  }
  return 0;
}

int cmd_bench(const BatchArgs& a) {
  const double rss0 = max_rss_mib();
  auto t0 = std::chrono::steady_clock::now();
  auto rows = open_rows(config_of(a));
  const double open_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  BatchIterator it(rows, a.seed);
  const double iter_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  int64_t labelled = 0;
  for (int64_t s = 0; s < a.steps; ++s) {
    const StepBatch b = it.next_step(a.microbatches, a.mbs);
    for (const auto& l : b.labels)
      for (int64_t v : l) labelled += v != kIgnoreIndex;
  }
  const double steps_s = seconds_since(t0);
  json out = {{"data", a.data},
              {"rows", rows->num_rows()},
              {"seq", a.seq},
              {"open_s", open_s},
              {"iterator_s", iter_s},
              {"steps", a.steps},
              {"steps_s", steps_s},
              {"labelled_tokens_read", labelled},
              {"max_rss_mib_before", rss0},
              {"max_rss_mib", max_rss_mib()},
              {"rss_anon_mib", rss_mib("RssAnon:")},
              {"rss_file_mib", rss_mib("RssFile:")}};
  if (is_token_file(a.data)) out["num_tokens"] = TokenFile::open(a.data)->header().num_tokens;
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mmoc-data: inspect training data as mmoc-run reads it"};
  app.require_subcommand(1);
  std::string file;
  int64_t vocab = 0;
  auto* info = app.add_subcommand("info", "header and metadata of a prepared token file (JSON)");
  info->add_option("file", file, "token file")->required();
  auto* check = app.add_subcommand("check", "read every section of a token file and check it");
  check->add_option("file", file, "token file")->required();
  check->add_option("--vocab", vocab, "check ids against this vocabulary (default: the file's)");

  BatchArgs ba;
  auto add_batch_opts = [&](CLI::App* c) {
    c->add_option("data", ba.data, "JSONL or token file")->required();
    c->add_option("--seq", ba.seq, "sequence length")->required();
    c->add_option("--microbatches", ba.microbatches, "micro-batches per step");
    c->add_option("--mbs", ba.mbs, "sequences per micro-batch");
    c->add_option("--steps", ba.steps, "steps");
    c->add_option("--vocab", ba.vocab, "the model's vocabulary (default: a token file's own)");
    c->add_option("--fit", ba.fit, "pad or pack (default: pad; a token file's own mode)");
    c->add_option("--seed", ba.seed, "data seed (mmoc-run --data-seed)");
    c->add_option("--tokenizer", ba.tokenizer, "SentencePiece model for JSONL text records");
  };
  auto* batches = app.add_subcommand("batches", "the batches mmoc-run would train on, one JSON line per step");
  add_batch_opts(batches);
  batches->add_option("--state-in", ba.state_in, "continue from a saved iterator state");
  batches->add_option("--state-out", ba.state_out, "save the iterator state after the last step");
  auto* bench = app.add_subcommand("bench", "time opening the data and reading the first steps; resident memory");
  add_batch_opts(bench);

  std::string out;
  int64_t tokens = 0, doc_len = 1000, svocab = 32000;
  bool unlabelled = false;
  auto* synth = app.add_subcommand("synth", "write a sparse synthetic token file (ids 0, eos 0) for open-time tests");
  synth->add_option("out", out, "output file")->required();
  synth->add_option("--tokens", tokens, "number of tokens")->required();
  synth->add_option("--doc-len", doc_len, "tokens per document");
  synth->add_option("--vocab", svocab, "vocab_size in the header");
  synth->add_flag("--unlabelled", unlabelled, "leave the mask empty (a hole) instead of all set");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "mmoc-data: " << e.what() << "\n";
    return 2;
  }
  try {
    if (*info) {
      auto t0 = std::chrono::steady_clock::now();
      auto f = TokenFile::open(file);
      json j = header_json(*f);
      j["open_s"] = seconds_since(t0);
      std::cout << j.dump(2) << "\n";
    } else if (*check) {
      auto t0 = std::chrono::steady_clock::now();
      auto f = TokenFile::open(file);
      const TokenFileCheck r = check_token_file(*f, vocab);
      std::printf("%s: ok: %lld tokens (%lld labelled) in %lld documents, ids <= %lld, content sha256 %s (%.2f s)\n", file.c_str(),
                  (long long)r.num_tokens, (long long)r.num_labelled, (long long)r.num_docs, (long long)r.max_token_id,
                  r.sha256_checked ? "verified" : "absent", seconds_since(t0));
    } else if (*batches) {
      return cmd_batches(ba);
    } else if (*bench) {
      return cmd_bench(ba);
    } else if (*synth) {
      auto t0 = std::chrono::steady_clock::now();
      write_synthetic_token_file(out, tokens, doc_len, svocab, !unlabelled);
      std::printf("wrote %s: %lld tokens in documents of %lld (%.2f s)\n", out.c_str(), (long long)tokens, (long long)doc_len,
                  seconds_since(t0));
    }
    return 0;
  } catch (const DataError& e) {
    std::cerr << "mmoc-data: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "mmoc-data: error: " << e.what() << "\n";
    return 1;
  }
}
