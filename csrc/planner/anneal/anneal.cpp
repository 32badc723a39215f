// planner._anneal: the step simulator and simulated annealing over flat cost tables.
//
// This is a line-by-line copy of planner/simulate.py (the pure-Python reference; its docstring has the
// schedule and memory rules) plus the search. The search state is one candidate index per call; a move
// re-draws one call's candidate (uniformly, or a neighbour: same mesh other layout, or same layout other
// mesh); Metropolis acceptance exp(-(c' - c) / T) in floating point with a geometric temperature
// schedule T0 -> T_end per restart; restarts alternate between the best state so far and a random one;
// the first starts from the given seed assignment. std::mt19937_64(seed) drives everything, so a fixed
// seed and iteration count give the same result on every run. Infeasible states (memory) cost
// penalty_ref * (1 + overflow / capacity), above every feasible cost, so the walk is pulled back.
// Re-simulation is incremental: step 0 restarts from a snapshot taken before the first affected call.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

template <typename T>
std::vector<T> vec(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::invalid_argument(std::string("missing table ") + key);
  auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(d[key]);
  if (!a) throw std::invalid_argument(std::string("bad table ") + key);
  return std::vector<T>(a.data(), a.data() + a.size());
}

struct Eval {
  double step_time_s = 0;
  bool feasible = true;
  double overflow_bytes = 0;
  std::vector<double> peaks, durations, step_ends;
};

