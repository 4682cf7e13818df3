// The op table and the buffer-kind table (ops.hpp), and what follows from them: effects, persistence, transfers.
#include "ir/ops.hpp"

#include <algorithm>
#include <stdexcept>

namespace mmoc::ir {

namespace {
constexpr uint32_t kGpuStreams =
    stream_bit(Stream::Comp) | stream_bit(Stream::H2D) | stream_bit(Stream::D2H) | stream_bit(Stream::P2P);
constexpr uint32_t kAllStreams = kGpuStreams | stream_bit(Stream::Cpu);
}  // namespace

const std::vector<BufKindInfo>& buf_kind_table() {
  static const std::vector<BufKindInfo> t = {
      {BufKind::W, "w", true, false, true, "weights of stage S in compute precision"},
      {BufKind::WGrad, "wgrad", true, false, false, "weight gradient of stage S, accumulated over the step's micro-batches"},
      {BufKind::Act, "act", true, true, false, "output activation of stage S for micro-batch m (= input of stage S+1)"},
      {BufKind::Grad, "grad", true, true, false, "gradient w.r.t. act(S,m), produced by backward S+1, consumed by backward S"},
      {BufKind::Stash, "stash", true, true, false, "what forward S m saves for backward S m"},
      {BufKind::Batch, "batch", false, true, false, "input ids and labels of micro-batch m"},
      {BufKind::Opt, "opt", true, false, true, "fp32 master weights and AdamW moments of stage S"},
      {BufKind::Tie, "tie", true, false, false,
       "tied embeddings over several stages: the embedding matrix [vocab, hidden] the head stage S uses as its lm_head, "
       "copied from stage 0's weights each step"},
      {BufKind::TieGrad, "tiegrad", true, false, false,
       "the head stage S's gradient of tie(S), accumulated over the step's micro-batches, added into wgrad(S0)"},
      {BufKind::Part, "part", true, true, false,
       "tensor parallelism: the partial sum [B,T,hidden] a forward segment of stage S on m ends with (a row-parallel "
       "output or the vocabulary-parallel embedding), summed over the tp group by the allreduce that follows it"},
      {BufKind::PartGrad, "partgrad", true, true, false,
       "tensor parallelism: the partial gradient [B,T,hidden] of a column-parallel input a backward segment of stage S "
       "on m ends with, summed over the tp group by the allreduce that follows it"},
  };
  return t;
}

const BufKindInfo& buf_kind_info(BufKind k) {
  const auto& t = buf_kind_table();
  const auto i = static_cast<size_t>(k);
  if (i >= t.size()) throw std::out_of_range("buffer kind " + std::to_string(i) + " has no table entry");
  return t[i];
}

const std::vector<OpInfo>& op_table() {
  using A = Access;
  using R = Ref;
  using W = When;
  static const std::vector<OpInfo> t = {
      {Op::LoadBatch, "load_batch", kOpMb, "{mb}",  //
       stream_bit(Stream::Comp) | stream_bit(Stream::H2D), Stream::Comp, 0, false, Sync::None, Timing::Instant,
       {{A::Alloc, R::Batch}}, Workspace::None,
       "allocate batch(m) (input ids + labels of micro-batch m) on this GPU"},
      {Op::Prefetch, "prefetch", kOpBuf, "{buf} <- {tier}",  //
       stream_bit(Stream::H2D) | stream_bit(Stream::Comp), Stream::H2D, 0, false, Sync::None, Timing::HostToDevice,
       {{A::Alloc, R::Operand}}, Workspace::None,
       "allocate B on the GPU and copy it from its home tier"},
      {Op::Forward, "forward", kOpStage | kOpMb, "{stage} {mb}",  //
       stream_bit(Stream::Comp), Stream::Comp, 0, false, Sync::None, Timing::StageForward,
       {{A::Require, R::W},
        {A::Require, R::Batch, W::FirstOrLastStage},
        {A::Require, R::ActIn, W::NotFirstStage},
        {A::Require, R::Tie, W::TiedHead},
        {A::Alloc, R::ActOut, W::NotLastStage},
        {A::Alloc, R::Stash}},
       Workspace::Forward, "run stage S on micro-batch m (the last stage computes the loss)"},
      {Op::Backward, "backward", kOpStage | kOpMb, "{stage} {mb}",  //
       stream_bit(Stream::Comp), Stream::Comp, 0, false, Sync::None, Timing::StageBackward,
       {{A::Require, R::W},
        {A::Require, R::Batch, W::FirstOrLastStage},
        {A::Require, R::GradIn, W::NotLastStage},
        {A::Require, R::Tie, W::TiedHead},
        {A::Alloc, R::GradOut, W::NotFirstStage},
        {A::AllocIfAbsent, R::WGrad},
        {A::AllocIfAbsent, R::TieGrad, W::TiedHead},
        {A::Free, R::Stash},
        {A::Free, R::ActIn, W::NotFirstStage},
        {A::Free, R::GradIn, W::NotLastStage}},
       Workspace::Backward, "backward of stage S on m; consumes stash, input and output gradient"},
      {Op::Send, "send", kOpBuf | kOpPeer | kOpTag, "{buf} -> {peer}",  //
       stream_bit(Stream::P2P), Stream::P2P, 0, false, Sync::PairSource, Timing::PeerToPeer,
       {{A::Require, R::Operand}}, Workspace::None,
       "send B to GPU K (B stays allocated until a free)"},
      {Op::Recv, "recv", kOpBuf | kOpPeer | kOpTag, "{buf} <- {peer}",  //
       stream_bit(Stream::P2P), Stream::P2P, 0, false, Sync::PairSink, Timing::PeerToPeer,
       {{A::Alloc, R::Operand}}, Workspace::None,
       "allocate B and receive it from GPU K"},
      {Op::Evict, "evict", kOpBuf | kOpToHost, "{buf} [-> host]",  //
       stream_bit(Stream::Comp) | stream_bit(Stream::D2H), Stream::Comp, 0, true, Sync::None, Timing::DeviceToHost,
       {{A::Require, R::Operand, W::NotLastBucket}, {A::Free, R::Operand, W::LastBucket}}, Workspace::None,
       "B leaves the GPU; with -> host it is first copied to its home (a bucket of wgrad(S): that slice is copied, and "
       "the buffer leaves with its last bucket)"},
      {Op::Free, "free", kOpBuf, "{buf}",  //
       kGpuStreams, Stream::Comp, kAllStreams, false, Sync::None, Timing::Instant,
       {{A::Free, R::Operand}}, Workspace::None,
       "drop a transient buffer (activation, gradient, batch), on the stream of its last user"},
      {Op::AllReduce, "allreduce", kOpBuf | kOpGroup, "{buf}",  //
       stream_bit(Stream::P2P) | stream_bit(Stream::Comp), Stream::P2P, 0, false, Sync::None, Timing::Collective,
       {{A::Require, R::Operand}}, Workspace::None,
       "sum B in place over the named group G (dp: a stage's gradient over its replicas)"},
      {Op::GradNorm, "gradnorm", 0, "",  //
       stream_bit(Stream::Cpu) | stream_bit(Stream::Comp), Stream::Cpu, 0, false, Sync::None, Timing::GradNorm,
       {}, Workspace::None,
       "global gradient norm over all stages and ranks (clipping)"},
      {Op::Optim, "optim", kOpStage, "{stage}",  //
       stream_bit(Stream::Cpu) | stream_bit(Stream::Comp) | stream_bit(Stream::Opt), Stream::Comp, stream_bit(Stream::Cpu) | stream_bit(Stream::Opt), false,
       Sync::None, Timing::Optimizer, {{A::Free, R::WGrad, W::OffCpu}}, Workspace::None,
       "AdamW step of stage S (on cpu: host master; on comp or opt: GPU state, opt being the optimizer's own CUDA stream)"},
      {Op::AddGrad, "addgrad", kOpBuf | kOpStage, "{buf} -> {stage}",  //
       stream_bit(Stream::Comp), Stream::Comp, 0, false, Sync::None, Timing::Instant,
       {{A::Require, R::Operand}, {A::Require, R::WGrad}, {A::Free, R::Operand}}, Workspace::None,
       "add gradient B into wgrad(S) and drop B (tiegrad(S<last>) into the embedding rows of wgrad(S0))"},
      // the NVMe tier (docs/nvme-tier.md): opt(S) of a stage whose buffer-table home is nvme is in host memory only
      // between its read and its write; both run on the io stream (the engine's I/O thread)
      {Op::TierRead, "read", kOpBuf, "{buf} <- nvme",  //
       stream_bit(Stream::Io), Stream::Io, 0, false, Sync::None, Timing::TierRead,
       {{A::Alloc, R::Operand, W::Host}}, Workspace::None,
       "allocate B (opt(S) of a stage whose home is nvme) in host memory and read it from the NVMe tier"},
      {Op::TierWrite, "write", kOpBuf, "{buf} -> nvme",  //
       stream_bit(Stream::Io), Stream::Io, 0, false, Sync::None, Timing::TierWrite,
       {{A::Free, R::Operand, W::Host}}, Workspace::None,
       "write B to the NVMe tier, then drop its host copy"},
      {Op::ReduceScatter, "reduce_scatter", kOpBuf | kOpGroup, "{buf}",  //
       stream_bit(Stream::P2P) | stream_bit(Stream::Comp), Stream::P2P, 0, false, Sync::None, Timing::Collective,
       {{A::Require, R::Operand}}, Workspace::None,
       "sum B over the named group G; this rank keeps its 1/|G| shard (ZeRO: a stage's gradient before its sharded CPU update)"},
      {Op::AllGather, "allgather", kOpBuf | kOpGroup, "{buf}",  //
       stream_bit(Stream::Cpu), Stream::Cpu, stream_bit(Stream::Cpu), false, Sync::None, Timing::Collective,
       {}, Workspace::None,
       "gather the ranks' shards of B's host copy on every rank of G (ZeRO: the weights after a sharded CPU update)"},
  };
  return t;
}

const OpInfo& op_info(Op op) {
  const auto& t = op_table();
  const auto i = static_cast<size_t>(op);
  if (i >= t.size()) throw std::out_of_range("op " + std::to_string(i) + " has no table entry");
  return t[i];
}

namespace {
std::vector<SyntaxToken> compile_syntax(const OpInfo& o) {
  std::vector<SyntaxToken> out;
  const std::string s = o.syntax;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] == ' ') { ++i; continue; }
    if (s[i] == '[') {
      auto close = s.find(']', i);
      if (close == std::string::npos || s.substr(i + 1, close - i - 1) != "-> host" || !(o.operands & kOpToHost))
        throw std::logic_error(std::string("op table: bad optional part in the syntax of ") + o.name);
      out.push_back({SyntaxPart::ToHost, ""});
      i = close + 1;
      continue;
    }
    auto end = s.find(' ', i);
    std::string w = s.substr(i, end == std::string::npos ? std::string::npos : end - i);
    i = end == std::string::npos ? s.size() : end;
    if (w == "{stage}") out.push_back({SyntaxPart::Stage, ""});
    else if (w == "{mb}") out.push_back({SyntaxPart::Mb, ""});
    else if (w == "{buf}") out.push_back({SyntaxPart::Buf, ""});
    else if (w == "{peer}") out.push_back({SyntaxPart::Peer, ""});
    else if (w == "{tier}") out.push_back({SyntaxPart::SourceTier, ""});
    else if (w.front() == '{') throw std::logic_error(std::string("op table: unknown part ") + w + " in the syntax of " + o.name);
    else out.push_back({SyntaxPart::Word, w});
  }
  return out;
}
}  // namespace

