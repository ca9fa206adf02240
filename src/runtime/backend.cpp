#include "runtime/backend.h"

#include <cstring>

#include "backends/cpu/cpu_backend.h"
#include "devpipe/error.h"
#include "devpipe/world.h"

namespace devpipe {

#ifdef DEVPIPE_HAVE_CUDA
Backend& cuda_backend();
#endif

Device Backend::device_for_rank(int rank, int tp_degree) const {
  return World::device_of_rank(kind(), rank, tp_degree, device_count());
}

void Backend::fill_zero(void* dst, Device device, std::size_t bytes) {
  if (!device.is_host()) {
    throw Unsupported("fill_zero on " + device.to_string() + " is not implemented by this backend");
  }
  std::memset(dst, 0, bytes);
}

Backend& backend_for(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::Cpu:
      return cpu_backend();
    case DeviceKind::Cuda:
#ifdef DEVPIPE_HAVE_CUDA
      return cuda_backend();
#else
      throw Unsupported("this build of devpipe has no cuda backend (configure with -DDEVPIPE_CUDA=ON)");
#endif
  }
  throw Unsupported("unknown device kind");
}

}  // namespace devpipe
