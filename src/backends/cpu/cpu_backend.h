// Internal: the cpu backend (oneDNN kernels; ranks are threads sharing the cores).
#pragma once

#include "runtime/backend.h"

namespace devpipe {

/// The process-wide cpu backend.
Backend& cpu_backend();

}  // namespace devpipe
