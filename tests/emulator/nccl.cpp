// nccl.cpp: an emulated NCCL (libnccl.so) beside the emulated CUDA driver (driver.cpp), so the
// crate's SyncBatchNorm runs its real NCCL calls on a machine without GPUs. Built by
// tests/kernel_emulator.rs into the same directory as libcuda.so.1; see README.md.
//
// The ranks of a communicator are threads of one process (or one thread, a world of one). Device
// memory is host memory and the emulated driver runs every call to completion before it returns,
// so a collective's input is ready when it is called: each rank blocks in the collective until
// every rank of its communicator has called the same one (the n-th collective of every rank is
// the same call, as NCCL requires), the last to arrive computes the result into every rank's
// output, and all return. Reductions add in rank order. Unlike NCCL, ranks may share a device.
// A rank that waits more than 60 s for the others fails with ncclInternalError rather than hang.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

extern "C" {
typedef enum { ncclSuccess = 0, ncclInternalError = 3, ncclInvalidArgument = 4, ncclInvalidUsage = 5 } ncclResult_t;
typedef enum {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9,
} ncclDataType_t;
typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;
typedef struct {
  char internal[128];
} ncclUniqueId;
typedef struct EmuComm* ncclComm_t;
typedef void* cudaStream_t;
}

namespace {

constexpr auto kPatience = std::chrono::seconds(60);

void complain(const char* what) { std::fprintf(stderr, "EMULATED NCCL: %s\n", what); }

// One collective call in progress: every rank's buffers, and who has arrived.
struct Round {
  std::vector<const void*> send;
  std::vector<void*> recv;
  int arrived = 0, left = 0;
  bool done = false;
  ncclResult_t result = ncclSuccess;
};

struct World {
  int size = 0, joined = 0;
  std::mutex lock;
  std::condition_variable changed;
  std::map<uint64_t, Round> rounds;  // by sequence number
};

std::mutex g_worlds_lock;
std::map<std::string, std::shared_ptr<World>> g_worlds;  // by unique id

struct Comm {
  std::shared_ptr<World> world;
  std::string id;
  int rank;
  uint64_t next_round = 0;
};

size_t size_of(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8: return 1;
    case ncclFloat16:
    case ncclBfloat16: return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32: return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64: return 8;
  }
  return 0;
}

template <class T> ncclResult_t reduce(const Round& r, size_t count, ncclRedOp_t op) {
  const int ranks = (int)r.send.size();
  std::vector<T> acc(count);
  std::memcpy(acc.data(), r.send[0], count * sizeof(T));
  for (int k = 1; k < ranks; ++k) {
    const T* in = static_cast<const T*>(r.send[k]);
    for (size_t i = 0; i < count; ++i) {
      switch (op) {
        case ncclSum:
        case ncclAvg: acc[i] += in[i]; break;
        case ncclProd: acc[i] *= in[i]; break;
        case ncclMax: acc[i] = in[i] > acc[i] ? in[i] : acc[i]; break;
        case ncclMin: acc[i] = in[i] < acc[i] ? in[i] : acc[i]; break;
      }
    }
  }
  if (op == ncclAvg)
    for (T& v : acc) v /= (T)ranks;
  for (int k = 0; k < ranks; ++k) std::memcpy(r.recv[k], acc.data(), count * sizeof(T));
  return ncclSuccess;
}

