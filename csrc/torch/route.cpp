// The truncated dispatch ops on the CPU, and the argument checks they share with route_cuda.cpp.
#include "route.h"

#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "cpu_runtime.h"

namespace softmoe {
namespace {

// A plan tensor: int64 with `dim` dimensions, on the device of ref.
void check_plan_tensor(const char *op, const at::Tensor &t, const char *name, int64_t dim, const at::Tensor &ref,
                       const char *ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "softmoe: ", op, ": ", name,
                   " must be an int64 tensor from dispatch_plan, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "softmoe: ", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  check_same_device(op, t, name, ref, ref_name);
}

void check_float_2d(const char *op, const at::Tensor &t, const char *name, const char *shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                   "softmoe: ", op, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
                   t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "softmoe: ", op, ": ", name, " must be 2-D ", shape, ", got shape ", t.sizes());
}

// token_pairs [T, M] with M >= 1 and T = tokens; a slot tensor [T * M] (pair_token / pair_expert).
void check_token_pairs(const char *op, const at::Tensor &token_pairs, int64_t tokens, const char *tokens_from) {
  TORCH_CHECK(token_pairs.size(1) >= 1, "softmoe: ", op, ": token_pairs must have max_active >= 1 columns, got shape ",
              token_pairs.sizes());
  TORCH_CHECK(token_pairs.size(0) == tokens, "softmoe: ", op, ": token_pairs must have one row per token (", tokens,
              " rows, from ", tokens_from, "), got shape ", token_pairs.sizes());
}

// A slot tensor (pair_token / pair_expert / ys rows): S entries with S <= tokens * max_active, all of
// them (S = T * M) or the routed prefix (S = N, see DispatchPlan.trim); an index of token_pairs
// beyond S is then caught by the kernels' range checks.
void check_slots(const char *op, const at::Tensor &t, const char *name, const at::Tensor &token_pairs) {
  TORCH_CHECK(t.size(0) <= token_pairs.numel(), "softmoe: ", op, ": ", name,
              " must have at most tokens * max_active = ", token_pairs.numel(), " entries (the slots of token_pairs ",
              token_pairs.sizes(), "), got ", t.size(0));
}

void check_combine_args(const char *op, const at::Tensor &ys, const at::Tensor &p, const at::Tensor &pair_token,
                        const at::Tensor &pair_expert, const at::Tensor &token_pairs) {
  check_float_2d(op, ys, "ys", "[slots, features]");
  check_float_2d(op, p, "p", "[tokens, experts]");
  check_same_device(op, p, "p", ys, "ys");
  check_plan_tensor(op, pair_token, "pair_token", 1, ys, "ys");
  check_plan_tensor(op, pair_expert, "pair_expert", 1, ys, "ys");
  check_plan_tensor(op, token_pairs, "token_pairs", 2, ys, "ys");
  TORCH_CHECK(p.size(1) >= 1, "softmoe: ", op, ": p must have at least one expert, got shape ", p.sizes());
  check_token_pairs(op, token_pairs, p.size(0), "p.size(0)");
  TORCH_CHECK(token_pairs.size(1) <= p.size(1), "softmoe: ", op, ": token_pairs must have max_active <= ", p.size(1),
              " (the number of experts of p) columns, got shape ", token_pairs.sizes());
  check_slots(op, pair_token, "pair_token", token_pairs);
  TORCH_CHECK(pair_expert.size(0) == pair_token.size(0), "softmoe: ", op,
              ": pair_expert must have as many slots as pair_token (", pair_token.size(0), "), got ",
              pair_expert.size(0));
  TORCH_CHECK(ys.size(0) == pair_token.size(0), "softmoe: ", op, ": ys must have one row per slot of pair_token (",
              pair_token.size(0), "), got shape ", ys.sizes());
}

// combine with weights p (p defined) or unit weights (the backward of gather_rows).
CombineCall combine_call(const char *op, const at::Tensor &ys_in, const at::Tensor *p_in,
                         const at::Tensor *pair_expert_in, const at::Tensor &token_pairs_in) {
  const int64_t T = token_pairs_in.size(0), M = token_pairs_in.size(1), d = ys_in.size(1);
  CombineCall call;
  call.op = op;
  call.indices = p_in ? "token_pairs or pair_expert" : "token_pairs";
  call.y = empty_activation({T, d}, ys_in.options());
  call.run = T > 0 && d > 0;
  if (!call.run) return call;
  call.ys = ys_in.contiguous();
  call.token_pairs = token_pairs_in.contiguous();
  smoe_combine_args &args = call.args;
  args = smoe_combine_args{};
  args.tokens = T;
  args.max_active = M;
  args.d = d;
  args.slots = call.ys.size(0);
  args.ys_dtype = to_smoe_dtype(call.ys, "ys");
  args.ys = call.ys.data_ptr();
  args.p_dtype = SMOE_F32;
  args.p = nullptr;
  args.experts = M;
  if (p_in) {
    call.p = p_in->contiguous();
    call.pair_expert = pair_expert_in->contiguous();
    args.experts = call.p.size(1);
    args.p_dtype = to_smoe_dtype(call.p, "p");
    args.p = call.p.data_ptr();
    args.pair_expert = call.pair_expert.data_ptr<int64_t>();
  }
  args.token_pairs = call.token_pairs.data_ptr<int64_t>();
  args.y = call.y.data_ptr();
  return call;
}

// Work items of about this many elements per task of the thread pool.
int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1)); }

}  // namespace

