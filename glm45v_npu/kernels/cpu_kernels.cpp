// Decode-size matmuls and paged decode attention for CPUs, at the memory floor.
//
// A decode step multiplies a few rows of activations by every weight once, so it is bound by the bytes it reads:
// these kernels stream each weight row once, in its stored layout ([N, K], as loaded) and type (bf16, fp16,
// fp32, fp8 e4m3 or int8, with per-row or per-128-column-group scales), widen it in registers and accumulate in
// fp32. Three paths, by what the CPU has (this file is compiled on the user's machine with -march=native):
//   AMX:       bf16 or fp8 weights as the A operand of 16x32 bf16 tiles straight from their rows (fp8 widened to
//              bf16 through a staging tile), activations as the B operand (x^T, laid out in pairs once per call).
//   BF16 dot:  AVX-512 dot products of bf16 pairs (bf16 or fp8 weights, bf16 activations).
//   generic:   GCC vector extensions on fp32 activations, any weight type (AVX2, NEON or AVX-512 code).
// fp8 e4m3 widens exactly to bf16 and fp16, and quantized activations (fp8 or int8 values) are exact in bf16,
// so the bf16 paths compute what the fp32 twin does, with their scales applied per row and group afterwards.
// Threads: ATen's parallel_for (torch's own pool and thread count). kernels/cpu.py builds, checks and calls them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define GLM_AMX 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define GLM_DOT 1
#endif

