#include "viz.hpp"

#include "common/fs.hpp"
#include "common/json.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

namespace mmoc::viz {
namespace {

#include "viz_template.inc"

using nlohmann::json;

std::string read_input(const std::string& path, const std::string& what) {
  try {
    return mmoc::read_file(path);
  } catch (const std::runtime_error& e) {
    throw InputError(what + " '" + path + "': cannot open file (" + e.what() + ")");
  }
}

json parse_json_text(const std::string& text, const std::string& path, const std::string& what) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw InputError(what + " '" + path + "': not valid JSON (" + e.what() + ")");
  }
}
json parse_json(const std::string& path, const std::string& what) {
  return parse_json_text(read_input(path, what), path, what);
}

bool looks_like_plan(const json& j) {
  return j.is_object() && ((j.contains("format") && j["format"] == "mmoc-plan") ||
                           (j.contains("plan") && j.contains("programs")));
}
bool looks_like_trace(const json& j) {
  return (j.is_object() && j.contains("traceEvents")) || j.is_array();
}

// Traces come from other tools too: a missing or mistyped value counts as absent (common/json.hpp).
double num(const json& o, const char* key, double dflt) { return mmoc::json_number_or(o, key, dflt); }
int64_t inum(const json& o, const char* key, int64_t dflt) { return mmoc::json_int_or(o, key, dflt); }
std::string str(const json& o, const char* key, const std::string& dflt = "") { return mmoc::json_string_or(o, key, dflt); }

std::string html_escape(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&#39;"; break;
      default: o += c;
    }
  }
  return o;
}

// JSON text safe inside <script type="application/json">: '<' only occurs inside strings.
std::string script_json(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  std::string o;
  o.reserve(s.size() + 64);
  for (char c : s) {
    if (c == '<') o += "\\u003c";
    else o += c;
  }
  return o;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}
std::string fmt_bytes(double b) {
  if (b < 0) return "&mdash;";
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::fabs(b) >= 1024 && u < 4) { b /= 1024; ++u; }
  return fmt(u == 0 ? "%.0f " : "%.2f ", b) + units[u];
}
std::string fmt_ms(double us) { return fmt("%.3f ms", us / 1000.0); }
std::string fmt_pct(double f) { return fmt("%.1f%%", 100.0 * f); }
std::string fmt_delta(double a, double b) {  // b relative to a
  if (a == 0) return "&mdash;";
  return fmt("%+.1f%%", 100.0 * (b - a) / a);
}

// the program table's columns: the plan's streams (the cpu column counts the io thread's instructions too)
constexpr int kTableLanes[] = {kComp, kH2D, kD2H, kP2P, kCpu0, kOpt};

std::string lane_default_name(int tid) {
  switch (tid) {
    case kComp: return "comp";
    case kH2D: return "h2d";
    case kD2H: return "d2h";
    case kP2P: return "p2p";
    case kCpu0: return "cpu";
    case kCpu0 + 1: return "io";   // the NVMe tier's I/O thread (ir::Stream::Io)
    case kOpt: return "opt";       // the GPU optimizer's CUDA stream (ir::Stream::Opt)
    default: return "cpu" + std::to_string(tid - kCpu0);
  }
}

}  // namespace

std::string kind_of(const std::string& op) {
  static const std::set<std::string> known = {"forward", "backward", "prefetch", "evict",
                                              "send",    "recv",     "optim"};
  return known.count(op) ? op : "other";
}

