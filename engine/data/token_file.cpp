#include "engine/data/token_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

#include <nlohmann/json.hpp>

static_assert(std::endian::native == std::endian::little, "token files are little-endian; this reader maps them as is");

namespace mmoc::engine::data {

namespace {

uint64_t align_up(uint64_t v) { return (v + kTokenFileAlign - 1) / kTokenFileAlign * kTokenFileAlign; }

template <class T>
void put(uint8_t* p, size_t at, T v) {
  std::memcpy(p + at, &v, sizeof v);
}
template <class T>
T get(const uint8_t* p, size_t at) {
  T v;
  std::memcpy(&v, p + at, sizeof v);
  return v;
}

std::string errno_text() { return std::strerror(errno); }

// Writes all of [data, data+n) at offset `at`.
void pwrite_all(int fd, const void* data, size_t n, uint64_t at, const std::string& where) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, std::min<size_t>(n, size_t{1} << 30), static_cast<off_t>(at));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw DataError(where + ": write failed: " + errno_text());
    }
    p += w;
    at += static_cast<uint64_t>(w);
    n -= static_cast<size_t>(w);
  }
}

// A temporary file beside `path`, renamed over it on commit(); removed when not committed.
struct TempFile {
  std::string path, tmp;
  int fd = -1;
  explicit TempFile(const std::filesystem::path& p) : path(p.string()), tmp(p.string() + ".tmp" + std::to_string(::getpid())) {
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw DataError(path + ": cannot write: " + errno_text());
  }
  void commit() {
    if (::fsync(fd) != 0 || ::close(fd) != 0) {
      fd = -1;
      throw DataError(path + ": write failed: " + errno_text());
    }
    fd = -1;
    if (::rename(tmp.c_str(), path.c_str()) != 0) throw DataError(path + ": cannot rename into place: " + errno_text());
    tmp.clear();
  }
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!tmp.empty()) ::unlink(tmp.c_str());
  }
};

uint64_t mix64(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return SplitMix64(h).next();
}

bool all_zero(const std::array<uint8_t, 32>& a) {
  return std::all_of(a.begin(), a.end(), [](uint8_t b) { return b == 0; });
}

}  // namespace

// ---- header --------------------------------------------------------------------------------------
void layout_token_file(TokenFileHeader& h) {
  h.tokens_offset = kTokenFileAlign;
  h.mask_offset = align_up(h.tokens_offset + h.tokens_bytes());
  h.offsets_offset = align_up(h.mask_offset + h.mask_bytes());
  h.docinfo_offset = align_up(h.offsets_offset + h.offsets_bytes());
  h.meta_offset = align_up(h.docinfo_offset + h.docinfo_bytes());
  h.file_bytes = h.meta_offset + h.meta_bytes;
}

std::array<uint8_t, kTokenFileHeaderBytes> encode_header(const TokenFileHeader& h) {
  std::array<uint8_t, kTokenFileHeaderBytes> b{};
  uint8_t* p = b.data();
  std::memcpy(p, kTokenFileMagic, 8);
  put<uint32_t>(p, 8, h.version);
  put<uint32_t>(p, 12, static_cast<uint32_t>(kTokenFileHeaderBytes));
  put<uint32_t>(p, 16, h.token_bytes);
  put<uint32_t>(p, 20, h.fit == FitMode::Pack ? 1 : 0);
  put<uint64_t>(p, 24, static_cast<uint64_t>(h.vocab_size));
  put<uint64_t>(p, 32, static_cast<uint64_t>(h.num_tokens));
  put<uint64_t>(p, 40, static_cast<uint64_t>(h.num_docs));
  put<int64_t>(p, 48, h.bos_id);
  put<int64_t>(p, 56, h.eos_id);
  put<uint64_t>(p, 64, static_cast<uint64_t>(h.max_token_id));
  put<uint64_t>(p, 72, static_cast<uint64_t>(h.num_labelled));
  put<uint64_t>(p, 80, h.tokens_offset);
  put<uint64_t>(p, 88, h.mask_offset);
  put<uint64_t>(p, 96, h.offsets_offset);
  put<uint64_t>(p, 104, h.docinfo_offset);
  put<uint64_t>(p, 112, h.meta_offset);
  put<uint64_t>(p, 120, h.meta_bytes);
  put<uint64_t>(p, 128, h.file_bytes);
  std::memcpy(p + 136, h.content_sha256.data(), 32);
  std::memcpy(p + 168, h.tokenizer_sha256.data(), 32);
  return b;
}

