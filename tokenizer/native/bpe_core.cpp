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
#include <cmath>
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

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#include <unistd.h>
#endif

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

inline uint64_t key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }

// --- training: counting ------------------------------------------------------------------------

// Unique pretokens and their counts: the keys in one byte arena, entries in one vector, an
// open-addressing index of entry numbers. ~50 bytes per unique pretoken (a Python dict of bytes
// to int: ~170), and merging one table into another hashes nothing twice.
class PieceCounts {
 public:
  struct Entry { uint64_t off; int64_t count; uint32_t len, hash; };  // 24 bytes

  static uint32_t hash(std::string_view k) { return uint32_t(std::hash<std::string_view>{}(k)); }

  void add(std::string_view k, uint32_t h, int64_t c) {
    if (2 * (entries_.size() + 1) > index_.size()) grow();
    const size_t mask = index_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      uint32_t e = index_[i];
      if (e == 0) {
        entries_.push_back(Entry{arena_.size(), c, uint32_t(k.size()), h});
        arena_.append(k);
        index_[i] = uint32_t(entries_.size());
        return;
      }
      Entry& en = entries_[e - 1];
      if (en.hash == h && en.len == k.size() && std::memcmp(arena_.data() + en.off, k.data(), k.size()) == 0) {
        en.count += c;
        return;
      }
    }
  }

  void add_all(const PieceCounts& o) {
    for (const Entry& e : o.entries_) add(o.key(e), e.hash, e.count);
  }

  std::string_view key(const Entry& e) const { return std::string_view(arena_.data() + e.off, e.len); }
  const std::vector<Entry>& entries() const { return entries_; }
  size_t size() const { return entries_.size(); }

  void clear() {
    std::string().swap(arena_);
    std::vector<Entry>().swap(entries_);
    drop_index();
  }
  void drop_index() { std::vector<uint32_t>().swap(index_); }  // rebuilt by the next add()

 private:
  void grow() {
    size_t cap = std::max<size_t>(1024, index_.size() * 2);
    while (cap < 2 * (entries_.size() + 1)) cap *= 2;  // after drop_index(): sized for the entries
    std::vector<uint32_t> index(cap, 0);
    const size_t mask = index.size() - 1;
    for (uint32_t e = 0; e < entries_.size(); ++e) {
      size_t i = entries_[e].hash & mask;
      while (index[i] != 0) i = (i + 1) & mask;
      index[i] = e + 1;
    }
    index_.swap(index);
  }

  std::string arena_;
  std::vector<Entry> entries_;
  std::vector<uint32_t> index_;
};

// The pretoken counts of a corpus, fed piece by piece from any number of threads: each piece is
// counted alone with the GIL released, then added to the total under a lock.
class PretokenCounter {
 public:
  // `specials`: (start, end) byte spans of special tokens in `text`, sorted; the text between them
  // is pretokenized segment by segment and the special tokens themselves are not counted.
  void add_text(py::bytes text, const std::vector<std::pair<size_t, size_t>>& specials) {
    std::string_view sv = text;
    py::gil_scoped_release release;
    PieceCounts local;
    const auto* s = reinterpret_cast<const unsigned char*>(sv.data());
    auto plain = [&](size_t from, size_t to) {
      if (to <= from) return;
      pretokenize(s + from, to - from, [&](size_t a, size_t b) {
        std::string_view k = sv.substr(from + a, b - a);
        local.add(k, PieceCounts::hash(k), 1);
      });
    };
    size_t pos = 0;
    for (auto [a, b] : specials) {
      if (a < pos || b < a || b > sv.size()) throw std::invalid_argument("special-token spans must be sorted, disjoint, inside the text");
      plain(pos, a);
      pos = b;
    }
    plain(pos, sv.size());
    std::lock_guard<std::mutex> hold(mu_);
    total_.add_all(local);
  }

  size_t size() {
    std::lock_guard<std::mutex> hold(mu_);
    return total_.size();
  }
  PieceCounts& counts() { return total_; }  // callers hold mutex() while they read or clear it
  std::mutex& mutex() { return mu_; }

