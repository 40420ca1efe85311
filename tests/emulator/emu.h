// emu.h: host (CPU) emulation of the CUDA features used by kernels/*.cu, for
// tests/emulator/kernels_test.cpp. See tests/emulator/README.md for what it proves and what not.
//
// Execution model. A launch runs its blocks one after another (in an order chosen by the launch's
// schedule policy). The threads of a block are fibers (user-space stacks, one OS thread): a fiber
// runs until it reaches a synchronization point (__syncthreads, a warp collective) or exits, then
// the scheduler picks the next ready fiber. Barriers are exact: a fiber at __syncthreads is not
// resumed before every thread of its block has arrived there; a fiber at a warp collective
// (__shfl_*_sync, __syncwarp, votes) is not resumed before all 32 lanes of its warp have arrived at
// the same kind of collective. Anything else (a thread that exits while others wait at a barrier,
// part of a warp at a shuffle and the rest at __syncthreads, a partial mask) is reported as an
// error, never a hang.
//
// Cooperative launches (launch_cooperative) run all blocks' fibers in one schedule, switching
// blocks when one has nothing ready; __nanosleep is a spin's yield point (see there).
//
// Races. Between two synchronization points a fiber runs alone, so an access that lacks a barrier
// is "won" by whichever fiber the scheduler runs first. The policies (emu::Policy) run threads
// depth-first in ascending, descending or random order, or round-robin, and blocks in ascending,
// descending or random order; the policy changes from launch to launch, deterministically, so a
// missing __syncthreads makes some launch read data that is not written yet (or overwritten).
// __shared__ memory is filled with 0xFF bytes (NaN as float, -1 as int) before every block, so a
// read of shared memory the block did not write is loud, not a stale value of the previous block.
//
// Inline PTX and __shared__ declarations are rewritten by tests/kernel_emulator.rs before the
// kernels are compiled here: asm("op.a.b %0, %1, ...;" : "=x"(out) : "x"(in)...) becomes
// out = emu_ptx_op_a_b(in, ...), `__shared__ T name[N];` becomes a static plus an
// emu::SharedRegion that registers it for the poisoning, and `extern __shared__ T name[];` a
// pointer to the launch's dynamic shared memory. An emu_ptx_* function missing here is a compile
// error: add the emulation below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// Fibers switch with a few instructions of assembly on x86-64 (ELF); elsewhere, or with
// -DEMU_UCONTEXT, with swapcontext (portable, but a system call per switch: slower).
#if !defined(EMU_UCONTEXT) && !(defined(__x86_64__) && defined(__ELF__))
#define EMU_UCONTEXT 1
#endif
#ifdef EMU_UCONTEXT
#include <ucontext.h>
#endif