const std::vector<SyntaxToken>& syntax_tokens(Op op) {
  static const std::vector<std::vector<SyntaxToken>> all = [] {
    std::vector<std::vector<SyntaxToken>> v;
    for (const auto& o : op_table()) v.push_back(compile_syntax(o));
    return v;
  }();
  return all.at(static_cast<size_t>(op));
}

Stream natural_stream(const Instr& in) {
  const OpInfo& o = op_info(in.op);
  if (o.keeps & stream_bit(in.stream)) return in.stream;
  if (o.to_host_d2h && in.to_host) return Stream::D2H;
  return o.natural;
}

namespace {
int64_t tp_part(const Plan& p) {  // one partial sum: tp-lowering's part/partgrad size
  return (int64_t)p.micro_batch_size * p.seq_len * p.model.hidden * (p.train.precision == "fp32" ? 4 : 2);
}
Effects effects_where(const Plan& p, const Instr& in, bool host) {
  const OpInfo& o = op_info(in.op);
  Effects e;
  const int S = in.stage, m = in.mb, last = p.num_stages() - 1;
  for (const EffectRule& r : o.effects) {
    bool on = true;
    switch (r.when) {
      case When::Always: break;
      case When::NotFirstStage: on = S > 0; break;
      case When::NotLastStage: on = S < last; break;
      case When::FirstOrLastStage: on = S == 0 || S == last; break;
      case When::OffCpu: on = in.stream != Stream::Cpu; break;
      case When::TiedHead: on = S == last && last > 0 && p.model.tied_embeddings; break;
      case When::LastBucket: on = in.buckets <= 1 || in.bucket == in.buckets - 1; break;
      case When::NotLastBucket: on = in.buckets > 1 && in.bucket != in.buckets - 1; break;
      case When::Host: on = host; break;
    }
    if (host != (r.when == When::Host)) continue;
    if (!on) continue;
    BufRef b;
    switch (r.ref) {
      case Ref::Operand:
        if (!in.buf) continue;  // a malformed instruction: the structural verifier reports it
        b = *in.buf;
        break;
      case Ref::W: b = {BufKind::W, S, -1}; break;
      case Ref::WGrad: b = {BufKind::WGrad, S, -1}; break;
      case Ref::ActOut: b = {BufKind::Act, S, m}; break;
      case Ref::ActIn: b = {BufKind::Act, S - 1, m}; break;
      case Ref::GradIn: b = {BufKind::Grad, S, m}; break;
      case Ref::GradOut: b = {BufKind::Grad, S - 1, m}; break;
      case Ref::Stash: b = {BufKind::Stash, S, m}; break;
      case Ref::Batch: b = {BufKind::Batch, -1, m}; break;
      case Ref::Tie: b = {BufKind::Tie, S, -1}; break;
      case Ref::TieGrad: b = {BufKind::TieGrad, S, -1}; break;
    }
    // a tensor-parallel segment (seg >= 0, docs/plan-format.md): the stage's inputs are required by its first segment,
    // what it allocates and frees happens at the end of its last one
    if (in.seg >= 0 && (in.op == Op::Forward || in.op == Op::Backward)) {
      const bool first = in.seg == 0, last_seg = in.seg >= tp_collectives(p, S, in.op);
      if (r.access == Access::Require ? !first : !last_seg) continue;
    }
    e.list.push_back({r.access, b});
  }
  if (o.workspace != Workspace::None && S >= 0 && S <= last) {
    const Stage& st = p.stages[S];
    e.transient = o.workspace == Workspace::Forward ? st.fwd_ws : st.bwd_ws;
    // a tensor-parallel forward/backward, whole or in segments: its partial sums (part/partgrad: mbs x seq x hidden,
    // tp-lowering declares them) are workspace, one at a time
    if ((in.op == Op::Forward || in.op == Op::Backward) && tp_collectives(p, S, in.op) > 0) e.transient += tp_part(p);
  }
  // the all-reduce of a partial sum: the sum is its workspace (between the segments, no buffer of its own lives on:
  // a memory bound then cannot count a computation's n sums as if all could be live at once)
  if (in.op == Op::AllReduce && in.buf && (in.buf->kind == BufKind::Part || in.buf->kind == BufKind::PartGrad)) {
    e.list.clear();
    if (!host) e.transient = tp_part(p);
  }
  return e;
}
}  // namespace