TokenFileHeader decode_header(const uint8_t* p, uint64_t n, const std::string& where) {
  if (n < 8 || std::memcmp(p, kTokenFileMagic, 8) != 0) throw DataError(where + ": not an mmoc token file (bad magic bytes)");
  if (n < kTokenFileHeaderBytes)
    throw DataError(where + ": truncated: " + std::to_string(n) + " bytes, less than the " +
                    std::to_string(kTokenFileHeaderBytes) + "-byte header");
  TokenFileHeader h;
  h.version = get<uint32_t>(p, 8);
  if (h.version != kTokenFileVersion)
    throw DataError(where + ": token file version " + std::to_string(h.version) + " is not supported (this mmoc reads version " +
                    std::to_string(kTokenFileVersion) + ")");
  auto bad = [&](const std::string& what) { return DataError(where + ": corrupt header: " + what); };
  if (get<uint32_t>(p, 12) != kTokenFileHeaderBytes) throw bad("header size " + std::to_string(get<uint32_t>(p, 12)));
  h.token_bytes = get<uint32_t>(p, 16);
  if (h.token_bytes != 2 && h.token_bytes != 4) throw bad("token size " + std::to_string(h.token_bytes) + " (2 or 4 expected)");
  const uint32_t fit = get<uint32_t>(p, 20);
  if (fit > 1) throw bad("fit mode " + std::to_string(fit) + " (0 pad or 1 pack expected)");
  h.fit = fit == 1 ? FitMode::Pack : FitMode::Pad;
  const uint64_t vocab = get<uint64_t>(p, 24), ntok = get<uint64_t>(p, 32), ndoc = get<uint64_t>(p, 40);
  const uint64_t max_vocab = h.token_bytes == 2 ? (uint64_t{1} << 16) : (uint64_t{1} << 32);
  if (vocab == 0 || vocab > max_vocab)
    throw bad("vocab_size " + std::to_string(vocab) + " (1.." + std::to_string(max_vocab) + " for " +
              std::to_string(h.token_bytes * 8) + "-bit tokens)");
  if (ndoc == 0) throw bad("no documents");
  if (ntok < ndoc || ntok > (uint64_t{1} << 48))
    throw bad(std::to_string(ntok) + " tokens for " + std::to_string(ndoc) + " documents");
  h.vocab_size = static_cast<int64_t>(vocab);
  h.num_tokens = static_cast<int64_t>(ntok);
  h.num_docs = static_cast<int64_t>(ndoc);
  h.bos_id = get<int64_t>(p, 48);
  h.eos_id = get<int64_t>(p, 56);
  if (h.bos_id < -1 || h.bos_id >= h.vocab_size) throw bad("bos id " + std::to_string(h.bos_id));
  if (h.eos_id < 0 || h.eos_id >= h.vocab_size) throw bad("eos id " + std::to_string(h.eos_id));
  const uint64_t maxid = get<uint64_t>(p, 64), nlab = get<uint64_t>(p, 72);
  if (maxid >= vocab)
    throw bad("max_token_id " + std::to_string(maxid) + " is not below its vocab_size " + std::to_string(vocab));
  if (nlab > ntok) throw bad(std::to_string(nlab) + " labelled tokens of " + std::to_string(ntok));
  h.max_token_id = static_cast<int64_t>(maxid);
  h.num_labelled = static_cast<int64_t>(nlab);
  h.meta_bytes = get<uint64_t>(p, 120);
  if (h.meta_bytes > (uint64_t{1} << 32)) throw bad("metadata size " + std::to_string(h.meta_bytes));
  TokenFileHeader want = h;
  layout_token_file(want);
  h.tokens_offset = get<uint64_t>(p, 80);
  h.mask_offset = get<uint64_t>(p, 88);
  h.offsets_offset = get<uint64_t>(p, 96);
  h.docinfo_offset = get<uint64_t>(p, 104);
  h.meta_offset = get<uint64_t>(p, 112);
  h.file_bytes = get<uint64_t>(p, 128);
  if (h.tokens_offset != want.tokens_offset || h.mask_offset != want.mask_offset || h.offsets_offset != want.offsets_offset ||
      h.docinfo_offset != want.docinfo_offset || h.meta_offset != want.meta_offset || h.file_bytes != want.file_bytes)
    throw bad("section offsets or file size do not match its counts (" + std::to_string(ntok) + " tokens, " +
              std::to_string(ndoc) + " documents)");
  std::memcpy(h.content_sha256.data(), p + 136, 32);
  std::memcpy(h.tokenizer_sha256.data(), p + 168, 32);
  return h;
}