// ---- loading ---------------------------------------------------------------------------------
Trace load_trace(const std::string& path, const std::string& role) {
  const std::string what = role + " trace";
  json j = parse_json(path, what);
  if (looks_like_plan(j))
    throw InputError(what + " '" + path + "': this is an mmoc plan, not a Chrome trace (pass it with --plan)");
  if (!looks_like_trace(j))
    throw InputError(what + " '" + path +
                     "': neither a Chrome trace (no \"traceEvents\" array) nor an mmoc plan");
  Trace t;
  t.file = path;
  t.role = role;
  const json* events = &j;
  if (j.is_object()) {
    events = &j["traceEvents"];
    if (!events->is_array()) throw InputError(what + " '" + path + "': \"traceEvents\" is not an array");
    if (j.contains("metadata")) {
      if (!j["metadata"].is_object()) throw InputError(what + " '" + path + "': \"metadata\" is not an object");
      t.metadata = j["metadata"];
    }
  }
  t.source = str(t.metadata, "source");
  t.raw_events = *events;

  auto bad = [&](size_t i, const std::string& why) {
    return InputError(what + " '" + path + "': traceEvents[" + std::to_string(i) + "]: " + why);
  };
  double tmin = INFINITY;
  std::set<int> gpus;
  struct RawMem { int gpu; double ts, bytes; };
  std::vector<RawMem> mem;
  std::vector<Box> boxes;
  for (size_t i = 0; i < events->size(); ++i) {
    const json& e = (*events)[i];
    if (!e.is_object()) throw bad(i, "not an object");
    if (!e.contains("ph") || !e["ph"].is_string()) throw bad(i, "missing \"ph\" string");
    const std::string ph = e["ph"];
    auto need_num = [&](const char* k) {
      if (!e.contains(k) || !e[k].is_number()) throw bad(i, std::string("ph ") + ph + " event without numeric \"" + k + "\"");
      return e[k].get<double>();
    };
    if (ph == "X") {
      Box b;
      b.gpu = (int)need_num("pid");
      b.lane = e.contains("tid") && e["tid"].is_number() ? e["tid"].get<int>() : 0;
      b.ts = need_num("ts");
      b.dur = need_num("dur");
      if (!std::isfinite(b.ts) || !std::isfinite(b.dur) || b.dur < 0) throw bad(i, "bad ts/dur");
      b.name = str(e, "name");
      const json& a = e.contains("args") ? e["args"] : json::object();
      b.op = str(a, "op");
      if (b.op.empty()) b.op = str(e, "cat");
      if (b.op.empty()) b.op = b.name.substr(0, b.name.find(' '));
      b.stage = (int)inum(a, "stage", -1);
      b.mb = (int)inum(a, "mb", -1);
      b.instr = (int)inum(a, "instr", -1);
      b.bytes = inum(a, "bytes", 0);
      b.buf = str(a, "buf");
      if (a.is_object() && a.contains("deps")) {
        const json& d = a["deps"];
        if (d.is_string()) b.deps = d.get<std::string>();
        else if (d.is_array()) {
          for (const auto& x : d) {
            if (!b.deps.empty()) b.deps += ",";
            b.deps += x.is_string() ? x.get<std::string>() : "%" + x.dump();
          }
        }
      }
      tmin = std::min(tmin, b.ts);
      gpus.insert(b.gpu);
      boxes.push_back(std::move(b));
    } else if (ph == "C") {
      if (str(e, "name") != "mem") continue;
      int g = (int)need_num("pid");
      double ts = need_num("ts");
      const json& a = e.contains("args") ? e["args"] : json::object();
      if (!a.is_object() || !a.contains("bytes") || !a["bytes"].is_number())
        throw bad(i, "\"mem\" counter without numeric args.bytes");
      mem.push_back({g, ts, a["bytes"].get<double>()});
      tmin = std::min(tmin, ts);
      gpus.insert(g);
    } else if (ph == "M") {
      if (str(e, "name") == "thread_name" && e.contains("pid") && e["pid"].is_number() && e.contains("tid") &&
          e["tid"].is_number()) {
        const json& a = e.contains("args") ? e["args"] : json::object();
        std::string n = str(a, "name");
        if (!n.empty()) t.lane_names[{e["pid"].get<int>(), e["tid"].get<int>()}] = n;
      }
    }
  }
  if (boxes.empty() && mem.empty())
    throw InputError(what + " '" + path + "': contains no complete (ph X) events and no \"mem\" counters");
  int ng = (int)inum(t.metadata, "gpus", 0);
  for (int g = 0; g < ng && g < 4096; ++g) gpus.insert(g);
  t.gpus.assign(gpus.begin(), gpus.end());
  t.t0 = std::isfinite(tmin) ? tmin : 0;
  for (auto& b : boxes) {
    b.ts -= t.t0;
    t.end_us = std::max(t.end_us, b.ts + b.dur);
  }
  std::stable_sort(boxes.begin(), boxes.end(), [](const Box& a, const Box& b) {
    if (a.gpu != b.gpu) return a.gpu < b.gpu;
    if (a.lane != b.lane) return a.lane < b.lane;
    return a.ts < b.ts;
  });
  t.boxes = std::move(boxes);
  for (const auto& m : mem) {
    t.mem[m.gpu].push_back({m.ts - t.t0, m.bytes});
    t.end_us = std::max(t.end_us, m.ts - t.t0);
  }
  for (auto& [g, v] : t.mem)
    std::stable_sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.first < b.first; });
  return t;
}

