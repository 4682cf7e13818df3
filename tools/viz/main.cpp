// mmoc-viz: plan / trace visualiser. See docs/viz.md.
//   mmoc-viz [--plan plan.json] [--predicted trace.json] [--measured trace.json] -o out.html [--perfetto out.json]
// Exit codes: 0 ok, 2 bad input or usage (nothing written), 1 output could not be written.
#include <cstdio>
#include <iostream>
#include <optional>

#include <CLI/CLI.hpp>

#include "common/fs.hpp"
#include "viz.hpp"

int main(int argc, char** argv) {
  using namespace mmoc::viz;
  CLI::App app{"mmoc-viz: render an mmoc plan and predicted/measured Chrome traces as one self-contained HTML page"};
  std::string plan_path, pred_path, meas_path, out_path, perfetto_path;
  app.add_option("--plan", plan_path, "plan, JSON or text form (stage table, budget, predicted summary)");
  app.add_option("--predicted", pred_path, "predicted trace (mmoc-compile --trace)");
  app.add_option("--measured", meas_path, "measured trace (mmoc-run --trace)");
  app.add_option("-o,--output", out_path, "output HTML file")->required();
  app.add_option("--perfetto", perfetto_path, "also write the inputs merged into one Chrome/Perfetto trace JSON");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  std::vector<Trace> traces;
  std::optional<PlanInfo> plan;
  try {
    if (!plan_path.empty()) plan = load_plan(plan_path);
    if (!pred_path.empty()) traces.push_back(load_trace(pred_path, "predicted"));
    if (!meas_path.empty()) traces.push_back(load_trace(meas_path, "measured"));
    if (traces.empty() && !(plan && plan->has_predicted))
      throw InputError(plan ? "plan '" + plan_path + "': has no \"predicted\" section and no trace was given "
                              "(pass --predicted and/or --measured, or a simulated plan)"
                            : "nothing to show: give --predicted and/or --measured traces, or a --plan with a "
                              "\"predicted\" section");
    for (auto& t : traces) {
      if (!t.source.empty() && t.source != t.role)
        std::cerr << "mmoc-viz: warning: " << t.role << " trace '" << t.file << "' says metadata.source=\""
                  << t.source << "\"\n";
      compute_stats(t, plan ? &*plan : nullptr);
      if (plan)
        for (const auto& w : compare_with_plan(t, *plan)) std::cerr << "mmoc-viz: warning: " << w << "\n";
    }
  } catch (const InputError& e) {
    std::cerr << "mmoc-viz: error: " << e.what() << "\n";
    return 2;
  }

  try {
    std::string html = render_html(traces, plan ? &*plan : nullptr);
    std::string perfetto = perfetto_path.empty() ? std::string() : perfetto_json(traces);
    if (!perfetto_path.empty()) mmoc::write_file_atomic(perfetto_path, perfetto);
    try {
      mmoc::write_file_atomic(out_path, html);
    } catch (...) {
      if (!perfetto_path.empty()) std::remove(perfetto_path.c_str());
      throw;
    }
  } catch (const std::exception& e) {
    std::cerr << "mmoc-viz: error: " << e.what() << "\n";
    return 1;
  }
  size_t n = 0;
  for (auto& t : traces) n += t.boxes.size();
  std::cerr << "mmoc-viz: wrote " << out_path << " (" << n << " boxes";
  if (!perfetto_path.empty()) std::cerr << "; perfetto trace " << perfetto_path;
  std::cerr << ")\n";
  return 0;
}
