/* half_bits.h - bit-level conversions between float32 and the two 16-bit
 * float formats the CUDA backend uses (bfloat16 and IEEE binary16), as
 * CUDA's __float2bfloat16 / __float2half and their inverses compute them.
 * Usable from C (gemm_emu.c) and C++ (emu.h), so that the emulated kernels
 * and the emulated matrix products round exactly alike.
 *
 * Narrowing rounds to nearest, ties to even; NaN becomes CUDA's canonical
 * NaN 0x7FFF (sign and payload are not kept, as on the GPU); binary16
 * overflows to +-inf from 65520 on and produces subnormals below 2^-14.
 * Widening is exact. */
#ifndef STRATA_CUDA_EMU_HALF_BITS_H
#define STRATA_CUDA_EMU_HALF_BITS_H

#include <stdint.h>
#include <string.h>

static inline uint32_t half_bits_of_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float half_bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> bfloat16 bits. */
static inline uint16_t half_bits_bf16_from_f32(float f)
{
    uint32_t u = half_bits_of_f32(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fffu;
    /* Adding 0x7fff plus the lowest kept bit carries into the kept part
     * exactly when the dropped half is above the tie, or at the tie with an
     * odd kept part; a carry out of the mantissa correctly bumps the
     * exponent (up to inf). */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* bfloat16 bits -> float32 (exact). */
static inline float half_bits_bf16_to_f32(uint16_t h)
{
    return half_bits_to_f32((uint32_t)h << 16);
}

/* Rounds m >> shift to nearest, ties to even (shift in 1..31). */
static inline uint32_t half_bits_shift_rne(uint32_t m, unsigned shift)
{
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u)))
        q++;
    return q;
}

/* float32 -> IEEE binary16 bits. */
static inline uint16_t half_bits_f16_from_f32(float f)
{
    uint32_t u = half_bits_of_f32(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return 0x7fffu;
    if (a >= 0x477ff000u) /* 65520 and up (and inf): past the last tie */
        return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) {
        /* Normal: rebias the exponent (127 -> 15) and round off 13 bits; a
         * carry out of the mantissa moves into the exponent, as it must. */
        return (uint16_t)(sign | half_bits_shift_rne(a - (112u << 23), 13));
    }
    /* Below 2^-14: the result is a subnormal in units of 2^-24. The value is
     * m * 2^(e - 150) with the implicit bit, so the count of units is
     * m >> (126 - e); rounding up to 0x400 gives the smallest normal, whose
     * encoding is exactly that. Float subnormals (e == 0) are far below
     * 2^-25 and round to zero. */
    uint32_t e = a >> 23;
    if (e < 102)
        return sign;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    return (uint16_t)(sign | half_bits_shift_rne(m, 126u - e));
}

/* IEEE binary16 bits -> float32 (exact). */
static inline float half_bits_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0) {
        /* Zero or subnormal: m units of 2^-24, exact in float. */
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    if (e == 31)
        return half_bits_to_f32(sign | 0x7f800000u | (m << 13));
    return half_bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}

#endif