PlanCall plan_call(const at::Tensor &p, int64_t max_active) {
  const char *op = "dispatch_plan";
  check_float_2d(op, p, "p", "[tokens, experts]");
  const int64_t T = p.size(0), E = p.size(1);
  TORCH_CHECK(E >= 1, "softmoe: dispatch_plan: p must have at least one expert (p.size(1) >= 1), got shape ",
              p.sizes());
  TORCH_CHECK(max_active >= 1 && max_active <= E, "softmoe: dispatch_plan: max_active must satisfy 1 <= max_active <= ",
              E, " (the number of experts), got ", max_active);
  const int64_t M = max_active, P = T * M;
  auto opts = p.options().dtype(at::kLong);
  PlanCall call;
  call.offsets = at::zeros({E + 1}, opts);
  call.pair_token = at::empty({P}, opts);
  call.pair_expert = at::empty({P}, opts);
  call.token_pairs = at::empty({T, M}, opts);
  call.run = T > 0;
  if (!call.run) return call;
  call.p = p.contiguous();
  smoe_plan_args &args = call.args;
  args = smoe_plan_args{};
  args.tokens = T;
  args.experts = E;
  args.max_active = M;
  args.dtype = to_smoe_dtype(call.p, "p");
  args.p = call.p.data_ptr();
  args.offsets = call.offsets.data_ptr<int64_t>();
  args.pair_token = call.pair_token.data_ptr<int64_t>();
  args.pair_expert = call.pair_expert.data_ptr<int64_t>();
  args.token_pairs = call.token_pairs.data_ptr<int64_t>();
  return call;
}

GatherCall gather_rows_call(const at::Tensor &x, const at::Tensor &pair_token, const at::Tensor &token_pairs) {
  const char *op = "gather_rows";
  check_float_2d(op, x, "x", "[tokens, features]");
  check_plan_tensor(op, pair_token, "pair_token", 1, x, "x");
  check_plan_tensor(op, token_pairs, "token_pairs", 2, x, "x");
  check_token_pairs(op, token_pairs, x.size(0), "x.size(0)");
  check_slots(op, pair_token, "pair_token", token_pairs);
  const int64_t T = x.size(0), d = x.size(1), P = pair_token.size(0);
  GatherCall call;
  call.xs = empty_activation({P, d}, x.options());
  call.run = P > 0 && d > 0;
  if (!call.run) return call;
  call.x = x.contiguous();
  call.pair_token = pair_token.contiguous();
  smoe_gather_args &args = call.args;
  args = smoe_gather_args{};
  args.tokens = T;
  args.slots = P;
  args.d = d;
  args.dtype = to_smoe_dtype(call.x, "x");
  args.x = call.x.data_ptr();
  args.pair_token = call.pair_token.data_ptr<int64_t>();
  args.xs = call.xs.data_ptr();
  return call;
}