class Problem {
 public:
  explicit Problem(const py::dict& d) {
    D = d["num_devices"].cast<int>();
    K = d["num_steps"].cast<int>();
    W = d["mask_words"].cast<int>();
    WN = d["node_words"].cast<int>();
    cap = d["memory_capacity_bytes"].cast<double>();
    call_role = vec<int64_t>(d, "call_role");
    call_is_train = vec<int64_t>(d, "call_is_train");
    role_train_call = vec<int64_t>(d, "role_train_call");
    pred_offset = vec<int64_t>(d, "pred_offset");
    preds = vec<int64_t>(d, "preds");
    cross_offset = vec<int64_t>(d, "cross_offset");
    cross = vec<int64_t>(d, "cross");
    cand_offset = vec<int64_t>(d, "cand_offset");
    time_s = vec<double>(d, "cand_time_s");
    mem = vec<double>(d, "cand_mem_bytes");
    mem_shared = vec<double>(d, "cand_mem_shared_bytes");
    state = vec<double>(d, "cand_state_bytes");
    host_load = vec<double>(d, "cand_host_load_s");
    mask = vec<uint64_t>(d, "cand_mask");
    heads = vec<uint64_t>(d, "cand_heads");
    nodes = vec<uint64_t>(d, "cand_nodes");
    layout = vec<int64_t>(d, "cand_layout");
    dp = vec<int64_t>(d, "cand_dp");
    replicas = vec<int64_t>(d, "cand_replicas");
    mesh_group = vec<int64_t>(d, "cand_mesh_group");
    shape_group = vec<int64_t>(d, "cand_shape_group");
    edge_src = vec<int64_t>(d, "edge_src");
    edge_dst = vec<int64_t>(d, "edge_dst");
    edge_bytes = vec<double>(d, "edge_bytes");
    pair_record = vec<int64_t>(d, "pair_record");
    pair_other = vec<int64_t>(d, "pair_other");
    pair_offset = vec<int64_t>(d, "pair_offset");
    pair_time = vec<double>(d, "pair_time_s");
    auto lr = vec<double>(d, "link_rates");
    intra_bw = lr[0], intra_lat = lr[1], inter_bw = lr[2], inter_lat = lr[3];
    n = (int)call_role.size();
    if ((int)cand_offset.size() != n + 1) throw std::invalid_argument("cand_offset must have n_calls + 1 entries");
    if (K < 1) throw std::invalid_argument("num_steps must be >= 1");
    edges_into.assign(n, {});
    for (size_t e = 0; e < edge_src.size(); ++e) edges_into[edge_dst[e]].push_back((int)e);
    pairs_into.assign(n, {});
    pairs_from.assign(n, {});
    for (size_t q = 0; q < pair_record.size(); ++q) {
      pairs_into[pair_other[q]].push_back((int)q);
      pairs_from[pair_record[q]].push_back((int)q);
    }
    for (int r = 0; r < (int)role_train_call.size(); ++r)
      if (role_train_call[r] >= 0) trained.push_back({r, (int)role_train_call[r]});
    // neighbour lists per call
    mesh_nbrs.assign(n, {});
    shape_nbrs.assign(n, {});
    for (int c = 0; c < n; ++c) {
      int lo = (int)cand_offset[c], hi = (int)cand_offset[c + 1];
      mesh_nbrs[c].resize(hi - lo);
      shape_nbrs[c].resize(hi - lo);
      for (int a = lo; a < hi; ++a)
        for (int b = lo; b < hi; ++b) {
          if (a == b) continue;
          if (mesh_group[a] == mesh_group[b]) mesh_nbrs[c][a - lo].push_back(b - lo);
          if (shape_group[a] == shape_group[b]) shape_nbrs[c][a - lo].push_back(b - lo);
        }
    }
    // twins: for a candidate of call c and another call o of the same model, o's candidates with the same
    // mesh and layout (an identical placement needs no reallocation).
    twins.assign(mask.size() / std::max(W, 1), {});
    for (int c = 0; c < n; ++c)
      for (int o = 0; o < n; ++o) {
        if (o == c || call_role[o] != call_role[c]) continue;
        for (int a = (int)cand_offset[c]; a < cand_offset[c + 1]; ++a)
          for (int b = (int)cand_offset[o]; b < cand_offset[o + 1]; ++b)
            if (layout[a] == layout[b] && same_mask(a, b)) twins[a].push_back(b);
      }
    // An upper bound on any feasible step time: every task serialised.
    penalty_ref = 1e-9;
    for (int c = 0; c < n; ++c) {
      double mx = 0, mh = 0;
      for (int a = (int)cand_offset[c]; a < cand_offset[c + 1]; ++a) mx = std::max(mx, time_s[a]), mh = std::max(mh, host_load[a]);
      penalty_ref += mx + mh;
    }
    for (size_t q = 0; q < pair_record.size(); ++q) {
      double mx = 0;
      for (int64_t i = pair_offset[q]; i < pair_offset[q + 1]; ++i) mx = std::max(mx, pair_time[i]);
      penalty_ref += mx;
    }
    for (size_t e = 0; e < edge_src.size(); ++e) {
      double mx = 0;
      for (int a = (int)cand_offset[edge_src[e]]; a < cand_offset[edge_src[e] + 1]; ++a)
        for (int b = (int)cand_offset[edge_dst[e]]; b < cand_offset[edge_dst[e] + 1]; ++b)
          mx = std::max(mx, transfer(edge_bytes[e], a, b));
      penalty_ref += mx;
    }
    penalty_ref *= 2.0;
    free_.assign(D, 0.0);
    end_.assign(n, 0.0);
    end_prev_.assign(n, 0.0);
  }

  int num_calls() const { return n; }
  int num_candidates(int c) const { return (int)(cand_offset[c + 1] - cand_offset[c]); }

  bool same_mask(int a, int b) const {
    for (int w = 0; w < W; ++w)
      if (mask[a * W + w] != mask[b * W + w]) return false;
    return true;
  }
  bool intersects(int a, int b) const {
    for (int w = 0; w < W; ++w)
      if (mask[a * W + w] & mask[b * W + w]) return true;
    return false;
  }
  bool has_device(int a, int d) const { return (mask[a * W + d / 64] >> (d % 64)) & 1ULL; }

