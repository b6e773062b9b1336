#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <map>
#include <stdexcept>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace diffusion::detail {

/// Named factories of one kind (samplers, backbones): the one place a name is dispatched on. Names are
/// added once (a second registration of a name is refused) and looked up with a message that lists
/// every known name.
template <class Factory>
class Registry {
 public:
  explicit Registry(std::string kind) : kind_(std::move(kind)) {}

  void add(const std::string& name, Factory factory) {
    std::lock_guard lock(mutex_);
    TORCH_CHECK(!name.empty(), "register ", kind_, ": the name must not be empty");
    TORCH_CHECK(entries_.emplace(name, std::move(factory)).second, "register ", kind_, ": '", name,
                "' is already registered");
  }

  bool contains(std::string_view name) const {
    std::lock_guard lock(mutex_);
    return entries_.find(std::string(name)) != entries_.end();
  }

  Factory at(std::string_view name) const {
    std::lock_guard lock(mutex_);
    const auto it = entries_.find(std::string(name));
    if (it == entries_.end()) {
      std::string known;
      for (const auto& [key, value] : entries_) known += (known.empty() ? "" : ", ") + key;
      TORCH_CHECK(false, "unknown ", kind_, " '", std::string(name), "' (known: ", known, ")");
    }
    return it->second;
  }

  std::vector<std::string> names() const {
    std::lock_guard lock(mutex_);
    std::vector<std::string> out;
    for (const auto& [key, value] : entries_) out.push_back(key);
    return out;
  }

 private:
  std::string kind_;
  mutable std::mutex mutex_;
  std::map<std::string, Factory, std::less<>> entries_;
};

/// What the factory registered as `name` makes from JSON `options` (null: an empty object, the defaults),
/// a JSON type error in them refused as a c10::Error that names `who`, the name and the options.
template <class Factory>
auto make_from_json(const Registry<Factory>& registry, std::string_view name, const nlohmann::json& options,
                    const char* who) {
  const auto factory = registry.at(name);
  try {
    return factory(options.is_null() ? nlohmann::json::object() : options);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, who, ": the options of '", std::string(name), "' are malformed: ", e.what(), " in ",
                options.dump());
  }
  throw std::logic_error("make_from_json: unreachable");
}

}  // namespace diffusion::detail