namespace {

constexpr int L = 16;  // lanes of one f32 vector
typedef float f32v __attribute__((vector_size(64)));
typedef uint32_t u32v __attribute__((vector_size(64)));
typedef uint16_t u16v __attribute__((vector_size(32)));
typedef _Float16 f16v __attribute__((vector_size(32)));
typedef uint8_t u8v __attribute__((vector_size(16)));
typedef int8_t i8v __attribute__((vector_size(16)));

enum WType { BF16 = 0, F16 = 1, F32 = 2, FP8 = 3, I8 = 4 };

template <class V>
inline V loadv(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <int T>
constexpr int bytes_of() {
  return T == F32 ? 4 : (T == BF16 || T == F16) ? 2 : 1;
}

int bytes_of(int t) { return t == F32 ? 4 : (t == BF16 || t == F16) ? 2 : 1; }

// --- widening ------------------------------------------------------------------------------------------------
// fp8 e4m3 with its bits shifted is an fp16 of 2^-8 its value (exact, subnormals included: e4m3's exponent bias
// is 7, fp16's 15); the generic path scales by 2^8 afterwards (WIDEN). GCC turns generic half-precision vector
// conversions into scalar code, so x86 takes the conversion instructions directly.
inline u16v fp8_as_fp16(u16v b) { return ((b & 0x80) << 8) | ((b & 0x7F) << 7); }

inline f32v halves(u16v h) {
#if defined(__AVX512F__)
  return (f32v)_mm512_cvtph_ps((__m256i)h);
#elif defined(__F16C__)
  __m256i v = (__m256i)h;
  __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(v)), hi = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
  f32v out;
  std::memcpy(&out, &lo, 32);
  std::memcpy((char*)&out + 32, &hi, 32);
  return out;
#else
  return __builtin_convertvector((f16v)h, f32v);
#endif
}

template <int T>
inline f32v widen16(const uint8_t* p) {
  if constexpr (T == BF16) {
    return (f32v)(__builtin_convertvector(loadv<u16v>(p), u32v) << 16);
  } else if constexpr (T == F16) {
    return halves(loadv<u16v>(p));
  } else if constexpr (T == F32) {
    return loadv<f32v>(p);
  } else if constexpr (T == FP8) {
    return halves(fp8_as_fp16(__builtin_convertvector(loadv<u8v>(p), u16v)));
  } else {
    return __builtin_convertvector(loadv<i8v>(p), f32v);
  }
}

inline float bf16_value(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float fp8_value(uint8_t b) {  // exact e4m3fn; 0x7F / 0xFF are NaN
  const int e = (b >> 3) & 15, m = b & 7;
  float v = (e == 15 && m == 7) ? NAN : e ? std::ldexp(1.0f + m / 8.0f, e - 7) : std::ldexp(m / 8.0f, -6);
  return (b & 0x80) ? -v : v;
}

template <int T>
inline float widen1(const uint8_t* p) {  // exact value (no WIDEN factor)
  if constexpr (T == BF16) {
    return bf16_value(*(const uint16_t*)p);
  } else if constexpr (T == F16) {
    return float(*(const _Float16*)p);
  } else if constexpr (T == F32) {
    return *(const float*)p;
  } else if constexpr (T == FP8) {
    return fp8_value(*p);
  } else {
    return float(*(const int8_t*)p);
  }
}

template <int T>
constexpr float WIDEN = T == FP8 ? 256.0f : 1.0f;

inline float hsum(f32v v) {
  float s = 0;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}

// Weight rows stream from memory; the hardware prefetchers fall behind when the loop that reads them does more
// work per byte (widening 8-bit weights), so each row is also prefetched this far ahead.
constexpr int64_t AHEAD = 1024;
inline void prefetch(const uint8_t* p) { __builtin_prefetch(p + AHEAD, 0, 3); }
inline void ahead(const uint8_t* p) { __builtin_prefetch(p, 0, 3); }

// Rows of a block are read side by side and the next blocks follow them in memory: each row prefetches the same
// columns of the row this many rows on (one block, more for short rows), at least 8 KiB ahead.
inline int64_t rows_ahead(int64_t row_bytes, int rb) {
  return rb * std::max<int64_t>(1, (8192 + rb * row_bytes - 1) / (rb * row_bytes));
}

// --- the problem ---------------------------------------------------------------------------------------------
// Rows [n0, n1) of out[m, n] = sum_g ws[n, g] xs[m, g] sum_{k in g} x[m, k] w[n, k] (+ bias[n]) for all m < M.
// Groups are `group` columns (K when no scale is per group); a scale with one column applies to the whole row.
struct Problem {
  const float* x;      // fp32 activations [M, K] (generic path), or
  const uint16_t* xb;  // bf16 activations [M, K] (bf16 paths)
  const float* xs;     // activation scales [M, XG] (quantized activations on the bf16 paths) or null
  int64_t XG;
  int64_t M, K;
  const uint8_t* w;  // [N, K]
  int64_t N;
  const float* ws;  // weight scales [N, G] or null
  int64_t G, group;
  const float* bias;
  float* out;
  int64_t ldo;
  const uint16_t* xv;  // AMX: x^T in bf16 pairs [Kp / 2][MP][2], Kp = K rounded up to 32, MP = M rounded up to 16
  int64_t MP;
};

inline float wscale(const Problem& p, int64_t n, int64_t g) { return p.ws ? p.ws[n * p.G + (p.G == 1 ? 0 : g)] : 1.0f; }
inline float xscale(const Problem& p, int64_t m, int64_t g) { return p.xs ? p.xs[m * p.XG + (p.XG == 1 ? 0 : g)] : 1.0f; }

// --- generic path: fp32 activations, any weight type ----------------------------------------------------------
template <int T, int RB, int MB>
void block(const Problem& p, int64_t n, int64_t m0) {
  constexpr int B = bytes_of<T>();
  const int64_t K = p.K, group = p.group, far = rows_ahead(K * B, RB);
  f32v total[RB][MB] = {};
  float tail[RB][MB] = {};
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
    const int64_t g1 = std::min(K, g0 + group);
    f32v acc[RB][MB] = {};
    float sacc[RB][MB] = {};
    int64_t k = g0;
    for (; k + L <= g1; k += L) {
      f32v wv[RB];
      if (k % (64 / B) == 0)
        for (int r = 0; r < RB; ++r) ahead(p.w + ((n + far + r) * K + k) * B);
      for (int r = 0; r < RB; ++r) wv[r] = widen16<T>(p.w + ((n + r) * K + k) * B);
      for (int m = 0; m < MB; ++m) {
        f32v xv = loadv<f32v>(p.x + (m0 + m) * K + k);
        for (int r = 0; r < RB; ++r) acc[r][m] += xv * wv[r];
      }
    }
    for (; k < g1; ++k)
      for (int r = 0; r < RB; ++r) {
        float wk = widen1<T>(p.w + ((n + r) * K + k) * B) / WIDEN<T>;
        for (int m = 0; m < MB; ++m) sacc[r][m] += p.x[(m0 + m) * K + k] * wk;
      }
    for (int r = 0; r < RB; ++r) {
      const float s = wscale(p, n + r, gi) * WIDEN<T>;
      for (int m = 0; m < MB; ++m) {
        total[r][m] += acc[r][m] * s;
        tail[r][m] += sacc[r][m] * s;
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    const float b = p.bias ? p.bias[n + r] : 0.0f;
    for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.ldo + n + r] = hsum(total[r][m]) + tail[r][m] + b;
  }
}

template <int T, int RB>
void generic_rows(const Problem& p, int64_t n) {
  int64_t m0 = 0;
  for (; m0 + 4 <= p.M; m0 += 4) block<T, RB, 4>(p, n, m0);
  switch (p.M - m0) {
    case 3: block<T, RB, 3>(p, n, m0); break;
    case 2: block<T, RB, 2>(p, n, m0); break;
    case 1: block<T, RB, 1>(p, n, m0); break;
    default: break;
  }
}

constexpr int RB = 4;

template <int T>
void generic(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) generic_rows<T, RB>(p, n);
  for (; n < n1; ++n) generic_rows<T, 1>(p, n);
}

// --- bf16 widening for the bf16 paths ------------------------------------------------------------------------
#if defined(GLM_DOT) || defined(GLM_AMX)
// 32 fp8 e4m3 -> 32 bf16 (exact). With AVX-512 VBMI two byte lookups (the high and low byte of each bf16, from
// the 7 magnitude bits) do it; otherwise through fp16 and fp32.
struct Fp8Tables {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
  Fp8Tables() {
    for (int i = 0; i < 128; ++i) {
      float v = fp8_value(uint8_t(i));
      uint32_t u;
      std::memcpy(&u, &v, 4);
      uint16_t b = std::isnan(v) ? 0x7FC0 : uint16_t(u >> 16);  // exact: e4m3 has 3 mantissa bits
      lo[i] = b & 0xFF;
      hi[i] = b >> 8;
    }
  }
};
const Fp8Tables FP8_TABLES;

inline __m512i fp8x32_to_bf16(const uint8_t* p) {
  const __m256i b = _mm256_loadu_si256((const __m256i*)p);
#if defined(__AVX512VBMI__)
  const __m512i idx = _mm512_castsi256_si512(b);  // bit 7 (the sign) is ignored by the lookups
  const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(FP8_TABLES.lo), idx,
                                              _mm512_load_si512(FP8_TABLES.lo + 64));
  const __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(FP8_TABLES.hi), idx,
                                              _mm512_load_si512(FP8_TABLES.hi + 64));
  const __m256i hi_signed = _mm256_or_si256(_mm512_castsi512_si256(hi), _mm256_and_si256(b, _mm256_set1_epi8(-128)));
  return _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)),
                         _mm512_slli_epi16(_mm512_cvtepu8_epi16(hi_signed), 8));
