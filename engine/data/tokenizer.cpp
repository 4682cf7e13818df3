#include "engine/data/tokenizer.hpp"

#include <system_error>

#ifdef MMOC_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace mmoc::engine::data {

#ifdef MMOC_HAVE_SENTENCEPIECE
struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer(const std::filesystem::path& model_file) : path_(model_file) {
  std::error_code ec;
  if (model_file.empty()) throw DataError("tokenizer: no tokenizer model file given");
  if (!std::filesystem::exists(model_file, ec))
    throw DataError("tokenizer " + model_file.string() + ": file not found");
  if (!std::filesystem::is_regular_file(model_file, ec))
    throw DataError("tokenizer " + model_file.string() + ": not a regular file");
  impl_ = std::make_unique<Impl>();
  const auto st = impl_->sp.Load(model_file.string());
  if (!st.ok())
    throw DataError("tokenizer " + model_file.string() + ": cannot load SentencePiece model: " + st.ToString());
  if (impl_->sp.GetPieceSize() <= 0) throw DataError("tokenizer " + model_file.string() + ": empty vocabulary");
}

std::vector<int64_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto st = impl_->sp.Encode(std::string(text), &ids);
  if (!st.ok()) throw DataError("tokenizer " + path_.string() + ": encode failed: " + st.ToString());
  return {ids.begin(), ids.end()};
}

std::vector<TokenSpan> Tokenizer::encode_with_offsets(std::string_view text) const {
  sentencepiece::ImmutableSentencePieceText spt;
  const auto st = impl_->sp.Encode(std::string(text), spt.mutable_proto());
  if (!st.ok()) throw DataError("tokenizer " + path_.string() + ": encode failed: " + st.ToString());
  std::vector<TokenSpan> out;
  out.reserve(spt.pieces_size());
  for (const auto& p : spt.pieces()) out.push_back({static_cast<int64_t>(p.id()), p.begin(), p.end()});
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> v;
  v.reserve(ids.size());
  const int64_t n = vocab_size();
  for (int64_t id : ids) {
    if (id < 0 || id >= n)
      throw DataError("tokenizer " + path_.string() + ": decode: id " + std::to_string(id) + " outside [0, " +
                      std::to_string(n) + ")");
    v.push_back(static_cast<int>(id));
  }
  std::string out;
  const auto st = impl_->sp.Decode(v, &out);
  if (!st.ok()) throw DataError("tokenizer " + path_.string() + ": decode failed: " + st.ToString());
  return out;
}

int64_t Tokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }
int64_t Tokenizer::bos_id() const { return impl_->sp.bos_id(); }
int64_t Tokenizer::eos_id() const { return impl_->sp.eos_id(); }
int64_t Tokenizer::pad_id() const { return impl_->sp.pad_id(); }
int64_t Tokenizer::unk_id() const { return impl_->sp.unk_id(); }
std::string Tokenizer::id_to_piece(int64_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return impl_->sp.IdToPiece(static_cast<int>(id));
}

#else  // built without libsentencepiece

struct Tokenizer::Impl {};
Tokenizer::Tokenizer(const std::filesystem::path& model_file) : path_(model_file) {
  throw DataError("tokenizer " + model_file.string() +
                  ": mmoc was built without libsentencepiece (install libsentencepiece-dev and reconfigure)");
}
std::vector<int64_t> Tokenizer::encode(std::string_view) const { return {}; }
std::vector<TokenSpan> Tokenizer::encode_with_offsets(std::string_view) const { return {}; }
std::string Tokenizer::decode(const std::vector<int64_t>&) const { return {}; }
int64_t Tokenizer::vocab_size() const { return 0; }
int64_t Tokenizer::bos_id() const { return -1; }
int64_t Tokenizer::eos_id() const { return -1; }
int64_t Tokenizer::pad_id() const { return -1; }
int64_t Tokenizer::unk_id() const { return -1; }
std::string Tokenizer::id_to_piece(int64_t) const { return {}; }
#endif

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

}  // namespace mmoc::engine::data