  double transfer(double nbytes, int a, int b) const {
    if (nbytes <= 0) return 0.0;
    int same = (same_mask(a, b) && layout[a] == layout[b]) ? 1 : 0;
    double out = nbytes * (double)(replicas[b] - same) / (double)dp[a];
    if (out <= 0) return 0.0;
    double inb = nbytes / (double)dp[b];
    int cnt = 0;
    for (int w = 0; w < WN; ++w) cnt += __builtin_popcountll(nodes[a * WN + w] | nodes[b * WN + w]);
    double bw = cnt == 1 ? intra_bw : inter_bw, lat = cnt == 1 ? intra_lat : inter_lat;
    return lat + std::max(out, inb) / bw;
  }

  double pair_cost(int q, int ar, int a) const {
    int r = (int)pair_record[q], c = (int)pair_other[q];
    int n_other = num_candidates(c);
    return pair_time[pair_offset[q] + (int64_t)(ar - cand_offset[r]) * n_other + (a - cand_offset[c])];
  }

  // Memory: per call peak and total overflow (simulate.py memory_check).
  double memory(const std::vector<int>& g, std::vector<double>* peaks) const {
    double overflow = 0;
    if (peaks) peaks->assign(n, 0.0);
    for (int c = 0; c < n; ++c) {
      int a = g[c];
      int role = (int)call_role[c];
      double base = mem[a];
      bool own_counted = true;
      int tc_own = (int)role_train_call[role];
      if (tc_own >= 0 && tc_own != c) {
        int ta = g[tc_own];
        bool identical = same_mask(a, ta) && layout[a] == layout[ta];
        if (identical) base = mem_shared[a];
        own_counted = identical;
      }
      double peak = 0;
      for (int w = 0; w < W; ++w) {
        uint64_t bits = mask[a * W + w];
        while (bits) {
          int d = w * 64 + __builtin_ctzll(bits);
          bits &= bits - 1;
          double total = base;
          for (auto& xt : trained) {
            if (xt.first == role && !own_counted) continue;
            int ta = g[xt.second];
            if (has_device(ta, d)) total += state[ta];
          }
          peak = std::max(peak, total);
          if (total > cap) overflow += total - cap;
        }
      }
      if (peaks) (*peaks)[c] = peak;
    }
    return overflow;
  }

  double duration(const std::vector<int>& g, int c) const {
    int a = g[c];
    double d = time_s[a];
    if (host_load[a] > 0) {
      for (int o = 0; o < n; ++o)
        if (o != c && intersects(a, g[o])) return d + host_load[a];
    }
    return d;
  }

  // Run a task on the union of masks (a2 < 0: one mask); returns its end time.
  double run(int a1, const std::vector<uint64_t>& m1, int a2, double ready, double dur) {
    double start = ready;
    for (int w = 0; w < W; ++w) {
      uint64_t bits = m1[a1 * W + w] | (a2 >= 0 ? mask[a2 * W + w] : 0ULL);
      while (bits) {
        int d = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        start = std::max(start, free_[d]);
      }
    }
    double fin = start + dur;
    for (int w = 0; w < W; ++w) {
      uint64_t bits = m1[a1 * W + w] | (a2 >= 0 ? mask[a2 * W + w] : 0ULL);
      while (bits) {
        int d = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        free_[d] = fin;
      }
    }
    return fin;
  }

  // One call position of one step (simulate.py's inner loop body). Returns its step_end contribution.
  double run_call(const std::vector<int>& g, const std::vector<double>& dur, int i, int c) {
    int a = g[c];
    double ready = 0, step_end = 0;
    for (int64_t k = pred_offset[c]; k < pred_offset[c + 1]; ++k) ready = std::max(ready, end_[preds[k]]);
    if (i > 0)
      for (int64_t k = cross_offset[c]; k < cross_offset[c + 1]; ++k) ready = std::max(ready, end_prev_[cross[k]]);
    for (int e : edges_into[c]) {
      int p = (int)edge_src[e];
      int ap = g[p];
      double t = transfer(edge_bytes[e], ap, a);
      if (t > 0) {
        double fin = run(ap, heads, a, end_[p], t);
        ready = std::max(ready, fin);
        step_end = std::max(step_end, fin);
      }
    }
    for (int q : pairs_into[c]) {
      int r = (int)pair_record[q];
      int ar = g[r];
      double t = pair_cost(q, ar, a);
      double dep = r < c ? end_[r] : (i > 0 ? end_prev_[r] : 0.0);
      if (t > 0) {
        double fin = run(ar, mask, a, dep, t);
        ready = std::max(ready, fin);
        step_end = std::max(step_end, fin);
      } else {
        ready = std::max(ready, dep);
      }
    }
    double fin = run(a, mask, -1, ready, dur[c]);
    end_[c] = fin;
    return std::max(step_end, fin);
  }

