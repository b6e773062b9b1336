# Header-only stand-ins for machines without Debian's packages (a GPU box with only a pip PyTorch):
# DIFFUSION_THIRD_PARTY_DIR names a folder that scripts/vendor-headers.sh fills from this machine's
# /usr/include: fmt/ (used header-only), catch2/ (v2 single header + its CMake scripts), CLI/, stb/ and
# nlohmann/.
# Each package is still looked for first; the folder only fills what is missing.
set(DIFFUSION_THIRD_PARTY_DIR "" CACHE PATH
    "Folder with fmt/, catch2/, CLI/ and stb/ headers for what find_package does not find (scripts/vendor-headers.sh)")
set(_tp "${DIFFUSION_THIRD_PARTY_DIR}")

find_package(fmt QUIET)
if(NOT fmt_FOUND)
  if(NOT _tp OR NOT EXISTS "${_tp}/fmt/core.h")
    message(FATAL_ERROR "fmt not found: install libfmt-dev, or set DIFFUSION_THIRD_PARTY_DIR to a folder holding "
                        "fmt/ (scripts/vendor-headers.sh makes one)")
  endif()
  add_library(diffusion_fmt_header_only INTERFACE)
  target_include_directories(diffusion_fmt_header_only INTERFACE "${_tp}")
  target_compile_definitions(diffusion_fmt_header_only INTERFACE FMT_HEADER_ONLY=1)
  add_library(fmt::fmt ALIAS diffusion_fmt_header_only)
  set(DIFFUSION_VENDORED ON)
  message(STATUS "diffusion: fmt header-only from ${_tp}")
endif()

find_package(nlohmann_json 3 QUIET)
if(NOT nlohmann_json_FOUND)
  if(NOT _tp OR NOT EXISTS "${_tp}/nlohmann/json.hpp")
    message(FATAL_ERROR "nlohmann-json not found: install nlohmann-json3-dev, or set DIFFUSION_THIRD_PARTY_DIR to a "
                        "folder holding nlohmann/ (scripts/vendor-headers.sh makes one)")
  endif()
  add_library(diffusion_nlohmann_json INTERFACE)
  target_include_directories(diffusion_nlohmann_json INTERFACE "${_tp}")
  add_library(nlohmann_json::nlohmann_json ALIAS diffusion_nlohmann_json)
  set(DIFFUSION_VENDORED ON)
  message(STATUS "diffusion: nlohmann-json from ${_tp}")
endif()

find_package(CLI11 QUIET)
if(NOT CLI11_FOUND AND _tp AND EXISTS "${_tp}/CLI/CLI.hpp")
  add_library(diffusion_cli11 INTERFACE)
  target_include_directories(diffusion_cli11 INTERFACE "${_tp}")
  add_library(CLI11::CLI11 ALIAS diffusion_cli11)
  set(DIFFUSION_VENDORED ON)
  message(STATUS "diffusion: CLI11 from ${_tp}")
endif()

# zlib only reads gzipped idx files; without it plain ones still load.
find_package(ZLIB QUIET)
set(DIFFUSION_HAVE_ZLIB ${ZLIB_FOUND})
if(NOT ZLIB_FOUND)
  message(STATUS "diffusion: zlib not found; gzipped idx files will be refused (DIFFUSION_NO_ZLIB)")
endif()

find_path(DIFFUSION_SYSTEM_STB stb/stb_image_write.h)
if(NOT DIFFUSION_SYSTEM_STB AND _tp AND EXISTS "${_tp}/stb/stb_image_write.h")
  set(DIFFUSION_STB_DIR "${_tp}")
  set(DIFFUSION_VENDORED ON)
endif()
