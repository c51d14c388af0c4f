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

// Calls emit(start, end) for each pretoken of GPT-2's pattern, in order:
//   '(?:[sdmt]|ll|ve|re) | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
template <class Emit>
void pretokenize(const unsigned char* s, size_t n, Emit&& emit) {
  size_t i = 0;
  uint32_t cp, cp2;
  while (i < n) {
    int len = decode(s, n, i, &cp);
    uint8_t c = cls_of(cp);
    // Contractions: an ASCII apostrophe followed by s, d, m, t, ll, ve or re (case-sensitive).
    if (cp == '\'' && i + 1 < n) {
      unsigned char a = s[i + 1];
      if (a == 's' || a == 'd' || a == 'm' || a == 't') { emit(i, i + 2); i += 2; continue; }
      if (i + 2 < n) {
        unsigned char b = s[i + 2];
        if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) { emit(i, i + 3); i += 3; continue; }
      }
    }
    size_t start = i, j = i;
    uint8_t run = c;
    if (cp == ' ' && i + 1 < n) {  // an optional leading space joins a following non-space run
      decode(s, n, i + 1, &cp2);
      uint8_t c2 = cls_of(cp2);
      if (c2 != SPACE) { run = c2; j = i + 1; }
    }
    if (run != SPACE) {
      while (j < n) {
        int l = decode(s, n, j, &cp2);
        if (cls_of(cp2) != run) break;
        j += l;
      }
      emit(start, j);
      i = j;
      continue;
    }
    // Whitespace: the whole run if it ends the text; else all but its last character (which
    // then leads the next pretoken), or the single character if the run has only one.
    size_t last_start = j;
    size_t count = 0;
    while (j < n) {
      int l = decode(s, n, j, &cp2);
      if (cls_of(cp2) != SPACE) break;
      last_start = j;
      j += l;
      ++count;
    }
    if (j >= n || count == 1) { emit(start, j); i = j; }
    else { emit(start, last_start); i = last_start; }
    (void)len;
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

class Encoder {
 public:
  // byte_ids: the id of each single byte; merges: (id_a, id_b, id_ab) in rank order.
  Encoder(const std::vector<uint32_t>& byte_ids, const std::vector<std::tuple<uint32_t, uint32_t, uint32_t>>& merges)
      : byte_ids_(byte_ids) {
    if (byte_ids_.size() != 256) throw std::invalid_argument("byte_ids must have 256 entries");
    ranks_.reserve(merges.size() * 2);
    for (uint32_t r = 0; r < merges.size(); ++r) {
      auto [a, b, ab] = merges[r];
      ranks_.emplace(key(a, b), std::make_pair(r, ab));  // first (lowest) rank wins
    }
  }

  py::object encode(py::bytes text) {
    std::string_view sv = text;
    std::vector<uint32_t> out;
    {
      py::gil_scoped_release release;
      out.reserve(sv.size() / 3 + 8);
      const auto* s = reinterpret_cast<const unsigned char*>(sv.data());
      pretokenize(s, sv.size(), [&](size_t a, size_t b) { encode_piece(sv.substr(a, b - a), out); });
    }
    return ids_bytes(out);
  }

  // Encode all pretokens of `text` but the last `keep` (which more text could still change);
  // returns the ids and how many bytes they cover. Matching runs over the whole text, so each
  // emitted pretoken saw its real next character.
  py::object encode_holding(py::bytes text, int keep) {
    std::string_view sv = text;
    std::vector<uint32_t> out;
    size_t consumed = 0;
    {
      py::gil_scoped_release release;
      std::vector<std::pair<size_t, size_t>> spans;
      pretokenize(reinterpret_cast<const unsigned char*>(sv.data()), sv.size(), [&](size_t a, size_t b) { spans.emplace_back(a, b); });
      size_t emit = spans.size() > size_t(keep) ? spans.size() - keep : 0;
      for (size_t i = 0; i < emit; ++i) encode_piece(sv.substr(spans[i].first, spans[i].second - spans[i].first), out);
      consumed = emit ? spans[emit - 1].second : 0;
    }
    return pair_of(ids_bytes(out), new_int(int64_t(consumed)));
  }

  size_t cache_size() const { return cache_.size(); }

 private:
  void encode_piece(std::string_view piece, std::vector<uint32_t>& out) {
    bool cacheable = piece.size() <= kMaxCachedPiece;
    if (cacheable) {
      auto hit = cache_.find(std::string(piece));
      if (hit != cache_.end()) {
        out.insert(out.end(), hit->second.begin(), hit->second.end());
        return;
      }
    }
    std::vector<uint32_t> ids(piece.size());
    for (size_t i = 0; i < piece.size(); ++i) ids[i] = byte_ids_[(unsigned char)piece[i]];
    if (ids.size() <= kShortPiece) merge_short(ids);
    else merge_long(ids);
    out.insert(out.end(), ids.begin(), ids.end());
    if (cacheable && cache_.size() < (1u << 21)) cache_.emplace(std::string(piece), std::move(ids));
  }

  // Short pieces (nearly all of natural text): rescan for the lowest-rank pair, merge it in place.
  // Quadratic, but on a handful of ids it beats any heap.
  void merge_short(std::vector<uint32_t>& ids) const {
    size_t n = ids.size();
    while (n > 1) {
      uint32_t best_rank = UINT32_MAX, best_id = 0;
      size_t best_i = 0;
      for (size_t i = 0; i + 1 < n; ++i) {
        auto r = ranks_.find(key(ids[i], ids[i + 1]));
        if (r != ranks_.end() && r->second.first < best_rank) {
          best_rank = r->second.first; best_id = r->second.second; best_i = i;
        }
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
      auto r = ranks_.find(key(ids[i], ids[j]));
      if (r == ranks_.end()) return;
      heap.push_back({r->second.first, i, ids[i], ids[j]});
      std::push_heap(heap.begin(), heap.end(), later);
    };
    for (uint32_t i = 0; i + 1 < n; ++i) {
      auto r = ranks_.find(key(ids[i], ids[i + 1]));
      if (r != ranks_.end()) heap.push_back({r->second.first, i, ids[i], ids[i + 1]});
    }
    std::make_heap(heap.begin(), heap.end(), later);
    std::vector<char> dead(n, 0);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), later);
      Cand c = heap.back();
      heap.pop_back();
      uint32_t i = c.pos, j = next[i];
      if (dead[i] || j == NONE || ids[i] != c.a || ids[j] != c.b) continue;  // stale
      ids[i] = ranks_.find(key(c.a, c.b))->second.second;
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
  std::unordered_map<uint64_t, std::pair<uint32_t, uint32_t>> ranks_;
  std::unordered_map<std::string, std::vector<uint32_t>> cache_;
};

std::vector<std::pair<size_t, size_t>> pretoken_spans(py::bytes text) {
  std::string_view sv = text;
  std::vector<std::pair<size_t, size_t>> spans;
  pretokenize(reinterpret_cast<const unsigned char*>(sv.data()), sv.size(), [&](size_t a, size_t b) { spans.emplace_back(a, b); });
  return spans;
}

void set_char_classes(py::bytes table) {
  std::string_view sv = table;
  g_class.assign(sv.begin(), sv.end());
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
      .def("encode", &Encoder::encode)
      .def("encode_holding", &Encoder::encode_holding)
      .def("cache_size", &Encoder::cache_size);
}
