using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;

namespace LoraSharp.Imaging;

/// <summary>
/// Text chunks of PNG files: reading tEXt/zTXt/iTXt, and inserting a text chunk right after IHDR by rewriting the
/// byte stream (A1111 stores its generation parameters in a chunk with keyword "parameters"). Chunks are checked
/// (signature, lengths, CRC-32); a damaged file gives a <see cref="LoraSharpException"/> saying where.
/// </summary>
public static class PngText
{
    static readonly byte[] Signature = [0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A];
    static readonly Encoding Latin1 = Encoding.Latin1;

    /// <summary>A PNG chunk: 4-letter type, data, and its offset in the file.</summary>
    public readonly record struct Chunk(string Type, ReadOnlyMemory<byte> Data, long Offset);

    /// <summary>All chunks of a PNG up to and including IEND, each CRC-checked.</summary>
    public static IReadOnlyList<Chunk> ReadChunks(byte[] png, string source = "PNG data")
    {
        if (png.Length < Signature.Length || !png.AsSpan(0, Signature.Length).SequenceEqual(Signature))
            throw new LoraSharpException("not a PNG file (bad signature)", source);
        var chunks = new List<Chunk>();
        long pos = Signature.Length;
        while (true)
        {
            if (pos + 12 > png.Length)
                throw new LoraSharpException($"corrupted PNG: truncated chunk header at offset {pos}" + (chunks.Count > 0 ? $" after '{chunks[^1].Type}'" : ""), source);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan((int)pos, 4));
            if (length > int.MaxValue || pos + 12 + length > png.Length)
                throw new LoraSharpException($"corrupted PNG: chunk at offset {pos} declares {length} bytes, more than the file holds", source);
            var typeBytes = png.AsSpan((int)pos + 4, 4);
            foreach (var b in typeBytes)
                if (!(b is >= (byte)'A' and <= (byte)'Z' or >= (byte)'a' and <= (byte)'z'))
                    throw new LoraSharpException($"corrupted PNG: invalid chunk type at offset {pos}", source);
            var type = Encoding.ASCII.GetString(typeBytes);
            uint crc = BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan((int)(pos + 8 + length), 4));
            uint actual = Crc32.Compute(png.AsSpan((int)pos + 4, (int)length + 4));
            if (crc != actual)
                throw new LoraSharpException($"corrupted PNG: CRC mismatch in chunk '{type}' at offset {pos} (stored {crc:x8}, computed {actual:x8})", source);
            if (chunks.Count == 0 && type != "IHDR")
                throw new LoraSharpException($"corrupted PNG: first chunk is '{type}', expected IHDR", source);
            chunks.Add(new Chunk(type, png.AsMemory((int)pos + 8, (int)length), pos));
            pos += 12 + length;
            if (type == "IEND") return chunks;
        }
    }

    /// <summary>The text chunks of a PNG (keyword → text; the first chunk wins for a repeated keyword).</summary>
    public static IReadOnlyDictionary<string, string> Read(byte[] png, string source = "PNG data")
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var chunk in ReadChunks(png, source))
        {
            (string Key, string Text)? entry = chunk.Type switch
            {
                "tEXt" => ParseTExt(chunk, source),
                "zTXt" => ParseZTxt(chunk, source),
                "iTXt" => ParseITxt(chunk, source),
                _ => null,
            };
            if (entry is { } e) result.TryAdd(e.Key, e.Text);
        }
        return result;
    }

    /// <summary>Reads the text chunks of a PNG file.</summary>
    public static IReadOnlyDictionary<string, string> Read(string path)
    {
        byte[] bytes;
        try { bytes = File.ReadAllBytes(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new LoraSharpException($"cannot read: {e.Message}", path, inner: e); }
        return Read(bytes, path);
    }

    static (string, string) ParseTExt(Chunk c, string source)
    {
        var d = c.Data.Span;
        int nul = d.IndexOf((byte)0);
        if (nul < 1) throw new LoraSharpException($"corrupted PNG: tEXt chunk at offset {c.Offset} has no keyword", source);
        return (Latin1.GetString(d[..nul]), Latin1.GetString(d[(nul + 1)..]));
    }

    static (string, string) ParseZTxt(Chunk c, string source)
    {
        var d = c.Data.Span;
        int nul = d.IndexOf((byte)0);
        if (nul < 1 || nul + 2 > d.Length) throw new LoraSharpException($"corrupted PNG: zTXt chunk at offset {c.Offset} is malformed", source);
        return (Latin1.GetString(d[..nul]), Latin1.GetString(Inflate(c.Data[(nul + 2)..], c, source)));
    }

    static (string, string) ParseITxt(Chunk c, string source)
    {
        var d = c.Data.Span;
        int nul = d.IndexOf((byte)0);
        if (nul < 1 || nul + 3 > d.Length) throw new LoraSharpException($"corrupted PNG: iTXt chunk at offset {c.Offset} is malformed", source);
        var key = Latin1.GetString(d[..nul]);
        bool compressed = d[nul + 1] != 0;
        int p = nul + 3;
        int langEnd = d[p..].IndexOf((byte)0);
        if (langEnd < 0) throw new LoraSharpException($"corrupted PNG: iTXt chunk at offset {c.Offset} has no language tag terminator", source);
        p += langEnd + 1;
        int transEnd = d[p..].IndexOf((byte)0);
        if (transEnd < 0) throw new LoraSharpException($"corrupted PNG: iTXt chunk at offset {c.Offset} has no translated keyword terminator", source);
        p += transEnd + 1;
        var text = compressed ? Inflate(c.Data[p..], c, source) : d[p..].ToArray();
        return (key, Encoding.UTF8.GetString(text));
    }

    static byte[] Inflate(ReadOnlyMemory<byte> data, Chunk c, string source)
    {
        try
        {
            using var input = new MemoryStream(data.ToArray());
            using var z = new ZLibStream(input, CompressionMode.Decompress);
            using var output = new MemoryStream();
            z.CopyTo(output);
            return output.ToArray();
        }
        catch (InvalidDataException e)
        {
            throw new LoraSharpException($"corrupted PNG: compressed text in '{c.Type}' at offset {c.Offset} does not inflate: {e.Message}", source, inner: e);
        }
    }

    /// <summary>
    /// Returns a copy of <paramref name="png"/> with a text chunk inserted right after IHDR, replacing existing text
    /// chunks with the same keyword. As PIL does: tEXt when the text is Latin-1, else an uncompressed UTF-8 iTXt.
    /// </summary>
    public static byte[] Insert(byte[] png, string keyword, string text)
    {
        if (keyword.Length is < 1 or > 79 || keyword.Any(ch => ch > 0xFF || ch == 0))
            throw new ArgumentException("a PNG text keyword has 1-79 Latin-1 characters", nameof(keyword));
        var chunks = ReadChunks(png);
        using var output = new MemoryStream(png.Length + text.Length * 2 + 64);
        output.Write(Signature);
        foreach (var chunk in chunks)
        {
            if (chunk.Type is "tEXt" or "iTXt" or "zTXt" && KeywordOf(chunk) == keyword)
                continue;
            WriteChunk(output, chunk.Type, chunk.Data.Span);
            if (chunk.Type == "IHDR")
                WriteTextChunk(output, keyword, text);
        }
        return output.ToArray();
    }

    static string KeywordOf(Chunk c)
    {
        int nul = c.Data.Span.IndexOf((byte)0);
        return nul < 0 ? "" : Latin1.GetString(c.Data.Span[..nul]);
    }

    static void WriteTextChunk(Stream output, string keyword, string text)
    {
        var key = Latin1.GetBytes(keyword);
        bool latin1 = text.All(ch => ch <= 0xFF);
        byte[] data;
        if (latin1)
        {
            data = [.. key, 0, .. Latin1.GetBytes(text)];
            WriteChunk(output, "tEXt", data);
        }
        else
        {
            data = [.. key, 0, 0, 0, 0, 0, .. Encoding.UTF8.GetBytes(text)]; // no compression, empty language tag and translated keyword
            WriteChunk(output, "iTXt", data);
        }
    }

    static void WriteChunk(Stream output, string type, ReadOnlySpan<byte> data)
    {
        Span<byte> header = stackalloc byte[8];
        BinaryPrimitives.WriteUInt32BigEndian(header, (uint)data.Length);
        Encoding.ASCII.GetBytes(type, header[4..]);
        output.Write(header);
        output.Write(data);
        uint crc = Crc32.Compute(header[4..], data);
        Span<byte> crcBytes = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(crcBytes, crc);
        output.Write(crcBytes);
    }
}

/// <summary>CRC-32 (ISO-HDLC, polynomial 0xEDB88320) as PNG uses it.</summary>
internal static class Crc32
{
    static readonly uint[] Table = BuildTable();

    static uint[] BuildTable()
    {
        var t = new uint[256];
        for (uint n = 0; n < 256; n++)
        {
            uint c = n;
            for (int k = 0; k < 8; k++)
                c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[n] = c;
        }
        return t;
    }

    public static uint Compute(ReadOnlySpan<byte> data) => Compute(data, []);

    public static uint Compute(ReadOnlySpan<byte> first, ReadOnlySpan<byte> second)
    {
        uint c = 0xFFFFFFFFu;
        foreach (var b in first) c = Table[(c ^ b) & 0xFF] ^ (c >> 8);
        foreach (var b in second) c = Table[(c ^ b) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }
}
