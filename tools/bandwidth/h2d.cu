// Host-to-device copy bandwidth from pinned memory (the PCIe path of cold experts): one
// 1 GiB cudaMemcpyAsync, best of several; and the device's own read bandwidth (a
// device-to-device copy: bytes read + written). With a number of seconds, instead: pinned
// host-to-device copies back to back for that long and their mean rate (run beside
// host_read, the rate each side keeps while both read host memory).
// Usage: h2d [seconds]. Build: nvcc -O3 h2d.cu -o h2d
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

int main(int argc, char **argv) {
  const size_t bytes = 1ull << 30;
  const double seconds = argc > 1 ? atof(argv[1]) : 0;
  void *host, *dev, *dev2;
  CHECK(cudaMallocHost(&host, bytes));
  CHECK(cudaMalloc(&dev, bytes));
  CHECK(cudaMalloc(&dev2, bytes));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  // Milliseconds of one copy of `bytes` (negative on a CUDA error, printed).
  auto time_copy = [&](void *dst, const void *src, cudaMemcpyKind kind) -> float {
    float ms = -1;
    if (cudaEventRecord(a) != cudaSuccess || cudaMemcpyAsync(dst, src, bytes, kind) != cudaSuccess ||
        cudaEventRecord(b) != cudaSuccess || cudaEventSynchronize(b) != cudaSuccess ||
        cudaEventElapsedTime(&ms, a, b) != cudaSuccess) {
      printf("copy: %s\n", cudaGetErrorString(cudaGetLastError()));
      return -1;
    }
    return ms;
  };
  if (seconds > 0) {
    using clock = std::chrono::steady_clock;
    auto t0 = clock::now();
    double copied = 0, dt = 0;
    while (dt < seconds) {
      CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice));
      CHECK(cudaDeviceSynchronize());
      copied += bytes;
      dt = std::chrono::duration<double>(clock::now() - t0).count();
    }
    printf("pinned host to device, back to back: %.1f GB/s over %.2f s\n", copied / dt / 1e9, dt);
    return 0;
  }
  float best_h2d = 1e9, best_d2d = 1e9;
  for (int i = 0; i < 6; i++) {
    float h2d = time_copy(dev, host, cudaMemcpyHostToDevice);
    float d2d = time_copy(dev2, dev, cudaMemcpyDeviceToDevice);
    if (h2d < 0 || d2d < 0) return 1;
    if (h2d < best_h2d) best_h2d = h2d;
    if (d2d < best_d2d) best_d2d = d2d;
  }
  printf("pinned host to device: %.1f GB/s (1 GiB, best of 6)\n", bytes / (best_h2d * 1e-3) / 1e9);
  printf("device to device: %.1f GB/s read + written (%.1f GB/s each way)\n", 2 * bytes / (best_d2d * 1e-3) / 1e9, bytes / (best_d2d * 1e-3) / 1e9);
  return 0;
}