  // Full evaluation, resuming step 0 at call position `resume_from` from the committed snapshots when
  // they are valid. Step 0's state before each call is written to the pending snapshots; commit()
  // adopts them once the evaluated state is accepted.
  double evaluate(const std::vector<int>& g, Eval* out, int resume_from = 0) {
    double overflow = memory(g, out ? &out->peaks : nullptr);
    dur_.resize(n);
    for (int c = 0; c < n; ++c) dur_[c] = duration(g, c);
    if (out) {
      out->durations = dur_;
      out->overflow_bytes = overflow;
      out->feasible = overflow <= 0;
    }
    if (overflow > 0) {
      last_ok_ = false;
      if (out) out->step_time_s = std::numeric_limits<double>::infinity();
      return penalty_ref * (1.0 + overflow / cap);
    }
    snap_free_.resize((size_t)n * D);
    snap_end_.resize((size_t)n * n);
    snap_step_end_.resize(n);
    pend_free_.resize((size_t)n * D);
    pend_end_.resize((size_t)n * n);
    pend_step_end_.resize(n);
    double step_end = 0;
    int c0 = (resume_from > 0 && snap_valid_) ? resume_from : 0;
    if (c0 > 0) {
      std::copy(snap_free_.begin() + (size_t)c0 * D, snap_free_.begin() + (size_t)(c0 + 1) * D, free_.begin());
      std::copy(snap_end_.begin() + (size_t)c0 * n, snap_end_.begin() + (size_t)(c0 + 1) * n, end_.begin());
      step_end = snap_step_end_[c0];
    } else {
      std::fill(free_.begin(), free_.end(), 0.0);
      std::fill(end_.begin(), end_.end(), 0.0);
    }
    std::fill(end_prev_.begin(), end_prev_.end(), 0.0);
    double first_end = 0, last_end = 0;
    if (out) out->step_ends.clear();
    for (int i = 0; i < K; ++i) {
      if (i > 0) {
        std::fill(end_.begin(), end_.end(), 0.0);
        step_end = 0;
      }
      for (int c = (i == 0 ? c0 : 0); c < n; ++c) {
        if (i == 0) {
          std::copy(free_.begin(), free_.end(), pend_free_.begin() + (size_t)c * D);
          std::copy(end_.begin(), end_.end(), pend_end_.begin() + (size_t)c * n);
          pend_step_end_[c] = step_end;
        }
        step_end = std::max(step_end, run_call(g, dur_, i, c));
      }
      if (i == 0) first_end = step_end;
      last_end = step_end;
      if (out) out->step_ends.push_back(step_end);
      end_prev_.swap(end_);
    }
    last_ok_ = true;
    last_c0_ = c0;
    double st = K > 1 ? (last_end - first_end) / (K - 1) : first_end;
    if (out) out->step_time_s = st;
    return st;
  }

  // The last evaluated state was accepted: its step-0 snapshots become the committed ones.
  void commit() {
    if (!last_ok_) {
      snap_valid_ = false;
      return;
    }
    std::copy(pend_free_.begin() + (size_t)last_c0_ * D, pend_free_.end(), snap_free_.begin() + (size_t)last_c0_ * D);
    std::copy(pend_end_.begin() + (size_t)last_c0_ * n, pend_end_.end(), snap_end_.begin() + (size_t)last_c0_ * n);
    std::copy(pend_step_end_.begin() + last_c0_, pend_step_end_.end(), snap_step_end_.begin() + last_c0_);
    snap_valid_ = true;
  }