// ---- reader ----------------------------------------------------------------------------------------
std::shared_ptr<const TokenFile> TokenFile::open(const std::filesystem::path& path) {
  const std::string where = path.string();
  const int fd = ::open(where.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw DataError(where + ": cannot open token file: " + errno_text());
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw DataError(where + ": cannot stat: " + errno_text());
  if (!S_ISREG(st.st_mode)) throw DataError(where + ": not a regular file");
  const auto size = static_cast<uint64_t>(st.st_size);
  uint8_t hb[kTokenFileHeaderBytes] = {};
  const ssize_t got = ::pread(fd, hb, sizeof hb, 0);
  if (got < 0) throw DataError(where + ": read failed: " + errno_text());
  TokenFileHeader h = decode_header(hb, static_cast<uint64_t>(got), where);
  if (size < h.file_bytes)
    throw DataError(where + ": truncated: its header describes " + std::to_string(h.file_bytes) + " bytes (" +
                    std::to_string(h.num_tokens) + " tokens, " + std::to_string(h.num_docs) + " documents), the file has " +
                    std::to_string(size));
  if (size > h.file_bytes)
    throw DataError(where + ": corrupt: the file has " + std::to_string(size) + " bytes, more than the " +
                    std::to_string(h.file_bytes) + " its header describes");
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) throw DataError(where + ": cannot map the file: " + errno_text());
  // Rows are read in a shuffled order: no read-around on a fault (the kernel's default reads megabytes around
  // each faulting page and maps them, which grows the resident set by that much a row); read_row asks for each
  // row's pages itself (prefetch).
  ::madvise(m, size, MADV_RANDOM);
  std::shared_ptr<TokenFile> f(new TokenFile());
  f->path_ = where;
  f->h_ = h;
  f->base_ = static_cast<const uint8_t*>(m);
  f->size_ = size;
  f->tokens_ = f->base_ + h.tokens_offset;
  f->mask_ = f->base_ + h.mask_offset;
  f->offsets_ = reinterpret_cast<const uint64_t*>(f->base_ + h.offsets_offset);
  f->docinfo_ = reinterpret_cast<const uint32_t*>(f->base_ + h.docinfo_offset);
  if (f->offsets_[0] != 0 || f->offsets_[h.num_docs] != static_cast<uint64_t>(h.num_tokens))
    throw DataError(where + ": corrupt: document offsets do not span the " + std::to_string(h.num_tokens) + " tokens");
  f->meta_.assign(reinterpret_cast<const char*>(f->base_ + h.meta_offset), h.meta_bytes);
  if (!nlohmann::json::accept(f->meta_)) throw DataError(where + ": corrupt: the metadata is not JSON");
  return f;
}

TokenFile::~TokenFile() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
}

void TokenFile::prefetch(int64_t begin, int64_t end) const {
  if (end <= begin) return;
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  auto advise = [&](uint64_t a, uint64_t b) {  // byte offsets in the file
    a = a / page * page;
    ::madvise(const_cast<uint8_t*>(base_) + a, b - a, MADV_WILLNEED);
  };
  advise(h_.tokens_offset + static_cast<uint64_t>(begin) * h_.token_bytes, h_.tokens_offset + static_cast<uint64_t>(end) * h_.token_bytes);
  advise(h_.mask_offset + static_cast<uint64_t>(begin) / 8, h_.mask_offset + (static_cast<uint64_t>(end) + 7) / 8);
}