  py::object to_dict() {  // with the GIL held; add_text holds the lock only without the GIL
    std::lock_guard<std::mutex> hold(mu_);
    PyObject* d = PyDict_New();
    if (!d) throw py::error_already_set();
    py::object out = py::reinterpret_steal<py::object>(d);
    for (const auto& e : total_.entries()) {
      std::string_view k = total_.key(e);
      py::object kb = new_bytes(k.data(), k.size()), vi = new_int(e.count);
      if (PyDict_SetItem(d, kb.ptr(), vi.ptr()) < 0) throw py::error_already_set();
    }
    return out;
  }

 private:
  PieceCounts total_;
  std::mutex mu_;
};

// --- training: merges ----------------------------------------------------------------------------

// Pair (a, b) -> a dense index, open addressing over the pair keys (key and index side by side:
// one cache line a probe); per index its count, the words it may occur in (some since merged away:
// checked when used) and its key. Entries are never removed (a count reaches 0).
class PairIndex {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  void reserve(size_t n) { while (2 * (count.size() + n) > slots_.size()) grow(); }

  void prefetch(uint64_t k) const { if (!slots_.empty()) __builtin_prefetch(&slots_[slot(k)]); }

  uint32_t find(uint64_t k) const {
    if (slots_.empty()) return kNone;
    for (size_t i = slot(k);; i = (i + 1) & mask_) {
      if (slots_[i].key == k) return slots_[i].idx;
      if (slots_[i].key == kEmpty) return kNone;
    }
  }

  uint32_t get(uint64_t k) {
    if (2 * (count.size() + 1) > slots_.size()) grow();
    for (size_t i = slot(k);; i = (i + 1) & mask_) {
      if (slots_[i].key == k) return slots_[i].idx;
      if (slots_[i].key == kEmpty) {
        slots_[i] = Slot{k, uint32_t(count.size())};
        count.push_back(0);
        words.emplace_back();
        pair.push_back(k);
        return slots_[i].idx;
      }
    }
  }

  std::vector<int64_t> count;
  std::vector<std::vector<uint32_t>> words;
  std::vector<uint64_t> pair;

 private:
  static constexpr uint64_t kEmpty = UINT64_MAX;
  struct Slot { uint64_t key = kEmpty; uint32_t idx = 0; };
  size_t slot(uint64_t k) const { return size_t((k * 0x9E3779B97F4A7C15ull) >> 17) & mask_; }
  void grow() {
    size_t cap = std::max<size_t>(1 << 16, slots_.size() * 2);
    std::vector<Slot> slots(cap);
    mask_ = cap - 1;
    for (const Slot& s : slots_) {
      if (s.key == kEmpty) continue;
      size_t i = slot(s.key);
      while (slots[i].key != kEmpty) i = (i + 1) & mask_;
      slots[i] = s;
    }
    slots_.swap(slots);
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

struct Candidate {
  int64_t count;
  uint32_t pair;  // PairIndex index
};

// The first j with s[j] == a and s[j + 1] == b and j + 1 < n; n when there is none. With SSE2
// (every x86-64) one compare tests 16 bytes of positions, with no branch per symbol: the merge
// loop's word scan, whose exit a byte-at-a-time loop mispredicted once a word (merge phase at
// 0.25 GB: median 1.13 -> 0.90 s). It reads up to 14 bytes past s[n - 1]: callers leave kScanSlack.
constexpr size_t kScanSlack = 32;  // bytes find_pair may read past a word (at most 14 are)

template <class Sym>
inline uint32_t find_pair_scalar(const Sym* s, uint32_t n, Sym a, Sym b) {
  uint32_t j = 0;
  while (j + 1 < n && !(s[j] == a && s[j + 1] == b)) ++j;
  return j + 1 < n ? j : n;
}

template <class Sym>
inline uint32_t find_pair(const Sym* s, uint32_t n, Sym a, Sym b) {
#if defined(__SSE2__)
  constexpr uint32_t kLanes = 16 / sizeof(Sym);
  const __m128i va = sizeof(Sym) == 2 ? _mm_set1_epi16(short(a)) : _mm_set1_epi32(int(a));
  const __m128i vb = sizeof(Sym) == 2 ? _mm_set1_epi16(short(b)) : _mm_set1_epi32(int(b));
  for (uint32_t base = 0; base + 1 < n; base += kLanes) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + base));
    const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + base + 1));
    const __m128i ex = sizeof(Sym) == 2 ? _mm_cmpeq_epi16(x, va) : _mm_cmpeq_epi32(x, va);
    const __m128i ey = sizeof(Sym) == 2 ? _mm_cmpeq_epi16(y, vb) : _mm_cmpeq_epi32(y, vb);
    const int m = _mm_movemask_epi8(_mm_and_si128(ex, ey));
    if (m != 0) {
      const uint32_t j = base + uint32_t(__builtin_ctz(unsigned(m))) / sizeof(Sym);
      return j + 1 < n ? j : n;
    }
  }
  return n;
