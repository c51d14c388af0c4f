// The compiled core of the BPE trainer and encoder: GPT-2 pretokenization over UTF-8 bytes,
// pretoken counting, the incremental merge loop, and per-pretoken BPE encoding with a cache.
//
// It reproduces tokenizer/ (pure Python) exactly; the Python side remains the reference and the
// fallback. Character classes (letter, number, whitespace) come from a table built in Python with
// the `regex` module itself, so \p{L}, \p{N} and \s mean here exactly what they mean there.
// Functions that do heavy work release the GIL, so threads can run them in parallel.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Python objects are made with the C API and checked: a failed allocation raises the pending
// Python error (MemoryError) through error_already_set. pybind11's own casters would instead
// throw with the error still pending (an assertion or a TypeError about "return value").
py::object new_bytes(const char* data, size_t n) {
  PyObject* o = PyBytes_FromStringAndSize(data, Py_ssize_t(n));
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

// Ids leave as one bytes object of native uint32 (array('I') reads it), not a list of ints.
py::object ids_bytes(const std::vector<uint32_t>& ids) {
  return new_bytes(reinterpret_cast<const char*>(ids.data()), ids.size() * sizeof(uint32_t));
}

py::object new_int(int64_t v) {
  PyObject* o = PyLong_FromLongLong(v);
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

py::object pair_of(py::object a, py::object b) {
  PyObject* t = PyTuple_New(2);
  if (!t) throw py::error_already_set();
  PyTuple_SET_ITEM(t, 0, a.release().ptr());
  PyTuple_SET_ITEM(t, 1, b.release().ptr());
  return py::reinterpret_steal<py::object>(t);
}

enum : uint8_t { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3 };
std::vector<uint8_t> g_class;  // one entry per code point, set once by set_char_classes

inline uint8_t cls_of(uint32_t cp) { return cp < g_class.size() ? g_class[cp] : OTHER; }
uint8_t g_ascii_class[128];  // the table's first 128 entries, the hot path's lookup

// Decode the code point at s[i] (valid UTF-8 assumed: Python produced it); returns its length.
inline int decode(const unsigned char* s, size_t n, size_t i, uint32_t* cp) {
  unsigned char c = s[i];
  if (c < 0x80) { *cp = c; return 1; }
  if ((c >> 5) == 0x6 && i + 1 < n) { *cp = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F); return 2; }
  if ((c >> 4) == 0xE && i + 2 < n) { *cp = ((c & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F); return 3; }
  if ((c >> 3) == 0x1E && i + 3 < n) {
    *cp = ((c & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
    return 4;
  }
  *cp = c;
  return 1;
}

// The class of the code point at s[j] and its length in bytes; ASCII without a decode.
inline uint8_t class_at(const unsigned char* s, size_t n, size_t j, int* len) {
  if (s[j] < 0x80) { *len = 1; return g_ascii_class[s[j]]; }
  uint32_t cp;
  *len = decode(s, n, j, &cp);
  return cls_of(cp);
}

// Calls emit(start, end) for each pretoken of GPT-2's pattern, in order:
//   '(?:[sdmt]|ll|ve|re) | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
// One pass, each character's class read once or twice: linear in the text on every input.
template <class Emit>
void pretokenize(const unsigned char* s, size_t n, Emit&& emit) {
  size_t i = 0;
  int l;
  while (i < n) {
    unsigned char ch = s[i];
    // Contractions: an ASCII apostrophe followed by s, d, m, t, ll, ve or re (case-sensitive).
    if (ch == '\'' && i + 1 < n) {
      unsigned char a = s[i + 1];
      if (a == 's' || a == 'd' || a == 'm' || a == 't') { emit(i, i + 2); i += 2; continue; }
      if (i + 2 < n) {
        unsigned char b = s[i + 2];
        if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) { emit(i, i + 3); i += 3; continue; }
      }
    }
    size_t start = i, j = i;
    uint8_t run = class_at(s, n, i, &l);
    if (ch == ' ' && i + 1 < n) {  // an optional leading space joins a following non-space run
      uint8_t c2 = class_at(s, n, i + 1, &l);
      if (c2 != SPACE) { run = c2; j = i + 1; }
    }
    if (run != SPACE) {
      while (j < n && class_at(s, n, j, &l) == run) j += l;
      emit(start, j);
      i = j;
      continue;
    }
    // Whitespace: the whole run if it ends the text; else all but its last character (which
    // then leads the next pretoken), or the single character if the run has only one.
    size_t last_start = j;
    size_t count = 0;
    while (j < n && class_at(s, n, j, &l) == SPACE) { last_start = j; j += l; ++count; }
    if (j >= n || count == 1) { emit(start, j); i = j; }
    else { emit(start, last_start); i = last_start; }
  }
}

using Counts = std::unordered_map<std::string, int64_t>;

// --- training: counting ------------------------------------------------------------------------

py::object count_pretokens(py::bytes text) {
  std::string_view sv = text;
  Counts counts;
  {
    py::gil_scoped_release release;
    const auto* s = reinterpret_cast<const unsigned char*>(sv.data());
    pretokenize(s, sv.size(), [&](size_t a, size_t b) { counts[std::string(sv.substr(a, b - a))] += 1; });
  }
  PyObject* d = PyDict_New();
  if (!d) throw py::error_already_set();
  py::object out = py::reinterpret_steal<py::object>(d);
  for (auto& [k, v] : counts) {
    py::object kb = new_bytes(k.data(), k.size()), vi = new_int(v);
    if (PyDict_SetItem(d, kb.ptr(), vi.ptr()) < 0) throw py::error_already_set();
  }
  return out;
}

// --- training: merges ----------------------------------------------------------------------------

inline uint64_t key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }

struct Entry {
  int64_t count;
  uint32_t a, b;
};

py::object merge(const std::vector<std::string>& pretokens, const std::vector<int64_t>& freqs, int num_merges) {
  std::vector<std::string> vocab(256);
  for (int i = 0; i < 256; ++i) vocab[i] = std::string(1, char(i));
  std::vector<std::pair<std::string, std::string>> merges;
  {
    py::gil_scoped_release release;
    std::vector<std::vector<uint32_t>> words;
    std::vector<int64_t> wfreq;
    for (size_t i = 0; i < pretokens.size(); ++i) {
      if (pretokens[i].size() < 2) continue;
      std::vector<uint32_t> w(pretokens[i].size());
      for (size_t j = 0; j < w.size(); ++j) w[j] = (unsigned char)pretokens[i][j];
      words.push_back(std::move(w));
      wfreq.push_back(freqs[i]);
    }
    std::unordered_map<uint64_t, int64_t> pair_count;
    std::unordered_map<uint64_t, std::vector<uint32_t>> pair_words;  // may hold stale/duplicate ids
    pair_count.reserve(1 << 20);
    for (uint32_t wi = 0; wi < words.size(); ++wi) {
      const auto& w = words[wi];
      for (size_t j = 0; j + 1 < w.size(); ++j) {
        uint64_t k = key(w[j], w[j + 1]);
        pair_count[k] += wfreq[wi];
        auto& v = pair_words[k];
        if (v.empty() || v.back() != wi) v.push_back(wi);
      }
    }
    // Max-heap on (count, (vocab[a], vocab[b])): ties go to the lexicographically greater pair.
    auto less = [&](const Entry& x, const Entry& y) {
      if (x.count != y.count) return x.count < y.count;
      int c = vocab[x.a].compare(vocab[y.a]);
      if (c != 0) return c < 0;
      return vocab[x.b].compare(vocab[y.b]) < 0;
    };
    std::priority_queue<Entry, std::vector<Entry>, decltype(less)> heap(less);
    for (auto& [k, c] : pair_count) heap.push({c, uint32_t(k >> 32), uint32_t(k & 0xFFFFFFFFu)});
    std::vector<int> stamp(words.size(), -1);
    std::unordered_set<uint64_t> touched;
    while ((int)merges.size() < num_merges && !heap.empty()) {
      Entry e = heap.top();
      heap.pop();
      uint64_t k = key(e.a, e.b);
      auto it = pair_count.find(k);
      if (it == pair_count.end() || it->second != e.count || e.count <= 0) continue;  // stale
      uint32_t new_id = vocab.size();
      vocab.push_back(vocab[e.a] + vocab[e.b]);
      merges.emplace_back(vocab[e.a], vocab[e.b]);
      int m = (int)merges.size();
      touched.clear();
      std::vector<uint32_t> where = std::move(pair_words[k]);
      pair_words.erase(k);
      for (uint32_t wi : where) {
        if (stamp[wi] == m) continue;
        stamp[wi] = m;
        auto& w = words[wi];
        bool has = false;
        for (size_t j = 0; j + 1 < w.size(); ++j)
          if (w[j] == e.a && w[j + 1] == e.b) { has = true; break; }
        if (!has) continue;
        int64_t f = wfreq[wi];
        for (size_t j = 0; j + 1 < w.size(); ++j) {
          uint64_t pk = key(w[j], w[j + 1]);
          pair_count[pk] -= f;
          touched.insert(pk);
        }
        std::vector<uint32_t> out;
        out.reserve(w.size());
        for (size_t j = 0; j < w.size();) {
          if (j + 1 < w.size() && w[j] == e.a && w[j + 1] == e.b) { out.push_back(new_id); j += 2; }
          else { out.push_back(w[j]); j += 1; }
        }
        w.swap(out);
        for (size_t j = 0; j + 1 < w.size(); ++j) {
          uint64_t pk = key(w[j], w[j + 1]);
          pair_count[pk] += f;
          touched.insert(pk);
          auto& v = pair_words[pk];
          if (v.empty() || v.back() != wi) v.push_back(wi);
        }
      }
      pair_count.erase(k);
      for (uint64_t pk : touched) {
        if (pk == k) continue;
        auto pc = pair_count.find(pk);
        if (pc == pair_count.end()) continue;
        if (pc->second > 0) heap.push({pc->second, uint32_t(pk >> 32), uint32_t(pk & 0xFFFFFFFFu)});
        else { pair_count.erase(pc); pair_words.erase(pk); }
      }
    }
  }
  PyObject* l = PyList_New(Py_ssize_t(merges.size()));
  if (!l) throw py::error_already_set();
  py::object out = py::reinterpret_steal<py::object>(l);
  for (size_t i = 0; i < merges.size(); ++i) {
    py::object t = pair_of(new_bytes(merges[i].first.data(), merges[i].first.size()),
                           new_bytes(merges[i].second.data(), merges[i].second.size()));
    PyList_SET_ITEM(l, Py_ssize_t(i), t.release().ptr());
  }
  return out;
}

// --- encoding ------------------------------------------------------------------------------------

// Pair (a, b) -> (rank, merged id), open addressing: one probe, in one cache line, for nearly
// every lookup (a node-based map costs a pointer chase per pair tried).
class RankTable {
 public:
  struct Hit { uint32_t rank, id; };

  explicit RankTable(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 16) cap <<= 1;
    slots_.assign(cap, Slot{kEmpty, 0, 0});
    mask_ = cap - 1;
  }

  void insert_if_absent(uint64_t k, uint32_t rank, uint32_t id) {  // the first (lowest) rank wins
    for (size_t i = index(k);; i = (i + 1) & mask_) {
      if (slots_[i].key == k) return;
      if (slots_[i].key == kEmpty) { slots_[i] = Slot{k, rank, id}; return; }
    }
  }

  const Hit* find(uint64_t k) const {
    for (size_t i = index(k);; i = (i + 1) & mask_) {
      const Slot& sl = slots_[i];
      if (sl.key == k) return reinterpret_cast<const Hit*>(&sl.rank);
      if (sl.key == kEmpty) return nullptr;
    }
  }

 private:
  struct Slot { uint64_t key; uint32_t rank, id; };
  static constexpr uint64_t kEmpty = UINT64_MAX;  // ids are < 2^32 - 1, so no pair key is this
  size_t index(uint64_t k) const { return size_t((k * 0x9E3779B97F4A7C15ull) >> 20) & mask_; }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// Pretoken -> ids for short pretokens (<= 16 bytes, <= 3 ids: nearly all of natural text) in one
// flat table of 32-byte slots, key and ids inline: a hit costs one slot, no allocation. A small
// direct-mapped table (512 KB, stays in L2) in front holds the latest hits: natural text repeats a
// few thousand pretokens most of the time, and the large table's slots are a cache miss each.
class ShortCache {
 public:
  static constexpr size_t kMaxKey = 16, kMaxIds = 3;

  ShortCache() : front_(kFront), slots_(1 << 12) {}

  // `piece` may be read 16 bytes past its start when `overread` (the text holds them).
  // Returns the number of cached ids (0: absent) and points `ids` at them.
  size_t find(std::string_view piece, bool overread, const uint32_t** ids) {
    Key k = make_key(piece, overread);
    Slot& f = front_[k.hash & (kFront - 1)];
    if (matches(f, k, piece.size())) { *ids = f.ids; return f.nids; }
    for (size_t i = k.hash & (slots_.size() - 1);; i = (i + 1) & (slots_.size() - 1)) {
      const Slot& sl = slots_[i];
      if (sl.len == 0) return 0;
      if (matches(sl, k, piece.size())) { f = sl; *ids = f.ids; return f.nids; }
    }
  }

  // Start loading the slots `find(piece)` will read (a later find then mostly hits in cache).
  void prefetch(std::string_view piece, bool overread) const {
    if (piece.size() < 2 || piece.size() > kMaxKey) return;
    size_t h = make_key(piece, overread).hash;
    __builtin_prefetch(&front_[h & (kFront - 1)]);
    __builtin_prefetch(&slots_[h & (slots_.size() - 1)]);
  }

  void insert(std::string_view piece, const std::vector<uint32_t>& ids) {
    if (size_ >= kMaxEntries) return;
    if (2 * (size_ + 1) > slots_.size()) grow();
    Key k = make_key(piece, false);
    place(k, uint8_t(piece.size()), ids.data(), uint8_t(ids.size()));
    ++size_;
  }

  size_t size() const { return size_; }

 private:
  struct Key { uint64_t w[2]; size_t hash; };
  struct Slot { uint64_t w[2]; uint8_t len = 0, nids = 0; uint16_t pad = 0; uint32_t ids[kMaxIds]; };
  static_assert(sizeof(Slot) == 32, "two slots a cache line");
  static constexpr size_t kMaxEntries = size_t(1) << 20;  // at most 2^21 slots: 64 MB
  static constexpr size_t kFront = 16384;

  static bool matches(const Slot& sl, const Key& k, size_t len) {
    return sl.len == len && sl.w[0] == k.w[0] && sl.w[1] == k.w[1];
  }

  static inline uint64_t low_bytes(uint64_t w, size_t n) { return n >= 8 ? w : n ? w & (~0ull >> (64 - 8 * n)) : 0; }

  // The piece's bytes as two little-endian words, zero past its end, and their hash. Two fixed
  // 8-byte loads where the text extends 16 bytes past the piece (no variable-length copy).
  static Key make_key(std::string_view piece, bool overread) {
    Key k{{0, 0}, 0};
    size_t n = piece.size();
    if (overread) {
      std::memcpy(&k.w[0], piece.data(), 8);
      std::memcpy(&k.w[1], piece.data() + 8, 8);
      k.w[0] = low_bytes(k.w[0], n);
      k.w[1] = low_bytes(k.w[1], n > 8 ? n - 8 : 0);
    } else {
      std::memcpy(k.w, piece.data(), n);
    }
    uint64_t h = (k.w[0] ^ (uint64_t(n) << 59)) * 0x9E3779B97F4A7C15ull;
    h = (h ^ (h >> 31) ^ k.w[1]) * 0xBF58476D1CE4E5B9ull;
    k.hash = size_t(h ^ (h >> 29));
    return k;
  }

  void place(const Key& k, uint8_t len, const uint32_t* ids, uint8_t nids) {
    size_t i = k.hash & (slots_.size() - 1);
    while (slots_[i].len != 0) i = (i + 1) & (slots_.size() - 1);
    Slot& sl = slots_[i];
    sl.w[0] = k.w[0]; sl.w[1] = k.w[1]; sl.len = len; sl.nids = nids;
    std::memcpy(sl.ids, ids, nids * sizeof(uint32_t));
  }

  void grow() {
    std::vector<Slot> old(slots_.size() * 2);  // may throw bad_alloc: the table is unchanged then
    old.swap(slots_);
    for (const Slot& sl : old) {
      if (sl.len == 0) continue;
      std::string_view piece(reinterpret_cast<const char*>(sl.w), sl.len);
      place(make_key(piece, false), sl.len, sl.ids, sl.nids);
    }
  }

  std::vector<Slot> front_;
  std::vector<Slot> slots_;
  size_t size_ = 0;
};

class Encoder {
 public:
  // byte_ids: the id of each single byte; merges: (id_a, id_b, id_ab) in rank order.
  Encoder(const std::vector<uint32_t>& byte_ids, const std::vector<std::tuple<uint32_t, uint32_t, uint32_t>>& merges)
      : byte_ids_(byte_ids), ranks_(merges.size()) {
    if (byte_ids_.size() != 256) throw std::invalid_argument("byte_ids must have 256 entries");
    uint32_t max_id = 0;
    for (uint32_t b : byte_ids_) max_id = std::max(max_id, b);
    for (uint32_t r = 0; r < merges.size(); ++r) {
      auto [a, b, ab] = merges[r];
      ranks_.insert_if_absent(key(a, b), r, ab);
      max_id = std::max(max_id, ab);
    }
    // One Python int per id, made once: a list of ids is then references, not allocations.
    ints_.reserve(size_t(max_id) + 1);
    for (uint32_t i = 0; i <= max_id; ++i) ints_.push_back(new_int(i));
  }

  // The ids of a UTF-8 text whose special tokens sit at `specials`: (start, end, id) byte spans,
  // sorted and disjoint. The text between them is pretokenized segment by segment (a segment's
  // end acts as the text's end, as when each is encoded alone).
  using Spans = std::vector<std::tuple<size_t, size_t, uint32_t>>;
  py::object encode(py::bytes text, const Spans& specials) { return ids_bytes(encode_ids(text, specials)); }
  py::object encode_list(py::bytes text, const Spans& specials) { return ids_list(encode_ids(text, specials)); }

  // Encode all pretokens of `text` but the last `keep` (which more text could still change);
  // returns the ids (a list) and how many bytes they cover. Matching runs over the whole text, so
  // each emitted pretoken saw its real next character.
  py::object encode_holding(py::bytes text, int keep) {
    std::string_view sv = text;
    std::vector<uint32_t> out;
    size_t consumed = 0;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> hold(mu_);
      std::vector<std::pair<size_t, size_t>> spans;
      pretokenize(reinterpret_cast<const unsigned char*>(sv.data()), sv.size(), [&](size_t a, size_t b) { spans.emplace_back(a, b); });
      size_t emit = spans.size() > size_t(keep) ? spans.size() - keep : 0;
      for (size_t i = 0; i < emit; ++i) {
        auto [a, b] = spans[i];
        encode_piece(sv.substr(a, b - a), a + 16 <= sv.size(), out);
      }
      consumed = emit ? spans[emit - 1].second : 0;
    }
    return pair_of(ids_list(out), new_int(int64_t(consumed)));
  }

  size_t cache_size() const { return short_.size() + cache_.size(); }

 private:
  std::vector<uint32_t> encode_ids(py::bytes text, const Spans& specials) {
    std::string_view sv = text;
    const size_t n = sv.size();
    size_t pos = 0;
    for (auto& [a, b, id] : specials) {
      if (a < pos || b < a || b > n) throw std::invalid_argument("special-token spans must be sorted, disjoint, inside the text");
      pos = b;
    }
    std::vector<uint32_t> out;
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> hold(mu_);  // the caches are shared by every thread using this encoder
    out.reserve(n / 3 + specials.size() + 8);
    const auto* s = reinterpret_cast<const unsigned char*>(sv.data());
    // Pieces are looked up kAhead behind the pretokenizer, their cache slots prefetched when
    // found: the table lookups' memory latency overlaps the scanning instead of stalling it.
    constexpr size_t kAhead = 8;
    std::pair<size_t, size_t> ring[kAhead];
    auto plain = [&](size_t from, size_t to) {
      size_t found = 0;
      auto piece = [&](std::pair<size_t, size_t> ab) { return sv.substr(ab.first, ab.second - ab.first); };
      pretokenize(s + from, to - from, [&](size_t a, size_t b) {
        auto& slot = ring[found % kAhead];
        if (found >= kAhead) encode_piece(piece(slot), slot.first + 16 <= n, out);
        slot = {from + a, from + b};
        short_.prefetch(piece(slot), slot.first + 16 <= n);
        ++found;
      });
      for (size_t k = found > kAhead ? found - kAhead : 0; k < found; ++k) {
        auto& slot = ring[k % kAhead];
        encode_piece(piece(slot), slot.first + 16 <= n, out);
      }
    };
    pos = 0;
    for (auto& [a, b, id] : specials) {
      plain(pos, a);
      out.push_back(id);
      pos = b;
    }
    plain(pos, n);
    return out;
  }

  py::object ids_list(const std::vector<uint32_t>& ids) {
    uint32_t top = 0;  // special tokens' ids lie past the merges': their ints are made on first use
    for (uint32_t id : ids) top = std::max(top, id);
    while (!ids.empty() && ints_.size() <= top) ints_.push_back(new_int(int64_t(ints_.size())));
    PyObject* l = PyList_New(Py_ssize_t(ids.size()));
    if (!l) throw py::error_already_set();
    for (size_t i = 0; i < ids.size(); ++i) {
      PyObject* v = ints_[ids[i]].ptr();
      Py_INCREF(v);
      PyList_SET_ITEM(l, Py_ssize_t(i), v);
    }
    return py::reinterpret_steal<py::object>(l);
  }

  // `overread`: the text holds 16 bytes from the piece's start (see ShortCache::find).
  void encode_piece(std::string_view piece, bool overread, std::vector<uint32_t>& out) {
    if (piece.size() == 1) { out.push_back(byte_ids_[(unsigned char)piece[0]]); return; }
    bool is_short = piece.size() <= ShortCache::kMaxKey;
    if (is_short) {
      const uint32_t* hit;
      if (size_t k = short_.find(piece, overread, &hit)) {
        for (size_t t = 0; t < k; ++t) out.push_back(hit[t]);
        return;
      }
    } else if (piece.size() <= kMaxCachedPiece) {
      auto hit = cache_.find(std::string(piece));
      if (hit != cache_.end()) { out.insert(out.end(), hit->second.begin(), hit->second.end()); return; }
    }
    std::vector<uint32_t> ids(piece.size());
    for (size_t i = 0; i < piece.size(); ++i) ids[i] = byte_ids_[(unsigned char)piece[i]];
    if (ids.size() <= kShortPiece) merge_short(ids);
    else merge_long(ids);
    out.insert(out.end(), ids.begin(), ids.end());
    if (is_short && ids.size() <= ShortCache::kMaxIds) short_.insert(piece, ids);
    else if (piece.size() <= kMaxCachedPiece && cache_.size() < (1u << 20)) cache_.emplace(std::string(piece), std::move(ids));
  }

  // Short pieces (nearly all of natural text): rescan for the lowest-rank pair, merge it in place.
  // Quadratic, but on a handful of ids it beats any heap.
  void merge_short(std::vector<uint32_t>& ids) const {
    size_t n = ids.size();
    while (n > 1) {
      uint32_t best_rank = UINT32_MAX, best_id = 0;
      size_t best_i = 0;
      for (size_t i = 0; i + 1 < n; ++i) {
        const RankTable::Hit* r = ranks_.find(key(ids[i], ids[i + 1]));
        if (r && r->rank < best_rank) { best_rank = r->rank; best_id = r->id; best_i = i; }
      }
      if (best_rank == UINT32_MAX) break;
      ids[best_i] = best_id;  // merge only the leftmost occurrence: tiktoken's order, one at a time
      std::memmove(&ids[best_i + 1], &ids[best_i + 2], (n - best_i - 2) * sizeof(uint32_t));
      --n;
    }
    ids.resize(n);
  }

  // Long pieces: O(n log n). A doubly linked list of symbols and a min-heap of candidate merges
  // keyed (rank, position of the left symbol): popping it merges the lowest-rank pair, leftmost
  // among equal ranks, exactly the order of the rescanning loop. Entries whose symbols changed
  // since they were pushed are skipped when popped (each merge pushes at most two).
  void merge_long(std::vector<uint32_t>& ids) const {
    const size_t n = ids.size();
    constexpr uint32_t NONE = UINT32_MAX;
    std::vector<uint32_t> next(n), prev(n);
    for (size_t i = 0; i < n; ++i) { next[i] = i + 1 < n ? uint32_t(i + 1) : NONE; prev[i] = i ? uint32_t(i - 1) : NONE; }
    struct Cand { uint32_t rank, pos, a, b; };
    auto later = [](const Cand& x, const Cand& y) { return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos; };
    std::vector<Cand> heap;
    heap.reserve(n);
    auto push = [&](uint32_t i) {
      uint32_t j = next[i];
      if (j == NONE) return;
      const RankTable::Hit* r = ranks_.find(key(ids[i], ids[j]));
      if (!r) return;
      heap.push_back({r->rank, i, ids[i], ids[j]});
      std::push_heap(heap.begin(), heap.end(), later);
    };
    for (uint32_t i = 0; i + 1 < n; ++i) {
      const RankTable::Hit* r = ranks_.find(key(ids[i], ids[i + 1]));
      if (r) heap.push_back({r->rank, i, ids[i], ids[i + 1]});
    }
    std::make_heap(heap.begin(), heap.end(), later);
    std::vector<char> dead(n, 0);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), later);
      Cand c = heap.back();
      heap.pop_back();
      uint32_t i = c.pos, j = next[i];
      if (dead[i] || j == NONE || ids[i] != c.a || ids[j] != c.b) continue;  // stale
      ids[i] = ranks_.find(key(c.a, c.b))->id;
      dead[j] = 1;
      next[i] = next[j];
      if (next[j] != NONE) prev[next[j]] = i;
      if (prev[i] != NONE) push(prev[i]);
      push(i);
    }
    size_t w = 0;
    for (uint32_t i = 0; i != NONE; i = next[i]) ids[w++] = ids[i];
    ids.resize(w);
  }

  static constexpr size_t kShortPiece = 48;
  static constexpr size_t kMaxCachedPiece = 256;
  std::vector<uint32_t> byte_ids_;
  RankTable ranks_;
  std::vector<py::object> ints_;
  ShortCache short_;
  std::unordered_map<std::string, std::vector<uint32_t>> cache_;  // 17-256 bytes, or > 3 ids
  std::mutex mu_;
};