CombineCall combine_rows_call(const at::Tensor &ys, const at::Tensor &p, const at::Tensor &pair_token,
                              const at::Tensor &pair_expert, const at::Tensor &token_pairs) {
  check_combine_args("combine_rows", ys, p, pair_token, pair_expert, token_pairs);
  return combine_call("combine_rows", ys, &p, &pair_expert, token_pairs);
}

CombineCall gather_rows_backward_call(const at::Tensor &grad_xs, const at::Tensor &token_pairs) {
  const char *op = "gather_rows_backward";
  check_float_2d(op, grad_xs, "grad_xs", "[slots, features]");
  check_plan_tensor(op, token_pairs, "token_pairs", 2, grad_xs, "grad_xs");
  check_token_pairs(op, token_pairs, token_pairs.size(0), "token_pairs");
  check_slots(op, grad_xs, "grad_xs", token_pairs);
  return combine_call(op, grad_xs, nullptr, nullptr, token_pairs);
}

CombineBackwardCall combine_rows_backward_call(const at::Tensor &grad_y, const at::Tensor &ys, const at::Tensor &p,
                                               const at::Tensor &pair_token, const at::Tensor &pair_expert,
                                               const at::Tensor &token_pairs) {
  const char *op = "combine_rows_backward";
  check_combine_args(op, ys, p, pair_token, pair_expert, token_pairs);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == p.size(0) && grad_y.size(1) == ys.size(1), "softmoe: ", op,
              ": grad_y must have shape [tokens, features] = [", p.size(0), ", ", ys.size(1), "], got ",
              grad_y.sizes());
  check_same_device(op, grad_y, "grad_y", ys, "ys");
  TORCH_CHECK_TYPE(at::isFloatingType(grad_y.scalar_type()), "softmoe: ", op,
                   ": grad_y must be a floating-point tensor, got ", grad_y.scalar_type());
  const int64_t T = p.size(0), E = p.size(1), M = token_pairs.size(1), d = ys.size(1);
  CombineBackwardCall call;
  call.grad_ys = empty_activation(ys.sizes(), ys.options());
  call.grad_p = at::empty(p.sizes(), p.options());
  call.run = T > 0;
  if (!call.run) return call;
  call.ys = ys.contiguous();
  call.grad_y = grad_y.to(call.ys.scalar_type()).contiguous();
  call.p = p.contiguous();
  call.pair_token = pair_token.contiguous();
  call.pair_expert = pair_expert.contiguous();
  call.token_pairs = token_pairs.contiguous();
  smoe_combine_bwd_args &args = call.args;
  args = smoe_combine_bwd_args{};
  args.tokens = T;
  args.experts = E;
  args.max_active = M;
  args.d = d;
  args.slots = call.ys.size(0);
  args.ys_dtype = to_smoe_dtype(call.ys, "ys");
  args.grad_y = call.grad_y.data_ptr();
  args.ys = call.ys.data_ptr();
  args.p_dtype = to_smoe_dtype(call.p, "p");
  args.p = call.p.data_ptr();
  args.pair_token = call.pair_token.data_ptr<int64_t>();
  args.pair_expert = call.pair_expert.data_ptr<int64_t>();
  args.token_pairs = call.token_pairs.data_ptr<int64_t>();
  args.grad_ys = call.grad_ys.data_ptr();
  args.grad_p = call.grad_p.data_ptr();
  return call;
}