PlanInfo load_plan(const std::string& path) {
  const std::string what = "plan";
  const std::string text = read_input(path, what);
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (text[first] == '{' || text[first] == '[')) {
    // JSON: say what it is when it is not a plan (the text form is read by ir::parse_text below)
    json j = parse_json_text(text, path, what);
    if (!looks_like_plan(j)) {
      if (looks_like_trace(j))
        throw InputError("plan '" + path + "': this is a Chrome trace, not an mmoc plan (pass it with --predicted or --measured)");
      throw InputError("plan '" + path + "': neither an mmoc plan (no \"format\": \"mmoc-plan\") nor a Chrome trace");
    }
  }
  PlanInfo p;
  p.file = path;
  try {
    p.plan = mmoc::ir::load_plan_file(path);  // both forms, strictly (docs/plan-format.md)
  } catch (const mmoc::ir::ParseError& e) {
    throw InputError("plan '" + path + "': not a valid mmoc plan: " + e.what());
  }
  const auto& pl = p.plan;
  p.gpus = pl.gpus;
  p.microbatches = pl.microbatches;
  p.mbs = pl.micro_batch_size;
  p.seq = pl.seq_len;
  p.dp = pl.dp;
  p.budget = pl.budget_bytes;
  p.has_predicted = pl.predicted.has_value();
  for (const auto& pr : pl.programs) {
    auto& lanes = p.instr_lane[pr.gpu];
    for (const auto& in : pr.instrs) {
      // the streams are the trace's lanes (comp 0, h2d 1, d2h 2, p2p 3, cpu 4 with io, opt 6)
      const int l = plan_lane((int)in.stream);
      lanes.push_back(l);
      ++p.stream_counts[{pr.gpu, l}];
    }
  }
  return p;
}

std::vector<std::string> compare_with_plan(const Trace& t, const PlanInfo& plan) {
  std::vector<std::string> out;
  const std::string who = t.role + " trace '" + t.file + "'";
  std::map<std::pair<int, int>, int> got;
  int bad_instr = 0, wrong_lane = 0;
  std::string first_bad, first_wrong;
  for (const auto& b : t.boxes) {
    const int lane = plan_lane(b.lane);  // every CPU thread lane is the plan's one cpu stream
    ++got[{b.gpu, lane}];
    if (b.instr < 0) continue;
    auto it = plan.instr_lane.find(b.gpu);
    if (it == plan.instr_lane.end() || b.instr >= (int)it->second.size()) {
      if (!bad_instr++) first_bad = "g" + std::to_string(b.gpu) + " %" + std::to_string(b.instr);
    } else if (it->second[b.instr] >= 0 && it->second[b.instr] != lane) {
      if (!wrong_lane++)
        first_wrong = "g" + std::to_string(b.gpu) + " %" + std::to_string(b.instr) + " on " + lane_default_name(lane) +
                      " (plan: " + lane_default_name(it->second[b.instr]) + ")";
    }
  }
  std::set<std::pair<int, int>> keys;
  for (auto& [k, n] : got) keys.insert(k);
  for (auto& [k, n] : plan.stream_counts) keys.insert(k);
  int shown = 0, mism = 0;
  std::string list;
  for (auto& k : keys) {
    int a = got.count(k) ? got[k] : 0, e = plan.stream_counts.count(k) ? plan.stream_counts.at(k) : 0;
    if (a == e) continue;
    ++mism;
    if (shown++ < 6) list += (list.empty() ? "" : ", ") + ("g" + std::to_string(k.first) + "/" + lane_default_name(k.second)) +
                             " " + std::to_string(a) + " boxes vs " + std::to_string(e) + " instructions";
  }
  if (mism) out.push_back(who + " does not match the plan's programs on " + std::to_string(mism) + " lane(s): " + list +
                          (mism > 6 ? ", ..." : ""));
  if (bad_instr) out.push_back(who + ": " + std::to_string(bad_instr) + " box(es) with args.instr not in the plan (first: " +
                               first_bad + ")");
  if (wrong_lane) out.push_back(who + ": " + std::to_string(wrong_lane) + " box(es) on another lane than their instruction's "
                                "stream in the plan (first: " + first_wrong + ")");
  int pg = plan.gpus, tg = (int)inum(t.metadata, "gpus", 0);
  if (pg > 0 && tg > 0 && pg != tg)
    out.push_back(who + ": metadata.gpus=" + std::to_string(tg) + " but the plan has " + std::to_string(pg));
  return out;
}