  std::vector<int> to_global(const std::vector<int>& local) const {
    if ((int)local.size() != n) throw std::invalid_argument("assignment needs one candidate per call");
    std::vector<int> g(n);
    for (int c = 0; c < n; ++c) {
      if (local[c] < 0 || local[c] >= num_candidates(c)) throw std::invalid_argument("candidate index out of range");
      g[c] = (int)cand_offset[c] + local[c];
    }
    return g;
  }

  py::dict simulate_py(const std::vector<int>& local) {
    Eval ev;
    evaluate(to_global(local), &ev);
    py::dict r;
    r["step_time_s"] = ev.step_time_s;
    r["feasible"] = ev.feasible;
    r["overflow_bytes"] = ev.overflow_bytes;
    r["peak_memory_bytes"] = ev.peaks;
    r["call_time_s"] = ev.durations;
    r["step_ends_s"] = ev.step_ends;
    return r;
  }

  // First call position of step 0 whose tasks can change when call c changes candidate.
  int first_affected(const std::vector<int>& g_old, const std::vector<int>& g_new, int c) const {
    int f = c;
    for (int q : pairs_from[c]) f = std::min(f, (int)pair_other[q]);
    for (int o = 0; o < n; ++o) {
      if (o >= f) break;
      if (host_load[g_new[o]] > 0 && duration(g_old, o) != duration(g_new, o)) f = std::min(f, o);
    }
    return f;
  }

  struct AnnealResult {
    std::vector<int> assignment;
    double cost = 0;
    bool feasible = false, timed_out = false;
    int64_t evaluations = 0, accepted = 0, improvements = 0;
    std::vector<double> restart_best;
    double seconds = 0;
  };

  // Best-improvement descent over single calls: every candidate of every call, until no call improves.
  double polish(std::vector<int>& cur, double cur_cost, int64_t* evals, int max_sweeps = 4) {
    std::vector<int> nxt;
    for (int sweep = 0; sweep < max_sweeps; ++sweep) {
      bool improved = false;
      for (int c = 0; c < n; ++c) {
        int best_a = cur[c];
        double best_c = cur_cost;
        nxt = cur;
        for (int a = (int)cand_offset[c]; a < cand_offset[c + 1]; ++a) {
          if (a == cur[c]) continue;
          nxt[c] = a;
          double cost = evaluate(nxt, nullptr, first_affected(cur, nxt, c));
          ++*evals;
          if (cost < best_c - 1e-12) best_c = cost, best_a = a;
        }
        if (best_a != cur[c]) {
          cur[c] = best_a;
          cur_cost = best_c;
          improved = true;
        }
        evaluate(cur, nullptr);
        commit();
      }
      if (!improved) break;
    }
    return cur_cost;
  }

