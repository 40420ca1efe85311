// driver.cpp: an emulated CUDA driver. Built with the kernels into libcuda.so.1 by
// tests/kernel_emulator.rs (BATCHNORM_EMU_DRIVER_OUT=dir), it lets the crate's own GPU code
// (cudarc, the launchers, the layer, the GPU tests) run unchanged on the CPU:
// scripts/emulated-gpu.sh runs the GPU test binaries against it. See README.md.
//
// EMU_DEVICE_COUNT devices (default 1; NCCL tests give each rank its own), each
// "batchnorm-cuda emulated device (CPU)", compute capability 9.0, 132 SMs (EMU_SM_COUNT changes
// it), sharing EMU_DEVICE_MEMORY_MB of memory (default 4096); EMU_COOPERATIVE=too-large or
// =unsupported refuses every cooperative launch. Device memory is host memory: a
// device pointer is the host address. Every call runs to completion before it returns, which is
// one legal order of a CUDA stream program (streams and events then only need bookkeeping), and
// kernels run on the fiber emulator of emu.h with its exact barriers and schedule policies.
//
// Stream capture (CUDA graphs): a stream between cuStreamBeginCapture and cuStreamEndCapture
// records its launches, memsets and device-to-device copies instead of running them (a launch
// copies its parameter struct, as the driver does), and cuGraphLaunch replays them in order.
// What a capture cannot record fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates
// it: host copies, synchronizing the stream, and allocating or freeing on it (a real driver
// makes graph memory nodes of the stream-ordered ones; the crate never allocates in a capture,
// which this keeps checked). The legacy default stream cannot capture, as on a GPU.
//
// What it checks on top of the emulator, like compute-sanitizer would on a GPU:
//   - allocations are filled with 0xFF bytes (NaN): a kernel reading memory nobody wrote is loud;
//   - every allocation has 256-byte red zones on both sides, checked after every launch, copy and
//     free: a write out of bounds makes the driver fail with CUDA_ERROR_ILLEGAL_ADDRESS (sticky,
//     as a real device fault is); with EMU_GUARD_PAGES=1 each allocation instead ends at an
//     inaccessible page, so a read past the end crashes the launch that made it (a red zone
//     before it still catches writes there);
//   - copies and memsets must lie inside one live allocation; a launch must have a valid shape;
//   - a launch in which the emulator found an error (a barrier not reached by every thread, a
//     divergent warp collective, an invalid shape) returns CUDA_ERROR_LAUNCH_FAILED (sticky);
//   - a module must be PTX no newer than ISA 9.0 (what driver 580 accepts), and every entry point
//     it declares must be one the emulator was built with.
// Calls are serialized by one lock: the emulator's state is global.

// Every header before emu.h: it redefines CUDA's attribute macros (__noinline__...), which
// cuda.h and the standard library use.
#include <cuda.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

#include "driver_registry.h"
#include "emu.h"