#else
  __m512i w = _mm512_cvtepu8_epi16(b);
  __m512i h = _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x80)), 8),
                              _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x7F)), 7));
  __m512 a = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), _mm512_set1_ps(256.0f));
  __m512 c = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), _mm512_set1_ps(256.0f));
  return _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(a)), (__m256i)_mm512_cvtneps_pbh(c), 1);
#endif
}

// 64 fp8 -> 64 bf16 in two registers. With VBMI the halves come out shuffled: `a` holds columns 0-7, 16-23,
// 32-39, 48-55 of the 64 and `b` the others (a byte interleave works within 128-bit lanes). The activations are
// shuffled the same way once per call (shuffle64), so each product still pairs the right column: a third of
// the instructions of widening 32 at a time in order.
#if defined(__AVX512VBMI__)
constexpr bool SHUFFLED = true;
inline void fp8x64_to_bf16(const uint8_t* p, __m512i& a, __m512i& b) {
  const __m512i v = _mm512_loadu_si512(p);
  const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(FP8_TABLES.lo), v, _mm512_load_si512(FP8_TABLES.lo + 64));
  __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(FP8_TABLES.hi), v, _mm512_load_si512(FP8_TABLES.hi + 64));
  hi = _mm512_ternarylogic_epi32(hi, v, _mm512_set1_epi8(-128), 0xF8);  // hi | (v & 0x80)
  a = _mm512_unpacklo_epi8(lo, hi);
  b = _mm512_unpackhi_epi8(lo, hi);
}
#else
constexpr bool SHUFFLED = false;
inline void fp8x64_to_bf16(const uint8_t* p, __m512i& a, __m512i& b) {
  a = fp8x32_to_bf16(p);
  b = fp8x32_to_bf16(p + 32);
}
#endif

// x [M, K] -> out with each whole 64-column chunk in fp8x64_to_bf16's order (the rest as it is).
void shuffle64(const uint16_t* x, int64_t M, int64_t K, uint16_t* out) {
  std::memcpy(out, x, M * K * 2);
  if (!SHUFFLED) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k + 64 <= K; k += 64)
      for (int j = 0; j < 4; ++j) {
        std::memcpy(out + m * K + k + 8 * j, x + m * K + k + 16 * j, 16);
        std::memcpy(out + m * K + k + 32 + 8 * j, x + m * K + k + 16 * j + 8, 16);
      }
}

template <int T>
inline __m512i bf16x32(const uint8_t* p) {
  if constexpr (T == FP8)
    return fp8x32_to_bf16(p);
  else
    return _mm512_loadu_si512(p);
}

template <int T>
inline uint16_t bf16_bits(const uint8_t* p) {  // one weight as bf16 (tails)
  if constexpr (T == FP8)
    return uint16_t(FP8_TABLES.hi[*p & 0x7F] << 8 | FP8_TABLES.lo[*p & 0x7F]) | uint16_t((*p & 0x80) << 8);
  else
    return *(const uint16_t*)p;
}
#endif

// --- BF16 dot path: AVX-512 dot products of bf16 pairs ----------------------------------------------------------
#if defined(GLM_DOT)
template <int T, int RB, int MB>
void block_dot(const Problem& p, int64_t n, int64_t m0) {
  constexpr int B = bytes_of<T>();
  const int64_t K = p.K, far = rows_ahead(K * B, RB);
  __m512 total[RB][MB];
  float tail[RB][MB] = {};
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MB; ++m) total[r][m] = _mm512_setzero_ps();
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += p.group, ++gi) {
    const int64_t g1 = std::min(K, g0 + p.group);
    __m512 acc[RB][MB];
    float sacc[RB][MB] = {};
    for (int r = 0; r < RB; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t k = g0;
    if constexpr (T == FP8)
      for (; k + 64 <= g1; k += 64) {  // activations shuffled to match (shuffle64)
        __m512i wa[RB], wb[RB];
        for (int r = 0; r < RB; ++r) ahead(p.w + (n + far + r) * K + k);
        for (int r = 0; r < RB; ++r) fp8x64_to_bf16(p.w + (n + r) * K + k, wa[r], wb[r]);
        for (int m = 0; m < MB; ++m) {
          const __m512bh xa = (__m512bh)_mm512_loadu_si512(p.xb + (m0 + m) * K + k);
          const __m512bh xb = (__m512bh)_mm512_loadu_si512(p.xb + (m0 + m) * K + k + 32);
          for (int r = 0; r < RB; ++r)
            acc[r][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][m], xa, (__m512bh)wa[r]), xb, (__m512bh)wb[r]);
        }
      }
    for (; k + 32 <= g1; k += 32) {
      __m512bh wv[RB];
      for (int r = 0; r < RB; ++r) ahead(p.w + ((n + far + r) * K + k) * B);
      for (int r = 0; r < RB; ++r) wv[r] = (__m512bh)bf16x32<T>(p.w + ((n + r) * K + k) * B);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(p.xb + (m0 + m) * K + k);
        for (int r = 0; r < RB; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
      }
    }
    for (; k < g1; ++k)
      for (int r = 0; r < RB; ++r) {
        const float wk = bf16_value(bf16_bits<T>(p.w + ((n + r) * K + k) * B));
        for (int m = 0; m < MB; ++m) sacc[r][m] += bf16_value(p.xb[(m0 + m) * K + k]) * wk;
      }
    for (int r = 0; r < RB; ++r)
      for (int m = 0; m < MB; ++m) {
        const float s = wscale(p, n + r, gi) * xscale(p, m0 + m, gi);
        total[r][m] = _mm512_fmadd_ps(acc[r][m], _mm512_set1_ps(s), total[r][m]);
        tail[r][m] += sacc[r][m] * s;
      }
  }
  for (int r = 0; r < RB; ++r) {
    const float b = p.bias ? p.bias[n + r] : 0.0f;
    for (int m = 0; m < MB; ++m)
      p.out[(m0 + m) * p.ldo + n + r] = _mm512_reduce_add_ps(total[r][m]) + tail[r][m] + b;
  }
}

