// devpipe — element types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace devpipe {

/// Element type of a tensor.
enum class DType : std::uint8_t { Float32, BFloat16, Float16, Int64 };

/// Bytes per element.
std::size_t dtype_size(DType dtype);
/// Lower-case name as PyTorch spells it: "float32", "bfloat16", "float16", "int64".
std::string_view dtype_name(DType dtype);
/// Parses a dtype name (also accepts the safetensors codes F32, BF16, F16, I64); throws
/// DTypeError naming the text on an unknown name.
DType dtype_from_name(std::string_view name);
/// True for the floating-point dtypes.
bool is_floating(DType dtype);

/// Scalar conversions (round to nearest even; NaN preserved).
float bf16_to_float(std::uint16_t bits);
std::uint16_t float_to_bf16(float value);
float fp16_to_float(std::uint16_t bits);
std::uint16_t float_to_fp16(float value);

}  // namespace devpipe
