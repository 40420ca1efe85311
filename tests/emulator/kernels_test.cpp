// kernels_test.cpp: runs kernels/*.cu on the CPU emulator (emu.h) and checks every result against
// a host reference written here, in f64, that shares no code with the kernels (its own f16/bf16
// rounding and decoding, its own formulas). Built and run by tests/kernel_emulator.rs, which
// first rewrites the kernels' inline PTX and __shared__ declarations (see emu.h).
//
// The file holds GROUPS, each under `#ifdef EMU_GROUP_<name>` (its kernel includes, entry
// dispatch, tests and a `REGISTER_GROUP(name, body)`). The harness compiles it once per group
// (-DEMU_GROUP_<name>; it finds the names by scanning this file for EMU_GROUP_), in parallel, so
// each binary instantiates only its own kernels, and runs every binary.
//   kernels_test_<group>   prints "<group>: N checks, F failures", "entry points: ..." and
//                          "N passed, F failed"; exit status 1 on any failure.
//   EMU_POLICY=K           pins the schedule policy (emu::Policy) of every launch, to reproduce
//                          a failure.
//
// Groups: core, stats, normalize, backward, fold, sync, fused (ReLU epilogues), conv (conv_direct),
// onchip (the single-pass forward, against the split path and the reference).
// Adding a kernel: a new `#ifdef EMU_GROUP_<name>` section that includes its .cu, declares its
// entry families with DISPATCH, launches them with emu_launch through launch_<family>, and
// compares with a host reference (README.md).
#include "emu.h"

// Each group's kernels, first: they see nothing of the harness below.
#ifdef EMU_GROUP_core
#include "common.cuh"
#endif
#ifdef EMU_GROUP_stats
#include "bn_stats.cu"
#endif
#ifdef EMU_GROUP_normalize
#include "bn_normalize.cu"
#endif
#ifdef EMU_GROUP_backward
#include "bn_backward.cu"
#endif
#ifdef EMU_GROUP_fold
#include "bn_fold.cu"
#endif
#ifdef EMU_GROUP_sync
#include "bn_sync.cu"
#include "bn_stats.cu"
#endif
#ifdef EMU_GROUP_fused
#include "bn_normalize.cu"
#include "bn_backward.cu"
#endif
#ifdef EMU_GROUP_conv
#include "conv_direct.cu"
#endif
#ifdef EMU_GROUP_onchip
#include "bn_onchip.cu"
#include "bn_normalize.cu"
#include "bn_stats.cu"
#endif

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <type_traits>

typedef unsigned long long u64;
typedef unsigned int u32;

// ---- checks -------------------------------------------------------------------------------------
static int g_fail = 0;
static long long g_checks = 0;
#define CHECK(cond, ...)                                      \
  do {                                                        \
    ++g_checks;                                               \
    if (!(cond)) {                                            \
      if (g_fail < 60) {                                      \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
        std::printf(__VA_ARGS__);                             \
        std::printf("\n");                                    \
      }                                                       \
      ++g_fail;                                               \
    }                                                         \
  } while (0)

// ---- cases: case k's launches get schedule policies k, k+1, ... (mod emu::Policy::Count) -------
static unsigned g_case = 0;
static void begin_case() { emu::g.launches = g_case++; }
static std::string policies_tag() { return std::string(" [last launch: ") + emu::policy_name(emu::last_policy()) + "]"; }

// ---- host number formats (independent of the kernels' Dtype) -------------------------------------
template <class T> struct Fmt;
template <> struct Fmt<float> {
  typedef u32 Raw;
  static constexpr int P = 24, EMIN = -126, EMAX = 127;
  static constexpr const char* name = "f32";
};
template <> struct Fmt<__half> {
  typedef unsigned short Raw;
  static constexpr int P = 11, EMIN = -14, EMAX = 15;
  static constexpr const char* name = "f16";
};
template <> struct Fmt<__nv_bfloat16> {
  typedef unsigned short Raw;
  static constexpr int P = 8, EMIN = -126, EMAX = 127;
  static constexpr const char* name = "bf16";
};
template <class T> using Raw = typename Fmt<T>::Raw;
template <class T> constexpr int VEC = 16 / (int)sizeof(Raw<T>);  // ABI: elements per 16-byte vector
template <class I> const char* iname() { return sizeof(I) == 8 ? "i64" : "i32"; }

// Round x to T, to nearest even, once (subnormals and overflow to Inf included).
template <class T> double round_to(double x) {
  if (!std::isfinite(x) || x == 0) return x;
  const int e = std::max(std::ilogb(x), Fmt<T>::EMIN);
  const double q = std::ldexp(1.0, e - (Fmt<T>::P - 1));
  const double r = std::nearbyint(x / q) * q;
  const double maxv = std::ldexp(2.0 - std::ldexp(1.0, 1 - Fmt<T>::P), Fmt<T>::EMAX);
  return std::fabs(r) > maxv ? std::copysign(INFINITY, x) : r;
}
// Spacing of T at |x|.
template <class T> double ulp_of(double x) {
  const int e = x == 0 || !std::isfinite(x) ? Fmt<T>::EMIN : std::max(std::ilogb(x), Fmt<T>::EMIN);
  return std::ldexp(1.0, e - (Fmt<T>::P - 1));
}
template <class T> double decode(Raw<T> r) {
  if constexpr (std::is_same_v<T, float>) {
    float f;
    std::memcpy(&f, &r, 4);
    return f;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const u32 u = (u32)r << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    const int e = (r >> 10) & 31, m = r & 1023;
    const double s = (r & 0x8000) ? -1.0 : 1.0;
    if (e == 31) return m ? NAN : s * INFINITY;
    return s * (e == 0 ? std::ldexp((double)m, -24) : std::ldexp(1024.0 + m, e - 25));
  }
}
// Bits of v, which must be representable in T (round_to first).
template <class T> Raw<T> encode(double v) {
  if constexpr (std::is_same_v<T, float>) {
    const float f = (float)v;
    u32 u;
    std::memcpy(&u, &f, 4);
    return u;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const float f = (float)v;
    u32 u;
    std::memcpy(&u, &f, 4);
    return (Raw<T>)(std::isnan(v) ? 0x7fc0 : u >> 16);
  } else {
    const unsigned short s = std::signbit(v) ? 0x8000 : 0;
    const double a = std::fabs(v);
    if (std::isnan(v)) return 0x7e00;
    if (std::isinf(v)) return s | 0x7c00;
    if (a < std::ldexp(1.0, -14)) return s | (unsigned short)(a * std::ldexp(1.0, 24));
    const int e = std::ilogb(a);
    return s | (unsigned short)((e + 15) << 10) | (unsigned short)(std::ldexp(a, 10 - e) - 1024.0);
  }
}
template <class T> Raw<T> to_raw(double v) { return encode<T>(round_to<T>(v)); }

// ---- groups ---------------------------------------------------------------------------------------
struct Group {
  const char* name;
  void (*body)();
};
static std::vector<Group>& groups() {
  static std::vector<Group> g;
  return g;
}
struct RegisterGroup {
  RegisterGroup(const char* name, void (*body)()) { groups().push_back({name, body}); }
};
#define REGISTER_GROUP(name, body) static RegisterGroup register_##name(#name, body)

