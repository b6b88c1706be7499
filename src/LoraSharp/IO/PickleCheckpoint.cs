using System.Globalization;
using System.Numerics;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.IO;

/// <summary>
/// A PyTorch <c>torch.save</c> file (zip format, torch ≥ 1.6: <c>.pt</c>, <c>.pth</c>, <c>.ckpt</c>, <c>.bin</c>)
/// read by LoraSharp's own restricted unpickler, which runs no code from the file: it accepts only tensors (via
/// <c>torch._utils._rebuild_tensor_v2</c>, <c>_rebuild_tensor</c>, <c>_rebuild_parameter</c>), the typed and untyped
/// torch storages, <c>collections.OrderedDict</c>, dicts, lists, tuples, sets, <c>torch.Size</c> and plain values, plus
/// what SD training checkpoints hold besides weights (A1111's allow-list): PyTorch Lightning's <c>ModelCheckpoint</c>
/// as an inert placeholder (never called), numpy scalars (read as numbers) and <c>_codecs.encode</c> bytes; any other
/// global (<c>os.system</c>, <c>builtins.eval</c>, <c>pytorch_lightning.Trainer</c>, ...) is refused by name.
/// <para>Nested dicts are flattened with "." (<c>{"state_dict": {"a.weight": t}}</c> gives <c>state_dict.a.weight</c>),
/// lists and tuples by index. Plain values (ints, floats, strings, bools) become <see cref="Metadata"/> entries.
/// Opening reads only the zip directory and data.pkl; a tensor's storage bytes are read when it is loaded (in place
/// for the uncompressed entries torch writes, inflated for compressed ones). Views (storage offsets, strides,
/// storages shared by several tensors) are reproduced exactly; each loaded tensor is a fresh contiguous copy.</para>
/// </summary>
public sealed class PickleCheckpoint : ITensorSource
{
    /// <summary>Largest data.pkl accepted (the pickle holds structure only; tensor data lives in separate entries).</summary>
    public const long MaxPickleBytes = 1L << 30;

    const int MaxDepth = 64;

    readonly FileBytes _file;
    readonly ZipDirectory _zip;
    readonly string _prefix;
    readonly Dictionary<string, (TensorRef Ref, TensorInfo Info)> _tensors = new(StringComparer.Ordinal);
    readonly List<string> _keys = [];
    readonly Dictionary<string, string> _metadata = new(StringComparer.Ordinal);

    public string FilePath { get; }
    public IReadOnlyList<string> Keys => _keys;
    public IReadOnlyDictionary<string, string> Metadata => _metadata;

    PickleCheckpoint(string path, TensorReadMode mode)
    {
        FilePath = path;
        _file = new FileBytes(path, mode);
        try
        {
            _zip = ZipDirectory.Read(_file);
            var pkl = _zip.Entries.Where(e => e.Name.EndsWith("data.pkl", StringComparison.Ordinal)
                                              && (e.Name == "data.pkl" || e.Name.EndsWith("/data.pkl", StringComparison.Ordinal)))
                                  .OrderBy(e => e.Name.Count(c => c == '/')).FirstOrDefault()
                      ?? throw new LoraSharpException("zip file has no data.pkl: not a torch.save checkpoint", path);
            _prefix = pkl.Name[..^"data.pkl".Length];
            if (_zip.Find(_prefix + "byteorder") is { } bo)
            {
                var order = Encoding.ASCII.GetString(_zip.ReadAll(bo, 64)).Trim();
                if (order != "little")
                    throw new LoraSharpException($"byte order '{order}' is not supported (only little-endian checkpoints)", path);
            }
            var root = PickleMachine.Load(_zip.ReadAll(pkl, MaxPickleBytes), path, pkl.Name);
            Flatten(root, "", 0);
        }
        catch
        {
            _file.Dispose();
            throw;
        }
    }

    /// <summary>Opens a torch.save zip checkpoint; tensors are read only when loaded.</summary>
    public static PickleCheckpoint Open(string path, TensorReadMode mode = TensorReadMode.MemoryMap) => new(Path.GetFullPath(path), mode);

    public bool Contains(string key) => _tensors.ContainsKey(key);

    public TensorInfo Info(string key) => Get(key).Info;

    (TensorRef Ref, TensorInfo Info) Get(string key) =>
        _tensors.TryGetValue(key, out var t) ? t : throw new LoraSharpException("no tensor with this key in the file", FilePath, key);

    void Flatten(object? value, string key, int depth)
    {
        if (depth > MaxDepth)
            throw new LoraSharpException($"objects nested deeper than {MaxDepth} levels (or a cycle)", FilePath, key);
        string Join(string child) => key.Length == 0 ? child : key + "." + child;
        switch (value)
        {
            case TensorRef t:
                AddTensor(key.Length == 0 ? "tensor" : key, t);
                break;
            case PyDict d:
                foreach (var (k, v) in d.Items)
                    Flatten(v, Join(KeyText(k, key)), depth + 1);
                break;
            case List<object?> list:
                for (int i = 0; i < list.Count; i++) Flatten(list[i], Join(i.ToString(CultureInfo.InvariantCulture)), depth + 1);
                break;
            case PyTuple tuple:
                for (int i = 0; i < tuple.Items.Length; i++) Flatten(tuple.Items[i], Join(i.ToString(CultureInfo.InvariantCulture)), depth + 1);
                break;
            case string s: AddMetadata(key, s); break;
            case long l: AddMetadata(key, l.ToString(CultureInfo.InvariantCulture)); break;
            case BigInteger b: AddMetadata(key, b.ToString(CultureInfo.InvariantCulture)); break;
            case double f: AddMetadata(key, f.ToString("R", CultureInfo.InvariantCulture)); break;
            case bool b: AddMetadata(key, b ? "True" : "False"); break;
            default:
                break; // None, bytes, bare storages, type references: nothing to load
        }
    }

