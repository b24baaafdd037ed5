// Host-to-device copy bandwidth from pinned memory (the PCIe path of cold experts): one
// 1 GiB cudaMemcpyAsync, best of several; and the device's own read bandwidth (a
// device-to-device copy: bytes read + written). Build: nvcc -O3 h2d.cu -o h2d
#include <cstdio>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

int main() {
  const size_t bytes = 1ull << 30;
  void *host, *dev, *dev2;
  CHECK(cudaMallocHost(&host, bytes));
  CHECK(cudaMalloc(&dev, bytes));
  CHECK(cudaMalloc(&dev2, bytes));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  float best_h2d = 1e9, best_d2d = 1e9;
  for (int i = 0; i < 6; i++) {
    float ms;
    CHECK(cudaEventRecord(a));
    CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (ms < best_h2d) best_h2d = ms;
    CHECK(cudaEventRecord(a));
    CHECK(cudaMemcpyAsync(dev2, dev, bytes, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (ms < best_d2d) best_d2d = ms;
  }
  printf("pinned host to device: %.1f GB/s (1 GiB, best of 6)\n", bytes / (best_h2d * 1e-3) / 1e9);
  printf("device to device: %.1f GB/s read + written (%.1f GB/s each way)\n", 2 * bytes / (best_d2d * 1e-3) / 1e9, bytes / (best_d2d * 1e-3) / 1e9);
  return 0;
}
