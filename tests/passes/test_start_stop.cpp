// Starting after a pass (mmoc-compile --start-after): the state a later pass needs is rebuilt from the plan text
// alone. For every pass of many jobs: the context rebuilt from the printed plan (recover_context) equals the one
// the passes left, and running the rest from it gives the plan the straight run gives. Also offload-insertion's
// inverse (strip_offload) and the configuration read back from a lowered plan (offload_config_of), and the overlap
// pass keeping offload-insertion's recompute choice.
#include "passes_common.hpp"

using namespace mmoc;
using namespace mmoc::test;

namespace {
std::vector<JobConfig> jobs() {
  std::vector<JobConfig> out;
  for (const char* sched : {"grouped", "gpipe", "1f1b", "interleaved-1f1b"})
    for (const char* off : {"all", "auto", "none"}) {
      const int v = std::string(sched) == "1f1b" || std::string(sched) == "gpipe" ? 1 : 2;
      JobConfig j = tiny_job(2, v, 4, sched);
      j.offload = off;
      out.push_back(j);
    }
  JobConfig clip = tiny_job(2, 2, 4, "grouped");
  clip.offload = "all";
  clip.train.max_grad_norm = 1.0;
  out.push_back(clip);
  JobConfig rc_off = tiny_job(2, 3, 4, "grouped");
  rc_off.offload = "all";
  rc_off.recompute = "off";
  out.push_back(rc_off);
  JobConfig l20 = tiny_job(4, 2, 4, "interleaved-1f1b", "l20x4");
  out.push_back(l20);
  return out;
}

// Runs the passes after index `from` to the end on f's context.
void run_rest(Fixture& f, int from) {
  auto all = default_pipeline();
  std::vector<Pass> rest(all.begin() + from + 1, all.end());
  run_passes(*f.c, rest, {});
}
}  // namespace

TEST_CASE("start-after: the context rebuilt from the plan text equals the passes' own, for every pass") {
  const auto names = pass_names();
  int compared = 0;
  for (const JobConfig& j : jobs()) {
    const int v = std::stoi(j.v);
    for (int k = 0; k < (int)names.size(); ++k) {
      CAPTURE(j.schedule); CAPTURE(j.offload); CAPTURE(j.gpus); CAPTURE(v); CAPTURE(names[k]);
      auto a = fixture(j, v, j.schedule);
      a->run_until(names[k]);
      // the plan as text, read back into a fresh context (job_of_plan: the header wins, as mmoc-compile does)
      const ir::Plan text_plan = ir::parse_text(ir::print_text(a->plan()));
      REQUIRE(text_plan == a->plan());
      auto b = fixture(job_of_plan(j, text_plan), v, j.schedule);
      b->plan() = text_plan;
      recover_context(*b->c, names[k]);
      CHECK(b->c->memory_complete == a->c->memory_complete);
      CHECK(b->c->linearized == a->c->linearized);
      CHECK(b->c->offload.has_value() == a->c->offload.has_value());
      if (a->c->offload && b->c->offload) {
        CHECK(b->c->offload->resident == a->c->offload->resident);
        CHECK(b->c->offload->recompute == a->c->offload->recompute);
        CHECK(b->c->offload->keep == a->c->offload->keep);
        CHECK(b->c->offload->window == a->c->offload->window);
      }
      // the plan as comm-lowering left it, which overlap re-lowers (after linearize no pass reads it, and the
      // programs' order is linearize's)
      if (a->c->memory_complete && names[k] != "linearize") CHECK(b->c->pre_offload == a->c->pre_offload);
      // and the rest of the pipeline gives the same plan
      run_rest(*a, k);
      run_rest(*b, k);
      CHECK(b->plan() == a->plan());
      ++compared;
    }
  }
  CHECK(compared == (int)jobs().size() * (int)names.size());
}

TEST_CASE("strip_offload undoes lower_offload; offload_config_of reads back a configuration that lowers the same") {
  for (const JobConfig& base_job : jobs()) {
    JobConfig j = base_job;
    const int v = std::stoi(j.v);
    CAPTURE(j.schedule); CAPTURE(j.offload); CAPTURE(v);
    auto f = fixture(j, v, j.schedule);
    f->run_until("offload-insertion");
    const ir::Plan& base = f->c->pre_offload;
    const int P = base.num_stages();
    for (int mask = 0; mask < (1 << P); mask += std::max(1, (1 << P) / 5))
      for (int rc : {0, 1, 2})  // off, whole, per stage and partial (stage s keeps s mod (its layers + 1) layers)
        for (int w : {1, 2, 3, 4}) {
          OffloadConfig cfg;
          cfg.resident.assign(P, 0);
          for (int s = 0; s < P; ++s) cfg.resident[s] = (mask >> s) & 1;
          cfg.recompute = rc > 0;
          if (rc == 2)
            for (int s = 0; s < P; ++s) cfg.keep.push_back(s % (base.stages[s].layers() + 1));
          cfg.window = w;
          CAPTURE(mask); CAPTURE(rc); CAPTURE(w);
          const ir::Plan lowered = lower_offload(*f->c, base, cfg);
          CHECK(strip_offload(*f->c, lowered) == base);
          const OffloadConfig back = offload_config_of(*f->c, lowered);
          CHECK(back.resident == cfg.resident);
          CHECK(back.window <= w);  // the smallest window that makes this plan
          CHECK(lower_offload(*f->c, base, back) == lowered);
        }
  }
}

// Regression: overlap re-lowered with recompute = stages[0].recompute, which in grouped schedules is forced on for an
// offloaded first stage even when offload-insertion chose recompute off; its wider-window candidates then recomputed
// every stage. It now keeps offload-insertion's choice.
TEST_CASE("overlap keeps offload-insertion's recompute choice (grouped, offloaded first stage)") {
  JobConfig j = load_job(std::string(MMOC_CONFIGS_DIR) + "/jobs/seed-llama2-7b-l20x4.json");
  j.offload = "all";
  auto f = fixture(j, 3, "grouped");
  f->run_until("offload-insertion");
  REQUIRE(f->c->offload);
  const OffloadConfig chosen = *f->c->offload;
  const double before_ms = simulate(f->plan(), f->hw, f->m).step_ms;
  // the case that exposed it: offload-insertion chose recompute off, and stage 0 is forced on
  REQUIRE_FALSE(chosen.recompute);
  REQUIRE(f->plan().stages[0].recompute);
  std::vector<Pass> overlap{default_pipeline()[pass_index("overlap", "test")]};
  run_passes(*f->c, overlap, {});
  CHECK(f->c->offload->resident == chosen.resident);
  CHECK(f->c->offload->recompute == chosen.recompute);
  const ir::Plan& p = f->plan();
  const int P = p.num_stages();
  for (int s = 0; s < P; ++s) {
    const bool forced = (!chosen.resident[s] && s + p.gpus < P) || s == P - 1;
    if (!forced) CHECK(p.stages[s].recompute == chosen.recompute);
  }
  // the plan overlap keeps is offload-insertion's re-lowered with its own choice and a window, never slower
  OffloadConfig cfg = chosen;
  cfg.window = f->c->offload->window;
  ir::Plan relowered = lower_offload(*f->c, f->c->pre_offload, cfg);
  CHECK(relowered.stages == p.stages);
  CHECK(simulate(p, f->hw, f->m).step_ms <= before_ms);
}