std::vector<std::pair<size_t, size_t>> pretoken_spans(py::bytes text) {
  std::string_view sv = text;
  std::vector<std::pair<size_t, size_t>> spans;
  pretokenize(reinterpret_cast<const unsigned char*>(sv.data()), sv.size(), [&](size_t a, size_t b) { spans.emplace_back(a, b); });
  return spans;
}

void set_char_classes(py::bytes table) {
  std::string_view sv = table;
  if (sv.size() < 128) throw std::invalid_argument("the class table must cover at least ASCII");
  g_class.assign(sv.begin(), sv.end());
  std::memcpy(g_ascii_class, g_class.data(), 128);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm BPE core: pretokenization, counting, merges, encoding";
  m.def("set_char_classes", &set_char_classes, "one byte per code point: 0 other, 1 letter, 2 number, 3 whitespace");
  m.def("count_pretokens", &count_pretokens, "pretoken (UTF-8 bytes) -> count, for one text without special tokens");
  m.def("pretoken_spans", &pretoken_spans, "byte spans of the pretokens of a UTF-8 text");
  m.def("merge", &merge, "run BPE merges over pretokens with counts; returns the merges");
  py::class_<Encoder>(m, "Encoder")
      .def(py::init<const std::vector<uint32_t>&, const std::vector<std::tuple<uint32_t, uint32_t, uint32_t>>&>())
      .def("encode", &Encoder::encode, "ids as native uint32 bytes", py::arg("text"), py::arg("specials") = Encoder::Spans{})
      .def("encode_list", &Encoder::encode_list, "ids as a list of ints", py::arg("text"), py::arg("specials") = Encoder::Spans{})
      .def("encode_holding", &Encoder::encode_holding)
      .def("cache_size", &Encoder::cache_size);
}
