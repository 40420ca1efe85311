// driver_selftest.cpp: checks that the emulated driver (driver.cpp) catches what it claims to.
// Two parts, selected by EMU_SELFTEST_PART:
//   kernels  deliberately broken kernels, compiled into libcuda.so.1 beside the real ones;
//   program  a program linked against that libcuda.so.1 that launches them through the driver
//            API; run by tests/kernel_emulator.rs once per mode (argv[1]): each mode ends the
//            process (a fault is sticky), and prints "selftest <mode>: ok" when the driver did
//            what it should. Mode guard-read expects to be killed by SIGSEGV instead.
#if defined(EMU_SELFTEST_PART_kernels)

#include "driver_registry.h"
#include "emu.h"

struct SelftestParams {
  float* data;
  unsigned long long n;
};

extern "C" void emu_selftest_fill(const SelftestParams p) {
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x) p.data[i] = (float)i;
}
extern "C" void emu_selftest_write_past_end(const SelftestParams p) {
  if (blockIdx.x == 0 && threadIdx.x == 0) p.data[p.n] = 1.0f;
}
extern "C" void emu_selftest_read_past_end(const SelftestParams p) {
  if (blockIdx.x == 0 && threadIdx.x == 0) p.data[0] = *(volatile const float*)(p.data + p.n);
}
extern "C" void emu_selftest_divergent_barrier(const SelftestParams) {
  if (threadIdx.x < 32) __syncthreads();
}

EMU_DRIVER_MODULE(EMU_DRIVER_ENTRY(emu_selftest_fill) EMU_DRIVER_ENTRY(emu_selftest_write_past_end)
                      EMU_DRIVER_ENTRY(emu_selftest_read_past_end) EMU_DRIVER_ENTRY(emu_selftest_divergent_barrier))

#elif defined(EMU_SELFTEST_PART_program)

#include <cuda.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct SelftestParams {
  CUdeviceptr data;
  unsigned long long n;
};

const char* kModule =
    ".version 9.0\n.target sm_80\n.address_size 64\n"
    ".visible .entry emu_selftest_fill(\n.visible .entry emu_selftest_write_past_end(\n"
    ".visible .entry emu_selftest_read_past_end(\n.visible .entry emu_selftest_divergent_barrier(\n";

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}
#define EXPECT_RESULT(call, want) expect((call) == (want), #call " == " #want)