namespace {

// The plan in three passes over token chunks, each pass spread over the thread pool (the result
// does not depend on the chunks): at most 64 chunks, at least 256 tokens each.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_cpu(const at::Tensor &p, int64_t max_active) {
  PlanCall call = plan_call(p, max_active);
  if (!call.run) return call.outputs();
  const smoe_plan_args &args = call.args;
  const int64_t T = args.tokens, E = args.experts;
  const int64_t chunk = std::max<int64_t>(256, (T + 63) / 64);
  const int64_t chunks = (T + chunk - 1) / chunk;
  at::Tensor counts = at::empty({chunks, E}, call.offsets.options());
  int64_t *c = counts.data_ptr<int64_t>();
  auto each_chunk = [&](smoe_status (*pass)(const smoe_plan_args *, int64_t, int64_t, int64_t *)) {
    return parallel_ranges(chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        smoe_status st = pass(&args, k * chunk, std::min(T, (k + 1) * chunk), c + k * E);
        if (st != SMOE_OK) return st;
      }
      return SMOE_OK;
    });
  };
  check_status(each_chunk(&smoe_plan_count), "dispatch_plan (count)");
  check_status(smoe_plan_scan(&args, chunks, c), "dispatch_plan (scan)");
  check_status(each_chunk(&smoe_plan_place), "dispatch_plan (place)");
  return call.outputs();
}

at::Tensor gather_rows_cpu(const at::Tensor &x, const at::Tensor &pair_token, const at::Tensor &token_pairs) {
  GatherCall call = gather_rows_call(x, pair_token, token_pairs);
  if (!call.run) return call.xs;
  const smoe_gather_args &args = call.args;
  check_index_status(parallel_ranges(args.slots, grain_for(args.d),
                                     [&](int64_t b, int64_t e) { return smoe_gather_rows(&args, b, e); }),
                     "gather_rows", "pair_token");
  return call.xs;
}

at::Tensor combine_cpu(const CombineCall &call) {
  if (!call.run) return call.y;
  const smoe_combine_args &args = call.args;
  check_index_status(parallel_ranges(args.tokens, grain_for(args.d * args.max_active),
                                     [&](int64_t b, int64_t e) { return smoe_combine_rows(&args, b, e); }),
                     call.op, call.indices);
  return call.y;
}

at::Tensor combine_rows_cpu(const at::Tensor &ys, const at::Tensor &p, const at::Tensor &pair_token,
                            const at::Tensor &pair_expert, const at::Tensor &token_pairs) {
  return combine_cpu(combine_rows_call(ys, p, pair_token, pair_expert, token_pairs));
}

at::Tensor gather_rows_backward_cpu(const at::Tensor &grad_xs, const at::Tensor &token_pairs) {
  return combine_cpu(gather_rows_backward_call(grad_xs, token_pairs));
}

std::tuple<at::Tensor, at::Tensor> combine_rows_backward_cpu(const at::Tensor &grad_y, const at::Tensor &ys,
                                                             const at::Tensor &p, const at::Tensor &pair_token,
                                                             const at::Tensor &pair_expert,
                                                             const at::Tensor &token_pairs) {
  CombineBackwardCall call = combine_rows_backward_call(grad_y, ys, p, pair_token, pair_expert, token_pairs);
  if (call.run) {
    const smoe_combine_bwd_args &args = call.args;
    check_index_status(parallel_ranges(args.tokens, grain_for(2 * args.d * args.max_active + args.experts),
                                       [&](int64_t b, int64_t e) { return smoe_combine_bwd(&args, b, e); }),
                       "combine_rows_backward", "pair_token, pair_expert or token_pairs");
  }
  return {call.grad_ys, call.grad_p};
}

}  // namespace
}  // namespace softmoe

TORCH_LIBRARY_IMPL(softmoe, CPU, m) {
  m.impl("dispatch_plan", &softmoe::dispatch_plan_cpu);
  m.impl("gather_rows", &softmoe::gather_rows_cpu);
  m.impl("gather_rows_backward", &softmoe::gather_rows_backward_cpu);
  m.impl("combine_rows", &softmoe::combine_rows_cpu);
  m.impl("combine_rows_backward", &softmoe::combine_rows_backward_cpu);
}