#else
  return find_pair_scalar(s, n, a, b);
#endif
}

#if defined(__SSE2__)
constexpr const char* kPairScan = "sse2";  // which find_pair this build runs (the module's pair_scan)
#else
constexpr const char* kPairScan = "scalar";
#endif

// Tests: find_pair and its scalar form over `syms` (16 or 32 bits), whose entries past n stand
// for the next word's bytes. The symbols end kScanSlack bytes before an unreadable page where
// the system has one, as the merge loop's last word ends before the end of its array: a read
// past that room faults.
std::pair<uint32_t, uint32_t> find_pair_check(const std::vector<uint32_t>& syms, uint32_t n, uint32_t a, uint32_t b, int bits) {
  if (bits != 16 && bits != 32) throw std::invalid_argument("bits must be 16 or 32");
  if (n > syms.size()) throw std::invalid_argument("n is past the symbols");
  const uint64_t top = bits == 16 ? UINT16_MAX : UINT32_MAX;
  for (uint32_t x : syms)
    if (x > top) throw std::invalid_argument("a symbol does not fit in the bits");
  if (a > top || b > top) throw std::invalid_argument("the pair does not fit in the bits");
  auto run = [&](auto zero) {
    using Sym = decltype(zero);
    const size_t bytes = syms.size() * sizeof(Sym) + kScanSlack;
#if __has_include(<sys/mman.h>)
    const size_t page = size_t(sysconf(_SC_PAGESIZE)), span = (bytes + page - 1) / page * page;
    void* mem = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw std::bad_alloc();
    struct Unmap { void* p; size_t n; ~Unmap() { munmap(p, n); } } unmap{mem, span + page};
    char* base = static_cast<char*>(mem);
    if (mprotect(base + span, page, PROT_NONE) != 0) throw std::runtime_error("mprotect failed");
    Sym* v = reinterpret_cast<Sym*>(base + span - bytes);
#else
    std::vector<Sym> room(bytes / sizeof(Sym));
    Sym* v = room.data();
#endif
    for (size_t i = 0; i < syms.size(); ++i) v[i] = Sym(syms[i]);
    for (size_t i = syms.size(); i < bytes / sizeof(Sym); ++i) v[i] = Sym(a);  // the room: a's, to tempt a match
    return std::make_pair(find_pair<Sym>(v, n, Sym(a), Sym(b)), find_pair_scalar<Sym>(v, n, Sym(a), Sym(b)));
  };
  return bits == 16 ? run(uint16_t(0)) : run(uint32_t(0));
}

