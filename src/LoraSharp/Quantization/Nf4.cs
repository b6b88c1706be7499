using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LoraSharp.Quantization;

/// <summary>
/// A tensor stored in QLoRA's NF4 format (arXiv 2305.14314, bitsandbytes <c>quant_type="nf4"</c>, double quantization):
/// each value is the 4-bit index of one of 16 normal-float levels times its block's absmax (block 64 values); two
/// indices per byte, the first value of a pair in the high nibble. The fp32 absmax constants are themselves
/// quantized: their mean is subtracted, then each group of 256 is stored as 8-bit indices into the signed
/// <see cref="DynamicCode8"/> times the group's fp32 absmax. Storage: 0.5 + 1/64 + 4/(64·256) bytes per value.
/// </summary>
public sealed class Nf4Tensor
{
    public Nf4Tensor(long[] shape, byte[] packed, byte[] absmaxCodes, float[] absmaxScales, float absmaxMean)
    {
        Shape = shape; Packed = packed; AbsmaxCodes = absmaxCodes; AbsmaxScales = absmaxScales; AbsmaxMean = absmaxMean;
        Count = shape.Aggregate(1L, (a, b) => a * b);
    }

    public long[] Shape { get; }
    public long Count { get; }
    /// <summary>Two 4-bit code indices per byte (first value in the high nibble); length ⌈Count/2⌉.</summary>
    public byte[] Packed { get; }
    /// <summary>Per 64-value block: 8-bit index into <see cref="DynamicCode8.Signed"/> of (absmax − mean) / group scale.</summary>
    public byte[] AbsmaxCodes { get; }
    /// <summary>Per group of 256 blocks: the absmax of the mean-centred block absmaxes.</summary>
    public float[] AbsmaxScales { get; }
    public float AbsmaxMean { get; }

    public int Blocks => AbsmaxCodes.Length;

    /// <summary>Bytes of all stored buffers (packed codes, absmax codes, group scales, the mean).</summary>
    public long StorageBytes => Packed.LongLength + AbsmaxCodes.LongLength + AbsmaxScales.LongLength * sizeof(float) + sizeof(float);

    /// <summary>The dequantized absmax of block <paramref name="block"/>.</summary>
    public float BlockAbsmax(int block) =>
        DynamicCode8.Signed[AbsmaxCodes[block]] * AbsmaxScales[block / Nf4.AbsmaxGroupSize] + AbsmaxMean;
}

/// <summary>NF4 quantization and fast dequantization (AVX-512 table lookup when available).</summary>
public static class Nf4
{
    /// <summary>Values per absmax block.</summary>
    public const int BlockSize = 64;
    /// <summary>Absmax constants per second-level (double quantization) group.</summary>
    public const int AbsmaxGroupSize = 256;

