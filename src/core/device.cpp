#include "devpipe/device.h"

#include <charconv>

#include "devpipe/error.h"

namespace devpipe {

std::string_view device_kind_name(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::Cpu:
      return "cpu";
    case DeviceKind::Cuda:
      return "cuda";
  }
  return "?";
}

DeviceKind device_kind_from_name(std::string_view name) {
  if (name == "cpu") return DeviceKind::Cpu;
  if (name == "cuda") return DeviceKind::Cuda;
  throw InvalidArgument("unknown device kind '" + std::string(name) + "' (expected cpu or cuda)");
}

Device Device::parse(std::string_view text) {
  auto colon = text.find(':');
  Device d;
  d.kind = device_kind_from_name(text.substr(0, colon));
  if (colon != std::string_view::npos) {
    auto idx = text.substr(colon + 1);
    auto [p, ec] = std::from_chars(idx.data(), idx.data() + idx.size(), d.index);
    if (ec != std::errc() || p != idx.data() + idx.size() || d.index < 0) {
      throw InvalidArgument("bad device index in '" + std::string(text) + "'");
    }
  }
  return d;
}

std::string Device::kind_name() const { return std::string(device_kind_name(kind)); }

std::string Device::to_string() const { return kind_name() + ":" + std::to_string(index); }

}  // namespace devpipe
