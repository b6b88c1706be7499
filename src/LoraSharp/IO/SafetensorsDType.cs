using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoraSharp.IO;

/// <summary>
/// The dtypes of the safetensors format and how they map to TorchSharp.
/// TorchSharp 0.107 has no float8 and no unsigned types wider than 8 bits, so these are converted on read:
/// <list type="bullet">
/// <item><c>F8_E4M3</c> (torch float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN) and <c>F8_E5M2</c>
/// (bias 15, IEEE-style infinities and NaN) are decoded exactly to float32 (every value is representable).</item>
/// <item><c>U16</c> → int32 and <c>U32</c> → int64 (exact); <c>U64</c> → int64, refusing values above
/// <see cref="long.MaxValue"/>.</item>
/// </list>
/// A requested dtype is applied after that conversion.
/// </summary>
public static class SafetensorsDType
{
    /// <summary>Bytes per element of a safetensors dtype; throws for an unknown name.</summary>
    public static int ElementSize(string name) => TryElementSize(name) ?? throw new ArgumentException($"unknown safetensors dtype '{name}'");

    public static int? TryElementSize(string name) => name switch
    {
        "F64" or "I64" or "U64" => 8,
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "I8" or "U8" or "BOOL" or "F8_E4M3" or "F8_E5M2" => 1,
        _ => null,
    };

    public static bool IsKnown(string name) => TryElementSize(name) is not null;

    /// <summary>The TorchSharp type holding the raw bytes unchanged, or null when TorchSharp has none (F8, U16/U32/U64).</summary>
    public static ScalarType? NativeType(string name) => name switch
    {
        "F64" => ScalarType.Float64,
        "F32" => ScalarType.Float32,
        "F16" => ScalarType.Float16,
        "BF16" => ScalarType.BFloat16,
        "I64" => ScalarType.Int64,
        "I32" => ScalarType.Int32,
        "I16" => ScalarType.Int16,
        "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte,
        "BOOL" => ScalarType.Bool,
        _ => null,
    };

    /// <summary>The type a tensor of this file dtype has after loading without a requested dtype.</summary>
    public static ScalarType LoadedType(string name) => NativeType(name) ?? name switch
    {
        "F8_E4M3" or "F8_E5M2" => ScalarType.Float32,
        "U16" => ScalarType.Int32,
        "U32" or "U64" => ScalarType.Int64,
        _ => throw new ArgumentException($"unknown safetensors dtype '{name}'"),
    };

    /// <summary>The safetensors name of a TorchSharp type; throws for types safetensors cannot store (complex, quantized).</summary>
    public static string NameOf(ScalarType type) => type switch
    {
        ScalarType.Float64 => "F64",
        ScalarType.Float32 => "F32",
        ScalarType.Float16 => "F16",
        ScalarType.BFloat16 => "BF16",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Int16 => "I16",
        ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8",
        ScalarType.Bool => "BOOL",
        _ => throw new ArgumentException($"dtype {type} cannot be stored in a safetensors file"),
    };

    internal static readonly float[] E4M3Table = BuildE4M3();
    internal static readonly float[] E5M2Table = BuildE5M2();

    static float[] BuildE4M3()
    {
        var t = new float[256];
        for (int b = 0; b < 256; b++)
        {
            int sign = b >> 7, exp = (b >> 3) & 0xF, man = b & 7;
            float v = exp == 0xF && man == 7 ? float.NaN
                : exp == 0 ? man / 8f * MathF.Pow(2, -6)
                : (1 + man / 8f) * MathF.Pow(2, exp - 7);
            t[b] = sign == 1 ? -v : v;
        }
        return t;
    }

    static float[] BuildE5M2()
    {
        var t = new float[256];
        for (int b = 0; b < 256; b++)
        {
            int sign = b >> 7, exp = (b >> 2) & 0x1F, man = b & 3;
            float v = exp == 0x1F ? (man == 0 ? float.PositiveInfinity : float.NaN)
                : exp == 0 ? man / 4f * MathF.Pow(2, -14)
                : (1 + man / 4f) * MathF.Pow(2, exp - 15);
            t[b] = sign == 1 ? -v : v;
        }
        return t;
    }

    /// <summary>
    /// Converts raw little-endian elements of a dtype TorchSharp lacks into the destination span of
    /// <see cref="LoadedType"/>. Returns the index of the first element out of range (U64 above long.MaxValue), or -1.
    /// </summary>
    internal static long ConvertChunk(string name, ReadOnlySpan<byte> src, Span<byte> dst)
    {
        switch (name)
        {
            case "F8_E4M3":
            case "F8_E5M2":
            {
                var table = name == "F8_E4M3" ? E4M3Table : E5M2Table;
                var d = MemoryMarshal.Cast<byte, float>(dst);
                for (int i = 0; i < src.Length; i++) d[i] = table[src[i]];
                return -1;
            }
            case "U16":
            {
                var s = MemoryMarshal.Cast<byte, ushort>(src);
                var d = MemoryMarshal.Cast<byte, int>(dst);
                for (int i = 0; i < s.Length; i++) d[i] = s[i];
                return -1;
            }
            case "U32":
            {
                var s = MemoryMarshal.Cast<byte, uint>(src);
                var d = MemoryMarshal.Cast<byte, long>(dst);
                for (int i = 0; i < s.Length; i++) d[i] = s[i];
                return -1;
            }
            case "U64":
            {
                var s = MemoryMarshal.Cast<byte, ulong>(src);
                var d = MemoryMarshal.Cast<byte, long>(dst);
                for (int i = 0; i < s.Length; i++)
                {
                    if (s[i] > long.MaxValue) return i;
                    d[i] = (long)s[i];
                }
                return -1;
            }
            default:
                throw new ArgumentException($"dtype '{name}' needs no conversion");
        }
    }
}
