#pragma once

/// Library version. CMake reads these three lines, so they are the single source of truth.
#define DIFFUSION_VERSION_MAJOR 0
#define DIFFUSION_VERSION_MINOR 1
#define DIFFUSION_VERSION_PATCH 0

namespace diffusion {
inline constexpr int version_major = DIFFUSION_VERSION_MAJOR;
inline constexpr int version_minor = DIFFUSION_VERSION_MINOR;
inline constexpr int version_patch = DIFFUSION_VERSION_PATCH;
}  // namespace diffusion