template <int T, int R>
void dot_rows(const Problem& p, int64_t n) {
  int64_t m0 = 0;
  for (; m0 + 4 <= p.M; m0 += 4) block_dot<T, R, 4>(p, n, m0);
  switch (p.M - m0) {
    case 3: block_dot<T, R, 3>(p, n, m0); break;
    case 2: block_dot<T, R, 2>(p, n, m0); break;
    case 1: block_dot<T, R, 1>(p, n, m0); break;
    default: break;
  }
}

template <int T>
void dot(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) dot_rows<T, RB>(p, n);
  for (; n < n1; ++n) dot_rows<T, 1>(p, n);
}
#endif

// --- AMX path --------------------------------------------------------------------------------------------------
#if defined(GLM_AMX)
struct TileConfig {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool amx_permitted() {  // Linux hands out AMX state only to processes that ask
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct Tiles {  // the tile configuration of one thread for one parallel region
  Tiles() {
    TileConfig c{};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = 16;
      c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
  }
  ~Tiles() { _tile_release(); }
};

// x [M, K] bf16 -> x^T in pairs [Kp / 2][MP][2] (zeros past M and K): the B operand of every tile product.
void pairs(const uint16_t* x, int64_t M, int64_t K, int64_t MP, uint16_t* xv) {
  const int64_t Kp = (K + 31) / 32 * 32;
  std::memset(xv, 0, Kp * MP * 2);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xv[((k >> 1) * MP + m) * 2 + (k & 1)] = x[m * K + k];
}

constexpr int64_t CH = 256;  // columns of a staged chunk: 64 rows of it (32 KiB) stay in L1 for the tile loads

// Weight rows [n, n + rows) x columns [k0, k0 + CH) as bf16 (zeros past N and K), rows CH apart: the A operand of
// fp8 weights and of partial bf16 tiles. Four rows are widened side by side, each read front to back and
// prefetched ahead, so the memory system sees four long streams (tile-shaped reads of 16 rows starve it).
template <int T>
void stage_chunk(const Problem& p, int64_t n, int64_t rows, int64_t k0, uint16_t* buf) {
  constexpr int B = bytes_of<T>();
  const int64_t k1 = std::min(p.K, k0 + CH);
  for (int i0 = 0; i0 < rows; i0 += 4) {
    const uint8_t* src[4];
    bool live[4];
    for (int i = 0; i < 4; ++i) {
      live[i] = n + i0 + i < p.N;
      src[i] = p.w + (live[i] ? (n + i0 + i) * p.K * B : 0);
    }
    int64_t k = k0;
    if constexpr (T == FP8)
      for (; k + 64 <= k1; k += 64)  // in shuffle64's order, as the activations' pairs are
        for (int i = 0; i < 4; ++i) {
          __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
          if (live[i]) {
            prefetch(src[i] + k);
            fp8x64_to_bf16(src[i] + k, a, b);
          }
          _mm512_storeu_si512(buf + (i0 + i) * CH + k - k0, a);
          _mm512_storeu_si512(buf + (i0 + i) * CH + k - k0 + 32, b);
        }
    for (; k + 32 <= k1; k += 32)
      for (int i = 0; i < 4; ++i)
        _mm512_storeu_si512(buf + (i0 + i) * CH + k - k0,
                            live[i] ? bf16x32<T>(src[i] + k * B) : _mm512_setzero_si512());
    for (int i = 0; i < 4; ++i)
      for (int64_t c = k; c < k0 + CH; ++c)
        buf[(i0 + i) * CH + c - k0] = live[i] && c < p.K ? bf16_bits<T>(src[i] + c * B) : 0;
  }
}

// NT tiles of 16 weight rows x MT tiles of 16 activation rows: C[i][j] (tile 2i+j, or i when MT = 1) += A_i . B_j.
// A tile i is 16 rows of `a` (bf16, rows a_stride bytes apart) from row 16 i: the weight itself, or (when
// `stage` is given) a CH-column chunk it fills before the chunk's tiles are read.
template <int NT, int MT, class Stage>
void block_amx(const Problem& p, int64_t n0, int64_t m0, const uint16_t* a, int64_t a_stride, Stage stage) {
  static_assert(NT * MT <= 4, "four accumulator tiles");
  alignas(64) float c_buf[16 * 16];
  float acc[NT * 16][MT * 16];
  const bool grouped = (p.ws && p.G > 1) || (p.xs && p.XG > 1);
  const int64_t Kp = (p.K + 31) / 32 * 32, rows = std::min<int64_t>(NT * 16, p.N - n0);
  const int64_t xstride = p.MP * 4, group = grouped ? p.group : Kp, tile_rows = 16 * a_stride / 2;
  std::memset(acc, 0, sizeof(acc));
  // the tiles into acc, times this group's scales (or 1, when the scales apply once at the end)
  auto spill = [&](int64_t gi, bool scaled) {
#define GLM_SPILL(TILE, I, J)                                                                      \
  _tile_stored(TILE, c_buf, 64);                                                                   \
  for (int r = 0; r < 16; ++r)                                                                     \
    for (int m = 0; m < 16; ++m) {                                                                 \
      const int64_t n = n0 + (I) * 16 + r, mm = m0 + (J) * 16 + m;                                 \
      const float s = scaled && n < p.N && mm < p.M ? wscale(p, n, gi) * xscale(p, mm, gi) : 1.0f; \
      acc[(I) * 16 + r][(J) * 16 + m] += c_buf[r * 16 + m] * s;                                    \
    }
    if constexpr (MT == 1) {
      GLM_SPILL(0, 0, 0)
      if constexpr (NT > 1) { GLM_SPILL(1, 1, 0) }
      if constexpr (NT > 2) { GLM_SPILL(2, 2, 0) }
      if constexpr (NT > 3) { GLM_SPILL(3, 3, 0) }
    } else {
      GLM_SPILL(0, 0, 0) GLM_SPILL(1, 0, 1)
      if constexpr (NT > 1) { GLM_SPILL(2, 1, 0) GLM_SPILL(3, 1, 1) }
    }
#undef GLM_SPILL
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  };
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  constexpr bool staged = !std::is_same_v<Stage, std::nullptr_t>;
  const uint16_t* a_chunk = a;
  for (int64_t k = 0, gi = 0; k < Kp; k += 32) {
    if constexpr (staged) {
      if (k % CH == 0) stage(k);
      a_chunk = a - k / CH * CH;  // column k of the chunk sits at a + (k - chunk start)
    }
    const uint16_t* xk = p.xv + ((k >> 1) * p.MP + m0) * 2;
    _tile_loadd(6, xk, xstride);
    if constexpr (MT > 1) _tile_loadd(7, xk + 32, xstride);
    if constexpr (MT == 1) {
      _tile_loadd(4, a_chunk + k, a_stride);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NT > 1) {
        _tile_loadd(5, a_chunk + tile_rows + k, a_stride);
        _tile_dpbf16ps(1, 5, 6);
      }
      if constexpr (NT > 2) {
        _tile_loadd(4, a_chunk + 2 * tile_rows + k, a_stride);
        _tile_dpbf16ps(2, 4, 6);
      }
      if constexpr (NT > 3) {
        _tile_loadd(5, a_chunk + 3 * tile_rows + k, a_stride);
        _tile_dpbf16ps(3, 5, 6);
      }
    } else {
      _tile_loadd(4, a_chunk + k, a_stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NT > 1) {
        _tile_loadd(5, a_chunk + tile_rows + k, a_stride);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    if (grouped && ((k + 32) % group == 0 || k + 32 >= Kp)) spill(gi++, true);
  }
  if (!grouped) spill(0, false);
  const int64_t mrows = std::min<int64_t>(MT * 16, p.M - m0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const float s = grouped ? 1.0f : wscale(p, n, 0), b = p.bias ? p.bias[n] : 0.0f;
    for (int64_t m = 0; m < mrows; ++m)
      p.out[(m0 + m) * p.ldo + n] = acc[r][m] * (grouped ? 1.0f : s * xscale(p, m0 + m, 0)) + b;
  }
}

constexpr int64_t AMX_ROWS = 64;  // weight rows per step of a work item

// Whole bf16 tiles are read in place, 64 rows at a time. fp8 weights and partial tiles are widened: a chunk of
// the same 64 (or 32) rows at a time, kept in L1, for one tile of activations; for more (prefill), once per
// 64 rows over all of K into a strip that every tile of activations then reads.
template <int T>
void amx(const Problem& p, int64_t n0, int64_t n1) {
  Tiles tiles;
  alignas(64) uint16_t chunk[AMX_ROWS * CH];
  const bool direct = T == BF16 && p.K % 32 == 0;
  const int64_t Kp = (p.K + 31) / 32 * 32;
  thread_local std::vector<uint16_t> strip;
  for (int64_t n = n0; n < n1; n += AMX_ROWS) {
    const uint16_t* a = (const uint16_t*)p.w + n * p.K;
    int64_t stride = p.K * 2;
    const bool whole = direct && n + AMX_ROWS <= p.N;
    if (!whole && p.M > 32) {
      strip.resize(AMX_ROWS * Kp);
      for (int64_t k0 = 0; k0 < p.K; k0 += CH) {
        stage_chunk<T>(p, n, AMX_ROWS, k0, chunk);
        for (int64_t r = 0; r < AMX_ROWS; ++r)
          std::memcpy(strip.data() + r * Kp + k0, chunk + r * CH, std::min(CH, Kp - k0) * 2);
      }
      a = strip.data();
      stride = Kp * 2;
    }
    for (int64_t m0 = 0; m0 < p.M; m0 += 32) {
      if (whole || p.M > 32) {
        if (p.M - m0 <= 16) {
          block_amx<4, 1>(p, n, m0, a, stride, nullptr);
        } else {
          block_amx<2, 2>(p, n, m0, a, stride, nullptr);
          if (n + 32 < p.N) block_amx<2, 2>(p, n + 32, m0, a + 32 * stride / 2, stride, nullptr);
        }
      } else if (p.M - m0 <= 16) {
        block_amx<4, 1>(p, n, m0, chunk, CH * 2, [&](int64_t k0) { stage_chunk<T>(p, n, 64, k0, chunk); });
      } else {
        for (int64_t h = n; h < n + 64 && h < p.N; h += 32)
          block_amx<2, 2>(p, h, m0, chunk, CH * 2, [&](int64_t k0) { stage_chunk<T>(p, h, 32, k0, chunk); });
      }
    }
  }
}
#endif

// --- dispatch --------------------------------------------------------------------------------------------------
enum Path { GENERIC = 0, DOT = 1, AMX = 2 };

int path_of(const Problem& p, int t) {
  if (!p.xb) return GENERIC;
#if defined(GLM_AMX)
  if (p.xv && (t == BF16 || t == FP8)) return AMX;
#endif
  return DOT;
}

void rows_any(int t, const Problem& p, int64_t n0, int64_t n1) {
  const int path = path_of(p, t);
#if defined(GLM_AMX)
  if (path == AMX) {
    t == BF16 ? amx<BF16>(p, n0, n1) : amx<FP8>(p, n0, n1);
    return;
  }
#endif
#if defined(GLM_DOT)
  if (path == DOT) {
    t == BF16 ? dot<BF16>(p, n0, n1) : dot<FP8>(p, n0, n1);
    return;
  }
#endif
  switch (t) {
    case BF16: generic<BF16>(p, n0, n1); break;
    case F16: generic<F16>(p, n0, n1); break;
    case F32: generic<F32>(p, n0, n1); break;
    case FP8: generic<FP8>(p, n0, n1); break;
    default: generic<I8>(p, n0, n1); break;
  }
}

bool amx_on() {
#if defined(GLM_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// bf16 activations beside fp8 weights, in the order the 64-wide fp8 widening produces (into `buf`).
const uint16_t* shuffled_x(const uint16_t* x, int64_t M, int64_t K, std::vector<uint16_t>& buf) {
#if defined(GLM_DOT)
  if (SHUFFLED) {
    buf.resize(M * K);
    shuffle64(x, M, K, buf.data());
    return buf.data();
  }
#endif
  return x;
}

int64_t allowed = 3;  // tests narrow the paths to reach each one on one machine

int64_t caps() {
#if defined(GLM_DOT)
  return (1 | (amx_on() ? 2 : 0)) & allowed;
#else
  return 0;
#endif
}

int64_t limit_caps(int64_t mask) {
  const int64_t was = allowed;
  allowed = mask;
  return was;
}

int wtype(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    case at::kFloat: return F32;
    case at::kFloat8_e4m3fn: return FP8;
    case at::kChar: return I8;
    default: TORCH_CHECK(false, "glm45v_cpu: weights of type ", w.scalar_type(), " are not supported");
  }
}

// Checks the operands and fills everything but the weight and output pointers. bf16 activations take the bf16
// paths (bf16 or fp8 weights, a CPU with bf16 dot products); fp32 ones the generic path.
Problem problem(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& x_scale,
                const std::optional<at::Tensor>& scale, int64_t group, const std::optional<at::Tensor>& bias,
                const char* what) {
  TORCH_CHECK(w.is_contiguous(), what, ": the weight must be contiguous");
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) == w.size(-1), what, ": x [rows, K] contiguous");
  const int t = wtype(w);
  const bool bf = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == at::kFloat || (bf && (caps() & 1) && (t == BF16 || t == FP8)), what,
              ": x must be fp32, or bf16 beside bf16 or fp8 weights on a CPU with bf16 dot products");
  TORCH_CHECK(!x_scale || bf, what, ": activation scales go with bf16 (quantized) activations");
  const int64_t K = x.size(1);
  for (const auto* s : {&scale, &x_scale})
    if (*s) TORCH_CHECK((*s)->scalar_type() == at::kFloat && (*s)->is_contiguous(), what, ": scales are fp32");
  const bool per_group = (scale && scale->size(-1) > 1) || (x_scale && x_scale->size(-1) > 1);
  TORCH_CHECK(!per_group || (group > 0 && group % 32 == 0), what, ": a scale group is a multiple of 32 columns");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous(), what, ": bias is fp32");
  Problem p{};
  p.x = bf ? nullptr : x.data_ptr<float>();
  p.xb = bf ? (const uint16_t*)x.data_ptr() : nullptr;
  p.xs = x_scale ? x_scale->data_ptr<float>() : nullptr;
  p.XG = x_scale ? x_scale->size(-1) : 1;
  p.M = x.size(0);
  p.K = K;
  p.ws = scale ? scale->data_ptr<float>() : nullptr;
  p.G = scale ? scale->size(-1) : 1;
  p.group = per_group ? group : K;
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  return p;
}

