#pragma once

#include <diffusion/errors.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <vector>

/// A rewrite of a Python pickle so that LibTorch's unpickler reads Python's `torch.save(model.state_dict())`.
/// Written by hand because no library offers it: LibTorch's unpickler turns every
/// `collections.OrderedDict()` into None (it expects one only as a tensor's unused backward hooks), so the
/// OrderedDict a state_dict is fails ("Expected GenericDict but got None"), and a C++ program has no Python
/// to ask.
namespace diffusion::detail {

/// The first non-empty line of LibTorch's error `what`, without its internal-assert wording (a damaged
/// archive trips LibTorch's asserts, which then ask the user to report a bug to PyTorch).
inline std::string libtorch_reason(const std::string& what) {
  std::istringstream lines(what);
  std::string line, reason;
  while (std::getline(lines, line)) {
    if (line.find_first_not_of(" \t") != std::string::npos) {
      reason = line;
      break;
    }
  }
  if (const auto at = reason.find(" INTERNAL ASSERT FAILED"); at != std::string::npos)
    reason = "LibTorch's reader found an inconsistency: " + reason.substr(0, at);
  return reason.empty() ? "LibTorch gave no reason" : reason;
}

/// The deepest stack (values and marks) a pickle may build; real ones (state_dicts, checkpoints) stay
/// under a hundred.
inline constexpr size_t max_pickle_depth = 10000;

/// The keys rewrite_ordered_dicts adds to dicts (load_torch_state_dict drops them).
inline constexpr const char* pickle_junk_prefix = "__diffusion_pickle_";

/// Rewrites `pickle` (protocols 0 to 3, what torch.save writes): every `collections.OrderedDict()` call
/// made into a plain dict, and every state such a dict is given (BUILD: a state_dict's `_metadata`, module
/// versions that loading weights does not need) stored in it under a junk key instead. LibTorch's unpickler
/// knows neither POP, SETITEM, APPEND nor how to apply a state to a dict, so the rewrite keeps the stack as it was
/// with opcodes it knows (SETITEM and APPEND themselves become MARK ... SETITEMS and MARK ... APPENDS):
///   CALLABLE [BINPUT k] EMPTY_TUPLE REDUCE  ->  EMPTY_DICT MARK JUNK_KEY CALLABLE [BINPUT k] SETITEMS
///   OBJECT ... STATE BUILD                  ->  OBJECT ... MARK JUNK_KEY STATE SETITEMS
/// It walks the opcodes and tracks, for each stack and memo slot, whether it holds the OrderedDict class
/// or such a dict, and where in the output its value began. Refuses, naming `what`, bytes that are not a
/// pickle it can walk, and ones that would make LibTorch's unpickler allocate far more than their size
/// (an argument longer than the bytes left, a memo slot past the pickle's size): check_pickle.
/// walk_pickle<true> is rewrite_ordered_dicts; walk_pickle<false> walks the same and refuses the same, but
/// writes nothing (check_pickle): linear in the pickle's size, where the rewrite's insertions are not.
template <bool Rewrite>
std::string walk_pickle(const std::string& pickle, const std::string& what) {
  enum Kind : uint8_t { Other, OrderedDictClass, OrderedDictObject, Mark };
  struct Slot {
    Kind kind;
    size_t begin;  // where in `out` the value began
  };
  const auto junk_key = [](const char* name) {
    const std::string key = std::string(pickle_junk_prefix) + name;
    std::string op = "X";
    for (int i = 0; i < 4; ++i) op += static_cast<char>((key.size() >> (8 * i)) & 0xFF);
    return op + key;
  };
  std::vector<Slot> stack;
  std::map<uint64_t, Kind> memo;
  std::string out;
  if constexpr (Rewrite) out.reserve(pickle.size() + 256);
  size_t at = 0;
  const auto fail = [&](const std::string& why) {
    DIFFUSION_CHECK(DamagedFileError, false, what, ": not a pickle this library can read (", why, " at byte ", at, ")");
  };
  const auto need = [&](uint64_t n) {  // at <= size always; at + n could wrap around (a length of 2^64 - 9)
    if (n > pickle.size() - at) fail("an opcode's argument runs past the end");
  };
  const auto little = [&](size_t n) {
    need(n);
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= uint64_t(uint8_t(pickle[at + i])) << (8 * i);
    return v;
  };
  const auto line = [&] {
    const auto end = pickle.find('\n', at);
    if (end == std::string::npos) fail("an unterminated text argument");
    const auto text = pickle.substr(at, end - at);
    at = end + 1;
    return text;
  };
  const auto number = [&](const std::string& text) {
    try {
      return static_cast<uint64_t>(std::stoull(text));
    } catch (const std::exception&) {
      fail("a memo key that is not a number");
    }
    return uint64_t{0};
  };
  // Picklers number memo slots from 0 up, one per PUT, so a slot can never be past the pickle's size;
  // LibTorch's unpickler fills every slot below the one it is given (16 bytes each: 68 GB for 2^32).
  const auto memo_key = [&](uint64_t key) {
    if (key > pickle.size()) fail(c10::str("a memo slot (", key, ") past those a pickle of this size can fill"));
    return key;
  };
  const auto top = [&]() -> Slot& {
    if (stack.empty() || stack.back().kind == Mark) fail("an empty stack");
    return stack.back();
  };
  const auto pop = [&](size_t n) {
    Slot last{Other, out.size()};
    for (size_t i = 0; i < n; ++i) {
      last = top();
      stack.pop_back();
    }
    return last;  // the deepest one popped
  };
  const auto pop_mark = [&] {
    while (!stack.empty() && stack.back().kind != Mark) stack.pop_back();
    if (stack.empty()) fail("no MARK to pop to");
    const auto mark = stack.back();
    stack.pop_back();
    return mark;
  };
  while (at < pickle.size()) {
    const size_t start = at, begin = out.size();
    const char op = pickle[at++];
    const auto push = [&](Kind kind, size_t from) {
      // LibTorch builds and frees nested values recursively: a million levels overflow its stack.
      if (stack.size() >= max_pickle_depth) fail(c10::str("values nested more than ", max_pickle_depth, " deep"));
      stack.push_back({kind, from});
    };
    bool copy = true;
    switch (op) {
      case '.':  // STOP
        if constexpr (Rewrite) out.append(pickle, start, at - start);
        return out;
      case '(': push(Mark, begin); break;
      case '2': push(top().kind, begin); break;  // DUP
      case 'N': case '\x88': case '\x89': case '}': case ']': case ')': case '\x8f': push(Other, begin); break;
      case 'K': case '\x82': need(1); at += 1; push(Other, begin); break;
      case 'M': case '\x83': need(2); at += 2; push(Other, begin); break;
      case 'J': case '\x84': need(4); at += 4; push(Other, begin); break;
      case 'G': need(8); at += 8; push(Other, begin); break;
      case 'U': case '\x8c': case 'C': case '\x8a': { const auto n = little(1); at += 1; need(n); at += n; push(Other, begin); break; }
      case 'T': case 'X': case 'B': case '\x8b': { const auto n = little(4); at += 4; need(n); at += n; push(Other, begin); break; }
      case '\x8d': case '\x8e': case '\x96': { const auto n = little(8); at += 8; need(n); at += n; push(Other, begin); break; }
      case 'I': case 'L': case 'F': case 'S': case 'V': case 'P': line(); push(Other, begin); break;
      case 'c': {
        const auto module = line(), name = line();
        push(module == "collections" && name == "OrderedDict" ? OrderedDictClass : Other, begin);
        break;
      }
      case 'i': { line(); line(); const auto mark = pop_mark(); push(Other, mark.begin); break; }  // INST
      case 'Q': { const auto arg = pop(1); push(Other, arg.begin); break; }                       // BINPERSID
      case 'R': {                                                                                 // REDUCE
        const auto args = pop(1);
        const auto callable = pop(1);
        // The arguments: an empty tuple (written as ')' just before; the check-only walk writes nothing).
        const bool empty_args = start >= 1 && pickle[start - 1] == ')' && (!Rewrite || out.size() == args.begin + 1);
        if (callable.kind == OrderedDictClass && empty_args) {
          // Before the callable: an empty dict and a key; instead of the arguments and REDUCE: SETITEM.
          if constexpr (Rewrite) {
            out.erase(args.begin);
            out.insert(callable.begin, "}(" + junk_key("class"));
            out += 'u';
          }
          copy = false;
          push(OrderedDictObject, callable.begin);
        } else {
          push(Other, callable.begin);
        }
        break;
      }
      case 'b': {  // BUILD
        const auto state = pop(1);
        if (top().kind == OrderedDictObject) {
          if constexpr (Rewrite) {
            out.insert(state.begin, "(" + junk_key("state"));
            out += 'u';
          }
          copy = false;
        }
        break;
      }
      case 'a': {  // APPEND, which LibTorch's unpickler lacks too: MARK VALUE APPENDS
        const auto value = pop(1);
        if constexpr (Rewrite) {
          out.insert(value.begin, "(");
          out += 'e';
        }
        copy = false;
        break;
      }
      case 'e': case 'u': case '\x90': pop_mark(); break;                  // APPENDS, SETITEMS, ADDITEMS
      case 's': {  // SETITEM, which LibTorch's unpickler lacks: MARK KEY VALUE SETITEMS
        const auto key = pop(2);
        if constexpr (Rewrite) {
          out.insert(key.begin, "(");
          out += 'u';
        }
        copy = false;
        break;
      }
      case '0': pop(1); break;                                             // POP
      case '1': pop_mark(); break;                                         // POP_MARK
      case 'd': case 'l': case 't': case 'o': case '\x91': { const auto mark = pop_mark(); push(Other, mark.begin); break; }
      case '\x85': { const auto s0 = pop(1); push(Other, s0.begin); break; }
      case '\x86': { const auto s0 = pop(2); push(Other, s0.begin); break; }
      case '\x87': { const auto s0 = pop(3); push(Other, s0.begin); break; }
      case '\x81': { const auto s0 = pop(2); push(Other, s0.begin); break; }  // NEWOBJ
      case 'g': { const auto key = number(line()); push(memo.count(key) ? memo[key] : Other, begin); break; }
      case 'h': { const auto key = little(1); at += 1; push(memo.count(key) ? memo[key] : Other, begin); break; }
      case 'j': { const auto key = little(4); at += 4; push(memo.count(key) ? memo[key] : Other, begin); break; }
      case 'p': { const auto key = memo_key(number(line())); memo[key] = top().kind; break; }
      case 'q': { const auto key = little(1); at += 1; memo[key] = top().kind; break; }
      case 'r': { const auto key = memo_key(little(4)); at += 4; memo[key] = top().kind; break; }
      case '\x80': need(1); at += 1; break;  // PROTO
      default: fail(c10::str("opcode 0x", std::hex, int(uint8_t(op)), ", which protocols 0 to 3 do not have"));
    }
    if (Rewrite && copy) out.append(pickle, start, at - start);
  }
  fail("no STOP opcode");
  return out;
}

/// Returns `pickle` (protocols 0 to 3, what torch.save writes) with every `collections.OrderedDict()` call
/// made into a plain dict (walk_pickle<true>; see its comment above).
inline std::string rewrite_ordered_dicts(const std::string& pickle, const std::string& what) {
  return walk_pickle<true>(pickle, what);
}

/// Refuses, naming `what`, a pickle that rewrite_ordered_dicts cannot walk: one LibTorch's unpickler
/// would misread or would be made to allocate far more memory than the pickle's size (a string length of
/// 4 GB in a 15 kB pickle, a memo slot of 2^32), which it does before it finds the bytes missing.
inline void check_pickle(const std::string& pickle, const std::string& what) { (void)walk_pickle<false>(pickle, what); }

}  // namespace diffusion::detail
