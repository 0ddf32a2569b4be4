// The CPU runtime the ops share: large activations on huge pages, single-threaded BLAS for the
// calling thread, and two ways to spread work over torch's thread pool (row ranges of a C core
// entry point; a queue of independent blocks, each thread with its own scratch).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "core/softmoe.h"

namespace softmoe {

// at::empty for a large CPU activation (contiguous, on 2 MB huge pages: see cpu_runtime.cpp); any
// other tensor (small, or on another device) as at::empty.
at::Tensor empty_activation(at::IntArrayRef sizes, const at::TensorOptions &options);

// Makes the BLAS calls of this thread single-threaded while it lives: MKL through its per-thread
// setting, OpenMP-threaded code (ATen's own loops, oneDNN for 16-bit types) through the OpenMP
// thread count of this thread. Both are restored on exit.
//
// Why: a BLAS library splits a product over its threads as it sees fit, and how it splits can change
// the order in which a dot product is summed. MKL (torch's BLAS on x86) splits the reduction
// dimension of products with a small output and a long reduction (a router's [E, d] weight gradient
// summed over every token, an expert's weight gradient over a short segment) once it has two
// threads: measured on an Intel Xeon, torch.set_num_threads(1) and (2) then differ in the last bits.
// So on the CPU every BLAS call of softmoe's ops is single-threaded, on pieces of work cut by the
// shapes alone, and the pieces are spread over torch's threads: the same shapes make the same calls,
// so the same bits, for any number of threads.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas &) = delete;
  SingleThreadedBlas &operator=(const SingleThreadedBlas &) = delete;

 private:
  int omp_threads_;
  int mkl_threads_ = 0;
};

// Runs fn(begin, end) over [0, count) on the CPU thread pool in ranges of at least `grain` items
// and returns the first non-OK status (fn calls a row-range entry point of the C core).
template <typename Fn>
smoe_status parallel_ranges(int64_t count, int64_t grain, Fn fn) {
  std::atomic<int> status{SMOE_OK};
  at::parallel_for(0, count, std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) {
    smoe_status s = fn(begin, end);
    if (s != SMOE_OK) {
      int expected = SMOE_OK;
      status.compare_exchange_strong(expected, static_cast<int>(s));
    }
  });
  return static_cast<smoe_status>(status.load());
}

// The block scheduler: runs body(block, scratch) for every block (anything with a length `len`) on
// torch's threads, which take the blocks from a queue (the longest first, for balance); each thread
// makes its scratch once (make_scratch()) and runs its BLAS calls single-threaded. Independent
// products side by side instead of every product split over all threads: every block's arithmetic
// is then fixed by the shapes, so results do not depend on the thread count, and it is faster than
// BLAS's own threading (measured on 2 cores: 8 or 64 single-threaded products of the layer's shapes
// side by side took 0.90 to 0.98x the time of the same products one after another on MKL's two
// threads).
template <typename Block, typename MakeScratch, typename Body>
void run_blocks_side_by_side(std::vector<Block> blocks, MakeScratch make_scratch, Body body) {
  if (blocks.empty()) return;
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block &a, const Block &b) { return a.len > b.len; });
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(blocks.size()));
  // The pool's threads do not inherit this thread's dispatcher state (autograd already handled, or
  // inference mode): the blocks run under it, as one call here would.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard caller_state_guard(caller_state);
    SingleThreadedBlas single;
    auto scratch = make_scratch();
    for (size_t i; (i = next.fetch_add(1)) < blocks.size();) body(blocks[i], scratch);
  });
}

}  // namespace softmoe
