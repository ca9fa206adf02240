#include "devpipe/dtype.h"

#include <bit>
#include <cmath>
#include <cstring>

#include "devpipe/error.h"

namespace devpipe {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return 4;
    case DType::BFloat16:
      return 2;
    case DType::Float16:
      return 2;
    case DType::Int64:
      return 8;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return "float32";
    case DType::BFloat16:
      return "bfloat16";
    case DType::Float16:
      return "float16";
    case DType::Int64:
      return "int64";
  }
  return "?";
}

DType dtype_from_name(std::string_view name) {
  if (name == "float32" || name == "F32" || name == "float") return DType::Float32;
  if (name == "bfloat16" || name == "BF16") return DType::BFloat16;
  if (name == "float16" || name == "F16" || name == "half") return DType::Float16;
  if (name == "int64" || name == "I64" || name == "long") return DType::Int64;
  throw DTypeError("unknown dtype '" + std::string(name) +
                   "' (expected float32, bfloat16, float16 or int64)");
}

bool is_floating(DType dtype) { return dtype != DType::Int64; }

float bf16_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

std::uint16_t float_to_bf16(float value) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(value);
  if (std::isnan(value)) return static_cast<std::uint16_t>((u >> 16) | 0x40);
  std::uint32_t rounding = 0x7fff + ((u >> 16) & 1);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

float fp16_to_float(std::uint16_t h) {
  std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000) << 16;
  std::uint32_t exp = (h >> 10) & 0x1f;
  std::uint32_t mant = h & 0x3ff;
  std::uint32_t out;
  if (exp == 0) {
    if (mant == 0) {
      out = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      mant &= 0x3ff;
      out = sign | static_cast<std::uint32_t>(127 - 15 - e) << 23 | mant << 13;
    }
  } else if (exp == 0x1f) {
    out = sign | 0x7f800000u | mant << 13;
  } else {
    out = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  return std::bit_cast<float>(out);
}

std::uint16_t float_to_fp16(float value) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(value);
  std::uint32_t sign = (u >> 16) & 0x8000;
  std::uint32_t absu = u & 0x7fffffff;
  if (absu > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00);  // NaN
  if (absu >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in half
    float f = std::bit_cast<float>(absu);
    // scale so that the half subnormal unit (2^-24) becomes 1, round to nearest even
    float scaled = f * 16777216.0f;
    auto r = static_cast<std::uint32_t>(std::nearbyint(scaled));
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t exp = ((absu >> 23) - 127 + 15);
  std::uint32_t mant = absu & 0x7fffff;
  std::uint32_t h = exp << 10 | mant >> 13;
  std::uint32_t rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

}  // namespace devpipe
