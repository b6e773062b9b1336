#!/usr/bin/env bash
# Fails when library or program code decides by an error's text: a search in what(),
# what_without_backtrace() or a variable holding one (what, msg, message). Errors are told apart by their
# types (include/diffusion/errors.hpp); messages are for people and may be reworded. Tests may read
# messages (they check what people see), so tests/ is not searched.
#   tests/lint/no-message-branching.sh ROOT
set -euo pipefail
root=${1:-.}
pattern='(what(_without_backtrace)?\(\)\)?|\b(what|msg|message)\b)\s*\.\s*(r?find|find_first_of|starts_with|ends_with|compare|substr|contains)\s*\('
# The search must find what it is meant to find, or it proves nothing.
for bad in 'if (std::string(e.what()).rfind(file, 0) == 0) throw;' \
           'const bool damaged = what.find(" is damaged") != std::string::npos;' \
           'if (e.what_without_backtrace().starts_with("checkpoint: ")) throw;'; do
  if ! grep -Eq "$pattern" <<<"$bad"; then
    echo "no-message-branching: the pattern misses: $bad" >&2
    exit 2
  fi
done
hits=$(grep -EnR --include='*.hpp' --include='*.cpp' "$pattern" "$root/include" "$root/examples" "$root/bench" "$root/fuzz" || true)
if [[ -n $hits ]]; then
  echo "no-message-branching: code decides by an error's message; throw and catch a type from errors.hpp instead:" >&2
  echo "$hits" >&2
  exit 1
fi
echo "no-message-branching: no code decides by an error's message"