// ---- statistics ------------------------------------------------------------------------------
void compute_stats(Trace& t, const PlanInfo* plan) {
  double step_s = num(t.metadata, "step_s", 0);
  t.step_us = step_s > 0 ? step_s * 1e6 : t.end_us;
  t.tokens_per_s = num(t.metadata, "tokens_per_s", -1);
  if (t.tokens_per_s <= 0 && plan && plan->microbatches > 0 && plan->mbs > 0 && plan->seq > 0 && t.step_us > 0)
    t.tokens_per_s = (double)plan->microbatches * plan->mbs * plan->seq * std::max(1, plan->dp) / (t.step_us * 1e-6);
  t.budget = inum(t.metadata, "budget_bytes", -1);
  if (t.budget <= 0 && plan) t.budget = plan->budget;
  double both = num(t.metadata, "pcie_bytes_per_s", 0);
  if (both <= 0) both = num(t.metadata, "link_bytes_per_s", 0);
  t.h2d_rate = num(t.metadata, "h2d_bytes_per_s", both);
  t.d2h_rate = num(t.metadata, "d2h_bytes_per_s", both);
  std::vector<int64_t> meta_peak;
  if (t.metadata.contains("peak_bytes") && t.metadata["peak_bytes"].is_array())
    for (const auto& x : t.metadata["peak_bytes"]) meta_peak.push_back(x.is_number() ? x.get<int64_t>() : -1);

  t.stats.clear();
  double bubble_sum = 0;
  size_t bi = 0;
  for (int g : t.gpus) {
    GpuStats s;
    s.gpu = g;
    while (bi < t.boxes.size() && t.boxes[bi].gpu < g) ++bi;
    double cur_s = -1, cur_e = -1;
    for (; bi < t.boxes.size() && t.boxes[bi].gpu == g; ++bi) {
      const Box& b = t.boxes[bi];
      s.boxes_per_lane[b.lane]++;
      s.span_us = std::max(s.span_us, b.ts + b.dur);
      if (b.lane == kComp) {  // union of intervals (boxes sorted by ts within the lane)
        if (b.ts > cur_e) {
          if (cur_e > cur_s) s.busy_us += cur_e - cur_s;
          cur_s = b.ts;
          cur_e = b.ts + b.dur;
        } else {
          cur_e = std::max(cur_e, b.ts + b.dur);
        }
      } else if (b.lane == kH2D) {
        s.h2d_bytes += b.bytes;
      } else if (b.lane == kD2H) {
        s.d2h_bytes += b.bytes;
      } else if (b.lane == kP2P) {
        s.p2p_bytes += b.bytes;
      }
    }
    if (cur_e > cur_s) s.busy_us += cur_e - cur_s;
    s.bubble = t.step_us > 0 ? 1.0 - s.busy_us / t.step_us : 0;
    double step_sec = t.step_us * 1e-6;
    if (step_sec > 0) {
      s.h2d_gbps = s.h2d_bytes / step_sec / 1e9;
      s.d2h_gbps = s.d2h_bytes / step_sec / 1e9;
      if (t.h2d_rate > 0) s.h2d_util = s.h2d_bytes / (step_sec * t.h2d_rate);
      if (t.d2h_rate > 0) s.d2h_util = s.d2h_bytes / (step_sec * t.d2h_rate);
    }
    auto mi = t.mem.find(g);
    if (mi != t.mem.end() && !mi->second.empty()) {
      double pk = 0;
      for (auto& [ts, b] : mi->second) pk = std::max(pk, b);
      s.peak_bytes = (int64_t)pk;
    } else if (g >= 0 && g < (int)meta_peak.size()) {
      s.peak_bytes = meta_peak[g];
    }
    bubble_sum += s.bubble;
    t.stats.push_back(std::move(s));
  }
  t.bubble = t.stats.empty() ? 0 : bubble_sum / t.stats.size();
}

