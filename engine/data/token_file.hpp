// Prepared token files (docs/data-format.md): a 256-byte header, then page-aligned sections holding the token
// stream (uint16 or uint32), a loss-mask bitmap, document offsets, each document's truncatable range and a JSON
// metadata blob. tools/prepare/prepare_data.py writes them from JSONL or Parquet through an HF tokenizer.
//
// TokenFile maps the file read-only: opening is O(1) whatever the size (header and section bounds are checked
// against the file size, nothing is scanned); TokenFileRows cuts rows out of it on demand with the engine's pad
// and pack semantics (the same rows as fit() over the same examples). Torch-free.
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/data/data.hpp"

namespace mmoc::engine::data {

inline constexpr char kTokenFileMagic[8] = {'M', 'M', 'O', 'C', 'T', 'O', 'K', 'S'};
inline constexpr uint32_t kTokenFileVersion = 1;
inline constexpr uint64_t kTokenFileHeaderBytes = 256;
inline constexpr uint64_t kTokenFileAlign = 4096;

struct TokenFileHeader {
  uint32_t version = kTokenFileVersion;
  uint32_t token_bytes = 4;        // 2 (uint16 ids, vocabularies up to 65536) or 4 (uint32)
  FitMode fit = FitMode::Pad;      // the fit mode it was prepared for: mmoc-run's default for this file
  int64_t vocab_size = 0;          // the tokenizer's vocabulary (every id is below it)
  int64_t num_tokens = 0;
  int64_t num_docs = 0;            // documents = examples (one per input record)
  int64_t bos_id = -1;             // -1: none
  int64_t eos_id = -1;             // every document ends with it
  int64_t max_token_id = 0;
  int64_t num_labelled = 0;        // set bits of the mask
  uint64_t tokens_offset = 0, mask_offset = 0, offsets_offset = 0, docinfo_offset = 0, meta_offset = 0;
  uint64_t meta_bytes = 0;
  uint64_t file_bytes = 0;
  std::array<uint8_t, 32> content_sha256{};    // SHA-256 of the four data sections; all zero: not computed
  std::array<uint8_t, 32> tokenizer_sha256{};  // SHA-256 of the tokenizer.json the file was made with

  uint64_t tokens_bytes() const { return static_cast<uint64_t>(num_tokens) * token_bytes; }
  uint64_t mask_bytes() const { return (static_cast<uint64_t>(num_tokens) + 7) / 8; }
  uint64_t offsets_bytes() const { return (static_cast<uint64_t>(num_docs) + 1) * 8; }
  uint64_t docinfo_bytes() const { return static_cast<uint64_t>(num_docs) * 8; }
};

// Fills the section offsets and file_bytes of h from its counts, token_bytes and meta_bytes (the canonical
// layout: every section at a multiple of kTokenFileAlign, in the order tokens, mask, offsets, docinfo, meta).
void layout_token_file(TokenFileHeader& h);
std::array<uint8_t, kTokenFileHeaderBytes> encode_header(const TokenFileHeader& h);
// Parses and checks a header (magic, version, field ranges, canonical layout); where names the file.
TokenFileHeader decode_header(const uint8_t* p, uint64_t n, const std::string& where);

class TokenFile {
 public:
  // Maps the file. DataError naming the file when it is missing, not a token file, of an unsupported version,
  // truncated or longer than its header says, or its header is inconsistent. O(1): the sections are not read.
  static std::shared_ptr<const TokenFile> open(const std::filesystem::path& path);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const TokenFileHeader& header() const { return h_; }
  const std::string& path() const { return path_; }
  int64_t token(int64_t i) const {
    return h_.token_bytes == 2 ? static_cast<const uint16_t*>(tokens_)[i] : static_cast<const uint32_t*>(tokens_)[i];
  }
  bool labelled(int64_t i) const { return (mask_[i >> 3] >> (i & 7)) & 1; }
  // Asks the kernel to read tokens [begin, end) and their mask bits now (one request instead of a fault per
  // page: the mapping is MADV_RANDOM, no read-around).
  void prefetch(int64_t begin, int64_t end) const;
  // Document d's token range [begin, end) in the stream and its truncatable range relative to begin; DataError
  // when the stored values are inconsistent (checked on every call: a corrupt file fails where it is read).
  struct Doc {
    int64_t begin, end, trunc_begin, trunc_end;
  };
  Doc doc(int64_t d) const;
  const std::string& meta_json() const { return meta_; }
  const uint8_t* data() const { return base_; }  // the whole mapped file
  std::string tokenizer_name() const;  // from the metadata, for messages