TokenFile::Doc TokenFile::doc(int64_t d) const {
  if (d < 0 || d >= h_.num_docs) throw DataError(path_ + ": document " + std::to_string(d) + " out of range");
  const uint64_t b = offsets_[d], e = offsets_[d + 1];
  if (b >= e || e > static_cast<uint64_t>(h_.num_tokens))
    throw DataError(path_ + ": corrupt: document " + std::to_string(d) + " has offsets [" + std::to_string(b) + ", " +
                    std::to_string(e) + ") (" + std::to_string(h_.num_tokens) + " tokens)");
  const uint64_t tb = docinfo_[2 * d], te = docinfo_[2 * d + 1];
  if (tb > te || te > e - b)
    throw DataError(path_ + ": corrupt: document " + std::to_string(d) + " has truncatable range [" + std::to_string(tb) + ", " +
                    std::to_string(te) + ") outside its " + std::to_string(e - b) + " tokens");
  if (token(static_cast<int64_t>(e) - 1) != h_.eos_id)
    throw DataError(path_ + ": corrupt: document " + std::to_string(d) + " does not end with eos " + std::to_string(h_.eos_id));
  return {static_cast<int64_t>(b), static_cast<int64_t>(e), static_cast<int64_t>(tb), static_cast<int64_t>(te)};
}

std::string TokenFile::tokenizer_name() const {
  const auto j = nlohmann::json::parse(meta_, nullptr, false);
  std::string name;
  if (j.is_object() && j.contains("tokenizer") && j["tokenizer"].is_object()) {
    const auto& t = j["tokenizer"];
    if (t.contains("name") && t["name"].is_string()) name = t["name"].get<std::string>();
  }
  return (name.empty() ? std::string("tokenizer") : "tokenizer " + name) + " sha256 " + hex(h_.tokenizer_sha256).substr(0, 12);
}

// ---- rows --------------------------------------------------------------------------------------------
TokenFileRows::TokenFileRows(std::shared_ptr<const TokenFile> file, int64_t vocab_size, const FitOptions& fit)
    : file_(std::move(file)), vocab_(vocab_size), fit_(fit) {
  const TokenFileHeader& h = file_->header();
  if (vocab_ <= 0) throw DataError("data: vocab_size must be positive");
  if (fit_.seq_len <= 0) throw DataError("sequence length must be positive, got " + std::to_string(fit_.seq_len));
  if (h.vocab_size > vocab_)
    throw DataError(file_->path() + ": tokenised with a vocabulary of " + std::to_string(h.vocab_size) + " (" +
                    file_->tokenizer_name() + "), larger than the model's vocab_size " + std::to_string(vocab_) +
                    " (ids up to " + std::to_string(h.max_token_id) + ")");
  rows_ = fit_.mode == FitMode::Pad ? h.num_docs : (h.num_tokens + fit_.seq_len - 1) / fit_.seq_len;
  uint64_t fp = 0x6d6d6f63746f6b73ULL;  // "mmoctoks"
  if (!all_zero(h.content_sha256)) {
    uint64_t c;
    std::memcpy(&c, h.content_sha256.data(), 8);
    fp = mix64(fp, c);
  } else {  // no content hash: the header's identity
    const auto hb = encode_header(h);
    for (size_t i = 0; i < hb.size(); i += 8) fp = mix64(fp, get<uint64_t>(hb.data(), i));
  }
  for (uint64_t v : {static_cast<uint64_t>(fit_.seq_len), static_cast<uint64_t>(fit_.mode == FitMode::Pack),
                     static_cast<uint64_t>(fit_.pad_id)})
    fp = mix64(fp, v);
  fingerprint_ = fp;
}

int64_t TokenFileRows::checked(int64_t i) const {
  const int64_t id = file_->token(i);
  if (id >= vocab_ || id > file_->header().max_token_id)
    throw DataError(file_->path() + ": token " + std::to_string(i) + " = " + std::to_string(id) +
                    (id >= vocab_ ? " is outside the model's vocabulary [0, " + std::to_string(vocab_) + ")"
                                  : " is above the header's max_token_id " + std::to_string(file_->header().max_token_id)) +
                    " (corrupt file?)");
  return id;
}

