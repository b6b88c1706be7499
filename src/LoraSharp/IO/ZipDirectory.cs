using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;

namespace LoraSharp.IO;

/// <summary>
/// The central directory of a zip file (with ZIP64), read without touching entry data, so entries that torch.save
/// stores uncompressed can be read in place at their data offset. Compressed (deflate) entries are inflated on demand.
/// </summary>
internal sealed class ZipDirectory
{
    public sealed record Entry(string Name, int Method, long CompressedSize, long UncompressedSize, long DataOffset);

    readonly FileBytes _file;
    readonly Dictionary<string, Entry> _entries;

    public IReadOnlyCollection<Entry> Entries => _entries.Values;

    ZipDirectory(FileBytes file, Dictionary<string, Entry> entries)
    {
        _file = file;
        _entries = entries;
    }

    public Entry? Find(string name) => _entries.GetValueOrDefault(name);

    static LoraSharpException Bad(string path, string problem) => new($"not a valid zip file: {problem}", path);

    public static ZipDirectory Read(FileBytes file)
    {
        string path = file.Path;
        long length = file.Length;
        if (length < 22)
            throw Bad(path, $"{length} bytes is too short for a zip end record");
        int tailLength = (int)Math.Min(length, 22 + 65535 + 20);
        var tail = file.ReadArray(length - tailLength, tailLength);
        int eocd = -1;
        for (int i = tailLength - 22; i >= 0; i--)
        {
            if (BinaryPrimitives.ReadUInt32LittleEndian(tail.AsSpan(i)) == 0x06054b50
                && i + 22 + BinaryPrimitives.ReadUInt16LittleEndian(tail.AsSpan(i + 20)) <= tailLength)
            {
                eocd = i;
                break;
            }
        }
        if (eocd < 0)
            throw Bad(path, "no end-of-central-directory record (truncated download?)");
        long count = BinaryPrimitives.ReadUInt16LittleEndian(tail.AsSpan(eocd + 10));
        long cdSize = BinaryPrimitives.ReadUInt32LittleEndian(tail.AsSpan(eocd + 12));
        long cdOffset = BinaryPrimitives.ReadUInt32LittleEndian(tail.AsSpan(eocd + 16));
        if (count == 0xFFFF || cdSize == 0xFFFFFFFF || cdOffset == 0xFFFFFFFF)
        {
            int loc = eocd - 20;
            if (loc < 0 || BinaryPrimitives.ReadUInt32LittleEndian(tail.AsSpan(loc)) != 0x07064b50)
                throw Bad(path, "ZIP64 end record locator missing");
            long z64 = (long)BinaryPrimitives.ReadUInt64LittleEndian(tail.AsSpan(loc + 8));
            if (z64 < 0 || z64 > length - 56)
                throw Bad(path, "ZIP64 end record offset out of range");
            var rec = file.ReadArray(z64, 56);
            if (BinaryPrimitives.ReadUInt32LittleEndian(rec) != 0x06064b50)
                throw Bad(path, "ZIP64 end record signature missing");
            count = (long)BinaryPrimitives.ReadUInt64LittleEndian(rec.AsSpan(32));
            cdSize = (long)BinaryPrimitives.ReadUInt64LittleEndian(rec.AsSpan(40));
            cdOffset = (long)BinaryPrimitives.ReadUInt64LittleEndian(rec.AsSpan(48));
        }
        if (cdOffset < 0 || cdSize < 0 || cdSize > int.MaxValue || cdOffset > length - cdSize || count < 0 || count > cdSize / 46 + 1)
            throw Bad(path, $"central directory (offset {cdOffset}, {cdSize} bytes, {count} entries) does not fit the file ({length} bytes)");
        var cd = file.ReadArray(cdOffset, (int)cdSize);
        var entries = new Dictionary<string, Entry>(StringComparer.Ordinal);
        int p = 0;
        for (long i = 0; i < count; i++)
        {
            if (p + 46 > cd.Length || BinaryPrimitives.ReadUInt32LittleEndian(cd.AsSpan(p)) != 0x02014b50)
                throw Bad(path, $"central directory entry {i} is damaged");
            int flags = BinaryPrimitives.ReadUInt16LittleEndian(cd.AsSpan(p + 8));
            int method = BinaryPrimitives.ReadUInt16LittleEndian(cd.AsSpan(p + 10));
            long csize = BinaryPrimitives.ReadUInt32LittleEndian(cd.AsSpan(p + 20));
            long usize = BinaryPrimitives.ReadUInt32LittleEndian(cd.AsSpan(p + 24));
            int nameLen = BinaryPrimitives.ReadUInt16LittleEndian(cd.AsSpan(p + 28));
            int extraLen = BinaryPrimitives.ReadUInt16LittleEndian(cd.AsSpan(p + 30));
            int commentLen = BinaryPrimitives.ReadUInt16LittleEndian(cd.AsSpan(p + 32));
            long localOffset = BinaryPrimitives.ReadUInt32LittleEndian(cd.AsSpan(p + 42));
            if (p + 46 + nameLen + extraLen + commentLen > cd.Length)
                throw Bad(path, $"central directory entry {i} runs past the directory");
            var nameBytes = cd.AsSpan(p + 46, nameLen);
            string name = (flags & 0x800) != 0 ? Encoding.UTF8.GetString(nameBytes) : Encoding.Latin1.GetString(nameBytes);
            var extra = cd.AsSpan(p + 46 + nameLen, extraLen);
            for (int e = 0; e + 4 <= extra.Length;)
            {
                int id = BinaryPrimitives.ReadUInt16LittleEndian(extra[e..]);
                int size = BinaryPrimitives.ReadUInt16LittleEndian(extra[(e + 2)..]);
                if (e + 4 + size > extra.Length) break;
                if (id == 0x0001)
                {
                    var z = extra.Slice(e + 4, size);
                    int q = 0;
                    if (usize == 0xFFFFFFFF && q + 8 <= z.Length) { usize = (long)BinaryPrimitives.ReadUInt64LittleEndian(z[q..]); q += 8; }
                    if (csize == 0xFFFFFFFF && q + 8 <= z.Length) { csize = (long)BinaryPrimitives.ReadUInt64LittleEndian(z[q..]); q += 8; }
                    if (localOffset == 0xFFFFFFFF && q + 8 <= z.Length) { localOffset = (long)BinaryPrimitives.ReadUInt64LittleEndian(z[q..]); }
                }
                e += 4 + size;
            }
            p += 46 + nameLen + extraLen + commentLen;
            if ((flags & 1) != 0)
                throw Bad(path, $"entry '{name}' is encrypted");
            if (method != 0 && method != 8)
                throw Bad(path, $"entry '{name}' uses compression method {method} (only stored and deflate are supported)");
            if (localOffset < 0 || localOffset > length - 30 || csize < 0 || usize < 0)
                throw Bad(path, $"entry '{name}' has a local header offset or size out of range");
            var local = file.ReadArray(localOffset, 30);
            if (BinaryPrimitives.ReadUInt32LittleEndian(local) != 0x04034b50)
                throw Bad(path, $"entry '{name}' has no local header at offset {localOffset}");
            long dataOffset = localOffset + 30 + BinaryPrimitives.ReadUInt16LittleEndian(local.AsSpan(26)) + BinaryPrimitives.ReadUInt16LittleEndian(local.AsSpan(28));
            if (dataOffset > length - csize)
                throw Bad(path, $"entry '{name}' ({csize} bytes at offset {dataOffset}) goes beyond the end of the file ({length} bytes): truncated file");
            if (method == 0 && csize != usize)
                throw Bad(path, $"stored entry '{name}' has different compressed ({csize}) and uncompressed ({usize}) sizes");
            entries[name] = new Entry(name, method, csize, usize, dataOffset);
        }
        return new ZipDirectory(file, entries);
    }