    string KeyText(object k, string parent) => k switch
    {
        string s => s,
        long l => l.ToString(CultureInfo.InvariantCulture),
        BigInteger b => b.ToString(CultureInfo.InvariantCulture),
        bool b => b ? "True" : "False",
        PyGlobal g => g.FullName, // a class as key: Lightning's callbacks dict {ModelCheckpoint: state}
        _ => throw new LoraSharpException($"dict key of type {k.GetType().Name} is not supported (only strings and ints)", FilePath, parent.Length == 0 ? null : parent),
    };

    void AddMetadata(string key, string value)
    {
        if (key.Length > 0) _metadata[key] = value;
    }

    void AddTensor(string key, TensorRef t)
    {
        if (_tensors.ContainsKey(key))
            throw new LoraSharpException("two tensors have this key after flattening nested dicts with '.'", FilePath, key);
        var s = t.Storage;
        int elementSize = SafetensorsDType.ElementSize(s.DType);
        if (t.Size.Length != t.Stride.Length)
            throw new LoraSharpException($"size [{string.Join(", ", t.Size)}] and stride [{string.Join(", ", t.Stride)}] have different ranks", FilePath, key);
        long numel = 1;
        long reach = t.Offset;
        try
        {
            for (int i = 0; i < t.Size.Length; i++)
            {
                if (t.Size[i] < 0) throw new LoraSharpException($"negative dimension {t.Size[i]} in size [{string.Join(", ", t.Size)}]", FilePath, key);
                if (t.Stride[i] < 0) throw new LoraSharpException($"negative stride in [{string.Join(", ", t.Stride)}]", FilePath, key);
                numel = checked(numel * t.Size[i]);
                if (t.Size[i] > 0) reach = checked(reach + (t.Size[i] - 1) * t.Stride[i]);
            }
        }
        catch (OverflowException)
        {
            throw new LoraSharpException($"size [{string.Join(", ", t.Size)}] is too large", FilePath, key);
        }
        if (t.Offset < 0)
            throw new LoraSharpException($"negative storage offset {t.Offset}", FilePath, key);
        if (numel > 0 && reach >= s.Numel)
            throw new LoraSharpException(
                $"view (offset {t.Offset}, size [{string.Join(", ", t.Size)}], stride [{string.Join(", ", t.Stride)}]) reaches element {reach} of storage '{s.Key}' which has {s.Numel}",
                FilePath, key);
        var entry = _zip.Find(_prefix + "data/" + s.Key)
                    ?? throw new LoraSharpException($"storage '{s.Key}' is missing from the zip (no entry {_prefix}data/{s.Key})", FilePath, key);
        if (entry.UncompressedSize < s.Numel * elementSize)
            throw new LoraSharpException(
                $"storage '{s.Key}' holds {entry.UncompressedSize} bytes, but {s.Numel} {s.DType} elements need {s.Numel * elementSize}: truncated file",
                FilePath, key);
        _tensors[key] = (t, new TensorInfo(key, s.DType, t.Size, numel * elementSize));
        _keys.Add(key);
    }

    public Tensor Load(string key, ScalarType? dtype = null, Device? device = null)
    {
        var (t, info) = Get(key);
        var entry = _zip.Find(_prefix + "data/" + t.Storage.Key)!;
        int elementSize = SafetensorsDType.ElementSize(info.DType);
        Tensor result;
        if (IsContiguous(t.Size, t.Stride))
        {
            long start = t.Offset * elementSize;
            result = TensorFill.Read(info.DType, t.Size, (pos, dst) => _zip.Read(entry, start + pos, dst), FilePath, key);
        }
        else
        {
            // A strided view: read the storage range it touches, then gather with as_strided.
            using var scope = NewDisposeScope();
            long reach = t.Offset;
            for (int i = 0; i < t.Size.Length; i++) reach += (t.Size[i] - 1) * t.Stride[i];
            long span = reach - t.Offset + 1;
            long start = t.Offset * elementSize;
            var storage = TensorFill.Read(info.DType, [span], (pos, dst) => _zip.Read(entry, start + pos, dst), FilePath, key);
            result = storage.as_strided(t.Size, t.Stride, 0).contiguous().MoveToOuterDisposeScope();
        }
        return TensorFill.Convert(result, dtype, device);
    }

    /// <summary>True when the view is a plain row-major block (dimensions of size 1 may have any stride); an empty view counts as contiguous.</summary>
    static bool IsContiguous(long[] size, long[] stride)
    {
        if (size.Any(d => d == 0)) return true;
        long expected = 1;
        for (int i = size.Length - 1; i >= 0; i--)
        {
            if (size[i] != 1 && stride[i] != expected) return false;
            expected *= size[i];
        }
        return true;
    }

    public void Dispose() => _file.Dispose();
}
