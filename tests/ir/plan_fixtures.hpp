// Hand-built plans shared by the IR tests.
#pragma once
#include <string>

#include "ir/plan.hpp"

namespace mmoc::ir::test {

inline Instr mk(Op op, Stream st = Stream::Comp) {
  Instr i;
  i.op = op;
  i.stream = st;
  return i;
}
inline Instr with_after(Instr i, std::vector<int> a) {
  i.after = std::move(a);
  return i;
}
inline Instr load_batch(int m) {
  auto i = mk(Op::LoadBatch);
  i.mb = m;
  return i;
}
inline Instr prefetch(const std::string& b) {
  auto i = mk(Op::Prefetch, Stream::H2D);
  i.buf = BufRef::parse(b);
  return i;
}
inline Instr forward(int s, int m) {
  auto i = mk(Op::Forward);
  i.stage = s;
  i.mb = m;
  return i;
}
inline Instr backward(int s, int m) {
  auto i = mk(Op::Backward);
  i.stage = s;
  i.mb = m;
  return i;
}
inline Instr send(const std::string& b, int peer, const std::string& tag) {
  auto i = mk(Op::Send, Stream::P2P);
  i.buf = BufRef::parse(b);
  i.peer = peer;
  i.tag = tag;
  return i;
}
inline Instr recv(const std::string& b, int peer, const std::string& tag) {
  auto i = mk(Op::Recv, Stream::P2P);
  i.buf = BufRef::parse(b);
  i.peer = peer;
  i.tag = tag;
  return i;
}
inline Instr evict(const std::string& b, bool to_host, Stream st) {
  auto i = mk(Op::Evict, st);
  i.buf = BufRef::parse(b);
  i.to_host = to_host;
  return i;
}
inline Instr free_(const std::string& b) {
  auto i = mk(Op::Free);
  i.buf = BufRef::parse(b);
  return i;
}
inline Instr allreduce(const std::string& b, const std::string& group) {
  auto i = mk(Op::AllReduce);
  i.buf = BufRef::parse(b);
  i.group = group;
  return i;
}
inline Instr optim(int s, Stream st) {
  auto i = mk(Op::Optim, st);
  i.stage = s;
  return i;
}

// A correct 2-GPU, 2-stage, 2-micro-batch plan using every op and every field.
inline Plan hand_plan() {
  Plan p;
  p.hardware = "l20x2";
  p.schedule = "1f1b";
  p.gpus = 2;
  p.v = 1;
  p.dp = 1;
  p.microbatches = 2;
  p.micro_batch_size = 4;
  p.seq_len = 64;
  p.budget_bytes = 25769803776;
  p.gpu_order = {1, 0};
  p.model = {"tiny llama", 2, 64, 172, 4, 2, 1000, 500000.0, 1e-6, false};  // untied: a tied model over 2 stages needs tie/tiegrad and addgrad
  p.train.precision = "bf16";
  p.train.lr = 3e-4;
  p.train.beta1 = 0.9;
  p.train.beta2 = 0.95;
  p.train.eps = 1e-8;
  p.train.weight_decay = 0.1;
  p.train.max_grad_norm = 1.0;
  p.train.lr_schedule = "cosine";
  p.train.warmup_steps = 10;
  p.train.total_steps = 1000;
  p.train.seed = 42;
  p.stages = {
      {0, 0, 0, 2, true, Residency::Offload, OptimPlace::Cpu, 123456, 1024, 2048, 1.5, 3.25},
      {1, 1, 2, 4, false, Residency::Resident, OptimPlace::Gpu, 654321, 4096, 8192, 0.1, 0.1 + 0.2},
  };
  p.buffers = {
      {BufKind::W, 0, 246912, Tier::Host},       {BufKind::WGrad, 0, 493824, Tier::Host},
      {BufKind::Opt, 0, 1481472, Tier::Host},    {BufKind::Act, 0, 16384, Tier::Gpu},
      {BufKind::Grad, 0, 16384, Tier::Gpu},      {BufKind::Stash, 0, 0, Tier::Gpu},
      {BufKind::Stash, 1, 65536, Tier::Gpu},     {BufKind::W, 1, 1308642, Tier::Gpu},
      {BufKind::WGrad, 1, 2617284, Tier::Gpu},   {BufKind::Opt, 1, 7852, Tier::Nvme},
      {BufKind::Batch, -1, 2048, Tier::Gpu},
  };
  p.predicted = Predicted{0.125, 4096, 0.25, {1000, 2000}, {3000, 4000}};
  Program g0{0, {}}, g1{1, {}};
  auto& a = g0.instrs;
  a.push_back(prefetch("w(S0)"));                                      // 0
  a.push_back(load_batch(0));                                          // 1
  a.push_back(with_after(forward(0, 0), {0}));                         // 2
  a.push_back(with_after(send("act(S0,m0)", 1, "F.S0.m0"), {2}));      // 3
  a.push_back(with_after(free_("act(S0,m0)"), {3}));                   // 4
  a.push_back(load_batch(1));                                          // 5
  a.push_back(forward(0, 1));                                          // 6
  a.push_back(with_after(send("act(S0,m1)", 1, "F.S0.m1"), {6}));      // 7
  a.push_back(with_after(free_("act(S0,m1)"), {7}));                   // 8
  a.push_back(recv("grad(S0,m0)", 1, "B.S0.m0"));                      // 9
  a.push_back(with_after(backward(0, 0), {9}));                        // 10
  a.push_back(recv("grad(S0,m1)", 1, "B.S0.m1"));                      // 11
  a.push_back(with_after(backward(0, 1), {11}));                       // 12
  a.push_back(free_("batch(m0)"));                                     // 13
  a.push_back(free_("batch(m1)"));                                     // 14
  a.push_back(evict("w(S0)", false, Stream::Comp));                    // 15
  a.push_back(allreduce("wgrad(S0)", "dp0"));                          // 16
  a.push_back(mk(Op::GradNorm));                                       // 17
  a.push_back(with_after(evict("wgrad(S0)", true, Stream::D2H), {17})); // 18
  a.push_back(with_after(optim(0, Stream::Cpu), {18}));                // 19
  auto& b = g1.instrs;
  b.push_back(load_batch(0));                                          // 0
  b.push_back(recv("act(S0,m0)", 0, "F.S0.m0"));                       // 1
  b.push_back(with_after(forward(1, 0), {1}));                         // 2
  b.push_back(backward(1, 0));                                         // 3
  b.push_back(with_after(send("grad(S0,m0)", 0, "B.S0.m0"), {3}));     // 4
  b.push_back(load_batch(1));                                          // 5
  b.push_back(recv("act(S0,m1)", 0, "F.S0.m1"));                       // 6
  b.push_back(with_after(forward(1, 1), {6}));                         // 7
  b.push_back(backward(1, 1));                                         // 8
  b.push_back(with_after(send("grad(S0,m1)", 0, "B.S0.m1"), {8}));     // 9
  b.push_back(with_after(free_("grad(S0,m0)"), {4}));                  // 10
  b.push_back(with_after(free_("grad(S0,m1)"), {9}));                  // 11
  b.push_back(free_("batch(m0)"));                                     // 12
  b.push_back(free_("batch(m1)"));                                     // 13
  b.push_back(mk(Op::GradNorm));                                       // 14
  b.push_back(optim(1, Stream::Comp));                                 // 15
  p.programs = {g0, g1};
  return p;
}

// The text form of hand_plan(), written out by hand from docs/plan-format.md.
inline const char* hand_plan_text() {
  return R"(plan hardware=l20x2 schedule=1f1b gpus=2 v=1 dp=1 microbatches=2 mbs=4 seq=64 budget=25769803776 order=1,0
model name="tiny llama" layers=2 hidden=64 ffn=172 heads=4 kv_heads=2 vocab=1000 rope_theta=500000 norm_eps=1e-06 tied=0
train precision=bf16 lr=0.0003 beta1=0.9 beta2=0.95 eps=1e-08 wd=0.1 clip=1 lr_schedule=cosine warmup=10 total=1000 seed=42
stage S0 gpu=0 layers=0-2 recompute=1 weights=offload optim=cpu params=123456 fwd_ws=1024 bwd_ws=2048 fwd_ms=1.5 bwd_ms=3.25
stage S1 gpu=1 layers=2-4 recompute=0 weights=resident optim=gpu params=654321 fwd_ws=4096 bwd_ws=8192 fwd_ms=0.1 bwd_ms=0.30000000000000004
buffer w(S0) bytes=246912 home=host
buffer wgrad(S0) bytes=493824 home=host
buffer opt(S0) bytes=1481472 home=host
buffer act(S0,*) bytes=16384 home=gpu
buffer grad(S0,*) bytes=16384 home=gpu
buffer stash(S0,*) bytes=0 home=gpu
buffer stash(S1,*) bytes=65536 home=gpu
buffer w(S1) bytes=1308642 home=gpu
buffer wgrad(S1) bytes=2617284 home=gpu
buffer opt(S1) bytes=7852 home=nvme
buffer batch(*) bytes=2048 home=gpu
predicted step_s=0.125 tokens_per_s=4096 bubble=0.25 peak=1000,2000 bound=3000,4000
gpu g0 {
  %0 = prefetch w(S0) <- host @h2d
  %1 = load_batch m0 @comp
  %2 = forward S0 m0 @comp after(%0)
  %3 = send act(S0,m0) -> g1 @p2p after(%2) tag=F.S0.m0
  %4 = free act(S0,m0) @comp after(%3)
  %5 = load_batch m1 @comp
  %6 = forward S0 m1 @comp
  %7 = send act(S0,m1) -> g1 @p2p after(%6) tag=F.S0.m1
  %8 = free act(S0,m1) @comp after(%7)
  %9 = recv grad(S0,m0) <- g1 @p2p tag=B.S0.m0
  %10 = backward S0 m0 @comp after(%9)
  %11 = recv grad(S0,m1) <- g1 @p2p tag=B.S0.m1
  %12 = backward S0 m1 @comp after(%11)
  %13 = free batch(m0) @comp
  %14 = free batch(m1) @comp
  %15 = evict w(S0) @comp
  %16 = allreduce wgrad(S0) @comp group=dp0
  %17 = gradnorm @comp
  %18 = evict wgrad(S0) -> host @d2h after(%17)
  %19 = optim S0 @cpu after(%18)
}
gpu g1 {
  %0 = load_batch m0 @comp
  %1 = recv act(S0,m0) <- g0 @p2p tag=F.S0.m0
  %2 = forward S1 m0 @comp after(%1)
  %3 = backward S1 m0 @comp
  %4 = send grad(S0,m0) -> g0 @p2p after(%3) tag=B.S0.m0
  %5 = load_batch m1 @comp
  %6 = recv act(S0,m1) <- g0 @p2p tag=F.S0.m1
  %7 = forward S1 m1 @comp after(%6)
  %8 = backward S1 m1 @comp
  %9 = send grad(S0,m1) -> g0 @p2p after(%8) tag=B.S0.m1
  %10 = free grad(S0,m0) @comp after(%4)
  %11 = free grad(S0,m1) @comp after(%9)
  %12 = free batch(m0) @comp
  %13 = free batch(m1) @comp
  %14 = gradnorm @comp
  %15 = optim S1 @comp
}
)";
}

}  // namespace mmoc::ir::test
