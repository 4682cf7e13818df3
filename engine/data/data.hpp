// mmoc training data: JSONL examples (pre-tokenised or raw text through a SentencePiece tokenizer) or a
// prepared, memory-mapped token file (engine/data/token_file.hpp, docs/data-format.md), fitting to the plan's
// sequence length (pad or pack), and a deterministic, resumable batch iterator.
// Torch-free: batches are plain int64 arrays; the engine copies them into tensors.
//
// Label convention (as Hugging Face): labels[t] is the label of position t, NOT shifted; the loss
// compares logits[t] with labels[t+1]. -100 (kIgnoreIndex) positions do not count in the loss.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace mmoc::engine::data {

inline constexpr int64_t kIgnoreIndex = -100;

// Every user-facing problem with data (bad file, bad line, bad tokenizer, bad state) is a DataError;
// messages name the file (and line) and the problem. Tools map it to exit code 2.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One training example. input_ids and labels have the same length.
// [trunc_begin, trunc_end) is the token range that is dropped first when the example is too long for
// the sequence (the document of a summarisation example); empty for pre-tokenised examples unless the line
// gives "truncate": [begin, end].
struct Example {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> labels;
  int64_t trunc_begin = 0;
  int64_t trunc_end = 0;
};

class Tokenizer;  // engine/data/tokenizer.hpp

// ---- JSONL ----------------------------------------------------------------------------------
// Prompt template of document/summary records. The template text contains "{document}" once; the prompt
// (template with the document substituted) is encoded as one piece and gets labels -100, the summary is
// encoded on its own (SentencePiece's dummy prefix gives its leading space, hence no trailing space in
// the default template) and is labelled, as is the closing eos.
struct TextTemplate {
  std::string prompt = "Summarize:\n{document}\nSummary:";
  std::string document_key = "document";
  std::string summary_key = "summary";
  std::string text_key = "text";  // plain {"text": ...} records: every token labelled
  bool add_bos = true;            // bos first, label -100 (it is never a target)
  bool add_eos = true;            // eos last, labelled
};

// Pre-tokenised lines {"input_ids": [...], "labels": [...], "truncate": [begin, end]}; labels optional
// (= input_ids), -100 or in [0, vocab_size); truncate optional (the token range dropped first when the example
// is too long; tools/prepare/prepare_data.py writes it for summary records). Blank lines are skipped.
// Throws DataError "file:line: problem".
std::vector<Example> load_token_jsonl(const std::filesystem::path& path, int64_t vocab_size);

// Any mix of the three line kinds: {"input_ids"...}, {"document","summary"} and {"text"}. Text lines need
// `tokenizer` (nullptr: a DataError naming the line). Ids are checked against vocab_size.
std::vector<Example> load_jsonl(const std::filesystem::path& path, int64_t vocab_size, const Tokenizer* tokenizer,
                                const TextTemplate& tmpl = {});

// Parse one pre-tokenised line (where = "file:line" for messages). Exposed for tests and tools.
Example parse_token_record(std::string_view line, int64_t vocab_size, const std::string& where);

// Build one example from text records (exposed for tests).
Example make_summary_example(const Tokenizer& tok, std::string_view document, std::string_view summary,
                             const TextTemplate& tmpl = {});
Example make_text_example(const Tokenizer& tok, std::string_view text, const TextTemplate& tmpl = {});

// ---- fitting to seq_len --------------------------------------------------------------------
enum class FitMode { Pad, Pack };
FitMode parse_fit_mode(std::string_view s);  // "pad" | "pack"; DataError otherwise
std::string_view to_string(FitMode m);

struct FitOptions {
  FitMode mode = FitMode::Pad;
  int64_t seq_len = 0;
  int64_t pad_id = 0;  // input id of padded positions (their label is -100); LLaMA has no pad token
  int64_t eos_id = 2;  // pack: separator appended after an example that does not already end with eos
};

// Training rows of a fixed length, wherever they live: in memory (Rows, from JSONL) or in a memory-mapped
// token file (read on demand, engine/data/token_file.hpp). BatchIterator reads rows through this.
class RowSource {
 public:
  virtual ~RowSource() = default;
  virtual int64_t num_rows() const = 0;
  virtual int64_t row_length() const = 0;  // seq_len
  // Identity of the rows (data, seq_len, fit): a resumed run checks it has the same data.
  virtual uint64_t data_fingerprint() const = 0;
  // Copies row `row` into ids[0..row_length()) and labels[0..row_length()). DataError when the row cannot be
  // read (a token file is checked row by row as it is read: ids against the vocabulary, document bounds).
  virtual void read_row(int64_t row, int64_t* ids, int64_t* labels) const = 0;
};

// Rows of exactly seq_len tokens, row-major, in memory.
struct Rows : RowSource {
  int64_t seq_len = 0;
  std::vector<int64_t> input_ids;
  std::vector<int64_t> labels;
  int64_t size() const { return seq_len ? static_cast<int64_t>(input_ids.size()) / seq_len : 0; }
  uint64_t fingerprint() const;  // FNV-1a over ids and labels: a resumed run checks it has the same data