#undef __device__
#undef __global__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __launch_bounds__
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Every __shared__ declaration is rewritten by the harness; one that is not (in a form it does not
// parse) must not compile silently as something else.
#define __shared__ EMU_UNTRANSLATED_SHARED_DECLARATION

// The built-in variables. Plain globals: the scheduler sets threadIdx/blockIdx before it resumes a
// fiber, and every resumption is an opaque call, so kernels never see a stale value.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

// ------------------------------------------------------------------------------------------------
// Errors found by the emulator itself (deadlocks, divergent collectives, bad launches).
// ------------------------------------------------------------------------------------------------
inline int g_errors = 0;
inline bool g_quiet = false;      // errors expected (the emulator's self-test): count, do not print
inline std::string g_launch_tag;  // set by the test before a launch: printed with emulator errors
inline const char* policy_name_of_current_launch();

inline void error(const char* fmt, ...) {
  if (g_errors++ < 20 && !g_quiet) {
    std::printf("EMULATOR ERROR [%s, %s policy]: ", g_launch_tag.c_str(), policy_name_of_current_launch());
    va_list ap;
    va_start(ap, fmt);
    std::vprintf(fmt, ap);
    va_end(ap);
    std::printf("\n");
  }
}

// ------------------------------------------------------------------------------------------------
// Shared memory: registered static regions (poisoned before every block) and the dynamic area.
// ------------------------------------------------------------------------------------------------
struct Region {
  void* p;
  size_t n;
};
inline std::vector<Region> g_shared;
inline std::vector<unsigned char> g_dyn_shared;
constexpr unsigned char kPoison = 0xFF;

// Constructed (once, as a function-local static) the first time a fiber passes the declaration:
// no thread of the current block can have written the region yet, so it is poisoned at once too.
struct SharedRegion {
  SharedRegion(void* p, size_t n) {
    g_shared.push_back({p, n});
    std::memset(p, kPoison, n);
  }
};
inline void poison_shared() {
  for (const Region& r : g_shared) std::memset(r.p, kPoison, r.n);
  if (!g_dyn_shared.empty()) std::memset(g_dyn_shared.data(), kPoison, g_dyn_shared.size());
}
inline void* dynamic_shared() { return g_dyn_shared.data(); }

// ------------------------------------------------------------------------------------------------
// Fibers.
// ------------------------------------------------------------------------------------------------
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;
constexpr size_t kStackBytes = 128 * 1024;

enum class State : unsigned char { Ready, AtSyncthreads, AtWarp, Sleeping, Done };
enum class WarpOp : unsigned char { Shuffle, Syncwarp, Vote };
enum class Shfl : unsigned char { Idx, Up, Down, Xor };

// A thread at a warp collective: what it asked for, and (once its group is complete) its result.
struct LaneOp {
  WarpOp op;
  Shfl kind;
  unsigned mask;  // the lanes it synchronizes with (itself included)
  int arg, width;
  uint64_t value, result;
};

// Thread order within a block x block order within a grid.
enum class Policy : int {
  DepthFirstAscending,   // lowest ready thread id first; blocks ascending
  DepthFirstDescending,  // highest ready thread id first; blocks descending
  DepthFirstRandom,      // a random priority per thread; blocks in random order
  RoundRobin,            // ready threads in the order they became ready (lockstep-like); blocks ascending
  Count
};
inline const char* policy_name(Policy p) {
  switch (p) {
    case Policy::DepthFirstAscending: return "depth-first ascending";
    case Policy::DepthFirstDescending: return "depth-first descending";
    case Policy::DepthFirstRandom: return "depth-first random";
    case Policy::RoundRobin: return "round-robin";
    default: return "?";
  }
}

#ifndef EMU_UCONTEXT
extern "C" void emu_ctx_switch(void** save_sp, void* to_sp);
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp,
// switches to to_sp and restores the registers saved there (System V x86-64).
asm(R"(
  .text
  .p2align 4
  .weak emu_ctx_switch
  .type emu_ctx_switch, @function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_ctx_switch, .-emu_ctx_switch
)");
#endif

struct Fiber {
#ifdef EMU_UCONTEXT
  ucontext_t ctx;
#else
  void* sp;
#endif
  State state;
};

struct Scheduler {
  // launch
  void (*entry)(void*) = nullptr;
  void* arg = nullptr;
  Policy policy = Policy::DepthFirstAscending;
  unsigned nt = 0;  // threads per block
  // block
  Fiber f[kMaxThreads];
  unsigned cur = 0;
  unsigned done = 0;
  unsigned at_sync = 0;
  unsigned sync_gen = 0;
  int sync_acc[2] = {0, 0};  // __syncthreads_count/and/or accumulators, by generation parity
  LaneOp lane[kMaxThreads];  // each thread's pending (or last) warp collective
  // ready set: depth-first policies use a bitset over priority ranks, round-robin a FIFO
  uint64_t ready_bits[kMaxThreads / 64];
  unsigned rank_of[kMaxThreads], tid_of[kMaxThreads];
  unsigned fifo[kMaxThreads], fifo_head = 0, fifo_count = 0;
  // stacks
  unsigned char* stacks = nullptr;
  size_t stack_stride = 0;
#ifdef EMU_UCONTEXT
  ucontext_t sched_ctx;
#else
  void* sched_sp = nullptr;
#endif
  uint64_t launches = 0;
  int forced_policy = -2;  // -2: not read yet; -1: cycle; else EMU_POLICY
  // Synchronization events (barrier and collective arrivals, exits): a scheduling round in
  // which only __nanosleep spins ran makes none, so a spin that can never end is found.
  uint64_t progress = 0;
};
inline Scheduler g;

inline void make_ready(unsigned t) {
  g.f[t].state = State::Ready;
  if (g.policy == Policy::RoundRobin) {
    g.fifo[(g.fifo_head + g.fifo_count++) % g.nt] = t;
  } else {
    const unsigned r = g.rank_of[t];
    g.ready_bits[r / 64] |= 1ull << (r % 64);
  }
}

inline bool pick(unsigned& t) {
  if (g.policy == Policy::RoundRobin) {
    if (g.fifo_count == 0) return false;
    t = g.fifo[g.fifo_head];
    g.fifo_head = (g.fifo_head + 1) % g.nt;
    --g.fifo_count;
    return true;
  }
  for (unsigned w = 0; w < (g.nt + 63) / 64; ++w)
    if (g.ready_bits[w]) {
      const unsigned r = w * 64 + (unsigned)__builtin_ctzll(g.ready_bits[w]);
      g.ready_bits[w] &= g.ready_bits[w] - 1;
      t = g.tid_of[r];
      return true;
    }
  return false;
}

inline void set_thread_vars(unsigned t) {
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

// Back to the scheduler (the caller has set its own state).
inline void yield() {
#ifdef EMU_UCONTEXT
  swapcontext(&g.f[g.cur].ctx, &g.sched_ctx);
#else
  emu_ctx_switch(&g.f[g.cur].sp, g.sched_sp);
#endif
}

[[noreturn]] inline void fiber_main() {
  g.entry(g.arg);
  g.f[g.cur].state = State::Done;
  ++g.done;
  ++g.progress;
  yield();
  std::abort();  // a finished fiber is never resumed
}
#ifdef EMU_UCONTEXT
inline void fiber_main_uc() { fiber_main(); }
#endif

inline void init_fiber(unsigned t) {
  unsigned char* base = g.stacks + (size_t)t * g.stack_stride + (size_t)sysconf(_SC_PAGESIZE);
#ifdef EMU_UCONTEXT
  getcontext(&g.f[t].ctx);
  g.f[t].ctx.uc_stack.ss_sp = base;
  g.f[t].ctx.uc_stack.ss_size = kStackBytes;
  g.f[t].ctx.uc_link = nullptr;
  makecontext(&g.f[t].ctx, fiber_main_uc, 0);
#else
  void** sp = reinterpret_cast<void**>(base + kStackBytes);  // 16-byte aligned
  *--sp = nullptr;                                   // fiber_main's "return address": rsp = 8 mod 16 at entry
  *--sp = reinterpret_cast<void*>(&fiber_main);      // popped by emu_ctx_switch's ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
  g.f[t].sp = sp;
#endif
}

// A crash (an out-of-bounds access of a broken kernel, a fiber stack overflow) names the launch
// and the thread before the process dies; on its own stack, so a stack overflow is reported too.
inline void on_crash(int sig) {
  char buf[600];
  const int n = std::snprintf(buf, sizeof buf, "\nEMULATOR CRASH (signal %d) in launch [%s, %s policy], block (%u,%u,%u), thread (%u,%u,%u)\n", sig,
                              g_launch_tag.c_str(), policy_name(g.policy), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
                              threadIdx.z);
  if (n > 0) (void)!write(2, buf, (size_t)std::min(n, (int)sizeof buf - 1));
  signal(sig, SIG_DFL);
  raise(sig);
}
inline void install_crash_report() {
  static std::vector<unsigned char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_handler = on_crash;
  sa.sa_flags = SA_ONSTACK;
  for (int sig : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL}) sigaction(sig, &sa, nullptr);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // what was printed before a crash is not lost
}

inline void alloc_stacks() {
  if (g.stacks) return;
  install_crash_report();
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  g.stack_stride = kStackBytes + page;  // one guard page below every stack
  void* m = mmap(nullptr, g.stack_stride * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("emu: mmap of the fiber stacks");
    std::exit(2);
  }
  g.stacks = static_cast<unsigned char*>(m);
  for (unsigned t = 0; t < kMaxThreads; ++t) mprotect(g.stacks + t * g.stack_stride, page, PROT_NONE);
}

inline void report_deadlock() {
  unsigned at_sync = 0, exited = 0, sleeping = 0;
  std::string warps;
  for (unsigned t = 0; t < g.nt; ++t) {
    at_sync += g.f[t].state == State::AtSyncthreads;
    exited += g.f[t].state == State::Done;
    sleeping += g.f[t].state == State::Sleeping;
    if (g.f[t].state == State::AtWarp && warps.size() < 300)
      warps += " thread " + std::to_string(t) + " at a warp collective (mask " + std::to_string(g.lane[t].mask) + ");";
  }
  error("block (%u,%u,%u) cannot progress: %u of %u threads at __syncthreads, %u exited, %u spinning in __nanosleep;%s (a barrier not "
        "reached by every thread, a warp collective not reached by every lane of its mask, or a spin on another block in a "
        "non-cooperative launch)",
        blockIdx.x, blockIdx.y, blockIdx.z, at_sync, g.nt, exited, sleeping, warps.c_str());
}

// Fibers asleep in __nanosleep become ready again; returns how many there were.
inline unsigned wake_sleepers() {
  unsigned n = 0;
  for (unsigned t = 0; t < g.nt; ++t)
    if (g.f[t].state == State::Sleeping) {
      make_ready(t);
      ++n;
    }
  return n;
}

// A fresh block: poisoned shared memory, every thread a ready fiber in the policy's order.
inline void start_block(std::mt19937& rng) {
  poison_shared();
  g.done = g.at_sync = 0;
  g.sync_acc[0] = g.sync_acc[1] = 0;
  g.fifo_head = g.fifo_count = 0;
  std::memset(g.ready_bits, 0, sizeof g.ready_bits);
  for (unsigned t = 0; t < g.nt; ++t) g.tid_of[t] = t;
  if (g.policy == Policy::DepthFirstDescending) {
    for (unsigned t = 0; t < g.nt; ++t) g.tid_of[t] = g.nt - 1 - t;
  } else if (g.policy == Policy::DepthFirstRandom) {
    std::shuffle(g.tid_of, g.tid_of + g.nt, rng);
  }
  for (unsigned r = 0; r < g.nt; ++r) g.rank_of[g.tid_of[r]] = r;
  for (unsigned t = 0; t < g.nt; ++t) {
    init_fiber(t);
    make_ready(t);
  }
}

// Runs the block's ready fibers until none is ready (all done, waiting, or asleep).
inline void run_ready() {
  unsigned t;
  while (pick(t)) {
    g.cur = t;
    set_thread_vars(t);
#ifdef EMU_UCONTEXT
    swapcontext(&g.sched_ctx, &g.f[t].ctx);
#else
    emu_ctx_switch(&g.sched_sp, g.f[t].sp);
#endif
  }
}

inline void run_block(std::mt19937& rng) {
  start_block(rng);
  run_ready();
  // A fiber spinning in __nanosleep waits for another of its block (the only ones running in a
  // plain launch): wake the sleepers while the block progresses.
  for (uint64_t before = g.progress - 1; g.done != g.nt && before != g.progress && wake_sleepers() > 0;) {
    before = g.progress;
    run_ready();
  }
  if (g.done != g.nt) report_deadlock();  // the fibers are abandoned (kernels hold no resources)
}

inline Policy next_policy() {
  if (g.forced_policy == -2) {
    const char* e = std::getenv("EMU_POLICY");
    g.forced_policy = e ? std::atoi(e) : -1;
  }
  if (g.forced_policy >= 0) return (Policy)(g.forced_policy % (int)Policy::Count);
  return (Policy)(g.launches % (uint64_t)Policy::Count);
}
inline Policy last_policy() { return g.policy; }
inline const char* policy_name_of_current_launch() { return policy_name(g.policy); }

// A launch shape a CUDA device takes: 1..1024 threads (z at most 64), grid y and z below 2^16.
inline bool launch_shape_ok(dim3 grid, dim3 block) {
  const unsigned long long nt = (unsigned long long)block.x * block.y * block.z;
  return nt > 0 && nt <= kMaxThreads && block.z <= 64 && grid.x > 0 && grid.y > 0 && grid.z > 0 && grid.y <= 65535 &&
         grid.z <= 65535;
}

// The launch state every block shares; returns the blocks in the policy's order.
template <class F> std::vector<dim3> begin_launch(dim3 grid, dim3 block, size_t dyn_shared_bytes, F& kernel, std::mt19937& rng) {
  alloc_stacks();
  g.policy = next_policy();
  ++g.launches;
  g.nt = block.x * block.y * block.z;  // <= kMaxThreads
  gridDim = grid;
  blockDim = block;
  g_dyn_shared.assign(dyn_shared_bytes, kPoison);
  using K = std::remove_reference_t<F>;
  g.entry = [](void* a) { (*static_cast<K*>(a))(); };
  g.arg = const_cast<void*>(static_cast<const void*>(&kernel));
  std::vector<dim3> order;
  order.reserve((size_t)grid.x * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(dim3(x, y, z));
  if (g.policy == Policy::DepthFirstDescending) std::reverse(order.begin(), order.end());
  if (g.policy == Policy::DepthFirstRandom) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

template <class F> void launch(dim3 grid, dim3 block, size_t dyn_shared_bytes, F&& kernel) {
  if (!launch_shape_ok(grid, block)) {
    error("invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x, block.y, block.z);
    return;
  }
  std::mt19937 rng((unsigned)(0x9e3779b9u * (g.launches + 1)));
  for (const dim3& b : begin_launch(grid, block, dyn_shared_bytes, kernel, rng)) {
    blockIdx.x = b.x;
    blockIdx.y = b.y;
    blockIdx.z = b.z;
    run_block(rng);
  }
}

// ------------------------------------------------------------------------------------------------
// Cooperative launches (cuLaunchCooperativeKernel): every block of the grid is resident at once,
// so a block may wait for the others (a grid barrier). All blocks' threads are fibers at the same
// time: the scheduler runs one block until none of its fibers is ready (done, at a barrier, or
// asleep in __nanosleep, the spin's yield point), then switches to the next block in the
// policy's order, round after round. A switch saves the block's scheduler state and its shared
// memory (static regions and the dynamic area) and restores the next one's; each block has its
// own fiber stacks. A round in which no block made progress (only spins ran) is reported as a
// deadlock: a grid barrier that not every block reaches.
// ------------------------------------------------------------------------------------------------
struct CoopBlock {
  dim3 idx;
  std::unique_ptr<Scheduler> sched;  // its state while another block runs
  std::vector<unsigned char> shared;  // its static regions (the first `regions`) and dynamic area
  size_t regions = 0;
  bool started = false, finished = false;
};

// Fiber stacks of the blocks past the first (which uses g.stacks), kept for later launches. Guard
// pages only below the stacks a launch uses (each splits the mapping: the kernel's map count
// limits how many there can be, so a cooperative grid is limited to a few hundred blocks).
struct CoopStacks {
  unsigned char* base;
  unsigned guarded;  // stacks [0, guarded) have their guard page
};
inline std::vector<CoopStacks> g_coop_stacks;
inline unsigned char* coop_stacks(size_t i, unsigned threads) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  while (g_coop_stacks.size() <= i) {
    void* m = mmap(nullptr, g.stack_stride * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::perror("emu: mmap of a cooperative block's fiber stacks");
      std::exit(2);
    }
    g_coop_stacks.push_back({static_cast<unsigned char*>(m), 0});
  }
  CoopStacks& s = g_coop_stacks[i];
  for (; s.guarded < threads; ++s.guarded)
    if (mprotect(s.base + s.guarded * g.stack_stride, page, PROT_NONE) != 0) {
      std::perror("emu: guard page of a cooperative block's fiber stack (too many blocks?)");
      std::exit(2);
    }
  return s.base;
}

inline void save_shared(CoopBlock& b) {
  b.shared.clear();
  for (const Region& r : g_shared) b.shared.insert(b.shared.end(), (unsigned char*)r.p, (unsigned char*)r.p + r.n);
  b.shared.insert(b.shared.end(), g_dyn_shared.begin(), g_dyn_shared.end());
  b.regions = g_shared.size();
}
// Regions registered after the block last ran are ones it never passed: poisoned.
inline void restore_shared(const CoopBlock& b) {
  size_t at = 0;
  for (size_t i = 0; i < g_shared.size(); ++i) {
    const Region& r = g_shared[i];
    if (i < b.regions) {
      std::memcpy(r.p, b.shared.data() + at, r.n);
      at += r.n;
    } else {
      std::memset(r.p, kPoison, r.n);
    }
  }
  std::memcpy(g_dyn_shared.data(), b.shared.data() + at, g_dyn_shared.size());
}

template <class F> void launch_cooperative(dim3 grid, dim3 block, size_t dyn_shared_bytes, F&& kernel) {
  if (!launch_shape_ok(grid, block)) {
    error("invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x, block.y, block.z);
    return;
  }
  std::mt19937 rng((unsigned)(0x9e3779b9u * (g.launches + 1)));
  const std::vector<dim3> order = begin_launch(grid, block, dyn_shared_bytes, kernel, rng);
  unsigned char* const main_stacks = g.stacks;
  std::vector<CoopBlock> blocks(order.size());
  for (size_t i = 0; i < order.size(); ++i) blocks[i].idx = order[i];
  size_t left = blocks.size();
  for (uint64_t before = g.progress - 1; left > 0; ) {
    if (before == g.progress) {
      error("cooperative grid (%u,%u,%u) cannot progress: %zu of %zu blocks spin in __nanosleep and none of them advances (a grid "
            "barrier not reached by every block?)",
            grid.x, grid.y, grid.z, left, blocks.size());
      break;
    }
    before = g.progress;
    for (size_t i = 0; i < blocks.size(); ++i) {
      CoopBlock& b = blocks[i];
      if (b.finished) continue;
      blockIdx.x = b.idx.x;
      blockIdx.y = b.idx.y;
      blockIdx.z = b.idx.z;
      if (!b.started) {
        g.stacks = i == 0 ? main_stacks : coop_stacks(i - 1, g.nt);
        start_block(rng);
        b.started = true;
      } else {
        const uint64_t progress = g.progress;  // the launch's count, not the block's
        g = *b.sched;
        g.progress = progress;
        restore_shared(b);
        wake_sleepers();
      }
      run_ready();
      // Spinners retry once before the switch, with nothing changed by the other blocks: a wait
      // that does not loop until its condition holds goes through here.
      if (wake_sleepers() > 0) run_ready();
      bool asleep = false;
      for (unsigned t = 0; t < g.nt && !asleep; ++t) asleep = g.f[t].state == State::Sleeping;
      if (g.done == g.nt || !asleep) {
        if (g.done != g.nt) report_deadlock();
        b.finished = true;
        b.sched.reset();
        --left;
        continue;
      }
      if (!b.sched) b.sched = std::make_unique<Scheduler>();
      *b.sched = g;
      save_shared(b);
    }
  }
  g.stacks = main_stacks;
}

// ------------------------------------------------------------------------------------------------
// Synchronization.
// ------------------------------------------------------------------------------------------------
inline unsigned tid() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }

// Arrive at __syncthreads with a predicate; returns the block's count of true predicates.
inline int syncthreads_pred(int pred) {
  const unsigned parity = g.sync_gen & 1u;
  g.sync_acc[parity] += pred != 0;
  g.f[g.cur].state = State::AtSyncthreads;
  ++g.progress;
  if (++g.at_sync == g.nt) {
    g.at_sync = 0;
    ++g.sync_gen;
    g.sync_acc[parity ^ 1u] = 0;  // nobody has reached the next barrier yet
    for (unsigned t = 0; t < g.nt; ++t)
      if (g.f[t].state == State::AtSyncthreads) make_ready(t);
  }
  yield();  // even the last arrival goes back: the policy decides who runs first
  return g.sync_acc[parity];
}

inline unsigned warp_size_of(unsigned w) { return g.nt - w * 32 < 32 ? g.nt - w * 32 : 32; }

// The source lane of a shuffle (CUDA's rules: a source outside the lane's width-segment gives the
// lane's own value; xor may read earlier segments only).
inline unsigned shfl_source(const LaneOp& o, unsigned lane) {
  const unsigned w = (unsigned)o.width, seg = lane / w * w, l = lane % w, a = (unsigned)o.arg;
  switch (o.kind) {
    case Shfl::Idx: return seg + a % w;
    case Shfl::Up: return l >= a ? lane - a : lane;
    case Shfl::Down: return l + a < w ? lane + a : lane;
    case Shfl::Xor: {
      const unsigned s = (lane ^ a) & 31u;
      return s / w * w <= seg ? s : lane;
    }
  }
  return lane;
}

// Arrive at a warp collective (shuffle, vote, __syncwarp) over `mask`, which must name this lane.
// The thread waits until every lane of its mask is at a collective of the same kind with the same
// mask (disjoint groups of a warp proceed independently, as with partial masks on the GPU); the
// results of the whole group are computed then, from the values all its lanes deposited.
inline uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t v, Shfl kind = Shfl::Idx, int arg = 0, int width = 32) {
  const unsigned t = tid(), w = t / 32, lane = t % 32, n = warp_size_of(w);
  const unsigned valid = n == 32 ? 0xffffffffu : (1u << n) - 1u;
  if (!(mask >> lane & 1u)) error("thread %u: warp collective with mask 0x%08x, which excludes its own lane %u", t, mask, lane);
  if (mask & ~valid) error("thread %u: warp collective mask 0x%08x names lanes past the block", t, mask);
  if (width <= 0 || width > 32 || (width & (width - 1))) error("thread %u: shuffle width %d", t, width);
  mask = (mask & valid) | 1u << lane;
  LaneOp& me = g.lane[t];
  me = LaneOp{op, kind, mask, arg, width > 0 && width <= 32 && !(width & (width - 1)) ? width : 32, v, 0};
  g.f[g.cur].state = State::AtWarp;
  ++g.progress;
  bool complete = true;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const unsigned u = w * 32 + l;
    if (g.f[u].state != State::AtWarp) {
      complete = false;
    } else if (g.lane[u].op != op || g.lane[u].mask != mask) {
      error("warp %u: lanes %u and %u at different warp collectives (kind %d/%d, mask 0x%08x/0x%08x): divergent code", w, lane, l, (int)op,
            (int)g.lane[u].op, mask, g.lane[u].mask);
      complete = false;
    }
  }
  if (complete) {
    uint64_t ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
      if (mask >> l & 1u) ballot |= (uint64_t)(g.lane[w * 32 + l].value != 0) << l;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      LaneOp& o = g.lane[w * 32 + l];
      if (op == WarpOp::Shuffle) {
        const unsigned src = shfl_source(o, l);
        if (!(mask >> src & 1u)) error("warp %u: lane %u shuffles from lane %u, outside its mask 0x%08x", w, l, src, mask);
        o.result = g.lane[w * 32 + src].value;
      } else {
        o.result = ballot;
      }
      make_ready(w * 32 + l);
    }
  }
  yield();
  return g.lane[t].result;
}

