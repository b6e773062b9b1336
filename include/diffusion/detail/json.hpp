#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

/// Small helpers for the options structs' JSON forms (checkpoints record options as JSON).
namespace diffusion::detail {

/// Refuses a JSON value that is not an object, or that has a field not in `known`, naming `type` and the
/// field: a file written by a newer version, or edited by hand, is refused rather than half-read.
inline void check_json_fields(const nlohmann::json& j, std::initializer_list<std::string_view> known, const char* type) {
  TORCH_CHECK(j.is_object(), type, ": expected a JSON object, got ", j.dump());
  for (const auto& item : j.items()) {
    TORCH_CHECK(std::find(known.begin(), known.end(), item.key()) != known.end(), type, ": unknown field \"",
                item.key(), "\"");
  }
}

/// Calls `set(value)` with field `key` of `j` read as T, when present. An integer field (or list of
/// integers) holding a number with a fraction or an exponent is refused rather than truncated (nlohmann
/// would read 4.5 as 4 and 1e10 as a huge count).
template <class T, class Set>
void read_json_field(const nlohmann::json& j, const char* key, Set&& set) {
  if (!j.contains(key)) return;
  const auto& value = j.at(key);
  const auto integer = [&](const nlohmann::json& v) {
    TORCH_CHECK(!v.is_number() || v.is_number_integer(), "\"", key, "\" must be an integer, got ", value.dump());
  };
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    integer(value);
  } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    if (value.is_array()) {
      for (const auto& v : value) integer(v);
    }
  }
  set(value.template get<T>());
}

}  // namespace diffusion::detail
