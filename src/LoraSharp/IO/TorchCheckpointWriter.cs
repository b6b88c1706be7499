using System.Buffers.Binary;
using System.Globalization;
using System.IO.Compression;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.IO;

/// <summary>
/// Writes the <c>torch.save</c> zip format (what <c>torch.load</c> and <see cref="PickleCheckpoint"/> read): a
/// protocol-2 pickle of a dict of tensors in <c>archive/data.pkl</c>, one uncompressed storage entry per tensor in
/// <c>archive/data/&lt;n&gt;</c>, plus <c>byteorder</c> and <c>version</c>. Minimal on purpose: for exporting weights
/// to tools that only read .ckpt/.pt, and for tests and benchmarks. Prefer safetensors for anything else.
/// </summary>
public static class TorchCheckpointWriter
{
    static readonly Dictionary<ScalarType, string> StorageNames = new()
    {
        [ScalarType.Float32] = "FloatStorage",
        [ScalarType.Float16] = "HalfStorage",
        [ScalarType.BFloat16] = "BFloat16Storage",
        [ScalarType.Float64] = "DoubleStorage",
        [ScalarType.Int64] = "LongStorage",
        [ScalarType.Int32] = "IntStorage",
        [ScalarType.Int16] = "ShortStorage",
        [ScalarType.Int8] = "CharStorage",
        [ScalarType.Byte] = "ByteStorage",
        [ScalarType.Bool] = "BoolStorage",
    };

    /// <summary>
    /// Writes <c>{key: tensor, ...}</c>, or <c>{<paramref name="wrapKey"/>: {key: tensor, ...}}</c> when given (as SD
    /// .ckpt files wrap weights in "state_dict"). Tensors are written one at a time to a temp file, then renamed over the target.
    /// </summary>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, string? wrapKey = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        Write(path, tensors.Select(kv => new PendingTensor(kv.Key, kv.Value.dtype, kv.Value.shape, () => kv.Value.alias())), wrapKey);
    }

    /// <summary>Writes lazily produced tensors (each produced, written and disposed before the next), in the given order.</summary>
    public static void Write(string path, IEnumerable<PendingTensor> tensors, string? wrapKey = null)
    {
        var list = tensors.ToList();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var pickle = new PickleBuilder();
        pickle.Proto(2);
        if (wrapKey is not null)
        {
            pickle.EmptyDict();
            pickle.Str(wrapKey);
        }
        pickle.EmptyDict();
        pickle.Mark();
        for (int i = 0; i < list.Count; i++)
        {
            var p = list[i];
            if (!seen.Add(p.Key))
                throw new LoraSharpException("duplicate tensor key", path, p.Key);
            if (!StorageNames.TryGetValue(p.DType, out var storage))
                throw new LoraSharpException($"dtype {p.DType} cannot be written to a torch checkpoint", path, p.Key);
            long numel = p.Shape.Aggregate(1L, (a, b) => a * b);
            pickle.Str(p.Key);
            pickle.RebuildTensor(storage, i.ToString(CultureInfo.InvariantCulture), numel, 0, p.Shape, ContiguousStrides(p.Shape));
        }
        pickle.SetItems();
        if (wrapKey is not null)
            pickle.SetItem();
        pickle.Stop();
        WriteArchive(path, pickle.ToArray(), list.Select((p, i) => (i.ToString(CultureInfo.InvariantCulture), (Action<Stream>)(s => WritePending(s, p, path)))));
    }

    static void WritePending(Stream s, PendingTensor p, string path)
    {
        using var scope = NewDisposeScope();
        var t = p.Produce() ?? throw new LoraSharpException("the tensor producer returned null", path, p.Key);
        if (t.dtype != p.DType || !t.shape.SequenceEqual(p.Shape))
            throw new LoraSharpException($"tensor is {t.dtype} [{string.Join(", ", t.shape)}] but {p.DType} [{string.Join(", ", p.Shape)}] was declared", path, p.Key);
        WriteTensorBytes(s, t);
    }

    internal static long[] ContiguousStrides(long[] shape)
    {
        var s = new long[shape.Length];
        long acc = 1;
        for (int i = shape.Length - 1; i >= 0; i--)
        {
            s[i] = acc;
            acc *= Math.Max(shape[i], 1);
        }
        return s;
    }

    static void WriteTensorBytes(Stream s, Tensor tensor)
    {
        using var scope = NewDisposeScope();
        var t = tensor.device_type == DeviceType.CPU ? tensor.contiguous() : tensor.to(DeviceType.CPU).contiguous();
        TensorFill.WriteTo(s, t);
    }

    /// <summary>Writes the zip container around a finished pickle and its storages (entry "archive/data/&lt;key&gt;"), atomically.</summary>
    internal static void WriteArchive(string path, byte[] pickle, IEnumerable<(string Key, Action<Stream> Write)> storages, string archiveName = "archive")
    {
        var full = Path.GetFullPath(path);
        var temp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, 1 << 20))
            {
                using (var zip = new ZipArchive(fs, ZipArchiveMode.Create, leaveOpen: true))
                {
                    void Entry(string name, Action<Stream> write)
                    {
                        var e = zip.CreateEntry(archiveName + "/" + name, CompressionLevel.NoCompression);
                        using var s = e.Open();
                        write(s);
                    }
                    Entry("data.pkl", s => s.Write(pickle));
                    Entry("byteorder", s => s.Write("little"u8));
                    foreach (var (key, write) in storages)
                        Entry("data/" + key, write);
                    Entry("version", s => s.Write("3\n"u8));
                }
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }
}

