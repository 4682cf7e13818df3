// mmoc-compile <job.json> [overrides] -o plan.json [--emit text|json] [--trace trace.json]
//              [--stop-after=<pass>] [--start-after=<pass> --input plan.txt] [--passes-doc]
// Compiles a training job into a Plan (docs/plan-format.md) and prints a summary. --stop-after writes the plan as
// that pass left it; --start-after continues a plan written so (docs/passes.md). Bad input: exit 2 with one
// message, and no output file is written.
#include <cmath>
#include <CLI/CLI.hpp>
#include <fstream>
#include <iostream>
#include <sstream>

#include "common/fs.hpp"
#include "common/size.hpp"
#include "compiler/pipeline.hpp"
#include "passes/pass.hpp"

using namespace mmoc;

int main(int argc, char** argv) {
  CLI::App app{"mmoc-compile: compile a full fine-tuning job into a per-GPU Plan"};
  std::string job_path, out_path, emit = "json", trace_path, configs, stop_after, start_after, input_path;
  std::vector<std::string> print_after;
  bool print_after_all = false, quiet = false, verbose = false, passes_doc = false;
  std::optional<std::string> model, hardware, v, schedule, recompute, selective, offload, cross_map, precision, on_nonfinite;
  std::optional<int> gpus, mbs, microbatches, seq_len, dp, tp;
  std::optional<std::string> budget, layout, host_budget;
  std::optional<double> bucket_mib;
  std::optional<std::string> nvme, nvme_place, update_order, gpu_optim_stream;
  app.add_option("job", job_path, "job config JSON (configs/jobs/*.json); optional when --model is given");
  app.add_option("-o,--output", out_path, "write the plan here");
  app.add_option("--emit", emit, "plan file form: json or text")->check(CLI::IsMember({"json", "text"}));
  app.add_option("--trace", trace_path, "write the simulated timeline as a Chrome/Perfetto trace JSON");
  app.add_option("--model", model, "model name (configs/models) or path to a model JSON");
  app.add_option("--hardware", hardware, "hardware name (configs/hardware) or path");
  app.add_option("--gpus", gpus, "number of GPUs: the pipeline ranks (with --layout auto: all GPUs to lay out)");
  app.add_option("--v", v, "virtual stages per GPU, or auto");
  app.add_option("--dp", dp, "data-parallel replicas of the pipeline (ranks = gpus x dp x tp; divides --microbatches)");
  app.add_option("--tp", tp, "tensor-parallel shards of every pipeline rank (divides heads, kv heads and ffn)");
  app.add_option("--bucket-mib", bucket_mib, "data-parallel gradient buckets of about this many MiB (job bucket_mib, default 25; 0 = one per stage)");
  app.add_option("--layout", layout, "auto: choose pp x dp x tp over --gpus GPUs by simulated step time under the budget")
      ->check(CLI::IsMember({"auto"}));
  app.add_option("--budget", budget, "memory budget per GPU: GiB as a number (48), or with a unit (48GiB, 48 GiB, 48GB = 10^9 bytes)");
  app.add_option("--host-budget", host_budget, "host memory cap of the node (job host_budget_gib), in the forms of --budget; optimizer state beyond it goes to --nvme");
  app.add_option("--nvme", nvme, "NVMe tier directories, comma-separated (job nvme): each is one I/O path");
  app.add_option("--nvme-place", nvme_place, "auto (only what the host memory needs on the tier) or all (every offloaded stage's optimizer state)")
      ->check(CLI::IsMember({"auto", "all"}));
  app.add_option("--update-order", update_order,
                 "NVMe tier stage update order (job update_order): auto (alternate when the simulated step is faster), fixed, or "
                 "alternate (reverse it every other step, keeping the last-updated state in host memory)")
      ->check(CLI::IsMember({"auto", "fixed", "alternate"}));
  app.add_option("--gpu-optim-stream", gpu_optim_stream,
                 "where GPU-resident stages' AdamW runs (job gpu_optim_stream): comp (in line on the compute stream; default) or "
                 "opt (its own CUDA stream, beside the backward)")
      ->check(CLI::IsMember({"opt", "comp"}));
  app.add_option("--micro-batch-size", mbs, "sequences per micro-batch");
  app.add_option("--microbatches", microbatches, "micro-batches per step");
  app.add_option("--seq-len", seq_len, "sequence length");
  app.add_option("--schedule", schedule, "gpipe, 1f1b, interleaved-1f1b, grouped or auto");
  app.add_option("--recompute", recompute, "auto, on or off");
  app.add_option("--selective", selective,
                 "selective recompute inside the layers that keep their stash (the SwiGLU recomputed in backward): auto "
                 "(per stage, where the budget limits the stash), on or off")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  app.add_option("--offload", offload, "auto, all or none");
  app.add_option("--cross-map", cross_map, "auto or off");
  app.add_option("--precision", precision, "bf16 or fp32");
  app.add_option("--on-nonfinite", on_nonfinite, "stop or skip: skip puts the gradient norm before the optimizer steps (train.on_nonfinite)")
      ->check(CLI::IsMember({"stop", "skip"}));
  app.add_option("--print-after", print_after, "print the plan (text) after this pass (repeatable): " + [] {
    std::string s; for (auto& n : pass_names()) s += (s.empty() ? "" : ", ") + n; return s; }());
  app.add_flag("--print-after-all", print_after_all, "print the plan after every pass");
  app.add_option("--stop-after", stop_after, "stop after this pass and write the plan as it left it (not timed)");
  app.add_option("--start-after", start_after,
                 "continue the plan given with --input, written after this pass (by --stop-after), with the rest of "
                 "the pipeline");
  app.add_option("--input", input_path, "plan (text or JSON form) to continue, with --start-after");
  app.add_flag("--passes-doc", passes_doc, "print docs/passes.md (the passes' contracts) and exit");
  app.add_option("--configs", configs, "configs folder (default: the installed or source configs/)");
  app.add_flag("-q,--quiet", quiet, "no summary");
  app.add_flag("--verbose", verbose, "also print the passes' decisions");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "mmoc-compile: " << e.what() << "\n";
    return 2;
  }
  if (passes_doc) {
    std::cout << passes_markdown();
    return 0;
  }
  try {
    if (configs.empty()) configs = default_configs_dir();
    for (const auto& pa : print_after)
      if (pa != "all") pass_index(pa, "--print-after");
    if (!stop_after.empty()) pass_index(stop_after, "--stop-after");
    if (!start_after.empty()) pass_index(start_after, "--start-after");
    if (start_after.empty() != input_path.empty()) throw InputError("--start-after and --input go together");
    std::optional<ir::Plan> input;
    if (!input_path.empty()) input = ir::load_plan_file(input_path);
    JobConfig job;
    if (!job_path.empty()) job = load_job(job_path);
    else if (input && !model) {  // the model and hardware the plan names
      job.model = input->model.name;
      job.hardware = input->hardware;
    } else if (!model) throw InputError("give a job config (configs/jobs/*.json) or at least --model");
    if (model) job.model = *model;
    if (hardware) job.hardware = *hardware;
    if (gpus) job.gpus = *gpus;
    if (dp) job.dp = *dp;
    if (tp) job.tp = *tp;
    if (bucket_mib) {
      if (!(std::isfinite(*bucket_mib) && *bucket_mib >= 0))
        throw InputError("--bucket-mib must be a size in MiB >= 0 (0 = one bucket per stage), got " + ir::format_double(*bucket_mib));
      job.bucket_mib = *bucket_mib;
    }
    if (layout) job.layout = *layout;
    if (v) job.v = *v;
    if (budget) job.budget_gib = parse_gib(*budget, "--budget");
    if (host_budget) job.host_budget_gib = parse_gib(*host_budget, "--host-budget");
    if (nvme_place) job.nvme_place = *nvme_place;
    if (update_order) job.update_order = *update_order;
    if (gpu_optim_stream) job.gpu_optim_stream = *gpu_optim_stream;
    if (nvme) {
      job.nvme.clear();
      size_t b = 0;
      for (;;) {
        auto c = nvme->find(',', b);
        job.nvme.push_back(nvme->substr(b, c == std::string::npos ? std::string::npos : c - b));
        if (job.nvme.back().empty()) throw InputError("--nvme: an empty path in '" + *nvme + "'");
        if (c == std::string::npos) break;
        b = c + 1;
      }
    }
    if (mbs) job.micro_batch_size = *mbs;
    if (microbatches) job.microbatches = *microbatches;
    if (seq_len) job.seq_len = *seq_len;
    if (schedule) job.schedule = *schedule;
    if (recompute) job.recompute = *recompute;
    if (selective) job.selective = *selective;
    if (offload) job.offload = *offload;
    if (cross_map) job.cross_map = *cross_map;
    if (precision) job.train.precision = *precision;
    if (on_nonfinite) job.train.on_nonfinite = *on_nonfinite;
    ModelSpec m = load_model(job.model, configs);
    HardwareSpec hw = load_hardware(job.hardware, configs);
    CompileOptions o;
    o.print_after = print_after;
    o.stop_after = stop_after;
    if (print_after_all) o.print_after.push_back("all");
    o.print_stream = &std::cout;
    if (!quiet && (job.v == "auto" || job.schedule == "auto" || job.layout == "auto")) o.progress = &std::cerr;
    CompileResult r;
    if (input) {
      const JobConfig from = job_of_plan(job, *input);  // the plan's header wins over the job's
      r = compile_from(from, m, hw, std::move(*input), start_after, o);
    } else {
      r = compile_job(job, m, hw, o);
    }
    // write outputs only once everything succeeded, each atomically
    if (!trace_path.empty() && r.stopped)
      throw InputError("--trace: the plan is not timed when the pipeline stops early (--stop-after)");
    if (!out_path.empty()) write_file_atomic(out_path, emit == "text" ? ir::print_text(r.plan) : ir::to_json_string(r.plan));
    if (!trace_path.empty()) write_file_atomic(trace_path, trace_json(r.plan, r.sim));
    if (!quiet) {
      if (r.stopped) std::cout << "stopped after " << stop_after << " (the plan as that pass left it)\n";
      else std::cout << summary(r, m, hw);
      if (verbose) for (const auto& n : r.notes) std::cout << "  note: " << n << "\n";
      if (!out_path.empty()) std::cout << "wrote " << out_path << " (" << emit << ")\n";
      if (!trace_path.empty()) std::cout << "wrote " << trace_path << "\n";
    }
    return 0;
  } catch (const InputError& e) {
    std::cerr << "mmoc-compile: error: " << e.what() << "\n";
    return 2;
  } catch (const ir::ParseError& e) {
    std::cerr << "mmoc-compile: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "mmoc-compile: internal error: " << e.what() << "\n";
    return 3;
  }
}
