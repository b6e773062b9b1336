#pragma once

// Builds the tests with Catch2 v2 (Debian 12's `catch2`) or v3; the tests use only what both offer,
// spelled through the names below.
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_floating_point.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
namespace diffusion_test {
inline auto contains(const std::string& s) { return Catch::Matchers::ContainsSubstring(s); }
}  // namespace diffusion_test
#else
#include <catch2/catch.hpp>
namespace diffusion_test {
inline auto contains(const std::string& s) { return Catch::Matchers::Contains(s); }
}  // namespace diffusion_test
#endif

using Catch::Matchers::WithinAbs;
using Catch::Matchers::WithinRel;

/// Checks that `expr` throws a c10::Error (what TORCH_CHECK throws) whose message contains `text`.
#define CHECK_REFUSED(expr, text) CHECK_THROWS_WITH(expr, diffusion_test::contains(text))
