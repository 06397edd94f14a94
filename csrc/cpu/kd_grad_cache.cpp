// kd_grad_cache.cpp -- see kd_grad_cache.h.
#include "kd_grad_cache.h"

#include "../kd_host.h"

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdfused::cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Below glibc's default mmap threshold (128 KiB) malloc reuses freed heap memory without page
// faults; from there on a fresh buffer costs a fault per 4 KiB page (for a 1 MiB gradient,
// N = 1 x V = 256000, more than the kernel): those are cached.
constexpr size_t kMinCachedBytes = size_t(128) << 10;

// What a training loop needs: each step asks for the same gradients (a student one, perhaps a
// teacher one) of the same size, and frees them before the next step asks again. So only buffers
// of the size of the last request are kept, and only as many as were in use at once since that
// size was first asked for (one per live gradient): the cache never holds more than the loop's
// own gradients. A request of another size (last batch of an epoch, evaluation) starts a new
// generation: the cached buffers are freed then, and buffers of older generations are freed when
// their tensors are, instead of being kept.
struct Block {
  void* ptr;
  size_t bytes;
};

struct Cache {
  std::mutex mu;
  std::deque<Block> free;   // free buffers of the current generation's size
  size_t bytes = 0;         // the size of the last request (the current generation's)
  uint64_t generation = 0;  // bumped whenever the requested size changes
};

// Never destroyed: buffers may be freed by tensors that outlive static destruction.
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("KDFUSED_CPU_GRAD_CACHE");
    return !(env && env[0] == '0');
  }();
  return on;
}

void* allocate(size_t bytes) {
  void* p = nullptr;
  // 2 MiB alignment (buffers of at least 2 MiB) so that the whole buffer can be backed by
  // transparent huge pages: 512 times fewer page faults on first touch. Advice only: errors are
  // ignored.
  const size_t align = bytes >= kHugePage ? kHugePage : size_t(4096);
  if (posix_memalign(&p, align, bytes) != 0 || p == nullptr)
    TORCH_CHECK(false, "kdfused: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

void release(void* p, size_t bytes, uint64_t generation) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (generation == c.generation) {
      // Every buffer of this generation was handed out while in use, so the cache never holds
      // more of them than were in use at once.
      c.free.push_back({p, bytes});
      return;
    }
  }
  std::free(p);
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (!enabled() || bytes < kMinCachedBytes) return at::empty(sizes, options);
  void* p = nullptr;
  uint64_t generation = 0;
  std::deque<Block> stale;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (bytes != c.bytes) {
      // A new size: the cached buffers of the old one are not what the loop needs any more.
      stale.swap(c.free);
      c.bytes = bytes;
      ++c.generation;
    }
    if (!c.free.empty()) {
      p = c.free.back().ptr;
      c.free.pop_back();
    }
    generation = c.generation;
  }
  for (const Block& b : stale) std::free(b.ptr);  // outside the lock
  if (p == nullptr) p = allocate(bytes);
  return at::from_blob(
      p, sizes, [bytes, generation](void* q) { release(q, bytes, generation); },
      options.device(at::kCPU));
}

size_t empty_cache() {
  Cache& c = cache();
  std::deque<Block> blocks;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    blocks.swap(c.free);
  }
  size_t total = 0;
  for (const Block& b : blocks) {
    total += b.bytes;
    std::free(b.ptr);
  }
  return total;
}

size_t cached_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  size_t total = 0;
  for (const Block& b : c.free) total += b.bytes;
  return total;
}

}  // namespace kdfused::cpu

namespace kdfused {

// Declared with the host code (kd_host.h), defined here so that the host code needs no CPU header:
// CPU gradients come from the cache above, other devices' from their allocator.
at::Tensor empty_grad(const at::Tensor& like) {
  return like.is_cpu() ? cpu::cached_empty(like.sizes(), like.options())
                       : at::empty(like.sizes(), like.options());
}

}  // namespace kdfused
