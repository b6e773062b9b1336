#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <string_view>

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

/// Calls `set(value)` with field `key` of `j` read as T, when present.
template <class T, class Set>
void read_json_field(const nlohmann::json& j, const char* key, Set&& set) {
  if (j.contains(key)) set(j.at(key).template get<T>());
}

}  // namespace diffusion::detail