// Work items of about 64 KiB of weights (whole AMX blocks): an even split, little per-item overhead.
int64_t grain_rows(int64_t K, int t, bool tiles) {
  const int64_t row = std::max<int64_t>(K * bytes_of(t), 1), unit = tiles ? 64 : RB;
  return std::max<int64_t>(unit, (int64_t(1) << 16) / row / unit * unit);
}

// AMX tiles from 5 rows of activations on: up to 4, dot products read the weights faster (measured on the
// benchmarks/cpu_peers.py shapes; a tile product costs the same for 1 row as for 16).
constexpr int64_t DOT_ROWS = 4;

bool use_amx(const at::Tensor& x, int t, int64_t rows) {
  return rows > DOT_ROWS && x.scalar_type() == at::kBFloat16 && (caps() & 2) && (t == BF16 || t == FP8);
}

// y = x W^T (+ bias): x [M, K], w [N, K] -> fp32 [M, N]. x_scale [M, 1 or K/group]: x holds quantized values.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& scale, int64_t group, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2, "glm45v_cpu.linear: w [N, K]");
  Problem p = problem(x, w, x_scale, scale, group, bias, "glm45v_cpu.linear");
  const int t = wtype(w);
  const int64_t N = w.size(0);
  auto out = at::empty({p.M, N}, x.options().dtype(at::kFloat));
  std::vector<uint16_t> shuffled, xv;
  if (p.xb && t == FP8) p.xb = shuffled_x(p.xb, p.M, p.K, shuffled);
  if (use_amx(x, t, p.M)) {
    p.MP = (p.M + 15) / 16 * 16;
    xv.resize((p.K + 31) / 32 * 32 * p.MP);
#if defined(GLM_AMX)
    pairs(p.xb, p.M, p.K, p.MP, xv.data());
#endif
    p.xv = xv.data();
  }
  p.w = (const uint8_t*)w.data_ptr();
  p.N = N;
  p.out = out.data_ptr<float>();
  p.ldo = N;
  const int64_t grain = grain_rows(p.K, t, p.xv != nullptr);
  at::parallel_for(0, (N + grain - 1) / grain, 1, [&](int64_t a, int64_t b) {
    rows_any(t, p, a * grain, std::min(N, b * grain));
  });
  return out;
}