  int64_t num_rows() const override { return size(); }
  int64_t row_length() const override { return seq_len; }
  uint64_t data_fingerprint() const override { return fingerprint(); }
  void read_row(int64_t row, int64_t* ids, int64_t* labels) const override;
};

// Pad: one row per example; too long examples are truncated with truncate_example, short ones padded.
// Pack: examples (each followed by eos unless it ends with one; separator label = eos) concatenated and
// cut into rows of seq_len; an example may span rows; the last partial row is padded (labels -100).
Rows fit(const std::vector<Example>& examples, const FitOptions& opt);

// Shorten to max_len: drop tokens from the end of [trunc_begin, trunc_end) first (the document, so the
// summary survives), then, if still too long, cut the tail.
Example truncate_example(const Example& e, int64_t max_len);

// The positions truncate_example keeps of an example of n tokens, as two ranges: [0, first_end) and
// [second_begin, second_end) (the dropped middle is [first_end, second_begin)). One definition for the JSONL
// path and the token-file reader.
struct KeptRanges {
  int64_t first_end, second_begin, second_end;
  int64_t size() const { return first_end + (second_end - second_begin); }
};
KeptRanges truncation_ranges(int64_t n, int64_t trunc_begin, int64_t trunc_end, int64_t max_len);

// ---- deterministic shuffling and batches ----------------------------------------------------
// splitmix64: a fixed generator (std::shuffle and the std distributions are implementation-defined).
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next();
  uint64_t below(uint64_t n);  // uniform in [0, n), unbiased (rejection)
};
// Fisher-Yates permutation of [0, n) for (seed, epoch): generator seeded with seed + epoch.
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

// One training step: microbatches x (micro_batch_size * seq_len) ids and labels, row-major per micro-batch.
struct StepBatch {
  int64_t seq_len = 0;
  int64_t micro_batch_size = 0;
  std::vector<std::vector<int64_t>> input_ids;  // [mb][mbs*seq]
  std::vector<std::vector<int64_t>> labels;     // [mb][mbs*seq]
  std::vector<int64_t> rows;                    // dataset row of each sequence, mb-major (for logs/tests)
  int64_t epoch = 0;                            // epoch of the step's first row
};

struct IteratorState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t position = 0;  // rows of this epoch already handed out
  int64_t num_rows = 0;
  uint64_t fingerprint = 0;
};
nlohmann::json to_json(const IteratorState& s);
IteratorState iterator_state_from_json(const nlohmann::json& j);  // DataError on missing/bad fields

// Walks rows in a per-epoch permutation; a step that runs past the end of an epoch continues in the next
// one (a fresh permutation, seed + epoch), so every step is full.
class BatchIterator {
 public:
  BatchIterator(std::shared_ptr<const RowSource> rows, uint64_t seed);
  StepBatch next_step(int64_t microbatches, int64_t micro_batch_size);
  IteratorState state() const;
  // Continue from a saved state; DataError when it belongs to other data (row count, fingerprint) or seed.
  void restore(const IteratorState& s);
  void save_state(const std::filesystem::path& file) const;  // JSON, written to a temporary then renamed
  void load_state(const std::filesystem::path& file);
  int64_t epoch() const { return epoch_; }
  int64_t position() const { return position_; }
  const RowSource& rows() const { return *rows_; }

 private:
  std::shared_ptr<const RowSource> rows_;
  uint64_t seed_;
  uint64_t fingerprint_;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<int64_t> perm_;  // permutation of epoch_
};

// ---- one call for the engine ---------------------------------------------------------------
struct DataConfig {
  std::filesystem::path path;       // JSONL, or a prepared token file (recognised by its magic bytes)
  std::filesystem::path tokenizer;  // SentencePiece model; empty: pre-tokenised lines only (JSONL only)
  int64_t vocab_size = 0;
  FitOptions fit;
  bool fit_from_file = false;       // a token file: use the fit mode stored in it instead of fit.mode
  TextTemplate tmpl;
  uint64_t seed = 0;
};
// The training rows of cfg.path. A token file (docs/data-format.md) is memory-mapped and read on demand: O(1)
// to open whatever its size; its header is checked against cfg.vocab_size here and every row's ids as the row
// is read. A JSONL file is loaded (tokenising text lines with cfg.tokenizer, whose eos id then replaces
// fit.eos_id) and fitted in memory. DataError on bad input (naming file and line / record), also when the file
// holds no example.
std::shared_ptr<const RowSource> open_rows(const DataConfig& cfg);
// The same rows, in memory (a token file is read whole: for small data, tools and tests).
std::shared_ptr<const Rows> load_rows(const DataConfig& cfg);
// True when the file starts with the token file's magic bytes (false when it cannot be read).
bool is_token_file(const std::filesystem::path& path);

}  // namespace mmoc::engine::data