// The merge loop over unique pretokens (the handout's algorithm, incrementally):
// - every word's symbols in one array, rewritten in place when a merge shortens it;
// - per pair its count and the words it occurs in, so a merge visits only those words, and in
//   each only the neighbours of the merged occurrences change count (4 changes an occurrence,
//   summed per pair in small tables and applied once a merge: the merge phase ~1.25x faster than a
//   hashed update per change);
// - a max-heap of (count, pair bytes) with lazy updates: the counts of existing pairs only ever
//   fall (a merge removes occurrences; only pairs with the new token are new), so a stale top is
//   re-pushed with its current count, and each merge pushes just the pairs it created;
// - new pairs too rare to be merged before the last merge are left out (see `rare` in apply()).
template <class Sym>
class MergeTrainer {
 public:
  // `prune`: the scale of the rarity bound for new pairs (0: every new pair is kept).
  MergeTrainer(PieceCounts& counts, bool consume, int num_merges, double prune)
      : target_(std::max(1, num_merges)), prune_(prune) {
    for (int i = 0; i < 256; ++i) vocab_.push_back(std::string(1, char(i)));
    size_t total = 0;
    for (const auto& e : counts.entries())
      if (e.len >= 2) total += kHeader + e.len;
    if (total >= UINT32_MAX) throw std::length_error("too many unique pretoken bytes for the merge loop (4G symbols)");
    if (consume) counts.drop_index();  // the peak is the table and these words side by side
    data_.resize(total + kSlack);
    starts_.reserve(counts.size());
    // Every pair here is of two bytes: a direct table finds its index without hashing (this
    // loop: 0.33 -> 0.15 s over 1.7M words), and counts the words each pair is in, so that each
    // word list is allocated once at its size (grown by doubling, they held ~1.5x their words).
    std::vector<uint32_t> listed(1 << 16, 0), last(1 << 16, UINT32_MAX);  // per byte pair: words, last word
    std::vector<int64_t> occurs(1 << 16, 0);  // per byte pair: its count
    size_t at = 0;
    for (const auto& e : counts.entries()) {
      if (e.len < 2) continue;
      const uint32_t w = uint32_t(at);
      starts_.push_back(w);
      std::memcpy(&data_[at], &e.count, sizeof(int64_t));
      data_[at + kLen] = Sym(e.len);
      at += kHeader;
      const auto* k = reinterpret_cast<const unsigned char*>(counts.key(e).data());
      for (uint32_t j = 0; j < e.len; ++j) {
        data_[at++] = k[j];
        if (j + 1 == e.len) break;
        const uint32_t bp = (uint32_t(k[j]) << 8) | k[j + 1];
        occurs[bp] += e.count;
        if (last[bp] != w) { last[bp] = w; ++listed[bp]; }
      }
    }
    if (consume) counts.clear();  // its words now live here: free the pretoken table's memory
    std::vector<uint32_t> byte_pair(1 << 16, PairIndex::kNone);  // per byte pair: its pair index
    for (uint32_t bp = 0; bp < listed.size(); ++bp) {
      if (listed[bp] == 0) continue;
      const uint32_t p = pairs_.get(key(bp >> 8, bp & 0xFF));
      byte_pair[bp] = p;
      pairs_.count[p] = occurs[bp];
      pairs_.words[p].resize(listed[bp]);
    }
    // Each list filled through a cursor at its final size, the counts summed in the pass above:
    // no push_back and no count per pair here (set-up at 0.25 GB: median 0.172 -> 0.152 s).
    std::vector<uint32_t*> fill(pairs_.count.size());
    std::vector<uint32_t> seen(pairs_.count.size(), UINT32_MAX);
    for (uint32_t p = 0; p < fill.size(); ++p) fill[p] = pairs_.words[p].data();
    for (uint32_t w : starts_) {
      const Sym* s = &data_[w + kHeader];
      const uint32_t n = data_[w + kLen];
      for (uint32_t j = 0; j + 1 < n; ++j) {
        const uint32_t p = byte_pair[(uint32_t(s[j]) << 8) | s[j + 1]];
        if (seen[p] != w) { seen[p] = w; *fill[p]++ = w; }
      }
    }
    fill_heap();
  }

  // One merge; false when no pair is left.
  bool step() {
    for (;;) {
      if (heap_.empty()) {
        if (floor_ == 0) return false;
        recount();  // the pairs left out may hold the rest
        continue;
      }
      std::pop_heap(heap_.begin(), heap_.end(), Lower{this});
      Candidate c = heap_.back();
      heap_.pop_back();
      int64_t now = pairs_.count[c.pair];
      if (now <= 0) continue;
      if (now != c.count) { push({now, c.pair}); continue; }  // fell since pushed
      if (now < floor_) { recount(); continue; }  // a pair left out could now be the most frequent
      apply(c.pair);
      return true;
    }
  }

  const std::vector<std::pair<std::string, std::string>>& merges() const { return merges_; }
  size_t pairs_left_out() const { return left_out_; }
  int recounts() const { return recounts_; }

 private:
  struct Lower {  // heap order: count, then the lexicographically greater pair of byte strings
    const MergeTrainer* t;
    bool operator()(const Candidate& x, const Candidate& y) const {
      if (x.count != y.count) return x.count < y.count;
      uint64_t kx = t->pairs_.pair[x.pair], ky = t->pairs_.pair[y.pair];
      int c = t->vocab_[kx >> 32].compare(t->vocab_[ky >> 32]);
      if (c != 0) return c < 0;
      return t->vocab_[uint32_t(kx)].compare(t->vocab_[uint32_t(ky)]) < 0;
    }
  };