 private:
  TokenFile() = default;
  std::string path_;
  TokenFileHeader h_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  const void* tokens_ = nullptr;
  const uint8_t* mask_ = nullptr;
  const uint64_t* offsets_ = nullptr;
  const uint32_t* docinfo_ = nullptr;
  std::string meta_;
};

// Rows of a token file for a plan: pad = one row per document (too long documents truncated as
// truncate_example does: the truncatable range from its end first, then the tail), pack = the token stream cut
// into rows of seq_len (the last one padded). Labels: the token where its mask bit is set, else -100; padding:
// fit.pad_id, -100. Every id read is checked against vocab_size. Opening checks the header's vocabulary and
// largest id against vocab_size (DataError naming the file and both numbers).
class TokenFileRows : public RowSource {
 public:
  TokenFileRows(std::shared_ptr<const TokenFile> file, int64_t vocab_size, const FitOptions& fit);
  int64_t num_rows() const override { return rows_; }
  int64_t row_length() const override { return fit_.seq_len; }
  uint64_t data_fingerprint() const override { return fingerprint_; }
  void read_row(int64_t row, int64_t* ids, int64_t* labels) const override;
  const TokenFile& file() const { return *file_; }
  const FitOptions& fit() const { return fit_; }

 private:
  int64_t checked(int64_t i) const;
  std::shared_ptr<const TokenFile> file_;
  int64_t vocab_;
  FitOptions fit_;
  int64_t rows_ = 0;
  uint64_t fingerprint_ = 0;
};

// Reads every section and checks what opening does not: offsets increasing (no empty document), offsets[last]
// = num_tokens, truncatable ranges inside their document, every document ending with eos, every id below
// vocab_size (0: the header's) and the header's max_token_id the real maximum, the mask's count and padding
// bits, and the content SHA-256 when present. DataError naming the file and the first problem's position.
struct TokenFileCheck {
  int64_t num_tokens = 0, num_docs = 0, num_labelled = 0, max_token_id = 0;
  bool sha256_checked = false;
};
TokenFileCheck check_token_file(const TokenFile& f, int64_t vocab_size = 0);

// Writes a token file from examples (tools/prepare/prepare_data.py is the main writer; this one serves tests
// and mmoc-data). Every example must be non-empty, end with eos_id and have labels equal to its ids or -100;
// ids must be below vocab_size. Written to a temporary name and renamed.
struct TokenFileWriteOptions {
  int64_t vocab_size = 0;
  int64_t bos_id = -1, eos_id = -1;
  FitMode fit = FitMode::Pad;
  std::string meta_json = "{}";
  std::array<uint8_t, 32> tokenizer_sha256{};
  int token_bytes = 0;  // 0: 2 when vocab_size <= 65536, else 4
};
void write_token_file(const std::filesystem::path& path, const std::vector<Example>& docs, const TokenFileWriteOptions& o);

// A large file for open-time and memory tests without the disk space: num_tokens ids 0 (eos_id = 0) in
// documents of doc_len tokens; the token and docinfo sections are sparse (holes), the offsets are written, the
// mask is all set when labelled (else a hole). No content hash.
void write_synthetic_token_file(const std::filesystem::path& path, int64_t num_tokens, int64_t doc_len,
                                int64_t vocab_size, bool labelled);

// SHA-256 (FIPS 180-4), incremental.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::array<uint8_t, 32> digest();  // once
 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};
std::string hex(const std::array<uint8_t, 32>& d);

}  // namespace mmoc::engine::data