namespace {

constexpr size_t kRedZone = 256;
constexpr unsigned char kRedZoneByte = 0xA5;
constexpr size_t kDefaultSharedLimit = 48 * 1024;
constexpr int kMaxDevices = 8;

// The data of an allocation sits between two red zones (`front` and `back` bytes, any of them
// possibly 0) in a block from aligned_alloc, or from mmap when the data ends at a guard page.
struct Allocation {
  size_t bytes;
  unsigned char* block;
  size_t block_bytes, front, back;
  bool mapped;
};

struct Function {
  std::string name;
  EmuInvoke invoke;
  size_t param_bytes;
  size_t shared_limit = kDefaultSharedLimit;
};

struct Module {
  std::vector<std::unique_ptr<Function>> functions;
};

struct Event {
  std::chrono::steady_clock::time_point at;
  bool recorded = false;
};

// A captured operation; replaying it returns what running it would have.
using Node = std::function<CUresult()>;

struct Graph {
  std::vector<Node> nodes;
};

struct Stream {
  std::unique_ptr<Graph> capture;  // set while capturing
  bool invalidated = false;
};

struct Context {
  int device = 0;
  unsigned retained = 0;
};

struct Driver {
  std::recursive_mutex lock;
  bool initialized = false;
  CUresult sticky = CUDA_SUCCESS;
  size_t memory_limit = 0, memory_used = 0;
  unsigned sm_count = 132;
  int device_count = 1;
  bool guard_pages = false;
  // EMU_COOPERATIVE: "too-large" refuses every cooperative launch as a grid the device cannot
  // hold; "unsupported" as a device without them (attribute 0, CUDA_ERROR_NOT_SUPPORTED).
  CUresult cooperative_refusal = CUDA_SUCCESS;
  unsigned long long cooperative_refused = 0;
  std::map<CUdeviceptr, Allocation> allocations;  // by device pointer
  std::set<CUevent> events;
  std::set<CUstream> streams;
  std::set<CUmodule> modules;
  std::set<CUgraph> graphs;
  std::set<CUgraphExec> execs;
  Context primary[kMaxDevices];
};

Driver& driver() {
  static Driver* d = new Driver;  // never destroyed: cudarc may call in from static destructors
  return *d;
}

thread_local CUcontext t_current = nullptr;

std::unordered_map<std::string, EmuEntry>& registry() {
  static auto* r = new std::unordered_map<std::string, EmuEntry>;
  return *r;
}

void complain(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "EMULATED DRIVER: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
}

// A device fault: every later call fails with it, as on a GPU.
CUresult fault(CUresult e) {
  Driver& d = driver();
  if (d.sticky == CUDA_SUCCESS) d.sticky = e;
  return e;
}

size_t env_size(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

// The red zones of every live allocation are intact; otherwise a fault naming the allocation.
CUresult check_red_zones(const char* after) {
  for (const auto& [ptr, a] : driver().allocations) {
    const unsigned char* data = a.block + a.front;
    for (size_t i = 1; i <= a.front; ++i)
      if (data[-(ptrdiff_t)i] != kRedZoneByte) {
        complain("out-of-bounds write %s: %zu bytes before the allocation of %zu bytes at 0x%llx", after, i, a.bytes,
                 (unsigned long long)ptr);
        return fault(CUDA_ERROR_ILLEGAL_ADDRESS);
      }
    for (size_t i = 0; i < a.back; ++i)
      if (data[a.bytes + i] != kRedZoneByte) {
        complain("out-of-bounds write %s: %zu bytes past the end of the allocation of %zu bytes at 0x%llx", after, i + 1, a.bytes,
                 (unsigned long long)ptr);
        return fault(CUDA_ERROR_ILLEGAL_ADDRESS);
      }
  }
  return CUDA_SUCCESS;
}

// [p, p + n) lies inside one live allocation.
bool in_device_memory(CUdeviceptr p, size_t n) {
  const auto& all = driver().allocations;
  auto it = all.upper_bound(p);
  if (it == all.begin()) return false;
  --it;
  return p >= it->first && p - it->first + n <= it->second.bytes;
}

CUresult bad_range(const char* what, CUdeviceptr p, size_t n) {
  complain("%s of %zu bytes at 0x%llx is not inside one live allocation", what, n, (unsigned long long)p);
  return CUDA_ERROR_INVALID_VALUE;
}

// The entry points a PTX module declares (".visible .entry NAME("), and its ISA version.
std::vector<std::string> ptx_entries(const std::string& ptx) {
  std::vector<std::string> names;
  const std::string key = ".visible .entry ";
  for (size_t at = ptx.find(key); at != std::string::npos; at = ptx.find(key, at + 1)) {
    const size_t start = at + key.size();
    names.push_back(ptx.substr(start, ptx.find('(', start) - start));
  }
  return names;
}

bool ptx_isa_accepted(const std::string& ptx) {
  const size_t at = ptx.find(".version ");
  if (at == std::string::npos) return false;
  unsigned major = 0, minor = 0;
  if (std::sscanf(ptx.c_str() + at, ".version %u.%u", &major, &minor) != 2) return false;
  return major < 9 || (major == 9 && minor == 0);
}

// Forgets a live handle and deletes the object behind it.
template <class Object, class Handle> CUresult destroy(std::set<Handle>& live, Handle handle) {
  if (!live.erase(handle)) return CUDA_ERROR_INVALID_HANDLE;
  delete reinterpret_cast<Object*>(handle);
  return CUDA_SUCCESS;
}

bool valid(CUdevice device) { return device >= 0 && device < driver().device_count; }

// The capture `stream` is recording into, or null (the legacy stream never captures).
Stream* capturing(CUstream stream) {
  if (stream == nullptr || !driver().streams.count(stream)) return nullptr;
  auto* s = reinterpret_cast<Stream*>(stream);
  return s->capture ? s : nullptr;
}

// Queues `node` on `stream`: recorded when it captures (CUDA_SUCCESS), else run now.
CUresult enqueue(CUstream stream, Node node) {
  if (Stream* s = capturing(stream)) {
    s->capture->nodes.push_back(std::move(node));
    return CUDA_SUCCESS;
  }
  return node();
}

// An operation a capture cannot record: it invalidates the capture, as on a GPU.
CUresult refuse_in_capture(CUstream stream, const char* what) {
  Stream* s = capturing(stream);
  if (!s) return CUDA_SUCCESS;
  complain("%s on a stream that is capturing a graph", what);
  s->invalidated = true;
  return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

#define API_ENTER()                                        \
  std::lock_guard<std::recursive_mutex> guard(driver().lock); \
  if (!driver().initialized) return CUDA_ERROR_NOT_INITIALIZED; \
  if (driver().sticky != CUDA_SUCCESS) return driver().sticky

}  // namespace

void emu_driver_register(const EmuEntry* entries, size_t count) {
  for (size_t i = 0; i < count; ++i) registry()[entries[i].name] = entries[i];
}

extern "C" {

// ---- initialization, device, context ------------------------------------------------------------
CUresult cuInit(unsigned int) {
  Driver& d = driver();
  std::lock_guard<std::recursive_mutex> guard(d.lock);
  if (!d.initialized) {
    d.initialized = true;
    d.memory_limit = env_size("EMU_DEVICE_MEMORY_MB", 4096) << 20;
    d.sm_count = (unsigned)env_size("EMU_SM_COUNT", 132);
    d.guard_pages = env_size("EMU_GUARD_PAGES", 0) != 0;
    d.device_count = (int)std::min<size_t>(std::max<size_t>(env_size("EMU_DEVICE_COUNT", 1), 1), kMaxDevices);
    if (const char* mode = std::getenv("EMU_COOPERATIVE"); mode && *mode) {
      if (std::strcmp(mode, "too-large") == 0) d.cooperative_refusal = CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE;
      else if (std::strcmp(mode, "unsupported") == 0) d.cooperative_refusal = CUDA_ERROR_NOT_SUPPORTED;
      else complain("EMU_COOPERATIVE=%s: expected too-large or unsupported", mode);
      // What the refusals were, for the script that asked for them (scripts/emulated-gpu.sh).
      std::atexit([] {
        std::fprintf(stderr, "emulated driver: %llu cooperative launches refused\n", driver().cooperative_refused);
      });
    }
    for (int k = 0; k < kMaxDevices; ++k) d.primary[k].device = k;
  }
  return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int* version) {
  *version = 13000;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* count) {
  API_ENTER();
  *count = driver().device_count;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice* device, int ordinal) {
  API_ENTER();
  if (ordinal < 0 || ordinal >= driver().device_count) return CUDA_ERROR_INVALID_DEVICE;
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
  API_ENTER();
  if (!valid(device) || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  std::snprintf(name, (size_t)len, "batchnorm-cuda emulated device (CPU)");
  return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem(size_t* bytes, CUdevice device) {
  API_ENTER();
  if (!valid(device)) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = driver().memory_limit;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice device) {
  API_ENTER();
  if (!valid(device)) return CUDA_ERROR_INVALID_DEVICE;
  switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = (int)driver().sm_count; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X:
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *value = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *value = 64; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *value = 2147483647; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y:
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *value = 65535; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *value = (int)kDefaultSharedLimit; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = 227 * 1024; break;  // sm_90's
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *value = 2048; break;
    case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *value = 50 << 20; break;  // H100's
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *value = 2619000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *value = 5120; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING:
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: *value = 1; break;
    case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: *value = driver().cooperative_refusal != CUDA_ERROR_NOT_SUPPORTED; break;
    default:
      complain("cuDeviceGetAttribute(%d) is not emulated", (int)attribute);
      return CUDA_ERROR_NOT_SUPPORTED;
  }
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice device) {
  API_ENTER();
  if (!valid(device)) return CUDA_ERROR_INVALID_DEVICE;
  ++driver().primary[device].retained;
  *ctx = reinterpret_cast<CUcontext>(&driver().primary[device]);
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease(CUdevice device) {
  API_ENTER();
  if (!valid(device) || driver().primary[device].retained == 0) return CUDA_ERROR_INVALID_CONTEXT;
  --driver().primary[device].retained;
  return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
  API_ENTER();
  t_current = ctx;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* ctx) {
  API_ENTER();
  *ctx = t_current;
  return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent(CUcontext ctx) { return cuCtxSetCurrent(ctx); }

CUresult cuCtxPopCurrent(CUcontext* ctx) {
  API_ENTER();
  if (ctx) *ctx = t_current;
  t_current = nullptr;
  return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() {
  API_ENTER();
  return check_red_zones("found at a synchronization");
}

// ---- memory -------------------------------------------------------------------------------------
CUresult cuMemAlloc(CUdeviceptr* ptr, size_t bytes) {
  API_ENTER();
  Driver& d = driver();
  if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  if (bytes > d.memory_limit - d.memory_used) return CUDA_ERROR_OUT_OF_MEMORY;
  Allocation a{bytes, nullptr, 0, kRedZone, 0, d.guard_pages};
  if (d.guard_pages) {
    // The data ends where an inaccessible page begins: a read past the end faults at once (the
    // emulator names the launch and thread). Its start is then only as aligned as `bytes` is.
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), span = (bytes + page - 1) / page * page;
    void* m = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    a.block = static_cast<unsigned char*>(m);
    a.block_bytes = span + page;
    a.front = span - bytes;
    mprotect(a.block + span, page, PROT_NONE);
  } else {
    const size_t padded = (bytes + kRedZone - 1) / kRedZone * kRedZone;
    a.block = static_cast<unsigned char*>(std::aligned_alloc(kRedZone, padded + 2 * kRedZone));
    if (!a.block) return CUDA_ERROR_OUT_OF_MEMORY;
    a.block_bytes = padded + 2 * kRedZone;
    a.back = padded + kRedZone - bytes;
  }
  unsigned char* data = a.block + a.front;
  std::memset(a.block, kRedZoneByte, a.front);
  std::memset(data, 0xFF, bytes);  // uninitialized device memory reads as NaN
  std::memset(data + bytes, kRedZoneByte, a.back);
  *ptr = reinterpret_cast<CUdeviceptr>(data);
  d.allocations[*ptr] = a;
  d.memory_used += bytes;
  return CUDA_SUCCESS;
}

CUresult cuMemFree(CUdeviceptr ptr) {
  API_ENTER();
  Driver& d = driver();
  if (const CUresult e = check_red_zones("found when memory was freed")) return e;
  auto it = d.allocations.find(ptr);
  if (it == d.allocations.end()) {
    complain("cuMemFree of 0x%llx, which is not a live allocation", (unsigned long long)ptr);
    return CUDA_ERROR_INVALID_VALUE;
  }
  const Allocation& a = it->second;
  d.memory_used -= a.bytes;
  if (a.mapped) munmap(a.block, a.block_bytes);
  else std::free(a.block);
  d.allocations.erase(it);
  return CUDA_SUCCESS;
}

CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream stream) {
  API_ENTER();
  if (const CUresult e = refuse_in_capture(stream, "cuMemAllocAsync")) return e;
  return cuMemAlloc(ptr, bytes);
}

CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream stream) {
  API_ENTER();
  if (const CUresult e = refuse_in_capture(stream, "cuMemFreeAsync")) return e;
  return cuMemFree(ptr);
}

CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
  API_ENTER();
  *free_bytes = driver().memory_limit - driver().memory_used;
  *total = driver().memory_limit;
  return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
  API_ENTER();
  if (!in_device_memory(dst, n)) return bad_range("host-to-device copy", dst, n);
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
  API_ENTER();
  if (!in_device_memory(src, n)) return bad_range("device-to-host copy", src, n);
  if (const CUresult e = check_red_zones("found at a device-to-host copy")) return e;
  std::memcpy(dst, reinterpret_cast<const void*>(src), n);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  API_ENTER();
  if (!in_device_memory(dst, n)) return bad_range("device-to-device copy (destination)", dst, n);
  if (!in_device_memory(src, n)) return bad_range("device-to-device copy (source)", src, n);
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream stream) {
  API_ENTER();
  if (const CUresult e = refuse_in_capture(stream, "a host-to-device copy")) return e;
  return cuMemcpyHtoD(dst, src, n);
}

CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream stream) {
  API_ENTER();
  if (const CUresult e = refuse_in_capture(stream, "a device-to-host copy")) return e;
  return cuMemcpyDtoH(dst, src, n);
}

CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream stream) {
  API_ENTER();
  return enqueue(stream, [=] { return cuMemcpyDtoD(dst, src, n); });
}

CUresult cuMemsetD8(CUdeviceptr dst, unsigned char value, size_t n) {
  API_ENTER();
  if (!in_device_memory(dst, n)) return bad_range("memset", dst, n);
  std::memset(reinterpret_cast<void*>(dst), value, n);
  return CUDA_SUCCESS;
}

CUresult cuMemsetD32(CUdeviceptr dst, unsigned int value, size_t n) {
  API_ENTER();
  if (dst % 4 != 0) return CUDA_ERROR_INVALID_VALUE;
  if (!in_device_memory(dst, 4 * n)) return bad_range("32-bit memset", dst, 4 * n);
  auto* p = reinterpret_cast<unsigned int*>(dst);
  std::fill(p, p + n, value);
  return CUDA_SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream stream) {
  API_ENTER();
  return enqueue(stream, [=] { return cuMemsetD8(dst, value, n); });
}

CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t n, CUstream stream) {
  API_ENTER();
  return enqueue(stream, [=] { return cuMemsetD32(dst, value, n); });
}