    /// <summary>Copies bytes [<paramref name="position"/>, +destination.Length) of an entry's uncompressed content.</summary>
    public void Read(Entry entry, long position, Span<byte> destination)
    {
        if (position < 0 || position > entry.UncompressedSize - destination.Length)
            throw new LoraSharpException($"zip entry '{entry.Name}' has {entry.UncompressedSize} bytes; a read of {destination.Length} at {position} leaves it", _file.Path);
        if (entry.Method == 0)
        {
            _file.Read(entry.DataOffset + position, destination);
            return;
        }
        try
        {
            using var inflate = new DeflateStream(_file.OpenRange(entry.DataOffset, entry.CompressedSize), CompressionMode.Decompress);
            Skip(inflate, position, entry);
            inflate.ReadExactly(destination);
        }
        catch (Exception e) when (e is InvalidDataException or EndOfStreamException)
        {
            throw new LoraSharpException($"zip entry '{entry.Name}' cannot be decompressed: {e.Message}", _file.Path, inner: e);
        }
    }

    public byte[] ReadAll(Entry entry, long maxBytes)
    {
        if (entry.UncompressedSize > maxBytes)
            throw new LoraSharpException($"zip entry '{entry.Name}' is {entry.UncompressedSize} bytes, over the {maxBytes} byte limit", _file.Path);
        var bytes = new byte[entry.UncompressedSize];
        Read(entry, 0, bytes);
        return bytes;
    }

    static void Skip(Stream s, long count, Entry entry)
    {
        var buffer = new byte[Math.Min(count, 1 << 16)];
        while (count > 0)
        {
            int n = s.Read(buffer, 0, (int)Math.Min(buffer.Length, count));
            if (n <= 0) throw new EndOfStreamException($"entry '{entry.Name}' ends early");
            count -= n;
        }
    }
}