// ---- HTML ------------------------------------------------------------------------------------
namespace {

json summary_json(const Trace& t) {
  json s = {{"role", t.role},       {"file", t.file},         {"source", t.source},
            {"step_us", t.step_us}, {"end_us", t.end_us},     {"tokens_per_s", t.tokens_per_s},
            {"budget", t.budget},   {"bubble", t.bubble},     {"boxes", t.boxes.size()},
            {"h2d_rate", t.h2d_rate}, {"d2h_rate", t.d2h_rate}, {"gpus", json::array()}};
  for (const auto& g : t.stats) {
    json lanes = json::object();
    for (auto& [l, n] : g.boxes_per_lane) lanes[std::to_string(l)] = n;
    s["gpus"].push_back({{"gpu", g.gpu},
                         {"span_us", g.span_us},
                         {"busy_us", g.busy_us},
                         {"bubble", g.bubble},
                         {"h2d_bytes", g.h2d_bytes},
                         {"d2h_bytes", g.d2h_bytes},
                         {"p2p_bytes", g.p2p_bytes},
                         {"h2d_util", g.h2d_util},
                         {"d2h_util", g.d2h_util},
                         {"peak_bytes", g.peak_bytes},
                         {"boxes_per_lane", lanes}});
  }
  return s;
}

// Compact data for the page script.
// Lanes comp/h2d/d2h/p2p always; a CPU lane (tid 4+) only where it has boxes, or where the plan puts instructions
// on the GPU's cpu stream, or (without a plan) where the trace names it and some GPU of the trace uses it. Both the
// simulator and the engine name tid 4 "cpu" on every GPU, also on GPUs without CPU optimizer steps.
json page_data(const Trace& t, const PlanInfo* plan) {
  json d = {{"role", t.role}, {"file", t.file}, {"step_us", t.step_us}, {"end_us", t.end_us},
            {"budget", t.budget}, {"gpus", json::array()}};
  std::set<int> used_cpu_tids;
  for (const auto& b : t.boxes)
    if (b.lane >= kCpu0 && b.lane != kOpt) used_cpu_tids.insert(b.lane);
  size_t bi = 0;
  for (int g : t.gpus) {
    std::map<int, json> lanes;
    for (int l = 0; l < kCpu0; ++l) lanes[l] = json::array();
    for (auto& [k, n] : t.lane_names)
      if (k.first == g && k.second >= kCpu0 && !plan && used_cpu_tids.count(k.second))
        lanes.try_emplace(k.second, json::array());
    if (plan && plan->stream_counts.count({g, kCpu0})) lanes.try_emplace(kCpu0, json::array());
    if (plan && plan->stream_counts.count({g, kOpt})) lanes.try_emplace(kOpt, json::array());
    while (bi < t.boxes.size() && t.boxes[bi].gpu < g) ++bi;
    for (; bi < t.boxes.size() && t.boxes[bi].gpu == g; ++bi) {
      const Box& b = t.boxes[bi];
      // [ts, dur, op, stage, mb, bytes, instr, deps, name, buf]
      lanes[b.lane].push_back(json::array({b.ts, b.dur, b.op, b.stage, b.mb, b.bytes, b.instr, b.deps, b.name, b.buf}));
    }
    json jl = json::array();
    for (auto& [l, boxes] : lanes) {
      auto it = t.lane_names.find({g, l});
      std::string name = it != t.lane_names.end() ? it->second : lane_default_name(l);
      jl.push_back({{"tid", l}, {"name", name}, {"b", std::move(boxes)}});
    }
    json mem = json::array();
    double peak = -1;
    auto mi = t.mem.find(g);
    if (mi != t.mem.end())
      for (auto& [ts, by] : mi->second) {
        mem.push_back(ts);
        mem.push_back(by);
        peak = std::max(peak, by);
      }
    // no counters: the per-GPU peak from the metadata (drawn as a label only)
    bool peak_from_meta = false;
    if (mem.empty())
      for (const auto& s : t.stats)
        if (s.gpu == g && s.peak_bytes >= 0) { peak = (double)s.peak_bytes; peak_from_meta = true; }
    d["gpus"].push_back({{"gpu", g}, {"lanes", std::move(jl)}, {"mem", std::move(mem)}, {"peak", peak},
                         {"peak_meta", peak_from_meta}});
  }
  return d;
}

void summary_table(std::ostringstream& o, const std::vector<Trace>& traces, const PlanInfo* plan) {
  o << "<table class=\"tbl\" id=\"summary\"><thead><tr><th></th>";
  bool plan_pred = plan && plan->has_predicted;
  if (plan_pred) o << "<th>plan.predicted</th>";
  for (const auto& t : traces) o << "<th>" << html_escape(t.role) << " trace</th>";
  o << "</tr></thead><tbody>\n";
  const mmoc::ir::Predicted pp = plan_pred ? *plan->plan.predicted : mmoc::ir::Predicted{};
  auto row = [&](const char* key, const char* label, auto plan_cell, auto trace_cell) {
    o << "<tr data-key=\"" << key << "\"><th>" << label << "</th>";
    if (plan_pred) o << "<td>" << plan_cell() << "</td>";
    for (const auto& t : traces) o << "<td data-role=\"" << t.role << "\">" << trace_cell(t) << "</td>";
    o << "</tr>\n";
  };
  row("step", "step time", [&] { return fmt_ms(pp.step_s * 1e6); },
      [](const Trace& t) { return fmt_ms(t.step_us); });
  row("tokens", "tokens/s", [&] { return fmt("%.1f", pp.tokens_per_s); },
      [](const Trace& t) { return t.tokens_per_s > 0 ? fmt("%.1f", t.tokens_per_s) : std::string("&mdash;"); });
  row("bubble", "bubble (1 &minus; comp busy / step, mean)", [&] { return fmt_pct(pp.bubble); },
      [](const Trace& t) { return fmt_pct(t.bubble); });
  auto peaks_plan = [&] {
    std::string s;
    for (int64_t x : pp.peak_bytes) s += (s.empty() ? "" : ", ") + fmt_bytes((double)x);
    return s.empty() ? std::string("&mdash;") : s;
  };
  row("peak", "peak memory max over GPUs", peaks_plan, [](const Trace& t) {
    int64_t m = -1;
    for (auto& g : t.stats) m = std::max(m, g.peak_bytes);
    return fmt_bytes((double)m);
  });
  row("budget", "memory budget / GPU", [&] { return fmt_bytes(plan->budget); },
      [](const Trace& t) { return fmt_bytes((double)t.budget); });
  auto link_cell = [](const Trace& t, bool h2d) {
    double bytes = 0;
    for (auto& g : t.stats) bytes += h2d ? g.h2d_bytes : g.d2h_bytes;
    double sec = t.step_us * 1e-6;
    if (sec <= 0 || t.stats.empty()) return std::string("&mdash;");
    double rate = h2d ? t.h2d_rate : t.d2h_rate;
    std::string s = fmt("%.2f GB/s per GPU", bytes / t.stats.size() / sec / 1e9);
    if (rate > 0) s += " (" + fmt_pct(bytes / t.stats.size() / (sec * rate)) + " of link)";
    return s;
  };
  row("h2d", "PCIe h2d (mean)", [] { return std::string("&mdash;"); }, [&](const Trace& t) { return link_cell(t, true); });
  row("d2h", "PCIe d2h (mean)", [] { return std::string("&mdash;"); }, [&](const Trace& t) { return link_cell(t, false); });
  row("boxes", "instructions (boxes)", [] { return std::string("&mdash;"); },
      [](const Trace& t) { return std::to_string(t.boxes.size()); });
  o << "</tbody></table>\n";
}

void gpu_table(std::ostringstream& o, const Trace& t) {
  o << "<h3>" << html_escape(t.role) << " trace per GPU <span class=\"file\">" << html_escape(t.file)
    << "</span></h3>\n<table class=\"tbl gpu-table\" id=\"gpu-table-" << t.role
    << "\"><thead><tr><th>GPU</th><th>span</th><th>comp busy</th><th>bubble</th><th>h2d bytes</th><th>h2d</th>"
       "<th>d2h bytes</th><th>d2h</th><th>p2p bytes</th><th>peak memory</th><th>of budget</th><th>boxes</th></tr></thead><tbody>\n";
  for (const auto& g : t.stats) {
    auto link = [&](double util, double gbps) {
      std::string s = fmt("%.2f GB/s", gbps);
      if (util >= 0) s = fmt_pct(util) + " (" + s + ")";
      return s;
    };
    int nb = 0;
    for (auto& [l, n] : g.boxes_per_lane) nb += n;
    o << "<tr data-gpu=\"" << g.gpu << "\"><td>g" << g.gpu << "</td><td>" << fmt_ms(g.span_us) << "</td><td>"
      << fmt_ms(g.busy_us) << "</td><td>" << fmt_pct(g.bubble) << "</td><td>" << fmt_bytes((double)g.h2d_bytes)
      << "</td><td>" << link(g.h2d_util, g.h2d_gbps) << "</td><td>" << fmt_bytes((double)g.d2h_bytes) << "</td><td>"
      << link(g.d2h_util, g.d2h_gbps) << "</td><td>" << fmt_bytes((double)g.p2p_bytes) << "</td><td>"
      << fmt_bytes((double)g.peak_bytes) << "</td><td>"
      << (t.budget > 0 && g.peak_bytes >= 0 ? fmt_pct((double)g.peak_bytes / t.budget) : "&mdash;") << "</td><td>" << nb
      << "</td></tr>\n";
  }
  o << "</tbody></table>\n";
}

void diff_table(std::ostringstream& o, const Trace& p, const Trace& m) {
  o << "<h3>predicted vs measured</h3>\n<table class=\"tbl\" id=\"diff-table\"><thead><tr><th>GPU</th>"
       "<th>step pred</th><th>step meas</th><th>&Delta;</th><th>busy pred</th><th>busy meas</th><th>&Delta;</th>"
       "<th>peak pred</th><th>peak meas</th><th>&Delta;</th></tr></thead><tbody>\n";
  std::set<int> gpus(p.gpus.begin(), p.gpus.end());
  gpus.insert(m.gpus.begin(), m.gpus.end());
  auto find = [](const Trace& t, int g) -> const GpuStats* {
    for (auto& s : t.stats)
      if (s.gpu == g) return &s;
    return nullptr;
  };
  for (int g : gpus) {
    const GpuStats* a = find(p, g);
    const GpuStats* b = find(m, g);
    double ab = a ? a->busy_us : 0, bb = b ? b->busy_us : 0;
    double ap = a ? (double)a->peak_bytes : -1, bp = b ? (double)b->peak_bytes : -1;
    o << "<tr data-gpu=\"" << g << "\"><td>g" << g << "</td><td>" << fmt_ms(p.step_us) << "</td><td>"
      << fmt_ms(m.step_us) << "</td><td>" << fmt_delta(p.step_us, m.step_us) << "</td><td>" << fmt_ms(ab)
      << "</td><td>" << fmt_ms(bb) << "</td><td>" << fmt_delta(ab, bb) << "</td><td>" << fmt_bytes(ap) << "</td><td>"
      << fmt_bytes(bp) << "</td><td>" << (ap > 0 && bp >= 0 ? fmt_delta(ap, bp) : "&mdash;") << "</td></tr>\n";
  }
  o << "</tbody></table>\n";
}

void plan_tables(std::ostringstream& o, const PlanInfo& p) {
  const mmoc::ir::Plan& pl = p.plan;
  o << "<h3>plan <span class=\"file\">" << html_escape(p.file) << "</span></h3>\n<p class=\"planhdr\" id=\"plan-header\">";
  for (const auto& [k, v] : mmoc::ir::header_fields(pl)) o << "<b>" << html_escape(k) << "</b>=" << html_escape(v) << " ";
  o << " &nbsp; <b>model</b>=" << html_escape(pl.model.name) << " (" << pl.model.layers << " layers)";
  o << "</p>\n";
  std::map<int, int> ninstr;
  for (const auto& pr : pl.programs) ninstr[pr.gpu] += (int)pr.instrs.size();
  o << "<table class=\"tbl\" id=\"stage-table\"><thead><tr><th>stage</th><th>gpu</th><th>layers</th><th>weights</th>"
       "<th>optim</th><th>recompute</th><th>params</th><th>fwd ms</th><th>bwd ms</th><th>fwd ws</th><th>bwd ws</th>"
       "</tr></thead><tbody>\n";
  for (const auto& s : pl.stages) {
    o << "<tr data-stage=\"" << s.id << "\"><td>S" << s.id << "</td><td>g" << s.gpu << "</td><td>[" << s.layer_begin << ", "
      << s.layer_end << ")</td><td>" << mmoc::ir::to_string(s.weights) << "</td><td>" << mmoc::ir::to_string(s.optim)
      << "</td><td>" << (!s.recompute ? std::string("no") : s.keep_layers == 0 ? std::string("yes")
          : std::to_string(s.recompute_layers()) + "/" + std::to_string(s.layers())) << (s.selective ? " +selective" : "") << "</td><td>" << fmt("%.3g", (double)s.params) << "</td><td>"
      << fmt("%.3f", s.fwd_ms) << "</td><td>" << fmt("%.3f", s.bwd_ms) << "</td><td>" << fmt_bytes((double)s.fwd_ws)
      << "</td><td>" << fmt_bytes((double)s.bwd_ws) << "</td></tr>\n";
  }
  o << "</tbody></table>\n";
  if (!ninstr.empty()) {
    // instructions per GPU and stream (= boxes per lane of a complete trace of this plan)
    o << "<table class=\"tbl\" id=\"program-table\"><thead><tr><th>program</th><th>instructions</th>";
    for (int l : kTableLanes) o << "<th>@" << lane_default_name(l) << "</th>";
    o << "</tr></thead><tbody>\n";
    for (auto& [g, n] : ninstr) {
      o << "<tr data-gpu=\"" << g << "\" data-instrs=\"" << n << "\"";
      for (int l : kTableLanes) {
        auto it = p.stream_counts.find({g, l});
        o << " data-" << lane_default_name(l) << "=\"" << (it == p.stream_counts.end() ? 0 : it->second) << "\"";
      }
      o << "><td>g" << g << "</td><td>" << n << "</td>";
      for (int l : kTableLanes) {
        auto it = p.stream_counts.find({g, l});
        o << "<td>" << (it == p.stream_counts.end() ? 0 : it->second) << "</td>";
      }
      o << "</tr>\n";
    }
    o << "</tbody></table>\n";
  }
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  size_t pos = s.find(from);
  if (pos == std::string::npos) throw std::logic_error("template marker missing: " + from);
  s.replace(pos, from.size(), to);
}

}  // namespace