void TokenFileRows::read_row(int64_t row, int64_t* ids, int64_t* labels) const {
  if (row < 0 || row >= rows_) throw DataError(file_->path() + ": row " + std::to_string(row) + " out of range");
  const int64_t S = fit_.seq_len;
  int64_t k = 0;
  auto copy = [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i, ++k) {
      ids[k] = checked(i);
      labels[k] = file_->labelled(i) ? ids[k] : kIgnoreIndex;
    }
  };
  if (fit_.mode == FitMode::Pack) {
    const int64_t a = row * S, b = std::min(a + S, file_->header().num_tokens);
    file_->prefetch(a, b);
    copy(a, b);
  } else {
    const TokenFile::Doc d = file_->doc(row);
    const KeptRanges kr = truncation_ranges(d.end - d.begin, d.trunc_begin, d.trunc_end, S);
    file_->prefetch(d.begin, d.begin + kr.first_end);
    file_->prefetch(d.begin + kr.second_begin, d.begin + kr.second_end);
    copy(d.begin, d.begin + kr.first_end);
    copy(d.begin + kr.second_begin, d.begin + kr.second_end);
  }
  for (; k < S; ++k) {
    ids[k] = fit_.pad_id;
    labels[k] = kIgnoreIndex;
  }
}

// ---- full check --------------------------------------------------------------------------------------
TokenFileCheck check_token_file(const TokenFile& f, int64_t vocab_size) {
  const TokenFileHeader& h = f.header();
  const std::string& where = f.path();
  const int64_t vocab = vocab_size > 0 ? vocab_size : h.vocab_size;
  TokenFileCheck r;
  r.num_tokens = h.num_tokens;
  r.num_docs = h.num_docs;
  for (int64_t d = 0; d < h.num_docs; ++d) (void)f.doc(d);  // bounds, truncatable range, eos at the end
  int64_t maxid = 0;
  for (int64_t i = 0; i < h.num_tokens; ++i) {
    const int64_t id = f.token(i);
    if (id >= vocab)
      throw DataError(where + ": token " + std::to_string(i) + " = " + std::to_string(id) + " is outside the vocabulary [0, " +
                      std::to_string(vocab) + ")");
    maxid = std::max(maxid, id);
  }
  if (maxid != h.max_token_id)
    throw DataError(where + ": corrupt: the largest id is " + std::to_string(maxid) + ", the header says " +
                    std::to_string(h.max_token_id));
  r.max_token_id = maxid;
  for (int64_t i = h.num_tokens; i < static_cast<int64_t>(h.mask_bytes() * 8); ++i)
    if (f.labelled(i)) throw DataError(where + ": corrupt: mask bits set past the last token");
  int64_t lab = 0;
  const uint8_t* mask = f.data() + h.mask_offset;
  for (uint64_t i = 0; i < h.mask_bytes(); ++i) lab += std::popcount(mask[i]);
  r.num_labelled = lab;
  if (lab != h.num_labelled)
    throw DataError(where + ": corrupt: " + std::to_string(lab) + " labelled tokens, the header says " +
                    std::to_string(h.num_labelled));
  if (!all_zero(h.content_sha256)) {
    Sha256 sha;
    sha.update(f.data() + h.tokens_offset, h.tokens_bytes());
    sha.update(f.data() + h.mask_offset, h.mask_bytes());
    sha.update(f.data() + h.offsets_offset, h.offsets_bytes());
    sha.update(f.data() + h.docinfo_offset, h.docinfo_bytes());
    if (sha.digest() != h.content_sha256)
      throw DataError(where + ": corrupt: the content SHA-256 does not match the header's " + hex(h.content_sha256));
    r.sha256_checked = true;
  }
  return r;
}

