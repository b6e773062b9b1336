#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <string>

/// The errors a caller may want to tell apart, as types. Each derives from c10::Error (and so from
/// std::exception): code that catches `const c10::Error&` or `const std::exception&` catches these too,
/// and every other refusal of the library stays a plain c10::Error (TORCH_CHECK). Decide by type, never by
/// the message: messages are for people and may be reworded.
///
/// Example (resume from the newest checkpoint, or from the one before when the newest is damaged):
///   try {
///     trainer.load_checkpoint(newest);
///   } catch (const diffusion::DamagedFileError&) {
///     trainer.load_checkpoint(before);
///   }
namespace diffusion {

/// The base of the library's typed errors.
class Error : public c10::Error {
 public:
  using c10::Error::Error;
};

/// A file whose bytes cannot be what it claims to be: empty, truncated, not a regular file, a changed
/// byte (a checksum or CRC-32 that does not match), a pickle or archive LibTorch cannot read, a tensor that
/// reaches past its data, a checkpoint without a field its format requires. Another copy of the file may
/// do; the same flags will not fix it.
class DamagedFileError : public Error {
 public:
  using Error::Error;
};

/// An intact file that does not fit what it was asked to do: a checkpoint of another format version, an
/// archive that is not a diffusion checkpoint, weights of another model, a run of another formulation,
/// data shape or classes. The file is sound; the request (the flags, the model) differs from it.
class IncompatibleFileError : public Error {
 public:
  using Error::Error;
};

}  // namespace diffusion

/// TORCH_CHECK that throws `type` (one of the errors above): when `cond` is false, throws
/// type(where, c10::str(args...)), with the message built only then.
#define DIFFUSION_CHECK(type, cond, ...)                                                                          \
  do {                                                                                                           \
    if (C10_UNLIKELY(!(cond))) {                                                                                 \
      throw type(::c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, ::c10::str(__VA_ARGS__)); \
    }                                                                                                            \
  } while (false)