/// <summary>Emits pickle opcodes (protocol 2), for writing checkpoints and for building test pickles byte by byte.</summary>
internal sealed class PickleBuilder
{
    readonly MemoryStream _s = new();

    public byte[] ToArray() => _s.ToArray();
    public PickleBuilder Op(byte op) { _s.WriteByte(op); return this; }
    public PickleBuilder Raw(ReadOnlySpan<byte> bytes) { _s.Write(bytes); return this; }
    public PickleBuilder Proto(byte p) => Op(0x80).Op(p);
    public PickleBuilder Mark() => Op((byte)'(');
    public PickleBuilder EmptyDict() => Op((byte)'}');
    public PickleBuilder EmptyTuple() => Op((byte)')');
    public PickleBuilder SetItem() => Op((byte)'s');
    public PickleBuilder SetItems() => Op((byte)'u');
    public PickleBuilder Tuple() => Op((byte)'t');
    public PickleBuilder Reduce() => Op((byte)'R');
    public PickleBuilder Stop() => Op((byte)'.');
    public PickleBuilder False() => Op(0x89);
    public PickleBuilder BinPersId() => Op((byte)'Q');

    public PickleBuilder Str(string s)
    {
        var b = Encoding.UTF8.GetBytes(s);
        Span<byte> len = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(len, (uint)b.Length);
        return Op((byte)'X').Raw(len).Raw(b);
    }

    public PickleBuilder Int(long v)
    {
        if (v is >= 0 and < 256) return Op((byte)'K').Op((byte)v);
        if (v is >= 0 and < 65536) { Span<byte> b2 = stackalloc byte[2]; BinaryPrimitives.WriteUInt16LittleEndian(b2, (ushort)v); return Op((byte)'M').Raw(b2); }
        if (v is >= int.MinValue and <= int.MaxValue) { Span<byte> b4 = stackalloc byte[4]; BinaryPrimitives.WriteInt32LittleEndian(b4, (int)v); return Op((byte)'J').Raw(b4); }
        Span<byte> b8 = stackalloc byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(b8, v);
        return Op(0x8a).Op(8).Raw(b8);
    }

    public PickleBuilder Global(string module, string name) => Op((byte)'c').Raw(Encoding.UTF8.GetBytes(module + "\n" + name + "\n"));

    public PickleBuilder IntTuple(long[] values)
    {
        Mark();
        foreach (var v in values) Int(v);
        return Tuple();
    }

    /// <summary>torch._utils._rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict()).</summary>
    public PickleBuilder RebuildTensor(string storageType, string storageKey, long storageNumel, long offset, long[] size, long[] stride)
    {
        Global("torch._utils", "_rebuild_tensor_v2");
        Mark();
        Mark().Str("storage").Global("torch", storageType).Str(storageKey).Str("cpu").Int(storageNumel).Tuple().BinPersId();
        Int(offset).IntTuple(size).IntTuple(stride).False();
        Global("collections", "OrderedDict").EmptyTuple().Reduce();
        return Tuple().Reduce();
    }
}