template <class T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T> inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
template <class T> inline T shfl(Shfl kind, unsigned mask, T v, int arg, int width) {
  return from_bits<T>(warp_collective(WarpOp::Shuffle, mask, to_bits(v), kind, arg, width));
}

}  // namespace emu

// ------------------------------------------------------------------------------------------------
// CUDA device API used by the kernels (add here what a new kernel needs).
// ------------------------------------------------------------------------------------------------
inline void __syncthreads() { emu::syncthreads_pred(0); }
inline int __syncthreads_count(int p) { return emu::syncthreads_pred(p); }
inline int __syncthreads_and(int p) { return emu::syncthreads_pred(p) == (int)emu::g.nt; }
inline int __syncthreads_or(int p) { return emu::syncthreads_pred(p) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_collective(emu::WarpOp::Syncwarp, mask, 0); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return (unsigned)emu::warp_collective(emu::WarpOp::Vote, mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
template <class T> inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return emu::shfl(emu::Shfl::Idx, m, v, src, w); }
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return emu::shfl(emu::Shfl::Up, m, v, (int)d, w); }
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return emu::shfl(emu::Shfl::Down, m, v, (int)d, w); }
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int d, int w = 32) { return emu::shfl(emu::Shfl::Xor, m, v, d, w); }

// One OS thread: fences are no-ops, atomics are plain read-modify-writes.
inline void __threadfence() {}
inline void __threadfence_block() {}
template <class T> inline T atomicAdd(T* p, T v) { const T o = *p; *p = o + v; return o; }
template <class T> inline T atomicSub(T* p, T v) { const T o = *p; *p = o - v; return o; }
template <class T> inline T atomicExch(T* p, T v) { const T o = *p; *p = v; return o; }
template <class T> inline T atomicMax(T* p, T v) { const T o = *p; *p = o < v ? v : o; return o; }
template <class T> inline T atomicMin(T* p, T v) { const T o = *p; *p = v < o ? v : o; return o; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { const T o = *p; if (o == cmp) *p = v; return o; }
inline unsigned atomicInc(unsigned* p, unsigned lim) { const unsigned o = *p; *p = o >= lim ? 0 : o + 1; return o; }
// The kernels' reinterpret_cast (tests/kernel_emulator.rs rewrites the keyword to this): a
// pointer to an object type must be aligned for it, as a GPU's 16-byte loads and stores require
// (a misaligned one faults there, "misaligned address"; x86 would just do it).
template <class To, class From> inline To emu_reinterpret_cast(From from) {
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    using Pointee = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<Pointee>) {
      if (reinterpret_cast<std::uintptr_t>(from) % alignof(Pointee) != 0)
        emu::error("misaligned address: %p as a pointer to a %zu-byte aligned type", (const void*)from,
                   alignof(Pointee));
    }
  }
  return reinterpret_cast<To>(from);
}
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
template <class A> inline A min(A a, A b) { return b < a ? b : a; }
template <class A> inline A max(A a, A b) { return a < b ? b : a; }