// ---- writers -------------------------------------------------------------------------------------------
void write_token_file(const std::filesystem::path& path, const std::vector<Example>& docs, const TokenFileWriteOptions& o) {
  const std::string where = path.string();
  if (docs.empty()) throw DataError(where + ": no documents to write");
  if (o.vocab_size <= 0 || o.eos_id < 0 || o.eos_id >= o.vocab_size)
    throw DataError(where + ": bad vocab_size/eos_id " + std::to_string(o.vocab_size) + "/" + std::to_string(o.eos_id));
  TokenFileHeader h;
  h.token_bytes = o.token_bytes ? o.token_bytes : (o.vocab_size <= 65536 ? 2 : 4);
  h.fit = o.fit;
  h.vocab_size = o.vocab_size;
  h.bos_id = o.bos_id;
  h.eos_id = o.eos_id;
  h.num_docs = static_cast<int64_t>(docs.size());
  std::vector<uint8_t> tokens, mask;
  std::vector<uint64_t> offsets{0};
  std::vector<uint32_t> docinfo;
  int64_t n = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    const Example& e = docs[d];
    const std::string at = where + ": document " + std::to_string(d);
    if (e.input_ids.empty()) throw DataError(at + " is empty");
    if (e.labels.size() != e.input_ids.size()) throw DataError(at + ": labels and ids differ in length");
    if (e.input_ids.back() != o.eos_id) throw DataError(at + " does not end with eos");
    for (size_t i = 0; i < e.input_ids.size(); ++i) {
      const int64_t id = e.input_ids[i];
      if (id < 0 || id >= o.vocab_size) throw DataError(at + ": id " + std::to_string(id) + " outside the vocabulary");
      if (e.labels[i] != id && e.labels[i] != kIgnoreIndex)
        throw DataError(at + ": label " + std::to_string(e.labels[i]) + " is neither its id nor -100");
      for (uint32_t b = 0; b < h.token_bytes; ++b) tokens.push_back(static_cast<uint8_t>(static_cast<uint64_t>(id) >> (8 * b)));
      if (n % 8 == 0) mask.push_back(0);
      if (e.labels[i] != kIgnoreIndex) {
        mask.back() |= static_cast<uint8_t>(1u << (n % 8));
        ++h.num_labelled;
      }
      h.max_token_id = std::max(h.max_token_id, id);
      ++n;
    }
    offsets.push_back(static_cast<uint64_t>(n));
    const auto len = static_cast<int64_t>(e.input_ids.size());
    const int64_t tb = std::clamp<int64_t>(e.trunc_begin, 0, len), te = std::clamp<int64_t>(e.trunc_end, tb, len);
    docinfo.push_back(static_cast<uint32_t>(tb));
    docinfo.push_back(static_cast<uint32_t>(te));
  }
  h.num_tokens = n;
  h.meta_bytes = o.meta_json.size();
  layout_token_file(h);
  Sha256 sha;
  sha.update(tokens.data(), tokens.size());
  sha.update(mask.data(), mask.size());
  sha.update(offsets.data(), offsets.size() * 8);
  sha.update(docinfo.data(), docinfo.size() * 4);
  h.content_sha256 = sha.digest();
  h.tokenizer_sha256 = o.tokenizer_sha256;
  TempFile t(path);
  if (::ftruncate(t.fd, static_cast<off_t>(h.file_bytes)) != 0) throw DataError(where + ": cannot size: " + errno_text());
  const auto hb = encode_header(h);
  pwrite_all(t.fd, hb.data(), hb.size(), 0, where);
  pwrite_all(t.fd, tokens.data(), tokens.size(), h.tokens_offset, where);
  pwrite_all(t.fd, mask.data(), mask.size(), h.mask_offset, where);
  pwrite_all(t.fd, offsets.data(), offsets.size() * 8, h.offsets_offset, where);
  pwrite_all(t.fd, docinfo.data(), docinfo.size() * 4, h.docinfo_offset, where);
  pwrite_all(t.fd, o.meta_json.data(), o.meta_json.size(), h.meta_offset, where);
  t.commit();
}