// One projection of the routed experts. x [P, K]: each (token, expert) pair's input, sorted by expert; starts
// [E + 1]: expert e's pairs are rows [starts[e], starts[e + 1]); w [E, N, K], scale [E, N, G], x_scale [P, XG].
// -> fp32 [P, N]. Work items are (expert with pairs, block of rows): the threads share the chosen experts'
// weights evenly whichever they are.
at::Tensor experts(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& w,
                   const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& scale, int64_t group) {
  TORCH_CHECK(w.dim() == 3, "glm45v_cpu.experts: w [E, N, K]");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.is_contiguous() && starts.numel() == w.size(0) + 1,
              "glm45v_cpu.experts: starts [E + 1] int64");
  const Problem base = problem(x, w, x_scale, scale, group, std::nullopt, "glm45v_cpu.experts");
  const int t = wtype(w);
  const int64_t P = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(st[E] <= P, "glm45v_cpu.experts: starts past the rows of x");
  auto out = at::empty({P, N}, x.options().dtype(at::kFloat));
  std::vector<int64_t> hit, xv_at;  // experts with pairs; where each one's tile operand starts (-1: no tiles)
  int64_t xv_size = 0;
  for (int64_t e = 0; e < E; ++e)
    if (st[e + 1] > st[e]) {
      hit.push_back(e);
      const bool tiles = use_amx(x, t, st[e + 1] - st[e]);
      xv_at.push_back(tiles ? xv_size : -1);
      if (tiles) xv_size += (K + 31) / 32 * 32 * ((st[e + 1] - st[e] + 15) / 16 * 16);
    }
  std::vector<uint16_t> xv(xv_size), shuffled;
  Problem shared = base;
  if (shared.xb && t == FP8) shared.xb = shuffled_x(shared.xb, P, K, shuffled);
