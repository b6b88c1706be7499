using System.Buffers.Binary;
using System.Text.Encodings.Web;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.IO;

/// <summary>A tensor to write later: its dtype and shape go into the header first, <see cref="Produce"/> is called when its data is written, inside a dispose scope (tensors it creates are disposed after writing).</summary>
public sealed record PendingTensor(string Key, ScalarType DType, long[] Shape, Func<Tensor> Produce);

/// <summary>
/// Writes <c>.safetensors</c> files the way the reference (Rust/Python) library lays them out: tensors ordered by
/// dtype (widest first, as the library does, so every tensor stays aligned to its element size) then by key (ordinal),
/// header JSON padded with spaces to a multiple of 8 bytes, data contiguous. The file is written to a temporary file
/// in the target's folder, flushed to disk, then renamed over the target, so readers never see a partial file.
/// Tensors are streamed one by one: the whole file is never held in memory.
/// </summary>
public static class SafetensorsWriter
{
    // The reference library sorts by its Dtype enum (declaration order), descending; these are the ranks of that order.
    static readonly string[] DTypeOrder = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"];

    /// <summary>Writes in-memory tensors (on any device; they are copied to host memory one at a time).</summary>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var pending = tensors.Select(kv =>
        {
            ArgumentNullException.ThrowIfNull(kv.Value, kv.Key);
            var t = kv.Value;
            return new PendingTensor(kv.Key, t.dtype, t.shape, () => t.alias());
        }).ToList();
        Write(path, pending, metadata);
    }

    /// <summary>Copies every tensor of a source (loading one at a time) into a new safetensors file; metadata defaults to the source's.</summary>
    public static void Write(string path, ITensorSource source, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        var pending = source.Keys.Select(k =>
        {
            var info = source.Info(k);
            return new PendingTensor(k, SafetensorsDType.LoadedType(info.DType), info.Shape, () => source.Load(k));
        }).ToList();
        Write(path, pending, metadata ?? source.Metadata);
    }

    /// <summary>Writes lazily produced tensors: each is produced, written and disposed before the next.</summary>
    public static void Write(string path, IEnumerable<PendingTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(tensors);
        var list = tensors.ToList();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var p in list)
        {
            if (p.Key == "__metadata__")
                throw new LoraSharpException("'__metadata__' is reserved in safetensors headers and cannot be a tensor key", path, p.Key);
            if (!seen.Add(p.Key))
                throw new LoraSharpException("duplicate tensor key", path, p.Key);
            foreach (var d in p.Shape)
                if (d < 0)
                    throw new LoraSharpException($"negative dimension in shape [{string.Join(", ", p.Shape)}]", path, p.Key);
        }
        var ordered = list
            .Select(p => (p, name: SafetensorsDType.NameOf(p.DType)))
            .OrderByDescending(x => Array.IndexOf(DTypeOrder, x.name))
            .ThenBy(x => x.p.Key, StringComparer.Ordinal)
            .ToList();

        var header = BuildHeader(ordered.Select(x => (x.p.Key, x.name, x.p.Shape)).ToList(), metadata);

        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full)!;
        var temp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> prefix = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
                fs.Write(prefix);
                fs.Write(header);
                foreach (var (p, _) in ordered)
                    WriteTensorData(fs, p, path);
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TryDelete(temp);
            throw new LoraSharpException($"cannot write file: {e.Message}", path, inner: e);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    static void TryDelete(string file)
    {
        try { File.Delete(file); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    /// <summary>The JSON header (space-padded to a multiple of 8 bytes) for tensors in data order.</summary>
    internal static byte[] BuildHeader(IReadOnlyList<(string Key, string DType, long[] Shape)> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject("__metadata__");
                foreach (var kv in metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                    w.WriteString(kv.Key, kv.Value);
                w.WriteEndObject();
            }
            long offset = 0;
            foreach (var (key, dtype, shape) in tensors)
            {
                long bytes = checked(shape.Aggregate(1L, (a, b) => checked(a * b)) * SafetensorsDType.ElementSize(dtype));
                w.WriteStartObject(key);
                w.WriteString("dtype", dtype);
                w.WriteStartArray("shape");
                foreach (var d in shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + bytes);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += bytes;
            }
            w.WriteEndObject();
        }
        int pad = (int)((8 - ms.Length % 8) % 8);
        for (int i = 0; i < pad; i++) ms.WriteByte((byte)' ');
        return ms.ToArray();
    }

    static void WriteTensorData(FileStream fs, PendingTensor p, string path)
    {
        using var scope = NewDisposeScope();
        var t = p.Produce() ?? throw new LoraSharpException("the tensor producer returned null", path, p.Key);
        if (t.dtype != p.DType)
            throw new LoraSharpException($"tensor has dtype {t.dtype} but {p.DType} was declared", path, p.Key);
        if (!t.shape.SequenceEqual(p.Shape))
            throw new LoraSharpException($"tensor has shape [{string.Join(", ", t.shape)}] but [{string.Join(", ", p.Shape)}] was declared", path, p.Key);
        // Writing needs the bytes in host memory: the one place a device move is inherent.
        if (t.device_type != DeviceType.CPU)
            t = t.to(DeviceType.CPU);
        t = t.contiguous();
        TensorFill.WriteTo(fs, t);
    }
}