  // Every pair of every word counted afresh: the pair table's counts and word lists, and the heap.
  template <class IndexOf>
  void count_pairs(IndexOf index_of) {
    for (uint32_t w : starts_) {
      const Sym* s = &data_[w + kHeader];
      const int64_t f = freq(w);
      for (uint32_t j = 0; j + 1 < data_[w + kLen]; ++j) {
        const uint32_t p = index_of(s[j], s[j + 1]);
        pairs_.count[p] += f;
        auto& ws = pairs_.words[p];
        if (ws.empty() || ws.back() != w) ws.push_back(w);
      }
    }
    fill_heap();
  }

  void fill_heap() {
    heap_.clear();
    for (uint32_t p = 0; p < pairs_.count.size(); ++p)
      if (pairs_.count[p] > 0) heap_.push_back({pairs_.count[p], p});
    std::make_heap(heap_.begin(), heap_.end(), Lower{this});
  }

  // The fallback when the rarity bound was wrong: every pair of the current words counted again
  // (about the set-up's cost), nothing left out from then on. Exact either way.
  void recount() {
    floor_ = 0;
    prune_ = 0;
    ++recounts_;
    pairs_ = PairIndex();
    count_pairs([&](uint32_t x, uint32_t y) { return pairs_.get(key(x, y)); });
  }

  void push(Candidate c) {
    heap_.push_back(c);
    std::push_heap(heap_.begin(), heap_.end(), Lower{this});
  }

  // A merge of (a, b) into c changes the counts of four families of pairs, each keyed by one
  // symbol: (x, a) and (b, y) lose occurrences, (x, c) and (c, y) are new. Their changes are summed
  // per family in arrays indexed by that symbol (small, cache-resident: no hashing, no conflicts),
  // and each pair's net change is applied to the pair table once, after the words.
  enum Family { kLeftA, kRightB, kLeftC, kRightC };
  static constexpr size_t kAhead = 32;  // pair-table lookups prefetched ahead (8: ~5% slower)
  struct Delta {
    int64_t d;
    uint32_t mark;   // the merge that last touched this entry (0: none)
    uint32_t last;   // for new pairs: the last word logged, and how many were
    uint32_t n;
    uint32_t pair;
  };

  void bump(Family f, uint32_t s, int64_t d, uint32_t w, uint32_t m) {
    Delta& e = fam_[f][s];
    if (e.mark != m) { e = Delta{0, m, UINT32_MAX, 0, PairIndex::kNone}; touched_[f].push_back(s); }
    e.d += d;
    if (f >= kLeftC && e.last != w) {
      e.last = w;
      ++e.n;
      log_.push_back((uint64_t(f == kRightC) << 63) | (uint64_t(s) << 32) | w);
    }
  }

  // visit(s, key_of(s)) for each symbol of `t`, the pair table's slot of each prefetched kAhead
  // visits before (the first kAhead at once: most merges touch fewer pairs than that).
  template <class KeyOf, class Visit>
  void each_prefetched(const std::vector<uint32_t>& t, KeyOf key_of, Visit visit) const {
    for (size_t i = 0; i < std::min(kAhead, t.size()); ++i) pairs_.prefetch(key_of(t[i]));
    for (size_t i = 0; i < t.size(); ++i) {
      if (i + kAhead < t.size()) pairs_.prefetch(key_of(t[i + kAhead]));
      visit(t[i], key_of(t[i]));
    }
  }

