// F::state, F::state_write and F::sample.
#include "devpipe/error.h"
#include "devpipe/functional.h"

namespace devpipe::F {

Var state(const std::string& name, const Shape& shape, DType dtype) {
  return Tracer::current().state(name, shape, dtype);
}

Var state_write(Var state, Var values, Var positions, int dim) {
  Tracer& tr = Tracer::current();
  if (dim < 0) dim += state.rank();
  Attrs a;
  a.set("dim", static_cast<std::int64_t>(dim));
  return tr.emit(OpKind::StateWrite, {state, values, positions}, a);
}

Var sample(Var logits, Var params, Var u) { return Tracer::current().emit(OpKind::Sample, {logits, params, u}); }

}  // namespace devpipe::F
