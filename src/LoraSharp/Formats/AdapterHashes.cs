using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace LoraSharp.Formats;

/// <summary>
/// The identification hashes A1111, Civitai and kohya use for LoRA files: <c>sshs_model_hash</c> ("addnet"
/// hash: SHA-256 of the safetensors data section only), <c>sshs_legacy_hash</c> (first 8 hex of SHA-256 of
/// the 64 KiB at 1 MiB), and the full-file SHA-256 (A1111 "new" hash; Civitai AutoV2 = first 10 hex).
/// </summary>
public static class AdapterHashes
{
    /// <summary>SHA-256 (hex) of a safetensors file's data section.</summary>
    public static string DataSectionSha256(string path)
    {
        using var stream = File.OpenRead(path);
        Span<byte> lengthBytes = stackalloc byte[8];
        stream.ReadExactly(lengthBytes);
        long headerLength = BinaryPrimitives.ReadInt64LittleEndian(lengthBytes);
        stream.Seek(8 + headerLength, SeekOrigin.Begin);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }

    /// <summary>SHA-256 (hex) of the whole file.</summary>
    public static string FileSha256(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }

    /// <summary>A1111's old model hash: SHA-256 of the 64 KiB at offset 1 MiB of the file, first 8 hex.</summary>
    public static string LegacyHash(string path)
    {
        using var stream = File.OpenRead(path);
        return LegacyHash(stream);
    }

    public static string LegacyHash(Stream stream)
    {
        var buffer = new byte[0x10000];
        int read = 0;
        if (stream.Length > 0x100000)
        {
            stream.Seek(0x100000, SeekOrigin.Begin);
            int n;
            while (read < buffer.Length && (n = stream.Read(buffer, read, buffer.Length - read)) > 0) read += n;
        }
        return Convert.ToHexStringLower(SHA256.HashData(buffer.AsSpan(0, read)))[..8];
    }

    /// <summary>
    /// kohya's <c>sshs_legacy_hash</c>: the legacy hash of the file as re-serialised with only the <c>ss_*</c>
    /// metadata (so later edits of other metadata do not change it). The data section is the same; only the
    /// header length differs, so the 64 KiB window is read from <paramref name="path"/> shifted accordingly.
    /// </summary>
    public static string KohyaLegacyHash(string path, IReadOnlyDictionary<string, string> metadata)
    {
        using var stream = File.OpenRead(path);
        Span<byte> lengthBytes = stackalloc byte[8];
        stream.ReadExactly(lengthBytes);
        long headerLength = BinaryPrimitives.ReadInt64LittleEndian(lengthBytes);
        var header = new byte[headerLength];
        stream.ReadExactly(header);
        long kohyaHeaderLength = SsOnlyHeaderLength(header, metadata);
        long dataStartInKohya = 8 + kohyaHeaderLength;
        // Window [1 MiB, 1 MiB + 64 KiB) of the virtual stream: 8 + header' + data.
        long windowStart = 0x100000, windowEnd = 0x110000;
        long dataLength = stream.Length - 8 - headerLength;
        long virtualLength = dataStartInKohya + dataLength;
        if (virtualLength <= windowStart) return Convert.ToHexStringLower(SHA256.HashData(ReadOnlySpan<byte>.Empty))[..8];
        if (windowStart < dataStartInKohya)
            throw new NotSupportedException($"header larger than 1 MiB; the kohya legacy hash would cover header bytes");
        long from = windowStart - dataStartInKohya, to = Math.Min(windowEnd, virtualLength) - dataStartInKohya;
        var buffer = new byte[to - from];
        stream.Seek(8 + headerLength + from, SeekOrigin.Begin);
        stream.ReadExactly(buffer);
        return Convert.ToHexStringLower(SHA256.HashData(buffer))[..8];
    }

    /// <summary>
    /// Length of the header Python's safetensors writes for the same tensors with only the ss_* metadata:
    /// compact JSON, padded with spaces to a multiple of 8.
    /// </summary>
    static long SsOnlyHeaderLength(byte[] header, IReadOnlyDictionary<string, string> metadata)
    {
        // The tensor entries are the same; measure them from the file's own header, minus its metadata object.
        using var doc = System.Text.Json.JsonDocument.Parse(header.AsMemory().TrimEnd((byte)' '));
        long length = 2; // { }
        int entries = 0;
        var ss = metadata.Where(p => p.Key.StartsWith("ss_", StringComparison.Ordinal)).ToList();
        if (ss.Count > 0)
        {
            length += Quoted("__metadata__") + 1 + 2 + ss.Sum(p => Quoted(p.Key) + 1 + Quoted(p.Value)) + (ss.Count - 1);
            entries++;
        }
        foreach (var prop in doc.RootElement.EnumerateObject())
        {
            if (prop.Name == "__metadata__") continue;
            var dtype = prop.Value.GetProperty("dtype").GetString()!;
            var shape = prop.Value.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64().ToString()).ToList();
            var offsets = prop.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64().ToString()).ToList();
            var entry = $"{{\"dtype\":\"{dtype}\",\"shape\":[{string.Join(",", shape)}],\"data_offsets\":[{string.Join(",", offsets)}]}}";
            length += Quoted(prop.Name) + 1 + Encoding.UTF8.GetByteCount(entry);
            entries++;
        }
        length += Math.Max(0, entries - 1);
        return (length + 7) / 8 * 8;
    }

    /// <summary>Byte length of a JSON string literal as serde_json writes it.</summary>
    static long Quoted(string s)
    {
        long n = 2;
        foreach (var rune in s.EnumerateRunes())
        {
            n += rune.Value switch
            {
                '"' or '\\' or '\b' or '\f' or '\n' or '\r' or '\t' => 2,
                < 0x20 => 6,
                _ => rune.Utf8SequenceLength,
            };
        }
        return n;
    }
}