Effects effects(const Plan& p, const Instr& in) { return effects_where(p, in, false); }
Effects host_effects(const Plan& p, const Instr& in) {
  Effects e = effects_where(p, in, true);
  e.transient = 0;
  return e;
}

std::vector<BufRef> persistent_buffers(const Plan& p, int gpu) {
  std::vector<BufRef> out;
  for (const auto& d : p.buffers)
    if (d.home == Tier::Gpu && buf_kind_info(d.kind).persistent_on_gpu && d.stage >= 0 && d.stage < p.num_stages() &&
        p.stages[d.stage].gpu == gpu)
      out.push_back({d.kind, d.stage, -1});
  return out;
}

bool is_persistent(const Plan& p, const BufRef& b) {
  if (!buf_kind_info(b.kind).persistent_on_gpu) return false;
  const BufferDecl* d = p.find_buffer(b.kind, b.stage);
  return d && d->home == Tier::Gpu;
}

int64_t transfer_bytes(const Plan& p, const Instr& in) {
  if (!in.buf) return 0;
  switch (op_info(in.op).timing) {
    case Timing::HostToDevice:
    case Timing::PeerToPeer:
    case Timing::Collective:
    case Timing::TierRead:
    case Timing::TierWrite: return operand_bytes(p, in);
    case Timing::DeviceToHost: return in.to_host ? operand_bytes(p, in) : 0;
    default: return 0;
  }
}