// ------------------------------------------------------------------------------------------------
// Inline PTX (see tests/kernel_emulator.rs, translate_asm). An approximate MUFU result is the
// correctly rounded one pushed by up to |g_ulp_*| ulps (in the sign's direction), never past the
// error bound the PTX ISA documents (rsqrt.approx.f32: relative 2^-22.9; rcp.approx.f32: 1 ulp),
// to exercise the refinement sequences around them; the real MUFU error is not modelled (README).
// The defaults push rcp up and rsqrt down: invsqrt_rn (ptxas's own sqrt.rn and rcp.rn fast
// paths, common.cuh) is exact for every such result, but 1 ulp off for a few inputs with an
// rsqrt above the exact value or an rcp below it, even within the bounds: the hardware's MUFU
// never gives those, since the same sequences are CUDA's IEEE sqrtf and division.
// ------------------------------------------------------------------------------------------------
inline double g_ulp_rcp = 1, g_ulp_rsq = -1;

// r (the correctly rounded approximation of exact) pushed by up to |ulps| ulps, each step only
// while the result stays within max_err of exact.
inline float emu_push_ulps(float r, double ulps, double exact, double max_err) {
  if (!std::isfinite(exact) || exact == 0) return r;  // the specials are exact
  for (int i = 0; i < (int)std::fabs(ulps); ++i) {
    const float next = std::nextafter(r, ulps > 0 ? INFINITY : 0.f);
    if (!(std::fabs((double)next - exact) <= max_err)) break;
    r = next;
  }
  return r;
}
inline float emu_ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }
// rcp.approx.ftz.f32 / rsqrt.approx.ftz.f32: subnormal inputs and results flush to zero.
inline float emu_ptx_rcp_approx_ftz_f32(float x) {
  const double exact = 1.0 / (double)emu_ftz(x);
  int e = 0;
  std::frexp(exact, &e);  // one ulp of the exact result's binade: 2^(e - 24)
  return emu_ftz(emu_push_ulps((float)exact, g_ulp_rcp, exact, std::ldexp(1.0, e - 24)));
}
inline float emu_ptx_rsqrt_approx_ftz_f32(float x) {
  const double exact = 1.0 / std::sqrt((double)emu_ftz(x));
  return emu_ftz(emu_push_ulps((float)exact, g_ulp_rsq, exact, std::exp2(-22.9) * exact));
}
// rcp.approx.ftz.f64 (MUFU.RCP64H: about 20 good bits): the exact reciprocal truncated to 22
// bits, nudged by half of the kept last bit when g_ulp_rcp != 0.
inline double emu_ptx_rcp_approx_ftz_f64(double x) {
  double r = 1.0 / x;
  if (!std::isfinite(r) || r == 0) return r;
  uint64_t u;
  std::memcpy(&u, &r, 8);
  u &= ~((1ull << 30) - 1);
  u += g_ulp_rcp != 0 ? (1ull << 29) : 0;
  std::memcpy(&r, &u, 8);
  return r;
}