  AnnealResult anneal(const std::vector<int>& init_local, uint64_t seed, int64_t iterations, int restarts,
                      double t0_frac, double t_end_frac, double time_limit_s) {
    using clock = std::chrono::steady_clock;
    auto t_start = clock::now();
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> unif(0.0, 1.0);
    AnnealResult res;
    snap_valid_ = false;
    std::vector<int> cur = to_global(init_local);
    double cur_cost = evaluate(cur, nullptr);
    commit();
    std::vector<int> best = cur;
    double best_cost = cur_cost;
    res.evaluations = 1;
    restarts = std::max(1, restarts);
    int64_t per = std::max<int64_t>(1, iterations / restarts);
    std::vector<int> nxt(n);
    auto elapsed = [&]() { return std::chrono::duration<double>(clock::now() - t_start).count(); };
    auto consider = [&](const std::vector<int>& st, double cost) {
      if (cost < best_cost - 1e-15) {
        best_cost = cost;
        best = st;
        ++res.improvements;
      }
    };
    for (int r = 0; r < restarts && !res.timed_out; ++r) {
      if (r > 0) {
        cur = best;
        if (r % 2 == 0) {  // perturb the best: re-draw half the calls
          for (int k = 0; k < std::max(1, n / 2); ++k) {
            int c = (int)(rng() % (uint64_t)n);
            cur[c] = (int)cand_offset[c] + (int)(rng() % (uint64_t)num_candidates(c));
          }
        }
        cur_cost = evaluate(cur, nullptr);
        commit();
        ++res.evaluations;
      }
      double scale = cur_cost < penalty_ref ? cur_cost : (best_cost < penalty_ref ? best_cost : penalty_ref);
      double T = std::max(t0_frac * scale, 1e-12);
      double T_end = std::max(t_end_frac * scale, 1e-15);
      double alpha = std::pow(T_end / T, 1.0 / (double)std::max<int64_t>(1, per - 1));
      double rbest = cur_cost;
      for (int64_t it = 0; it < per; ++it, T *= alpha) {
        if ((it & 1023) == 0 && time_limit_s > 0 && elapsed() > time_limit_s) {
          res.timed_out = true;
          break;
        }
        int c = (int)(rng() % (uint64_t)n);
        int nc = num_candidates(c);
        if (nc <= 1) continue;
        int lo = (int)cand_offset[c];
        int old_local = cur[c] - lo, new_local = old_local;
        double u = unif(rng);
        const std::vector<int>* nb = nullptr;
        if (u < 0.25) nb = &mesh_nbrs[c][old_local];
        else if (u < 0.5) nb = &shape_nbrs[c][old_local];
        if (nb && !nb->empty()) {
          new_local = (*nb)[rng() % nb->size()];
        } else {
          new_local = (int)(rng() % (uint64_t)(nc - 1));
          if (new_local >= old_local) ++new_local;
        }
        nxt = cur;
        nxt[c] = lo + new_local;
        int from = first_affected(cur, nxt, c);
        if (u >= 0.5 && u < 0.65) {  // move the same-model calls along, to an identical placement
          for (int b : twins[nxt[c]]) {
            int o = 0;
            while (cand_offset[o + 1] <= b) ++o;
            if (unif(rng) < 0.7) {
              nxt[o] = b;
              from = std::min(from, first_affected(cur, nxt, o));
            }
          }
        }
        double cost = evaluate(nxt, nullptr, from);
        ++res.evaluations;
        double delta = cost - cur_cost;
        if (delta <= 0 || unif(rng) < std::exp(-delta / T)) {
          commit();
          cur.swap(nxt);
          cur_cost = cost;
          ++res.accepted;
          consider(cur, cost);
          rbest = std::min(rbest, cost);
        }
      }
      // polish the best state of this restart
      if (!res.timed_out && best_cost < penalty_ref) {
        std::vector<int> p = best;
        double pc = polish(p, best_cost, &res.evaluations);
        consider(p, pc);
        rbest = std::min(rbest, pc);
      }
      res.restart_best.push_back(rbest);
    }
    res.feasible = best_cost < penalty_ref;
    res.assignment.resize(n);
    for (int c = 0; c < n; ++c) res.assignment[c] = best[c] - (int)cand_offset[c];
    res.cost = res.feasible ? best_cost : std::numeric_limits<double>::infinity();
    res.seconds = elapsed();
    return res;
  }

  py::dict anneal_py(const std::vector<int>& init, uint64_t seed, int64_t iterations, int restarts, double t0_frac,
                     double t_end_frac, double time_limit_s) {
    AnnealResult r;
    {
      py::gil_scoped_release release;
      r = anneal(init, seed, iterations, restarts, t0_frac, t_end_frac, time_limit_s);
    }
    py::dict d;
    d["assignment"] = r.assignment;
    d["cost"] = r.cost;
    d["feasible"] = r.feasible;
    d["evaluations"] = r.evaluations;
    d["accepted"] = r.accepted;
    d["improvements"] = r.improvements;
    d["restart_best"] = r.restart_best;
    d["timed_out"] = r.timed_out;
    d["seconds"] = r.seconds;
    return d;
  }