    /// <summary>The 16 NF4 levels (QLoRA paper appendix / bitsandbytes), ascending, with an exact zero at index 7.</summary>
    public static readonly float[] Code =
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
        -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
        0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    ];

    /// <summary>Index of the NF4 level nearest to <paramref name="normalized"/> (a value in [−1, 1]).</summary>
    public static byte NearestCode(float normalized)
    {
        // Midpoints between consecutive levels decide the bucket (what bitsandbytes' quantizer does).
        int best = 0;
        for (int i = 1; i < 16; i++)
            if (normalized > (Code[i - 1] + Code[i]) * 0.5f) best = i;
        return (byte)best;
    }

    /// <summary>Quantizes <paramref name="values"/> (row-major, any shape) to NF4 with double-quantized absmax.</summary>
    public static Nf4Tensor Quantize(ReadOnlySpan<float> values, long[] shape)
    {
        long count = shape.Aggregate(1L, (a, b) => a * b);
        if (count != values.Length) throw new ArgumentException($"shape [{string.Join(", ", shape)}] has {count} values, got {values.Length}");
        int blocks = (int)((count + BlockSize - 1) / BlockSize);
        var absmax = new float[blocks];
        var packed = new byte[(count + 1) / 2];
        // Pin to share the span with the parallel workers.
        unsafe
        {
            fixed (float* src = values)
            {
                float* p = src;
                Parallel.For(0, (blocks + 63) / 64, chunk =>
                {
                    int end = Math.Min(blocks, (chunk + 1) * 64);
                    for (int b = chunk * 64; b < end; b++)
                    {
                        long start = (long)b * BlockSize, stop = Math.Min(count, start + BlockSize);
                        float m = 0;
                        for (long i = start; i < stop; i++) m = Math.Max(m, Math.Abs(p[i]));
                        absmax[b] = m;
                        float inv = m > 0 ? 1f / m : 0f;
                        for (long i = start; i < stop; i++)
                        {
                            byte q = NearestCode(p[i] * inv);
                            long byteIndex = i >> 1;
                            if ((i & 1) == 0) packed[byteIndex] = (byte)(q << 4);
                            else packed[byteIndex] |= q;
                        }
                        if ((stop & 1) == 1 && stop == count) packed[stop >> 1] |= 7; // pad nibble: the zero level
                    }
                });
            }
        }
        var (codes, scales, mean) = QuantizeAbsmax(absmax);
        return new Nf4Tensor([.. shape], packed, codes, scales, mean);
    }

    /// <summary>Double quantization of the block absmaxes: subtract the mean, 8-bit dynamic code per group of 256.</summary>
    public static (byte[] Codes, float[] Scales, float Mean) QuantizeAbsmax(float[] absmax)
    {
        double sum = 0;
        foreach (var a in absmax) sum += a;
        float mean = absmax.Length == 0 ? 0 : (float)(sum / absmax.Length);
        int groups = (absmax.Length + AbsmaxGroupSize - 1) / AbsmaxGroupSize;
        var scales = new float[groups];
        var codes = new byte[absmax.Length];
        var code = DynamicCode8.Signed;
        for (int g = 0; g < groups; g++)
        {
            int start = g * AbsmaxGroupSize, stop = Math.Min(absmax.Length, start + AbsmaxGroupSize);
            float m = 0;
            for (int i = start; i < stop; i++) m = Math.Max(m, Math.Abs(absmax[i] - mean));
            scales[g] = m;
            float inv = m > 0 ? 1f / m : 0f;
            for (int i = start; i < stop; i++) codes[i] = DynamicCode8.Nearest(code, (absmax[i] - mean) * inv);
        }
        return (codes, scales, mean);
    }

    /// <summary>Dequantizes into <paramref name="destination"/> (float32, length Count).</summary>
    public static void Dequantize(Nf4Tensor t, Span<float> destination)
    {
        if (destination.Length != t.Count) throw new ArgumentException($"destination has {destination.Length} values, tensor {t.Count}");
        unsafe
        {
            fixed (float* dst = destination)
            {
                float* d = dst;
                int blocks = t.Blocks;
                // Chunks of 256 blocks (16k values) per task: large enough to amortize scheduling.
                Parallel.For(0, (blocks + 255) / 256, chunk =>
                {
                    int end = Math.Min(blocks, (chunk + 1) * 256);
                    for (int b = chunk * 256; b < end; b++) DequantizeBlock(t, b, d);
                });
            }
        }
    }

    /// <summary>Dequantizes into <paramref name="destination"/> as bfloat16 bits (round to nearest even), length Count.</summary>
    public static void DequantizeBf16(Nf4Tensor t, Span<ushort> destination)
    {
        if (destination.Length != t.Count) throw new ArgumentException($"destination has {destination.Length} values, tensor {t.Count}");
        unsafe
        {
            fixed (ushort* dst = destination)
            {
                ushort* d = dst;
                int blocks = t.Blocks;
                Parallel.For(0, (blocks + 255) / 256, chunk =>
                {
                    float* tmp = stackalloc float[BlockSize];
                    float* full = stackalloc float[BlockSize];
                    int end = Math.Min(blocks, (chunk + 1) * 256);
                    for (int b = chunk * 256; b < end; b++)
                    {
                        long start = (long)b * BlockSize;
                        int n = (int)Math.Min(BlockSize, t.Count - start);
                        if (n == BlockSize) DequantizeBlock(t, b, tmp - start);
                        else { DequantizeFullBlockScalar(t, b, full, n); new Span<float>(full, n).CopyTo(new Span<float>(tmp, n)); }
                        ToBf16(tmp, d + start, n);
                    }
                });
            }
        }
    }

    static unsafe void ToBf16(float* src, ushort* dst, int n)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            var one = Vector512.Create(1u);
            var bias = Vector512.Create(0x7FFFu);
            for (; i + 32 <= n; i += 32)
            {
                var a = Vector512.Load((uint*)(src + i));
                var b = Vector512.Load((uint*)(src + i + 16));
                a = (a + bias + ((a >> 16) & one)) >> 16;
                b = (b + bias + ((b >> 16) & one)) >> 16;
                Vector512.Narrow(a, b).Store(dst + i);
            }
        }
        for (; i < n; i++)
        {
            uint u = BitConverter.SingleToUInt32Bits(src[i]);
            dst[i] = (ushort)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
        }
    }

    /// <summary>Writes block <paramref name="b"/> to <c>dst[b·64 …]</c>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    static unsafe void DequantizeBlock(Nf4Tensor t, int b, float* dst)
    {
        long start = (long)b * BlockSize;
        int n = (int)Math.Min(BlockSize, t.Count - start);
        if (n < BlockSize) { DequantizeFullBlockScalar(t, b, dst + start, n); return; }
        float scale = t.BlockAbsmax(b);
        fixed (byte* packedBase = t.Packed)
        {
            byte* src = packedBase + start / 2;
            float* o = dst + start;
            if (Avx512F.IsSupported && Avx512BW.IsSupported)
            {
                // A 16-entry table in one register: vpermps looks up 16 indices at once.
                var lut = Vector512.Create(Code) * scale;
                // Each of 8 bytes is duplicated, then the even lanes take the high nibble and the odd lanes the low one.
                var dup = Vector128.Create((byte)0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
                var shifts = Vector512.Create(4u, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
                var mask = Vector512.Create(15u);
                for (int k = 0; k < BlockSize / 2; k += 8)
                {
                    var bytes = Vector128.CreateScalar(*(ulong*)(src + k)).AsByte();
                    var pairs = Ssse3.Shuffle(bytes, dup);
                    var idx = Avx512F.ConvertToVector512UInt32(pairs);
                    idx = Avx512F.ShiftRightLogicalVariable(idx, shifts) & mask;
                    Avx512F.PermuteVar16x32(lut, idx.AsInt32()).Store(o + 2 * k);
                }
                return;
            }
            for (int k = 0; k < BlockSize / 2; k++)
            {
                byte v = src[k];
                o[2 * k] = Code[v >> 4] * scale;
                o[2 * k + 1] = Code[v & 15] * scale;
            }
        }
    }

    static unsafe void DequantizeFullBlockScalar(Nf4Tensor t, int b, float* o, int n)
    {
        long start = (long)b * BlockSize;
        float scale = t.BlockAbsmax(b);
        for (int i = 0; i < n; i++)
        {
            long idx = start + i;
            byte v = t.Packed[idx >> 1];
            int q = (idx & 1) == 0 ? v >> 4 : v & 15;
            o[i] = Code[q] * scale;
        }
    }

    /// <summary>Dequantizes to a new float array (tests, merging).</summary>
    public static float[] Dequantize(Nf4Tensor t)
    {
        var r = new float[t.Count];
        Dequantize(t, r);
        return r;
    }
}