CUresult launch(CUfunction f, unsigned gx, unsigned gy, SelftestParams p) {
  void* params[] = {&p};
  return cuLaunchKernel(f, gx, gy, 1, 256, 1, 1, 0, nullptr, params, nullptr);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  CUcontext ctx;
  CUdevice dev;
  EXPECT_RESULT(cuInit(0), CUDA_SUCCESS);
  EXPECT_RESULT(cuDeviceGet(&dev, 0), CUDA_SUCCESS);
  EXPECT_RESULT(cuDevicePrimaryCtxRetain(&ctx, dev), CUDA_SUCCESS);
  EXPECT_RESULT(cuCtxSetCurrent(ctx), CUDA_SUCCESS);
  CUmodule module;
  EXPECT_RESULT(cuModuleLoadData(&module, kModule), CUDA_SUCCESS);
  auto function = [&](const char* name) {
    CUfunction f = nullptr;
    EXPECT_RESULT(cuModuleGetFunction(&f, module, name), CUDA_SUCCESS);
    return f;
  };
  const unsigned long long n = 1000;
  CUdeviceptr buf;
  EXPECT_RESULT(cuMemAlloc(&buf, n * sizeof(float)), CUDA_SUCCESS);
  std::vector<float> host(n);

  if (mode == "basic") {
    // Fresh memory reads as NaN; a kernel's writes arrive; copies stay inside an allocation.
    EXPECT_RESULT(cuMemcpyDtoH(host.data(), buf, n * sizeof(float)), CUDA_SUCCESS);
    expect(std::isnan(host[0]) && std::isnan(host[n - 1]), "fresh memory is NaN");
    EXPECT_RESULT(launch(function("emu_selftest_fill"), 3, 1, {buf, n}), CUDA_SUCCESS);
    EXPECT_RESULT(cuMemcpyDtoH(host.data(), buf, n * sizeof(float)), CUDA_SUCCESS);
    bool filled = true;
    for (unsigned long long i = 0; i < n; ++i) filled &= host[i] == (float)i;
    expect(filled, "the kernel wrote every element");
    EXPECT_RESULT(cuMemcpyDtoH(host.data(), buf + 4, n * sizeof(float)), CUDA_ERROR_INVALID_VALUE);
    EXPECT_RESULT(cuMemcpyHtoD(buf + 4 * n, host.data(), 4), CUDA_ERROR_INVALID_VALUE);
    // Bad launches and modules are refused, and are not faults.
    EXPECT_RESULT(launch(function("emu_selftest_fill"), 1, 65536, {buf, n}), CUDA_ERROR_INVALID_VALUE);
    CUmodule other;
    std::string newer = kModule;
    newer.replace(newer.find("9.0"), 3, "9.1");
    EXPECT_RESULT(cuModuleLoadData(&other, newer.c_str()), CUDA_ERROR_UNSUPPORTED_PTX_VERSION);
    EXPECT_RESULT(cuModuleLoadData(&other, ".version 9.0\n.visible .entry not_compiled_in(\n"), CUDA_ERROR_INVALID_IMAGE);
    CUfunction missing;
    EXPECT_RESULT(cuModuleGetFunction(&missing, module, "not_in_module"), CUDA_ERROR_NOT_FOUND);
    size_t free_bytes, total;
    EXPECT_RESULT(cuMemGetInfo(&free_bytes, &total), CUDA_SUCCESS);
    CUdeviceptr huge;
    EXPECT_RESULT(cuMemAlloc(&huge, total + 1), CUDA_ERROR_OUT_OF_MEMORY);
    EXPECT_RESULT(cuMemFree(buf), CUDA_SUCCESS);
    EXPECT_RESULT(cuMemFree(buf), CUDA_ERROR_INVALID_VALUE);
  } else if (mode == "capture") {
    // A capture records instead of running; its graph replays the launch with the parameters
    // it was captured with; what a capture cannot hold invalidates it.
    CUstream stream;
    EXPECT_RESULT(cuStreamCreate(&stream, 0), CUDA_SUCCESS);
    CUstreamCaptureStatus status;
    EXPECT_RESULT(cuStreamBeginCapture(nullptr, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    EXPECT_RESULT(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
    EXPECT_RESULT(cuStreamIsCapturing(stream, &status), CUDA_SUCCESS);
    expect(status == CU_STREAM_CAPTURE_STATUS_ACTIVE, "the stream captures");
    EXPECT_RESULT(cuStreamIsCapturing(nullptr, &status), CUDA_SUCCESS);
    expect(status == CU_STREAM_CAPTURE_STATUS_NONE, "the legacy stream does not");
    SelftestParams p{buf, n};
    void* params[] = {&p};
    CUfunction fill = function("emu_selftest_fill");
    EXPECT_RESULT(cuLaunchKernel(fill, 3, 1, 1, 256, 1, 1, 0, stream, params, nullptr), CUDA_SUCCESS);
    p.n = 0;  // the capture holds its own copy of the parameters
    CUgraph graph;
    EXPECT_RESULT(cuStreamEndCapture(stream, &graph), CUDA_SUCCESS);
    EXPECT_RESULT(cuMemcpyDtoH(host.data(), buf, n * sizeof(float)), CUDA_SUCCESS);
    expect(std::isnan(host[0]), "a captured launch did not run");
    CUgraphExec exec;
    EXPECT_RESULT(cuGraphInstantiateWithFlags(&exec, graph, 0), CUDA_SUCCESS);
    EXPECT_RESULT(cuGraphLaunch(exec, stream), CUDA_SUCCESS);
    EXPECT_RESULT(cuMemcpyDtoH(host.data(), buf, n * sizeof(float)), CUDA_SUCCESS);
    expect(host[0] == 0.0f && host[n - 1] == (float)(n - 1), "the replay ran the captured launch");
    EXPECT_RESULT(cuGraphExecDestroy(exec), CUDA_SUCCESS);
    EXPECT_RESULT(cuGraphDestroy(graph), CUDA_SUCCESS);
    EXPECT_RESULT(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
    CUdeviceptr more;
    EXPECT_RESULT(cuMemAllocAsync(&more, 64, stream), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    EXPECT_RESULT(cuStreamIsCapturing(stream, &status), CUDA_SUCCESS);
    expect(status == CU_STREAM_CAPTURE_STATUS_INVALIDATED, "an allocation invalidates the capture");
    EXPECT_RESULT(cuStreamEndCapture(stream, &graph), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    EXPECT_RESULT(cuStreamEndCapture(stream, &graph), CUDA_ERROR_ILLEGAL_STATE);
    EXPECT_RESULT(cuStreamDestroy(stream), CUDA_SUCCESS);
  } else if (mode == "write-past-end") {
    // Caught after the launch, and sticky.
    EXPECT_RESULT(launch(function("emu_selftest_write_past_end"), 1, 1, {buf, n}), CUDA_ERROR_ILLEGAL_ADDRESS);
    EXPECT_RESULT(cuMemcpyDtoH(host.data(), buf, 4), CUDA_ERROR_ILLEGAL_ADDRESS);
  } else if (mode == "divergent-barrier") {
    EXPECT_RESULT(launch(function("emu_selftest_divergent_barrier"), 1, 1, {buf, n}), CUDA_ERROR_LAUNCH_FAILED);
    EXPECT_RESULT(cuStreamSynchronize(nullptr), CUDA_ERROR_LAUNCH_FAILED);
  } else if (mode == "guard-read") {
    // With EMU_GUARD_PAGES=1 this read faults (the process dies by SIGSEGV before the print).
    launch(function("emu_selftest_read_past_end"), 1, 1, {buf, n});
    std::printf("the read past the end did not fault\n");
    return 1;
  } else {
    std::printf("unknown mode %s\n", mode.c_str());
    return 2;
  }
  if (failures == 0) std::printf("selftest %s: ok\n", mode.c_str());
  return failures == 0 ? 0 : 1;
}

#else
#error "build with -DEMU_SELFTEST_PART_kernels or -DEMU_SELFTEST_PART_program"
#endif
