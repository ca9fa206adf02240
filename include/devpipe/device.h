// devpipe — where memory lives.
#pragma once

#include <string>
#include <string_view>

namespace devpipe {

/// Kind of device. The cpu backend's device memory is host memory.
enum class DeviceKind { Cpu, Cuda };

/// A device: a kind plus an index ("cpu:0", "cuda:1").
struct Device {
  DeviceKind kind = DeviceKind::Cpu;
  int index = 0;

  static Device cpu(int index = 0) { return {DeviceKind::Cpu, index}; }
  static Device cuda(int index = 0) { return {DeviceKind::Cuda, index}; }
  /// Parses "cpu", "cpu:0", "cuda", "cuda:1"; throws InvalidArgument on anything else.
  static Device parse(std::string_view text);

  bool is_host() const { return kind == DeviceKind::Cpu; }
  /// "cpu:0" / "cuda:1".
  std::string to_string() const;
  /// "cpu" / "cuda".
  std::string kind_name() const;

  friend bool operator==(const Device&, const Device&) = default;
};

std::string_view device_kind_name(DeviceKind kind);
DeviceKind device_kind_from_name(std::string_view name);

}  // namespace devpipe
