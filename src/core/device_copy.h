// Internal: byte copies between devices, provided by the backends that own device memory.
#pragma once

#include <cstddef>

#include "devpipe/device.h"

namespace devpipe::detail {

/// Copies `bytes` from src (on src_dev) to dst (on dst_dev); blocking.
using DeviceCopyFn = void (*)(void* dst, Device dst_dev, const void* src, Device src_dev,
                              std::size_t bytes);

/// Registers the copy function for a non-host device kind (the cuda backend does this).
void register_device_copy(DeviceKind kind, DeviceCopyFn fn);

/// Copies between any two devices; host<->host is memcpy. Throws Unsupported when no backend
/// registered the kind involved.
void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes);

}  // namespace devpipe::detail
