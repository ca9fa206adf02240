// devpipe — error types thrown at the public API.
//
// Every failure a caller can cause (bad input, bad file, bad config, unsupported op, out of
// memory) is reported as an exception derived from devpipe::Error whose message names the
// values involved. Nothing here aborts the process.
#pragma once

#include <stdexcept>
#include <string>

namespace devpipe {

/// Base of all devpipe exceptions.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tensor shape does not fit what an op, layer or compiled stage expects.
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// A dtype does not fit what is expected.
class DTypeError : public Error {
 public:
  using Error::Error;
};

/// A file (safetensors, manifest, checkpoint) is malformed, truncated or inconsistent.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// A file could not be opened, read or written.
class IoError : public Error {
 public:
  using Error::Error;
};

/// A config attribute is missing, mistyped or out of range.
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// A call argument is invalid (wrong count, wrong rank count, wrong device, ...).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// An object is used in the wrong state (forward before load, ...).
class StateError : public Error {
 public:
  using Error::Error;
};

/// A compiled artifact does not match the wrapper/config that loads it.
class ArtifactMismatch : public Error {
 public:
  using Error::Error;
};

/// An op, dtype or feature is not supported by the selected backend.
class Unsupported : public Error {
 public:
  using Error::Error;
};

/// A device allocation failed.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

/// A collective between ranks failed: a peer rank failed, its process died or hangs (the
/// collective timed out), or the processes of a multi-process world disagree.
class CollectiveError : public Error {
 public:
  using Error::Error;
};

}  // namespace devpipe