std::string render_html(const std::vector<Trace>& traces, const PlanInfo* plan) {
  std::ostringstream title;
  title << "mmoc-viz";
  if (plan) title << " &mdash; " << html_escape(plan->plan.schedule) << " " << plan->gpus << " GPUs";
  for (const auto& t : traces) title << " &mdash; " << html_escape(t.role) << ": " << html_escape(t.file);

  std::ostringstream tables;
  summary_table(tables, traces, plan);
  std::ostringstream below;
  const Trace* pred = nullptr;
  const Trace* meas = nullptr;
  for (const auto& t : traces) (t.role == "predicted" ? pred : meas) = &t;
  if (pred && meas) diff_table(below, *pred, *meas);
  for (const auto& t : traces) gpu_table(below, t);
  if (plan) plan_tables(below, *plan);

  std::vector<std::string> warnings;
  if (plan)
    for (const auto& t : traces)
      for (auto& w : compare_with_plan(t, *plan)) warnings.push_back(w);
  tables << "<div id=\"viz-warnings\" data-count=\"" << warnings.size() << "\">";
  for (auto& w : warnings) tables << "<div class=\"warn\">&#9888; " << html_escape(w) << "</div>";
  tables << "</div>\n";

  json data = {{"traces", json::array()}};
  json summary = {{"traces", json::array()}};
  for (const auto& t : traces) {
    data["traces"].push_back(page_data(t, plan));
    summary["traces"].push_back(summary_json(t));
  }
  if (plan && plan->has_predicted) {
    const auto& pr = *plan->plan.predicted;
    summary["plan_predicted"] = {{"step_s", pr.step_s},         {"tokens_per_s", pr.tokens_per_s}, {"bubble", pr.bubble},
                                 {"peak", pr.peak_bytes},       {"bound", pr.bound_bytes}};
  }
  summary["warnings"] = warnings;

  std::string page = kVizTemplate;
  replace_all(page, "@@TITLE@@", title.str());
  replace_all(page, "@@HEADER@@", title.str());
  replace_all(page, "@@SUMMARY@@", tables.str());
  replace_all(page, "@@TABLES@@", below.str());
  replace_all(page, "@@SUMMARY_JSON@@", script_json(summary));
  replace_all(page, "@@DATA@@", script_json(data));
  return page;
}