  py::dict brute_force() {
    std::vector<int> local(n, 0);
    double best = std::numeric_limits<double>::infinity();
    std::vector<int> arg;
    int64_t count = 0;
    while (true) {
      Eval ev;
      evaluate(to_global(local), &ev);
      ++count;
      if (ev.feasible && ev.step_time_s < best - 1e-12) best = ev.step_time_s, arg = local;
      int c = 0;
      while (c < n && ++local[c] == num_candidates(c)) local[c++] = 0;
      if (c == n) break;
    }
    py::dict r;
    r["cost"] = best;
    r["assignment"] = arg;
    r["evaluations"] = count;
    return r;
  }

  double penalty() const { return penalty_ref; }

 private:
  int D = 0, K = 1, W = 1, WN = 1, n = 0;
  double cap = 0, intra_bw = 1, intra_lat = 0, inter_bw = 1, inter_lat = 0, penalty_ref = 1;
  std::vector<int64_t> call_role, call_is_train, role_train_call, pred_offset, preds, cross_offset, cross;
  std::vector<int64_t> cand_offset, layout, dp, replicas, mesh_group, shape_group;
  std::vector<double> time_s, mem, mem_shared, state, host_load;
  std::vector<uint64_t> mask, heads, nodes;
  std::vector<int64_t> edge_src, edge_dst, pair_record, pair_other, pair_offset;
  std::vector<double> edge_bytes, pair_time;
  std::vector<std::vector<int>> edges_into, pairs_into, pairs_from;
  std::vector<std::pair<int, int>> trained;
  std::vector<std::vector<std::vector<int>>> mesh_nbrs, shape_nbrs;
  std::vector<std::vector<int>> twins;  // global candidate -> global candidates of same-model calls
  // simulation scratch
  std::vector<double> free_, end_, end_prev_, dur_;
  std::vector<double> snap_free_, snap_end_, snap_step_end_, pend_free_, pend_end_, pend_step_end_;
  bool snap_valid_ = false, last_ok_ = false;
  int last_c0_ = 0;
};