#if defined(GLM_AMX)
  if (xv_size)
    at::parallel_for(0, int64_t(hit.size()), 1, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const int64_t e = hit[i], rows = st[e + 1] - st[e];
        if (xv_at[i] >= 0) pairs(shared.xb + st[e] * K, rows, K, (rows + 15) / 16 * 16, xv.data() + xv_at[i]);
      }
    });
#endif
  const int64_t grain = grain_rows(K, t, xv_size > 0);  // whole tile blocks for every expert
  const int64_t blocks = (N + grain - 1) / grain, wbytes = N * K * bytes_of(t);
  at::parallel_for(0, int64_t(hit.size()) * blocks, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t e = hit[i / blocks], blk = i % blocks, first = st[e];
      Problem p = shared;
      p.M = st[e + 1] - first;
      if (p.x) p.x += first * K;
      if (p.xb) p.xb += first * K;
      if (p.xs) p.xs += first * p.XG;
      if (xv_at[i / blocks] >= 0) {
        p.xv = xv.data() + xv_at[i / blocks];
        p.MP = (p.M + 15) / 16 * 16;
      }
      p.w = (const uint8_t*)w.data_ptr() + e * wbytes;
      p.N = N;
      if (p.ws) p.ws += e * N * p.G;
      p.out = out.data_ptr<float>() + first * N;
      p.ldo = N;
      rows_any(t, p, blk * grain, std::min(N, (blk + 1) * grain));
    }
  });
  return out;
}