// ---- merged Perfetto trace -------------------------------------------------------------------
std::string perfetto_json(const std::vector<Trace>& traces) {
  json out = json::array();
  json inputs = json::array();
  for (size_t k = 0; k < traces.size(); ++k) {
    const Trace& t = traces[k];
    const int off = (int)k * 1000;
    std::string label = t.role + (t.source.empty() || t.source == t.role ? "" : " (" + t.source + ")");
    inputs.push_back({{"role", t.role}, {"file", t.file}, {"source", t.source}, {"pid_offset", off}});
    std::set<std::pair<int, int>> named;
    std::set<std::pair<int, int>> used;
    for (const auto& e : t.raw_events) {
      if (!e.is_object() || !e.contains("ph") || !e["ph"].is_string()) continue;
      std::string ph = e["ph"];
      if (ph == "M") {
        std::string n = str(e, "name");
        if (n == "process_name" || n == "process_sort_index" || n == "process_labels") continue;  // ours below
      }
      json c = e;
      if (c.contains("pid") && c["pid"].is_number()) c["pid"] = c["pid"].get<int>() + off;
      else if (ph != "M") c["pid"] = off;  // Perfetto needs a pid
      if (c.contains("ts") && c["ts"].is_number()) c["ts"] = c["ts"].get<double>() - t.t0;
      else if (ph != "M") continue;  // not placeable in time
      if (ph == "M" && str(e, "name") == "thread_name" && c.contains("tid") && c["tid"].is_number())
        named.insert({c["pid"].get<int>(), c["tid"].get<int>()});
      if (ph == "X") used.insert({c["pid"].get<int>(), c.contains("tid") && c["tid"].is_number() ? c["tid"].get<int>() : 0});
      out.push_back(std::move(c));
    }
    for (int g : t.gpus) {
      out.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", g + off}, {"tid", 0},
                     {"args", {{"name", label + " g" + std::to_string(g)}}}});
      out.push_back({{"ph", "M"}, {"name", "process_sort_index"}, {"pid", g + off}, {"tid", 0},
                     {"args", {{"sort_index", g + off}}}});
      for (int l = 0; l < kCpu0; ++l) used.insert({g + off, l});
    }
    for (auto& [pid, tid] : used)
      if (!named.count({pid, tid})) {
        out.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", pid}, {"tid", tid},
                       {"args", {{"name", lane_default_name(tid)}}}});
        out.push_back({{"ph", "M"}, {"name", "thread_sort_index"}, {"pid", pid}, {"tid", tid},
                       {"args", {{"sort_index", tid}}}});
      }
  }
  json doc = {{"traceEvents", std::move(out)},
              {"displayTimeUnit", "ms"},
              {"metadata", {{"generator", "mmoc-viz"}, {"inputs", std::move(inputs)}}}};
  return doc.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

}  // namespace mmoc::viz