// ---- streams and events -------------------------------------------------------------------------
CUresult cuStreamCreate(CUstream* stream, unsigned int) {
  API_ENTER();
  *stream = reinterpret_cast<CUstream>(new Stream);
  driver().streams.insert(*stream);
  return CUDA_SUCCESS;
}

CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned int flags, int) { return cuStreamCreate(stream, flags); }

CUresult cuStreamDestroy(CUstream stream) {
  API_ENTER();
  return destroy<Stream>(driver().streams, stream);
}

// Everything queued has already run: synchronizing only looks for faults.
CUresult cuStreamSynchronize(CUstream stream) {
  API_ENTER();
  if (const CUresult e = refuse_in_capture(stream, "cuStreamSynchronize")) return e;
  return check_red_zones("found at a stream synchronization");
}

// ---- stream capture and graphs ------------------------------------------------------------------
CUresult cuStreamBeginCapture_v2(CUstream stream, CUstreamCaptureMode) {
  API_ENTER();
  if (stream == nullptr) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // the legacy stream
  if (!driver().streams.count(stream)) return CUDA_ERROR_INVALID_HANDLE;
  auto* s = reinterpret_cast<Stream*>(stream);
  if (s->capture) return CUDA_ERROR_ILLEGAL_STATE;
  s->capture = std::make_unique<Graph>();
  s->invalidated = false;
  return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus* status) {
  API_ENTER();
  if (stream != nullptr && !driver().streams.count(stream)) return CUDA_ERROR_INVALID_HANDLE;
  const Stream* s = capturing(stream);
  *status = !s ? CU_STREAM_CAPTURE_STATUS_NONE
               : s->invalidated ? CU_STREAM_CAPTURE_STATUS_INVALIDATED : CU_STREAM_CAPTURE_STATUS_ACTIVE;
  return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
  API_ENTER();
  Stream* s = capturing(stream);
  if (!s) return CUDA_ERROR_ILLEGAL_STATE;
  std::unique_ptr<Graph> captured = std::move(s->capture);
  *graph = nullptr;
  if (s->invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
  *graph = reinterpret_cast<CUgraph>(captured.release());
  driver().graphs.insert(*graph);
  return CUDA_SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
  API_ENTER();
  if (!driver().graphs.count(graph)) return CUDA_ERROR_INVALID_HANDLE;
  *exec = reinterpret_cast<CUgraphExec>(new Graph(*reinterpret_cast<Graph*>(graph)));
  driver().execs.insert(*exec);
  return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
  API_ENTER();
  if (!driver().execs.count(exec)) return CUDA_ERROR_INVALID_HANDLE;
  if (const CUresult e = refuse_in_capture(stream, "cuGraphLaunch (not emulated in a capture)")) return e;
  for (const Node& node : reinterpret_cast<Graph*>(exec)->nodes)
    if (const CUresult e = node()) return e;
  return CUDA_SUCCESS;
}

CUresult cuGraphUpload(CUgraphExec exec, CUstream) {
  API_ENTER();
  return driver().execs.count(exec) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult cuGraphExecDestroy(CUgraphExec exec) {
  API_ENTER();
  if (!driver().execs.erase(exec)) return CUDA_ERROR_INVALID_HANDLE;
  delete reinterpret_cast<Graph*>(exec);
  return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(CUgraph graph) {
  API_ENTER();
  return destroy<Graph>(driver().graphs, graph);
}

CUresult cuStreamQuery(CUstream) {
  API_ENTER();
  return CUDA_SUCCESS;
}

CUresult cuStreamWaitEvent(CUstream, CUevent event, unsigned int) {
  API_ENTER();
  return driver().events.count(event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult cuEventCreate(CUevent* event, unsigned int) {
  API_ENTER();
  *event = reinterpret_cast<CUevent>(new Event);
  driver().events.insert(*event);
  return CUDA_SUCCESS;
}

CUresult cuEventDestroy(CUevent event) {
  API_ENTER();
  return destroy<Event>(driver().events, event);
}

CUresult cuEventRecord(CUevent event, CUstream) {
  API_ENTER();
  if (!driver().events.count(event)) return CUDA_ERROR_INVALID_HANDLE;
  auto* e = reinterpret_cast<Event*>(event);
  e->at = std::chrono::steady_clock::now();
  e->recorded = true;
  return CUDA_SUCCESS;
}

CUresult cuEventRecordWithFlags(CUevent event, CUstream stream, unsigned int) { return cuEventRecord(event, stream); }

CUresult cuEventSynchronize(CUevent event) {
  API_ENTER();
  return driver().events.count(event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult cuEventQuery(CUevent event) { return cuEventSynchronize(event); }

CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
  API_ENTER();
  auto *a = reinterpret_cast<Event*>(start), *b = reinterpret_cast<Event*>(end);
  if (!driver().events.count(start) || !driver().events.count(end)) return CUDA_ERROR_INVALID_HANDLE;
  if (!a->recorded || !b->recorded) return CUDA_ERROR_INVALID_HANDLE;
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return CUDA_SUCCESS;
}

// cuda.h 12.8+ names the function above cuEventElapsedTime_v2; a real driver still exports the
// older name for programs built against older headers (cudarc's CUDA 12.0 bindings call it).
#undef cuEventElapsedTime
CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
  return cuEventElapsedTime_v2(ms, start, end);
}

// ---- modules and launches -----------------------------------------------------------------------
CUresult cuModuleLoadData(CUmodule* module, const void* image) {
  API_ENTER();
  const std::string ptx(static_cast<const char*>(image));
  if (ptx.find(".entry") == std::string::npos) {
    complain("cuModuleLoadData: only PTX text is emulated");
    return CUDA_ERROR_INVALID_IMAGE;
  }
  if (!ptx_isa_accepted(ptx)) {
    complain("cuModuleLoadData: PTX ISA newer than 9.0, which driver 580 rejects");
    return CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
  }
  auto m = std::make_unique<Module>();
  for (const std::string& name : ptx_entries(ptx)) {
    auto it = registry().find(name);
    if (it == registry().end()) {
      complain("cuModuleLoadData: entry point %s is not in the emulated driver (rebuild it)", name.c_str());
      return CUDA_ERROR_INVALID_IMAGE;
    }
    m->functions.push_back(std::make_unique<Function>(Function{name, it->second.invoke, it->second.param_bytes}));
  }
  *module = reinterpret_cast<CUmodule>(m.release());
  driver().modules.insert(*module);
  return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule module) {
  API_ENTER();
  return destroy<Module>(driver().modules, module);
}

CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
  API_ENTER();
  if (!driver().modules.count(module)) return CUDA_ERROR_INVALID_HANDLE;
  for (auto& f : reinterpret_cast<Module*>(module)->functions)
    if (f->name == name) {
      *function = reinterpret_cast<CUfunction>(f.get());
      return CUDA_SUCCESS;
    }
  return CUDA_ERROR_NOT_FOUND;
}

CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
  API_ENTER();
  if (attribute != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) return CUDA_ERROR_NOT_SUPPORTED;
  if (value < 0 || value > 227 * 1024) return CUDA_ERROR_INVALID_VALUE;
  reinterpret_cast<Function*>(function)->shared_limit = (size_t)value;
  return CUDA_SUCCESS;
}

// Runs one launch whose shape and parameters were checked; a cooperative one with every block
// resident at once (emu.h, launch_cooperative).
CUresult run_launch(const Function* f, dim3 grid, dim3 block, unsigned shared_bytes, const void* p, bool cooperative) {
  API_ENTER();
  emu::g_launch_tag = f->name;
  const int errors_before = emu::g_errors;
  if (cooperative) emu::launch_cooperative(grid, block, shared_bytes, [&] { f->invoke(p); });
  else emu::launch(grid, block, shared_bytes, [&] { f->invoke(p); });
  if (emu::g_errors != errors_before) {
    complain("%s: the emulator found %d error(s) in this launch (above)", f->name.c_str(), emu::g_errors - errors_before);
    return fault(CUDA_ERROR_LAUNCH_FAILED);
  }
  return check_red_zones(("found after a launch of " + f->name).c_str());
}

// Occupancy as sm_90 computes it for a kernel of EMU_REGISTERS registers per thread (default 64,
// the middle of what ptxas gives the crate's kernels; the emulator cannot know a kernel's own):
// registers allocated per warp in units of 256 from 64K per SM, at most 2048 threads and 32
// blocks per SM, 228 KB of shared memory per SM (1 KB reserved per block).
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, CUfunction function, int block_size,
                                                              size_t dynamic_shared, unsigned int) {
  API_ENTER();
  if (blocks == nullptr || function == nullptr || block_size <= 0 || block_size > 1024) return CUDA_ERROR_INVALID_VALUE;
  const size_t regs = std::min<size_t>(std::max<size_t>(env_size("EMU_REGISTERS", 64), 1), 255);
  const size_t warps = ((size_t)block_size + 31) / 32;
  const size_t regs_per_block = warps * ((regs * 32 + 255) / 256 * 256);
  size_t n = std::min<size_t>({32, 2048 / (warps * 32), 65536 / regs_per_block, 233472 / (dynamic_shared + 1024)});
  *blocks = (int)n;
  return CUDA_SUCCESS;
}

CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, CUfunction function, int block_size, size_t dynamic_shared) {
  return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, function, block_size, dynamic_shared, 0);
}