void write_synthetic_token_file(const std::filesystem::path& path, int64_t num_tokens, int64_t doc_len, int64_t vocab_size,
                                bool labelled) {
  const std::string where = path.string();
  if (num_tokens <= 0 || doc_len <= 0 || vocab_size <= 0) throw DataError(where + ": bad synthetic file parameters");
  TokenFileHeader h;
  h.token_bytes = vocab_size <= 65536 ? 2 : 4;
  h.vocab_size = vocab_size;
  h.num_tokens = num_tokens;
  h.num_docs = (num_tokens + doc_len - 1) / doc_len;
  h.eos_id = 0;
  h.max_token_id = 0;
  h.num_labelled = labelled ? num_tokens : 0;
  const std::string meta = R"({"format":"mmoc-tokens","synthetic":true,"tokenizer":{"name":"synthetic"}})";
  h.meta_bytes = meta.size();
  layout_token_file(h);
  TempFile t(path);
  if (::ftruncate(t.fd, static_cast<off_t>(h.file_bytes)) != 0) throw DataError(where + ": cannot size: " + errno_text());
  const auto hb = encode_header(h);
  pwrite_all(t.fd, hb.data(), hb.size(), 0, where);
  constexpr int64_t kChunk = 1 << 20;
  std::vector<uint64_t> off;
  for (int64_t d0 = 0; d0 <= h.num_docs; d0 += kChunk) {
    off.clear();
    for (int64_t d = d0; d <= std::min(h.num_docs, d0 + kChunk - 1); ++d) off.push_back(static_cast<uint64_t>(std::min(d * doc_len, num_tokens)));
    pwrite_all(t.fd, off.data(), off.size() * 8, h.offsets_offset + static_cast<uint64_t>(d0) * 8, where);
  }
  if (labelled) {
    std::vector<uint8_t> ones(size_t{1} << 24, 0xff);
    const uint64_t full = static_cast<uint64_t>(num_tokens) / 8;
    for (uint64_t b = 0; b < full; b += ones.size())
      pwrite_all(t.fd, ones.data(), std::min<uint64_t>(ones.size(), full - b), h.mask_offset + b, where);
    if (num_tokens % 8) {
      const auto last = static_cast<uint8_t>((1u << (num_tokens % 8)) - 1);
      pwrite_all(t.fd, &last, 1, h.mask_offset + full, where);
    }
  }
  pwrite_all(t.fd, meta.data(), meta.size(), h.meta_offset, where);
  t.commit();
}

// ---- SHA-256 -----------------------------------------------------------------------------------------------
namespace {
constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
    0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
    0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
    0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
}  // namespace

Sha256::Sha256() : h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19} {}

void Sha256::block(const uint8_t* p) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = (uint32_t{p[4 * i]} << 24) | (uint32_t{p[4 * i + 1]} << 16) | (uint32_t{p[4 * i + 2]} << 8) | p[4 * i + 3];
  for (int i = 16; i < 64; ++i) {
    const uint32_t s0 = std::rotr(w[i - 15], 7) ^ std::rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = std::rotr(w[i - 2], 17) ^ std::rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], hh = h_[7];
  for (int i = 0; i < 64; ++i) {
    const uint32_t t1 = hh + (std::rotr(e, 6) ^ std::rotr(e, 11) ^ std::rotr(e, 25)) + ((e & f) ^ (~e & g)) + kK[i] + w[i];
    const uint32_t t2 = (std::rotr(a, 2) ^ std::rotr(a, 13) ^ std::rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    hh = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h_[0] += a;
  h_[1] += b;
  h_[2] += c;
  h_[3] += d;
  h_[4] += e;
  h_[5] += f;
  h_[6] += g;
  h_[7] += hh;
}

void Sha256::update(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (used_) {
    const size_t k = std::min(n, 64 - used_);
    std::memcpy(buf_ + used_, p, k);
    used_ += k;
    p += k;
    n -= k;
    if (used_ < 64) return;
    block(buf_);
    used_ = 0;
  }
  for (; n >= 64; p += 64, n -= 64) block(p);
  std::memcpy(buf_, p, n);
  used_ = n;
}

std::array<uint8_t, 32> Sha256::digest() {
  const uint64_t bits = total_ * 8;
  const uint8_t one = 0x80, zero = 0;
  update(&one, 1);
  while (used_ != 56) update(&zero, 1);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
  update(len, 8);
  std::array<uint8_t, 32> out{};
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<uint8_t>(h_[i] >> (24 - 8 * j));
  return out;
}

std::string hex(const std::array<uint8_t, 32>& d) {
  static const char* k = "0123456789abcdef";
  std::string s;
  for (uint8_t b : d) {
    s += k[b >> 4];
    s += k[b & 15];
  }
  return s;
}

}  // namespace mmoc::engine::data