// Fast reallocation estimate (planner/cost_model/realloc.py `_estimate`, line for line): pieces of
// (A stage, A tp rank) overlapping what each B device needs; local copy, else a holder on the same node,
// else the least-loaded holder; time = max over devices of max(in, out) per link + latency per message.
double realloc_estimate(const std::vector<double>& prefix, const std::vector<int64_t>& ranges_a,
                        const std::vector<int64_t>& ranges_b, const std::vector<int64_t>& devs_a,
                        const std::vector<int64_t>& devs_b, int dp_a, int tp_a, int pp_a, int dp_b, int tp_b,
                        int pp_b, int g, double bw_nv, double lat_nv, double bw_ib, double lat_ib,
                        double dtype_bytes) {
  (void)pp_b;
  int64_t max_dev = 0;
  for (auto d : devs_a) max_dev = std::max(max_dev, d);
  for (auto d : devs_b) max_dev = std::max(max_dev, d);
  std::vector<int> coord_a(max_dev + 1, -1);  // device -> sa * tp_a + ra
  std::vector<std::vector<int>> holders(pp_a * tp_a);
  for (size_t i = 0; i < devs_a.size(); ++i) {
    int c = (int)(i / (dp_a * tp_a)) * tp_a + (int)(i % tp_a);
    coord_a[devs_a[i]] = c;
    holders[c].push_back((int)devs_a[i]);
  }
  std::vector<std::vector<std::pair<int, double>>> need_cache((size_t)(ranges_b.size() / 2) * tp_b);
  std::vector<char> need_done(need_cache.size(), 0);
  struct Load { double in_nv = 0, in_ib = 0, out_nv = 0, out_ib = 0; int n_in = 0, n_out = 0; };
  std::vector<Load> load(max_dev + 1);
  std::vector<char> touched(max_dev + 1, 0);
  std::vector<double> sent(max_dev + 1, 0.0);
  for (size_t i = 0; i < devs_b.size(); ++i) {
    int d = (int)devs_b[i];
    int sb = (int)(i / (dp_b * tp_b)), rb = (int)(i % tp_b);
    size_t key = (size_t)sb * tp_b + rb;
    if (!need_done[key]) {
      int64_t lo_b = ranges_b[2 * sb], hi_b = ranges_b[2 * sb + 1];
      for (int sa = 0; sa < pp_a; ++sa) {
        int64_t lo = std::max(ranges_a[2 * sa], lo_b), hi = std::min(ranges_a[2 * sa + 1], hi_b);
        if (lo >= hi) continue;
        double params = prefix[hi] - prefix[lo];
        for (int ra = 0; ra < tp_a; ++ra) {
          double a0 = (double)ra / tp_a, a1 = (double)(ra + 1) / tp_a, b0 = (double)rb / tp_b, b1 = (double)(rb + 1) / tp_b;
          double f = std::max(0.0, std::min(a1, b1) - std::max(a0, b0));
          if (f > 1e-12) need_cache[key].push_back({sa * tp_a + ra, dtype_bytes * params * f});
        }
      }
      need_done[key] = 1;
    }
    int node = d / g;
    int mine = d < (int)coord_a.size() ? coord_a[d] : -1;
    for (auto& pc : need_cache[key]) {
      if (pc.first == mine) continue;
      int src = -1;
      for (int h : holders[pc.first]) {
        if (src < 0) { src = h; continue; }
        bool hc = h / g != node, sc = src / g != node;
        if (hc < sc || (hc == sc && (sent[h] < sent[src] || (sent[h] == sent[src] && h < src)))) src = h;
      }
      sent[src] += pc.second;
      bool cross = src / g != node;
      (cross ? load[d].in_ib : load[d].in_nv) += pc.second;
      (cross ? load[src].out_ib : load[src].out_nv) += pc.second;
      load[d].n_in += 1;
      load[src].n_out += 1;
      touched[d] = touched[src] = 1;
    }
  }
  double worst = 0;
  for (size_t d = 0; d < load.size(); ++d) {
    if (!touched[d]) continue;
    const Load& l = load[d];
    double t_in = std::max(l.in_nv / bw_nv, l.in_ib / bw_ib) + l.n_in * (l.in_ib > 0 ? lat_ib : lat_nv);
    double t_out = std::max(l.out_nv / bw_nv, l.out_ib / bw_ib) + l.n_out * (l.out_ib > 0 ? lat_ib : lat_nv);
    worst = std::max(worst, std::max(t_in, t_out));
  }
  return worst;
}

}  // namespace

PYBIND11_MODULE(_anneal, m) {
  m.doc() = "Step simulator and simulated annealing over flat cost tables (see planner/simulate.py).";
  py::class_<Problem>(m, "Problem")
      .def(py::init<const py::dict&>(), py::arg("tables"))
      .def("simulate", &Problem::simulate_py, py::arg("assignment"))
      .def("anneal", &Problem::anneal_py, py::arg("init"), py::arg("seed") = 0, py::arg("iterations") = 100000,
           py::arg("restarts") = 6, py::arg("t0_frac") = 0.1, py::arg("t_end_frac") = 1e-4,
           py::arg("time_limit_s") = 0.0)
      .def("brute_force", &Problem::brute_force)
      .def_property_readonly("penalty_ref", &Problem::penalty)
      .def_property_readonly("num_calls", &Problem::num_calls);
  m.def("realloc_estimate", &realloc_estimate, "planner.cost_model.realloc._estimate in C++",
        py::arg("prefix"), py::arg("ranges_a"), py::arg("ranges_b"), py::arg("devs_a"), py::arg("devs_b"),
        py::arg("dp_a"), py::arg("tp_a"), py::arg("pp_a"), py::arg("dp_b"), py::arg("tp_b"), py::arg("pp_b"),
        py::arg("g"), py::arg("bw_nv"), py::arg("lat_nv"), py::arg("bw_ib"), py::arg("lat_ib"),
        py::arg("dtype_bytes") = 2.0);
}