std::pair<int64_t, int64_t> zero_shard(int64_t elems, int d, int shards) {
  if (shards < 1) throw std::invalid_argument("zero_shard: " + std::to_string(shards) + " shards");
  const int64_t c = (elems + shards - 1) / shards;
  const int64_t b = std::min<int64_t>(elems, (int64_t)d * c);
  return {b, std::min<int64_t>(elems, b + c)};
}

std::pair<int64_t, int64_t> bucket_range(int64_t elems, int k, int n, int shards) {
  if (shards < 1) throw std::invalid_argument("bucket_range: " + std::to_string(shards) + " shards");
  if (n <= 1) {
    if (k != 0) throw std::invalid_argument("bucket_range: bucket " + std::to_string(k) + " of a whole buffer");
    return {0, elems};
  }
  if (k < 0 || k >= n) throw std::invalid_argument("bucket_range: bucket " + std::to_string(k) + " of " + std::to_string(n));
  // the piece j of m of [lo, hi), its cuts rounded down to kBucketAlign from the flat's start (never below lo)
  auto cut = [](int64_t lo, int64_t hi, int j, int m) -> int64_t {
    if (j <= 0) return lo;
    if (j >= m) return hi;
    const int64_t x = lo + (int64_t)((__int128)(hi - lo) * j / m);
    return std::max(lo, x / kBucketAlign * kBucketAlign);
  };
  if (shards > 1 && n % shards == 0) {  // interleaved: bucket k is piece k / shards of shard k % shards
    const int per = n / shards, d = k % shards, j = k / shards;
    const auto [lo, hi] = zero_shard(elems, d, shards);
    return {cut(lo, hi, j, per), cut(lo, hi, j + 1, per)};
  }
  return {cut(0, elems, k, n), cut(0, elems, k + 1, n)};
}

int bucket_shards(const Plan& p, int stage) {
  if (p.dp <= 1) return 1;
  const BufRef wg{BufKind::WGrad, stage, -1};
  for (const auto& prog : p.programs)
    for (const auto& in : prog.instrs)
      if (in.op == Op::ReduceScatter && in.buf && *in.buf == wg) return p.dp;
  return 1;
}

int grad_element_bytes(const Plan& p) { return p.train.precision == "fp32" ? 4 : 2; }

int64_t operand_bytes(const Plan& p, const Instr& in) {
  if (!in.buf) return 0;
  const int64_t bytes = p.buffer_bytes(*in.buf);
  if (in.buckets <= 1) return bytes;
  const int64_t es = in.buf->kind == BufKind::WGrad ? grad_element_bytes(p) : 1;
  try {
    const auto [b, e] = bucket_range(bytes / es, in.bucket, in.buckets, bucket_shards(p, in.buf->stage));
    return (e - b) * es;
  } catch (const std::invalid_argument&) {
    return 0;  // a malformed bucket: the structural verifier reports it
  }
}

}  // namespace mmoc::ir