// The checks and the queuing of cuLaunchKernel and cuLaunchCooperativeKernel.
static CUresult launch_checked(CUfunction function, dim3 grid, dim3 block, unsigned shared_bytes, CUstream stream, void** params, void** extra,
                bool cooperative) {
  API_ENTER();
  auto* f = reinterpret_cast<Function*>(function);
  if (!emu::launch_shape_ok(grid, block)) {
    complain("%s: invalid launch shape grid (%u,%u,%u) block (%u,%u,%u)", f->name.c_str(), grid.x, grid.y, grid.z, block.x, block.y,
             block.z);
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (shared_bytes > f->shared_limit) {
    complain("%s: %u bytes of dynamic shared memory, more than the %zu allowed", f->name.c_str(), shared_bytes, f->shared_limit);
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (extra != nullptr || params == nullptr || params[0] == nullptr) {
    complain("%s: the emulator takes the parameter struct through kernelParams[0]", f->name.c_str());
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (cooperative) {
    // As the driver: every block must be resident at once (the occupancy below, on every SM).
    int per_sm = 0;
    cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, function, (int)(block.x * block.y * block.z), shared_bytes);
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    if (blocks > (unsigned long long)per_sm * driver().sm_count) return CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE;
    if (driver().cooperative_refusal != CUDA_SUCCESS) {
      ++driver().cooperative_refused;
      return driver().cooperative_refusal;
    }
  }
  // By value, as the driver copies kernelParams when the launch is queued.
  const auto* p = static_cast<const unsigned char*>(params[0]);
  auto copy = std::make_shared<std::vector<unsigned char>>(p, p + f->param_bytes);
  return enqueue(stream, [=] { return run_launch(f, grid, block, shared_bytes, copy->data(), cooperative); });
}

CUresult cuLaunchKernel(CUfunction function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, CUstream stream, void** params, void** extra) {
  return launch_checked(function, dim3(gx, gy, gz), dim3(bx, by, bz), shared_bytes, stream, params, extra, false);
}

CUresult cuLaunchCooperativeKernel(CUfunction function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                                   unsigned shared_bytes, CUstream stream, void** params) {
  return launch_checked(function, dim3(gx, gy, gz), dim3(bx, by, bz), shared_bytes, stream, params, nullptr, true);
}

// ---- errors -------------------------------------------------------------------------------------
CUresult cuGetErrorName(CUresult error, const char** name) {
  switch (error) {
#define NAME(e) \
  case e: *name = #e; break;
    NAME(CUDA_SUCCESS)
    NAME(CUDA_ERROR_INVALID_VALUE)
    NAME(CUDA_ERROR_OUT_OF_MEMORY)
    NAME(CUDA_ERROR_NOT_INITIALIZED)
    NAME(CUDA_ERROR_INVALID_DEVICE)
    NAME(CUDA_ERROR_INVALID_IMAGE)
    NAME(CUDA_ERROR_INVALID_CONTEXT)
    NAME(CUDA_ERROR_UNSUPPORTED_PTX_VERSION)
    NAME(CUDA_ERROR_INVALID_HANDLE)
    NAME(CUDA_ERROR_NOT_FOUND)
    NAME(CUDA_ERROR_ILLEGAL_ADDRESS)
    NAME(CUDA_ERROR_LAUNCH_FAILED)
    NAME(CUDA_ERROR_NOT_SUPPORTED)
    NAME(CUDA_ERROR_ILLEGAL_STATE)
    NAME(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
    NAME(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)
    NAME(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE)
#undef NAME
    default: *name = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
  }
  return CUDA_SUCCESS;
}

// The name is the description: the reason of a failure the driver found is printed on stderr.
CUresult cuGetErrorString(CUresult error, const char** text) { return cuGetErrorName(error, text); }

}  // extern "C"
