#include "runtime/backend.h"

#include "backends/cpu/cpu_backend.h"
#include "devpipe/error.h"

namespace devpipe {

#ifdef DEVPIPE_HAVE_CUDA
Backend& cuda_backend();
#endif

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
