// SentencePiece tokenizer (LLaMA / LLaMA-2 `tokenizer.model` format) through libsentencepiece.
// The sentencepiece headers stay in tokenizer.cpp; when mmoc is built without libsentencepiece
// (MMOC_HAVE_SENTENCEPIECE undefined) the constructor throws DataError.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/data/data.hpp"

namespace mmoc::engine::data {

// A token with the byte range [begin, end) of the input it covers (SentencePiece's surface offsets).
struct TokenSpan {
  int64_t id;
  uint32_t begin;
  uint32_t end;
};

class Tokenizer {
 public:
  // Throws DataError naming the path when the file is missing, unreadable or not a SentencePiece model.
  explicit Tokenizer(const std::filesystem::path& model_file);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // No bos/eos added (the caller decides). SentencePiece adds its dummy-prefix space, as LLaMA's does.
  std::vector<int64_t> encode(std::string_view text) const;
  std::vector<TokenSpan> encode_with_offsets(std::string_view text) const;
  std::string decode(const std::vector<int64_t>& ids) const;  // control ids (bos/eos/pad) decode to ""

  int64_t vocab_size() const;
  int64_t bos_id() const;  // -1 when the model has none
  int64_t eos_id() const;
  int64_t pad_id() const;  // LLaMA: -1
  int64_t unk_id() const;
  std::string id_to_piece(int64_t id) const;
  const std::filesystem::path& path() const { return path_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::filesystem::path path_;
};

}  // namespace mmoc::engine::data