  void apply(uint32_t merged) {
    const uint64_t k = pairs_.pair[merged];
    const uint32_t a = uint32_t(k >> 32), b = uint32_t(k);
    const uint32_t c = uint32_t(vocab_.size());
    const int64_t best = pairs_.count[merged];
    vocab_.push_back(vocab_[a] + vocab_[b]);
    merges_.emplace_back(vocab_[a], vocab_[b]);
    const uint32_t m = uint32_t(merges_.size());
    // Merge counts never rise (a new pair occurs at most as often as its new token), so a new pair
    // rarer than the last merge's count is never merged, yet most new pairs are such (98% on the
    // Zipf corpus) and each costs a table entry, a word list and a heap entry. The last merge's
    // count is not known here: `rare` bounds it from below, from this merge's count and how far
    // the merges have come (the counts fall about as m^-1.2 on text; m^-1.5 and a factor of 4 of
    // margin). A new pair under `rare` is left out, and floor_ keeps the largest bound used: while
    // the best count is at least floor_, no pair left out can be (or tie) the best; if it falls
    // below, recount() restores every pair. Leaving them out: merge phase 1.5x faster (0.25 GB
    // Zipf), a pair table 20x smaller.
    const double bound = prune_ > 0 ? double(best) * std::pow(double(m) / target_, 1.5) * prune_ : 0;
    const int64_t rare = bound < 9e18 ? int64_t(bound) : INT64_MAX;  // a huge scale: every new pair left out
    for (auto& f : fam_)
      if (f.size() <= c) f.resize(std::max<size_t>(2 * f.size(), c + 1), Delta{0, 0, 0, 0, 0});
    std::vector<uint32_t> words;
    words.swap(pairs_.words[merged]);  // the pair never occurs again: its list is done with
    // The words are scattered in memory: each is prefetched 24 visits ahead (measured: 8 and 48
    // slower), both cache lines a word can straddle (up to 12 symbols of 32 bits or 25 of 16).
    // The second line: -12% with 32-bit symbols; without it, 16-bit ones took 1.45 -> 1.73 s.
    for (size_t i = 0; i < words.size(); ++i) {
      if (i + 24 < words.size()) {
        const Sym* next = &data_[words[i + 24]];
        __builtin_prefetch(next);
        __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(next) + 60));
      }
      const uint32_t w = words[i];
      Sym* head = &data_[w];
      Sym* s = head + kHeader;
      const uint32_t n = head[kLen];
      // About half the words listed no longer hold the pair (an earlier merge took one of its
      // symbols): found by a scan, left without a write.
      uint32_t j = find_pair<Sym>(s, n, Sym(a), Sym(b));
      if (j >= n) continue;
      const int64_t f = freq(w);
      uint32_t o = j;
      // In place, left to right: s[0, o) is rewritten, s[j, n) still the old symbols (never c).
      // For each occurrence, its left neighbour's pair (with the current left symbol, which may be
      // an earlier c) and its right neighbour's pair move to c.
      for (; j < n;) {
        if (j + 1 < n && s[j] == a && s[j + 1] == b) {
          if (o > 0) {
            const uint32_t x = s[o - 1];
            if (x == c) bump(kRightC, a, -f, w, m);  // (c, a)
            else bump(kLeftA, x, -f, w, m);          // (x, a)
            bump(kLeftC, x, f, w, m);                // (x, c), (c, c) included
          }
          if (j + 2 < n) {
            const uint32_t y = s[j + 2];
            if (y == a) bump(kLeftA, b, -f, w, m);   // (b, a): keyed as (x, a)
            else bump(kRightB, y, -f, w, m);         // (b, y)
            bump(kRightC, y, f, w, m);               // (c, y)
          }
          s[o++] = Sym(c);
          j += 2;
        } else {
          s[o++] = s[j++];
        }
      }
      head[kLen] = Sym(o);
    }
    // Existing pairs: each one's net change.
    for (Family fam : {kLeftA, kRightB}) {
      auto& t = touched_[fam];
      auto key_of = [&](uint32_t s) { return fam == kLeftA ? key(s, a) : key(b, s); };
      each_prefetched(t, key_of, [&](uint32_t s, uint64_t k) {
        Delta& e = fam_[fam][s];
        e.pair = pairs_.find(k);
        if (e.pair != PairIndex::kNone) __builtin_prefetch(&pairs_.count[e.pair]);
        else if (floor_ == 0) throw std::logic_error("merge loop: a changed pair is not in the table");
      });
      for (uint32_t s : t) {  // a pair left out as rare: no entry to change
        const Delta& e = fam_[fam][s];
        if (e.pair != PairIndex::kNone) pairs_.count[e.pair] += e.d;
      }
      t.clear();
    }
    pairs_.count[merged] = 0;
    // New pairs: created (and pushed) only where occurrences remain, their word lists at their
    // exact sizes.
    pairs_.reserve(touched_[kLeftC].size() + touched_[kRightC].size());  // no growth below
    for (Family fam : {kLeftC, kRightC}) {
      auto& t = touched_[fam];
      auto key_of = [&](uint32_t s) { return fam == kLeftC ? key(s, c) : key(c, s); };
      each_prefetched(t, key_of, [&](uint32_t s, uint64_t k) {
        Delta& e = fam_[fam][s];
        if (e.d <= 0) return;  // made and unmade within this merge
        if (e.d < rare) {
          floor_ = std::max(floor_, rare);
          ++left_out_;
          return;
        }
        e.pair = pairs_.get(k);
        pairs_.count[e.pair] = e.d;
        pairs_.words[e.pair].reserve(e.n);
        push({e.d, e.pair});
      });
      touched_[fam].clear();
    }
    for (uint64_t l : log_) {
      const Delta& e = fam_[l >> 63 ? kRightC : kLeftC][uint32_t(l >> 32) & 0x7FFFFFFF];
      if (e.pair != PairIndex::kNone) pairs_.words[e.pair].push_back(uint32_t(l));
    }
    log_.clear();
  }

  std::vector<std::string> vocab_;
  std::vector<std::pair<std::string, std::string>> merges_;
  // Each word in one run of data_: its count (8 bytes), its length, then its symbols; a word's id
  // is the offset of its run (one cache line holds most words). A pair's word list never holds a
  // word twice (each list is filled in one pass over ascending word ids), so a merge visits each
  // of its words once. Symbols are 16-bit where the vocab and every word fit (merge_counts picks):
  // the words' memory, which the merge loop reads at random, is then 0.6x of 32-bit symbols.
  static constexpr uint32_t kLen = sizeof(int64_t) / sizeof(Sym), kHeader = kLen + 1;
  static constexpr size_t kSlack = kScanSlack / sizeof(Sym);  // find_pair's reads past the last word
  int64_t freq(uint32_t w) const {
    int64_t f;
    std::memcpy(&f, &data_[w], sizeof f);
    return f;
  }
  std::vector<Sym> data_;
  std::vector<uint32_t> starts_;  // each word's offset (a merge shortens a word, not its run)
  PairIndex pairs_;
  std::vector<Delta> fam_[4];
  std::vector<uint32_t> touched_[4];
  std::vector<uint64_t> log_;  // new pairs' words: family (bit 63), symbol, word
  std::vector<Candidate> heap_;
  const int target_;     // the merges asked for
  double prune_;         // the rarity bound's scale (0: off)
  int64_t floor_ = 0;    // pairs under this count may be missing from the table (0: none are)
  size_t left_out_ = 0;  // new pairs left out as rare
  int recounts_ = 0;
};