// --- decode attention ------------------------------------------------------------------------------------------
// Straight from the paged cache: q [B, Hq, D] (one new token per sequence, its K/V already stored), caches
// [blocks, block_size, Hkv, D], tables [B, max_blocks] int32, lens [B] int32 -> fp32 [B, Hq, D]. One work item
// per (sequence, KV head) serves its whole GQA group: each key and value row is read once and widened once.
template <int T>
void widen_row(const uint8_t* src, int64_t D, float* dst) {
  int64_t c = 0;
  for (; c + L <= D; c += L) {
    const f32v v = widen16<T>(src + c * bytes_of<T>()) * WIDEN<T>;
    std::memcpy(dst + c, &v, sizeof(v));
  }
  for (; c < D; ++c) dst[c] = widen1<T>(src + c * bytes_of<T>());
}

inline float dot_row(const float* a, const float* b, int64_t D) {
  f32v acc = {};
  int64_t c = 0;
  for (; c + L <= D; c += L) acc += loadv<f32v>(a + c) * loadv<f32v>(b + c);
  float s = hsum(acc);
  for (; c < D; ++c) s += a[c] * b[c];
  return s;
}

template <int T>
void attend(const float* qp, int64_t B, int64_t Hq, int64_t D, const uint8_t* kc, const uint8_t* vc,
            const int32_t* tables, int64_t tstride, const int32_t* lens, double scale, int64_t bs, int64_t Hkv,
            float* out) {
  const int64_t G = Hq / Hkv, row = D * bytes_of<T>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t a, int64_t b) {
    std::vector<float> scores, acc(G * D), kv(D);
    for (int64_t i = a; i < b; ++i) {
      const int64_t s = i / Hkv, h = i % Hkv, n = lens[s];
      const float* q = qp + (s * Hq + h * G) * D;
      scores.assign(G * n, 0.0f);
      auto slot = [&](int64_t j) { return (int64_t(tables[s * tstride + j / bs]) * bs + j % bs) * Hkv + h; };
      for (int64_t j = 0; j < n; ++j) {
        widen_row<T>(kc + slot(j) * row, D, kv.data());
        for (int64_t g = 0; g < G; ++g) scores[g * n + j] = dot_row(q + g * D, kv.data(), D) * float(scale);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sc = scores.data() + g * n;
        float mx = -INFINITY, den = 0;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
        for (int64_t j = 0; j < n; ++j) den += (sc[j] = std::exp(sc[j] - mx));
        for (int64_t j = 0; j < n; ++j) sc[j] /= den;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        widen_row<T>(vc + slot(j) * row, D, kv.data());
        for (int64_t g = 0; g < G; ++g) {
          const float pj = scores[g * n + j];
          float* o = acc.data() + g * D;
          for (int64_t c = 0; c < D; ++c) o[c] += pj * kv[c];
        }
      }
      std::memcpy(out + (s * Hq + h * G) * D, acc.data(), G * D * 4);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "glm45v_cpu: q fp32 [B, H, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.size(3) == q.size(2) &&
                  q.size(1) % k_cache.size(2) == 0,
              "glm45v_cpu: caches [blocks, block_size, kv_heads, head_dim] of one type");
  TORCH_CHECK(tables.scalar_type() == at::kInt && lens.scalar_type() == at::kInt && tables.is_contiguous() &&
                  lens.is_contiguous() && tables.size(0) == q.size(0) && lens.numel() == q.size(0),
              "glm45v_cpu: int32 tables [B, blocks] and lens [B]");
  auto out = at::empty(q.sizes(), q.options());
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const float* qp = q.data_ptr<float>();
  const int32_t *t = tables.data_ptr<int32_t>(), *n = lens.data_ptr<int32_t>();
  const auto* kc = (const uint8_t*)k_cache.data_ptr();
  const auto* vc = (const uint8_t*)v_cache.data_ptr();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), ts = tables.size(1);
  float* o = out.data_ptr<float>();
  switch (k_cache.scalar_type()) {
    case at::kBFloat16: attend<BF16>(qp, B, Hq, D, kc, vc, t, ts, n, scale, bs, Hkv, o); break;
    case at::kHalf: attend<F16>(qp, B, Hq, D, kc, vc, t, ts, n, scale, bs, Hkv, o); break;
    case at::kFloat: attend<F32>(qp, B, Hq, D, kc, vc, t, ts, n, scale, bs, Hkv, o); break;
    default: TORCH_CHECK(false, "glm45v_cpu: a KV cache of type ", k_cache.scalar_type(), " is not supported");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(glm45v_cpu, m) {
  m.def("caps() -> int", &caps);
  m.def("limit_caps(int mask) -> int", &limit_caps);
  m.def("linear(Tensor x, Tensor w, Tensor? x_scale, Tensor? scale, int group, Tensor? bias) -> Tensor", &linear);
  m.def("experts(Tensor x, Tensor starts, Tensor w, Tensor? x_scale, Tensor? scale, int group) -> Tensor", &experts);
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, float scale) -> Tensor",
        &decode_attention);
}
