#include "cpu_runtime.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <omp.h>

#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

// MKL's per-thread thread count, where torch's BLAS is MKL (weak: null in builds without it).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace softmoe {
namespace {

// ---- Large activations on huge pages ------------------------------------------------------------
//
// A layer step allocates a few activation tensors of tens to hundreds of MB (the gathered rows, the
// experts' pre-activation, their gradients). glibc hands blocks above its 32 MB mmap ceiling a
// fresh mapping every time and unmaps them on free, so each step page-faults all of it again, 4 KB
// at a time (measured here: ~0.5 ms per MB, a tenth of a layer step). Those outputs come from this
// allocator instead: 2 MB-aligned and advised MADV_HUGEPAGE, so the kernel backs them with 2 MB
// pages where transparent huge pages are enabled ("always" or "madvise"; the advice is ignored
// otherwise), 512 times fewer faults. The memory goes back to the OS on free as before; this is
// what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every tensor, confined to ours.
class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kPage = size_t{2} << 20;

  c10::DataPtr allocate(size_t n) override {
    void *ptr = nullptr;
    const size_t bytes = (std::max<size_t>(n, 1) + kPage - 1) / kPage * kPage;
    if (posix_memalign(&ptr, kPage, bytes) != 0)
      TORCH_CHECK_WITH(OutOfMemoryError, false, "softmoe: could not allocate ", bytes, " bytes for an activation");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
#endif
    return {ptr, ptr, &std::free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &std::free; }
  void copy_data(void *dest, const void *src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

// Below this, glibc's heap serves the tensor without fresh pages (and 2 MB rounding would waste).
constexpr int64_t kHugePageMinBytes = int64_t{8} << 20;

}  // namespace

at::Tensor empty_activation(at::IntArrayRef sizes, const at::TensorOptions &options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (options.device().type() != c10::DeviceType::CPU || bytes < kHugePageMinBytes) return at::empty(sizes, options);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

SingleThreadedBlas::SingleThreadedBlas() : omp_threads_(omp_get_max_threads()) {
  omp_set_num_threads(1);
  if (MKL_Set_Num_Threads_Local) mkl_threads_ = MKL_Set_Num_Threads_Local(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads_);
  omp_set_num_threads(omp_threads_);
}

}  // namespace softmoe