// Waits for every rank at this rank's next collective; the last to arrive runs `compute`.
template <class F> ncclResult_t collective(ncclComm_t handle, const void* send, void* recv, F compute) {
  auto* c = reinterpret_cast<Comm*>(handle);
  if (!c) return ncclInvalidArgument;
  World& w = *c->world;
  std::unique_lock<std::mutex> guard(w.lock);
  const uint64_t seq = c->next_round++;
  Round& r = w.rounds[seq];
  if (r.send.empty()) {
    r.send.resize((size_t)w.size);
    r.recv.resize((size_t)w.size);
  }
  r.send[(size_t)c->rank] = send;
  r.recv[(size_t)c->rank] = recv;
  if (++r.arrived == w.size) {
    r.result = compute(r);
    r.done = true;
    w.changed.notify_all();
  } else if (!w.changed.wait_for(guard, kPatience, [&] { return r.done; })) {
    complain("a rank waited 60 s for the others at a collective");
    return ncclInternalError;
  }
  const ncclResult_t result = r.result;
  if (++r.left == w.size) w.rounds.erase(seq);
  return result;
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
  *version = 22703;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id->internal, 0, sizeof id->internal);
  std::random_device entropy;
  for (size_t i = 0; i < 16; ++i) id->internal[i] = (char)(1 + entropy() % 255);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  if (nranks < 1 || rank < 0 || rank >= nranks) return ncclInvalidArgument;
  const std::string key(id.internal, 16);
  std::shared_ptr<World> world;
  {
    std::lock_guard<std::mutex> guard(g_worlds_lock);
    auto& slot = g_worlds[key];
    if (!slot) {
      slot = std::make_shared<World>();
      slot->size = nranks;
    }
    world = slot;
  }
  std::unique_lock<std::mutex> guard(world->lock);
  if (world->size != nranks) {
    complain("ranks of one unique id disagree on the world size");
    return ncclInvalidUsage;
  }
  ++world->joined;
  world->changed.notify_all();
  if (!world->changed.wait_for(guard, kPatience, [&] { return world->joined >= world->size; })) {
    complain("ncclCommInitRank waited 60 s for the other ranks");
    return ncclInternalError;
  }
  *comm = reinterpret_cast<ncclComm_t>(new Comm{world, key, rank});
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  auto* c = reinterpret_cast<Comm*>(comm);
  if (!c) return ncclInvalidArgument;
  {
    std::lock_guard<std::mutex> guard(g_worlds_lock);
    auto it = g_worlds.find(c->id);
    if (it != g_worlds.end() && it->second == c->world && c->world.use_count() <= 2) g_worlds.erase(it);
  }
  delete c;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) { return ncclCommAbort(comm); }
ncclResult_t ncclCommFinalize(ncclComm_t) { return ncclSuccess; }

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  *count = reinterpret_cast<Comm*>(comm)->world->size;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  *rank = reinterpret_cast<Comm*>(comm)->rank;
  return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t, int* device) {
  *device = 0;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() { return ncclSuccess; }
ncclResult_t ncclGroupEnd() { return ncclSuccess; }

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type, ncclComm_t comm, cudaStream_t) {
  const size_t bytes = count * size_of(type);
  if (bytes == 0 && count != 0) return ncclInvalidArgument;
  return collective(comm, send, recv, [&](const Round& r) {
    const int ranks = (int)r.send.size();
    for (int dst = 0; dst < ranks; ++dst)
      for (int src = 0; src < ranks; ++src)
        std::memmove(static_cast<char*>(r.recv[(size_t)dst]) + (size_t)src * bytes, r.send[(size_t)src], bytes);
    return ncclSuccess;
  });
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm, cudaStream_t) {
  return collective(comm, send, recv, [&](const Round& r) {
    switch (type) {
      case ncclInt32: return reduce<int32_t>(r, count, op);
      case ncclUint32: return reduce<uint32_t>(r, count, op);
      case ncclInt64: return reduce<int64_t>(r, count, op);
      case ncclUint64: return reduce<uint64_t>(r, count, op);
      case ncclFloat32: return reduce<float>(r, count, op);
      case ncclFloat64: return reduce<double>(r, count, op);
      default: complain("ncclAllReduce: this data type is not emulated"); return ncclInvalidArgument;
    }
  });
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error";
    case ncclInternalError: return "internal error (emulated NCCL; see stderr)";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
  }
  return "unknown error";
}

const char* ncclGetLastError(ncclComm_t) { return ""; }

}  // extern "C"