// Special registers (`mov.u32 %0, %%name;`).
inline unsigned emu_ptx_sreg_laneid() { return emu::tid() % 32; }
inline unsigned emu_ptx_sreg_warpid() { return emu::tid() / 32; }
inline unsigned emu_ptx_sreg_lanemask_lt() { return (1u << (emu::tid() % 32)) - 1u; }
inline unsigned emu_ptx_sreg_lanemask_le() { return (unsigned)((2ull << (emu::tid() % 32)) - 1u); }
inline unsigned emu_ptx_sreg_lanemask_eq() { return 1u << (emu::tid() % 32); }
inline unsigned emu_ptx_sreg_lanemask_gt() { return ~emu_ptx_sreg_lanemask_le(); }
inline unsigned emu_ptx_sreg_lanemask_ge() { return ~emu_ptx_sreg_lanemask_lt(); }

// __nanosleep: the spin's yield point. The fiber sleeps until the block has nothing else to run
// (a plain launch) or the scheduler comes back to its block (a cooperative one).
inline void __nanosleep(unsigned) {
  emu::g.f[emu::g.cur].state = emu::State::Sleeping;
  emu::yield();
}

// Launch: emu_launch(grid, block, [&] { kernel(params); }), or with dynamic shared memory.
template <class F> void emu_launch(dim3 grid, dim3 block, F&& kernel) { emu::launch(grid, block, 0, kernel); }
template <class F> void emu_launch_shared(dim3 grid, dim3 block, size_t bytes, F&& kernel) { emu::launch(grid, block, bytes, kernel); }
// A cooperative launch: every block resident at once (a grid barrier may wait for all).
template <class F> void emu_launch_cooperative(dim3 grid, dim3 block, size_t bytes, F&& kernel) {
  emu::launch_cooperative(grid, block, bytes, kernel);
}