// ---- entry dispatch (records which entry points the run exercised) ------------------------------
static std::set<std::string> g_entries;
// call_<fam><T, I>(p) calls bn_<fam>_<dtype>_<index>(p); launch_<fam><T, I>(grid, block, p) launches it.
#define DISPATCH(fam, P)                                                                                  \
  template <class T, class I> void call_##fam(const P& p) {                                               \
    constexpr bool w = sizeof(I) == 8;                                                                    \
    if constexpr (std::is_same_v<T, float>) w ? bn_##fam##_f32_i64(p) : bn_##fam##_f32_i32(p);             \
    else if constexpr (std::is_same_v<T, __half>) w ? bn_##fam##_f16_i64(p) : bn_##fam##_f16_i32(p);       \
    else w ? bn_##fam##_bf16_i64(p) : bn_##fam##_bf16_i32(p);                                              \
  }                                                                                                       \
  template <class T, class I> void launch_##fam(dim3 grid, dim3 block, const P& p) {                      \
    g_entries.insert(std::string("bn_" #fam "_") + Fmt<T>::name + "_" + iname<I>());                     \
    emu_launch(grid, block, [&] { call_##fam<T, I>(p); });                                                \
  }
typedef float F;
typedef __half H;
typedef __nv_bfloat16 B;

// ---- tensors ------------------------------------------------------------------------------------
struct Shape {
  u64 outer, C, inner;
  u64 numel() const { return outer * C * inner; }
  u64 idx(u64 o, u64 c, u64 i) const { return (o * C + c) * inner + i; }
  u64 m() const { return outer * inner; }
};

// A tensor inside a larger allocation: `off` guard elements before it (misaligned data when odd),
// 16 after, all holding `guard`, so writes outside the tensor are seen.
template <class T> struct Buf {
  std::vector<Raw<T>> v;
  size_t off, n;
  Raw<T> guard;
  Buf(size_t n_, size_t off_, Raw<T> guard_) : v(n_ + off_ + 16, guard_), off(off_), n(n_), guard(guard_) {}
  Raw<T>* p() { return v.data() + off; }
  Raw<T>& operator[](size_t i) { return v[off + i]; }
  double at(size_t i) const { return decode<T>(v[off + i]); }
  bool guards_intact() const {
    for (size_t i = 0; i < v.size(); ++i)
      if ((i < off || i >= off + n) && v[i] != guard) return false;
    return true;
  }
};

// x(o, c, i) = mu + c/2 + sigma * N(0, 1), rounded to T; channel const_ch holds one value; one
// element of channel bad_ch (the last) holds bad_val (NaN or Inf).
template <class T> void gen(Buf<T>& x, const Shape& s, std::mt19937& rng, double mu, double sigma, int const_ch = -1, int bad_ch = -1,
                            double bad_val = NAN) {
  std::normal_distribution<double> nd(0.0, 1.0);
  for (u64 o = 0; o < s.outer; ++o)
    for (u64 c = 0; c < s.C; ++c)
      for (u64 i = 0; i < s.inner; ++i)
        x[s.idx(o, c, i)] = to_raw<T>((int)c == const_ch ? mu + 3.3 : mu + 0.5 * (double)c + sigma * nd(rng));
  if (bad_ch >= 0) x[s.idx(s.outer - 1, (u64)bad_ch, s.inner - 1)] = to_raw<T>(bad_val);
}

struct RefStats {
  std::vector<double> mean, var;  // biased variance
};
template <class T> RefStats ref_stats(const Buf<T>& x, const Shape& s) {
  RefStats r;
  for (u64 c = 0; c < s.C; ++c) {
    double sum = 0, ss = 0;
    for (u64 o = 0; o < s.outer; ++o)
      for (u64 i = 0; i < s.inner; ++i) sum += x.at(s.idx(o, c, i));
    const double mean = sum / (double)s.m();
    for (u64 o = 0; o < s.outer; ++o)
      for (u64 i = 0; i < s.inner; ++i) ss += (x.at(s.idx(o, c, i)) - mean) * (x.at(s.idx(o, c, i)) - mean);
    r.mean.push_back(mean);
    r.var.push_back(ss / (double)s.m());
  }
  return r;
}

// Launch shapes. Planar reductions: grid (splits, gy); planar maps: grid (blocks); rows
// reductions: grid (ceil(C / (bx*VEC)), splits), block (bx, 256/bx); rows maps: grid
// (ceil(P / (bx*VEC)), row blocks) over super-rows of P values (map_width).
struct Cfg {
  bool rows;
  unsigned grid;  // planar reductions: splits; planar maps: blocks; rows: grid y (splits / row blocks)
  unsigned gy;    // planar reductions: grid y (< C: each block row loops over channels)
  unsigned bx;    // rows: block x
};
template <class T> dim3 rows_grid(u64 C, const Cfg& cfg) {
  return dim3((unsigned)((C + (u64)cfg.bx * VEC<T> - 1) / ((u64)cfg.bx * VEC<T>)), cfg.grid);
}
// ABI: the rows maps walk super-rows of P = min(lcm(C, 32*VEC), numel rounded up to 32) values.
template <class T> u64 map_width(const Shape& s) {
  return std::min<u64>(std::lcm(s.C, (u64)(32 * VEC<T>)), (s.numel() + 31) / 32 * 32);
}
template <class T> dim3 map_grid(const Shape& s, const Cfg& cfg) { return rows_grid<T>(map_width<T>(s), cfg); }
// launch::rows_block: the next power of two of the columns, at most 32.
static unsigned bx_for(u64 width, int vec) {
  const u64 cols = (width + vec - 1) / vec;
  u64 b = 1;
  while (b < cols) b <<= 1;
  return (unsigned)std::min<u64>(b, 32);
}
// Semaphores of a split reduction (launch::semaphores): one per channel (planar) or channel tile
// (rows), and one more per tile and merge group when the rows merge takes two levels.
template <class T> size_t sem_count(u64 C, const Cfg& cfg) {
  if (!cfg.rows) return C;
  const u64 tiles = rows_grid<T>(C, cfg).x, run = (u64)bn::kMergeRun * (256 / cfg.bx);
  const u64 groups = (cfg.grid + run - 1) / run;
  return std::max<u64>(C, groups > 1 ? tiles * (1 + groups) : tiles);
}
static std::string cfg_tag(const Cfg& c) {
  char b[80];
  if (c.rows) std::snprintf(b, sizeof b, "rows bx=%u grid.y=%u", c.bx, c.grid);
  else std::snprintf(b, sizeof b, "planar grid=(%u,%u)", c.grid, c.gy);
  return b;
}
static std::string shape_tag(const Shape& s) {
  char b[80];
  std::snprintf(b, sizeof b, "[%llu,%llu,%llu]", s.outer, s.C, s.inner);
  return b;
}
static constexpr float kEps = 1e-5f;
static constexpr double kU32 = 0x1p-24;  // unit roundoff of f32

// =================================================================================================
#ifdef EMU_GROUP_stats
DISPATCH(stats_planar, StatsParams)
DISPATCH(stats_rows, StatsParams)

struct StatsCase {
  size_t misalign = 0;
  double mu = 0, sigma = 1;
  int const_ch = -1, bad_ch = -1;
  double bad_val = NAN;
  bool twice = false;   // a second launch on the same workspace (semaphores must be back to zero)
  bool running = true;  // running stats given (else null)
  int unbiased = 1;
};

template <class T, class I> void test_stats(const Shape& s, const Cfg& cfg, const StatsCase& k, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  Buf<T> x(s.numel(), k.misalign, to_raw<T>(-5.0));
  gen(x, s, rng, k.mu, k.sigma, k.const_ch, k.bad_ch, k.bad_val);
  const Buf<T> x0 = x;
  const u64 C = s.C;
  std::vector<float> partials(C * cfg.grid * 3, NAN), mean(C, NAN), mean_lo(C, NAN), invstd(C, NAN), rm(C), rv(C);
  std::vector<u32> sem(sem_count<T>(C, cfg), 0);
  for (u64 c = 0; c < C; ++c) {
    rm[c] = 0.25f * (float)c;
    rv[c] = 1.0f + (float)c;
  }
  StatsParams p{};
  p.x = x.p();
  p.partials = partials.data();
  p.semaphores = sem.data();
  p.save_mean = mean.data();
  p.save_mean_lo = mean_lo.data();
  p.save_invstd = invstd.data();
  p.running_mean = k.running ? rm.data() : nullptr;
  p.running_var = k.running ? rv.data() : nullptr;
  p.g = {s.outer, s.C, s.inner};
  p.eps = kEps;
  p.factor = 0.1f;
  p.unbiased = k.unbiased;
  p.splits = (int)cfg.grid;
  std::string tag = std::string("stats ") + Fmt<T>::name + " " + iname<I>() + " " + shape_tag(s) + " " + cfg_tag(cfg) +
                    " misalign=" + std::to_string(k.misalign) + " mu=" + std::to_string(k.mu);
  emu::g_launch_tag = tag;
  const int launches = k.twice ? 2 : 1;
  std::vector<float> first;  // the first launch's statistics: the second (another schedule) must repeat them
  for (int l = 0; l < launches; ++l) {
    if (cfg.rows) launch_stats_rows<T, I>(rows_grid<T>(C, cfg), dim3(cfg.bx, 256 / cfg.bx), p);
    else launch_stats_planar<T, I>(dim3(cfg.grid, cfg.gy), dim3(256), p);
    if (l == 0) {
      first = mean;
      first.insert(first.end(), mean_lo.begin(), mean_lo.end());
      first.insert(first.end(), invstd.begin(), invstd.end());
    }
  }
  if (launches > 1) {
    std::vector<float> again = mean;
    again.insert(again.end(), mean_lo.begin(), mean_lo.end());
    again.insert(again.end(), invstd.begin(), invstd.end());
    CHECK(std::memcmp(first.data(), again.data(), first.size() * sizeof(float)) == 0,
          "%s: a second launch gave other statistics bits (not deterministic)", tag.c_str());
  }
  tag += policies_tag();
  const RefStats ref = ref_stats(x, s);
  const double m = (double)s.m();
  const double var_tol = k.mu > 100 ? 2e-6 : 1e-5;  // ABI: mean 1000, std 0.1: variance to ~1e-6
  CHECK(std::equal(x.v.begin(), x.v.end(), x0.v.begin()), "%s: the input was modified", tag.c_str());
  for (size_t i = C; i < sem.size(); ++i) CHECK(sem[i] == 0, "%s: merge semaphore %zu = %u", tag.c_str(), i, sem[i]);
  for (u64 c = 0; c < C; ++c) {
    CHECK(sem[c] == 0, "%s: semaphore %llu = %u after the launch", tag.c_str(), c, sem[c]);
    if ((int)c == k.bad_ch) {
      CHECK(std::isnan(mean[c]) || std::isnan(invstd[c]), "%s: channel %llu holds %g but its statistics are %g %g", tag.c_str(), c,
            k.bad_val, mean[c], invstd[c]);
      continue;
    }
    const double sd = std::sqrt(ref.var[c]);
    // save_mean + save_mean_lo holds the mean to a fraction of the spread whatever the offset;
    // save_mean is its f32 rounding (PyTorch's saved mean).
    const double pair = (double)mean[c] + (double)mean_lo[c];
    CHECK(mean[c] == (float)pair, "%s: mean[%llu] %.9g is not the rounding of mean + mean_lo", tag.c_str(), c, mean[c]);
    CHECK(std::fabs(pair - ref.mean[c]) <= 1e-5 * sd + 1e-30, "%s: mean + mean_lo [%llu] %.12g, reference %.12g", tag.c_str(), c, pair,
          ref.mean[c]);
    const double inv_ref = 1.0 / std::sqrt(ref.var[c] + (double)kEps);
    CHECK(std::fabs(invstd[c] - inv_ref) <= var_tol * inv_ref, "%s: invstd[%llu] %.9g, reference %.9g (rel %.3g)", tag.c_str(), c,
          invstd[c], inv_ref, std::fabs(invstd[c] - inv_ref) / inv_ref);
    if ((int)c == k.const_ch) {  // ABI: a constant channel gives mean == x exactly
      CHECK(mean[c] == x.at(s.idx(0, c, 0)) && mean_lo[c] == 0.f, "%s: constant channel: mean %.9g + %.3g != %.9g", tag.c_str(), mean[c],
            mean_lo[c], x.at(s.idx(0, c, 0)));
      CHECK(invstd[c] == (float)(1.0 / std::sqrt((double)kEps)), "%s: constant channel: invstd %.9g", tag.c_str(), invstd[c]);
    }
    if (!k.running) continue;
    double rm_ref = 0.25 * (double)c, rv_ref = 1.0 + (double)c;
    const double batch_var = k.unbiased ? ref.var[c] * m / (m - 1) : ref.var[c];
    for (int l = 0; l < launches; ++l) {
      rm_ref = 0.1 * ref.mean[c] + 0.9 * rm_ref;
      rv_ref = 0.1 * batch_var + 0.9 * rv_ref;
    }
    CHECK(std::fabs(rm[c] - rm_ref) <= 2e-6 * (std::fabs(rm_ref) + sd) + 1e-7, "%s: running_mean[%llu] %.9g, reference %.9g", tag.c_str(), c,
          rm[c], rm_ref);
    CHECK(std::fabs(rv[c] - rv_ref) <= var_tol * rv_ref + 1e-7, "%s: running_var[%llu] %.9g, reference %.9g", tag.c_str(), c, rv[c], rv_ref);
  }
}

static void stats_group() {
    // Planar (inner > 1): tails (inner % 32*VEC != 0), scalar path (inner % VEC != 0 or
    // misaligned), one and many splits, more splits than units, gy < C (channel loop).
    // Packed units (inner <= 16*VEC: G = 32*VEC / inner planes per unit): 7x7, 5x5, 3x3, 1x2
    // and 4x4 planes (gathered scalar slots; 4x4 aligned: vectors), planes just below and at
    // 16*VEC (63, 64 for f32; 127, 128 for 16-bit types) and just past it (65, 129: chunked),
    // outer not a multiple of G (a partial last unit), more warps than units.
    struct P {
      Shape s;
      unsigned splits, gy;
    };
    const P ps[] = {{{2, 3, 5}, 1, 3},   {{1, 1, 2}, 3, 1},   {{3, 2, 257}, 2, 2},    {{2, 5, 1024}, 3, 2}, {{4, 3, 1000}, 5, 3},
                    {{1, 17, 33}, 1, 17}, {{5, 1, 4097}, 7, 1}, {{2, 2, 31}, 4, 1},   {{3, 4, 7}, 2, 4},    {{2, 3, 2}, 2, 3},
                    {{1, 2, 20000}, 6, 2}, {{300, 2, 3}, 3, 2}, {{3, 2, 2000}, 600, 2},
                    {{23, 3, 49}, 1, 3},  {{23, 3, 49}, 3, 2},  {{41, 2, 25}, 4, 2},  {{37, 2, 9}, 2, 2},   {{259, 2, 2}, 2, 2},
                    {{19, 3, 16}, 2, 3},  {{7, 2, 63}, 2, 2},   {{7, 2, 64}, 1, 2},   {{3, 2, 65}, 2, 2},   {{5, 2, 127}, 2, 1},
                    {{5, 2, 128}, 3, 2},  {{3, 2, 129}, 1, 2},  {{9, 2, 196}, 2, 2}};
    unsigned seed = 100;
    for (const P& q : ps) {
      const Cfg cfg{false, q.splits, q.gy, 0};
      const int cc = q.s.C > 1 ? 1 : -1, nc = q.s.C > 2 ? 2 : -1;
      test_stats<F, u32>(q.s, cfg, {.misalign = 0, .const_ch = cc, .bad_ch = nc, .twice = true}, ++seed);
      test_stats<F, u32>(q.s, cfg, {.misalign = 1, .const_ch = cc, .bad_ch = nc, .bad_val = INFINITY}, ++seed);
      test_stats<H, u32>(q.s, cfg, {.misalign = 0, .const_ch = cc}, ++seed);
      test_stats<H, u64>(q.s, cfg, {.misalign = 1, .const_ch = cc, .bad_ch = nc, .running = false}, ++seed);
      test_stats<B, u64>(q.s, cfg, {.misalign = 0, .const_ch = cc, .unbiased = 0}, ++seed);
      test_stats<B, u32>(q.s, cfg, {.misalign = 1, .const_ch = cc, .bad_ch = nc}, ++seed);
      test_stats<F, u64>(q.s, cfg, {.misalign = 0, .mu = 1000, .sigma = 0.1}, ++seed);  // large mean, small spread
    }
    // Rows (inner == 1): every block width, C % VEC != 0 (masked scalar), C < one column, many
    // column blocks, one and many splits.
    struct Q {
      Shape s;
      unsigned bx, splits;
    };
    const Q qs[] = {{{7, 3, 1}, 32, 1},     {{100, 17, 1}, 8, 3},    {{64, 32, 1}, 4, 2},   {{33, 1001, 1}, 64, 2}, {{1000, 8, 1}, 1, 4},
                    {{5, 1, 1}, 256, 1},    {{300, 64, 1}, 16, 3},   {{2, 3, 1}, 2, 2},     {{513, 40, 1}, 32, 5},  {{5000, 4, 1}, 1, 8},
                    {{9, 2048, 1}, 256, 2}, {{50, 24, 1}, 128, 2},
                    // Two-level merges (splits > kMergeRun * by): uneven last group, empty splits.
                    {{300, 256, 1}, 32, 200}, {{2000, 24, 1}, 8, 300},  {{700, 40, 1}, 32, 130}};
    for (const Q& q : qs) {
      const Cfg cfg{true, q.splits, 0, q.bx};
      const int cc = q.s.C > 1 ? 1 : -1, nc = q.s.C > 2 ? 2 : -1;
      test_stats<F, u32>(q.s, cfg, {.misalign = 0, .const_ch = cc, .bad_ch = nc, .twice = true}, ++seed);
      test_stats<F, u32>(q.s, cfg, {.misalign = 1, .const_ch = cc, .bad_ch = nc, .bad_val = -INFINITY}, ++seed);
      test_stats<H, u32>(q.s, cfg, {.misalign = 0, .const_ch = cc, .bad_ch = nc}, ++seed);
      test_stats<H, u64>(q.s, cfg, {.misalign = 1, .const_ch = cc, .running = false}, ++seed);
      test_stats<B, u64>(q.s, cfg, {.misalign = 0, .const_ch = cc, .unbiased = 0}, ++seed);
      test_stats<B, u32>(q.s, cfg, {.misalign = 1, .const_ch = cc, .bad_ch = nc, .bad_val = INFINITY}, ++seed);
      test_stats<F, u64>(q.s, cfg, {.misalign = 0, .mu = 1000, .sigma = 0.1}, ++seed);
    }
}
REGISTER_GROUP(stats, stats_group);
#endif  // EMU_GROUP_stats

// =================================================================================================
#ifdef EMU_GROUP_normalize
DISPATCH(normalize_planar, NormalizeParams)
DISPATCH(normalize_rows, NormalizeParams)

struct MapCase {
  size_t mis_x = 0, mis_y = 0;
  bool inplace = false, stat_is_var = false, affine = true;
  int bad_ch = -1;  // one NaN input element in this channel (last element)
  double mu = 2.0, sigma = 1.5;
};

template <class T, class I> void test_normalize(const Shape& s, const Cfg& cfg, const MapCase& k, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  const int const_ch = s.C > 1 ? 1 : -1;
  Buf<T> x(s.numel(), k.mis_x, to_raw<T>(-12345.0));
  gen(x, s, rng, k.mu, k.sigma, const_ch, k.bad_ch);
  Buf<T> y(s.numel(), k.mis_y, to_raw<T>(-12345.0));
  const Buf<T> x0 = x;
  const RefStats ref = ref_stats(x, s);
  std::vector<float> mean(s.C), mean_lo(s.C, 0.f), st(s.C), w(s.C), b(s.C);
  for (u64 c = 0; c < s.C; ++c) {
    // any statistics will do (finite ones for the NaN channel: the NaN must stay in its element);
    // the constant channel gets its exact mean (ABI: then y == bias exactly); batch statistics
    // (invstd) come with a double-float mean, mean + mean_lo
    const bool finite = std::isfinite(ref.mean[c]);
    mean[c] = (int)c == const_ch ? (float)x.at(s.idx(0, c, 0)) : finite ? (float)(ref.mean[c] + 0.01) : (float)(k.mu + 0.5 * c);
    if (finite && (int)c != const_ch && !k.stat_is_var) mean_lo[c] = (float)(ref.mean[c] + 0.01 - (double)mean[c]);
    const double var = finite ? ref.var[c] + 0.1 : 1.0;
    st[c] = k.stat_is_var ? (float)var : (float)(1.0 / std::sqrt(var + (double)kEps));
    w[c] = 0.5f + 0.1f * (float)(c % 7);
    b[c] = -1.0f + 0.3f * (float)(c % 11);
  }
  NormalizeParams p{};
  p.x = x.p();
  p.y = k.inplace ? (void*)x.p() : (void*)y.p();
  p.mean = mean.data();
  p.mean_lo = k.stat_is_var ? nullptr : mean_lo.data();
  p.var_or_invstd = st.data();
  p.weight = k.affine ? w.data() : nullptr;
  p.bias = k.affine ? b.data() : nullptr;
  p.g = {s.outer, s.C, s.inner};
  p.eps = kEps;
  p.stat_is_var = k.stat_is_var;
  std::string tag = std::string("normalize ") + Fmt<T>::name + " " + iname<I>() + " " + shape_tag(s) + " " + cfg_tag(cfg) +
                    " misalign=" + std::to_string(k.mis_x) + "/" + std::to_string(k.mis_y) + (k.inplace ? " in-place" : "") +
                    (k.stat_is_var ? " var" : " invstd") + (k.affine ? " affine" : "");
  emu::g_launch_tag = tag;
  if (cfg.rows) launch_normalize_rows<T, I>(map_grid<T>(s, cfg), dim3(cfg.bx, 256 / cfg.bx), p);
  else launch_normalize_planar<T, I>(dim3(cfg.grid), dim3(256), p);
  tag += policies_tag();
  const Buf<T>& out = k.inplace ? x : y;
  CHECK(out.guards_intact(), "%s: write outside the output tensor", tag.c_str());
  if (!k.inplace) CHECK(std::equal(x.v.begin(), x.v.end(), x0.v.begin()), "%s: the input was modified", tag.c_str());
  int bad = 0;
  for (u64 o = 0; o < s.outer; ++o)
    for (u64 c = 0; c < s.C; ++c)
      for (u64 i = 0; i < s.inner; ++i) {
        const u64 e = s.idx(o, c, i);
        const double xv = x0.at(e), got = out.at(e);
        const double invstd = k.stat_is_var ? 1.0 / std::sqrt((double)st[c] + (double)kEps) : (double)st[c];
        const double a = (k.affine ? (double)w[c] : 1.0) * invstd, bb = k.affine ? (double)b[c] : 0.0;
        const double d = xv - ((double)mean[c] + (double)mean_lo[c]);
        const double want = d * a + bb;
        bool ok;
        if (std::isnan(xv)) ok = std::isnan(got);
        else if ((int)c == const_ch) ok = got == round_to<T>(bb);
        else ok = std::fabs(got - want) <= 8 * kU32 * (std::fabs(d * a) + std::fabs(bb)) + ulp_of<T>(want);
        ++g_checks;
        if (!ok && bad++ < 3)
          CHECK(false, "%s: y[%llu] (o=%llu c=%llu i=%llu) = %.8g, reference %.8g", tag.c_str(), e, o, c, i, got, want);
      }
}

static void normalize_group() {
    struct P {
      Shape s;
      unsigned blocks;
    };
    // The flat walk: numel % VEC == 0 with planes that are not (7x7, 14x14, 3x3, planes smaller
    // than a vector: several channels in one vector, C = 1) take the 16-byte path when aligned.
    const P ps[] = {{{2, 3, 5}, 1},   {{3, 2, 257}, 2}, {{2, 5, 1024}, 3}, {{1, 17, 33}, 4},
                    {{5, 2, 4097}, 7}, {{3, 4, 7}, 100}, {{2, 3, 2}, 2},    {{4, 3, 256}, 1},
                    {{2, 4, 49}, 3},   {{3, 8, 9}, 2},   {{2, 16, 196}, 5}, {{2, 4, 3}, 1},
                    {{8, 1, 49}, 2},   {{1, 6, 4}, 100}};
    unsigned seed = 200;
    for (const P& q : ps) {
      const Cfg cfg{false, q.blocks, 0, 0};
      const int nc = q.s.C > 2 ? 2 : -1;
      test_normalize<F, u32>(q.s, cfg, {.mis_x = 0, .mis_y = 0, .stat_is_var = false, .bad_ch = nc}, ++seed);
      test_normalize<F, u64>(q.s, cfg, {.mis_x = 1, .mis_y = 0, .stat_is_var = true}, ++seed);
      test_normalize<H, u32>(q.s, cfg, {.mis_x = 0, .mis_y = 1, .stat_is_var = true, .affine = false}, ++seed);
      test_normalize<H, u64>(q.s, cfg, {.mis_x = 1, .mis_y = 1, .inplace = true, .stat_is_var = false, .bad_ch = nc}, ++seed);
      test_normalize<B, u64>(q.s, cfg, {.mis_x = 0, .mis_y = 0, .inplace = true, .stat_is_var = true}, ++seed);
      test_normalize<B, u32>(q.s, cfg, {.mis_x = 1, .mis_y = 1, .stat_is_var = false}, ++seed);
    }
    // ABI: not x*a + b with b = bias - mean*a (that cancels for large means)
    test_normalize<F, u32>({2, 3, 64}, {false, 2, 0, 0}, {.mu = 1000, .sigma = 0.1}, ++seed);
    test_normalize<F, u32>({64, 8, 1}, {true, 2, 0, 2}, {.mu = 1000, .sigma = 0.1}, ++seed);
    struct Q {
      Shape s;
      unsigned bx, row_blocks;
    };
    // Super-rows (P = lcm(C, 32*VEC)): C % VEC != 0 takes the 16-byte path when numel % VEC == 0
    // and aligned; partial last super-rows; numel % VEC != 0 (1665, 7710); shorter than P (7710).
    const Q qs[] = {{{7, 3, 1}, 32, 1},    {{100, 17, 1}, 8, 3},  {{64, 32, 1}, 4, 2},   {{33, 1001, 1}, 64, 2},
                    {{1000, 8, 1}, 1, 4},  {{5, 1, 1}, 256, 1},   {{300, 64, 1}, 16, 3}, {{9, 2048, 1}, 256, 2},
                    {{300, 3, 1}, 32, 2},  {{333, 5, 1}, 16, 3},  {{70, 100, 1}, 32, 3}, {{30, 257, 1}, 32, 1},
                    {{1000, 1, 1}, 32, 2}, {{300, 7, 1}, 8, 2},   {{100, 12, 1}, 32, 1}};
    for (const Q& q : qs) {
      const Cfg cfg{true, q.row_blocks, 0, q.bx};
      const int nc = q.s.C > 2 ? 2 : -1;
      test_normalize<F, u32>(q.s, cfg, {.mis_x = 0, .mis_y = 0, .stat_is_var = false, .bad_ch = nc}, ++seed);
      test_normalize<F, u64>(q.s, cfg, {.mis_x = 1, .mis_y = 0, .stat_is_var = true}, ++seed);
      test_normalize<H, u64>(q.s, cfg, {.mis_x = 0, .mis_y = 1, .stat_is_var = true, .affine = false}, ++seed);
      test_normalize<H, u32>(q.s, cfg, {.mis_x = 1, .mis_y = 1, .inplace = true, .stat_is_var = false, .bad_ch = nc}, ++seed);
      test_normalize<B, u32>(q.s, cfg, {.mis_x = 0, .mis_y = 0, .inplace = true, .stat_is_var = true}, ++seed);
      test_normalize<B, u64>(q.s, cfg, {.mis_x = 1, .mis_y = 1, .stat_is_var = false}, ++seed);
    }
}
REGISTER_GROUP(normalize, normalize_group);
#endif  // EMU_GROUP_normalize

// =================================================================================================
#ifdef EMU_GROUP_backward
DISPATCH(backward_reduce_planar, BackwardReduceParams)
DISPATCH(backward_reduce_rows, BackwardReduceParams)
DISPATCH(backward_dx_planar, BackwardElementwiseParams)
DISPATCH(backward_dx_rows, BackwardElementwiseParams)

struct BackwardCase {
  size_t misalign = 0;
  bool stat_is_var = false, accumulate = false, coef = true, grads = true;
  bool offset = false;  // x: mean 1000, std 0.1 (else 1, 2)
};

// The statistics the backward kernels read: any mean (statistics of another batch, or eval's
// running mean) will do; batch statistics (invstd) come as a double-float mean + mean_lo.
static void backward_stats(const RefStats& ref, bool stat_is_var, std::vector<float>& mean, std::vector<float>& mean_lo,
                           std::vector<float>& st) {
  for (size_t c = 0; c < mean.size(); ++c) {
    const double m = ref.mean[c] + 0.01;
    mean[c] = (float)m;
    mean_lo[c] = stat_is_var ? 0.f : (float)(m - (double)mean[c]);
    st[c] = stat_is_var ? (float)ref.var[c] : (float)(1.0 / std::sqrt(ref.var[c] + (double)kEps));
  }
}

template <class T, class I> void test_backward_reduce(const Shape& s, const Cfg& cfg, const BackwardCase& k, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  Buf<T> x(s.numel(), k.misalign, 0), dy(s.numel(), k.misalign, 0);
  gen(x, s, rng, k.offset ? 1000.0 : 1.0, k.offset ? 0.1 : 2.0);
  gen(dy, s, rng, 0.1, 1.0);
  const RefStats ref = ref_stats(x, s);
  const u64 C = s.C;
  const double m = (double)s.m();
  std::vector<float> mean(C), mean_lo(C), st(C), dw(C, 0.5f), db(C, -0.25f), coef(2 * C, NAN), partials(C * cfg.grid * 2, NAN);
  std::vector<u32> sem(sem_count<T>(C, cfg), 0);
  backward_stats(ref, k.stat_is_var, mean, mean_lo, st);
  BackwardReduceParams r{};
  r.x = x.p();
  r.dy = dy.p();
  r.mean = mean.data();
  r.mean_lo = k.stat_is_var ? nullptr : mean_lo.data();
  r.var_or_invstd = st.data();
  r.partials = partials.data();
  r.semaphores = sem.data();
  r.dweight = k.grads ? dw.data() : nullptr;
  r.dbias = k.grads ? db.data() : nullptr;
  r.coef = k.coef ? coef.data() : nullptr;
  r.g = {s.outer, s.C, s.inner};
  r.eps = kEps;
  r.stat_is_var = k.stat_is_var;
  r.accumulate = k.accumulate;
  r.splits = (int)cfg.grid;
  std::string tag = std::string("backward reduce ") + Fmt<T>::name + " " + iname<I>() + " " + shape_tag(s) + " " + cfg_tag(cfg) +
                    " misalign=" + std::to_string(k.misalign) + (k.stat_is_var ? " var" : " invstd") + (k.accumulate ? " accumulate" : "") +
                    (k.coef ? " coef" : "") + (k.grads ? " grads" : "") + (k.offset ? " offset" : "");
  emu::g_launch_tag = tag;
  if (cfg.rows) launch_backward_reduce_rows<T, I>(rows_grid<T>(C, cfg), dim3(cfg.bx, 256 / cfg.bx), r);
  else launch_backward_reduce_planar<T, I>(dim3(cfg.grid, cfg.gy), dim3(256), r);
  tag += policies_tag();
  std::vector<double> sdy(C, 0), sdx(C, 0), sabs(C, 0);
  for (u64 o = 0; o < s.outer; ++o)
    for (u64 c = 0; c < C; ++c)
      for (u64 i = 0; i < s.inner; ++i) {
        const u64 e = s.idx(o, c, i);
        const double gv = dy.at(e), xv = x.at(e);
        const double xc = xv - ((double)mean[c] + (double)mean_lo[c]);
        sdy[c] += gv;
        sdx[c] += gv * xc;
        sabs[c] += std::fabs(gv) * (std::fabs(xc) + 1);
      }
  for (size_t i = C; i < sem.size(); ++i) CHECK(sem[i] == 0, "%s: merge semaphore %zu = %u", tag.c_str(), i, sem[i]);
  for (u64 c = 0; c < C; ++c) {
    CHECK(sem[c] == 0, "%s: semaphore %llu = %u after the launch", tag.c_str(), c, sem[c]);
    const double invstd = k.stat_is_var ? 1.0 / std::sqrt((double)st[c] + (double)kEps) : (double)st[c];
    const double tol_b = 4e-6 * sabs[c] + 1e-5, tol_w = tol_b * invstd;
    if (k.grads) {
      const double gw = sdx[c] * invstd + (k.accumulate ? 0.5 : 0), gb = sdy[c] + (k.accumulate ? -0.25 : 0);
      CHECK(std::fabs(dw[c] - gw) <= tol_w, "%s: dweight[%llu] %.9g, reference %.9g", tag.c_str(), c, dw[c], gw);
      CHECK(std::fabs(db[c] - gb) <= tol_b, "%s: dbias[%llu] %.9g, reference %.9g", tag.c_str(), c, db[c], gb);
    } else {
      CHECK(dw[c] == 0.5f && db[c] == -0.25f, "%s: gradients written though null", tag.c_str());
    }
    if (k.coef) {
      CHECK(std::fabs(coef[2 * c] - sdy[c] / m) <= tol_b / m, "%s: coef[%llu][0] %.9g, reference %.9g", tag.c_str(), c, coef[2 * c], sdy[c] / m);
      CHECK(std::fabs(coef[2 * c + 1] - sdx[c] * invstd / m) <= tol_w / m, "%s: coef[%llu][1] %.9g, reference %.9g", tag.c_str(), c,
            coef[2 * c + 1], sdx[c] * invstd / m);
    } else {
      CHECK(std::isnan(coef[2 * c]) && std::isnan(coef[2 * c + 1]), "%s: coef written though null", tag.c_str());
    }
  }
}

struct DxCase {
  size_t misalign = 0;
  bool stat_is_var = false, train = true, alias = false, weight = true;
  bool offset = false;  // x: mean 1000, std 0.1 (else 1, 2)
};

template <class T, class I> void test_backward_dx(const Shape& s, const Cfg& cfg, const DxCase& k, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  const Raw<T> guard = to_raw<T>(-777.0);
  Buf<T> x(s.numel(), k.misalign, guard), dy(s.numel(), k.misalign, guard), dx(s.numel(), k.misalign, guard);
  gen(x, s, rng, k.offset ? 1000.0 : 1.0, k.offset ? 0.1 : 2.0);
  gen(dy, s, rng, 0.1, 1.0);
  const Buf<T> dy0 = dy, x0 = x;
  const RefStats ref = ref_stats(x, s);
  const u64 C = s.C;
  std::vector<float> mean(C), mean_lo(C), st(C), w(C), coef(2 * C);
  backward_stats(ref, k.stat_is_var, mean, mean_lo, st);
  for (u64 c = 0; c < C; ++c) {
    w[c] = 0.7f + 0.05f * (float)(c % 13);
    coef[2 * c] = 0.03f * (float)(c % 7) - 0.1f;  // the dx pass takes any (sum dy / m, sum dy*xhat / m)
    coef[2 * c + 1] = 0.2f - 0.02f * (float)(c % 11);
  }
  BackwardElementwiseParams e{};
  e.x = k.train ? (const void*)x.p() : nullptr;  // eval: x is not read
  e.dy = dy.p();
  e.dx = k.alias ? (void*)dy.p() : (void*)dx.p();
  e.mean = mean.data();
  e.mean_lo = k.stat_is_var ? nullptr : mean_lo.data();
  e.var_or_invstd = st.data();
  e.weight = k.weight ? w.data() : nullptr;
  e.coef = k.train ? coef.data() : nullptr;
  e.g = {s.outer, s.C, s.inner};
  e.eps = kEps;
  e.stat_is_var = k.stat_is_var;
  std::string tag = std::string("backward dx ") + Fmt<T>::name + " " + iname<I>() + " " + shape_tag(s) + " " + cfg_tag(cfg) +
                    " misalign=" + std::to_string(k.misalign) + (k.stat_is_var ? " var" : " invstd") + (k.train ? " train" : " eval") +
                    (k.alias ? " dx=dy" : "") + (k.weight ? " weight" : "") + (k.offset ? " offset" : "");
  emu::g_launch_tag = tag;
  if (cfg.rows) launch_backward_dx_rows<T, I>(map_grid<T>(s, cfg), dim3(cfg.bx, 256 / cfg.bx), e);
  else launch_backward_dx_planar<T, I>(dim3(cfg.grid), dim3(256), e);
  tag += policies_tag();
  const Buf<T>& out = k.alias ? dy : dx;
  CHECK(out.guards_intact(), "%s: write outside dx", tag.c_str());
  CHECK(std::equal(x.v.begin(), x.v.end(), x0.v.begin()), "%s: x was modified", tag.c_str());
  if (!k.alias) CHECK(std::equal(dy.v.begin(), dy.v.end(), dy0.v.begin()), "%s: dy was modified", tag.c_str());
  int bad = 0;
  for (u64 o = 0; o < s.outer; ++o)
    for (u64 c = 0; c < C; ++c)
      for (u64 i = 0; i < s.inner; ++i) {
        const u64 el = s.idx(o, c, i);
        const double invstd = k.stat_is_var ? 1.0 / std::sqrt((double)st[c] + (double)kEps) : (double)st[c];
        const double scale = (k.weight ? (double)w[c] : 1.0) * invstd;
        const double g = dy0.at(el), xv = x0.at(el), got = out.at(el);
        double want, terms;
        if (k.train) {
          const double proj = (xv - ((double)mean[c] + (double)mean_lo[c])) * (double)coef[2 * c + 1] * invstd;
          want = (g - (double)coef[2 * c] - proj) * scale;
          terms = (std::fabs(g) + std::fabs((double)coef[2 * c]) + std::fabs(proj)) * std::fabs(scale);
        } else {
          want = g * scale;
          terms = std::fabs(want);
        }
        ++g_checks;
        if (!(std::fabs(got - want) <= 8 * kU32 * terms + ulp_of<T>(want)) && bad++ < 3)
          CHECK(false, "%s: dx[%llu] (o=%llu c=%llu i=%llu) = %.8g, reference %.8g", tag.c_str(), el, o, c, i, got, want);
      }
}

static void backward_group() {
    struct P {
      Shape s;
      unsigned splits, gy, blocks;
    };
    // Packed planar units as in the stats group: 7x7, 5x5, 3x3, 1x2, 4x4 (vectors), at and
    // around 16*VEC, partial last units, one and many splits.
    const P ps[] = {{{2, 3, 5}, 1, 3, 1},   {{3, 2, 257}, 2, 1, 3},  {{2, 5, 1024}, 3, 5, 2},
                    {{1, 17, 33}, 2, 9, 5}, {{5, 2, 4097}, 7, 2, 9}, {{2, 3, 2}, 2, 3, 2},
                    {{2, 4, 49}, 2, 4, 3},  {{3, 8, 9}, 1, 5, 2},    {{2, 8, 196}, 3, 8, 5},
                    {{2, 4, 3}, 2, 2, 1},   {{23, 3, 49}, 3, 2, 3},  {{23, 3, 49}, 1, 3, 2},
                    {{41, 2, 25}, 4, 2, 2}, {{37, 2, 9}, 2, 2, 2},   {{259, 2, 2}, 3, 2, 2},
                    {{19, 3, 16}, 2, 3, 2}, {{7, 2, 63}, 2, 2, 2},   {{7, 2, 64}, 1, 2, 2},
                    {{5, 2, 127}, 2, 2, 2}, {{5, 2, 128}, 3, 1, 2}, {{9, 2, 196}, 2, 2, 2}};
    unsigned seed = 300;
    for (const P& q : ps) {
      const Cfg red{false, q.splits, q.gy, 0}, map{false, q.blocks, 0, 0};
      test_backward_reduce<F, u32>(q.s, red, {.misalign = 0}, ++seed);
      test_backward_reduce<F, u64>(q.s, red, {.misalign = 1, .stat_is_var = true, .accumulate = true}, ++seed);
      test_backward_reduce<H, u32>(q.s, red, {.misalign = 1, .stat_is_var = true, .accumulate = true, .coef = false}, ++seed);
      test_backward_reduce<H, u64>(q.s, red, {.misalign = 0, .grads = false}, ++seed);
      test_backward_reduce<B, u64>(q.s, red, {.misalign = 0, .accumulate = true}, ++seed);
      test_backward_reduce<B, u32>(q.s, red, {.misalign = 1, .stat_is_var = true}, ++seed);
      test_backward_dx<F, u32>(q.s, map, {.misalign = 0}, ++seed);
      test_backward_dx<F, u64>(q.s, map, {.misalign = 1, .stat_is_var = true, .train = false}, ++seed);
      test_backward_dx<H, u32>(q.s, map, {.misalign = 1, .stat_is_var = true, .alias = true}, ++seed);
      test_backward_dx<H, u64>(q.s, map, {.misalign = 0, .train = false, .alias = true, .weight = false}, ++seed);
      test_backward_dx<B, u64>(q.s, map, {.misalign = 0, .stat_is_var = true}, ++seed);
      test_backward_dx<B, u32>(q.s, map, {.misalign = 1, .weight = false}, ++seed);
    }
    // A large mean next to the spread: x - mean formed with mean + mean_lo in both passes.
    test_backward_reduce<F, u32>({3, 2, 257}, {false, 2, 1, 0}, {.offset = true}, ++seed);
    test_backward_reduce<F, u32>({64, 8, 1}, {true, 2, 0, 2}, {.offset = true}, ++seed);
    test_backward_dx<F, u32>({3, 2, 257}, {false, 3, 0, 0}, {.offset = true}, ++seed);
    test_backward_dx<F, u64>({64, 8, 1}, {true, 2, 0, 2}, {.misalign = 1, .offset = true}, ++seed);
    struct Q {
      Shape s;
      unsigned bx, splits, row_blocks;
    };
    const Q qs[] = {{{7, 3, 1}, 32, 1, 1},     {{100, 17, 1}, 8, 3, 2}, {{64, 32, 1}, 4, 2, 5}, {{33, 1001, 1}, 64, 2, 1},
                    {{1000, 8, 1}, 1, 4, 3},   {{5, 1, 1}, 256, 1, 1},  {{9, 2048, 1}, 256, 2, 2},
                    {{300, 256, 1}, 32, 200, 3}, {{2000, 24, 1}, 8, 300, 2},
                    // Super-rows for dx (see normalize_group).
                    {{300, 3, 1}, 1, 2, 2},    {{333, 5, 1}, 2, 3, 1},  {{70, 100, 1}, 32, 2, 3}, {{30, 257, 1}, 32, 1, 1},
                    {{1000, 1, 1}, 1, 4, 2},   {{300, 7, 1}, 2, 2, 2},  {{100, 12, 1}, 4, 3, 1}};
    for (const Q& q : qs) {
      const Cfg red{true, q.splits, 0, q.bx}, map{true, q.row_blocks, 0, q.bx}, map32{true, q.row_blocks, 0, 32};
      test_backward_reduce<F, u32>(q.s, red, {.misalign = 0}, ++seed);
      test_backward_reduce<F, u64>(q.s, red, {.misalign = 1, .stat_is_var = true, .accumulate = true}, ++seed);
      test_backward_reduce<H, u32>(q.s, red, {.misalign = 1, .stat_is_var = true, .accumulate = true, .coef = false}, ++seed);
      test_backward_reduce<H, u64>(q.s, red, {.misalign = 0, .grads = false}, ++seed);
      test_backward_reduce<B, u64>(q.s, red, {.misalign = 0, .accumulate = true}, ++seed);
      test_backward_reduce<B, u32>(q.s, red, {.misalign = 1, .stat_is_var = true}, ++seed);
      test_backward_dx<F, u32>(q.s, map, {.misalign = 0}, ++seed);
      test_backward_dx<F, u64>(q.s, map, {.misalign = 1, .stat_is_var = true, .train = false}, ++seed);
      test_backward_dx<H, u32>(q.s, map32, {.misalign = 1, .stat_is_var = true, .alias = true}, ++seed);
      test_backward_dx<H, u64>(q.s, map, {.misalign = 0, .train = false, .alias = true, .weight = false}, ++seed);
      test_backward_dx<B, u64>(q.s, map32, {.misalign = 0, .stat_is_var = true}, ++seed);
      test_backward_dx<B, u32>(q.s, map, {.misalign = 1, .weight = false}, ++seed);
    }
}
REGISTER_GROUP(backward, backward_group);
#endif  // EMU_GROUP_backward

// =================================================================================================
#ifdef EMU_GROUP_fold
// ABI: computed in double, rounded once to T, so the result is exact: the same double formula here.
template <class T>
void test_fold(const char* layout, u64 c_out, u64 numel, u64 group_stride, u64 inner_stride, u64 cpg, bool conv_bias, bool affine,
               bool inplace, unsigned blocks, const std::function<u64(u64)>& chan_of) {
  begin_case();
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> ud(-2, 2);
  std::vector<Raw<T>> w(numel), wo(numel + 8, to_raw<T>(-9.0)), cb(c_out), bo(c_out + 8, to_raw<T>(-9.0));
  for (auto& v : w) v = to_raw<T>(ud(rng));
  for (auto& v : cb) v = to_raw<T>(ud(rng));
  std::vector<float> bw(c_out), bb(c_out), rm(c_out), rv(c_out);
  for (u64 o = 0; o < c_out; ++o) {
    bw[o] = (float)ud(rng);
    bb[o] = (float)ud(rng);
    rm[o] = (float)ud(rng);
    rv[o] = 0.1f + (float)std::fabs(ud(rng));
  }
  const std::vector<Raw<T>> win = w;
  FoldParams p{};
  p.weight_in = w.data();
  p.weight_out = inplace ? (void*)w.data() : (void*)wo.data();
  p.conv_bias = conv_bias ? cb.data() : nullptr;
  p.bias_out = bo.data();
  p.bn_weight = affine ? bw.data() : nullptr;
  p.bn_bias = affine ? bb.data() : nullptr;
  p.running_mean = rm.data();
  p.running_var = rv.data();
  p.numel = numel;
  p.c_out = c_out;
  p.group_stride = group_stride;
  p.inner_stride = inner_stride;
  p.c_out_per_group = cpg;
  p.eps = kEps;
  std::string tag = std::string("fold ") + Fmt<T>::name + " " + layout + " blocks=" + std::to_string(blocks) + (inplace ? " in-place" : "") +
                    (conv_bias ? " conv_bias" : "") + (affine ? " affine" : "");
  emu::g_launch_tag = tag;
  g_entries.insert(std::string("bn_fold_") + Fmt<T>::name);
  emu_launch(dim3(blocks), dim3(256), [&] {
    if constexpr (std::is_same_v<T, float>) bn_fold_f32(p);
    else if constexpr (std::is_same_v<T, __half>) bn_fold_f16(p);
    else bn_fold_bf16(p);
  });
  tag += policies_tag();
  const auto& out = inplace ? w : wo;
  auto scale = [&](u64 o) { return (affine ? (double)bw[o] : 1.0) / std::sqrt((double)rv[o] + (double)kEps); };
  int bad = 0;
  for (u64 i = 0; i < numel; ++i) {
    const u64 o = chan_of(i);
    const double want = round_to<T>(decode<T>(win[i]) * scale(o)), got = decode<T>(out[i]);
    ++g_checks;
    if (got != want && bad++ < 3) CHECK(false, "%s: weight[%llu] (channel %llu) %.9g, reference %.9g", tag.c_str(), i, o, got, want);
  }
  for (u64 o = 0; o < c_out; ++o) {
    const double want = round_to<T>(std::fma((conv_bias ? decode<T>(cb[o]) : 0.0) - (double)rm[o], scale(o), affine ? (double)bb[o] : 0.0));
    CHECK(decode<T>(bo[o]) == want, "%s: bias[%llu] %.9g, reference %.9g", tag.c_str(), o, decode<T>(bo[o]), want);
  }
  for (u64 i = c_out; i < bo.size(); ++i) CHECK(bo[i] == to_raw<T>(-9.0), "%s: write past bias_out", tag.c_str());
  if (!inplace)
    for (u64 i = numel; i < wo.size(); ++i) CHECK(wo[i] == to_raw<T>(-9.0), "%s: write past weight_out", tag.c_str());
}

// ABI: one rounding from double. Weight and bias whose double results lie just past a midpoint
// of T (1 + h + tiny, h half an ulp at 1): one rounding gives 1 + 2h; rounding through f32
// first gives the midpoint exactly, which ties down to 1 (an input a random test meets about
// once in 16,000 products).
template <class T> void test_fold_halfway() {
  begin_case();
  const double h = std::ldexp(1.0, -Fmt<T>::P);
  const std::vector<Raw<T>> w{to_raw<T>(1.0)};
  std::vector<Raw<T>> bo(1, to_raw<T>(-9.0)), wo(1, to_raw<T>(-9.0));
  const float past = (float)(1.0 + h), rm = -std::ldexp(1.0f, -40), rv = 1.0f - std::ldexp(1.0f, -24);
  FoldParams p{};
  p.weight_in = w.data();
  p.weight_out = wo.data();
  p.bias_out = bo.data();
  p.bn_weight = &past;
  p.bn_bias = &past;
  p.running_mean = &rm;
  p.running_var = &rv;
  p.numel = 1;
  p.c_out = 1;
  p.group_stride = 1;
  p.inner_stride = 1;
  p.c_out_per_group = 1;
  p.eps = std::ldexp(1.0f, -30);
  const std::string tag = std::string("fold half-way ") + Fmt<T>::name;
  emu::g_launch_tag = tag;
  emu_launch(dim3(1), dim3(256), [&] {
    if constexpr (std::is_same_v<T, __half>) bn_fold_f16(p);
    else bn_fold_bf16(p);
  });
  const double s = (double)past / std::sqrt((double)rv + (double)p.eps);
  const double exact[2] = {s, std::fma(-(double)rm, s, (double)past)};
  for (double e : exact) {  // the inputs do what they are for
    CHECK(round_to<T>(e) == 1.0 + 2 * h && round_to<T>(round_to<float>(e)) == 1.0, "%s: inputs not past a midpoint", tag.c_str());
  }
  CHECK(decode<T>(wo[0]) == 1.0 + 2 * h, "%s: weight %.9g, want %.9g", tag.c_str(), decode<T>(wo[0]), 1.0 + 2 * h);
  CHECK(decode<T>(bo[0]) == 1.0 + 2 * h, "%s: bias %.9g, want %.9g", tag.c_str(), decode<T>(bo[0]), 1.0 + 2 * h);
}

static void fold_group() {
    test_fold_halfway<H>();
    test_fold_halfway<B>();
    // conv [C_out=6, C_in/g=4, k=3] (grouped and depthwise convs have the same layout)
    auto conv = [](u64 i) { return i / 12; };
    test_fold<F>("conv", 6, 72, 72, 12, 6, true, true, false, 1, conv);
    test_fold<H>("conv", 6, 72, 72, 12, 6, false, true, true, 2, conv);
    test_fold<B>("conv", 6, 72, 72, 12, 6, true, false, false, 1, conv);
    // linear [C_out=5, in=7]
    test_fold<B>("linear", 5, 35, 35, 7, 5, true, true, true, 3, [](u64 i) { return i / 7; });
    // conv-transpose [C_in=4, C_out/g=3, K=5], groups 2: C_out = 6
    auto convt = [](u64 i) { return i / 30 * 3 + (i / 5) % 3; };
    test_fold<F>("conv-transpose g=2", 6, 60, 30, 5, 3, true, true, false, 1, convt);
    test_fold<H>("conv-transpose g=2", 6, 60, 30, 5, 3, false, false, true, 2, convt);
    // channels-last conv-transpose weight [C_in=4, K=5, C_out/g=3], groups 2
    auto convt_cl = [](u64 i) { return i / 30 * 3 + i % 3; };
    test_fold<H>("conv-transpose channels-last g=2", 6, 60, 30, 1, 3, true, true, false, 1, convt_cl);
    test_fold<B>("conv-transpose channels-last g=2", 6, 60, 30, 1, 3, true, true, true, 2, convt_cl);
    // conv-transpose groups 1 [C_in=3, C_out=4, K=2]
    test_fold<F>("conv-transpose g=1", 4, 24, 24, 2, 4, true, true, false, 1, [](u64 i) { return (i / 2) % 4; });
    // more biases than threads in the grid: c_out = 700, one block
    test_fold<F>("linear c_out=700", 700, 1400, 1400, 2, 700, true, true, false, 1, [](u64 i) { return i / 2; });
    test_fold<H>("linear c_out=700", 700, 1400, 1400, 2, 700, false, true, true, 2, [](u64 i) { return i / 2; });
}
REGISTER_GROUP(fold, fold_group);
#endif  // EMU_GROUP_fold

// =================================================================================================
#ifdef EMU_GROUP_core
// Numerics of the shared helpers (device functions called directly on the host).
static void test_helpers() {
  begin_case();
  std::mt19937 rng(3);
  std::uniform_int_distribution<u32> ub;
  auto bits = [](float f) { u32 u; std::memcpy(&u, &f, 4); return u; };
  auto from_bits = [](u32 u) { float f; std::memcpy(&f, &u, 4); return f; };
  // invsqrt_rn is ptxas's own sqrt.rn and rcp.rn fast paths, exact with the hardware's MUFU
  // (common.cuh): checked with correctly rounded MUFU results, and with rsqrt results below and
  // rcp results above the exact value as far as the PTX ISA's bounds allow, on every mantissa of
  // both exponent parities ([1, 4): every other binade pair runs the same sequence scaled by a
  // power of 4), on the scaled range below 2^-100, the specials and a million random patterns.
  for (double ulp : {0.0, 2.0}) {
    g_ulp_rcp = ulp;
    g_ulp_rsq = -ulp;
    int bad = 0, pushed_rcp = 0, pushed_rsq = 0;
    for (int i = 0; i < 1000; ++i) {  // the pushes happen (about half the rcp results, most rsqrt ones)
      const float x = 1.0f + (float)i / 337.0f;
      pushed_rcp += emu_ptx_rcp_approx_ftz_f32(x) != (float)(1.0 / x);
      pushed_rsq += emu_ptx_rsqrt_approx_ftz_f32(x) != (float)(1.0 / std::sqrt((double)x));
    }
    CHECK(ulp == 0 ? pushed_rcp + pushed_rsq == 0 : pushed_rcp > 300 && pushed_rsq > 600, "MUFU pushes of up to %g ulp: %d rcp, %d rsqrt of 1000",
          ulp, pushed_rcp, pushed_rsq);
    auto one = [&](float x) {
      const float got = bn::invsqrt_rn(x), want = 1.0f / std::sqrt(x);  // the spec: IEEE sqrt, then IEEE division
      const bool ok = (std::isnan(want) && std::isnan(got)) || bits(got) == bits(want);
      ++g_checks;
      if (!ok && bad++ < 5) CHECK(false, "invsqrt_rn(%a) = %a, reference %a (MUFU pushed up to %g ulp)", x, got, want, ulp);
    };
    for (u32 u = bits(1.0f); u < bits(4.0f); ++u) one(from_bits(u));
    for (u32 u = 1; u < bits(0x1p-99f); u += 97) one(from_bits(u));
    for (int i = 0; i < 1000000; ++i) one(from_bits(ub(rng)));
    for (float x : {0.f, -0.f, INFINITY, -INFINITY, NAN, 1e-45f, 1e-40f, 1.17549435e-38f, 0x1p-100f, 0x1p-101f, 0x1.fffffep-101f,
                    3.4028235e38f, 1.f, 4.f, 1e-5f})
      one(x);
  }
  {  // the other direction is not safe, even within the bounds: an rsqrt pushed up
    g_ulp_rcp = 0;
    g_ulp_rsq = 2;
    const float x = 0x1.f82294p+0f;
    CHECK(bits(bn::invsqrt_rn(x)) != bits(1.0f / std::sqrt(x)), "invsqrt_rn(%a) exact with a high rsqrt: the emulator's bound changed?", x);
  }
  for (double ulp : {0.0, 1.0, -1.0, 2.0, -2.0}) {
    g_ulp_rcp = ulp;
    int bad = 0;
    // div_count: within an ulp of IEEE a / b, exact for n / n
    for (int i = 0; i < 100000; ++i) {
      const float b = (float)(1 + ub(rng) % (1u << 24)), a = (float)(ub(rng) % (1u << 24));
      const double want = (double)a / (double)b, got = bn::div_count(a, b);
      ++g_checks;
      if (!(std::fabs(got - want) <= std::ldexp(1.0, std::ilogb((float)want) - 23)) && bad++ < 5)
        CHECK(false, "div_count(%g, %g) = %a, reference %a (ulp error %g)", a, b, got, want, ulp);
    }
    for (float n : {1.f, 2.f, 3.f, 7.f, 1000.f, 16777215.f}) CHECK(bn::div_count(n, n) == 1.0f, "div_count(n, n) != 1 for %g (ulp %g)", n, ulp);
  }
  for (double ulp : {0.0, 1.0}) {
    g_ulp_rcp = ulp;
    for (int i = 0; i < 500000; ++i) {  // div_d rounded to f32 == the f32 quotient of f32 operands
      const float a = std::fabs(from_bits(ub(rng) & 0x7effffffu)), b = (float)(2 + ub(rng) % (1u << 30));
      const float got = (float)bn::div_d((double)a, (double)b), want = (float)((double)a / (double)b);
      ++g_checks;
      if (bits(got) != bits(want)) CHECK(false, "div_d(%a, %a) = %a, reference %a", a, b, got, want);
    }
    std::mt19937_64 r(9);
    for (int i = 0; i < 300000; ++i) {  // Bessel factor m/(m-1) and 1/m as PyTorch (double, then f32)
      const u64 m = i < 100000 ? (u64)i + 2 : 2 + (r() >> (r() % 62));
      const float got = (float)bn::div_d((double)m, (double)(m - 1)), want = (float)((double)m / (double)(m - 1));
      const float gi = (float)bn::div_d(1.0, (double)m), wi = (float)(1.0 / (double)m);
      g_checks += 2;
      if (got != want) CHECK(false, "div_d bessel m=%llu: %a, reference %a", m, got, want);
      if (gi != wi) CHECK(false, "div_d 1/m m=%llu: %a, reference %a", m, gi, wi);
    }
    for (u64 m : {(1ull << 24), (1ull << 24) + 1, (1ull << 24) + 2, (1ull << 29) + 1, (1ull << 40) + 1})
      CHECK((float)bn::div_d((double)m, (double)(m - 1)) == (float)((double)m / (double)(m - 1)), "div_d bessel edge m=%llu", m);
  }
  g_ulp_rcp = 1;  // the defaults (emu.h)
  g_ulp_rsq = -1;
  std::mt19937_64 r64(5);
  for (int i = 0; i < 100000; ++i) {  // udiv / umod: the 32-bit path and the long division
    u64 a = r64() >> (r64() % 64), b = (r64() >> (r64() % 64)) | 1;
    if (i % 3 == 0) b = 1 + r64() % 1000;
    CHECK(bn::udiv(a, b) == a / b && bn::umod(a, b) == a % b, "udiv/umod(%llu, %llu)", a, b);
  }
}

// ---- the emulator's own guarantees (a kernel with a bug of each kind must be caught) ------------
// Each thread writes its slot of shared memory and reads its neighbour's: without the barrier,
// every schedule policy makes some thread read its neighbour's slot before it is written.
template <bool BARRIER> void neighbour_kernel(u32* out) {
  static u32 sm[256];
  static emu::SharedRegion reg(sm, sizeof sm);
  const unsigned t = threadIdx.x;
  sm[t] = t * 3u;
  if (BARRIER) __syncthreads();
  out[blockIdx.x * 256 + t] = sm[(t + 1) % 256];
}
// Expects the launch to be reported as an emulator error (and keeps the report quiet).
template <class K> bool emulator_refuses(K kernel, dim3 grid, dim3 block) {
  const int e = emu::g_errors;
  emu::g_quiet = true;
  emu_launch(grid, block, kernel);
  emu::g_quiet = false;
  const bool refused = emu::g_errors > e;
  emu::g_errors = e;
  return refused;
}
static void test_emulator_itself() {
  begin_case();
  emu::g_launch_tag = "emulator self-test";
  for (int policy = 0; policy < (int)emu::Policy::Count; ++policy) {
    const char* name = emu::policy_name((emu::Policy)policy);
    std::vector<u32> out(2 * 256);
    bool racy_ok = true, synced_ok = true;
    emu::g.launches = (u64)policy;
    emu_launch(dim3(2), dim3(256), [&] { neighbour_kernel<false>(out.data()); });
    for (unsigned i = 0; i < out.size(); ++i) racy_ok &= out[i] == (i % 256 + 1) % 256 * 3u;
    emu::g.launches = (u64)policy;
    emu_launch(dim3(2), dim3(256), [&] { neighbour_kernel<true>(out.data()); });
    for (unsigned i = 0; i < out.size(); ++i) synced_ok &= out[i] == (i % 256 + 1) % 256 * 3u;
    CHECK(synced_ok, "emulator: a correct kernel with __syncthreads failed under the %s policy", name);
    CHECK(!racy_ok, "emulator: a missing __syncthreads went unnoticed under the %s policy", name);
  }
  // Misuse is an emulator error, never a hang.
  CHECK(emulator_refuses([] { if (threadIdx.x < 128) __syncthreads(); }, dim3(1), dim3(256)),
        "emulator: a __syncthreads skipped by half the block was not reported");
  CHECK(emulator_refuses([] { if (threadIdx.x % 32 < 16) (void)__shfl_down_sync(0xffffffffu, 1.0f, 1); }, dim3(1), dim3(64)),
        "emulator: a full-mask shuffle reached by half a warp was not reported");
  CHECK(emulator_refuses([] { (void)__shfl_down_sync(0xffffu, 1.0f, 1); }, dim3(1), dim3(32)),
        "emulator: a shuffle mask without the calling lane was not reported");
  CHECK(emulator_refuses([] { if (threadIdx.x % 2) (void)__ballot_sync(0xffffffffu, 1); else (void)__shfl_sync(0xffffffffu, 1, 0); },
                         dim3(1), dim3(32)),
        "emulator: lanes at different collectives were not reported");
  CHECK(emulator_refuses([] {}, dim3(1, 65536), dim3(256)), "emulator: gridDim.y > 65535 was not refused");
  // Collectives: shuffles (down, up with width, xor, idx with width, 64-bit values), ballot,
  // __syncthreads_count, and partial masks: groups of 8 lanes that run different numbers of
  // xor-shuffle rounds (as rows do when a warp holds several rows).
  std::vector<long long> got(64 * 7);
  emu_launch(dim3(1), dim3(64), [&] {
    const unsigned t = threadIdx.x, l = t % 32;
    const long long v = (long long)t * 1000000007LL;
    got[t * 7 + 0] = __shfl_down_sync(0xffffffffu, v, 3);
    got[t * 7 + 1] = __shfl_up_sync(0xffffffffu, v, 2, 8);
    got[t * 7 + 2] = __shfl_xor_sync(0xffffffffu, v, 5);
    got[t * 7 + 3] = __shfl_sync(0xffffffffu, v, 7, 16);
    got[t * 7 + 4] = __syncthreads_count(t % 3 == 0);
    got[t * 7 + 5] = __ballot_sync(0xffffffffu, t % 2);
    const unsigned group = 0xffu << (l & ~7u);
    unsigned acc = l;
    for (unsigned round = 0; round <= l / 8; ++round)
      for (unsigned off = 4; off > 0; off >>= 1) acc += __shfl_xor_sync(group, acc, off);
    got[t * 7 + 6] = acc;
  });
  bool ok = true;
  for (unsigned t = 0; t < 64; ++t) {
    const unsigned l = t % 32, w = t - l;
    auto v = [](unsigned s) { return (long long)s * 1000000007LL; };
    ok &= got[t * 7 + 0] == v(l + 3 < 32 ? t + 3 : t);
    ok &= got[t * 7 + 1] == v(l % 8 >= 2 ? t - 2 : t);
    ok &= got[t * 7 + 2] == v(w + (l ^ 5));
    ok &= got[t * 7 + 3] == v(w + l / 16 * 16 + 7);
    ok &= got[t * 7 + 4] == 22;
    ok &= got[t * 7 + 5] == (long long)0xaaaaaaaau;
    std::vector<long long> a(8);  // the butterfly of lane l's group, l/8 + 1 times
    for (unsigned k = 0; k < 8; ++k) a[k] = (l & ~7u) + k;
    for (unsigned round = 0; round <= l / 8; ++round)
      for (unsigned off = 4; off > 0; off >>= 1) {
        std::vector<long long> b = a;
        for (unsigned k = 0; k < 8; ++k) b[k] = a[k] + a[k ^ off];
        a = b;
      }
    ok &= got[t * 7 + 6] == (long long)(u32)a[l % 8];
  }
  CHECK(ok, "emulator: warp collectives or __syncthreads_count computed wrong values");
}

// ---- cooperative launches and bn::grid_barrier --------------------------------------------------
// Every block publishes a value, passes the barrier, sums all blocks' values, passes it again
// (the counter's second use) and overwrites its value; its static and dynamic shared memory
// must survive the switches to other blocks. SKIP: the last block leaves before the barrier.
template <bool SKIP> void grid_kernel(unsigned* counter, u32* vals, u32* out) {
  static u32 sm[256];
  static emu::SharedRegion reg(sm, sizeof sm);
  u32* dyn = static_cast<u32*>(emu::dynamic_shared());
  const unsigned nb = gridDim.x * gridDim.y, b = blockIdx.y * gridDim.x + blockIdx.x;
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  sm[t] = b * 1000u + t;
  dyn[t] = b * 7u + t;
  if (t == 0) vals[b] = b + 1u;
  if (SKIP && b == nb - 1) return;
  bn::grid_barrier(counter, nb);
  u32 sum = 0;
  for (unsigned i = 0; i < nb; ++i) sum += vals[i];
  bn::grid_barrier(counter, nb);
  if (t == 0) vals[b] = 0;
  out[b * 256 + t] = sum * 4u + (sm[t] == b * 1000u + t) + (dyn[t] == b * 7u + t ? 2u : 0u);
}
template <class K> bool cooperative_refused(K kernel, dim3 grid, dim3 block, size_t dyn, bool cooperative = true) {
  const int e = emu::g_errors;
  emu::g_quiet = true;
  if (cooperative) emu_launch_cooperative(grid, block, dyn, kernel);
  else emu_launch_shared(grid, block, dyn, kernel);
  emu::g_quiet = false;
  const bool refused = emu::g_errors > e;
  emu::g_errors = e;
  return refused;
}
static void test_cooperative() {
  begin_case();
  emu::g_launch_tag = "emulator self-test: cooperative";
  const dim3 grid(4, 2), block(32, 8);
  const unsigned nb = 8;
  for (int policy = 0; policy < (int)emu::Policy::Count; ++policy) {
    const char* name = emu::policy_name((emu::Policy)policy);
    for (unsigned start : {0u, 0x80000000u}) {  // the counter's bit 31 either way
      unsigned counter = start;
      std::vector<u32> vals(nb, 0), out(nb * 256, 0);
      emu::g.launches = (u64)policy;
      const int e = emu::g_errors;
      emu_launch_cooperative(grid, block, 256 * sizeof(u32), [&] { grid_kernel<false>(&counter, vals.data(), out.data()); });
      CHECK(emu::g_errors == e, "emulator: a cooperative grid barrier reached by every block failed (%s policy)", name);
      bool ok = true;
      for (unsigned i = 0; i < out.size(); ++i) ok &= out[i] == nb * (nb + 1) / 2 * 4u + 3u;
      for (unsigned i = 0; i < nb; ++i) ok &= vals[i] == 0;
      CHECK(ok, "emulator: cooperative blocks saw wrong values or lost their shared memory (%s policy)", name);
      CHECK(counter == start, "emulator: grid_barrier left the counter at 0x%08x, not 0x%08x (%s policy)", counter, start, name);
    }
    unsigned counter = 0;
    std::vector<u32> vals(nb, 0), out(nb * 256, 0);
    emu::g.launches = (u64)policy;
    CHECK(cooperative_refused([&] { grid_kernel<true>(&counter, vals.data(), out.data()); }, grid, block, 1024),
          "emulator: a grid barrier skipped by one block was not reported (%s policy)", name);
    counter = 0;
    emu::g.launches = (u64)policy;
    CHECK(cooperative_refused([&] { grid_kernel<false>(&counter, vals.data(), out.data()); }, grid, block, 1024, false),
          "emulator: a grid barrier in a plain (non-cooperative) launch was not reported (%s policy)", name);
  }
}

static void core_group() {
  test_emulator_itself();
  test_helpers();
  test_cooperative();
}
REGISTER_GROUP(core, core_group);
#endif  // EMU_GROUP_core

// =================================================================================================
#ifdef EMU_GROUP_sync
DISPATCH(sync_moments_planar, SyncMomentsParams)
DISPATCH(sync_moments_rows, SyncMomentsParams)
DISPATCH(stats_planar, StatsParams)
DISPATCH(stats_rows, StatsParams)

static void launch_merge(const SyncMergeParams& p, unsigned blocks) {
  g_entries.insert("bn_sync_merge");
  emu_launch(dim3(blocks), dim3(256), [&] { bn_sync_merge(p); });
}
static void launch_coef(const SyncCoefficientsParams& p, unsigned blocks) {
  g_entries.insert("bn_sync_coefficients");
  emu_launch(dim3(blocks), dim3(256), [&] { bn_sync_coefficients(p); });
}

static u32 fbits(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }

// The shards of x (outer split into sizes[r] rows of `per` outer units each) on their own moments
// kernels, merged by every rank; against the f64 statistics of the whole batch and, for one
// non-empty shard, against bn_stats bit for bit.
template <class T, class I>
void test_sync(const Shape& s, const Cfg& cfg, const std::vector<u64>& sizes, u64 per, double mu, double sigma, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  Buf<T> x(s.numel(), 0, to_raw<T>(-5.0));
  gen(x, s, rng, mu, sigma);
  const u64 C = s.C;
  const size_t R = sizes.size();
  constexpr u64 K = 4;  // (count, mean hi, mean lo, m2)
  std::vector<float> gathered(R * C * K, NAN);
  std::vector<u32> sem(sem_count<T>(C, cfg), 0);
  std::string tag = std::string("sync ") + Fmt<T>::name + " " + iname<I>() + " " + shape_tag(s) + " " + cfg_tag(cfg);
  emu::g_launch_tag = tag;
  u64 row0 = 0;
  for (size_t r = 0; r < R; ++r) {
    const u64 outer = sizes[r] * per;
    float* mom = gathered.data() + r * C * K;
    if (outer == 0) {
      std::fill(mom, mom + C * K, 0.f);
      continue;
    }
    Shape sh{outer, C, s.inner};
    std::vector<float> partials(C * cfg.grid * 3, NAN);
    SyncMomentsParams p{};
    p.x = x.p() + row0 * C * s.inner;
    p.partials = partials.data();
    p.semaphores = sem.data();
    p.moments = mom;
    p.g = {sh.outer, sh.C, sh.inner};
    p.splits = (int)cfg.grid;
    if (cfg.rows) launch_sync_moments_rows<T, I>(rows_grid<T>(C, cfg), dim3(cfg.bx, 256 / cfg.bx), p);
    else launch_sync_moments_planar<T, I>(dim3(cfg.grid, cfg.gy), dim3(256), p);
    // This shard's moments against f64.
    for (size_t i = C; i < sem.size(); ++i) CHECK(sem[i] == 0, "%s: merge semaphore %zu = %u", tag.c_str(), i, sem[i]);
    for (u64 c = 0; c < C; ++c) {
      CHECK(sem[c] == 0, "%s: semaphore %llu", tag.c_str(), c);
      double sum = 0, ss = 0;
      for (u64 o = row0; o < row0 + outer; ++o)
        for (u64 i = 0; i < s.inner; ++i) sum += x.at(s.idx(o, c, i));
      const double mean = sum / (double)sh.m();
      for (u64 o = row0; o < row0 + outer; ++o)
        for (u64 i = 0; i < s.inner; ++i) ss += (x.at(s.idx(o, c, i)) - mean) * (x.at(s.idx(o, c, i)) - mean);
      CHECK(mom[K * c] == (float)sh.m(), "%s rank %zu: count %g != %llu", tag.c_str(), r, mom[K * c], sh.m());
      const double sd = std::sqrt(ss / (double)sh.m());
      // hi is the f32 rounding of hi + lo, and hi + lo holds the mean to a fraction of the spread
      // whatever the offset (one f32 rounding of the mean alone is ulp(mean)/2: 3e-5 at 1000).
      const double pair = (double)mom[K * c + 1] + (double)mom[K * c + 2];
      CHECK(mom[K * c + 1] == (float)pair, "%s rank %zu: mean hi[%llu] is not the rounded pair", tag.c_str(), r, c);
      CHECK(std::fabs(pair - mean) <= 1e-5 * sd + 1e-30, "%s rank %zu: mean[%llu] %.12g vs %.12g", tag.c_str(), r, c, pair, mean);
      CHECK(std::fabs(mom[K * c + 3] - ss) <= 1e-5 * ss + 1e-30, "%s rank %zu: m2[%llu] %.9g vs %.9g", tag.c_str(), r, c, mom[K * c + 3], ss);
    }
    row0 += outer;
  }
  // Every rank merges; all must agree bitwise.
  const RefStats ref = ref_stats(x, s);
  const double m = (double)s.m();
  std::vector<std::vector<float>> means, los, invs, rms, rvs;
  for (size_t r = 0; r < R; ++r) {
    std::vector<float> mean(C, NAN), lo(C, NAN), inv(C, NAN), rm(C), rv(C);
    for (u64 c = 0; c < C; ++c) {
      rm[c] = 0.25f * (float)c;
      rv[c] = 1.0f + (float)c;
    }
    unsigned long long total = 12345;
    SyncMergeParams q{};
    q.gathered = gathered.data();
    q.save_mean = mean.data();
    q.save_mean_lo = lo.data();
    q.save_invstd = inv.data();
    q.running_mean = rm.data();
    q.running_var = rv.data();
    q.total = &total;
    q.ranks = R;
    q.channels = C;
    q.eps = kEps;
    q.factor = 0.1f;
    q.unbiased = 1;
    launch_merge(q, 1 + (unsigned)(r % 3));
    CHECK(total == s.m(), "%s: total %llu != %llu", tag.c_str(), total, s.m());
    means.push_back(mean);
    los.push_back(lo);
    invs.push_back(inv);
    rms.push_back(rm);
    rvs.push_back(rv);
  }
  for (size_t r = 1; r < R; ++r)
    for (u64 c = 0; c < C; ++c)
      CHECK(fbits(means[r][c]) == fbits(means[0][c]) && fbits(los[r][c]) == fbits(los[0][c]) && fbits(invs[r][c]) == fbits(invs[0][c]) &&
                fbits(rms[r][c]) == fbits(rms[0][c]) && fbits(rvs[r][c]) == fbits(rvs[0][c]),
            "%s: rank %zu differs from rank 0 in channel %llu", tag.c_str(), r, c);
  // Each shard's mean travels as hi + lo and the merge runs in double: no f32 rounding of a mean
  // reaches the deltas, so the variance is as good as one device's, whatever the offset (with f32
  // means it was off by about ulp(mean) / (sigma * sqrt(m_r)), m_r the smallest shard).
  const double var_tol = 1e-5;
  for (u64 c = 0; c < C; ++c) {
    const double sd = std::sqrt(ref.var[c]);
    const double pair = (double)means[0][c] + (double)los[0][c];
    CHECK(means[0][c] == (float)pair, "%s: mean hi[%llu] is not the rounded pair (%a %a)", tag.c_str(), c, means[0][c], los[0][c]);
    CHECK(std::fabs(pair - ref.mean[c]) <= 1e-5 * sd + 1e-30, "%s: mean[%llu] %.12g vs %.12g", tag.c_str(), c, pair, ref.mean[c]);
    const double inv_ref = 1.0 / std::sqrt(ref.var[c] + (double)kEps);
    CHECK(std::fabs(invs[0][c] - inv_ref) <= var_tol * inv_ref, "%s: invstd[%llu] %.9g vs %.9g (rel %.3g)", tag.c_str(), c, invs[0][c], inv_ref,
          std::fabs(invs[0][c] - inv_ref) / inv_ref);
    const double rm_ref = 0.1 * ref.mean[c] + 0.9 * 0.25 * (double)c;
    const double rv_ref = 0.1 * ref.var[c] * m / (m - 1) + 0.9 * (1.0 + (double)c);
    CHECK(std::fabs(rms[0][c] - rm_ref) <= 2e-6 * (std::fabs(rm_ref) + sd) + 1e-7, "%s: running_mean[%llu]", tag.c_str(), c);
    CHECK(std::fabs(rvs[0][c] - rv_ref) <= var_tol * rv_ref + 1e-7, "%s: running_var[%llu] %.9g vs %.9g", tag.c_str(), c, rvs[0][c], rv_ref);
  }
  // One non-empty shard: bn_stats' statistics bit for bit.
  if (std::count_if(sizes.begin(), sizes.end(), [](u64 n) { return n > 0; }) == 1) {
    std::vector<float> partials(C * cfg.grid * 3, NAN), mean(C), lo(C), inv(C), rm(C), rv(C);
    for (u64 c = 0; c < C; ++c) {
      rm[c] = 0.25f * (float)c;
      rv[c] = 1.0f + (float)c;
    }
    StatsParams p{};
    p.x = x.p();
    p.partials = partials.data();
    p.semaphores = sem.data();
    p.save_mean = mean.data();
    p.save_mean_lo = lo.data();
    p.save_invstd = inv.data();
    p.running_mean = rm.data();
    p.running_var = rv.data();
    p.g = {s.outer, s.C, s.inner};
    p.eps = kEps;
    p.factor = 0.1f;
    p.unbiased = 1;
    p.splits = (int)cfg.grid;
    if (cfg.rows) launch_stats_rows<T, I>(rows_grid<T>(C, cfg), dim3(cfg.bx, 256 / cfg.bx), p);
    else launch_stats_planar<T, I>(dim3(cfg.grid, cfg.gy), dim3(256), p);
    // lo within 2^-24 ulp(mean): the two kernels' shifted means may differ in their last bits
    // (f32 rounding noise far below the mean's own f32 resolution), which only lo shows.
    for (u64 c = 0; c < C; ++c)
      CHECK(fbits(mean[c]) == fbits(means[0][c]) && std::fabs((double)lo[c] - (double)los[0][c]) <= std::ldexp(ulp_of<float>(mean[c]), -24) &&
                fbits(inv[c]) == fbits(invs[0][c]) && fbits(rm[c]) == fbits(rms[0][c]) && fbits(rv[c]) == fbits(rvs[0][c]),
            "%s: one shard: channel %llu differs from bn_stats (mean, lo, invstd, running mean, var: %a %a %a %a %a vs %a %a %a %a %a)", tag.c_str(),
            c, means[0][c], los[0][c], invs[0][c], rms[0][c], rvs[0][c], mean[c], lo[c], inv[c], rm[c], rv[c]);
  }
}

// M < 2: running statistics untouched; M == 0: mean 0, invstd 1/sqrt(eps).
static void test_merge_small() {
  begin_case();
  const u64 C = 5;
  for (int m = 0; m < 2; ++m) {
    std::vector<float> gathered(3 * C * 4, 0.f);
    if (m == 1)
      for (u64 c = 0; c < C; ++c) {
        gathered[(1 * C + c) * 4 + 0] = 1.f;
        gathered[(1 * C + c) * 4 + 1] = 2.5f + (float)c;
      }
    std::vector<float> mean(C, NAN), inv(C, NAN), rm(C, 0.5f), rv(C, 2.f);
    unsigned long long total = 99;
    SyncMergeParams q{};
    q.gathered = gathered.data();
    q.save_mean = mean.data();
    q.save_invstd = inv.data();
    q.running_mean = rm.data();
    q.running_var = rv.data();
    q.total = &total;
    q.ranks = 3;
    q.channels = C;
    q.eps = kEps;
    q.factor = 0.1f;
    q.unbiased = 1;
    launch_merge(q, 1);
    CHECK(total == (u64)m, "M=%d: total %llu", m, total);
    for (u64 c = 0; c < C; ++c) {
      CHECK(rm[c] == 0.5f && rv[c] == 2.f, "M=%d: running statistics changed", m);
      CHECK(mean[c] == (m ? 2.5f + (float)c : 0.f), "M=%d: mean %g", m, mean[c]);
      CHECK(inv[c] == (float)(1.0 / std::sqrt((double)kEps)), "M=%d: invstd %g", m, inv[c]);
    }
  }
}

static void test_coefficients() {
  begin_case();
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (u64 C : {1ull, 7ull, 300ull, 1001ull}) {
    for (int acc = 0; acc < 2; ++acc) {
      for (int null_grads = 0; null_grads < 2; ++null_grads) {
        std::vector<float> local(2 * C), global(2 * C), coef(2 * C, NAN), dw(C), db(C);
        for (auto& v : local) v = u(rng);
        for (auto& v : global) v = u(rng);
        for (u64 c = 0; c < C; ++c) {
          dw[c] = u(rng);
          db[c] = u(rng);
        }
        const std::vector<float> dw0 = dw, db0 = db;
        const unsigned long long total = 3 + 97 * C;
        SyncCoefficientsParams p{};
        p.local = local.data();
        p.global = global.data();
        p.total = &total;
        p.coef = coef.data();
        p.dweight = null_grads ? nullptr : dw.data();
        p.dbias = null_grads ? nullptr : db.data();
        p.channels = C;
        p.accumulate = acc;
        launch_coef(p, 1 + (unsigned)(C % 3));
        const float inv_m = (float)(1.0 / (double)total);
        for (u64 c = 0; c < C; ++c) {
          CHECK(coef[2 * c] == global[c] * inv_m, "coef0[%llu] %g vs %g", c, coef[2 * c], global[c] * inv_m);
          CHECK(coef[2 * c + 1] == global[C + c] * inv_m, "coef1[%llu]", c);
          if (null_grads) {
            CHECK(dw[c] == dw0[c] && db[c] == db0[c], "null gradients written");
          } else {
            CHECK(dw[c] == (acc ? dw0[c] + local[C + c] : local[C + c]), "dweight[%llu]", c);
            CHECK(db[c] == (acc ? db0[c] + local[c] : local[c]), "dbias[%llu]", c);
          }
        }
      }
    }
  }
}

static void sync_group() {
  unsigned seed = 900;
  // Planar: outer = N (per = 1); rows: outer = N * spatial (per = spatial rows per sample).
  struct P {
    Shape s;
    unsigned splits, gy;
  };
  const P ps[] = {{{12, 3, 5}, 2, 3},  {{12, 2, 257}, 3, 2}, {{12, 5, 1000}, 4, 3}, {{12, 17, 33}, 1, 17},
                  {{12, 3, 49}, 2, 3}, {{12, 2, 9}, 3, 2},   {{12, 2, 25}, 1, 2}};  // packed units: 7x7, 3x3, 5x5
  const std::vector<std::vector<u64>> splits = {{12}, {0, 12}, {5, 0, 7}, {0, 1, 0, 2, 0, 4, 5, 0}, {1, 11}};
  for (const P& q : ps)
    for (const auto& sz : splits) {
      const Cfg cfg{false, q.splits, q.gy, 0};
      test_sync<F, u32>(q.s, cfg, sz, 1, 0.5, 2.0, ++seed);
      test_sync<H, u64>(q.s, cfg, sz, 1, 0.5, 2.0, ++seed);
      test_sync<B, u32>(q.s, cfg, sz, 1, 0.5, 2.0, ++seed);
      test_sync<F, u64>(q.s, cfg, sz, 1, 1000, 0.1, ++seed);
      test_sync<H, u32>(q.s, cfg, sz, 1, -2.0, 0.5, ++seed);
      test_sync<B, u64>(q.s, cfg, sz, 1, 3.0, 1.0, ++seed);
    }
  struct Q {
    Shape s;
    unsigned bx, splits;
    u64 per;
  };
  const Q qs[] = {{{12 * 4, 3, 1}, 32, 2, 4}, {{12 * 10, 17, 1}, 8, 3, 10}, {{12, 1001, 1}, 64, 2, 1}, {{12 * 50, 24, 1}, 1, 4, 50},
                  {{12 * 30, 256, 1}, 32, 150, 30}};
  for (const Q& q : qs)
    for (const auto& sz : splits) {
      const Cfg cfg{true, q.splits, 0, q.bx};
      test_sync<F, u32>(q.s, cfg, sz, q.per, 0.5, 2.0, ++seed);
      test_sync<H, u32>(q.s, cfg, sz, q.per, 0.5, 2.0, ++seed);
      test_sync<B, u64>(q.s, cfg, sz, q.per, 0.5, 2.0, ++seed);
      test_sync<H, u64>(q.s, cfg, sz, q.per, 0.5, 2.0, ++seed);
      test_sync<F, u64>(q.s, cfg, sz, q.per, 1000, 0.1, ++seed);
      test_sync<B, u32>(q.s, cfg, sz, q.per, -1.0, 3.0, ++seed);
    }
  test_merge_small();
  test_coefficients();
}
REGISTER_GROUP(sync, sync_group);
#endif  // EMU_GROUP_sync

// =================================================================================================
// Fused ReLU epilogues (epilogue.cuh): bn_normalize_relu_*, bn_normalize_add_relu_*,
// bn_backward_reduce_relu_*, bn_backward_dx_relu_*, bn_backward_dx_add_relu_*, every dtype and
// index width, planar and rows, vector and scalar paths. The mask layout is computed here from the
// ABI (flat: element e is bit e % 32 of word e / 32, ceil(numel/32) words, for every layout).
#ifdef EMU_GROUP_fused
DISPATCH(normalize_relu_planar, NormalizeReluParams)
DISPATCH(normalize_relu_rows, NormalizeReluParams)
DISPATCH(normalize_add_relu_planar, NormalizeReluParams)
DISPATCH(normalize_add_relu_rows, NormalizeReluParams)
DISPATCH(backward_reduce_relu_planar, BackwardReduceReluParams)
DISPATCH(backward_reduce_relu_rows, BackwardReduceReluParams)
DISPATCH(backward_dx_relu_planar, BackwardElementwiseReluParams)
DISPATCH(backward_dx_relu_rows, BackwardElementwiseReluParams)
DISPATCH(backward_dx_add_relu_planar, BackwardElementwiseReluParams)
DISPATCH(backward_dx_add_relu_rows, BackwardElementwiseReluParams)
DISPATCH(backward_eval_planar, BackwardEvalParams)
DISPATCH(backward_eval_rows, BackwardEvalParams)
DISPATCH(backward_reduce_planar, BackwardReduceParams)
DISPATCH(backward_reduce_rows, BackwardReduceParams)
DISPATCH(backward_dx_planar, BackwardElementwiseParams)
DISPATCH(backward_dx_rows, BackwardElementwiseParams)

// The ABI's mask layout: element e is bit e % 32 of word e / 32, whatever the shape.
static u64 mask_words(const Shape& s) { return (s.numel() + 31) / 32; }
static void mask_pos(const Shape&, u64 e, u64& w, unsigned& b) {
  w = e / 32;
  b = (unsigned)(e % 32);
}
static bool mask_bit(const Shape& s, const std::vector<u32>& m, u64 e) {
  u64 w;
  unsigned b;
  mask_pos(s, e, w, b);
  return m[w] >> b & 1u;
}
static void set_bit(const Shape& s, std::vector<u32>& m, u64 e, bool on) {
  u64 w;
  unsigned b;
  mask_pos(s, e, w, b);
  m[w] = on ? m[w] | 1u << b : m[w] & ~(1u << b);
}
// A random mask (padding bits 0): bit of element 2 is 0 (its dy is NaN: dropped), bit of element
// n-2 is 1 (its dy is NaN too: propagated by dx).
static std::vector<u32> random_mask(const Shape& s, std::mt19937& rng) {
  std::vector<u32> m(mask_words(s), 0);
  std::bernoulli_distribution bd(0.55);
  for (u64 e = 0; e < s.numel(); ++e) set_bit(s, m, e, bd(rng));
  if (s.numel() > 4) {
    set_bit(s, m, 2, false);
    set_bit(s, m, s.numel() - 2, true);
  }
  return m;
}
template <class T> void fill(Buf<T>& b, std::mt19937& rng, double mu, double sd) {
  std::normal_distribution<double> nd(mu, sd);
  for (size_t i = 0; i < b.n; ++i) b[i] = to_raw<T>(nd(rng));
}
template <class T, class I> std::string fused_tag(const char* what, const Shape& s, const Cfg& c, size_t mis) {
  return std::string(what) + " " + Fmt<T>::name + " " + iname<I>() + " " + shape_tag(s) + " " + cfg_tag(c) + " misalign=" + std::to_string(mis);
}
template <class T, class I, class P, class F1, class F2>
void launch_map(const Cfg& cfg, const Shape& s, const P& p, F1 rows, F2 planar) {
  if (cfg.rows) rows(map_grid<T>(s, cfg), dim3(cfg.bx, 256 / cfg.bx), p);
  else planar(dim3(cfg.grid), dim3(256), p);
}

// Forward: y = relu((x - mean) * w * invstd + b [+ z]), mask bit = (y as stored) > 0.
// alias: 0 separate y, 1 y == x (in place), 2 y == z (ADD only). Returns the mask it wrote
// (checked here against the reference), for a backward to read.
template <class T, class I, bool ADD>
std::vector<u32> test_relu_forward(const Shape& s, const Cfg& cfg, size_t mis_x, size_t mis_z, bool with_mask, bool stat_is_var, int alias,
                                   unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  const u64 n = s.numel(), C = s.C;
  Buf<T> x(n, mis_x, to_raw<T>(-111.0)), z(n, mis_z, to_raw<T>(-222.0)), y(n, mis_x, to_raw<T>(-333.0));
  fill(x, rng, 0.2, 1.5);
  fill(z, rng, 0.0, 1.0);
  if (n > 5) {  // NaN through relu (bit 0), +-Inf from the residual
    x[3] = to_raw<T>(NAN);
    z[4] = to_raw<T>(INFINITY);
    z[5] = to_raw<T>(-INFINITY);
  }
  const Buf<T> x0 = x, z0 = z;
  std::vector<float> mean(C), st(C), w(C), b(C);
  std::uniform_real_distribution<double> ud(-1, 1);
  for (u64 c = 0; c < C; ++c) {
    mean[c] = (float)(0.2 + 0.1 * ud(rng));
    const double var = 1.0 + 0.5 * ud(rng);
    st[c] = stat_is_var ? (float)var : (float)(1.0 / std::sqrt(var + kEps));
    w[c] = (float)(1.2 * ud(rng));
    b[c] = (float)(0.3 * ud(rng));
  }
  const u64 words = mask_words(s);
  std::vector<u32> mask(words + 8, 0xffffffffu);  // all ones: padding bits must be cleared
  Buf<T>& out = alias == 1 ? x : alias == 2 ? z : y;
  NormalizeReluParams p{};
  p.x = x.p();
  p.y = out.p();
  p.mean = mean.data();
  p.var_or_invstd = st.data();
  p.weight = w.data();
  p.bias = b.data();
  p.g = {s.outer, s.C, s.inner};
  p.eps = kEps;
  p.stat_is_var = stat_is_var;
  p.z = ADD ? (const void*)z.p() : nullptr;
  p.mask = with_mask ? mask.data() : nullptr;
  std::string tag = fused_tag<T, I>(ADD ? "add_relu forward" : "relu forward", s, cfg, mis_x * 10 + mis_z) + " alias=" + std::to_string(alias);
  emu::g_launch_tag = tag;
  if (ADD)
    launch_map<T, I>(cfg, s, p, launch_normalize_add_relu_rows<T, I>, launch_normalize_add_relu_planar<T, I>);
  else
    launch_map<T, I>(cfg, s, p, launch_normalize_relu_rows<T, I>, launch_normalize_relu_planar<T, I>);
  tag += policies_tag();
  CHECK(x.guards_intact() && y.guards_intact() && z.guards_intact(), "%s: write outside y", tag.c_str());
  if (alias != 1) CHECK(std::equal(x.v.begin(), x.v.end(), x0.v.begin()), "%s: x modified", tag.c_str());
  if (alias != 2) CHECK(std::equal(z.v.begin(), z.v.end(), z0.v.begin()), "%s: z modified", tag.c_str());
  for (u64 i = words; i < words + 8; ++i) CHECK(mask[i] == 0xffffffffu, "%s: write past the mask (word %llu)", tag.c_str(), i);
  std::vector<u32> want_mask(words, 0);
  int bad = 0;
  for (u64 o = 0; o < s.outer; ++o)
    for (u64 c = 0; c < C; ++c)
      for (u64 i = 0; i < s.inner; ++i) {
        const u64 e = s.idx(o, c, i);
        const double invstd = stat_is_var ? 1.0 / std::sqrt((double)st[c] + (double)kEps) : (double)st[c];
        const double a = (double)w[c] * invstd, d = x0.at(e) - (double)mean[c];
        const double t = d * a + (double)b[c] + (ADD ? z0.at(e) : 0.0);
        const double want = t > 0 || std::isnan(t) ? t : 0.0;
        const double got = out.at(e);
        const double tol = 8 * kU32 * (std::fabs(d * a) + std::fabs((double)b[c]) + (ADD ? std::fabs(z0.at(e)) : 0)) + ulp_of<T>(want);
        bool ok;
        if (std::isnan(want)) ok = std::isnan(got);
        else if (std::isinf(want)) ok = got == want;
        else ok = std::fabs(got - want) <= tol && !std::signbit(got);
        ++g_checks;
        if (!ok && bad++ < 3 && g_fail < 60) std::printf("FAIL %s: y[%llu] %.9g, reference %.9g\n", tag.c_str(), e, got, want);
        g_fail += !ok;
        // Reference bit: t > 0 where unambiguous (|t| beyond the tolerance: the stored y has t's
        // sign); within it, the ABI's definition on the stored y (a positive t may round to 0).
        const bool bit = std::isnan(t) ? false : std::fabs(t) > tol ? t > 0 : got > 0;
        if (bit) {
          u64 wd;
          unsigned bt;
          mask_pos(s, e, wd, bt);
          want_mask[wd] |= 1u << bt;
        }
      }
  int mbad = 0;
  for (u64 i = 0; i < words; ++i) {
    const u32 want = with_mask ? want_mask[i] : 0xffffffffu;
    ++g_checks;
    if (mask[i] != want) {
      if (mbad++ < 3 && g_fail < 60)
        std::printf("FAIL %s: mask[%llu] %08x, reference %08x%s\n", tag.c_str(), i, mask[i], want, with_mask ? "" : " (null mask: untouched)");
      ++g_fail;
    }
  }
  mask.resize(words);
  return mask;
}

// Backward reduce with dy_eff = bit ? dy : +0 (a NaN dy under a 0 bit is dropped).
template <class T, class I> void test_relu_reduce(const Shape& s, const Cfg& cfg, size_t mis, bool stat_is_var, int accumulate, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  const u64 n = s.numel(), C = s.C;
  Buf<T> x(n, mis, 0), dy(n, mis, 0);
  fill(x, rng, 1.0, 2.0);
  fill(dy, rng, 0.1, 1.0);
  std::vector<u32> mask = random_mask(s, rng);
  if (n > 4) {
    dy[2] = to_raw<T>(NAN);  // bit 0
    set_bit(s, mask, n - 2, false);
  }
  const Buf<T> x0 = x, dy0 = dy;
  std::vector<float> mean(C), st(C), dw(C, 0.5f), db(C, -0.25f), coef(2 * C, NAN), partials(C * cfg.grid * 2, NAN);
  std::vector<u32> sem(sem_count<T>(C, cfg), 0);
  for (u64 c = 0; c < C; ++c) {
    mean[c] = 1.0f + 0.01f * (float)c;
    st[c] = stat_is_var ? 3.5f : 0.6f;
  }
  BackwardReduceReluParams r{};
  r.x = x.p();
  r.dy = dy.p();
  r.mean = mean.data();
  r.var_or_invstd = st.data();
  r.partials = partials.data();
  r.semaphores = sem.data();
  r.dweight = dw.data();
  r.dbias = db.data();
  r.coef = coef.data();
  r.g = {s.outer, s.C, s.inner};
  r.eps = kEps;
  r.stat_is_var = stat_is_var;
  r.accumulate = accumulate;
  r.splits = (int)cfg.grid;
  r.mask = mask.data();
  std::string tag = fused_tag<T, I>("reduce_relu", s, cfg, mis);
  emu::g_launch_tag = tag;
  if (cfg.rows) launch_backward_reduce_relu_rows<T, I>(rows_grid<T>(C, cfg), dim3(cfg.bx, 256 / cfg.bx), r);
  else launch_backward_reduce_relu_planar<T, I>(dim3(cfg.grid, cfg.gy), dim3(256), r);
  tag += policies_tag();
  CHECK(std::equal(x.v.begin(), x.v.end(), x0.v.begin()) && std::equal(dy.v.begin(), dy.v.end(), dy0.v.begin()), "%s: input modified", tag.c_str());
  std::vector<double> sdy(C, 0), sdx(C, 0), sabs(C, 0);
  for (u64 o = 0; o < s.outer; ++o)
    for (u64 c = 0; c < C; ++c)
      for (u64 i = 0; i < s.inner; ++i) {
        const u64 e = s.idx(o, c, i);
        if (!mask_bit(s, mask, e)) continue;
        const double g = dy.at(e), xv = x.at(e);
        sdy[c] += g;
        sdx[c] += g * (xv - mean[c]);
        sabs[c] += std::fabs(g) * (std::fabs(xv - mean[c]) + 1);
      }
  const double m = (double)(s.outer * s.inner), w0 = accumulate ? 0.5 : 0.0, b0 = accumulate ? -0.25 : 0.0;
  for (size_t i = C; i < sem.size(); ++i) CHECK(sem[i] == 0, "%s: merge semaphore %zu = %u", tag.c_str(), i, sem[i]);
  for (u64 c = 0; c < C; ++c) {
    CHECK(sem[c] == 0, "%s: semaphore %llu = %u", tag.c_str(), c, sem[c]);
    const double invstd = stat_is_var ? 1.0 / std::sqrt((double)st[c] + (double)kEps) : (double)st[c];
    const double tb = 4e-6 * sabs[c] + 1e-5, tw = tb * invstd;
    CHECK(std::fabs(dw[c] - (w0 + sdx[c] * invstd)) <= tw, "%s: dweight[%llu] %.9g, reference %.9g", tag.c_str(), c, dw[c], w0 + sdx[c] * invstd);
    CHECK(std::fabs(db[c] - (b0 + sdy[c])) <= tb, "%s: dbias[%llu] %.9g, reference %.9g", tag.c_str(), c, db[c], b0 + sdy[c]);
    CHECK(std::fabs(coef[2 * c] - sdy[c] / m) <= tb / m, "%s: coef[%llu][0] %.9g, reference %.9g", tag.c_str(), c, coef[2 * c], sdy[c] / m);
    CHECK(std::fabs(coef[2 * c + 1] - sdx[c] * invstd / m) <= tw / m, "%s: coef[%llu][1] %.9g, reference %.9g", tag.c_str(), c, coef[2 * c + 1],
          sdx[c] * invstd / m);
  }
}

// Backward dx from dy_eff; DZ: dz = dy_eff (bits of dy, or +0). mode: 0 train (coef), 1 eval,
// 2 dz-only pass (var_or_invstd null: dx = dy_eff). in_place: dx == dy. forward_mask: a mask a
// forward wrote (and test_relu_forward checked), else a random one.
template <class T, class I, bool DZ>
void test_relu_dx(const Shape& s, const Cfg& cfg, size_t mis, int mode, bool in_place, unsigned seed,
                  const std::vector<u32>* forward_mask = nullptr) {
  begin_case();
  std::mt19937 rng(seed);
  const u64 n = s.numel(), C = s.C;
  const Raw<T> guard = to_raw<T>(-777.0);
  Buf<T> x(n, mis, guard), dy(n, mis, guard), dx(n, mis, guard), dz(n, mis ? 0 : 1, guard);
  fill(x, rng, 1.0, 2.0);
  fill(dy, rng, 0.1, 1.0);
  std::vector<u32> mask = forward_mask ? *forward_mask : random_mask(s, rng);
  if (n > 4) {
    dy[2] = to_raw<T>(NAN);      // random mask: bit 0, dropped
    dy[n - 2] = to_raw<T>(NAN);  // random mask: bit 1, propagated
  }
  const Buf<T> dy0 = dy;
  std::vector<float> mean(C), st(C), w(C), coef(2 * C);
  for (u64 c = 0; c < C; ++c) {
    mean[c] = 1.0f + 0.01f * (float)c;
    st[c] = 0.6f + 0.01f * (float)(c % 5);
    w[c] = 0.7f + 0.05f * (float)(c % 13);
    coef[2 * c] = 0.03f * (float)(c % 7) - 0.1f;
    coef[2 * c + 1] = 0.2f - 0.02f * (float)(c % 11);
  }
  Buf<T>& out = in_place ? dy : dx;
  BackwardElementwiseReluParams e{};
  e.x = mode == 0 ? (const void*)x.p() : nullptr;
  e.dy = dy.p();
  e.dx = out.p();
  e.mean = mean.data();
  e.var_or_invstd = mode == 2 ? nullptr : st.data();
  e.weight = w.data();
  e.coef = mode == 0 ? coef.data() : nullptr;
  e.g = {s.outer, s.C, s.inner};
  e.eps = kEps;
  e.stat_is_var = 0;
  e.mask = mask.data();
  e.dz = DZ ? (void*)dz.p() : nullptr;
  std::string tag = fused_tag<T, I>(DZ ? "dx_add_relu" : "dx_relu", s, cfg, mis) + " mode=" + std::to_string(mode) + (in_place ? " in place" : "") +
                    (forward_mask ? " forward's mask" : "");
  emu::g_launch_tag = tag;
  if (DZ) launch_map<T, I>(cfg, s, e, launch_backward_dx_add_relu_rows<T, I>, launch_backward_dx_add_relu_planar<T, I>);
  else launch_map<T, I>(cfg, s, e, launch_backward_dx_relu_rows<T, I>, launch_backward_dx_relu_planar<T, I>);
  tag += policies_tag();
  CHECK(dx.guards_intact() && dy.guards_intact() && dz.guards_intact(), "%s: write outside dx/dz", tag.c_str());
  if (!in_place) CHECK(std::equal(dy.v.begin(), dy.v.end(), dy0.v.begin()), "%s: dy modified", tag.c_str());
  if (!DZ) CHECK(std::all_of(dz.v.begin(), dz.v.end(), [&](Raw<T> r) { return r == guard; }), "%s: dz written", tag.c_str());
  int bad = 0;
  for (u64 o = 0; o < s.outer; ++o)
    for (u64 c = 0; c < C; ++c)
      for (u64 i = 0; i < s.inner; ++i) {
        const u64 el = s.idx(o, c, i);
        const bool on = mask_bit(s, mask, el);
        const double g = on ? dy0.at(el) : 0.0;
        const double invstd = st[c], scale = (double)w[c] * invstd;
        double want, terms;
        if (mode == 0) {
          const double proj = (x.at(el) - mean[c]) * (double)coef[2 * c + 1] * invstd;
          want = (g - coef[2 * c] - proj) * scale;
          terms = (std::fabs(g) + std::fabs(coef[2 * c]) + std::fabs(proj)) * std::fabs(scale);
        } else if (mode == 1) {
          want = g * scale;
          terms = std::fabs(want);
        } else {
          want = g;
          terms = 0;
        }
        const double got = out.at(el);
        bool ok = std::isnan(want) ? std::isnan(got) : std::fabs(got - want) <= 8 * kU32 * terms + ulp_of<T>(want);
        const Raw<T> eff = on ? dy0.v[dy0.off + el] : (Raw<T>)0;  // dy_eff's bits (+0 when masked)
        if (mode == 2 && !std::isnan(want)) ok = ok && out[el] == eff;  // dx = dy_eff exactly (a NaN may change payload)
        ++g_checks;
        if (!ok && bad++ < 3 && g_fail < 60) std::printf("FAIL %s: dx[%llu] %.9g, reference %.9g (bit %d)\n", tag.c_str(), el, got, want, (int)on);
        g_fail += !ok;
        if (DZ) CHECK(dz[el] == eff, "%s: dz[%llu] bits %x, reference %x", tag.c_str(), el, (unsigned)dz[el], (unsigned)eff);
      }
}

// Every fused entry family on one shape and launch config (map: planar blocks or rows; red: the
// reduce's planar (splits, gy) or rows). Misaligned pointers (mis = 1) take the scalar path.
// The dx kernels also read the masks the forwards wrote, through the other load path (the layout
// is a function of the shape alone): training dx after relu, eval dx after add_relu.
template <class T, class I> void fused_all(const Shape& s, const Cfg& map, const Cfg& red, unsigned& seed) {
  for (size_t mis : {0, 1}) {
    const std::vector<u32> relu_mask = test_relu_forward<T, I, false>(s, map, mis, 0, true, mis == 0, mis, ++seed);
    const std::vector<u32> add_mask = test_relu_forward<T, I, true>(s, map, mis, 1 - mis, true, mis == 1, mis ? 2 : 0, ++seed);
    test_relu_reduce<T, I>(s, red, mis, mis == 1, (int)mis, ++seed);
    test_relu_dx<T, I, false>(s, map, mis, (int)(seed % 3), mis == 1, ++seed);
    test_relu_dx<T, I, true>(s, map, mis, mis ? 1 : 0, mis == 1, ++seed);
    test_relu_dx<T, I, false>(s, map, 1 - mis, 0, mis == 0, ++seed, &relu_mask);
    test_relu_dx<T, I, true>(s, map, 1 - mis, 1, mis == 1, ++seed, &add_mask);
    for (int mode = 0; mode < 3; ++mode)
      test_backward_eval<T, I>(s, red, map, mis, mode, mode == (int)mis, mode != 1, mode == 2, ++seed);
  }
  test_relu_forward<T, I, true>(s, map, 0, 0, false, false, 0, ++seed);  // null mask
  test_relu_dx<T, I, false>(s, map, 0, 2, false, ++seed);                // dz-only pass
}
// The one-pass eval backward (bn_backward_eval_*) against the two passes it replaces, on the same
// inputs: the reduce (bn_backward_reduce[_relu]_*, coef null) and the eval dx
// (bn_backward_dx[_relu|_add_relu]_*, coef null), both checked against f64 references above.
// dweight, dbias, dx and dz must match BIT FOR BIT (same walk and grid for the sums, DxEvalOp's
// expression for dx). mode 0: plain; 1: relu mask; 2: add_relu mask and dz. alias: dx = dy.
// map: the dx pass's rows block (the reduce's own may be too narrow for it, bx*VEC < 32).
template <class T, class I>
void test_backward_eval(const Shape& s, const Cfg& red, const Cfg& map, size_t mis, int mode, bool alias, bool stat_is_var, int accumulate,
                        unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  const u64 n = s.numel(), C = s.C;
  const Raw<T> guard = to_raw<T>(-777.0);
  Buf<T> x(n, mis, guard), dy(n, mis, guard), dx(n, mis, guard), dz(n, mis, guard);
  fill(x, rng, 1.0, 2.0);
  fill(dy, rng, 0.1, 1.0);
  std::vector<u32> mask = mode > 0 ? random_mask(s, rng) : std::vector<u32>();
  if (mode > 0 && n > 4) {
    dy[2] = to_raw<T>(NAN);  // bit 0: dropped
    set_bit(s, mask, n - 2, false);
  }
  const Buf<T> dy0 = dy;
  std::vector<float> mean(C), st(C), w(C), dw(C, 0.5f), db(C, -0.25f), partials(C * red.grid * 2, NAN);
  std::vector<u32> sem(C, 0);
  for (u64 c = 0; c < C; ++c) {
    mean[c] = 1.0f + 0.01f * (float)c;
    st[c] = stat_is_var ? 3.5f + 0.1f * (float)(c % 5) : 0.6f;
    w[c] = 0.7f + 0.05f * (float)(c % 13);
  }
  BackwardEvalParams p{};
  p.x = x.p();
  p.dy = dy.p();
  p.mean = mean.data();
  p.var_or_invstd = st.data();
  p.partials = partials.data();
  p.semaphores = sem.data();
  p.dweight = dw.data();
  p.dbias = db.data();
  p.g = {s.outer, s.C, s.inner};
  p.eps = kEps;
  p.stat_is_var = stat_is_var;
  p.accumulate = accumulate;
  p.splits = (int)red.grid;
  p.dx = alias ? (void*)dy.p() : (void*)dx.p();
  p.weight = w.data();
  p.mask = mode > 0 ? mask.data() : nullptr;
  p.dz = mode == 2 ? (void*)dz.p() : nullptr;
  std::string tag = fused_tag<T, I>(mode == 0 ? "eval" : mode == 1 ? "eval_relu" : "eval_add_relu", s, red, mis) +
                    (alias ? " dx=dy" : "");
  emu::g_launch_tag = tag;
  const dim3 rows_block(red.rows ? red.bx : 256, red.rows ? 256 / red.bx : 1);
  if (red.rows) launch_backward_eval_rows<T, I>(rows_grid<T>(C, red), rows_block, p);
  else launch_backward_eval_planar<T, I>(dim3(red.grid, red.gy), dim3(256), p);
  tag += policies_tag();
  // The two passes, on fresh copies of every output.
  Buf<T> dy2 = dy0, dx2(n, mis, guard), dz2(n, mis, guard);
  std::vector<float> dw2(C, 0.5f), db2(C, -0.25f), partials2(C * red.grid * 2, NAN);
  std::vector<u32> sem2(C, 0);
  BackwardReduceReluParams r{};
  static_cast<BackwardReduceParams&>(r) = static_cast<const BackwardReduceParams&>(p);
  r.dy = dy2.p();
  r.partials = partials2.data();
  r.semaphores = sem2.data();
  r.dweight = dw2.data();
  r.dbias = db2.data();
  r.mask = p.mask;
  BackwardElementwiseReluParams e{};
  e.x = x.p();
  e.dy = dy2.p();
  e.dx = alias ? (void*)dy2.p() : (void*)dx2.p();
  e.mean = mean.data();
  e.var_or_invstd = st.data();
  e.weight = w.data();
  e.g = p.g;
  e.eps = kEps;
  e.stat_is_var = stat_is_var;
  e.mask = p.mask;
  e.dz = mode == 2 ? (void*)dz2.p() : nullptr;
  emu::g_launch_tag = tag + " (the two passes)";
  if (red.rows) {
    const Cfg map2{true, 2, 0, map.bx};
    const dim3 map_rows = map_grid<T>(s, map2), map_block(map.bx, 256 / map.bx);
    if (mode == 0) launch_backward_reduce_rows<T, I>(rows_grid<T>(C, red), rows_block, r);
    else launch_backward_reduce_relu_rows<T, I>(rows_grid<T>(C, red), rows_block, r);
    if (mode == 0) launch_backward_dx_rows<T, I>(map_rows, map_block, e);
    else if (mode == 1) launch_backward_dx_relu_rows<T, I>(map_rows, map_block, e);
    else launch_backward_dx_add_relu_rows<T, I>(map_rows, map_block, e);
  } else {
    if (mode == 0) launch_backward_reduce_planar<T, I>(dim3(red.grid, red.gy), dim3(256), r);
    else launch_backward_reduce_relu_planar<T, I>(dim3(red.grid, red.gy), dim3(256), r);
    if (mode == 0) launch_backward_dx_planar<T, I>(dim3(3), dim3(256), e);
    else if (mode == 1) launch_backward_dx_relu_planar<T, I>(dim3(3), dim3(256), e);
    else launch_backward_dx_add_relu_planar<T, I>(dim3(3), dim3(256), e);
  }
  const Buf<T>& out = alias ? dy : dx;
  const Buf<T>& out2 = alias ? dy2 : dx2;
  CHECK(out.guards_intact() && dz.guards_intact(), "%s: write outside dx or dz", tag.c_str());
  CHECK(std::all_of(sem.begin(), sem.end(), [](u32 v) { return v == 0; }), "%s: semaphores not reset", tag.c_str());
  int bad = 0;
  for (u64 e2 = 0; e2 < n; ++e2) {
    ++g_checks;
    const bool same = out.v[out.off + e2] == out2.v[out2.off + e2] && dz.v[dz.off + e2] == dz2.v[dz2.off + e2];
    if (!same && bad++ < 3)
      CHECK(false, "%s: dx/dz[%llu] = %.9g/%.9g, two passes %.9g/%.9g", tag.c_str(), e2, out.at(e2), dz.at(e2), out2.at(e2),
            dz2.at(e2));
  }
  for (u64 c = 0; c < C; ++c) {
    ++g_checks;
    CHECK(std::memcmp(&dw[c], &dw2[c], 4) == 0 && std::memcmp(&db[c], &db2[c], 4) == 0,
          "%s: channel %llu dweight/dbias %.9g/%.9g, two passes %.9g/%.9g", tag.c_str(), c, dw[c], db[c], dw2[c], db2[c]);
  }
}

// Combination k of (dtype, index width), so that a list of shapes covers all six.
static void fused_combo(int k, const Shape& s, const Cfg& map, const Cfg& red, unsigned& seed) {
  switch (k % 6) {
    case 0: fused_all<F, u32>(s, map, red, seed); break;
    case 1: fused_all<H, u64>(s, map, red, seed); break;
    case 2: fused_all<B, u32>(s, map, red, seed); break;
    case 3: fused_all<F, u64>(s, map, red, seed); break;
    case 4: fused_all<H, u32>(s, map, red, seed); break;
    default: fused_all<B, u64>(s, map, red, seed); break;
  }
}

static void fused_group() {
  unsigned seed = 2000;
  // Planar: inner below, at and past a word (32), word multiples, vector multiples (4, 8) and
  // not, a tail inside a unit; more warps than units (blocks = 100: idle collective slices);
  // gy < C (the reduce's channel loop). numel % VEC == 0 with odd planes (7x7, 3x3, 14x14,
  // planes below a vector): the forward and dx take the flat 16-byte path (mask words spanning
  // planes), the reduce reads those words on its scalar path (planes not starting on a word).
  struct P {
    Shape s;
    unsigned blocks, splits, gy;
  };
  // Packed reduce units (several planes per warp unit, gathered mask bits): 7x7, 5x5, 3x3, 1x2,
  // 4x4 and 127 with partial last units and several splits (a multiple of 6 shapes, so the
  // rows cases below keep their dtypes).
  const P ps[] = {{{2, 3, 5}, 1, 1, 3},  {{3, 2, 257}, 2, 2, 1}, {{2, 3, 1024}, 3, 3, 2}, {{1, 5, 33}, 4, 2, 3},
                  {{2, 2, 4097}, 7, 3, 2}, {{3, 4, 7}, 100, 2, 4}, {{2, 3, 2}, 2, 2, 3},    {{4, 3, 256}, 1, 1, 3},
                  {{2, 3, 32}, 3, 2, 3},  {{2, 2, 64}, 2, 2, 2},   {{3, 2, 40}, 5, 1, 2},    {{2, 3, 96}, 2, 3, 1},
                  {{2, 4, 49}, 3, 2, 3},  {{3, 8, 9}, 2, 2, 5},    {{2, 4, 3}, 1, 1, 4},     {{2, 8, 196}, 5, 3, 8},
                  {{23, 3, 49}, 3, 3, 2}, {{37, 2, 9}, 2, 2, 2},   {{41, 2, 25}, 2, 1, 2},   {{259, 2, 2}, 2, 4, 2},
                  {{19, 3, 16}, 2, 2, 3}, {{5, 2, 127}, 2, 2, 2}};
  int k = 0;
  for (const P& q : ps)
    for (int r = 0; r < 2; ++r) fused_combo(k++, q.s, Cfg{false, q.blocks, 0, 0}, Cfg{false, q.splits, q.gy, 0}, seed);
  // Rows (inner == 1): C below, at and past 32, vector multiples and not; the reductions' bx as
  // launch::rows_block picks it for C, the maps' for the super-row width (next power of two of
  // the columns, at most 32), and wider blocks (bx*VEC >= 32: the maps' mask contract).
  // Super-rows (P = lcm(C, 32*VEC)): C = 1, 3, 5, 7, 12, 100, 257 with full super-rows and a
  // partial last one, numel % VEC != 0 (scalar path even when aligned: 1665, 7710, 37, 35980),
  // a tensor shorter than one super-row (7710, 37, 6), and C % 32 == 0 shapes (P = C or a
  // multiple).
  const Shape rs[] = {{7, 3, 1},    {60, 17, 1},   {40, 32, 1},   {9, 1001, 1},  {300, 8, 1},   {5, 1, 1},
                      {50, 64, 1},  {3, 2048, 1},  {50, 24, 1},   {20, 33, 1},   {20, 100, 1},  {3, 65, 1},
                      {1000, 1, 1}, {37, 1, 1},    {300, 3, 1},   {2, 3, 1},     {333, 5, 1},   {300, 7, 1},
                      {100, 12, 1}, {70, 100, 1},  {30, 257, 1},  {140, 257, 1}};
  for (const Shape& s : rs)
    for (unsigned g : {1u, 3u}) {
      const int vec = k % 3 == 0 ? 4 : 8;  // fused_combo(k): f32 when k % 3 == 0
      const u64 width = vec == 4 ? map_width<F>(s) : map_width<H>(s);
      const Cfg map{true, g, 0, bx_for(width, vec)}, red{true, g, 0, bx_for(s.C, vec)};
      fused_combo(k++, s, map, red, seed);
    }
  for (const Shape& s : {Shape{30, 33, 1}, Shape{7, 1001, 1}, Shape{4, 300, 1}}) {
    const Cfg c64{true, 2, 0, 64}, c32{true, 2, 0, 32};
    fused_combo(4, s, c64, c64, seed);  // f16 i32
    fused_combo(3, s, c32, c32, seed);  // f32 i64
  }
}
REGISTER_GROUP(fused, fused_group);
#endif  // EMU_GROUP_fused

// =================================================================================================
// conv_direct_{f32,f16,bf16}: ConvNd, ConvTransposeNd and Linear against a direct f64 reference
// written here (the conv gathers, the transposed conv scatters: its adjoint form).
#ifdef EMU_GROUP_conv
template <class T> void launch_conv(unsigned blocks, const ConvDirectParams& p) {
  g_entries.insert(std::string("conv_direct_") + Fmt<T>::name);
  emu_launch(dim3(blocks), dim3(256), [&] {
    if constexpr (std::is_same_v<T, float>) conv_direct_f32(p);
    else if constexpr (std::is_same_v<T, __half>) conv_direct_f16(p);
    else conv_direct_bf16(p);
  });
}

struct ConvCase {
  const char* name;
  bool transposed;
  u64 N, c_in, c_out, groups;
  int dims;             // spatial dimensions, 0..3 (0: Linear)
  unsigned L[3], k[3], s[3], p[3], d[3], op[3];  // per spatial dimension; op: output padding
};

// One case in dtype T, weight layout cl, with or without a bias, on several grids.
template <class T> void test_conv(const ConvCase& cc, bool cl, bool with_bias, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> ux(-1, 1), uw(-0.5, 0.5);
  unsigned L[3], K[3], S[3], P[3], D[3], O[3];
  for (int i = 0; i < 3; ++i) {
    const bool has = i < cc.dims;
    L[i] = has ? cc.L[i] : 1;
    K[i] = has ? cc.k[i] : 1;
    S[i] = has ? cc.s[i] : 1;
    P[i] = has ? cc.p[i] : 0;
    D[i] = has ? cc.d[i] : 1;
    const long long o = cc.transposed ? (long long)(L[i] - 1) * S[i] - 2ll * P[i] + (long long)D[i] * (K[i] - 1) + (has ? cc.op[i] : 0) + 1
                                      : ((long long)L[i] + 2ll * P[i] - (long long)D[i] * (K[i] - 1) - 1) / S[i] + 1;
    O[i] = (unsigned)o;
    if (o < 1) {
      CHECK(false, "conv case %s: empty output (test bug)", cc.name);
      return;
    }
  }
  const u64 G = cc.groups, cin_g = cc.c_in / G, cout_g = cc.c_out / G;
  const u64 A0 = cc.transposed ? cc.c_in : cc.c_out, A1 = cc.transposed ? cout_g : cin_g;
  const u64 KV = (u64)K[0] * K[1] * K[2];
  const u64 LV = (u64)L[0] * L[1] * L[2], OV = (u64)O[0] * O[1] * O[2];
  const u64 nx = cc.N * cc.c_in * LV, nw = A0 * A1 * KV, ny = cc.N * cc.c_out * OV;
  Buf<T> x(nx, 1, to_raw<T>(-9.0)), w(nw, 0, to_raw<T>(-9.0)), b(cc.c_out, 1, to_raw<T>(-9.0)), y(ny, 1, to_raw<T>(-7.0));
  for (u64 i = 0; i < nx; ++i) x[i] = to_raw<T>(ux(rng));
  for (u64 i = 0; i < nw; ++i) w[i] = to_raw<T>(uw(rng));
  for (u64 i = 0; i < cc.c_out; ++i) b[i] = to_raw<T>(ux(rng));
  // W[a0, a1, j] in the case's layout: [A0, A1, k...] or [A0, k..., A1].
  auto W = [&](u64 a0, u64 a1, u64 j) { return w.at(cl ? (a0 * KV + j) * A1 + a1 : (a0 * A1 + a1) * KV + j); };
  auto xi = [&](u64 n, u64 ch, const long long* i) { return (((n * cc.c_in + ch) * L[0] + (u64)i[0]) * L[1] + (u64)i[1]) * L[2] + (u64)i[2]; };
  auto yi = [&](u64 n, u64 o, const long long* q) { return (((n * cc.c_out + o) * O[0] + (u64)q[0]) * O[1] + (u64)q[1]) * O[2] + (u64)q[2]; };
  std::vector<double> ref(ny, 0.0), mag(ny, 0.0);
  for (u64 n = 0; n < cc.N; ++n)
    for (u64 g = 0; g < G; ++g)
      for (u64 c = 0; c < cin_g; ++c)
        for (u64 ol = 0; ol < cout_g; ++ol)
          for (u64 j0 = 0; j0 < K[0]; ++j0)
            for (u64 j1 = 0; j1 < K[1]; ++j1)
              for (u64 j2 = 0; j2 < K[2]; ++j2) {
                const u64 ch = g * cin_g + c, o = g * cout_g + ol, j = (j0 * K[1] + j1) * K[2] + j2;
                const long long jj[3] = {(long long)j0, (long long)j1, (long long)j2};
                const double wv = cc.transposed ? W(ch, ol, j) : W(o, c, j);
                // Gather (conv): y[q] += W x[q s + j d - p], walking the outputs q. Scatter
                // (transposed): x[i] goes to y[i s + j d - p], walking the inputs i. Either way
                // the walked position u reaches v = u s + j d - p, which must lie in range.
                const unsigned* walked = cc.transposed ? L : O;
                const unsigned* reached = cc.transposed ? O : L;
                for (long long u0 = 0; u0 < walked[0]; ++u0)
                  for (long long u1 = 0; u1 < walked[1]; ++u1)
                    for (long long u2 = 0; u2 < walked[2]; ++u2) {
                      const long long u[3] = {u0, u1, u2};
                      long long v[3];
                      bool in = true;
                      for (int t = 0; t < 3; ++t) {
                        v[t] = u[t] * S[t] + jj[t] * D[t] - P[t];
                        in = in && v[t] >= 0 && v[t] < reached[t];
                      }
                      if (!in) continue;
                      const long long* q = cc.transposed ? v : u;
                      const long long* i = cc.transposed ? u : v;
                      const double term = wv * x.at(xi(n, ch, i));
                      ref[yi(n, o, q)] += term;
                      mag[yi(n, o, q)] += std::fabs(term);
                    }
              }
  if (with_bias)
    for (u64 e = 0; e < ny; ++e) {
      const u64 o = e / OV % cc.c_out;
      ref[e] += b.at(o);
      mag[e] += std::fabs(b.at(o));
    }
  ConvDirectParams p{};
  p.x = x.p();
  p.weight = w.p();
  p.bias = with_bias ? b.p() : nullptr;
  p.y = y.p();
  p.c_in = cc.c_in;
  p.c_out = cc.c_out;
  p.c_in_per_group = cin_g;
  p.c_out_per_group = cout_g;
  p.axis1 = A1;
  p.numel = ny;
  for (int i = 0; i < 3; ++i) {
    p.input[i] = L[i];
    p.output[i] = O[i];
    p.kernel[i] = K[i];
    p.stride[i] = S[i];
    p.padding[i] = P[i];
    p.dilation[i] = D[i];
  }
  p.transposed = cc.transposed;
  p.weight_channels_last = cl;
  // f32 accumulation of n = c_in/G * kernel volume products and the bias: |error| <= gamma_n * mag,
  // then one rounding to T.
  const double nterms = (double)(cin_g * KV + 1), gamma = nterms * kU32 / (1 - nterms * kU32);
  const unsigned full = (unsigned)((ny + 255) / 256);
  for (unsigned blocks : {1u, 3u, full}) {
    std::fill(y.v.begin(), y.v.end(), to_raw<T>(-7.0));
    std::string tag = std::string("conv ") + cc.name + " " + Fmt<T>::name + (cl ? " channels-last" : " channels-first") +
                      (with_bias ? " bias" : "") + " blocks=" + std::to_string(blocks);
    emu::g_launch_tag = tag;
    launch_conv<T>(blocks, p);
    tag += policies_tag();
    CHECK(y.guards_intact(), "%s: write outside y", tag.c_str());
    int bad = 0;
    for (u64 e = 0; e < ny; ++e) {
      const double got = y.at(e), tol = gamma * mag[e] + ulp_of<T>(std::max(std::fabs(got), std::fabs(ref[e])));
      ++g_checks;
      if (!(std::fabs(got - ref[e]) <= tol)) {
        ++g_fail;
        if (bad++ < 3 && g_fail <= 60) std::printf("FAIL %s: y[%llu] %.9g, reference %.9g\n", tag.c_str(), e, got, ref[e]);
      }
    }
  }
}

static void conv_group() {
  // name, transposed, N, C_in, C_out, groups, dims, L, k, stride, padding, dilation, output padding
  const ConvCase cases[] = {
      {"linear", false, 5, 7, 3, 1, 0, {}, {}, {}, {}, {}, {}},
      {"conv1d", false, 3, 2, 4, 1, 1, {11}, {3}, {1}, {1}, {1}, {}},
      {"conv1d strided padded dilated", false, 2, 3, 5, 1, 1, {17}, {3}, {2}, {2}, {3}, {}},
      {"conv1d depthwise", false, 2, 6, 6, 6, 1, {9}, {3}, {1}, {1}, {1}, {}},
      {"conv2d grouped", false, 2, 4, 6, 2, 2, {7, 6}, {3, 2}, {2, 1}, {1, 0}, {1, 2}, {}},
      {"conv2d 1x1 many outputs", false, 3, 3, 8, 1, 2, {9, 11}, {1, 1}, {1, 1}, {0, 0}, {1, 1}, {}},
      {"conv3d", false, 1, 2, 3, 1, 3, {5, 4, 6}, {2, 3, 3}, {1, 2, 1}, {1, 1, 0}, {2, 1, 1}, {}},
      {"conv2d padding past the kernel", false, 1, 1, 2, 1, 2, {3, 2}, {2, 2}, {3, 1}, {3, 2}, {1, 1}, {}},
      {"conv_transpose1d", true, 2, 3, 4, 1, 1, {6}, {3}, {2}, {1}, {1}, {1}},
      {"conv_transpose1d dilated", true, 2, 2, 3, 1, 1, {5}, {2}, {3}, {0}, {2}, {2}},
      {"conv_transpose2d grouped", true, 2, 4, 6, 2, 2, {4, 5}, {3, 2}, {2, 3}, {1, 0}, {1, 2}, {1, 0}},
      {"conv_transpose3d", true, 1, 2, 2, 1, 3, {3, 2, 4}, {2, 2, 3}, {2, 1, 2}, {0, 1, 1}, {1, 2, 1}, {1, 0, 1}},
      {"conv_transpose2d depthwise", true, 2, 3, 3, 3, 2, {4, 4}, {3, 3}, {1, 2}, {1, 1}, {1, 1}, {0, 1}},
  };
  unsigned seed = 3000;
  for (const ConvCase& cc : cases)
    for (int cl = 0; cl < 2; ++cl)
      for (int bias = 0; bias < 2; ++bias) {
        test_conv<F>(cc, cl, bias, ++seed);
        test_conv<H>(cc, cl, bias, ++seed);
        test_conv<B>(cc, cl, bias, ++seed);
      }
}
REGISTER_GROUP(conv, conv_group);
#endif  // EMU_GROUP_conv

// =================================================================================================
int main() {
  long long total_checks = 0;
  for (const Group& gr : groups()) {
    const long long c0 = g_checks;
    const int f0 = g_fail, e0 = emu::g_errors;
    gr.body();
    g_fail += emu::g_errors - e0;  // emulator errors (deadlocks, divergent collectives) are failures
    std::printf("%s: %lld checks, %d failures\n", gr.name, g_checks - c0, g_fail - f0);
    total_checks += g_checks - c0;
  }
  std::string entries;
  for (const std::string& e : g_entries) entries += " " + e;
  std::printf("entry points:%s\n", entries.c_str());
  std::printf("%lld passed, %d failed\n", total_checks - g_fail, g_fail);
  return g_fail ? 1 : 0;
}

// =================================================================================================
#ifdef EMU_GROUP_onchip
DISPATCH(stats_rows, StatsParams)
DISPATCH(normalize_rows, NormalizeParams)
DISPATCH(onchip_rows, OnchipParams)

// Cooperative, with the dynamic shared memory of the slots (kernels/bn_onchip.cu).
template <class T, class I> void launch_onchip(dim3 grid, dim3 block, size_t shared, const OnchipParams& p) {
  g_entries.insert(std::string("bn_onchip_rows_") + Fmt<T>::name + "_" + iname<I>());
  emu_launch_cooperative(grid, block, shared, [&] { call_onchip_rows<T, I>(p); });
}
// launch::rows_block: bx = ceil(C / VEC) columns rounded up to a power of two, at most 32.
template <class T> unsigned rows_bx(u64 C) {
  const u64 cols = (C + VEC<T> - 1) / VEC<T>;
  unsigned bx = 1;
  while (bx < cols && bx < 32) bx *= 2;
  return bx;
}

struct OnchipCase {
  size_t mis_x = 0, mis_y = 0;
  bool inplace = false, affine = true, running = true;
  int unbiased = 1, bad_ch = -1;
  double mu = 2.0, sigma = 1.5;
  unsigned barrier = 0;  // the barrier word before the launch (its bit 31 is free)
};

template <class T> bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// The single pass against the split path (bn_stats_rows on the same grid, block and splits, then
// bn_normalize_rows on its super-rows: bitwise equal, kernels/bn_onchip.cu) and against the f64 reference with the
// stats and normalize groups' tolerances.
template <class T, class I> void test_onchip(const Shape& s, unsigned splits, const OnchipCase& k, unsigned seed) {
  begin_case();
  std::mt19937 rng(seed);
  const u64 C = s.C, rows = s.outer;
  const int const_ch = C > 1 ? 1 : -1;
  Buf<T> x(s.numel(), k.mis_x, to_raw<T>(-12345.0));
  gen(x, s, rng, k.mu, k.sigma, const_ch, k.bad_ch);
  const Buf<T> x0 = x;
  Buf<T> y(s.numel(), k.mis_y, to_raw<T>(-12345.0)), y_split(s.numel(), k.mis_y, to_raw<T>(-12345.0));
  const unsigned bx = rows_bx<T>(C), by = 256 / bx;
  const Cfg cfg{true, splits, 0, bx};
  const dim3 grid = rows_grid<T>(C, cfg), block(bx, by);
  const u64 slots = (rows + (u64)splits * by - 1) / ((u64)splits * by);
  std::vector<float> w(C), b(C), rm0(C), rv0(C);
  for (u64 c = 0; c < C; ++c) {
    w[c] = 0.5f + 0.1f * (float)(c % 7);
    b[c] = -1.0f + 0.3f * (float)(c % 11);
    rm0[c] = 0.25f * (float)c;
    rv0[c] = 1.0f + (float)c;
  }
  // The split path.
  std::vector<float> partials(C * splits * 3, NAN), mean_s(C, NAN), lo_s(C, NAN), inv_s(C, NAN), rm_s = rm0, rv_s = rv0;
  std::vector<u32> sem(sem_count<T>(C, cfg), 0);
  StatsParams sp{};
  sp.x = x.p();
  sp.partials = partials.data();
  sp.semaphores = sem.data();
  sp.save_mean = mean_s.data();
  sp.save_mean_lo = lo_s.data();
  sp.save_invstd = inv_s.data();
  sp.running_mean = k.running ? rm_s.data() : nullptr;
  sp.running_var = k.running ? rv_s.data() : nullptr;
  sp.g = {s.outer, s.C, s.inner};
  sp.eps = kEps;
  sp.factor = 0.1f;
  sp.unbiased = k.unbiased;
  sp.splits = (int)splits;
  std::string tag = std::string("onchip ") + Fmt<T>::name + " " + iname<I>() + " " + shape_tag(s) + " " + cfg_tag(cfg) +
                    " misalign=" + std::to_string(k.mis_x) + "/" + std::to_string(k.mis_y) + (k.inplace ? " in-place" : "");
  emu::g_launch_tag = tag + " (split path)";
  launch_stats_rows<T, I>(grid, block, sp);
  NormalizeParams np{};
  np.x = x.p();
  np.y = y_split.p();
  np.mean = mean_s.data();
  np.mean_lo = lo_s.data();
  np.var_or_invstd = inv_s.data();
  np.weight = k.affine ? w.data() : nullptr;
  np.bias = k.affine ? b.data() : nullptr;
  np.g = sp.g;
  // The normalize walks super-rows (its own grid); y is elementwise, so its bits do not depend
  // on the traversal.
  const unsigned map_bx = bx_for(map_width<T>(s), VEC<T>);
  const Cfg map_cfg{true, 4, 0, map_bx};
  launch_normalize_rows<T, I>(map_grid<T>(s, map_cfg), dim3(map_bx, 256 / map_bx), np);
  // The single pass.
  std::vector<float> partials2(C * splits * 3, NAN), mean(C, NAN), lo(C, NAN), inv(C, NAN), rm = rm0, rv = rv0;
  unsigned barrier = k.barrier;
  OnchipParams p{};
  p.x = x.p();
  p.y = k.inplace ? (void*)x.p() : (void*)y.p();
  p.weight = np.weight;
  p.bias = np.bias;
  p.partials = partials2.data();
  p.barrier = &barrier;
  p.save_mean = mean.data();
  p.save_mean_lo = lo.data();
  p.save_invstd = inv.data();
  p.running_mean = k.running ? rm.data() : nullptr;
  p.running_var = k.running ? rv.data() : nullptr;
  p.g = sp.g;
  p.eps = kEps;
  p.factor = 0.1f;
  p.unbiased = k.unbiased;
  p.splits = (int)splits;
  emu::g_launch_tag = tag;
  const int errors = emu::g_errors;
  launch_onchip<T, I>(grid, block, slots * 4096, p);
  tag += policies_tag();
  CHECK(emu::g_errors == errors, "%s: the emulator reported errors", tag.c_str());
  const Buf<T>& out = k.inplace ? x : y;
  CHECK(out.guards_intact(), "%s: write outside the output tensor", tag.c_str());
  if (!k.inplace) CHECK(std::equal(x.v.begin(), x.v.end(), x0.v.begin()), "%s: the input was modified", tag.c_str());
  CHECK((barrier & 0x7fffffffu) == 0, "%s: the barrier word is 0x%08x after the launch", tag.c_str(), barrier);
  CHECK(splits > 1 || barrier == k.barrier, "%s: one split touched the barrier word", tag.c_str());
  // Bitwise the split path's statistics, running update and y.
  CHECK(same_bits(mean, mean_s) && same_bits(lo, lo_s) && same_bits(inv, inv_s), "%s: statistics differ from the split path's bits",
        tag.c_str());
  CHECK(same_bits(rm, rm_s) && same_bits(rv, rv_s), "%s: running statistics differ from the split path's bits", tag.c_str());
  CHECK(std::memcmp(out.v.data() + out.off, y_split.v.data() + y_split.off, s.numel() * sizeof(Raw<T>)) == 0,
        "%s: y differs from the split path's bits", tag.c_str());
  // The reference.
  const RefStats ref = ref_stats(x0, s);
  const double m = (double)s.m();
  const double var_tol = k.mu > 100 ? 2e-6 : 1e-5;
  int bad = 0;
  for (u64 c = 0; c < C; ++c) {
    if ((int)c == k.bad_ch) {
      CHECK(std::isnan(mean[c]) || std::isnan(inv[c]), "%s: channel %llu holds a NaN but its statistics are %g %g", tag.c_str(), c,
            mean[c], inv[c]);
      continue;
    }
    const double sd = std::sqrt(ref.var[c]);
    const double pair = (double)mean[c] + (double)lo[c];
    CHECK(mean[c] == (float)pair, "%s: mean[%llu] %.9g is not the rounding of mean + mean_lo", tag.c_str(), c, mean[c]);
    CHECK(std::fabs(pair - ref.mean[c]) <= 1e-5 * sd + 1e-30, "%s: mean + mean_lo [%llu] %.12g, reference %.12g", tag.c_str(), c, pair,
          ref.mean[c]);
    const double inv_ref = 1.0 / std::sqrt(ref.var[c] + (double)kEps);
    CHECK(std::fabs(inv[c] - inv_ref) <= var_tol * inv_ref, "%s: invstd[%llu] %.9g, reference %.9g", tag.c_str(), c, inv[c], inv_ref);
    if (k.running) {
      const double batch_var = k.unbiased ? ref.var[c] * m / (m - 1) : ref.var[c];
      const double rm_ref = 0.1 * ref.mean[c] + 0.9 * rm0[c], rv_ref = 0.1 * batch_var + 0.9 * rv0[c];
      CHECK(std::fabs(rm[c] - rm_ref) <= 2e-6 * (std::fabs(rm_ref) + sd) + 1e-7, "%s: running_mean[%llu] %.9g, reference %.9g",
            tag.c_str(), c, rm[c], rm_ref);
      CHECK(std::fabs(rv[c] - rv_ref) <= var_tol * rv_ref + 1e-7, "%s: running_var[%llu] %.9g, reference %.9g", tag.c_str(), c, rv[c],
            rv_ref);
    } else {
      CHECK(rm[c] == rm0[c] && rv[c] == rv0[c], "%s: running statistics written without being given", tag.c_str());
    }
    // y: the normalize group's bound around the reference statistics, widened by their own
    // (the stats group's: mean to 1e-5 sd, invstd to var_tol relative).
    const double a = (k.affine ? (double)w[c] : 1.0) * inv_ref, bb = k.affine ? (double)b[c] : 0.0;
    for (u64 r = 0; r < rows; ++r) {
      const u64 e = s.idx(r, c, 0);
      const double d = x0.at(e) - ref.mean[c], want = d * a + bb, got = out.at(e);
      const bool ok = (int)c == const_ch ? got == round_to<T>(bb)
                                         : std::fabs(got - want) <= 8 * kU32 * (std::fabs(d * a) + std::fabs(bb)) + ulp_of<T>(want) +
                                                                       var_tol * std::fabs(d * a) + 1e-5 * sd * std::fabs(a);
      ++g_checks;
      if (!ok && bad++ < 3) CHECK(false, "%s: y[%llu] (row %llu, c %llu) = %.8g, reference %.8g", tag.c_str(), e, r, c, got, want);
    }
  }
}

static void onchip_group() {
  // C = 1, 8, 64, 100 (a masked scalar tail for every dtype), 256 with two merge levels; rows
  // not a multiple of the blocks' band (splits * by); one split (no barrier) and several.
  struct Q {
    Shape s;
    unsigned splits;
  };
  const Q qs[] = {{{37, 1, 1}, 1},   {{300, 1, 1}, 3},   {{1003, 8, 1}, 2}, {{50, 8, 1}, 1},   {{129, 64, 1}, 3},
                  {{70, 64, 1}, 4},  {{201, 100, 1}, 3}, {{9, 100, 1}, 1},  {{33, 3, 1}, 5}};
  unsigned seed = 900;
  for (const Q& q : qs) {
    const int nc = q.s.C > 2 ? 2 : -1;
    test_onchip<F, u32>(q.s, q.splits, {.bad_ch = nc}, ++seed);
    test_onchip<F, u64>(q.s, q.splits, {.mis_x = 1, .mis_y = 1, .barrier = 0x80000000u}, ++seed);
    test_onchip<H, u32>(q.s, q.splits, {.inplace = true, .running = false}, ++seed);
    test_onchip<H, u64>(q.s, q.splits, {.mis_x = 1, .affine = false, .bad_ch = nc}, ++seed);
    test_onchip<B, u32>(q.s, q.splits, {.mis_y = 1, .unbiased = 0}, ++seed);
    test_onchip<B, u64>(q.s, q.splits, {.inplace = true}, ++seed);
    test_onchip<F, u32>(q.s, q.splits, {.mu = 1000, .sigma = 0.1}, ++seed);  // large mean, small spread
  }
  // Two merge levels (splits > kMergeRun * by): f16 C = 256 and f32 C = 128 are one tile of bx 32,
  // by 8 (run 64).
  test_onchip<H, u32>({700, 256, 1}, 70, {}, ++seed);
  test_onchip<F, u64>({600, 128, 1}, 66, {.barrier = 0x80000000u}, ++seed);
}
REGISTER_GROUP(onchip, onchip_group);
#endif  // EMU_GROUP_onchip