constexpr double kPrune = 0.25;

// Runs up to `num_merges` merges over the counter's pretokens; returns [(bytes_a, bytes_b), ...].
// `progress(done)` (if not None) is called with the GIL held about every 0.5% of the merges, and a
// pending signal (Ctrl-C) raises there. `consume` frees the counter's table once its words are
// copied (the trainer's peak memory is then one copy of the pretokens, not two). `prune` scales the
// bound under which new pairs are left out as too rare to be merged (0: none are; any value gives
// the same merges). `stats` (a dict, if not None) receives pairs_left_out, recounts and
// symbol_bits. `symbol_bits`: 0 picks 16-bit symbols where every token id and word fits, else 32;
// 16 or 32 forces one (tests: both give the same merges).
py::object merge_counts(PretokenCounter& counter, int num_merges, py::object progress, bool consume, double prune,
                        py::object stats, int symbol_bits) {
  if (!(prune >= 0 && std::isfinite(prune))) throw std::invalid_argument("prune must be a finite number >= 0");
  if (symbol_bits != 0 && symbol_bits != 16 && symbol_bits != 32) throw std::invalid_argument("symbol_bits must be 0, 16 or 32");
  const int every = std::max(1, num_merges / 200);
  std::vector<std::pair<std::string, std::string>> merges;
  size_t left_out = 0;
  int recounts = 0, bits = 0;
  {
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> reading(counter.mutex());  // no add_text while the words are copied
    bool narrow = 256 + int64_t(num_merges) <= UINT16_MAX;  // every token id and word length fit
    for (const auto& e : counter.counts().entries()) narrow = narrow && e.len <= UINT16_MAX;
    if (symbol_bits == 16 && !narrow) throw std::invalid_argument("16-bit symbols hold at most 65,279 merges and words of at most 65,535 bytes");
    if (symbol_bits == 32) narrow = false;
    bits = narrow ? 16 : 32;
    auto run = [&](auto& t) {
      reading.unlock();
      int done = 0, reported = 0;
      auto report = [&] {
        py::gil_scoped_acquire hold;
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
        if (!progress.is_none()) progress(done);
        reported = done;
      };
      while (done < num_merges && t.step()) {
        ++done;
        if (done % every == 0 || done == num_merges) report();
      }
      if (reported != done) report();  // the pairs ran out before num_merges: the final count too
      merges = t.merges();
      left_out = t.pairs_left_out();
      recounts = t.recounts();
    };
    if (narrow) {
      MergeTrainer<uint16_t> t(counter.counts(), consume, num_merges, prune);
      run(t);
    } else {
      MergeTrainer<uint32_t> t(counter.counts(), consume, num_merges, prune);
      run(t);
    }
  }
  if (!stats.is_none()) {
    stats["pairs_left_out"] = py::int_(left_out);
    stats["recounts"] = py::int_(recounts);
    stats["symbol_bits"] = py::int_(bits);
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

// The same merges from Python lists (tests, and callers holding a dict of counts).
py::object merge(const std::vector<std::string>& pretokens, const std::vector<int64_t>& freqs, int num_merges, double prune,
                 py::object stats, int symbol_bits) {
  if (pretokens.size() != freqs.size()) throw std::invalid_argument("pretokens and freqs differ in length");
  PretokenCounter counter;
  for (size_t i = 0; i < pretokens.size(); ++i) counter.counts().add(pretokens[i], PieceCounts::hash(pretokens[i]), freqs[i]);
  return merge_counts(counter, num_merges, py::none(), true, prune, stats, symbol_bits);
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

  size_t cache_size() {
    std::lock_guard<std::mutex> hold(mu_);
    return short_.size() + cache_.size();
  }

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
    }
    if (piece.size() <= kMaxCachedPiece && !cache_.empty()) {  // long, or short with > 3 ids
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
  py::class_<PretokenCounter>(m, "PretokenCounter")
      .def(py::init<>())
      .def("add_text", &PretokenCounter::add_text, py::arg("text"), py::arg("specials") = std::vector<std::pair<size_t, size_t>>{},
           "count the pretokens of UTF-8 text outside the (start, end) special-token spans")
      .def("__len__", &PretokenCounter::size)
      .def("to_dict", &PretokenCounter::to_dict, "pretoken (bytes) -> count");
  m.def("merge_counts", &merge_counts, py::arg("counter"), py::arg("num_merges"), py::arg("progress") = py::none(),
        py::arg("consume") = false, py::arg("prune") = kPrune, py::arg("stats") = py::none(), py::arg("symbol_bits") = 0,
        "run BPE merges over a PretokenCounter's pretokens; returns the merges");
  m.def("find_pair_check", &find_pair_check, "tests: (find_pair, its scalar form) over symbols of 16 or 32 bits");
  m.attr("pair_scan") = kPairScan;
  m.def("pretoken_spans", &pretoken_spans, "byte spans of the pretokens of a UTF-8 text");
  m.def("merge", &merge, py::arg("pretokens"), py::arg("freqs"), py::arg("num_merges"), py::arg("prune") = kPrune,
        py::arg("stats") = py::none(), py::arg("symbol_bits") = 0, "run BPE merges over pretokens with counts; returns the merges");
  py::class_<Encoder>(m, "Encoder")
      .def(py::init<const std::vector<uint32_t>&, const std::vector<std::tuple<uint32_t, uint32_t, uint32_t>>&>())
      .def("encode", &Encoder::encode, "ids as native uint32 bytes", py::arg("text"), py::arg("specials") = Encoder::Spans{})
      .def("encode_list", &Encoder::encode_list, "ids as a list of ints", py::arg("text"), py::arg("specials") = Encoder::Spans{})
      .def("encode_holding", &Encoder::encode_holding)
      .def("cache_size", &Encoder::cache_size);
}
